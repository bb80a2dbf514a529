"""Action units as geometric estimates from the face mesh.

Method: the mesh is frontalised (rigid similarity alignment to the canonical neutral face, which removes
head pose and face size, see :mod:`cem.fer.geometry`). A set of *base measurements* (brow heights, eye
aperture, mouth width, lip gap, ...) is taken in canonical units and turned into robust z-scores against
the same measurements on real neutral faces (median and 1.4826 x MAD over neutral-majority FER+ training
faces). Each AU is a weighted combination of those z-scores, mapped to the 0-5 intensity scale with
``intensity = 5 * (1 - exp(-softplus(score - 2) / 4))``: about 0.15 on a neutral face, 1 (present,
roughly FACS level A) at about 2.4 neutral spreads, 2 at 4, 3.6 at 7, approaching 5 without a hard clip
(a clip would tie strong activations and lose their order).

Limits, honestly: these are geometric estimates of appearance change from a 2.5-D mesh of one still
image, against an *average* neutral face, not the person's own. Faces whose resting shape differs from
the average (a naturally raised brow, thin lips) read as small AU activity; AUs with little geometric
signature (AU06 vs AU07, AU14, AU23 vs AU24) are the least reliable. This is not a certified FACS coder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cem.contract import AU_NAMES, ActionUnit, rounded
from cem.fer.geometry import Reference, frontalize

# Mesh indices (MediaPipe face mesh topology). "Right" is the subject's right (image left).
_BROW_INNER = [107, 55, 336, 285]
_BROW_OUTER = [70, 46, 300, 276]
_BROW_ALL = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55, 300, 293, 334, 296, 336, 276, 283, 282, 295, 285]
_EYE_LINE = [33, 133, 263, 362]
_CHEEK = [50, 280, 118, 347, 101, 330]
_ALA = [129, 358, 64, 294]
_UPPER_LIP_TOP = [0, 37, 267]
_CORNERS = [61, 291]


def _y(f: np.ndarray, idx: list[int]) -> float:
    return float(f[idx, 1].mean())


def base_measurements(f: np.ndarray) -> dict[str, float]:
    """Measurements on a frontalised mesh (canonical units; y down, so 'height' is eye_line_y - y)."""
    eye_line = _y(f, _EYE_LINE)
    lip_mid_upper = f[13, 1]
    return {
        "brow_inner_height": eye_line - _y(f, _BROW_INNER),
        "brow_outer_height": eye_line - _y(f, _BROW_OUTER),
        "brow_height": eye_line - _y(f, _BROW_ALL),
        "brow_gap": float(np.linalg.norm(f[107, :2] - f[336, :2]) + np.linalg.norm(f[55, :2] - f[285, :2])) / 2,
        "eye_aperture": float((f[145, 1] - f[159, 1]) + (f[374, 1] - f[386, 1])) / 2,
        "lower_lid_height": eye_line - float(f[[145, 374], 1].mean()),
        "cheek_height": eye_line - _y(f, _CHEEK),
        "ala_height": eye_line - _y(f, _ALA),
        "upper_lip_height": float(f[2, 1]) - _y(f, _UPPER_LIP_TOP),
        "corner_height": eye_line - _y(f, _CORNERS),
        "corner_vs_lip": float(lip_mid_upper - f[_CORNERS, 1].mean()),
        "mouth_width": float(np.linalg.norm(f[61, :2] - f[291, :2])),
        "corner_depth": float(f[_CORNERS, 2].mean() - f[[0, 17], 2].mean()),
        "lip_thickness": float((f[13, 1] - f[0, 1]) + (f[17, 1] - f[14, 1])),
        "lip_gap": float(np.mean([f[14, 1] - f[13, 1], f[87, 1] - f[82, 1], f[317, 1] - f[312, 1]])),
        "lower_lip_drop": float(f[17, 1]) - eye_line,
        "upper_lid_raise": float(np.mean([f[468, 1] - f[159, 1], f[473, 1] - f[386, 1]])),
        "corner_vs_center": float(f[[13, 14], 1].mean() - f[_CORNERS, 1].mean()),
        "brow_oblique": eye_line - _y(f, _BROW_INNER) - (eye_line - _y(f, _BROW_OUTER)),
        "nasolabial_height": eye_line - _y(f, [205, 425, 36, 266]),
        "jaw_drop": float(f[152, 1] - f[1, 1]),
        "chin_to_lip": float(f[152, 1] - f[17, 1]),
    }


MEASUREMENT_NAMES: tuple[str, ...] = tuple(base_measurements(np.zeros((478, 3))).keys())


@dataclass(frozen=True)
class AUDefinition:
    code: str
    weights: dict[str, float]  # base measurement -> weight on its neutral z-score
    # measurements whose linear share is removed from the score (fitted, see cem.fer.au_calibration): the
    # movements of *other* AUs that also move this AU's landmarks (mouth opening and smiling lift the
    # upper lip without AU10)
    nuisance: tuple[str, ...] = ()
    # plurality emotions of the FER+ training faces the nuisance share is fitted on: faces where this AU
    # is not expected, so what the nuisance explains there is not this AU
    nuisance_fit_on: tuple[str, ...] = ()
    # fit the nuisance share on sharp faces instead (cem.fer.au_calibration, step 2b): for effects that the
    # noisy meshes of 48-px faces hide, so a fit on FER+ shrinks them towards 0
    nuisance_on_sharp_faces: bool = False
    # measured against a person's own neutral photos, present from the own-neutral threshold
    # (Calibration.threshold_own_neutral); False keeps the population's: AU10's smile share was fitted on
    # population-referenced scores, and against one's own neutral face it fired on 47 % of posed smiles
    own_neutral_threshold: bool = True

    @property
    def name(self) -> str:
        """FACS name, from the registry in :mod:`cem.contract`."""
        return AU_NAMES[self.code]


AU_DEFINITIONS: tuple[AUDefinition, ...] = (
    AUDefinition("AU01", {"brow_inner_height": 1.0, "brow_oblique": 0.5}),
    AUDefinition("AU02", {"brow_outer_height": 1.0}),
    # the cheek raiser (AU06) of a broad smile pulls the brows down too: on sharp photos AU04 otherwise
    # fired on 42 % of posed smiles; that share is removed (fitted on sharp smiles and neutral faces)
    AUDefinition("AU04", {"brow_height": -1.0, "brow_gap": -0.5},
                 nuisance=("cheek_height",), nuisance_on_sharp_faces=True),
    AUDefinition("AU05", {"upper_lid_raise": 1.0, "eye_aperture": 0.5}),
    AUDefinition("AU06", {"cheek_height": 1.0, "nasolabial_height": 1.0, "lower_lid_height": 0.5}),
    AUDefinition("AU07", {"lower_lid_height": 1.0, "eye_aperture": -0.5}),
    # a smile lifts the upper lip and the nose wings too: fitted on sharp faces (on FER+ the share came out
    # too small, and AU09 fired on 40 % of posed smiles in tcce_dev)
    AUDefinition("AU09", {"ala_height": 0.5, "upper_lip_height": 1.0, "brow_inner_height": -1.0},
                 nuisance=("corner_vs_center", "cheek_height"), nuisance_on_sharp_faces=True),
    AUDefinition("AU10", {"upper_lip_height": 1.0, "ala_height": 0.5},
                 nuisance=("lip_gap", "corner_vs_center"), nuisance_fit_on=("neutral", "happiness", "surprise"),
                 own_neutral_threshold=False),
    AUDefinition("AU12", {"mouth_width": 1.0, "corner_vs_center": 1.0, "corner_depth": 0.5}),
    AUDefinition("AU14", {"corner_depth": 1.0, "corner_vs_center": -0.5}),
    AUDefinition("AU15", {"corner_vs_center": -1.0, "corner_height": -0.5},
                 nuisance=("lip_gap", "lower_lip_drop"), nuisance_fit_on=("neutral", "happiness", "surprise")),
    AUDefinition("AU17", {"chin_to_lip": -1.0}),
    AUDefinition("AU20", {"mouth_width": 1.0, "corner_vs_center": -0.5}),
    AUDefinition("AU23", {"lip_thickness": -1.0, "mouth_width": -0.3}),
    AUDefinition("AU24", {"lip_thickness": -1.0, "lip_gap": -0.5}),
    AUDefinition("AU25", {"lip_gap": 1.0}),
    AUDefinition("AU26", {"lower_lip_drop": 1.0, "lip_gap": 1.0, "jaw_drop": 0.5}),
    AUDefinition("AU43", {"eye_aperture": -1.0, "upper_lid_raise": -0.5}),
)

PRESENCE_INTENSITY = 1.0  # an AU is present from intensity 1 (about FACS level A)
_OFFSET = 2.0
_SPREAD = 4.0
# the score at which the mapping below gives intensity 1: scores are shifted per AU so that the calibrated
# presence threshold lands here
_SCORE_AT_PRESENCE = _OFFSET + float(np.log(np.expm1(-_SPREAD * np.log(1 - PRESENCE_INTENSITY / 5))))
CALIBRATION_PATH = Path(__file__).parent / "data" / "au_calibration.json"


def intensity_from_score(score: np.ndarray | float) -> np.ndarray:
    """z-score combination -> 0-5 intensity (monotone; see module docs)."""
    s = np.asarray(score, dtype=np.float64) - _OFFSET
    return 5.0 * (1.0 - np.exp(-np.logaddexp(0.0, s) / _SPREAD))


def interocular_px(landmarks: np.ndarray) -> float:
    """Distance between the outer eye corners in image pixels: the face's resolution as the mesh sees it."""
    return float(np.linalg.norm(landmarks[33, :2] - landmarks[263, :2]))


