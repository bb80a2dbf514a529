"""Throughput of the local runner and the Ray engine on the same images (issue: scale out on Ray).

Images: the OASIS "people" photos (500x400, ../shared/data/oasis_people/images) repeated up to ``--n``
images (symlinks with distinct names in a temp folder; nothing is copied into the repo). Modes, each a
``cem annotate`` run in its own process with the default (rules) config:

- ``local-1``: one process; ``local-w2``: ``--workers 2``;
- ``ray-1`` / ``ray-2``: ``--engine ray --fer-actors 1|2`` against a local Ray runtime this script starts
  once (2 CPUs), as a user joins a running cluster with ``--address``.

Steady-state images/s comes from the output as it grows (records written, polled every 0.25 s): the rate
between 10% and 90% of the images done, which leaves out process start, model loading, worker spawn and
actor start (reported apart as the time to the first 10%). Ray's overhead per image is
1/ips(ray-1) - 1/ips(local-1). Memory per actor is the largest RSS seen for each Ray FER actor process.

    nice -n 10 python benchmarks/ray_scaling.py --n 2000 --json ray_scaling.json
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import emit


def _image_set(root: Path, n: int, oasis: Path) -> Path:
    photos = sorted(oasis.glob("*.jpg"))
    folder = root / f"set{n}"
    folder.mkdir()
    for i in range(n):
        (folder / f"i{i:05d}.jpg").symlink_to(photos[i % len(photos)].resolve())
    return folder


class _ActorMemory:
    """Largest RSS seen per Ray FER actor process while a run goes on."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "FERActor" in cmd and p.info["memory_info"] is not None:
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.info["memory_info"].rss)
            self._stop.wait(0.5)

    def __enter__(self) -> _ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _count_records(out: Path) -> int:
    """Records written so far: the local runner's JSONL, or the Ray engine's shards beside it."""
    files = [out] if out.is_file() else []
    shards = out.with_suffix("")
    if shards.is_dir():
        files += list(shards.glob("part-*.jsonl"))
    n = 0
    for f in files:
        try:
            n += f.read_bytes().count(b"\n")
        except FileNotFoundError:
            continue
    return n


def _run(folder: Path, out: Path, args: list[str], env: dict[str, str], n: int) -> dict[str, float]:
    """One ``cem annotate`` run; returns wall time, time to 10% of the records, and the 10%-90% rate."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cem.cli", "annotate", str(folder), "-o", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    marks: list[tuple[float, int]] = []
    while proc.poll() is None:
        marks.append((time.perf_counter() - t0, _count_records(out)))
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"cem annotate {' '.join(args)} failed:\n{err[-3000:]}")
    lo, hi = 0.1 * n, 0.9 * n
    t_lo = next((t for t, c in marks if c >= lo), wall)
    t_hi, c_hi = next(((t, c) for t, c in marks if c >= hi), (wall, n))
    c_lo = next((c for t, c in marks if c >= lo), 0)
    return {"wall_s": wall, "to_10pct_s": t_lo, "steady_ips": (c_hi - c_lo) / max(t_hi - t_lo, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="images per timed run")
    ap.add_argument("--modes", default="local-1,local-w2,ray-1,ray-2")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    from cem.datasets import shared_data_dir

    data = shared_data_dir()
    oasis = data / "oasis_people" / "images" if data else None
    if oasis is None or not oasis.is_dir():
        print("skipped: ../shared/data/oasis_people not found", file=sys.stderr)
        return 0
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "GLOG_minloglevel": "2"}
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # before Ray reads its config
    import ray

    modes = {"local-1": [], "local-w2": ["--workers", "2"], "ray-1": ["--engine", "ray", "--fer-actors", "1"],
             "ray-2": ["--engine", "ray", "--fer-actors", "2"]}
    chosen = [m for m in a.modes.split(",") if m]
    tmp = Path(tempfile.mkdtemp(prefix="cemrs", dir="/tmp"))
    result: dict[str, Any] = {"data": f"oasis_people photos (500x400) repeated to {a.n} images",
                              "n": a.n, "cpus": os.cpu_count(), "date": time.strftime(
                                  "%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg(),
                              "modes": {}}
    try:
        sets = {a.n: _image_set(tmp, a.n, oasis)}
        if any(m.startswith("ray") for m in chosen):
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp / "ray"), log_to_driver=False)
            address = ray.get_runtime_context().gcs_address
            for m in chosen:
                if m.startswith("ray"):
                    modes[m] += ["--address", address]
        for m in chosen:
            with _ActorMemory() as mem:
                r = _run(sets[a.n], tmp / f"{m}.jsonl", modes[m], env, a.n)
            entry: dict[str, Any] = {"wall_s": round(r["wall_s"], 1), "start_to_10pct_s": round(r["to_10pct_s"], 1),
                                     "images_per_s_end_to_end": round(a.n / r["wall_s"], 2),
                                     "images_per_s_steady": round(r["steady_ips"], 2)}
            if mem.peak:
                entry["actor_rss_mib_max"] = round(max(mem.peak.values()) / 2**20)
            result["modes"][m] = entry
            print(m, entry, file=sys.stderr)
        got = result["modes"]
        if "ray-1" in got and "local-1" in got:
            result["ray_overhead_ms_per_image"] = round(
                1000 / got["ray-1"]["images_per_s_steady"] - 1000 / got["local-1"]["images_per_s_steady"], 2)
        if "ray-2" in got and "local-w2" in got:
            result["ray2_vs_workers2"] = round(got["ray-2"]["images_per_s_steady"]
                                               / got["local-w2"]["images_per_s_steady"], 3)
        result["load_avg_end"] = os.getloadavg()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
