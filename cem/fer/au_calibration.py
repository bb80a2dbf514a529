"""Builds ``cem/fer/data/au_calibration.json``: per-AU nuisance coefficients and presence thresholds.

How it was made (``python -m cem.fer.au_calibration``, seeded, needs ``../shared/data/ferplus``):

1. A seeded sample of FER+ *training* faces (``--neutral`` faces with a neutral majority, >= 6 of 10
   votes, and ``--other`` faces of any other label) is meshed as ``cem annotate --faces whole`` does.
2. Nuisance shares: for each AU with ``nuisance`` measurements (:data:`cem.fer.aus.AU_DEFINITIONS`), the
   raw AU score is regressed (least squares, with intercept) on the z-scores of those measurements over
   the training faces whose plurality label (ties excluded) is one of ``nuisance_fit_on``: faces on
   which the AU is not expected, so what the nuisance measurements explain there is the other AUs'
   movement (mouth opening and smiling lift the upper lip without AU10). The coefficients are removed
   from the AU's score everywhere.
3. Presence thresholds: per AU, the ``1 - fpr`` quantile of the final scores over the neutral-majority
   training faces (``--fpr``, default 0.07): each AU is present on about 7 % of neutral FER+ faces.

No evaluation data (FER+ valid, tcce_dev) is used; the file holds only coefficients and thresholds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cem.fer.aus import AU_DEFINITIONS, CALIBRATION_PATH, Calibration, au_scores, measurement_z, raw_au_scores
from cem.fer.geometry import Reference, load_reference

DEFAULT_FPR = 0.07


def mesh_ferplus(split: str, indices: np.ndarray | None = None, cache: str | Path | None = None
                 ) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Meshes (``mesh_whole`` on the 48x48 crop, None where it fails) and votes of FER+ faces of ``split``
    (all, or ``indices``); ``cache``: an .npz that is read when it exists, else written."""
    import cv2

    from cem.datasets import load_ferplus

    if cache is not None and Path(cache).is_file():
        with np.load(cache) as d:
            return [m if ok else None for m, ok in zip(d["meshes"].astype(np.float64), d["ok"])], d["votes"]
    from cem.fer.detect import FaceMesher

    data = load_ferplus(split)
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    mesher = FaceMesher()
    meshes = [mesher.mesh_whole(cv2.cvtColor(data.pixels[i], cv2.COLOR_GRAY2RGB)) for i in idx]
    mesher.close()
    votes = data.votes[idx]
    if cache is not None:
        ok = np.array([m is not None for m in meshes])
        arr = np.stack([m if m is not None else np.zeros((478, 3)) for m in meshes]).astype(np.float32)
        np.savez(cache, meshes=arr, ok=ok, votes=votes, index=idx)
    return meshes, votes


def sample_train(n_neutral: int, n_other: int, seed: int) -> np.ndarray:
    from cem.datasets import load_ferplus

    votes = load_ferplus("train").votes
    rng = np.random.default_rng(seed)
    neutral, other = np.flatnonzero(votes[:, 0] >= 6), np.flatnonzero(votes[:, 0] < 6)
    return np.sort(np.concatenate([rng.permutation(neutral)[:n_neutral], rng.permutation(other)[:n_other]]))


def fit(meshes: list[np.ndarray | None], votes: np.ndarray, ref: Reference, fpr: float = DEFAULT_FPR) -> Calibration:
    """Nuisance coefficients and thresholds from meshes of FER+ training faces and their votes."""
    from cem.datasets import FERPLUS_LABELS
    from cem.eval import plurality

    ok = np.array([m is not None for m in meshes])
    z = np.array([measurement_z(m, ref) if m is not None else np.full(len(ref.measure_names), np.nan)
                  for m in meshes])
    label, not_tie = plurality(votes)
    neutral = ok & (votes[:, 0] >= 6)
    index = {n: i for i, n in enumerate(ref.measure_names)}
    raw = {d.code: np.array([raw_au_scores(zz, ref)[d.code] if o else np.nan for zz, o in zip(z, ok)])
           for d in AU_DEFINITIONS}
    nuisance: dict[str, dict[str, float]] = {}
    for d in AU_DEFINITIONS:
        if not d.nuisance:
            continue
        use = ok & not_tie & np.isin(label, [FERPLUS_LABELS.index(e) for e in d.nuisance_fit_on])
        x = np.column_stack([z[use][:, index[n]] for n in d.nuisance] + [np.ones(int(use.sum()))])
        coef, *_ = np.linalg.lstsq(x, raw[d.code][use], rcond=None)
        nuisance[d.code] = {n: round(float(c), 6) for n, c in zip(d.nuisance, coef[:-1])}
    partial = Calibration(nuisance=nuisance, threshold={d.code: 0.0 for d in AU_DEFINITIONS})
    final = np.array([list(au_scores(zz, ref, partial).values()) for zz in z[neutral]])
    codes = [d.code for d in AU_DEFINITIONS]
    threshold = {c: round(float(np.quantile(final[:, j], 1 - fpr)), 6) for j, c in enumerate(codes)}
    return Calibration(nuisance=nuisance, threshold=threshold, how=f"fpr {fpr} on {int(neutral.sum())} neutral "
                       f"FER+ train faces; nuisance fitted on {int(ok.sum())} meshed FER+ train faces")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fit the AU nuisance shares and presence thresholds on FER+ train.")
    p.add_argument("--neutral", type=int, default=1200, help="neutral-majority training faces to sample")
    p.add_argument("--other", type=int, default=800, help="other training faces to sample")
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="mesh cache (.npz) for repeated runs")
    p.add_argument("--out", type=Path, default=CALIBRATION_PATH)
    a = p.parse_args(argv)
    meshes, votes = mesh_ferplus("train", sample_train(a.neutral, a.other, a.seed), a.cache)
    cal = fit(meshes, votes, load_reference(), a.fpr)
    a.out.write_text(json.dumps({
        "how": "python -m cem.fer.au_calibration (see its docstring): " + cal.how,
        "fpr": a.fpr, "seed": a.seed, "sampled": {"neutral": a.neutral, "other": a.other},
        "nuisance": cal.nuisance, "threshold": cal.threshold,
    }, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.out}: {cal.how}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
