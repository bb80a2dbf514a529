"""Do rationales explain the answer? The share of faces whose rationale names the face's final top_emotion.

Protocol: the default config (rules reasoner, fitted fusion). Data (read from ``../shared/data``, never
copied): FER+ ``ferplus/valid.npz`` faces with at least 5 emotion votes (cem.datasets), each 48x48 face
through ``faces="whole"``; and every image of ``tcce_dev/images`` with detected faces. Per face: the
rationale names ``top_emotion`` (as a word, case-insensitive; target 100%); for a blend (the second label
has at least ``cem.fuse.BLEND_RATIO`` of the top one's mass) whether it names both; how often the
reasoner's own top label differs from the fused one (the rationale then says why).

Run: ``nice python benchmarks/rationale_consistency.py [--limit N] [--json OUT]`` (``--limit`` takes the
first N faces of FER+ and the first N images of tcce_dev). Without ``../shared/data`` it says so and exits 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import emit


def _names(text: str, label: str) -> bool:
    return re.search(rf"\b{re.escape(label)}\b", text, re.I) is not None


def score(results: list[Any], blend_ratio: float) -> dict[str, Any]:
    """Counts over the faces of ``results`` (ImageResult objects)."""
    n = names_top = blends = names_both = differs = 0
    for r in results:
        for f in r.faces:
            n += 1
            ranked = sorted(f.emotion, key=lambda k: -f.emotion[k])
            top = f.top_emotion
            names_top += _names(f.rationale, top)
            if len(ranked) > 1 and f.emotion[ranked[1]] >= blend_ratio * f.emotion[top]:
                blends += 1
                names_both += _names(f.rationale, top) and _names(f.rationale, ranked[1])
            differs += "alone favoured" in f.rationale
    return {"faces": n, "rationale_names_top": names_top / n if n else None,
            "blends": blends, "blends_name_both": names_both / blends if blends else None,
            "reasoner_top_differs_from_final": differs / n if n else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N FER+ faces and first N tcce_dev images")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import cem
    from cem.datasets import load_ferplus, shared_data_dir
    from cem.fuse import BLEND_RATIO

    root = shared_data_dir()
    if root is None:
        print("rationale_consistency: ../shared/data not found (set CEM_DATA_DIR); nothing measured", file=sys.stderr)
        return 0
    out: dict[str, Any] = {"config": "default", "blend_ratio": BLEND_RATIO, "limit": a.limit}
    with cem.Pipeline.from_config("default") as pipe:
        fer = load_ferplus("valid", root)
        faces = [np.repeat(px[:, :, None], 3, axis=2) for px in fer.pixels[: a.limit]]
        res = list(pipe.analyze_many(faces, faces="whole"))
        out["ferplus_valid_whole"] = score(res, BLEND_RATIO)
        images = sorted((Path(root) / "tcce_dev" / "images").glob("*.jpg"))[: a.limit]
        if images:
            res = list(pipe.analyze_many([str(p) for p in images]))
            out["tcce_dev_detected"] = {"images": len(images), **score(res, BLEND_RATIO)}
    return emit(out, a.json)


if __name__ == "__main__":
    sys.exit(main())
