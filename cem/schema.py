"""Result types shared by every stage, and the JSON Schema of the output record.

A stage fills its part of :class:`FaceResult`; ``ImageResult.to_dict()`` gives exactly the JSON record of
the interface contract (DESIGN.md), one per input image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FERPLUS_LABELS: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
)

CueSource = Literal["face", "scene", "body", "text"]
Grounding = Literal["supported", "contradicted", "unverifiable"]
CueRole = Literal["for", "alternative", "against"]  # for the answer, for another label, or contradicting it


def _r(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


@dataclass
class Pose:
    """Head pose in degrees. yaw > 0: face turned towards the image's right (the subject's left);
    pitch > 0: face tilted up; roll > 0: head tilted clockwise in the image."""

    yaw: float
    pitch: float
    roll: float

    def to_dict(self) -> dict[str, float]:
        return {"yaw": _r(self.yaw, 2), "pitch": _r(self.pitch, 2), "roll": _r(self.roll, 2)}


@dataclass
class Quality:
    """Face quality flags: faces are flagged, never silently dropped."""

    face_px: int
    blur: float  # 0 = sharp, 1 = very blurred (see cem.fer.quality)
    extreme_pose: bool
    cut_by_frame: bool = False
    too_small: bool = False
    mesh_failed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "face_px": int(self.face_px), "blur": _r(self.blur, 3), "extreme_pose": bool(self.extreme_pose),
            "cut_by_frame": bool(self.cut_by_frame), "too_small": bool(self.too_small),
            "mesh_failed": bool(self.mesh_failed),
        }


@dataclass
class ActionUnit:
    """One action unit estimate: intensity on the FACS-like 0-5 scale and a presence flag."""

    intensity: float
    present: bool

    def to_dict(self) -> dict[str, Any]:
        return {"intensity": _r(self.intensity, 3), "present": bool(self.present)}


@dataclass
class Cue:
    """One cue of a rationale and the emotion it supports; ``grounding`` is set by the fuse stage."""

    cue: str
    source: CueSource
    supports: str
    weight: float
    au: str | None = None
    grounding: Grounding = "unverifiable"
    role: CueRole = "for"  # set by cem.fuse.explain against the final answer

    def to_dict(self) -> dict[str, Any]:
        return {"cue": self.cue, "source": self.source, "au": self.au, "supports": self.supports,
                "weight": _r(self.weight, 3), "grounding": self.grounding, "role": self.role}


@dataclass
class FaceEvidence:
    """What the FER stage measured for one face (input to the reasoning stage)."""

    index: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels of the upright image
    detection_score: float
    pose: Pose | None
    quality: Quality
    aus: dict[str, ActionUnit]
    expression: dict[str, float]
    landmarks: Any = None  # (478, 3) float array in image pixels, or None when the mesh failed
    position: str = "center"  # coarse horizontal position in the image: left, center or right
    timeline: str | None = None  # video: a summary of this track's AU/expression change since the last key frame


@dataclass
class FaceResult:
    """One face of the output record: FER evidence plus the reasoned, fused emotion."""

    evidence: FaceEvidence
    emotion: dict[str, float]
    cues: list[Cue] = field(default_factory=list)
    rationale: str = ""
    error: str | None = None

    @property
    def top_emotion(self) -> str:
        return max(self.emotion, key=self.emotion.__getitem__) if self.emotion else ""

    def to_dict(self) -> dict[str, Any]:
        ev = self.evidence
        d: dict[str, Any] = {
            "index": ev.index,
            "bbox": [_r(v, 1) for v in ev.bbox],
            "detection_score": _r(ev.detection_score, 4),
            "pose": ev.pose.to_dict() if ev.pose else None,
            "quality": ev.quality.to_dict(),
            "aus": {k: v.to_dict() for k, v in ev.aus.items()},
            "expression": {k: _r(v, 5) for k, v in ev.expression.items()},
            "emotion": {k: _r(v, 5) for k, v in self.emotion.items()},
            "top_emotion": self.top_emotion,
            "cues": [c.to_dict() for c in self.cues],
            "rationale": self.rationale,
        }
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass
class Provenance:
    cem_version: str
    config: str
    reasoner: str
    model: str | None
    template: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    sampling: dict[str, Any] | None = None  # only when a reasoner samples: {"do_sample": true, "seed": ...}
    context_used: bool = False  # a context was given and the reasoner reads context

    def to_dict(self) -> dict[str, Any]:
        d = {"cem_version": self.cem_version, "config": self.config, "reasoner": self.reasoner,
             "model": self.model, "template": self.template, "context_used": bool(self.context_used),
             "timings_ms": {k: _r(v, 2) for k, v in self.timings_ms.items()}}
        if self.sampling is not None:
            d["sampling"] = self.sampling
        return d


@dataclass
class ImageResult:
    """The result for one input image: exactly one JSONL record of ``cem annotate``."""

    image: str
    width: int | None
    height: int | None
    faces: list[FaceResult]
    provenance: Provenance
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. manifest columns carried through
    context: str | None = None  # the context given with the image, as given

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "image": self.image, "width": self.width, "height": self.height,
            "faces": [f.to_dict() for f in self.faces], "context": self.context, "error": self.error,
            "provenance": self.provenance.to_dict(),
        }
        d.update(self.extra)
        return d


_DIST = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}}

RECORD_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cem image record",
    "type": "object",
    "required": ["image", "width", "height", "faces", "error", "provenance"],
    "properties": {
        "image": {"type": "string"},
        "width": {"type": ["integer", "null"]},
        "height": {"type": ["integer", "null"]},
        "error": {"type": ["string", "null"]},
        "context": {"type": ["string", "null"]},
        "faces": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "bbox", "detection_score", "pose", "quality", "aus", "expression",
                         "emotion", "top_emotion", "cues", "rationale"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                "detection_score": {"type": "number"},
                "pose": {"type": ["object", "null"], "required": ["yaw", "pitch", "roll"]},
                "quality": {"type": "object", "required": ["face_px", "blur", "extreme_pose"]},
                "aus": {"type": "object", "patternProperties": {"^AU[0-9]{2}$": {
                    "type": "object", "required": ["intensity", "present"],
                    "properties": {"intensity": {"type": "number", "minimum": 0, "maximum": 5},
                                   "present": {"type": "boolean"}}}},
                        "additionalProperties": False},
                "expression": _DIST,
                "emotion": _DIST,
                "top_emotion": {"type": "string"},
                "cues": {"type": "array", "items": {
                    "type": "object", "required": ["cue", "source", "au", "supports", "weight", "grounding"],
                    "properties": {
                        "source": {"enum": ["face", "scene", "body", "text"]},
                        "au": {"type": ["string", "null"]},
                        "grounding": {"enum": ["supported", "contradicted", "unverifiable"]},
                        "role": {"enum": ["for", "alternative", "against"]}}}},
                "rationale": {"type": "string"},
                "error": {"type": ["string", "null"]},
            }}},
        "provenance": {"type": "object", "required": ["cem_version", "config", "reasoner", "model", "template",
                                                       "timings_ms"]},
    },
}
