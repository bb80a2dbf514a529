"""The FER stage: faces -> mesh -> pose -> quality -> action units -> expression distribution.

Models (detector, mesh, expression CNN) are created once per :class:`FERStage` and reused for every
image; the expression CNN sees all faces of an image in one batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from cem.config import Config, check_faces_mode, check_label_overlap
from cem.contract import FaceEvidence, Pose
from cem.fer.aus import MEDIAN_MIN_PHOTOS, SubjectBaseline, TooFewPhotosError, estimate_aus
from cem.fer.detect import MTCNN_MIN_SCORE_UNMESHED
from cem.fer.expression import CROP_SIZE, ExpressionModel, mean_log_probs
from cem.fer.geometry import aligned_crop, eye_centers, frontalize, load_reference, pose_from_rotation
from cem.fer.quality import assess
from cem.fer.threads import torch_threads


def _position(cx: float, width: int) -> str:
    r = cx / max(1, width)
    return "left" if r < 1 / 3 else "right" if r > 2 / 3 else "center"


def mesh_extent(mesh: np.ndarray) -> float:
    """The larger side of a face mesh's bounding box, in pixels: its scale, for boxes on tracked frames."""
    return float(max(np.ptp(mesh[:, 0]), np.ptp(mesh[:, 1])))


def _box_from_mesh(tight: tuple[float, float, float, float], previous: tuple[float, float, float, float],
                   previous_extent: float | None = None) -> tuple[float, float, float, float]:
    """A detector-like square box centred on the mesh. With ``previous_extent`` (the mesh extent on the frame
    that gave ``previous``) it is the previous box scaled as the mesh scaled, so a still face keeps its box;
    without, the previous size is pulled towards 0.85 mesh extents (which, for a face whose detector box is
    not 0.85 of its mesh, shrank or grew the box frame after frame until the next detection)."""
    cx, cy = tight[0] + tight[2] / 2, tight[1] + tight[3] / 2
    extent = max(tight[2], tight[3])
    if previous_extent is not None and previous_extent > 0 and extent > 0:
        side = previous[2] * extent / previous_extent
    else:
        side = 0.5 * previous[2] + 0.5 * extent * 0.85
    return (cx - side / 2, cy - side / 2, side, side)


