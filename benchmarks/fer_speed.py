"""FER-stage throughput on single-face photos, against the bare MediaPipe calls on the same images.

Images: the single-face OASIS "Person" photos in ../shared/data/oasis_people (500x400) when present,
else crops of skimage's astronaut resized to 256..512 px, repeated to ``--n``. The cem timing includes
decoding (``Pipeline.analyze(path)``: load, EXIF, detect, mesh, pose, quality, AUs, expression CNN, rules
reasoner, fuse); from its per-stage timings the *geometric FER stage* (load, detection, mesh, crops, pose,
quality, AUs: everything but the CNN, the reasoner and fusion) is also reported. Bare MediaPipe, two ways,
on the decoded arrays: (1) exactly the MediaPipe calls cem makes (short- and full-range detection on the
image, FaceMesh on a crop around each detected face) and nothing else; (2) the minimal pair, short-range
detection + FaceMesh on the whole image. All in one process, after a warm-up.
Run: ``python benchmarks/fer_speed.py [--n 200] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import emit


def sample_images(n: int) -> list[str]:
    from PIL import Image

    from cem.datasets import shared_data_dir

    root = shared_data_dir()
    paths: list[str] = []
    if root is not None and (root / "oasis_people" / "images").is_dir():
        import mediapipe as mp

        det = mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)
        for p in sorted((root / "oasis_people" / "images").glob("*.jpg")):
            rgb = np.asarray(Image.open(p).convert("RGB"))
            if len(det.process(rgb).detections or []) == 1:
                paths.append(str(p))
        det.close()
    if not paths:
        from skimage import data

        tmp = Path(tempfile.mkdtemp(prefix="cem-bench-"))
        a = data.astronaut()
        for side in np.linspace(256, 512, 8).astype(int):
            p = tmp / f"astronaut_{side}.jpg"
            Image.fromarray(a).resize((side, side)).save(p, quality=92)
            paths.append(str(p))
    return [paths[i % len(paths)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    import mediapipe as mp

    import cem
    from cem.fer.detect import FaceDetector, FaceMesher
    from cem.io import load_image

    paths = sample_images(a.n)
    arrays = [load_image(p) for p in paths]
    pipe = cem.Pipeline.from_config("default")
    det = mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True)
    same_det = FaceDetector("both", 0.5)
    same_mesh = FaceMesher()
    for p, rgb in list(zip(paths, arrays))[:5]:  # warm-up
        pipe.analyze(p)
        det.process(rgb)
        mesh.process(rgb)
        for d in same_det.detect(rgb):
            same_mesh.mesh_in_box(rgb, d.bbox)

    t = time.perf_counter()
    for rgb in arrays:
        for d in same_det.detect(rgb):
            same_mesh.mesh_in_box(rgb, d.bbox)
    bare_same = time.perf_counter() - t

    t = time.perf_counter()
    for rgb in arrays:
        det.process(rgb)
        mesh.process(rgb)
    bare_min = time.perf_counter() - t

    t = time.perf_counter()
    stage_ms: dict[str, list[float]] = {}
    faces = 0
    for p in paths:
        r = pipe.analyze(p)
        faces += len(r.faces)
        for k, v in r.provenance.timings_ms.items():
            stage_ms.setdefault(k, []).append(v)
    full = time.perf_counter() - t
    geometric = (sum(stage_ms["load"]) + sum(stage_ms["fer"]) - sum(stage_ms.get("fer_expression", [0]))) / 1000

    res = {
        "images": len(paths), "distinct_images": len(set(paths)), "faces": faces,
        "image_sizes": sorted({f"{x.shape[1]}x{x.shape[0]}" for x in arrays}),
        "cem_pipeline_images_per_s": len(paths) / full,
        "cem_geometric_fer_stage_images_per_s": len(paths) / geometric,
        "bare_same_mediapipe_calls_images_per_s": len(paths) / bare_same,
        "bare_minimal_mediapipe_images_per_s": len(paths) / bare_min,
        "ratio_geometric_stage_to_same_calls": geometric / bare_same,
        "ratio_pipeline_to_same_calls": full / bare_same,
        "ratio_geometric_stage_to_minimal": geometric / bare_min,
        "median_ms": {k: float(np.median(v)) for k, v in stage_ms.items()},
    }
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
