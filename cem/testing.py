"""Tiny, randomly initialised vision-language models for offline tests and notebooks (no download, seconds).

``build_tiny(family, folder)`` writes a complete model folder for one of the families cem ships configs
for (:data:`cem.reasoning.families.FAMILIES`): the family's own config and model class (LLaVA with a CLIP
tower and Llama; LLaVA-OneVision with SigLIP and Qwen2; Qwen2.5-VL; Idefics3/SmolVLM with a Llama text
model), its own image-processor and processor classes, and its real chat template, special tokens and
processor settings, read from ``tests/assets/<family>/`` (small text files from the public model
repositories; ``PROVENANCE.md`` there says where each came from). Only sizes shrink: layers, widths and
image sizes, so a forward pass takes milliseconds.

Two things cannot be the real ones here, and every builder says so in its folder's ``TINY.md``:
- the tokenizer is a small byte-level BPE trained on the spot (the real vocabularies are 2 to 11 MB), with
  the family's real special and added tokens, bos/eos/pad roles and bos behaviour, but other token ids;
- families whose standard processor has a video processor (LLaVA-OneVision, Qwen2.5-VL) need torchvision
  for it in transformers 5, which this machine lacks: the folder holds the standard processor files
  (``processor_class`` is the family's), and cem loads it through
  :func:`cem.reasoning.families.load_processor`, which uses the family's processor class without its video
  part when torchvision is missing.

Widths are multiples of 64 in every language-model layer, so 4-bit bitsandbytes loading works; the vision
towers and projectors stay unquantised (as cem does for real models). The weights are random: the *text*
is noise. Use these models to test plumbing, schemas, constrained decoding and parsing, never wording.
``build_tiny_llava`` is kept for the notebooks and older tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets"
TINY_FAMILIES = ("llava", "llava_onevision", "qwen2_5_vl", "idefics3")

CHAT_TEMPLATE = (  # the simple template of build_tiny_llava (not a real model's)
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# the language model of every tiny family: widths that are multiples of 64 (bitsandbytes 4-bit)
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096}


def _corpus() -> list[str]:
    labels = "neutral happiness surprise sadness anger disgust fear contempt"
    aus = " ".join(f"AU{n:02d}" for n in range(1, 46))
    return [
        '{"faces":[{"index":0,"distribution":{"neutral":0.1,"happiness":0.9},"cues":[{"cue":"smile",'
        '"source":"face","au":"AU12","supports":"happiness","weight":0.5}],"rationale":"The face smiles."}]}',
        labels, aus, "face scene body text null true false 0123456789 .,:;{}[]\"' -_",
        "You read emotions of faces in context. Face 1 left center right quality pose yaw pitch roll.",
        "Action units expression model context image answer JSON only with the schema.",
        "USER ASSISTANT User Assistant system user assistant You are a helpful assistant.",
    ] * 20


def _asset(family: str, name: str) -> Any:
    return json.loads((ASSETS / family / name).read_text(encoding="utf-8"))


def _image_kwargs(pre: dict[str, Any]) -> dict[str, Any]:
    """A preprocessor_config.json's settings as image-processor arguments."""
    return {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}