@dataclass(frozen=True)
class Calibration:
    """Per-AU nuisance coefficients and presence thresholds (fitted by :mod:`cem.fer.au_calibration`).

    Presence thresholds depend on the face's resolution: the mesh of a small, blurry face is noisy, so
    neutral faces spread far more in every AU score at 48 px than in a sharp photo, and one threshold
    either fires on noise in small faces or never fires in sharp ones. ``threshold`` holds the scores
    fitted on small faces (interocular distance ``iod_small`` px), ``threshold_sharp`` those fitted on
    sharp ones (``iod_sharp`` px); between the two the threshold is interpolated linearly in log
    interocular distance, and beyond them it is held at the nearer one (:meth:`threshold_at`).

    A face measured against the person's own neutral photos (a :class:`SubjectBaseline` built from neutral
    photos) varies far less at rest than against the average face, so its sharp-face anchor is
    ``threshold_own_neutral`` instead (fitted on neutral photos measured against the same person's other
    neutral photos); small faces keep the small-face thresholds, since no small-face data with own neutral
    photos exists to fit them.
    """

    nuisance: dict[str, dict[str, float]]  # AU -> measurement -> coefficient on its z-score
    threshold: dict[str, float]  # AU -> score at which it is present, on small faces (iod_small)
    how: str = ""
    threshold_sharp: dict[str, float] | None = None  # AU -> the same on sharp faces (iod_sharp); None: no change
    iod_small: float = 24.0
    iod_sharp: float = 105.0
    # AU -> the sharp-face threshold for faces measured against their own neutral photos; None: as without
    threshold_own_neutral: dict[str, float] | None = None

    def threshold_at(self, code: str, iod: float, own_neutral: bool = False) -> float:
        """The presence threshold of AU ``code`` for a face whose interocular distance is ``iod`` px;
        ``own_neutral``: measured against the person's own neutral photos."""
        small = self.threshold[code]
        sharp_anchor = (self.threshold_own_neutral if own_neutral and self.threshold_own_neutral
                        else self.threshold_sharp)
        if sharp_anchor is None or not np.isfinite(iod) or iod <= self.iod_small:
            return small
        if iod >= self.iod_sharp:
            return sharp_anchor[code]
        w = float(np.log(iod / self.iod_small) / np.log(self.iod_sharp / self.iod_small))
        return small + w * (sharp_anchor[code] - small)


