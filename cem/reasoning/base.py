"""Reasoner interface and factory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cem.config import Config, ConfigError
from cem.schema import Cue, FaceEvidence


@dataclass
class FaceReasoning:
    """A reasoner's answer for one face. ``distribution`` is None when ``error`` says why there is none."""

    index: int
    distribution: dict[str, float] | None
    cues: list[Cue] = field(default_factory=list)
    rationale: str = ""
    error: str | None = None


class Reasoner(Protocol):
    """Turns FER evidence, the image and optional context into a :class:`FaceReasoning` per face."""

    backend: str
    model_id: str | None
    template_id: str | None

    def reason(self, image: np.ndarray, faces: list[FaceEvidence], context: str | None) -> list[FaceReasoning]:
        ...


def make_reasoner(config: Config) -> Reasoner:
    backend = config.reasoner.backend
    if backend == "rules":
        from cem.reasoning.rules import RulesReasoner

        return RulesReasoner(config.labels)
    if backend == "transformers":
        from cem.reasoning.transformers_backend import TransformersReasoner

        return TransformersReasoner(config)
    if backend == "openai":
        from cem.reasoning.openai_backend import OpenAIReasoner

        return OpenAIReasoner(config)
    raise ConfigError(f"unknown reasoner backend {backend!r}")
