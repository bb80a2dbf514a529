"""Deprecated alias of :mod:`cem.contract` (kept so that older imports keep working).

``RECORD_JSON_SCHEMA`` is the generated schema of an image record, ``cem.contract.json_schema("image")``.
"""

from __future__ import annotations

from cem.contract import (
    FERPLUS_LABELS,
    ActionUnit,
    Cue,
    CueSource,
    FaceEvidence,
    FaceResult,
    Grounding,
    ImageResult,
    Pose,
    Provenance,
    Quality,
    json_schema,
)

RECORD_JSON_SCHEMA = json_schema("image")

__all__ = ["FERPLUS_LABELS", "ActionUnit", "Cue", "CueSource", "FaceEvidence", "FaceResult", "Grounding",
           "ImageResult", "Pose", "Provenance", "Quality", "RECORD_JSON_SCHEMA"]