def calibration_from_dict(d: dict) -> Calibration:
    """A Calibration from the content of ``au_calibration.json``."""
    sharp, own = d.get("threshold_sharp"), d.get("threshold_own_neutral")
    return Calibration(nuisance={k: dict(v) for k, v in d["nuisance"].items()},
                       threshold={k: float(v) for k, v in d["threshold"].items()}, how=str(d.get("how", "")),
                       threshold_sharp={k: float(v) for k, v in sharp.items()} if sharp else None,
                       iod_small=float(d.get("iod_small", 24.0)), iod_sharp=float(d.get("iod_sharp", 105.0)),
                       threshold_own_neutral={k: float(v) for k, v in own.items()} if own else None)


@lru_cache(maxsize=1)
def load_calibration(path: str | None = None) -> Calibration:
    p = Path(path) if path else CALIBRATION_PATH
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the AU calibration is missing; rebuild it with python -m cem.fer.au_calibration")
    return calibration_from_dict(json.loads(p.read_text(encoding="utf-8")))


MEDIAN_MIN_PHOTOS = 5
"""Fewest photos with a face that a median baseline (no neutral photo flagged) is built from. The median
includes the photo being measured: of one photo it is that photo (every AU then reads about 0), of two their
midpoint (each photo's AUs halved). From five on, one photo moves the median by at most one order statistic."""


