"""The contract: every record cem writes, its JSON Schemas, its flat projections and the label/AU registries.

Two kinds of types live here, both validated by pydantic (v2):

* **stage types**, which the stages build and pass along: :class:`Pose`, :class:`Quality`,
  :class:`ActionUnit`, :class:`Cue`, :class:`Provenance`, :class:`FaceEvidence`, :class:`FaceResult`,
  :class:`ImageResult`. They are pydantic *dataclasses*, so the positional constructors the stages use
  keep working (``Cue("smile", "face", "happiness", 0.6)``), and every number is checked on construction
  (finite, in range).
* **record types**, the JSON objects written to files: :class:`FaceRecord`, :class:`ImageRecord`,
  :class:`MomentRecord` (video key moment), :class:`VideoRecord` (a finished video's summary),
  :class:`ErrorRecord` and the video :data:`FrameRow`. A record has no field that is not declared here:
  manifest columns go under ``meta``.
  :func:`json_schema` generates their JSON Schemas; :func:`validate_record` checks a record dict against
  them. ``ImageResult.to_dict()`` builds the record and validates it, so a NaN or an out-of-range number
  is an error naming the image and the field, never ``NaN`` in a file.

The rounding of each number written (pixels to 0.1, degrees to 0.01, probabilities to 1e-5, ...) is part
of its type below, declared once. The flat rows (:func:`face_rows`, :func:`cue_rows`, :func:`frame_row`)
take their column names from these types, so a field added to a record type reaches every table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    create_model,
    model_serializer,
    model_validator,
)
from pydantic.dataclasses import dataclass

__all__ = [
    "FERPLUS_LABELS", "AU_NAMES", "AU_DESCRIPTIONS", "AU_KEY_PATTERN", "CueSource", "Grounding", "CueRole",
    "Pose", "Quality", "ActionUnit", "Cue", "Provenance", "FaceEvidence", "FaceResult", "ImageResult",
    "FaceRecord", "ImageRecord", "MomentRecord", "ErrorRecord", "VideoRecord", "VideoSummary", "FrameRow",
    "RecordError", "RECORD_KINDS", "Meta",
    "RECORD_FIELDS", "BBOX_COLUMNS", "DECIMALS", "rounded", "json_schema", "validate_record", "record_kind",
    "error_record", "video_summary_record",
    "moment_record", "face_rows", "cue_rows", "frame_row", "frame_columns", "column_groups", "order_columns",
    "FRAME_INPUT_COLUMNS", "face_table_columns",
    "CUE_COLUMNS", "IMAGE_COLUMNS", "POSE_COLUMNS", "QUALITY_COLUMNS", "DISTRIBUTION_TOLERANCE", "MAX_CONTEXT_CHARS",
]

# ---------------------------------------------------------------------------------------------- registries

FERPLUS_LABELS: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
)
"""The eight FER+ emotion labels, in the order the expression model and the default config use."""

AU_NAMES: dict[str, str] = {
    "AU01": "inner brow raiser", "AU02": "outer brow raiser", "AU04": "brow lowerer",
    "AU05": "upper lid raiser", "AU06": "cheek raiser", "AU07": "lid tightener", "AU09": "nose wrinkler",
    "AU10": "upper lip raiser", "AU12": "lip corner puller", "AU14": "dimpler",
    "AU15": "lip corner depressor", "AU17": "chin raiser", "AU20": "lip stretcher", "AU23": "lip tightener",
    "AU24": "lip pressor", "AU25": "lips part", "AU26": "jaw drop", "AU43": "eyes closed",
}
"""The action units cem estimates, by FACS code, with their FACS names (Ekman, Friesen & Hager 2002).
Its order is the column order of every table."""

AU_DESCRIPTIONS: dict[str, str] = {
    "AU01": "inner brows raised", "AU02": "outer brows raised", "AU04": "brows lowered and drawn together",
    "AU05": "upper eyelids raised", "AU06": "cheeks raised", "AU07": "eyelids tightened",
    "AU09": "nose wrinkled", "AU10": "upper lip raised", "AU12": "lip corners pulled up",
    "AU14": "mouth corners tightened (dimpler)", "AU15": "lip corners pulled down", "AU17": "chin raised",
    "AU20": "lips stretched sideways", "AU23": "lips tightened", "AU24": "lips pressed together",
    "AU25": "lips parted", "AU26": "jaw dropped", "AU43": "eyes closed",
}
"""What each action unit looks like on the face, in plain words (used in cue texts and prompts)."""

AU_KEY_PATTERN = r"^AU[0-9]{2}$"
DISTRIBUTION_TOLERANCE = 1e-3  # a written distribution sums to 1 within this (rounding to 1e-5 per label)
# The longest context an image may have, in characters: what a prompt carries in full (about 1,000 tokens,
# beside LLaVA-1.5's 576 image tokens in a 4,096-token window). Longer ones are refused where they come in
# (a manifest row's error, a ValueError in Python), never cut short in the prompt unseen.
MAX_CONTEXT_CHARS = 4000

CueSource = Literal["face", "scene", "body", "text"]
Grounding = Literal["supported", "contradicted", "unverifiable"]
CueRole = Literal["for", "alternative", "against"]

# ---------------------------------------------------------------------------------------------- number types
# Every float is finite (``allow_inf_nan=False`` in the shared config); the serializer is the rounding written.


DECIMALS: dict[str, int] = {
    "px": 1, "score": 4, "degrees": 2, "probability": 5, "intensity": 3, "weight": 3, "blur": 3, "ms": 2,
    "seconds": 4, "landmark": 2,
}
"""Decimals written for each kind of number (records and tables alike)."""


def rounded(kind: str, v: float) -> float:
    """``v`` rounded as cem writes a number of ``kind`` (see :data:`DECIMALS`)."""
    return float(round(float(v), DECIMALS[kind]))


def _round_to(kind: str, base: Any) -> PlainSerializer:
    nd = DECIMALS[kind]
    return PlainSerializer(lambda v: float(round(float(v), nd)), return_type=base, when_used="always")


_Prob = Annotated[float, Field(ge=0.0, le=1.0)]
_Px = Annotated[float, _round_to("px", float)]
Score = Annotated[_Prob, _round_to("score", _Prob)]
Degrees = Annotated[float, _round_to("degrees", float)]
Probability = Annotated[_Prob, _round_to("probability", _Prob)]
_Intensity = Annotated[float, Field(ge=0.0, le=5.0)]
Intensity = Annotated[_Intensity, _round_to("intensity", _Intensity)]
Weight = Annotated[_Prob, _round_to("weight", _Prob)]
Blur = Annotated[_Prob, _round_to("blur", _Prob)]
Milliseconds = Annotated[float, _round_to("ms", float)]
_Sec = Annotated[float, Field(ge=0.0)]
Seconds = Annotated[_Sec, _round_to("seconds", _Sec)]
_Landmark = Annotated[float, _round_to("landmark", float)]
AUCode = Annotated[str, Field(pattern=AU_KEY_PATTERN)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]


def _is_distribution(d: dict[str, float]) -> dict[str, float]:
    if d:
        total = math.fsum(d.values())
        if abs(total - 1.0) > DISTRIBUTION_TOLERANCE:
            raise ValueError(f"a distribution must sum to 1 (within {DISTRIBUTION_TOLERANCE}), this one sums "
                             f"to {total:.6g}")
    return d


Distribution = Annotated[dict[str, Probability], AfterValidator(_is_distribution)]
"""Label -> probability; empty (nothing measured) or summing to 1."""

BBOX_COLUMNS: tuple[str, str, str, str] = ("x", "y", "w", "h")
BBox = Annotated[tuple[_Px, _Px, Annotated[_Px, Field(ge=0)], Annotated[_Px, Field(ge=0)]],
                 Field(description="x, y, w, h in pixels of the upright (EXIF-corrected) image")]
Point3 = tuple[_Landmark, _Landmark, _Landmark]  # landmarks: pixels (x, y) and depth (z, same scale)

_CONFIG = ConfigDict(
    allow_inf_nan=False,  # NaN/inf anywhere is a validation error
    arbitrary_types_allowed=True,  # numpy landmark arrays on FaceEvidence
    json_schema_serialization_defaults_required=True,  # a field with a default is still always written
)
# the small parts are checked again (and copied) wherever they are used: one changed after its construction
# cannot slip into a record
_PART_CONFIG = ConfigDict(**_CONFIG, revalidate_instances="always")


def _omit_none(v: Any) -> bool:
    return v is None


Meta = dict[str, str | int | float | bool]
"""A record's ``meta``: a manifest's other columns (name -> value as given)."""


# ---------------------------------------------------------------------------------------------- stage types


@dataclass(config=_PART_CONFIG)
class Pose:
    """Head pose in degrees. yaw > 0: face turned towards the image's right (the subject's left);
    pitch > 0: face tilted up; roll > 0: head tilted clockwise in the image."""

    yaw: Degrees
    pitch: Degrees
    roll: Degrees

    def to_dict(self) -> dict[str, float]:
        return _dump(Pose, self)


@dataclass(config=_PART_CONFIG)
class Quality:
    """Face quality flags: faces are flagged, never silently dropped."""

    face_px: NonNegInt
    blur: Blur  # 0 = sharp, 1 = very blurred (see cem.fer.quality)
    extreme_pose: bool
    cut_by_frame: bool = False
    too_small: bool = False
    mesh_failed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _dump(Quality, self)


@dataclass(config=_PART_CONFIG)
class ActionUnit:
    """One action unit estimate: intensity on the FACS-like 0-5 scale and a presence flag."""

    intensity: Intensity
    present: bool

    def to_dict(self) -> dict[str, Any]:
        return _dump(ActionUnit, self)


_CUE_ORDER = ("cue", "source", "au", "supports", "weight", "grounding", "role")


@dataclass(config=_PART_CONFIG)
class Cue:
    """One cue of a rationale and the emotion it supports. ``grounding`` is set by the fuse stage;
    ``role`` says whether the cue argues for a label the rationale names ("for": the face's final
    ``top_emotion`` and, when the emotion is a blend, the runner-up with at least a third of the top's mass),
    for another label ("alternative"), or is contradicted by the measurements ("against")."""

    cue: str
    source: CueSource
    supports: str
    weight: Weight
    au: AUCode | None = None
    grounding: Grounding = "unverifiable"
    role: CueRole = "for"

    @model_serializer(mode="wrap")
    def _ordered(self, handler):  # unannotated on purpose: an annotated return type would replace the schema
        d = handler(self)
        return {k: d[k] for k in _CUE_ORDER if k in d}

    def to_dict(self) -> dict[str, Any]:
        return _dump(Cue, self)


@dataclass(config=_PART_CONFIG)
class Provenance:
    """Where a record came from: versions, config, reasoner, model, prompt template, timings (ms)."""

    cem_version: str
    config: str
    reasoner: str
    model: str | None
    template: str | None
    timings_ms: dict[str, Milliseconds] = Field(default_factory=dict)
    # only when a reasoner samples: {"do_sample": true, "seed": ...}
    sampling: dict[str, Any] | None = Field(default=None, exclude_if=_omit_none)
    context_used: bool = False  # whether the reasoner was given (and can use) a text context
    # the Ray engine: the id of the Ray node that ran the FER stage for this image
    node: str | None = Field(default=None, exclude_if=_omit_none)
    # AUs (and, from neutral photos, expressions) measured against a subject's baseline: "<subject>: neutral
    # (n photos)" or "<subject>: median of n photos" (n = photos with a usable face, "k of n" when some had
    # none), or "<subject>: none (why); measured against the average face"
    baseline: str | None = Field(default=None, exclude_if=_omit_none)
    # faces detected beyond faces.max_faces and not measured (the largest faces are); absent when none
    faces_skipped: PosInt | None = Field(default=None, exclude_if=_omit_none)
    # how faces were found: "detect" or "whole" (the image is one face); absent in error records
    faces: Literal["detect", "whole"] | None = Field(default=None, exclude_if=_omit_none)
    # a digest of every setting in force (the config file with its overrides: Config.digest), so records made
    # with other settings under the same config name can be told apart
    settings: str | None = Field(default=None, exclude_if=_omit_none)
    # the expression CNN's weights: "packaged@<hex>" or "<folder>@<hex>", the first 12 hex digits of the SHA-256
    # of its config.json and model.safetensors (weights retrained in place keep the settings digest, not this)
    expression_model: str | None = Field(default=None, exclude_if=_omit_none)

    def to_dict(self) -> dict[str, Any]:
        return _dump(Provenance, self)


@dataclass(config=_CONFIG)
class FaceMeasures:
    """What is measured of one face and written in its record (shared by evidence and record)."""

    index: NonNegInt
    bbox: BBox
    detection_score: Score
    pose: Pose | None
    quality: Quality
    aus: dict[AUCode, ActionUnit]
    expression: Distribution


@dataclass(config=_CONFIG)
class FaceEvidence(FaceMeasures):
    """What the FER stage measured for one face (input to the reasoning stage)."""

    landmarks: Any = None  # (478, 3) float array in image pixels, or None when the mesh failed
    position: str = "center"  # coarse horizontal position in the image: left, center or right
    timeline: str | None = None  # video: a summary of this track's AU/expression change since the last key frame


@dataclass(config=_CONFIG)
class FaceRecord(FaceMeasures):
    """One face as written: the measurements, then the fused emotion, its cues and rationale."""

    emotion: Distribution
    top_emotion: str
    cues: list[Cue]
    rationale: str
    error: str | None = Field(default=None, exclude_if=_omit_none)  # e.g. "reasoner failed (timeout): ..."
    landmarks: list[Point3] | None = Field(default=None, exclude_if=_omit_none)  # only when requested
    track_id: NonNegInt | None = Field(default=None, exclude_if=_omit_none)  # video key moments

    @model_validator(mode="after")
    def _top_is_argmax(self) -> FaceRecord:
        if self.emotion:
            if self.top_emotion not in self.emotion:
                raise ValueError(f"top_emotion {self.top_emotion!r} is not a label of emotion")
            if self.emotion[self.top_emotion] < max(self.emotion.values()) - 1e-5:
                raise ValueError(f"top_emotion {self.top_emotion!r} is not the most probable label")
        elif self.top_emotion:
            raise ValueError("top_emotion is set but emotion is empty")
        return self


@dataclass(config=_CONFIG)
class FaceResult:
    """One face of the output record: FER evidence plus the reasoned, fused emotion."""

    evidence: FaceEvidence
    emotion: Distribution
    cues: list[Cue] = Field(default_factory=list)
    rationale: str = ""
    error: str | None = None

    @property
    def top_emotion(self) -> str:
        return max(self.emotion, key=self.emotion.__getitem__) if self.emotion else ""

    def to_record(self, landmarks: bool = False, track_id: int | None = None) -> FaceRecord:
        """This face as written; ``landmarks`` adds the mesh (when it was measured)."""
        ev = self.evidence
        face = {k: getattr(ev, k) for k in FaceMeasures.__dataclass_fields__}
        if landmarks and ev.landmarks is not None:
            face["landmarks"] = [[float(v) for v in p[:3]] for p in ev.landmarks]
        face.update(emotion=self.emotion, top_emotion=self.top_emotion, cues=self.cues,
                    rationale=self.rationale, error=self.error, track_id=track_id)
        record: FaceRecord = _adapter(FaceRecord).validate_python(face)
        return record

    def to_dict(self, landmarks: bool = False) -> dict[str, Any]:
        return _dump(FaceRecord, self.to_record(landmarks))


class RecordError(ValueError):
    """A record that does not satisfy the contract; the message names the record and each bad field."""


@dataclass(config=_CONFIG)
class ImageResult:
    """The result for one input image: exactly one JSONL record of ``cem annotate``."""

    image: str
    width: PosInt | None
    height: PosInt | None
    faces: list[FaceResult]
    provenance: Provenance
    error: str | None = None
    context: str | None = None  # the context given for this image
    meta: Meta | None = None  # the manifest's other columns for this image (written under "meta")

    def to_record(self, landmarks: bool = False) -> ImageRecord:
        """The record, validated (raises :class:`RecordError` naming the image and the bad fields);
        ``landmarks`` adds each face's mesh."""
        faces = [_face_record(f, landmarks, self.image) for f in self.faces]
        try:
            return ImageRecord(image=self.image, width=self.width, height=self.height, faces=faces,
                               context=self.context, meta=self.meta or None, error=self.error,
                               provenance=self.provenance)
        except ValidationError as e:
            raise RecordError(_explain(e, self.image)) from None

    def to_dict(self, landmarks: bool = False) -> dict[str, Any]:
        """Exactly the JSON record (validated, see :meth:`to_record`)."""
        out: dict[str, Any] = self.to_record(landmarks).model_dump(mode="json")
        return out


def _face_record(face: FaceResult, landmarks: bool, image: str) -> FaceRecord:
    try:
        return face.to_record(landmarks)
    except ValidationError as e:
        raise RecordError(_explain(e, f"{image}: face {face.evidence.index}")) from None


# ---------------------------------------------------------------------------------------------- record types



class ImageRecord(BaseModel):
    """One JSONL record of ``cem annotate`` for an image. Columns of a CSV manifest other than ``image``
    and ``context`` are carried under ``meta``; no other field may be added."""

    model_config = ConfigDict(**_CONFIG, extra="forbid", title="cem image record")

    image: str = Field(description="the input as given, without . parts and doubled separators (a path, or "
                                   "<array WxH> for arrays); a name that is not UTF-8 shows each undecodable "
                                   "byte as \\xNN")
    image_bytes: str | None = Field(default=None, exclude_if=_omit_none, pattern=r"^[A-Za-z0-9+/]*={0,2}$",
                                    description="only for a name that is not UTF-8: its exact bytes, base64")
    width: PosInt | None
    height: PosInt | None
    faces: list[FaceRecord]
    context: str | None = None
    meta: Meta | None = Field(default=None, exclude_if=_omit_none,
                              description="the manifest's other columns for this input, as given")
    error: str | None = Field(description="why the image could not be analysed, or null")
    provenance: Provenance

    @model_validator(mode="after")
    def _unique_faces(self) -> ImageRecord:
        idx = [f.index for f in self.faces]
        if len(set(idx)) != len(idx):
            raise ValueError(f"face indexes repeat: {idx}")
        return self


class MomentRecord(ImageRecord):
    """One JSONL record of a video key moment: one tracked face, reasoned in context on that frame."""

    model_config = ConfigDict(title="cem video key-moment record")

    video: str
    frame: NonNegInt
    time: Seconds
    track_id: NonNegInt
    t_start: Seconds = Field(description="time of this track's previous key moment (or of this one)")
    t_end: Seconds
    key_reason: str = Field(min_length=1, description="first appearance | expression change (JS x bits) | interval")
    frame_sampling: str | None = Field(default=None, exclude_if=_omit_none,
                                       description="the frames the run processed: every frame | every N frames | "
                                                   "R fps (absent in records of earlier cem versions)")
    faces: list[FaceRecord] = Field(min_length=1, max_length=1)

    @model_validator(mode="after")
    def _one_track(self) -> MomentRecord:
        if self.faces[0].track_id != self.track_id:
            raise ValueError(f"the face's track_id {self.faces[0].track_id} is not the record's {self.track_id}")
        if not self.t_start <= self.t_end:
            raise ValueError(f"t_start {self.t_start} is after t_end {self.t_end}")
        return self


class ErrorRecord(ImageRecord):
    """The record of an input that could not be analysed at all (unreadable image or video)."""

    model_config = ConfigDict(title="cem error record")

    error: str = Field(min_length=1)
    faces: list[FaceRecord] = Field(max_length=0)
    video: str | None = Field(default=None, exclude_if=_omit_none, description="set when the input is a video")


class VideoSummary(BaseModel):
    """What a finished video gave: frames processed, key moments found, and whether the whole file was read."""

    model_config = ConfigDict(**_CONFIG, extra="forbid", title="cem video summary")

    frames: NonNegInt = Field(description="frames processed (the sampled ones)")
    moments: NonNegInt
    complete: bool = Field(description="false when decoding stopped before the frames the file declares (a cut "
                                       "or damaged file): only the frames before were processed")
    frames_decoded: NonNegInt | None = Field(default=None, exclude_if=_omit_none,
                                             description="frames decoded, sampled or not")
    frames_declared: NonNegInt | None = Field(default=None, exclude_if=_omit_none,
                                              description="frames the file's header declares")
    frame_sampling: str | None = Field(default=None, exclude_if=_omit_none,
                                       description="the frames processed: every frame | every N frames | R fps")


class VideoRecord(ImageRecord):
    """The record written when a video is finished (after its key moments): marks it done for ``--resume``."""

    model_config = ConfigDict(title="cem video summary record")

    video: str
    video_summary: VideoSummary
    faces: list[FaceRecord] = Field(max_length=0)


_FRAME_HEAD: dict[str, Any] = {
    "video": (str, ...), "context": (str | None, ...),
    "time": (Seconds, ...), "frame": (NonNegInt, ...), "track_id": (NonNegInt, ...),
    **{c: (float, ...) for c in BBOX_COLUMNS},
    **{c: (float | None, ...) for c in Pose.__dataclass_fields__},
    "key_moment": (bool, ...),
}
FrameRow: type[BaseModel] = create_model(  # one row of the video frame table (--frames)
    "FrameRow",
    __config__=ConfigDict(
        **_CONFIG, extra="allow", title="cem video frame row",
        json_schema_extra={"description": "After `context`, a manifest's other columns of the video's row "
                                          "(meta.<column>; a run's videos share them, empty where a row lacks "
                                          "one); then one column per AU (intensity), per AU relative to the "
                                          "track's neutral baseline (AUxx_rel) and per label "
                                          "(expression_<label>).",
                           "patternProperties": {r"^AU[0-9]{2}(_rel)?$|^expression_.+$":
                                                 {"type": ["number", "null"]},
                                                 r"^meta\..+$": {"type": ["string", "null"]}},
                           "additionalProperties": False}),
    **_FRAME_HEAD,
)

RECORD_KINDS: dict[str, type[BaseModel]] = {
    "image": ImageRecord, "moment": MomentRecord, "video": VideoRecord, "error": ErrorRecord, "frame": FrameRow,
}
RECORD_FIELDS: frozenset[str] = frozenset(
    k for kind in ("image", "moment", "video", "error") for k in RECORD_KINDS[kind].model_fields)
"""Top-level names the JSONL records use."""

_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(t: type) -> TypeAdapter[Any]:
    if t not in _ADAPTERS:
        _ADAPTERS[t] = TypeAdapter(t)
    return _ADAPTERS[t]


def _dump(t: type, obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = _adapter(t).dump_python(obj, mode="json")
    return out


def _explain(e: ValidationError, what: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(record)"
        value = err.get("input")
        got = "" if isinstance(value, (dict, list)) else f" (got {repr(value)[:60]})"
        parts.append(f"{loc}: {err['msg']}{got}")
    return f"{what}: not a valid record: " + "; ".join(parts)


def _validated(model: type[BaseModel], record: Mapping[str, Any], what: str) -> BaseModel:
    try:
        return model.model_validate(record)
    except ValidationError as e:
        raise RecordError(_explain(e, what)) from None


def record_kind(record: Mapping[str, Any]) -> str:
    """The kind of a JSONL record: ``moment`` (a video key moment), ``video`` (a finished video's summary),
    ``error`` (an input that could not be analysed) or ``image``."""
    if "video" in record and "track_id" in record:
        return "moment"
    if "video_summary" in record:
        return "video"
    if record.get("error") and not record.get("faces"):
        return "error"
    return "image"


def validate_record(record: Mapping[str, Any], kind: str | None = None, unknown_fields: bool = False) -> BaseModel:
    """Check ``record`` (a dict as read from or written to a file) against the contract and return it as
    its record type. ``kind``: image | moment | video | error | frame (default: :func:`record_kind`).
    ``unknown_fields``: top-level fields the contract does not name are left out rather than refused, as
    readers of records do ("new fields may be added": a newer cem's, or a note added by hand); writers refuse
    them, so that a misnamed field is never written.

    Raises :class:`RecordError` naming the record's image and every field that is wrong.
    """
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a JSON object, not {type(record).__name__}")
    kind = kind or record_kind(record)
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; one of {', '.join(RECORD_KINDS)}")
    what = str(record.get("video") or record.get("image") or "record")
    model = RECORD_KINDS[kind]
    if unknown_fields:
        record = {k: v for k, v in record.items() if k in model.model_fields}
    return _validated(model, record, what)


def json_schema(kind: str = "image") -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one record of ``kind``: image | moment | video | error | frame."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; one of {', '.join(RECORD_KINDS)}")
    schema = RECORD_KINDS[kind].model_json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _record(model: type[BaseModel], fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    kept = {k: v for k, v in fields.items() if v is not None or k in ("width", "height", "context", "error")}
    out: dict[str, Any] = _validated(model, kept, what).model_dump(mode="json")
    return out


def error_record(image: str, error: str, provenance: Provenance | Mapping[str, Any], context: str | None = None,
                 meta: Mapping[str, Any] | None = None, *, video: str | None = None, width: int | None = None,
                 height: int | None = None, image_bytes: str | None = None) -> dict[str, Any]:
    """The record of an input that could not be analysed (validated): an unreadable image or video, or a
    result that could not be written as it was (``error`` says why). The one way error records are made."""
    return _record(ErrorRecord, {"image": image, "image_bytes": image_bytes, "width": width, "height": height,
                                 "faces": [], "context": context, "meta": dict(meta) if meta else None,
                                 "error": error, "provenance": provenance, "video": video}, image)


def video_summary_record(video: str, *, frames: int, moments: int, provenance: Provenance | Mapping[str, Any],
                         width: int | None = None, height: int | None = None, context: str | None = None,
                         meta: Mapping[str, Any] | None = None, complete: bool = True,
                         frames_decoded: int | None = None, frames_declared: int | None = None,
                         frame_sampling: str | None = None) -> dict[str, Any]:
    """The record written when a video is finished (validated): ``video_summary: {frames, moments, complete,
    frames_decoded, frames_declared, frame_sampling}`` (``complete`` false: the file ended before the frames it
    declares); ``--resume`` skips videos that have one (reading a cut file again gives the same frames)."""
    summary = {"frames": frames, "moments": moments, "complete": complete, "frames_decoded": frames_decoded,
               "frames_declared": frames_declared, "frame_sampling": frame_sampling}
    return _record(VideoRecord, {"image": video, "video": video, "width": width, "height": height, "faces": [],
                                 "context": context, "meta": dict(meta) if meta else None, "error": None,
                                 "video_summary": summary, "provenance": provenance}, video)


def moment_record(result: ImageResult, face: FaceResult, *, video: str, frame: int, time: float, track_id: int,
                  t_start: float, key_reason: str, landmarks: bool = False,
                  meta: Mapping[str, Any] | None = None, frame_sampling: str | None = None) -> dict[str, Any]:
    """The record of one video key moment: ``face`` (of ``result``, reasoned on frame ``frame``) with its
    track, written as an image record of that frame plus the video fields (validated)."""
    try:
        record = face.to_record(landmarks, track_id=track_id)
    except ValidationError as e:
        raise RecordError(_explain(e, f"{video}: frame {frame}, track {track_id}")) from None
    d = {"image": video, "video": video, "frame": frame, "time": time, "track_id": track_id,
         "t_start": t_start, "t_end": time, "key_reason": key_reason, "frame_sampling": frame_sampling,
         "width": result.width,
         "height": result.height, "faces": [record], "context": result.context, "error": None,
         "provenance": result.provenance}
    if meta or result.meta:
        d["meta"] = dict(meta or result.meta or {})
    out: dict[str, Any] = _validated(MomentRecord, d, video).model_dump(mode="json")
    return out


# ---------------------------------------------------------------------------------------------- flat projections
# Column names come from the types: bbox -> BBOX_COLUMNS, pose -> Pose's fields, quality -> Quality's fields,
# aus -> the code (intensity) and code_present, distributions -> <field>_<label>, provenance ->
# provenance_<field>[_<key>]. Face fields that would be ambiguous next to image fields get a "face_" prefix.

POSE_COLUMNS: tuple[str, ...] = tuple(Pose.__dataclass_fields__)
QUALITY_COLUMNS: tuple[str, ...] = tuple(Quality.__dataclass_fields__)
_FACE_PREFIXED = ("index", "error")  # -> face_index, face_error
_MOMENT_FIELDS = tuple(k for k in MomentRecord.model_fields if k not in ImageRecord.model_fields and k != "faces")
_NESTED = ("image", "faces", "provenance", "meta")  # image first; the others are flattened or face rows
IMAGE_COLUMNS: tuple[str, ...] = (
    "image", *_MOMENT_FIELDS, *(k for k in ImageRecord.model_fields if k not in _NESTED))
_WHEN_PRESENT = frozenset({*_MOMENT_FIELDS, "image_bytes"})  # columns only for records that have them
_ALWAYS_PROVENANCE = ("provenance_baseline", "provenance_faces_skipped")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}_{k}", v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = ",".join(str(v) for v in value)
    else:
        out[prefix] = value


def _face_columns(face: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in FaceRecord.__dataclass_fields__:
        value = face.get(name)
        if name in _FACE_PREFIXED:
            row[f"face_{name}"] = value
        elif name == "bbox":
            row.update(zip(BBOX_COLUMNS, value or (None,) * 4))
        elif name in ("pose", "quality"):
            cols = POSE_COLUMNS if name == "pose" else QUALITY_COLUMNS
            row.update({c: (value or {}).get(c) for c in cols})
        elif name == "aus":
            for code, au in (value or {}).items():
                row[code] = au.get("intensity")
                row[f"{code}_present"] = au.get("present")
        elif name in ("expression", "emotion"):
            row.update({f"{name}_{k}": v for k, v in (value or {}).items()})
        elif name in ("cues", "landmarks", "track_id"):
            continue  # cues: cue_rows(); landmarks: too wide for a table; track_id: a moment's own field
        else:
            row[name] = value
    return row


def _image_columns(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: record.get(k) for k in IMAGE_COLUMNS if k in record or k not in _WHEN_PRESENT}
    for k, v in (record.get("meta") or {}).items():
        row[f"meta.{k}"] = v  # manifest columns
    if "video_summary" in record:
        _flatten("video_summary", record["video_summary"], row)
    _flatten("provenance", record.get("provenance") or {}, row)
    for k in _ALWAYS_PROVENANCE:  # optional in a record, but a column of every table, so columns stay fixed
        row.setdefault(k, None)
    return row


def face_table_columns(labels: Sequence[str] = FERPLUS_LABELS) -> list[str]:
    """The face columns every face table has, faces or not (bbox, pose, quality, each AU and its presence,
    ``expression_<label>``, ``emotion_<label>``, ``top_emotion``, ...): a table of images without a face
    found has them empty, so tables of several runs line up and code that reads ``top_emotion`` works."""
    return [*_face_columns({}), *AU_NAMES, *(f"{code}_present" for code in AU_NAMES),
            *(f"expression_{k}" for k in labels), *(f"emotion_{k}" for k in labels)]


def face_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per face of a record (image fields repeated); a record without faces (an error, or no
    face found) gives one row whose face columns are missing, so no input is invisible in a table."""
    base = _image_columns(record)
    faces = record.get("faces") or []
    if not faces:
        return [base]
    return [{**base, **_face_columns(f)} for f in faces]


def cue_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One tidy row per cue: image, face_index, then the cue's fields."""
    rows = []
    for f in record.get("faces") or []:
        for c in f.get("cues") or []:
            rows.append({"image": record.get("image"), "face_index": f.get("index"),
                         **{k: c.get(k) for k in Cue.__dataclass_fields__}})
    return rows


CUE_COLUMNS: tuple[str, ...] = ("image", "face_index", *Cue.__dataclass_fields__)


def _rank(col: str) -> tuple[int, int]:
    """Sort key of a face-table column: group, then position in its type (registry order for AUs)."""
    au_order = list(AU_NAMES)
    if col in IMAGE_COLUMNS:
        return 0, IMAGE_COLUMNS.index(col)
    fixed = ["face_index", *BBOX_COLUMNS, "detection_score", *POSE_COLUMNS, *QUALITY_COLUMNS]
    if col in fixed:
        return 2, fixed.index(col)
    code = col.removesuffix("_present")
    if len(code) == 4 and code.startswith("AU") and code[2:].isdigit():
        pos = au_order.index(code) if code in au_order else len(au_order) + int(code[2:])
        return (4 if col.endswith("_present") else 3), pos
    if col.startswith("expression_"):
        return 5, 0
    if col.startswith("emotion_"):
        return 6, 0
    tail = ["top_emotion", "rationale", "face_error"]
    if col in tail:
        return 7, tail.index(col)
    if col.startswith("provenance_"):
        return 8, 0
    return 1, 0  # manifest columns, right after the image fields


def order_columns(columns: Iterable[str]) -> list[str]:
    """The stable column order of face tables: image fields, manifest columns, face fields, AUs (registry
    order), AU presence, expression, emotion, top emotion, rationale, face error, provenance. Within a
    group of data-dependent names (labels, manifest columns, timings), first-seen order is kept."""
    seen = list(dict.fromkeys(columns))
    return sorted(seen, key=lambda c: (*_rank(c), seen.index(c)))


def column_groups(columns: Sequence[str]) -> dict[str, list[str]]:
    """The columns of a face table by group: info, bbox, pose, quality, aus, au_presence, expression,
    emotion (the groups of the ``df.cem`` accessor)."""
    groups: dict[str, list[str]] = {k: [] for k in ("info", "bbox", "pose", "quality", "aus", "au_presence",
                                                     "expression", "emotion")}
    for c in columns:
        g, _ = _rank(c)
        if c in BBOX_COLUMNS:
            groups["bbox"].append(c)
        elif c in POSE_COLUMNS:
            groups["pose"].append(c)
        elif c in QUALITY_COLUMNS:
            groups["quality"].append(c)
        elif g in (3, 4):
            groups["aus" if g == 3 else "au_presence"].append(c)
        elif g in (5, 6):
            groups["expression" if g == 5 else "emotion"].append(c)
        elif g in (0, 1, 8):
            groups["info"].append(c)
    return groups


FRAME_INPUT_COLUMNS = ("video", "context")
"""The frame-table columns that say which input a row belongs to (with the ``meta.*`` columns after them): one
video under two contexts, or in two manifest rows, is two inputs, and its rows are told apart by these."""


def frame_columns(labels: Sequence[str], au_codes: Sequence[str], meta_columns: Sequence[str] = ()) -> list[str]:
    """Columns of the video frame table: ``video``, ``context``, the manifest's other columns as
    ``meta.<column>`` (``meta_columns``: the union over the run's videos, in the manifest's order), the rest
    of :data:`FrameRow`'s fields, then AUs, AUs relative to the track's neutral baseline, and the expression
    distribution."""
    head = list(FrameRow.model_fields)
    return ([*FRAME_INPUT_COLUMNS, *(f"meta.{k}" for k in meta_columns),
             *(c for c in head if c not in FRAME_INPUT_COLUMNS), *au_codes, *(f"{k}_rel" for k in au_codes)]
            + [f"expression_{k}" for k in labels])


def frame_row(video: str, time: float, frame: int, track_id: int, evidence: FaceEvidence, key_moment: bool,
              au_relative: Mapping[str, float] | None, labels: Sequence[str],
              au_codes: Sequence[str], *, context: str | None = None, meta: Mapping[str, Any] | None = None,
              meta_columns: Sequence[str] = ()) -> dict[str, Any]:
    """One row of the video frame table for one tracked face (rounded as in the records); ``meta`` fills the
    ``meta.<column>`` cells of ``meta_columns`` (None where the video's row has no such column)."""
    ev = evidence
    row: dict[str, Any] = {"video": video, "context": context}
    row.update({f"meta.{k}": (None if (meta or {}).get(k) is None else str((meta or {})[k])) for k in meta_columns})
    row.update({"time": rounded("seconds", time), "frame": frame, "track_id": track_id})
    row.update(zip(BBOX_COLUMNS, (rounded("px", v) for v in ev.bbox)))
    row.update({c: rounded("degrees", getattr(ev.pose, c)) if ev.pose else None for c in POSE_COLUMNS})
    row["key_moment"] = bool(key_moment)
    for k in au_codes:
        row[k] = rounded("intensity", ev.aus[k].intensity) if k in ev.aus else None
    for k in au_codes:
        rel = (au_relative or {}).get(k)
        row[f"{k}_rel"] = rounded("intensity", rel) if rel is not None else None
    for k in labels:
        row[f"expression_{k}"] = rounded("probability", ev.expression[k]) if k in ev.expression else None
    return row
