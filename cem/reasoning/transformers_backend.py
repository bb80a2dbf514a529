"""The ``transformers`` reasoner: a local vision-language model through ``AutoModelForImageTextToText``.

Works with models that ``AutoModelForImageTextToText`` + ``AutoProcessor`` load and whose processor has a
chat template (LLaVA-1.5/NeXT/OneVision, Qwen2-VL/2.5-VL, Idefics3/SmolVLM ...). Config
(``reasoner.model`` and ``reasoner.options``): ``revision``, ``dtype`` (auto|float32|float16|bfloat16),
``device_map`` (e.g. auto, via accelerate) or ``reasoner.device``, ``quantization`` (4bit|8bit, bitsandbytes;
``quantization_skip`` lists modules kept unquantised, by default the vision tower, projector and head),
``max_cues``, ``max_text_chars`` (bounds of the constrained answer), ``max_new_tokens``
(raised where needed to the grammar's worst-case answer length, so a constrained answer always completes),
``trust_remote_code`` (off unless set), ``distribution`` (likelihood|verbalized),
``likelihood_temperature``, ``batch_size`` (images per ``generate``), ``do_sample``/``seed``/``temperature``
(sampling from a local RNG seeded once per reasoner; the global torch RNG is never touched), ``max_pixels``
and ``image_splitting`` (image-size caps, see :mod:`cem.reasoning.families`),
``local_files_only``.

The model loads once per reasoner. All faces of an image share one prompt; up to ``batch_size`` images
share one ``generate`` call (left padding), decoded greedily by default under an xgrammar grammar (see
:mod:`cem.reasoning.answer`), so the same input gives the same output.

``distribution: likelihood`` (the default) scores each label as a continuation of the prompt from the
model's own log-probabilities: the prompt (with the image) runs once and its KV cache is shared by every
(face, label) continuation ``"Face k: <label>"``, scored together in one batched forward pass; a label's
log-probability is the sum over its tokens (multi-token labels included); per face the scores are
renormalised with a temperature. The generated JSON still supplies cues and rationale.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import numpy as np

from cem.config import Config
from cem.fer.aus import AU_NAMES
from cem.reasoning.answer import answer_grammar, max_answer_chars
from cem.reasoning.base import FaceReasoning
from cem.reasoning.families import (
    Family,
    apply_image_settings,
    chat_content,
    family_of,
    load_processor,
    read_model_type,
)
from cem.reasoning.llm import Job, LLMReasonerBase, ModelUnavailableError, ReasonerFailure, options

QUANT_SKIP_DEFAULT = ("vision_tower", "multi_modal_projector", "visual", "vision_model", "connector", "lm_head")


def _skip_patterns(names: list[str]) -> list[str]:
    """Module names to keep unquantised, in both matching styles: transformers 4 matches substrings,
    transformers 5 matches from the start of the module path (or as a regex), hence ``.*name`` too."""
    return [p for n in names for p in (n, rf".*\b{n}")]
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "auto": "auto"}


HUB_PROBE_TIMEOUT_S = 3.0


def hub_unreachable(model_id: str, revision: str | None = None, local_files_only: bool = False) -> str | None:
    """Why a model that must come from the Hugging Face hub cannot, or None.

    Only for a hub id whose config is not in the local cache, outside offline mode: one TCP connection
    to the hub's endpoint with a short timeout. Without it, an offline machine sits in the hub client's
    retries for minutes (measured: 173 s for one missing model) before saying the model is missing.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if Path(model_id).expanduser().is_dir() or local_files_only:
        return None
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE:
        return None  # transformers then fails at once without a cached copy
    try:
        if isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str):
            return None
    except ValueError:  # not a valid repo id: from_pretrained says so
        return None
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached: {e}"
    return None


def missing_model_folder(model_id: str) -> bool:
    """``model_id`` is written as a path (./, /, ~, a backslash) but no such folder exists: it is no hub id
    either, so the hub's own message ("Repo id must be in the form ...") would only confuse."""
    return (model_id.startswith((".", "/", "~")) or "\\" in model_id) and not Path(model_id).expanduser().is_dir()


