"""The reasoner protocol, the request and answer types, and the factory (through the backend registry).

A reasoner declares everything the pipeline reads from it, so nothing is probed with ``getattr``:
``backend``, ``model_id``, ``template_id`` (provenance), ``batch_size`` (images per call),
``uses_context`` (whether the user's context reaches the model), ``sampling`` (None for deterministic
decoding, else the sampling settings for provenance), ``last_stats`` (timings and token counts of the last
``reason_batch`` call, totals over its images) and ``reason_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, runtime_checkable

import numpy as np

from cem.config import Config, backend
from cem.contract import Cue, FaceEvidence
from cem.prompting import Prompt


@dataclass
class FaceReasoning:
    """A reasoner's answer for one face. ``distribution`` is None when ``error`` says why there is none."""

    index: int
    distribution: dict[str, float] | None
    cues: list[Cue] = field(default_factory=list)
    rationale: str = ""
    error: str | None = None


FaceAnswer = FaceReasoning  # the name the protocol documents


@dataclass
class Job:
    """One image's reasoning request: the RGB image, its faces' evidence and the user's context."""

    image: np.ndarray
    faces: list[FaceEvidence]
    context: str | None
    prompt: Prompt | None = None

    @property
    def built_prompt(self) -> Prompt:
        """The prompt the backend built for this job (it builds it before any request)."""
        if self.prompt is None:
            raise RuntimeError("the job's prompt was not built before the request (a backend bug)")
        return self.prompt


class ReasonerStats(TypedDict, total=False):
    """What a reasoner measured during its last ``reason_batch`` call (totals over its images)."""

    model_ms: float  # time inside the model (the rest of the reasoning time is overhead)
    prompt_tokens: float
    generated_tokens: float


@runtime_checkable
class Reasoner(Protocol):
    """Turns FER evidence, the image and optional context into a :class:`FaceReasoning` per face."""

    backend: str
    model_id: str | None
    template_id: str | None
    batch_size: int
    uses_context: bool
    sampling: dict[str, Any] | None
    last_stats: ReasonerStats

    def reason_batch(self, jobs: list[Job]) -> list[list[FaceReasoning]]:
        """One list of per-face answers per job, in order (a face without an answer carries ``error``)."""
        ...


def make_reasoner(config: Config) -> Reasoner:
    """The configured backend's reasoner (its module is imported here, on first use). The config is
    checked again first: a Config edited in code after loading gets the same errors as a file."""
    config.validate()
    b = backend(config.reasoner.backend)
    reasoner: Reasoner = b.load_class()(config)
    return reasoner
