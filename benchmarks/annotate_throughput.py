"""End-to-end `cem annotate` throughput and peak memory, with the rules reasoner.

Images: single-face photos of 256-512 px (the OASIS single-face photos when ../shared is present, else
the astronaut at eight sizes), repeated to N files on disk. Each run is a fresh ``cem annotate`` process
(so model loading counts), timed by wall clock; peak RSS is ``ru_maxrss`` of the children (the largest
single process: the main process, or one worker with ``--workers``). Memory must not grow with N.
Run: ``python benchmarks/annotate_throughput.py [--sizes 200 2000] [--workers 2] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit

sys.path.insert(0, str(Path(__file__).parent))
from fer_speed import sample_images  # noqa: E402


def run(n: int, workers: int, tmp: Path) -> dict:
    src = sample_images(n)
    folder = tmp / f"imgs_{n}"
    folder.mkdir()
    for i, p in enumerate(src):
        shutil.copy(p, folder / f"{i:05d}{Path(p).suffix}")
    out = tmp / f"out_{n}.jsonl"
    # a fresh wrapper process per run, so its RUSAGE_CHILDREN peak belongs to this run alone
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "cem.cli", "annotate", str(folder),
                        "-o", str(out), "--workers", str(workers)], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak_kb = int(r.stdout.strip().splitlines()[-1])
    return {"images": n, "workers": workers, "seconds": wall, "images_per_s": n / wall,
            "peak_rss_mb_largest_process": peak_kb / 1024, "records": sum(1 for _ in out.open())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cem-throughput-") as tmp:
        res = [run(n, a.workers, Path(tmp)) for n in a.sizes]
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
