"""FER-stage speed on video: frames per second, every frame processed, decode included.

Video: ``--video PATH``, or a synthetic 640x360, 30 fps clip of ``--frames`` frames (default 600, 20 s)
in which the astronaut's face (about 70 px) drifts across the frame. Measured: wall time of
``Pipeline.analyze_video`` from opening the file to the last frame (decode, tracking, mesh, pose, AUs,
expression CNN, smoothing), with key-moment reasoning off (``--reason`` turns the rules reasoner on).
Run: ``python benchmarks/video_speed.py [--frames 600] [--json OUT]``.
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


def synthetic_video(path: Path, n: int) -> Path:
    import cv2
    from skimage import data

    face = cv2.resize(np.ascontiguousarray(data.astronaut()[30:270, 110:350]), (170, 170))
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 360))
    for i in range(n):
        c = np.full((360, 640, 3), 150, np.uint8)
        x = 40 + int(200 + 180 * np.sin(i / 40))
        c[90:260, x : x + 170] = face
        vw.write(cv2.cvtColor(c, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--reason", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    import cem
    from cem.video import VideoOptions

    path = Path(a.video) if a.video else synthetic_video(Path(tempfile.mkdtemp()) / "clip.mp4", a.frames)
    pipe = cem.Pipeline.from_config("default")
    list(pipe.analyze_video(path, options=VideoOptions(reason=False), every=50))  # warm-up
    t = time.perf_counter()
    n, faces, moments = 0, 0, 0
    for vf in pipe.analyze_video(path, options=VideoOptions(reason=a.reason)):
        n += 1
        faces += len(vf.faces)
        moments += len(vf.moments)
    wall = time.perf_counter() - t
    res = {"video": str(path) if a.video else f"synthetic 640x360, {a.frames} frames at 30 fps",
           "frames": n, "faces": faces, "key_moments": moments, "seconds": wall, "frames_per_s": n / wall,
           "reasoning": "rules on key moments" if a.reason else "off"}
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
