"""Throughput of the local runner and the Ray engine on the same images (issue: scale out on Ray).

Images: the OASIS "people" photos (500x400, ../shared/data/oasis_people/images) repeated up to ``--n``
images (symlinks with distinct names in a temp folder; nothing is copied into the repo). Modes, each a
``cem annotate`` run in its own process with the default (rules) config:

- ``local-1``: one process; ``local-w2``: ``--workers 2``;
- ``ray-1`` / ``ray-2``: ``--engine ray --fer-actors 1|2`` against a local Ray runtime this script starts
  once (2 CPUs), as a user joins a running cluster with ``--address``.

Every mode also runs on ``--warm`` images; steady-state images/s = (n - warm) / (t_n - t_warm), which takes
out process start, model loading, worker spawn and actor start. Ray's overhead per image is
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


def _run(folder: Path, out: Path, args: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cem.cli", "annotate", str(folder), "-o", str(out), *args],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"cem annotate {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="images per timed run")
    ap.add_argument("--warm", type=int, default=40, help="images of the start-up run subtracted")
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
                              "n": a.n, "warm": a.warm, "cpus": os.cpu_count(), "date": time.strftime(
                                  "%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg(),
                              "modes": {}}
    try:
        sets = {k: _image_set(tmp, k, oasis) for k in (a.warm, a.n)}
        if any(m.startswith("ray") for m in chosen):
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp / "ray"), log_to_driver=False)
            address = ray.get_runtime_context().gcs_address
            for m in chosen:
                if m.startswith("ray"):
                    modes[m] += ["--address", address]
        for m in chosen:
            with _ActorMemory() as mem:
                t_warm = _run(sets[a.warm], tmp / f"{m}-w.jsonl", modes[m], env)
                t_n = _run(sets[a.n], tmp / f"{m}-n.jsonl", modes[m], env)
            ips = (a.n - a.warm) / max(t_n - t_warm, 1e-9)
            entry: dict[str, Any] = {"wall_s": round(t_n, 1), "startup_run_s": round(t_warm, 1),
                                     "images_per_s_end_to_end": round(a.n / t_n, 2),
                                     "images_per_s_steady": round(ips, 2)}
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
