"""The reasoning stage: FER evidence (+ image and context) -> per-face distribution, cues, rationale."""

from cem.reasoning.base import FaceReasoning, Reasoner, make_reasoner

__all__ = ["FaceReasoning", "Reasoner", "make_reasoner"]
