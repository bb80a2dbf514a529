"""What the LLM reasoners share: prompt building, answer handling, retries, and per-face results."""

from __future__ import annotations

from typing import Any

import numpy as np

from cem.config import Config
from cem.contract import FaceEvidence
from cem.prompting import Exemplar, Prompt, render_prompt, template_id
from cem.reasoning.answer import MAX_CUES, MAX_TEXT, parse_answer
from cem.reasoning.base import FaceReasoning, Job, ReasonerStats


class ModelUnavailableError(RuntimeError):
    """The configured model cannot be loaded (offline, not cached, wrong path, missing package)."""


__all__ = ["Job", "LLMReasonerBase", "ModelUnavailableError", "ReasonerFailure", "exemplars_from", "options"]


class ReasonerFailure(RuntimeError):
    """A reasoner request that failed for a stated cause. ``str()`` is the face error the record carries:
    ``reasoner failed (<cause>): <detail>``, where cause is a short stable word (timeout, unreachable,
    http-<code>, invalid-answer, reply-too-large, prompt-error, model-error) that run summaries count by."""

    def __init__(self, cause: str, detail: str) -> None:
        self.cause, self.detail = cause, detail
        super().__init__(f"reasoner failed ({cause}): {detail}")


def options(config: Config) -> dict[str, Any]:
    """The backend's options as a plain dict, checked and normalised by :mod:`cem.config` (aliases
    resolved, defaults filled, unset values left out)."""
    return dict(config.reasoner.options or {})


def exemplars_from(config: Config) -> list[Exemplar]:
    from cem.io import load_image

    out = []
    for e in options(config).get("exemplars") or []:
        if not isinstance(e, dict) or "image" not in e or "label" not in e:
            raise ValueError("reasoner.options.exemplars: each item needs 'image' and 'label'")
        if str(e["label"]) not in config.labels:  # the model would learn to answer a label cem then rejects
            raise ValueError(f"reasoner.options.exemplars: label {str(e['label'])!r} of {e['image']} is not among "
                             f"the labels {list(config.labels)}")
        out.append(Exemplar(image=load_image(e["image"]), label=str(e["label"]), note=str(e.get("note", ""))))
    return out


class LLMReasonerBase:
    """Common flow: render one prompt per image (all its faces), ask the model, parse, retry once."""

    backend = "llm"
    model_id: str | None = None
    uses_context = True  # the context is rendered into the prompt

    def __init__(self, config: Config) -> None:
        self.config = config
        self.labels = list(config.labels)
        self.template = config.reasoner.template or "context"
        self._template_id = template_id(self.template)  # a missing template fails here, at start
        self.exemplars = exemplars_from(config)
        opts = options(config)
        self.batch_size = int(opts.get("batch_size", 4))
        # bounds of the constrained answer (cues per face, characters per cue; the rationale gets twice that)
        self.max_cues = int(opts.get("max_cues", MAX_CUES))
        self.max_text = int(opts.get("max_text_chars", MAX_TEXT))
        self.last_stats: ReasonerStats = {}
        # provenance of sampling; None when decoding is deterministic
        self.sampling: dict[str, Any] | None = None
        if opts.get("do_sample") or float(opts.get("temperature", 0) or 0) > 0:
            self.sampling = {k: opts[k] for k in ("do_sample", "temperature", "seed") if k in opts}

    @property
    def template_id(self) -> str:
        """``<name>@<digest>`` of the template as it is on disk now: prompts are rendered from the file as it
        is (a notebook may edit it between runs), so provenance must follow it (a cached stat, no re-read
        unless the file changed)."""
        try:
            self._template_id = template_id(self.template)
        except (OSError, ValueError):  # removed, unreadable or broken since: the prompts failed too; keep the last
            pass
        return self._template_id

    def use_template(self, name: str) -> None:
        """Switch the prompt template without reloading the model (prompt experiments)."""
        self._template_id = template_id(name)
        self.template = name

    def build_prompt(self, job: Job) -> Prompt:
        """The job's prompt; a template that fails for this image (``prompt-error``) fails this image only."""
        try:
            return render_prompt(self.template, job.faces, self.labels, job.context, job.image, self.exemplars)
        except (FileNotFoundError, ValueError, ReasonerFailure):
            raise  # a missing template or a context cem refuses: as before, the caller's error
        except Exception as e:
            raise ReasonerFailure("prompt-error", f"the prompt template {self.template!r} failed for this image: "
                                  f"{type(e).__name__}: {e}") from None

    def to_results(self, job: Job, answer_text: str | None, likelihood: dict[int, dict[str, float]] | None,
                   transport_error: str | None = None, strict: bool = False) -> tuple[list[FaceReasoning], str | None]:
        """Per-face results from an answer text (cues, rationale, verbalised distribution) and, when
        present, likelihood distributions (which then take precedence). ``transport_error`` (no answer) is
        the faces' error as given; ``strict`` rejects answers with out-of-range numbers, unknown labels or
        too many cues (for answers that no grammar constrained)."""
        n = len(job.faces)
        if answer_text is None:
            parsed: dict[int, dict[str, Any]] = {}
            err = transport_error
        else:
            parsed, err = parse_answer(answer_text, self.labels, n, max_cues=self.max_cues if strict else None)
        out = []
        for i, f in enumerate(job.faces):
            p = parsed.get(i)
            dist = (likelihood or {}).get(i) or (p["distribution"] if p else None)
            face_err = None
            if dist is None and answer_text is None:
                face_err = err or "reasoner failed (model-error): no answer"
            elif dist is None:
                face_err = f"reasoner failed (invalid-answer): face {i + 1}: {err or 'missing'}"
            out.append(FaceReasoning(index=f.index, distribution=dist, cues=p["cues"] if p else [],
                                     rationale=p["rationale"] if p else "", error=face_err))
        return out, err

    # subclasses implement: reason_batch(jobs) -> list[list[FaceReasoning]]
    def reason_batch(self, jobs: list[Job]) -> list[list[FaceReasoning]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reason(self, image: np.ndarray, faces: list[FaceEvidence], context: str | None) -> list[FaceReasoning]:
        if not faces:
            return []
        return self.reason_batch([Job(image, faces, context)])[0]