def _tokenizer(family: str) -> Any:
    """A small byte-level BPE with the family's real special/added tokens and their roles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _asset(family, "special_tokens.json")
    roles = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if spec.get(k)}
    specials = list(dict.fromkeys([*roles.values(), *spec["added_tokens"]]))
    tok = Tokenizer(models.BPE(unk_token=roles.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400 + len(specials), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if spec.get("add_bos_token"):  # Llama tokenizers put <s> before every sequence
        bos = roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles, padding_side="left",
                                   clean_up_tokenization_spaces=False)
    # every added token of the real tokenizer is a special token here too (never split, skipped on decode)
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in roles.values()]},
                            replace_extra_special_tokens=False)
    return fast


def _text_config(cls: Any, tok: Any, **extra: Any) -> Any:
    return cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, **TEXT, **extra)


def _llava(tok: Any, chat_template: str) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    pre, proc = _asset("llava", "preprocessor_config.json"), _asset("llava", "processor_config.json")
    side, patch = 56, int(proc["patch_size"])
    pre |= {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=side, patch_size=patch, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(LlamaConfig, tok),
                         image_token_index=tok.convert_tokens_to_ids(proc["image_token"]), vision_feature_layer=-2,
                         vision_feature_select_strategy=proc["vision_feature_select_strategy"],
                         image_seq_length=(side // patch) ** 2)
    ip = CLIPImageProcessor(**_image_kwargs(pre))
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=chat_template,
                               **{k: v for k, v in proc.items() if k != "processor_class"})
    return LlavaForConditionalGeneration(config), processor


def _llava_onevision(tok: Any, chat_template: str) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from cem.reasoning.families import image_only_processor_class

    pre = _asset("llava_onevision", "preprocessor_config.json")
    proc = _asset("llava_onevision", "processor_config.json")
    side, patch, real = 28, 14, int(pre["size"]["height"])
    grid = [[a * side // real, b * side // real] for a, b in pre["image_grid_pinpoints"]]
    pre |= {"size": {"height": side, "width": side}, "image_grid_pinpoints": grid}
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=side, patch_size=patch, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=_text_config(Qwen2Config, tok).to_dict(),
                                  image_token_index=tok.convert_tokens_to_ids(proc["image_token"]),
                                  video_token_index=tok.convert_tokens_to_ids(proc["video_token"]),
                                  vision_feature_layer=-1, image_grid_pinpoints=grid,
                                  vision_feature_select_strategy=proc["vision_feature_select_strategy"])
    ip = LlavaOnevisionImageProcessorPil(**_image_kwargs(pre))
    kw = {k: v for k, v in proc.items() if k != "processor_class"} | {"num_image_tokens": (side // patch) ** 2}
    processor = image_only_processor_class("LlavaOnevisionProcessor")(image_processor=ip, tokenizer=tok,
                                                                      chat_template=chat_template, **kw)
    return LlavaOnevisionForConditionalGeneration(config), processor


def _qwen2_5_vl(tok: Any, chat_template: str) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cem.reasoning.families import image_only_processor_class

    pre = _asset("qwen2_5_vl", "preprocessor_config.json")
    lo, hi = 56 * 56, 112 * 112  # 4 to 64 patches of 14 px, 1 to 16 image tokens after the 2x2 merge
    pre |= {"min_pixels": lo, "max_pixels": hi, "size": {"shortest_edge": lo, "longest_edge": hi}}
    text = _text_config(Qwen2_5_VLConfig().text_config.__class__, tok,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": pre["patch_size"], "spatial_merge_size": pre["merge_size"],
              "temporal_patch_size": pre["temporal_patch_size"], "window_size": 56, "fullatt_block_indexes": [1]}
    config = Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vision, **ids)
    ip = Qwen2VLImageProcessorPil(**_image_kwargs(pre))
    processor = image_only_processor_class("Qwen2_5_VLProcessor")(image_processor=ip, tokenizer=tok,
                                                                  chat_template=chat_template)
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _idefics3(tok: Any, chat_template: str) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    pre, proc = _asset("idefics3", "preprocessor_config.json"), _asset("idefics3", "processor_config.json")
    # SmolVLM's own patch (14) and pixel-shuffle scale factor (3: 384 px tiles give 81 tokens); 42 px tiles
    # give 1 token each, and a long side of 84 px splits a photo into up to 2 x 2 tiles plus the global view
    side, patch, scale = 42, 14, 3
    pre |= {"max_image_size": {"longest_edge": side}, "size": {"longest_edge": 2 * side}}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": side, "patch_size": patch}
    config = Idefics3Config(vision_config=vision, text_config=_text_config(LlamaConfig, tok).to_dict(),
                            scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"))
    ip = Idefics3ImageProcessorPil(**_image_kwargs(pre))
    seq = (side // patch) ** 2 // scale**2
    processor = Idefics3Processor(image_processor=ip, tokenizer=tok, chat_template=chat_template,
                                  **{k: v for k, v in proc.items() if k != "processor_class"} | {"image_seq_len": seq})
    return Idefics3ForConditionalGeneration(config), processor


# the video processor part of the families that have one (image sizes follow the image processor's)
_VIDEO = {"llava_onevision": {"video_processor_type": "LlavaOnevisionVideoProcessor"},
          "qwen2_5_vl": {"video_processor_type": "Qwen2VLVideoProcessor"}}


def _video_sizes(image_processor: dict[str, Any]) -> dict[str, Any]:
    keys = ("size", "patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels", "image_mean",
            "image_std", "do_normalize", "do_rescale", "do_resize", "do_convert_rgb", "resample", "rescale_factor")
    return {k: image_processor[k] for k in keys if k in image_processor}


_BUILDERS = {"llava": _llava, "llava_onevision": _llava_onevision, "qwen2_5_vl": _qwen2_5_vl, "idefics3": _idefics3}


def build_tiny(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random model of ``family`` (one of :data:`TINY_FAMILIES`) to ``folder``; return it."""
    import torch

    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(TINY_FAMILIES)})")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(family)
    chat_template = _asset(family, "chat_template.json")["chat_template"]
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tok, chat_template)
    model = model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if processor.__class__.__name__.endswith("ImageOnly"):
        # saved by the image-only subclass: write what the family's real repository holds, the family's own
        # processor class with its video processor settings (which need torchvision to load)
        p = out / "processor_config.json"
        d = json.loads(p.read_text())
        d["processor_class"] = processor.__class__.__mro__[1].__name__
        d["video_processor"] = _VIDEO[family] | _video_sizes(d["image_processor"])
        p.write_text(json.dumps(d, indent=2))
        tc = out / "tokenizer_config.json"
        d = json.loads(tc.read_text())
        d["processor_class"] = processor.__class__.__mro__[1].__name__
        tc.write_text(json.dumps(d, indent=2))
    (out / "TINY.md").write_text(
        f"Tiny random {family} model built by cem.testing.build_tiny (seed {seed}). Chat template, special "
        f"tokens and processor settings: tests/assets/{family}/ (see PROVENANCE.md). Not real: the weights "
        "(random), the sizes (tiny), the tokenizer's vocabulary (a small BPE; real special tokens, other ids).\n")
    return out


def build_tiny_llava(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny random LLaVA with a simple chat template to ``folder`` and return the folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.padding_side = "left"
    image_token_id = fast.convert_tokens_to_ids("<image>")

    patch = 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                       pad_token_id=fast.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=fast, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