class TooFewPhotosError(ValueError):
    """A median baseline asked of fewer than :data:`MEDIAN_MIN_PHOTOS` photos with a face."""


@dataclass(frozen=True)
class SubjectBaseline:
    """A person's own resting face: the median AU base measurements over their reference photos and, when
    those are neutral photos, the expression model's mean output on them.

    With a baseline, AU z-scores measure change from *this person's* neutral face instead of from the
    average neutral face, so a naturally low brow or thin lips no longer read as AU activity. Build it
    with :meth:`from_meshes` (or ``FERStage.baseline``) from the subject's neutral photo(s), or, lacking
    one, from the median over several of their photos (weaker: the median of expressive photos is not
    neutral).
    """

    measurements: np.ndarray  # (M,) in the order of Reference.measure_names
    faces: int  # how many faces the median is over
    # mean log-probabilities of the expression model over the subject's *neutral* photos (its label order);
    # None for a median over unlabelled photos, which is no neutral reference for expressions
    expression_log_probs: np.ndarray | None = None
    # built from photos of the person's neutral face (not a median of any photos): AU presence then uses the
    # own-neutral thresholds (Calibration.threshold_own_neutral)
    neutral: bool = False

    def describe(self, subject: str | None = None, listed: int | None = None) -> str:
        """What a record's ``provenance.baseline`` says of it: ``"P01: neutral (2 of 3 photos)"`` for a named
        subject with ``listed`` photos of which :attr:`faces` counted, ``"P02: median of 6 photos"``, or
        without a subject ``"neutral baseline of 1 photo"``; a neutral baseline that the expression model cannot
        be measured against adds ``"; AUs only, expressions against the average face"``."""
        counted = (f"{self.faces} of {listed} photos" if listed is not None and self.faces < listed
                   else f"{self.faces} photo{'s' if self.faces != 1 else ''}")
        if self.neutral and self.expression_log_probs is None:
            # an expression model without a neutral reference (trained, not calibrated) or with other labels:
            # only the AUs are measured against the photos (this was unsaid)
            counted += "; AUs only, expressions against the average face"
        if subject is None:
            return f"{'neutral' if self.neutral else 'median'} baseline of {counted}"
        return f"{subject}: neutral ({counted})" if self.neutral else f"{subject}: median of {counted}"

    @classmethod
    def from_meshes(cls, meshes: Sequence[np.ndarray], ref: Reference, neutral: bool = False) -> SubjectBaseline:
        """Median measurements over meshes (478, 3) in image pixels of one person (``neutral``: they show the
        person's neutral face)."""
        if len(meshes) == 0:
            raise ValueError("a subject baseline needs at least one face mesh of the subject")
        rows = []
        for m in meshes:
            front, _ = frontalize(m, ref)
            b = base_measurements(front)
            rows.append([b[n] for n in ref.measure_names])
        return cls(np.median(np.array(rows), axis=0), len(rows), neutral=neutral)


