"""Face quality: size, blur, extreme pose, cut by the frame. Faces are flagged, never dropped."""

from __future__ import annotations

import numpy as np

from cem.contract import Pose, Quality

EXTREME_POSE_DEG = 45.0
_BLUR_SIZE = 96  # the face is resized to this width before measuring, so blur does not depend on face size
_BLUR_HALF = 60.0  # Laplacian variance at which blur = 0.5


def blur_score(gray_face: np.ndarray) -> float:
    """0 (sharp) .. 1 (very blurred): ``1 / (1 + var(Laplacian) / 60)`` on the face resized to 96 px.

    The variance of the Laplacian is the usual focus measure (Pech-Pacheco et al. 2000); the mapping to
    0..1 makes it readable. Upscaled small faces read as blurred, which is what they are.
    """
    import cv2

    if gray_face.size == 0:
        return 1.0
    h, w = gray_face.shape[:2]
    scale = _BLUR_SIZE / max(1, w)
    face = cv2.resize(gray_face, (_BLUR_SIZE, max(1, round(h * scale))), interpolation=cv2.INTER_AREA
                      if scale < 1 else cv2.INTER_LINEAR)
    var = float(cv2.Laplacian(face, cv2.CV_64F).var())
    return 1.0 / (1.0 + var / _BLUR_HALF)


def assess(gray: np.ndarray, bbox: tuple[float, float, float, float], pose: Pose | None,
           min_face_px: int, mesh_failed: bool) -> Quality:
    h, w = gray.shape[:2]
    x, y, bw, bh = bbox
    x0, y0 = max(0, int(x)), max(0, int(y))
    x1, y1 = min(w, int(round(x + bw))), min(h, int(round(y + bh)))
    face_px = int(round(max(bw, bh)))
    margin = 0.05 * max(bw, bh)
    cut = x < -margin or y < -margin or x + bw > w + margin or y + bh > h + margin
    extreme = pose is not None and (abs(pose.yaw) > EXTREME_POSE_DEG or abs(pose.pitch) > EXTREME_POSE_DEG)
    return Quality(
        face_px=face_px,
        blur=blur_score(gray[y0:y1, x0:x1]),
        extreme_pose=bool(extreme),
        cut_by_frame=bool(cut),
        # the short side: a whole image of 400x20 px (--faces whole) is no face of 400 px
        too_small=round(min(bw, bh)) < min_face_px,
        mesh_failed=mesh_failed,
    )
