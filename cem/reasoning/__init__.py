"""The reasoning stage: FER evidence (+ image and context) -> per-face distribution, cues, rationale."""

from cem.reasoning.base import FaceAnswer, FaceReasoning, Job, Reasoner, ReasonerStats, make_reasoner

__all__ = ["FaceAnswer", "FaceReasoning", "Job", "Reasoner", "ReasonerStats", "make_reasoner"]
