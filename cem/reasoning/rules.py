"""The offline rules reasoner: EMFACS-style AU prototypes -> an emotion distribution with AU-citing cues.

Each emotion's prototype lists AUs with weights (after Ekman & Friesen's EMFACS tables, as summarised
by Matsumoto & Ekman 2008). The prototype match is the weighted mean intensity of its AUs over 5
(negative weights penalise AUs that argue against it, e.g. a full symmetric smile against contempt),
in [0, 1]. Neutral has a constant match of ``NEUTRAL_BASELINE``: a face whose best prototype matches
less than that leans neutral. The distribution is ``softmax(SHARPNESS * match)``. The fuse stage pools it
with the expression model's distribution; this reasoner deliberately does not look at that
distribution itself, so that nothing is counted twice.

Contempt is unilateral (R12A/R14A) in EMFACS; the mesh estimates are bilateral, so contempt rests on
AU14 without a full smile and is the weakest prototype here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cem.config import Config
from cem.contract import AU_DESCRIPTIONS, AU_NAMES, Cue, FaceEvidence
from cem.reasoning.base import FaceReasoning, Job, ReasonerStats

PROTOTYPES: dict[str, dict[str, float]] = {
    "happiness": {"AU06": 1.0, "AU12": 1.0},
    "surprise": {"AU01": 1.0, "AU02": 1.0, "AU05": 1.0, "AU26": 1.0},
    "sadness": {"AU01": 1.0, "AU04": 1.0, "AU15": 1.0},
    "anger": {"AU04": 1.0, "AU05": 0.5, "AU07": 1.0, "AU23": 1.0},
    "disgust": {"AU09": 1.0, "AU10": 1.0, "AU15": 0.5},
    "fear": {"AU01": 1.0, "AU02": 1.0, "AU04": 1.0, "AU05": 1.0, "AU20": 1.0, "AU26": 0.5},
    "contempt": {"AU14": 1.0, "AU12": -0.5},
}
NEUTRAL_BASELINE = 0.3
SHARPNESS = 6.0

def prototype_matches(intensities: dict[str, float], labels: list[str]) -> dict[str, float]:
    """Match in [0, 1] of each configured label's prototype (neutral: the constant baseline)."""
    out = {}
    for lab in labels:
        proto = PROTOTYPES.get(lab)
        if proto is None:
            out[lab] = NEUTRAL_BASELINE if lab == "neutral" else 0.0
            continue
        pos = sum(w for w in proto.values() if w > 0)
        score = sum(w * intensities.get(au, 0.0) / 5.0 for au, w in proto.items()) / pos
        out[lab] = float(np.clip(score, 0.0, 1.0))
    return out


class RulesReasoner:
    """Deterministic, offline; needs only the FER stage's AUs. It cannot read context (``uses_context``
    is False, and the pipeline says so). Its cues cite, for every label whose prototype has present AUs,
    those AUs; the rationale is written from the fused distribution by :func:`cem.fuse.explain`."""

    backend = "rules"
    model_id: str | None = None
    template_id: str | None = None
    batch_size = 32  # images per call; reasoning is per face and instant, this only sets the chunking
    uses_context = False
    sampling: dict[str, Any] | None = None

    def __init__(self, config: Config | Sequence[str]) -> None:
        self.labels = list(config.labels if isinstance(config, Config) else config)
        self.last_stats: ReasonerStats = {}

    def reason_face(self, face: FaceEvidence) -> FaceReasoning:
        if not face.aus:  # no mesh: the prototypes carry no evidence
            uniform = 1.0 / len(self.labels)
            return FaceReasoning(index=face.index, distribution={lab: uniform for lab in self.labels})
        intensities = {k: v.intensity for k, v in face.aus.items()}
        match = prototype_matches(intensities, self.labels)
        z = SHARPNESS * np.array([match[lab] for lab in self.labels])
        p = np.exp(z - z.max())
        p /= p.sum()
        dist = dict(zip(self.labels, p.tolist()))
        cues: list[Cue] = []
        for lab in sorted(self.labels, key=lambda k: -dist[k]):
            for au, w in PROTOTYPES.get(lab, {}).items():
                a = face.aus.get(au)
                if w > 0 and a is not None and a.present:
                    cues.append(Cue(cue=f"{AU_DESCRIPTIONS[au]} ({au} {AU_NAMES[au]}, intensity {a.intensity:.1f})",
                                    source="face", au=au, supports=lab,
                                    weight=round(w * a.intensity / 5.0, 3), grounding="supported"))
        return FaceReasoning(index=face.index, distribution=dist, cues=cues)

    def reason_batch(self, jobs: list[Job]) -> list[list[FaceReasoning]]:
        self.last_stats = {}
        return [[self.reason_face(f) for f in job.faces] for job in jobs]

    def reason(self, image: np.ndarray, faces: list[FaceEvidence], context: str | None) -> list[FaceReasoning]:
        return self.reason_batch([Job(image, faces, context)])[0]