def load_model(model_id: str, opts: dict[str, Any], device: str | None) -> tuple[Any, Any]:
    """(model, processor), or :class:`ModelUnavailableError` with what to do about it."""
    try:
        import torch
        from transformers import AutoModelForImageTextToText
    except ImportError as e:
        raise ModelUnavailableError(f"the transformers reasoner needs: pip install 'cem[llm]' ({e})") from None
    common = {"revision": opts.get("revision"), "trust_remote_code": bool(opts.get("trust_remote_code", False)),
              "local_files_only": bool(opts.get("local_files_only", False))}
    kwargs: dict[str, Any] = dict(common)
    dtype = str(opts.get("dtype", "float32"))
    if dtype not in _DTYPES:
        raise ValueError(f"reasoner.options.dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if missing_model_folder(model_id):
        raise ModelUnavailableError(f"model folder {model_id!r} does not exist. Point --model at a folder "
                                    "saved with save_pretrained, or at a Hugging Face model id.")
    revision = opts.get("revision")
    unreachable = hub_unreachable(model_id, str(revision) if revision else None, bool(common["local_files_only"]))
    if unreachable:
        raise ModelUnavailableError(
            f"model {model_id!r} is not available here: it is not in the Hugging Face cache and {unreachable}. "
            f"Download it once with `hf download {model_id}` (or point --model at a local folder); offline runs "
            "need it in the Hugging Face cache, with HF_HUB_OFFLINE=1. To run without a model: --reasoner rules.")
    family = family_of(read_model_type(model_id, **common))
    quant = opts.get("quantization")
    if quant:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ModelUnavailableError("quantization needs bitsandbytes: pip install 'cem[quant]'") from None
        # the vision tower, projector and output head stay unquantised (as is usual for VLMs; it also keeps
        # 4-bit's requirement of input widths divisible by 64 to the language model's layers)
        skip = _skip_patterns(list(opts.get("quantization_skip")
                                   or (family.quant_skip if family else QUANT_SKIP_DEFAULT)))
        if quant == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip,
                bnb_4bit_compute_dtype=torch.float32 if dtype in ("float32", "auto") else kwargs["dtype"])
        elif quant == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        else:
            raise ValueError(f"reasoner.options.quantization must be 4bit or 8bit, not {quant!r}")
    if opts.get("device_map"):
        kwargs["device_map"] = opts["device_map"]
    elif device and device != "cpu":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"reasoner.device={device!r} but torch sees no CUDA device")
        kwargs["device_map"] = device
    try:
        processor = load_processor(model_id, family, **common)
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs).eval()
    except (OSError, ValueError) as e:  # ValueError: a malformed repo id
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if Path(model_id).is_dir():  # a local folder: nothing to download, something in it is missing or broken
            raise ModelUnavailableError(
                f"model folder {model_id!r} cannot be loaded ({first}). It needs what save_pretrained writes for "
                "a vision-language model: config.json, the weights, the tokenizer and the image processor "
                "(processor.save_pretrained). To run without a model: --reasoner rules.") from None
        raise ModelUnavailableError(
            f"model {model_id!r} is not available here ({first}). Download it once with "
            f"`hf download {model_id}` (or point --model at a local folder); offline runs need it in the "
            "Hugging Face cache, with HF_HUB_OFFLINE=1. To run without a model: --reasoner rules."
        ) from None
    if getattr(processor, "chat_template", None) is None:
        raise ModelUnavailableError(f"{model_id}: the processor has no chat template; cem needs one")
    image_token = getattr(processor, "image_token", None)
    if isinstance(image_token, str):
        token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
        model_id_of_image = next((v for v in (getattr(model.config, k, None) for k in ("image_token_id",
                                  "image_token_index")) if isinstance(v, int)), None)
        if token_id in (None, processor.tokenizer.unk_token_id) or (
                model_id_of_image is not None and token_id != model_id_of_image):
            raise ModelUnavailableError(
                f"{model_id}: the processor's image token {image_token!r} (token id {token_id}) is not the token "
                f"the model takes images at (id {model_id_of_image}), so no image can reach the model; the "
                "processor and the model do not belong together")
    apply_image_settings(processor, family, {"max_pixels": opts.get("max_pixels"),
                                             "image_splitting": opts.get("image_splitting")})
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, processor


class LocalSampler:
    """A logits processor that samples the next token from its own ``torch.Generator`` (seeded once per
    reasoner) and leaves only that token possible. ``generate`` has no generator argument, and reseeding the
    global RNG before every call would make every image's draw the same and disturb other users of it."""

    def __init__(self, seed: int, temperature: float = 1.0) -> None:
        self.seed, self.temperature = seed, max(1e-6, temperature)
        self.generator: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.generator is None:
            self.generator = torch.Generator(device=scores.device)
            self.generator.manual_seed(self.seed)
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        pick = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, pick, 0.0)


