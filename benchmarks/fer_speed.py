"""FER-stage throughput on single-face photos, idle and beside a competing CPU-bound process, against bare
MediaPipe detection + mesh on the same images in the same run.

Images: 256-512 px single-face photos: the OASIS "Person" photos of ../shared/data/oasis_people (500x400)
on which MediaPipe's short-range detector finds exactly one face, and the tcce_dev photos (256x341),
alternated; without the shared data, the astronaut resized to 256..512 px. Decoded once, before timing.

Measured per condition (``idle``; ``busy`` = one ``while True: pass`` process that this script starts and
stops itself), each ``--repeat`` times in rotation, median reported:
- ``fer_stage[threads=N]``: ``FERStage.measure`` (detection, mesh, pose, quality, AUs, expression CNN) with
  ``expression.threads = N`` (0 = torch's own default, one thread per core);
- ``bare_mediapipe``: MediaPipe short-range face detection + FaceMesh (refined, 1 face) on the whole image,
  nothing else: the minimal pair that any MediaPipe-based FER tool runs;
- ``ratio`` = bare images/s / FER stage images/s (the issue's target: <= 2.5).
Run: ``nice -n 0 python benchmarks/fer_speed.py [--n 120] [--repeat 3] [--json OUT]``. The numbers depend on
what else the machine runs: report them with the date and the machine's state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
from _common import emit


def sample_images(n: int) -> tuple[list[np.ndarray], list[str]]:
    """Up to ``n`` decoded single-face photos (alternating sources) and their names."""
    from PIL import Image

    from cem.datasets import shared_data_dir

    root = shared_data_dir()
    sources: list[list[str]] = []
    if root is not None:
        import mediapipe as mp

        oasis = sorted((root / "oasis_people" / "images").glob("*.jpg"))
        det = mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)
        single = [str(p) for p in oasis if len(det.process(np.asarray(Image.open(p).convert("RGB"))).detections
                                                or []) == 1]
        det.close()
        sources = [s for s in (single, sorted(str(p) for p in (root / "tcce_dev" / "images").glob("*.jpg"))) if s]
    if not sources:
        from skimage import data

        a = data.astronaut()
        arrays = [np.asarray(Image.fromarray(a).resize((int(s), int(s)))) for s in np.linspace(256, 512, 8)]
        return [arrays[i % len(arrays)] for i in range(n)], ["astronaut"] * n
    paths = [sources[i % len(sources)][(i // len(sources)) % len(sources[i % len(sources)])] for i in range(n)]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths], paths


def _rate(fn: Callable[[np.ndarray], object], images: list[np.ndarray]) -> float:
    t = time.perf_counter()
    for rgb in images:
        fn(rgb)
    return len(images) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120, help="images per timed pass")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="1,0", help="expression.threads values to compare")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")  # a benchmark process of its own: quiet MediaPipe's logs
    import mediapipe as mp

    from cem.config import Config
    from cem.fer.stage import FERStage

    images, names = sample_images(a.n)
    stages = {int(t): FERStage(Config.load("default", expression__threads=int(t))) for t in a.threads.split(",")}
    det = mp.solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True)

    def bare(rgb: np.ndarray) -> None:
        det.process(rgb)
        mesh.process(rgb)

    runs: dict[str, Callable[[np.ndarray], object]] = {"bare_mediapipe": bare}
    for t, st in stages.items():
        runs[f"fer_stage[threads={t}]"] = st.measure
    for fn in runs.values():  # warm-up
        for rgb in images[:5]:
            fn(rgb)
    faces = [len(next(iter(stages.values())).measure(rgb)) for rgb in images]

    result: dict[str, object] = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(), "images": len(images), "distinct_images": len(set(names)),
        "faces_found": sum(faces), "image_sizes": sorted({f"{x.shape[1]}x{x.shape[0]}" for x in images}),
    }
    for condition in ("idle", "busy"):
        hog = None
        if condition == "busy":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        try:
            rates: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(a.repeat):
                for k, fn in runs.items():
                    rates[k].append(_rate(fn, images))
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        med = {k: statistics.median(v) for k, v in rates.items()}
        result[condition] = {
            "images_per_s": {k: round(v, 1) for k, v in med.items()},
            "all_runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "ratio_bare_to_fer_stage": {k: round(med["bare_mediapipe"] / v, 2) for k, v in med.items()
                                        if k != "bare_mediapipe"},
        }
    for st in stages.values():
        st.close()
    det.close()
    mesh.close()
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
