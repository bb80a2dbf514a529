"""Face detection and the 478-point face mesh (MediaPipe 0.10.21, whose wheel ships both models).

The mesh runs once per detected face on a square crop around it, rather than once on the whole image
with ``max_num_faces``: per-face crops keep small faces in group photos at the resolution the mesh model
needs and tie each mesh to its detection.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np

from cem.fer.threads import torch_threads


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hold back what native code writes to file descriptor 2 while MediaPipe graphs start (absl prints
    informational warnings there before its logging is configured); replay it if starting fails."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. some notebook kernels)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        except BaseException:
            os.dup2(saved, fd)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)

DetectorModel = Literal["short", "full", "both", "auto"]


@dataclass
class Detection:
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels
    score: float
    # pixels, the subject's right eye (image left) first: MediaPipe (6, 2) right eye, left eye, nose tip,
    # mouth, right ear, left ear; MTCNN (5, 2) right eye, left eye, nose tip, mouth corners (image left first)
    keypoints: np.ndarray
    source: str = "mediapipe"  # which detector found the face: mediapipe or mtcnn
    # the long side, in image pixels, of the region the detector squeezed into its input (the whole image, a
    # tile, a crop): the smaller, the sharper it saw the face; 0 when not known
    view_px: float = 0.0
    cut: bool = False  # it touches the edge of its tile inside the image: the tile shows part of the face

    @property
    def eyes(self) -> tuple[np.ndarray, np.ndarray]:
        """The subject's right and left eye (keypoints 0 and 1), as :meth:`FaceMesher.mesh_in_box` takes them."""
        return self.keypoints[0], self.keypoints[1]


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _inside(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Fraction of the smaller box's area that lies inside the other box."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    small = min(a[2] * a[3], b[2] * b[3])
    return iw * ih / small if small > 0 else 0.0


TILE_ASPECT = 1.5
# MediaPipe warps its input with OpenCV, whose remap refuses any side >= 32767 px (SHRT_MAX) and aborts the
# process. The detectors squeeze what they see into 128 or 192 px, so a region is first downscaled to at most
# DETECT_SIDE px (nothing the detectors could see is lost) and no MediaPipe call ever gets a larger image.
DETECT_SIDE = 1024
MAX_TILES = 48  # an extreme aspect ratio gets longer (non-square) tiles rather than thousands of tiles
MIN_TILE_SIDE = 24  # a strip narrower than this holds no face the detectors can find: it is not tiled
PAD_SIDE = 512  # the padded retry (for tight crops) runs on the image downscaled to this
# image pyramid for small faces in large photos: grids of square tiles of half, a quarter, ... of the short
# side, down to PYRAMID_MIN_TILE px, at most PYRAMID_MAX_TILES tiles in all (coarse levels first)
PYRAMID_MIN_TILE = 300
PYRAMID_MAX_TILES = 24


def _resize_max(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``rgb`` downscaled (area interpolation) so its longer side is at most ``max_side``; (image, scale)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb, 1.0
    import cv2

    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), s


def tile_plan(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles (x0, y0, tw, th) along the long side of a wide or tall image; [] otherwise.

    Tiles are squares of the short side with at least 25 % overlap, at most ``MAX_TILES`` of them (beyond
    that the tiles get longer); strips narrower than ``MIN_TILE_SIDE`` are not tiled.
    """
    side, long = min(h, w), max(h, w)
    if long <= TILE_ASPECT * side or side < MIN_TILE_SIDE:
        return []
    length = max(float(side), long / (1 + 0.75 * (MAX_TILES - 1)))
    n = min(MAX_TILES, int(np.ceil((long - length) / (0.75 * length))) + 1)
    tl = int(np.ceil(length))
    out = []
    for i in range(n):
        start = int(round(i * (long - tl) / max(1, n - 1)))
        out.append((start, 0, tl, h) if w >= h else (0, start, w, tl))
    return out


def pyramid_plan(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """Square tiles (x0, y0, side, side) of the image pyramid, each grid overlapping by at least 25 %.

    Level k has tiles of ``min(h, w) / 2**k`` px (k >= 1) while they are at least ``PYRAMID_MIN_TILE``;
    a level that would take the total past ``PYRAMID_MAX_TILES`` is left out with all finer ones (so
    large photos keep the cost bounded, at the price of their smallest faces).
    """
    out: list[tuple[int, int, int, int]] = []
    side = min(h, w) / 2
    while side >= PYRAMID_MIN_TILE:
        t = int(round(side))
        nx = int(np.ceil((w - t) / (0.75 * t))) + 1
        ny = int(np.ceil((h - t) / (0.75 * t))) + 1
        if len(out) + nx * ny > PYRAMID_MAX_TILES:
            break
        for j in range(ny):
            for i in range(nx):
                out.append((int(round(i * (w - t) / max(1, nx - 1))), int(round(j * (h - t) / max(1, ny - 1))), t, t))
        side /= 2
    return out


# Of two MediaPipe boxes of one face (IoU at least SAME_FACE_IOU), the one from a view at least SHARPER_VIEW
# times smaller (a tile, rather than the whole wide image squeezed into 128 px) is kept, whatever their scores:
# the box sets the face mesh's region, and the mesh's landmarks (so the AUs) move with it. Kept by score, the
# whole image's coarse box won on a wider canvas (white space or other faces beside the face), and the same
# face's AU25 went from 0.14 to 2.72 (docs/action-units.md). A face cut by its tile's edge is never preferred.
SAME_FACE_IOU = 0.5
SHARPER_VIEW = 1.5


def _sharper_view(d: Detection, kept: Detection) -> bool:
    """Whether ``d`` should replace ``kept``: see ``SHARPER_VIEW``."""
    return (d.source == kept.source == "mediapipe" and not d.cut and d.view_px > 0 and kept.view_px > 0
            and d.view_px * SHARPER_VIEW <= kept.view_px and box_iou(d.bbox, kept.bbox) >= SAME_FACE_IOU)


def _cut_by_tile(box: tuple[float, float, float, float], x0: int, y0: int, tw: int, th: int,
                 w: int, h: int) -> bool:
    """Whether a detection in tile (x0, y0, tw, th) touches a tile edge inside the image: a face cut by the
    tile, which the overlapping neighbour or the coarser level sees whole."""
    m = 0.02 * max(tw, th)
    bx, by, bw, bh = box
    return ((x0 > 0 and bx < x0 + m) or (y0 > 0 and by < y0 + m)
            or (x0 + tw < w and bx + bw > x0 + tw - m) or (y0 + th < h and by + bh > y0 + th - m))


# ``auto``: the full-range model also runs on the whole image unless the short-range model found a face at
# least this fraction of the image's short side wide (a close-up, where the full-range model, made for
# faces a few metres away, finds nothing the short-range one missed but costs twice as much)
CLOSEUP_FACE_FRACTION = 0.3
# small faces in large images (short side >= SMALL_FACE_MIN_SIDE): MTCNN on the image downscaled to at most
# MTCNN_MAX_SIDE px (its cost grows with the area), looking for faces from MTCNN_MIN_FACE px of that copy.
# Measured on composed group scenes (docs/action-units.md, "Faces in group photos").
SMALL_FACE_MIN_SIDE = 2 * PYRAMID_MIN_TILE
MTCNN_MAX_SIDE = 1600
MTCNN_MIN_FACE = 24
# MTCNN's thresholds for the small-face search: proposal and refinement networks below the authors' 0.6 and
# 0.7, so that blurred faces and faces cut by the frame reach the last network; the last network's above the
# authors' 0.7, which let through patterned background
MTCNN_THRESHOLDS = (0.3, 0.3)
MTCNN_MIN_SCORE = 0.85
# Every MTCNN face is confirmed by MediaPipe on a crop of CONFIRM_CONTEXT box sides around it, where the face
# is large enough for MediaPipe's detectors; the MediaPipe face that overlaps it most (IoU >= CONFIRM_IOU)
# gives the box and keypoints. Chosen on five seeds of the group scenes (docs/action-units.md): without the
# confirmation the lower thresholds had 11-17 false positives per 40 scenes (patterned background, blurred
# bystanders and badly sized boxes, which MTCNN scores up to 0.99 and on which a face mesh still fits).
CONFIRM_CONTEXT = 2.5
# where MediaPipe finds no face in that crop, it looks once more in a wider one (4 box sides: a face cut by
# the frame or blurred keeps more of its surroundings, and MediaPipe sees it smaller): on the five seeds this
# found 0-1 % more faces per seed with the same false positives; a tighter second crop (1.7) found more but
# also more false positives (docs/action-units.md)
CONFIRM_CONTEXT_RETRY = 4.0
# a face MTCNN is very sure of, still unconfirmed, gets a third, tight crop (1.7 box sides: MediaPipe sees it
# larger). Blurred faces (upscaled 48 px FER+ crops) are confirmed there. For every MTCNN face, this crop
# added false positives; for MTCNN's surest faces it added none: group scenes seeds 0-4, recall from 45 px
# 0.955/0.950/0.943/0.918/0.946 -> 0.964/0.968/0.943/0.927/0.950, false positives 9 -> 8; seeds 5-6 (not looked
# at while choosing) 0.919/0.921 -> 0.932/0.939, false positives 4 -> 4 (docs/action-units.md)
CONFIRM_CONTEXT_TIGHT = 1.7
CONFIRM_TIGHT_MIN_SCORE = 0.98
CONFIRM_IOU = 0.5
CONFIRM_MIN_SCORE = 0.5  # MediaPipe's score on the crop (its detectors report from faces.min_score)
CONFIRM_SIDE = 256  # the crop is downscaled to this first (the detectors see 128 or 192 px)
# an MTCNN face on which no face mesh fits is kept only from this score (cem.fer.stage; MediaPipe's need
# faces.min_score_unmeshed): the faces it recovers are profiles and faces cut by the frame, where the mesh
# fails; on the group scenes this found 2 + 4 more faces of seeds 0 and 1 with no new false positive
MTCNN_MIN_SCORE_UNMESHED = 0.99
MEDIAPIPE_SURE = 0.8  # MediaPipe detections at least this sure keep their box over an overlapping MTCNN one
SmallFaces = Literal["mtcnn", "pyramid", "off"]


class FaceDetector:
    """MediaPipe face detection: ``short`` (faces within ~2 m), ``full`` (up to ~5 m), ``both`` (merged) or
    ``auto`` (short-range; the full-range model too unless the photo is a close-up, see
    ``CLOSEUP_FACE_FRACTION``)."""

    def __init__(self, model: DetectorModel = "both", min_score: float = 0.5, nms_iou: float = 0.3,
                 pad_retry: float = 0.25, small_faces: SmallFaces = "mtcnn", torch_threads: int = 1) -> None:
        import mediapipe as mp

        if model not in ("short", "full", "both", "auto"):
            raise ValueError(f"faces.detector must be short, full, both or auto, not {model!r}")
        if small_faces not in get_args(SmallFaces):
            raise ValueError(f"faces.small_faces must be mtcnn, pyramid or off, not {small_faces!r}")
        self.model = model
        selections = {"short": [0], "full": [1], "both": [0, 1], "auto": [0, 1]}[model]
        with quiet_native_stderr():
            self._detectors = [
                mp.solutions.face_detection.FaceDetection(model_selection=s, min_detection_confidence=min_score)
                for s in selections
            ]
            blank = np.zeros((64, 64, 3), np.uint8)
            for d in self._detectors:  # the first inference prints start-up notes too
                d.process(blank)
        self.nms_iou = nms_iou
        self.pad_retry = pad_retry
        self.small_faces = small_faces
        self.torch_threads = torch_threads
        # pyramid tiles use the full-range model when configured (it is made for small, distant faces)
        self._pyramid_detectors = self._detectors[-1:]
        self._mtcnn: Any = None  # loaded on the first large image

    def _detect_region(self, rgb: np.ndarray, x0: int, y0: int, w: int, h: int,
                       detectors: list[Any] | None = None) -> list[Detection]:
        """Detections in the region (x0, y0, w, h) of ``rgb`` (or all of a padded ``rgb`` when x0, y0 < 0),
        in ``rgb``'s pixel frame; the region is downscaled to ``DETECT_SIDE`` first."""
        region = rgb[max(0, y0): max(0, y0) + h, max(0, x0): max(0, x0) + w]
        tile, _ = _resize_max(region, DETECT_SIDE)
        tile = np.ascontiguousarray(tile)
        out = []
        for det in self._detectors if detectors is None else detectors:
            res = det.process(tile)
            for d in res.detections or []:
                rb = d.location_data.relative_bounding_box
                bbox = (rb.xmin * w + x0, rb.ymin * h + y0, rb.width * w, rb.height * h)
                kps = np.array([[k.x * w + x0, k.y * h + y0] for k in d.location_data.relative_keypoints])
                out.append(Detection(bbox=bbox, score=float(d.score[0]), keypoints=kps, view_px=float(max(w, h))))
        return out

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 image, sorted left to right.

        The MediaPipe detectors squeeze the whole image into a 128 or 192 px square, so in a wide or tall
        image faces shrink below what they can find. Such images are also scanned in overlapping tiles
        (:func:`tile_plan`); detections are merged by score-ordered NMS. When nothing is found, the image
        (downscaled to ``PAD_SIDE``) is searched once more with a ``pad_retry`` margin (tight face crops).
        Every MediaPipe call gets an image of at most ``DETECT_SIDE`` px, whatever the input's size.
        """
        h, w = rgb.shape[:2]
        if h < 1 or w < 1:
            raise ValueError(f"image of {w}x{h} px has no pixels to search for faces")
        if self.model == "auto":
            found = self._detect_region(rgb, 0, 0, w, h, self._detectors[:1])
            if not any(d.bbox[2] >= CLOSEUP_FACE_FRACTION * min(h, w) for d in found):
                found += self._detect_region(rgb, 0, 0, w, h, self._detectors[1:])
        else:
            found = self._detect_region(rgb, 0, 0, w, h)
        for x0, y0, tw, th in tile_plan(h, w):
            found += [replace(d, cut=_cut_by_tile(d.bbox, x0, y0, tw, th, w, h))
                      for d in self._detect_region(rgb, x0, y0, tw, th)]
        if self.small_faces == "pyramid":
            for x0, y0, tw, th in pyramid_plan(h, w):
                found += [d for d in self._detect_region(rgb, x0, y0, tw, th, self._pyramid_detectors)
                          if not _cut_by_tile(d.bbox, x0, y0, tw, th, w, h)]
        if not found and self.pad_retry > 0:
            # a face that fills the frame (a tight, pre-cropped photo) has too little context for the
            # detectors: look again with a replicated margin; boxes map back and may extend past the edge
            import cv2

            small, s = _resize_max(rgb, PAD_SIDE)
            sh, sw = small.shape[:2]
            p = int(round(self.pad_retry * max(sh, sw)))
            padded = cv2.copyMakeBorder(small, p, p, p, p, cv2.BORDER_REPLICATE)
            for d in self._detect_region(padded, -p, -p, sw + 2 * p, sh + 2 * p):
                bx, by, bw, bh = d.bbox
                found.append(Detection(bbox=(bx / s, by / s, bw / s, bh / s), score=d.score,
                                       keypoints=d.keypoints / s, view_px=d.view_px / s))
        if self.small_faces == "mtcnn" and min(h, w) >= SMALL_FACE_MIN_SIDE:
            # MediaPipe's sure detections go first: where both find a face, its box (the framing the rest of
            # the stage was measured with) is kept; MTCNN's compete by score with MediaPipe's unsure ones,
            # which are often a poorly placed box on a small face
            sure = sorted((d for d in found if d.score >= MEDIAPIPE_SURE), key=lambda d: -d.score)
            candidates = [d for d in self._mtcnn_detect(rgb)
                          if not any(box_iou(d.bbox, k.bbox) >= self.nms_iou for k in sure)]
            confirmed = [c for c in (self._confirmed(rgb, d) for d in candidates) if c is not None]
            found = sure + sorted([d for d in found if d.score < MEDIAPIPE_SURE] + confirmed, key=lambda d: -d.score)
        else:
            found = sorted(found, key=lambda d: -d.score)
        kept: list[Detection] = []
        for d in found:
            clash = [i for i, k in enumerate(kept)
                     if box_iou(d.bbox, k.bbox) >= self.nms_iou or _inside(d.bbox, k.bbox) >= 0.6]
            if not clash:
                kept.append(d)
            elif len(clash) == 1 and _sharper_view(d, kept[clash[0]]):
                kept[clash[0]] = d
        return sorted(kept, key=lambda d: d.bbox[0] + d.bbox[2] / 2)

    def _confirmed(self, rgb: np.ndarray, det: Detection) -> Detection | None:
        """``det`` (an MTCNN face) as MediaPipe sees it in a square crop of ``CONFIRM_CONTEXT`` box sides around
        it, where the face is large enough for its detectors, or else in one of ``CONFIRM_CONTEXT_RETRY`` (and, for
        MTCNN's surest faces, one of ``CONFIRM_CONTEXT_TIGHT``): MTCNN's
        score and source with the box and keypoints of the MediaPipe face that overlaps it most (the framing
        the rest of the stage was measured with); None when MediaPipe finds no face there. The crops are
        zero-filled past the image edge, as MTCNN's are."""
        contexts = [CONFIRM_CONTEXT, CONFIRM_CONTEXT_RETRY]
        if det.score >= CONFIRM_TIGHT_MIN_SCORE:
            contexts.append(CONFIRM_CONTEXT_TIGHT)
        for context in contexts:
            found = self._confirmed_in(rgb, det, context)
            if found is not None:
                return found
        return None

    def _confirmed_in(self, rgb: np.ndarray, det: Detection, context: float) -> Detection | None:
        """:meth:`_confirmed` with a crop of ``context`` box sides."""
        x, y, w, h = det.bbox
        side = max(1, int(round(context * max(w, h))))
        x0, y0 = int(round(x + w / 2 - side / 2)), int(round(y + h / 2 - side / 2))
        ih, iw = rgb.shape[:2]
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(iw, x0 + side), min(ih, y0 + side)
        if sx1 <= sx0 or sy1 <= sy0:
            return None
        if side <= 2048:
            crop = np.zeros((side, side, 3), np.uint8)
            crop[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
            crop, s = _resize_max(crop, CONFIRM_SIDE)
        else:  # a huge face (a 3,000 px box makes a 12,000 px crop): downscale the part in the image, then pad
            import cv2

            s = CONFIRM_SIDE / side
            crop = np.zeros((CONFIRM_SIDE, CONFIRM_SIDE, 3), np.uint8)
            px0, py0 = int(round((sx0 - x0) * s)), int(round((sy0 - y0) * s))
            pw = max(1, min(CONFIRM_SIDE - px0, int(round((sx1 - sx0) * s))))
            ph = max(1, min(CONFIRM_SIDE - py0, int(round((sy1 - sy0) * s))))
            crop[py0: py0 + ph, px0: px0 + pw] = cv2.resize(np.ascontiguousarray(rgb[sy0:sy1, sx0:sx1]), (pw, ph),
                                                            interpolation=cv2.INTER_AREA)
        csize = crop.shape[0]
        best, best_iou = None, CONFIRM_IOU
        for d in self._detect_region(crop, 0, 0, csize, csize):
            if d.score < CONFIRM_MIN_SCORE:
                continue
            box = (d.bbox[0] / s + x0, d.bbox[1] / s + y0, d.bbox[2] / s, d.bbox[3] / s)
            iou = box_iou(box, det.bbox)
            if iou >= best_iou:
                best, best_iou = Detection(bbox=box, score=det.score, keypoints=d.keypoints / s + (x0, y0),
                                           source=det.source), iou
        return best

    def _mtcnn_detect(self, rgb: np.ndarray) -> list[Detection]:
        """MTCNN's faces in ``rgb`` (searched on a copy of at most ``MTCNN_MAX_SIDE`` px), in ``rgb``'s pixels."""
        if self._mtcnn is None:
            from cem.fer.mtcnn import MTCNN

            self._mtcnn = MTCNN(min_face=MTCNN_MIN_FACE, thresholds=(*MTCNN_THRESHOLDS, MTCNN_MIN_SCORE))
        small, s = _resize_max(rgb, MTCNN_MAX_SIDE)
        with torch_threads(self.torch_threads):
            boxes, scores, points = self._mtcnn.detect(np.ascontiguousarray(small))
        return [Detection(bbox=(float(b[0] / s), float(b[1] / s), float((b[2] - b[0]) / s), float((b[3] - b[1]) / s)),
                          score=float(sc), keypoints=p / s, source="mtcnn")
                for b, sc, p in zip(boxes, scores, points)]

    def close(self) -> None:
        for d in self._detectors:
            d.close()


# The face-landmark subgraph that MediaPipe's FaceMesh runs after its own face detector, fed with a region of
# interest (ROI) instead: cem has already detected the face, so running FaceMesh's detector a second time on
# every face would only repeat that work (it is about half of FaceMesh's time). "FaceLandmarkCpu" is
# registered in the 0.10.21 wheel; WITH_ATTENTION selects the refined model with irises (478 points).
_LANDMARK_GRAPH = """
input_stream: "IMAGE:image"
input_stream: "ROI:roi"
input_side_packet: "WITH_ATTENTION:with_attention"
output_stream: "LANDMARKS:face_landmarks"
node {
  calculator: "FaceLandmarkCpu"
  input_stream: "IMAGE:image"
  input_stream: "ROI:roi"
  input_side_packet: "WITH_ATTENTION:with_attention"
  output_stream: "LANDMARKS:face_landmarks"
}
"""
# MediaPipe's own detection-to-ROI rule (face_detection_front_detection_to_roi): the detection box squared
# on its long side and scaled by 1.5, rotated so the eyes lie level
ROI_SCALE = 1.5
# the square crop handed to the landmark graph, in detection-box sides: the rotated ROI (1.5 * sqrt 2 =
# 2.12 box sides at 45 degrees) fits inside it
MESH_CONTEXT = 2.2
# roll (degrees) of a mesh fitted without eye positions beyond which it is fitted again on a ROI rotated
# by that roll (video tracking boxes carry no eye positions)
REFIT_ROLL_DEG = 15.0


def _pixels(landmarks: Any, w: int, h: int) -> np.ndarray:
    """MediaPipe's normalised landmarks as (N, 3) pixels of a ``w`` x ``h`` image (z in x's scale)."""
    return np.array([[p.x * w, p.y * h, p.z * w] for p in landmarks.landmark], dtype=np.float64)


def roi_rotation(right_eye: np.ndarray | tuple[float, float], left_eye: np.ndarray | tuple[float, float]) -> float:
    """MediaPipe's ROI rotation (radians) from the two eye positions in pixels (detector keypoints 0 and 1,
    or the mesh's eye centres): 0 for level eyes."""
    angle = -np.arctan2(-(left_eye[1] - right_eye[1]), left_eye[0] - right_eye[0])
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


class FaceMesher:
    """478-point mesh (with irises) for one face at a time; landmarks returned in image pixels (x, y, z).

    :meth:`mesh_in_box` runs MediaPipe's face-landmark model directly on a face cem detected (a ROI rotated
    by the eyes, as FaceMesh itself builds it); the landmark model's face-presence flag drops ROIs that
    hold no face, and only then does the whole FaceMesh graph (its own detector, then the landmarks) look
    at the same crop. :meth:`mesh_whole` (a pre-cropped face) runs the whole FaceMesh graph on the padded
    crop.
    """

    def __init__(self, min_score: float = 0.3) -> None:
        from google.protobuf import text_format
        from mediapipe.framework import calculator_pb2
        from mediapipe.python.solution_base import SolutionBase

        self.min_score = min_score
        self._mesh: Any = None  # the whole FaceMesh graph: created on first mesh_whole
        config = text_format.Parse(_LANDMARK_GRAPH, calculator_pb2.CalculatorGraphConfig())
        with quiet_native_stderr():
            self._landmarks = SolutionBase(graph_config=config, side_inputs={"with_attention": True},
                                           outputs=["face_landmarks"])
            self._landmarks_in_roi(np.zeros((64, 64, 3), np.uint8), (32.0, 32.0), 32.0, 0.0)

    def _landmarks_in_roi(self, square: np.ndarray, center: tuple[float, float], side: float,
                          rotation: float) -> np.ndarray | None:
        """Landmarks (pixels of ``square``) of the face in the ROI of ``side`` px at ``center``, or None
        when the landmark model finds no face there."""
        from mediapipe.framework.formats import rect_pb2

        h, w = square.shape[:2]
        roi = rect_pb2.NormalizedRect(x_center=center[0] / w, y_center=center[1] / h, width=side / w,
                                      height=side / h, rotation=rotation)
        res = self._landmarks.process({"image": square, "roi": roi})
        if res.face_landmarks is None:
            return None
        return _pixels(res.face_landmarks, w, h)

    def mesh_in_box(self, rgb: np.ndarray, bbox: tuple[float, float, float, float],
                    eyes: tuple[np.ndarray, np.ndarray] | None = None, max_side: int = 384) -> np.ndarray | None:
        """Mesh of the face in ``bbox`` (x, y, w, h), or None when no face mesh fits there.

        ``eyes`` (the subject's right and left eye in pixels, e.g. the detector's keypoints 0 and 1) level
        the ROI as MediaPipe does; without them the ROI starts upright and is fitted once more, rotated,
        when the first mesh shows a roll beyond ``REFIT_ROLL_DEG``. The landmark model sees a square crop of
        ``MESH_CONTEXT`` box sides around the box (at most ``max_side`` px, padded at the frame's edge), so
        the cost does not grow with the image.
        """
        import cv2

        x, y, bw, bh = bbox
        side = max(bw, bh) * MESH_CONTEXT
        cx, cy = x + bw / 2, y + bh / 2
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        s = max(8, int(round(side)))
        h, w = rgb.shape[:2]
        crop = rgb[max(0, y0): min(h, y0 + s), max(0, x0): min(w, x0 + s)]
        if crop.size == 0:
            return None
        # shrink the part inside the frame first, then pad: the square never exceeds max_side, however
        # large the box (a huge box padded at full size could exceed OpenCV's and the memory's limits)
        scale = min(1.0, max_side / s)
        out_side = max(1, int(round(s * scale)))
        pad = [int(round(v * scale)) for v in (max(0, -y0), max(0, y0 + s - h), max(0, -x0), max(0, x0 + s - w))]
        inner = (max(1, out_side - pad[2] - pad[3]), max(1, out_side - pad[0] - pad[1]))
        if scale < 1.0 or (crop.shape[1], crop.shape[0]) != inner:
            crop = cv2.resize(crop, inner, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        if any(pad):
            crop = cv2.copyMakeBorder(crop, pad[0], pad[1], pad[2], pad[3], cv2.BORDER_CONSTANT, value=(0, 0, 0))
        square = np.ascontiguousarray(crop)
        k = square.shape[1] / s  # the square's actual scale (rounding included)
        center = ((cx - x0) * k, (cy - y0) * k)
        roi_side = ROI_SCALE * max(bw, bh) * k
        if eyes is not None:
            mesh = self._landmarks_in_roi(square, center, roi_side, roi_rotation(eyes[0] * 1.0, eyes[1] * 1.0))
        else:
            mesh = self._landmarks_in_roi(square, center, roi_side, 0.0)
            if mesh is not None:
                from cem.fer.geometry import eye_centers

                rotation = roi_rotation(*eye_centers(mesh))
                if abs(np.degrees(rotation)) > REFIT_ROLL_DEG:
                    refit = self._landmarks_in_roi(square, center, roi_side, rotation)
                    mesh = refit if refit is not None else mesh
        if mesh is None:
            # the detector's box or eyes can be off on weak detections (profiles, occlusion, blur): let
            # FaceMesh's own detector find the face in the same square, as cem did before the ROI path
            mesh = self._face_mesh_at_centre(square)
            if mesh is None:
                return None
        mesh[:, :3] /= k
        mesh[:, 0] += x0
        mesh[:, 1] += y0
        # the mesh must belong to this detection, not to a neighbour inside the crop
        mx, my = mesh[:, 0].mean(), mesh[:, 1].mean()
        if not (x - 0.25 * bw <= mx <= x + 1.25 * bw and y - 0.25 * bh <= my <= y + 1.25 * bh):
            return None
        return mesh

    def _face_mesh_at_centre(self, rgb: np.ndarray) -> np.ndarray | None:
        """The whole FaceMesh graph (its own detector, then the landmarks) on ``rgb``: the mesh nearest the
        image's centre in its pixels, or None."""
        if self._mesh is None:
            import mediapipe as mp

            with quiet_native_stderr():
                self._mesh = mp.solutions.face_mesh.FaceMesh(
                    static_image_mode=True, max_num_faces=2, refine_landmarks=True,
                    min_detection_confidence=self.min_score)
                self._mesh.process(np.zeros((64, 64, 3), np.uint8))
        res = self._mesh.process(rgb)
        h, w = rgb.shape[:2]
        meshes = [_pixels(face, w, h) for face in res.multi_face_landmarks or []]
        centre = np.array([w / 2, h / 2])
        return min(meshes, key=lambda m: float(np.linalg.norm(m[:, :2].mean(axis=0) - centre)), default=None)

    def mesh_whole(self, rgb: np.ndarray, target: int = 192, pad: float = 0.5) -> np.ndarray | None:
        """Mesh of a pre-cropped face filling the image: resized to ``target`` px, padded by edge replication
        (the mesh's own detector needs some margin around a tight crop)."""
        import cv2

        h, w = rgb.shape[:2]
        scale = target / max(h, w)
        img = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        p = int(round(target * pad))
        img = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_REPLICATE)
        best = self._face_mesh_at_centre(np.ascontiguousarray(img))
        if best is None:
            return None
        best[:, :2] -= p
        best /= scale
        return best

    def close(self) -> None:
        self._landmarks.close()
        if self._mesh is not None:
            self._mesh.close()
