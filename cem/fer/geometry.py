"""Face geometry on the 478-point MediaPipe mesh: rigid alignment to a canonical face, head pose, and
the aligned crop that the expression model sees.

The canonical face is not taken from MediaPipe (the 0.10.21 wheel ships no canonical model); it is the
mirror-symmetrised generalised-Procrustes mean of meshes of neutral FER+ training faces, stored in
``cem/fer/data/reference.json`` by :mod:`cem.fer.reference` (see there for how it was made). Its units:
the distance between the outer eye corners is 1; axes x right, y down, z away from the camera.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

REFERENCE_PATH = Path(__file__).parent / "data" / "reference.json"

# Landmarks that move little with expression: forehead and nose ridge, eye corners, temples, cheekbones.
RIGID_POINTS = np.array([10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 33, 133, 263, 362, 127, 356, 234, 454,
                         116, 345, 123, 352, 98, 327, 129, 358])
RIGHT_EYE = np.array([33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246])
LEFT_EYE = np.array([263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466])


MAX_WARP_SOURCE = 4096  # OpenCV's warps abort on sources with a side >= 32767 px; regions are shrunk below this


@dataclass(frozen=True)
class Reference:
    canonical: np.ndarray  # (478, 3) canonical neutral face
    mirror: np.ndarray  # (478,) index of each landmark's left/right counterpart
    crop_eyes: np.ndarray  # (2, 2) mean (x, y) of the subject's right and left eye centres in 48x48 FER crops
    measure_center: np.ndarray  # (M,) neutral medians of the AU base measurements
    measure_scale: np.ndarray  # (M,) neutral robust spreads (1.4826 * MAD)
    measure_names: tuple[str, ...]


@lru_cache(maxsize=1)
def load_reference(path: str | None = None) -> Reference:
    p = Path(path) if path else REFERENCE_PATH
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the neutral reference is missing; rebuild it with python -m cem.fer.reference")
    d = json.loads(p.read_text(encoding="utf-8"))
    return Reference(
        canonical=np.array(d["canonical"], dtype=np.float64),
        mirror=np.array(d["mirror"], dtype=np.int64),
        crop_eyes=np.array(d["crop_eyes"], dtype=np.float64),
        measure_center=np.array(d["measure_center"], dtype=np.float64),
        measure_scale=np.array(d["measure_scale"], dtype=np.float64),
        measure_names=tuple(str(s) for s in d["measure_names"]),
    )


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity transform (s, R, t) minimising ||dst - (s R src + t)||^2 (Umeyama 1991), proper rotation."""
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(len(sig))
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    var = (a**2).sum() / len(src)
    s = float((sig * d).sum() / var) if var > 0 else 1.0
    return s, rot, mu_d - s * rot @ mu_s


def frontalize(landmarks: np.ndarray, ref: Reference) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks (478, 3) in image pixels -> (landmarks in canonical units and orientation, rotation R).

    R rotates canonical directions into the image frame; applying its inverse removes head pose, so that
    measurements on the result are corrected for pose and normalised for face size.
    """
    s, rot, t = umeyama(ref.canonical[RIGID_POINTS], landmarks[RIGID_POINTS])
    return ((landmarks - t) @ rot) / s, rot


def pose_from_rotation(rot: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the canonical-to-image rotation (sign conventions in schema.Pose)."""
    forward = rot @ np.array([0.0, 0.0, -1.0])  # out of the face, towards the camera when frontal
    across = rot @ np.array([1.0, 0.0, 0.0])  # from the subject's right eye to the left eye
    yaw = math.degrees(math.atan2(forward[0], -forward[2]))
    pitch = math.degrees(math.atan2(-forward[1], math.hypot(forward[0], forward[2])))
    roll = math.degrees(math.atan2(across[1], across[0]))
    return yaw, pitch, roll


def eye_centers(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right eye centre, left eye centre) in image (x, y); the subject's right eye is on the image left."""
    return landmarks[RIGHT_EYE, :2].mean(axis=0), landmarks[LEFT_EYE, :2].mean(axis=0)


def aligned_crop(gray: np.ndarray, right_eye: np.ndarray, left_eye: np.ndarray, ref: Reference,
                 size: int = 48) -> np.ndarray:
    """Grayscale crop with the eyes level and placed where they sit, on average, in FER2013 crops.

    This mirrors the training data's framing so the expression model sees a face as it was trained on.
    """
    import cv2

    src = np.stack([right_eye, left_eye]).astype(np.float64)
    dst = ref.crop_eyes * (size / 48.0)
    # similarity from two point pairs (complex-number form)
    zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    a = (zd[1] - zd[0]) / (zs[1] - zs[0]) if zs[1] != zs[0] else 1.0
    b = zd[0] - a * zs[0]
    m = np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])
    scale = abs(a)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    # warp only the source region the crop can read (plus a margin for the blur and interpolation): OpenCV's
    # warp refuses sources with a side >= 32767 px, and blurring a whole large photo for one face is waste
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inv.T
    margin = 4 + (3.0 / scale if scale < 0.5 else 0.0)
    h, w = gray.shape[:2]
    x0 = int(np.clip(np.floor(corners[:, 0].min() - margin), 0, w - 1))
    y0 = int(np.clip(np.floor(corners[:, 1].min() - margin), 0, h - 1))
    x1 = int(np.clip(np.ceil(corners[:, 0].max() + margin) + 1, x0 + 1, w))
    y1 = int(np.clip(np.ceil(corners[:, 1].max() + margin) + 1, y0 + 1, h))
    region = gray[y0:y1, x0:x1]
    m = m.copy()
    m[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)
    if max(region.shape[:2]) > MAX_WARP_SOURCE:  # a face thousands of px wide: shrink it first
        r = MAX_WARP_SOURCE / max(region.shape[:2])
        region = cv2.resize(region, (max(1, round(region.shape[1] * r)), max(1, round(region.shape[0] * r))),
                            interpolation=cv2.INTER_AREA)
        m[:, :2] /= r
        scale /= r
    if scale < 0.5:  # pre-blur so that the warp averages pixels instead of aliasing
        region = cv2.GaussianBlur(region, (0, 0), sigmaX=0.5 / scale)
    return cv2.warpAffine(np.ascontiguousarray(region), m, (size, size), flags=interp,
                          borderMode=cv2.BORDER_REPLICATE)