class TransformersReasoner(LLMReasonerBase):
    backend = "transformers"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if not config.reasoner.model:
            raise ValueError("the transformers reasoner needs a model: --model ID_OR_PATH or reasoner.model")
        self.model_id = config.reasoner.model
        opts = options(config)
        self.opts = opts
        self.mode = opts.get("distribution", "likelihood")
        if self.mode not in ("likelihood", "verbalized"):
            raise ValueError(f"reasoner.options.distribution must be likelihood or verbalized, not {self.mode!r}")
        self.max_new_tokens = int(opts.get("max_new_tokens", 384))
        self.temperature = float(opts.get("likelihood_temperature", 1.0))
        self.do_sample = bool(opts.get("do_sample", False))
        self.sample_temperature = float(opts.get("temperature", 1.0))
        self.seed = opts.get("seed")
        self.model, self.processor = load_model(self.model_id, opts, config.reasoner.device)
        self.family: Family | None = family_of(getattr(self.model.config, "model_type", None))
        self._generator: Any = None  # a local RNG for sampling: the global one is never reseeded
        self._grammar_compiler: Any = None  # xgrammar.GrammarCompiler, made on first use
        self._grammars: dict[int, Any] = {}

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def _chat_text(self, prompt_text: str, n_images: int) -> str:
        content = chat_content(self.family, n_images, prompt_text)
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _inputs(self, jobs: list[Job]) -> Any:
        from PIL import Image

        texts: list[str] = []
        images: list[Any] = []
        for j in jobs:
            texts.append(self._chat_text(j.built_prompt.text, len(j.built_prompt.images)))
            images.extend(Image.fromarray(im) if isinstance(im, np.ndarray) else im for im in j.built_prompt.images)
        kw: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kw["images"] = images
        return self.processor(**kw).to(self.device)

    def _grammar(self, n_faces: int) -> Any:
        import xgrammar as xgr

        if self._grammar_compiler is None:
            vocab = self.model.config.get_text_config().vocab_size
            info = xgr.TokenizerInfo.from_huggingface(self.processor.tokenizer, vocab_size=vocab)
            self._grammar_compiler = xgr.GrammarCompiler(info)
        if n_faces not in self._grammars:
            self._grammars[n_faces] = self._grammar_compiler.compile_grammar(
                answer_grammar(self.labels, n_faces, list(AU_NAMES), self.max_cues, self.max_text))
        return self._grammars[n_faces]

    def generate(self, jobs: list[Job]) -> list[str]:
        """Constrained generation for several images in one ``generate`` call."""
        import torch
        import xgrammar as xgr

        inputs = self._inputs(jobs)
        processor = xgr.contrib.hf.LogitsProcessor([self._grammar(len(j.faces)) for j in jobs])
        steps = [processor]
        if self.do_sample:  # sampled from a local, seeded RNG; generate itself then picks that token greedily
            if self._generator is None:
                self._generator = LocalSampler(int(self.seed) if self.seed is not None else 0, self.sample_temperature)
            steps.append(self._generator)
        # the grammar bounds every answer; never stop before the longest one it admits could complete
        budget = max(max_answer_chars(self.labels, len(j.faces), list(AU_NAMES), self.max_cues, self.max_text)
                     for j in jobs)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max(self.max_new_tokens, budget),
                                      do_sample=False, logits_processor=steps)
        new = out[:, inputs["input_ids"].shape[1]:]
        # totals over the images of this reason_batch call (the pipeline divides by the image count)
        stats = self.last_stats
        stats["prompt_tokens"] = stats.get("prompt_tokens", 0.0) + float(inputs["attention_mask"].sum())
        stats["generated_tokens"] = (stats.get("generated_tokens", 0.0)
                                     + float((new != self.processor.tokenizer.pad_token_id).sum()))
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def label_likelihoods(self, job: Job) -> dict[int, dict[str, float]]:
        """Per face, a distribution over labels from the model's log-probabilities (one shared prefix)."""
        import torch

        tok = self.processor.tokenizer
        inputs = self._inputs([job])
        rows, spans = [], []  # token ids per (face, label); span of label tokens inside the row
        for f_i in range(len(job.faces)):
            stem = f"Face {f_i + 1}:"
            stem_ids = tok(stem, add_special_tokens=False)["input_ids"]
            sep = self.family.label_prefix if self.family else " "
            for lab in self.labels:
                ids = tok(f"{stem}{sep}{lab}", add_special_tokens=False)["input_ids"]
                k = 0
                while k < min(len(ids), len(stem_ids)) and ids[k] == stem_ids[k]:
                    k += 1
                rows.append(ids)
                spans.append((k, len(ids)))
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id
        cont = torch.full((len(rows), width), pad, dtype=torch.long)
        cmask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            cont[i, : len(r)] = torch.tensor(r)
            cmask[i, : len(r)] = 1
        cont, cmask = cont.to(self.device), cmask.to(self.device)
        # transformers 5 names the KV cache `cache`; 4.x called it `past_key_values`
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.inference_mode():
            pre = self.model(**inputs, use_cache=True)
            cache = getattr(pre, cache_kw)
            cache.batch_repeat_interleave(len(rows))
            mask = torch.cat([inputs["attention_mask"].repeat(len(rows), 1), cmask], dim=1)
            # explicit positions: the continuation follows the prefix (multimodal rotary models add the offset
            # their image grid left, which the prefix pass stored)
            n0 = inputs["input_ids"].shape[1]
            pos = torch.arange(n0, n0 + width, device=self.device)[None].expand(len(rows), -1)
            if self.family is not None and self.family.mrope:
                pos = pos[None].expand(3, -1, -1) + self.model.model.rope_deltas.to(self.device)[None]
            out = self.model(input_ids=cont, attention_mask=mask, position_ids=pos, use_cache=False,
                             **{cache_kw: cache})
        first = torch.log_softmax(pre.logits[:, -1].float(), dim=-1).repeat(len(rows), 1)
        rest = torch.log_softmax(out.logits.float(), dim=-1)
        # log p(token j) comes from the logits before it: the prefix's last position for j = 0
        logp_all = torch.cat([first[:, None], rest[:, :-1]], dim=1)
        tok_logp = logp_all.gather(2, cont[:, :, None])[:, :, 0]
        scores = torch.stack([tok_logp[i, a:b].sum() for i, (a, b) in enumerate(spans)]).cpu().numpy()
        out_d: dict[int, dict[str, float]] = {}
        n = len(self.labels)
        if not np.all(np.isfinite(scores)):  # never a NaN distribution written as an answer
            raise ReasonerFailure("model-error", "the model gave non-finite label log-probabilities")
        for f_i in range(len(job.faces)):
            s = scores[f_i * n : (f_i + 1) * n] / self.temperature
            p = np.exp(s - s.max())
            p /= p.sum()
            out_d[f_i] = dict(zip(self.labels, p.tolist()))
        return out_d

    # ---------------------------------------------------------------------------------------- interface
    def reason_batch(self, jobs: list[Job]) -> list[list[FaceReasoning]]:
        self.last_stats = {}
        results: list[list[FaceReasoning]] = [[] for _ in jobs]
        todo = []
        for i, j in enumerate(jobs):
            if not j.faces:
                continue
            try:
                j.prompt = self.build_prompt(j)
                todo.append(i)
            except ReasonerFailure as e:  # this image's template failure: its faces' error
                results[i] = self.to_results(j, None, None, transport_error=str(e))[0]
        t_model = 0.0

        def answer(idx: list[int]) -> tuple[list[str], list[Any]]:
            texts = self.generate([jobs[i] for i in idx])
            return texts, [self.label_likelihoods(jobs[i]) if self.mode == "likelihood" else None for i in idx]

        def failed(i: int, e: Exception) -> None:
            failure = e if isinstance(e, ReasonerFailure) else ReasonerFailure(
                "model-error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            results[i] = self.to_results(jobs[i], None, None, transport_error=str(failure))[0]

        for start in range(0, len(todo), max(1, self.batch_size)):
            idx = todo[start : start + self.batch_size]
            t = time.perf_counter()
            try:
                texts, likes = answer(idx)
            except (RuntimeError, ValueError) as e:  # out of memory, a NaN score ...
                if len(idx) == 1:
                    failed(idx[0], e)
                    continue
                # one image's problem must not cost the others their answers: each one alone
                done = []
                texts, likes = [], []
                for i in idx:
                    try:
                        text_i, like_i = answer([i])
                    except (RuntimeError, ValueError) as e_one:
                        failed(i, e_one)
                        continue
                    done.append(i)
                    texts += text_i
                    likes += like_i
                idx = done
            finally:
                t_model += time.perf_counter() - t
            for i, text, like in zip(idx, texts, likes):
                res, err = self.to_results(jobs[i], text, like)
                if err and any(r.distribution is None for r in res):  # retry once, alone, with the error
                    retry = jobs[i].built_prompt.text + f"\nYour previous answer was invalid ({err}). Answer again.\n"
                    jobs[i].built_prompt.text = retry
                    t = time.perf_counter()
                    res, _ = self.to_results(jobs[i], self.generate([jobs[i]])[0], like)
                    t_model += time.perf_counter() - t
                results[i] = res
        self.last_stats["model_ms"] = t_model * 1000
        return results