class FERStage:
    """Measures every face of an RGB image. ``faces="whole"`` treats the image as one pre-cropped face."""

    def __init__(self, config: Config) -> None:
        from cem.fer.detect import FaceDetector, FaceMesher

        threads = config.expression.threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"expression.threads must be a whole number >= 0 (0 = torch's own setting), "
                             f"not {threads!r}")
        self.config = config
        # MediaPipe's graphs take one image at a time: two threads measuring with one stage broke its graphs for
        # good (every later image an error); measure holds this lock (reentrant: a caller that also reads
        # last_timings and last_faces_skipped holds it around both)
        self.lock = threading.RLock()
        self.last_timings: dict[str, float] = {}
        # faces detected beyond faces.max_faces in the last image, not measured (provenance.faces_skipped)
        self.last_faces_skipped = 0
        self.ref = load_reference()
        self.detector: Any = None  # created on first use: --faces whole never needs it
        self._make_detector = lambda: FaceDetector(config.faces.detector, config.faces.min_score,
                                                   pad_retry=config.faces.pad_retry,
                                                   small_faces=config.faces.small_faces,
                                                   torch_threads=config.expression.threads)
        self.mesher: Any = FaceMesher()  # None once closed: the next image loads it again
        self.expression = ExpressionModel.from_pretrained(config.expression.weights, config.expression.device,
                                                          config.expression.test_time_flip)
        # the expression model's labels are fixed by its training; configured labels it lacks get 0 and are
        # pooled through fusion.label_map (cem.fuse.expression_over), so they are not an error here
        check_label_overlap(config.labels, list(self.expression.labels),
                            f"{config.source}: expression.weights {config.expression.weights}")
        unmapped = [k for k in config.labels if k not in self.expression.labels and k not in config.fusion.label_map]
        if unmapped:
            logging.getLogger(__name__).warning(
                "labels %s are not the expression model's and fusion.label_map does not map them: their expression "
                "probability is 0, so the fused emotion will rarely be one of them", unmapped)

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def baseline(self, images: Iterable[np.ndarray], faces: str | None = None,
                 neutral: bool = False) -> SubjectBaseline:
        """A subject's own reference from RGB photos of that one person: their neutral photo(s) (best;
        ``neutral=True``) or several of their photos (the median; weaker). The largest face of each image
        counts (``faces`` of the result: how many did); images where no face mesh fits are skipped, and none
        fitting at all is an error, as is a median of fewer than :data:`cem.fer.aus.MEDIAN_MIN_PHOTOS` faces.
        ``images`` may be a generator: each is measured and dropped in turn.

        AUs are then measured against it. With ``neutral=True`` the expression distribution is too
        (:meth:`ExpressionModel.relative_to`), provided the model has a neutral reference and every one of its
        labels is among the configured labels; a median of unlabelled photos is no neutral face, so it
        leaves expressions alone."""
        return self.baseline_from_faces((self.measure(rgb, faces) for rgb in images), neutral)

    def baseline_from_faces(self, measured: Iterable[list[FaceEvidence]], neutral: bool = False) -> SubjectBaseline:
        """:meth:`baseline` from photos already measured (without a baseline): one list of faces per photo,
        as :meth:`measure` gives them. The largest face with a mesh of each photo counts."""
        meshes, neutral_probs = [], []
        model_labels = self.expression.labels
        relative = (neutral and self.expression.neutral_reference is not None
                    and set(model_labels) <= set(self.labels))
        seen = 0
        for photo in measured:
            seen += 1
            found = [f for f in photo if f.landmarks is not None]
            if found:
                face = max(found, key=lambda f: f.bbox[2] * f.bbox[3])
                meshes.append(face.landmarks)
                if relative:
                    neutral_probs.append([face.expression[k] for k in model_labels])
        if not meshes:
            raise ValueError(f"no face mesh fits in any of the {seen} baseline image(s) of the subject")
        if not neutral and len(meshes) < MEDIAN_MIN_PHOTOS:
            raise TooFewPhotosError(f"a median baseline needs at least {MEDIAN_MIN_PHOTOS} photos with a face of the "
                             f"subject, and {len(meshes)} of {seen} have one: with fewer, each photo weighs too much "
                             f"in its own reference (one photo would be measured against itself); flag a neutral "
                             f"photo of the subject instead")
        base = SubjectBaseline.from_meshes(meshes, self.ref, neutral=neutral)
        if relative:
            base = replace(base, expression_log_probs=mean_log_probs(neutral_probs))
        return base

    def measure(self, rgb: np.ndarray, faces: str | None = None,
                boxes: list[tuple[tuple[float, float, float, float], float]] | None = None,
                baseline: SubjectBaseline | None = None,
                box_extents: list[float | None] | None = None) -> list[FaceEvidence]:
        """Faces of one RGB image. ``boxes`` ((x, y, w, h), score) skips detection and meshes those boxes
        (video tracking); a box on which no mesh fits is dropped, since the tracker will re-detect.
        ``box_extents``: for each box, the :func:`mesh_extent` of the face it was measured on (the box then
        follows the mesh's scale; see ``_box_from_mesh``).
        ``baseline`` (from :meth:`baseline`): AUs, and expressions where it was built from neutral photos, are
        measured against that person's own neutral face (use it for images of one subject: every face of the
        image is measured against it)."""
        with self.lock:
            return self._measure(rgb, faces, boxes, baseline, box_extents)

    def _measure(self, rgb: np.ndarray, faces: str | None,
                 boxes: list[tuple[tuple[float, float, float, float], float]] | None,
                 baseline: SubjectBaseline | None, box_extents: list[float | None] | None) -> list[FaceEvidence]:
        import cv2

        if self.mesher is None:  # closed (Pipeline.close from another thread, or a notebook): load it again
            from cem.fer.detect import FaceMesher

            self.mesher = FaceMesher()

        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 \
                or 0 in rgb.shape:
            raise ValueError("FERStage.measure takes an RGB uint8 array of shape (H, W, 3), not "
                             + (f"an array of shape {rgb.shape} and dtype {rgb.dtype}" if isinstance(rgb, np.ndarray)
                                else type(rgb).__name__) + " (cem.io.load_image converts paths and other images)")
        mode = check_faces_mode(faces) or self.config.faces.mode
        t0 = time.perf_counter()
        skipped = 0
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        items: list[tuple[tuple[float, float, float, float], float, np.ndarray | None, np.ndarray]] = []
        if mode == "whole":
            mesh = self.mesher.mesh_whole(rgb)
            if mesh is not None and min(h, w) > CROP_SIZE:
                # the crop detect mode makes (eyes level, where FER2013 has them): the whole picture squeezed
                # to 48x48 lost its aspect ratio, and a loose or 3:4 crop flipped the top emotion on 6 of 37
                # tcce_dev faces against detect mode
                crop = aligned_crop(gray, *eye_centers(mesh), self.ref, CROP_SIZE)
            else:
                # a crop at the CNN's own size (FER-style 48x48) is its input as it is: warping it to move
                # the eyes blurs it (FER+ valid accuracy 0.858 -> 0.852 aligned); without a mesh, the central
                # square, so that a face is not squeezed out of its proportions
                side = min(h, w)
                y0, x0 = (h - side) // 2, (w - side) // 2
                crop = cv2.resize(gray[y0: y0 + side, x0: x0 + side], (CROP_SIZE, CROP_SIZE),
                                  interpolation=cv2.INTER_AREA if side > CROP_SIZE else cv2.INTER_LINEAR)
            items.append(((0.0, 0.0, float(w), float(h)), 1.0, mesh, crop))
        elif boxes is not None:
            if box_extents is not None and len(box_extents) != len(boxes):
                raise ValueError(f"{len(boxes)} boxes but {len(box_extents)} box_extents")
            for k, (bbox, score) in enumerate(boxes):
                mesh = self.mesher.mesh_in_box(rgb, bbox)
                if mesh is None:
                    continue
                r_eye, l_eye = eye_centers(mesh)
                x0, y0 = mesh[:, 0].min(), mesh[:, 1].min()
                tight = (float(x0), float(y0), float(mesh[:, 0].max() - x0), float(mesh[:, 1].max() - y0))
                extent = None if box_extents is None else box_extents[k]
                items.append((_box_from_mesh(tight, bbox, extent), score, mesh,
                              aligned_crop(gray, r_eye, l_eye, self.ref, CROP_SIZE)))
        else:
            if self.detector is None:
                self.detector = self._make_detector()
            found = self.detector.detect(rgb)
            # beyond faces.max_faces the largest faces are measured (the nearest people, the clearest
            # evidence), then reported left to right as always; how many were left out is kept for the record
            by_size = sorted(found, key=lambda d: -d.bbox[2] * d.bbox[3])
            for k, det in enumerate(by_size):
                if len(items) >= self.config.faces.max_faces:
                    skipped = len(by_size) - k
                    break
                mesh = self.mesher.mesh_in_box(rgb, det.bbox, det.eyes)
                # a weak detection on which no face mesh fits is a false positive, not a face; MTCNN's scores
                # run higher (0.71-0.87 on patterned background), so its unmeshed faces need a higher bar
                unmeshed_bar = (MTCNN_MIN_SCORE_UNMESHED if det.source == "mtcnn"
                                else self.config.faces.min_score_unmeshed)
                if mesh is None and det.score < unmeshed_bar:
                    continue
                if mesh is not None:
                    r_eye, l_eye = eye_centers(mesh)
                else:  # detector keypoints 0/1 are the subject's right/left eye
                    r_eye, l_eye = det.eyes
                items.append((det.bbox, det.score, mesh, aligned_crop(gray, r_eye, l_eye, self.ref, CROP_SIZE)))
            items.sort(key=lambda item: item[0][0] + item[0][2] / 2)

        t1 = time.perf_counter()
        if items:
            with torch_threads(self.config.expression.threads):
                probs = self.expression.predict(np.stack([c for *_, c in items]))
            if baseline is not None and baseline.expression_log_probs is not None:
                probs = self.expression.relative_to(probs, baseline.expression_log_probs)
        else:
            probs = np.zeros((0, 0))
        t2 = time.perf_counter()
        label_index = {lab: i for i, lab in enumerate(self.expression.labels)}
        out = []
        for i, (bbox, score, mesh, _) in enumerate(items):
            pose = None
            aus = {}
            if mesh is not None:
                front, rot = frontalize(mesh, self.ref)  # once: pose and AUs share the alignment
                pose = Pose(*pose_from_rotation(rot))
                aus = estimate_aus(mesh, self.ref, front, baseline)
            quality = assess(gray, bbox, pose, self.config.faces.min_face_px, mesh_failed=mesh is None)
            # a configured label the CNN lacks gets 0 (fusion.label_map gives it a mapped label's share)
            p = np.array([probs[i, label_index[lab]] if lab in label_index else 0.0 for lab in self.labels])
            p = p / p.sum() if p.sum() > 0 else p
            out.append(FaceEvidence(
                index=i, bbox=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])),
                detection_score=float(score), pose=pose,
                quality=quality, aus=aus, expression=dict(zip(self.labels, p.tolist())), landmarks=mesh,
                position=_position(bbox[0] + bbox[2] / 2, w),
            ))
        t3 = time.perf_counter()
        # where the time went (ms): faces = detection + mesh + crops; expression = the CNN; geometry = pose,
        # quality and AUs
        self.last_faces_skipped = skipped
        self.last_timings = {"fer_faces": (t1 - t0) * 1000, "fer_expression": (t2 - t1) * 1000,
                             "fer_geometry": (t3 - t2) * 1000}
        return out

    def against(self, faces: list[FaceEvidence], baseline: SubjectBaseline) -> list[FaceEvidence]:
        """Faces measured by :meth:`measure` without a baseline, re-measured against a *median* baseline
        (``baseline.neutral`` False): only the AUs depend on it, so they are recomputed from each face's mesh
        instead of measuring the photo again. A neutral baseline also changes expressions: use
        ``measure(..., baseline=...)``."""
        if baseline.neutral:
            raise ValueError("FERStage.against takes a median baseline; measure against neutral photos with "
                             "FERStage.measure(rgb, baseline=...)")
        return [replace(f, aus=estimate_aus(f.landmarks, self.ref, baseline=baseline)) if f.landmarks is not None
                else f for f in faces]

    def close(self) -> None:
        """Release MediaPipe's graphs; a later :meth:`measure` loads them again (an image being measured in
        another thread finishes first)."""
        with self.lock:
            if self.detector is not None:
                self.detector.close()
                self.detector = None
            if self.mesher is not None:
                self.mesher.close()
                self.mesher = None