def measurement_z(landmarks: np.ndarray, ref: Reference, front: np.ndarray | None = None,
                  baseline: SubjectBaseline | None = None) -> np.ndarray:
    """Robust neutral z-scores of the base measurements for one mesh in image pixels (``front``: the
    mesh already frontalised by the caller, so the alignment is not computed twice). With ``baseline``
    the centre is that person's own neutral face; the spread stays the population's."""
    if front is None:
        front, _ = frontalize(landmarks, ref)
    m = base_measurements(front)
    values = np.array([m[n] for n in ref.measure_names])
    center = ref.measure_center if baseline is None else baseline.measurements
    return (values - center) / ref.measure_scale


def raw_au_scores(z: np.ndarray, ref: Reference) -> dict[str, float]:
    """Each AU's normalised weighted sum of z-scores, before nuisance removal."""
    index = {n: i for i, n in enumerate(ref.measure_names)}
    out = {}
    for d in AU_DEFINITIONS:
        w = np.array(list(d.weights.values()))
        zz = np.array([z[index[n]] for n in d.weights])
        out[d.code] = float((w @ zz) / np.linalg.norm(w))
    return out


def au_scores(z: np.ndarray, ref: Reference, cal: Calibration | None = None) -> dict[str, float]:
    """AU scores: raw scores minus the fitted nuisance share (see AUDefinition.nuisance)."""
    cal = cal or load_calibration()
    index = {n: i for i, n in enumerate(ref.measure_names)}
    out = raw_au_scores(z, ref)
    for code, coefs in cal.nuisance.items():
        out[code] -= sum(c * z[index[n]] for n, c in coefs.items())
    return out


def estimate_aus(landmarks: np.ndarray, ref: Reference, front: np.ndarray | None = None,
                 baseline: SubjectBaseline | None = None,
                 calibration: Calibration | None = None) -> dict[str, ActionUnit]:
    """AU intensities and presence for one mesh (478, 3) in image pixels (``front``: see measurement_z;
    ``baseline``: the person's own neutral reference, see SubjectBaseline; ``calibration``: default the
    packaged one).

    Each AU's score is shifted so that its calibrated presence threshold (for this face's resolution and,
    with a baseline of neutral photos, for measurements against one's own neutral face:
    :meth:`Calibration.threshold_at`) maps to intensity 1: presence is ``intensity >= 1`` for every AU,
    and among faces of one resolution and reference intensities keep the order of the scores.
    """
    cal = calibration or load_calibration()
    scores = au_scores(measurement_z(landmarks, ref, front, baseline), ref, cal)
    iod = interocular_px(landmarks)
    own_neutral = baseline is not None and baseline.neutral
    out = {}
    for d in AU_DEFINITIONS:
        code, s = d.code, scores[d.code]
        threshold = cal.threshold_at(code, iod, own_neutral and d.own_neutral_threshold)
        # presence is decided on the intensity as written (3 decimals): 0.9996 is written 1.0, and a record
        # saying {"intensity": 1.0, "present": false} contradicted the rule
        i = rounded("intensity", float(intensity_from_score(s - threshold + _SCORE_AT_PRESENCE)))
        out[code] = ActionUnit(intensity=i, present=i >= PRESENCE_INTENSITY)
    return out
