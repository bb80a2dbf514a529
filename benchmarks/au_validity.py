"""AU validity on FER+ valid: ROC AUC of each EMFACS prototype AU's intensity, emotion vs neutral faces.

Protocol: every face of ``../shared/data/ferplus/valid.npz`` (poor faces dropped, see cem.datasets) goes
through the same path as ``cem annotate --faces whole`` (mesh on the upscaled, padded 48x48 crop,
frontalisation, AU estimation). Positives: faces whose plurality vote (ties excluded) is the emotion;
negatives: faces with a neutral majority (>= 6 of 10 votes). Faces whose mesh fails are counted and
left out. Run: ``python benchmarks/au_validity.py [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

PAIRS = {
    "happiness": ["AU06", "AU12"],
    "surprise": ["AU01", "AU02", "AU05", "AU26", "AU25"],
    "sadness": ["AU01", "AU04", "AU15"],
    "anger": ["AU04", "AU07", "AU23"],
    "disgust": ["AU09", "AU10"],
    "fear": ["AU01", "AU04", "AU05", "AU20"],
}
# the mean is over the EMFACS pairs; AU25 (an alternative for surprise) is reported, not averaged
MEAN_EXCLUDES = {("surprise", "AU25")}


def mesh_split(split: str, cache: str | None = None) -> tuple[list, np.ndarray]:
    import cv2

    from cem.datasets import load_ferplus
    from cem.fer.detect import FaceMesher

    data = load_ferplus(split)
    if cache:
        try:
            with np.load(cache, allow_pickle=True) as d:
                return list(d["meshes"]), data.votes
        except FileNotFoundError:
            pass
    mesher = FaceMesher()
    meshes = [mesher.mesh_whole(cv2.cvtColor(p, cv2.COLOR_GRAY2RGB)) for p in data.pixels]
    mesher.close()
    if cache:
        np.savez(cache, meshes=np.array(meshes, dtype=object), allow_pickle=True)
    return meshes, data.votes


def evaluate(meshes: list, votes: np.ndarray) -> dict:
    from cem.datasets import FERPLUS_LABELS
    from cem.eval import plurality, roc_auc
    from cem.fer.aus import estimate_aus
    from cem.fer.geometry import load_reference

    ref = load_reference()
    ok = np.array([m is not None for m in meshes])
    intensities: dict[str, np.ndarray] = {}
    rows = [estimate_aus(m, ref) if m is not None else None for m in meshes]
    for code in rows[int(np.flatnonzero(ok)[0])]:
        intensities[code] = np.array([r[code].intensity if r else np.nan for r in rows])
    label, not_tie = plurality(votes)
    neutral = ok & (votes[:, 0] >= 6)
    table = {}
    for emotion, aus in PAIRS.items():
        pos = ok & not_tie & (label == FERPLUS_LABELS.index(emotion))
        for au in aus:
            table[f"{emotion}:{au}"] = {
                "auc": roc_auc(intensities[au][pos], intensities[au][neutral]),
                "n_pos": int(pos.sum()), "n_neg": int(neutral.sum()),
            }
    core = [v["auc"] for k, v in table.items() if tuple(k.split(":")) not in MEAN_EXCLUDES]
    return {"pairs": table, "mean_auc": float(np.mean(core)), "mesh_failures": int((~ok).sum()),
            "faces": len(meshes)}


def main(argv: list[str] | None = None) -> int:
    from cem.datasets import shared_data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the result here")
    p.add_argument("--cache", help="cache meshes in this .npz (for repeated runs)")
    a = p.parse_args(argv)
    if shared_data_dir() is None:
        print("skipped: ../shared/data/ferplus not found", file=sys.stderr)
        return 0
    res = evaluate(*mesh_split("valid", a.cache))
    print(f"{'emotion:AU':<18} {'ROC AUC':>8} {'n_pos':>6} {'n_neg':>6}")
    for k, v in res["pairs"].items():
        print(f"{k:<18} {v['auc']:8.3f} {v['n_pos']:6d} {v['n_neg']:6d}")
    print(f"mean over EMFACS pairs: {res['mean_auc']:.3f}; mesh failures {res['mesh_failures']}/{res['faces']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
