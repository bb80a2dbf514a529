"""Reasoning-stage cost: images/s with and without batching, the stage's own overhead outside the model
call, and prompt/generated tokens, for the tiny random LLaVA (default) or any model you pass.

Images: the astronaut and its mirror image, alternating, ``--n`` of them; one face each. "Unbatched":
``Pipeline.analyze`` per image; "batched": ``Pipeline.analyze_many(batch_size=B)``. Numbers for the tiny
model measure plumbing, not a real model's speed. Run:
``python benchmarks/reasoning_speed.py [--model PATH_OR_ID] [--n 8] [--batch 4] [--json OUT]``.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--config", default="default")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    from skimage import data

    import cem
    from cem.testing import build_tiny_llava

    model = a.model or str(build_tiny_llava(Path(tempfile.mkdtemp(prefix="cem-tiny-"))))
    pipe = cem.Pipeline.from_config(a.config, reasoner="transformers", model=model)
    img = data.astronaut()
    images = [img if i % 2 == 0 else np.ascontiguousarray(img[:, ::-1]) for i in range(a.n)]
    pipe.analyze(images[0])  # warm-up
    t = time.perf_counter()
    single = [pipe.analyze(im) for im in images]
    t_single = time.perf_counter() - t
    t = time.perf_counter()
    batched = list(pipe.analyze_many(images, batch_size=a.batch))
    t_batched = time.perf_counter() - t

    def med(results, key):
        vals = [r.provenance.timings_ms.get(key) for r in results if key in r.provenance.timings_ms]
        return float(np.median(vals)) if vals else None

    res = {"model": a.model or "tiny random LLaVA (cem.testing)", "images": a.n, "batch": a.batch,
           "images_per_s_unbatched": a.n / t_single, "images_per_s_batched": a.n / t_batched,
           "median_reason_overhead_ms": med(single, "reason_overhead"),
           "median_prompt_tokens": med(single, "prompt_tokens"),
           "median_generated_tokens": med(single, "generated_tokens"),
           "median_fer_ms": med(single, "fer"), "faces": sum(len(r.faces) for r in batched)}
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
