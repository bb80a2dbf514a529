"""Does a geometry branch help the expression model beyond FER2013? Logits + mesh measurements, stacked.

Protocol: features per face = the packaged CNN's logits divided by its temperature (one pass, no flip),
the 22 robust neutral z-scores of the AU base measurements on the frontalised mesh
(``cem.fer.aus.measurement_z``, clipped to +-6, zero where the mesh failed) and a mesh-found flag. A
multinomial logistic layer (initialised at the identity on the logits, L2 ``--lam`` towards it) is fitted
on FER+ valid, either to the crowd distributions (``soft``) or to the plurality label (``plurality``).
FER+ valid is scored by 5-fold cross-validation (seeded folds), tcce_dev (the ``expression_tcce.py``
protocol: detect path, largest face) with the layer fitted on all of FER+ valid. Baselines: the CNN alone,
and the CNN with only its temperature changed (``--scales``), which shows how much of a JS change is
mere softening. Needs ``../shared/data``; meshes come from ``cem.fer.au_calibration`` (cached with
``--cache-dir``), crops from ``expression_tcce.py``'s cache.
Run: ``python benchmarks/expression_geometry_fusion.py [--cache-dir /tmp/cem-au] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from _common import emit


def fit_layer(x: np.ndarray, target: np.ndarray, k: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights (F, K) and bias (K,) minimising cross-entropy to ``target`` plus ``lam`` times the squared
    distance of the weights from the identity on the first ``k`` (logit) features and from 0 elsewhere."""
    import torch

    xt, pt = torch.tensor(x), torch.tensor(target)
    prior = torch.zeros(x.shape[1], target.shape[1], dtype=torch.float64)
    prior[:k, :k] = torch.eye(k, dtype=torch.float64)
    w = prior.clone().requires_grad_(True)
    b = torch.zeros(target.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -(pt * torch.log_softmax(xt @ w + b, 1)).sum(1).mean() + lam * ((w - prior) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--lam", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from expression_tcce import read_tcce_labels, score_tcce, tcce_crops

    from cem.datasets import load_ferplus, shared_data_dir
    from cem.eval import distribution_metrics
    from cem.fer.au_calibration import mesh_ferplus, mesh_tcce
    from cem.fer.aus import measurement_z
    from cem.fer.expression import ExpressionModel
    from cem.fer.geometry import load_reference
    from cem.training import predict_logits
    from cem.training import softmax as _softmax

    root = shared_data_dir()
    if root is None or not (root / "tcce_dev").is_dir():
        print("skipped: ../shared/data (ferplus, tcce_dev) not found", file=sys.stderr)
        return 0
    if a.cache_dir:
        a.cache_dir.mkdir(parents=True, exist_ok=True)
    ref, model = load_reference(), ExpressionModel.from_pretrained()
    k = len(model.labels)

    def logits(pixels: np.ndarray) -> np.ndarray:  # one pass, as the packaged model runs
        return predict_logits(model.model, pixels, flip=False).astype(np.float64)

    def features(z_logits: np.ndarray, meshes: list) -> np.ndarray:
        ok = np.array([m is not None for m in meshes], dtype=float)
        z = np.array([np.clip(measurement_z(m, ref), -6, 6) if m is not None else np.zeros(len(ref.measure_names))
                      for m in meshes])
        return np.concatenate([z_logits / model.temperature, z, ok[:, None]], axis=1)

    valid = load_ferplus("valid")
    v_meshes, _ = mesh_ferplus("valid", cache=a.cache_dir / "ferplus_valid.npz" if a.cache_dir else None)
    xv, pv = features(logits(valid.pixels), v_meshes), valid.distribution
    names, crops = tcce_crops(root / "tcce_dev")
    t_meshes, t_names, _, _ = mesh_tcce(root, a.cache_dir / "tcce_dev.npz" if a.cache_dir else None)
    by_name = dict(zip(t_names, t_meshes))
    xt = features(logits(crops), [by_name.get(n) for n in names])
    posed, raters = read_tcce_labels(root / "tcce_dev")
    keep_v = ("accuracy", "macro_f1", "js", "ece")
    keep_t = ("acc7_posed", "acc6_raters", "js6", "neutral_on_emotional")

    def row(p_valid: np.ndarray, p_tcce: np.ndarray) -> dict:
        fer = distribution_metrics(pv, p_valid)
        tc = score_tcce(p_tcce, model.labels, names, posed, raters)
        return {**{f"ferplus_{m}": round(float(fer[m]), 4) for m in keep_v},
                **{f"tcce_{m}": round(float(tc[m]), 4) for m in keep_t}}

    res: dict = {"ferplus_faces": len(pv), "tcce_faces": len(names), "cnn alone": row(_softmax(xv[:, :k]),
                                                                                    _softmax(xt[:, :k]))}
    for s in a.scales:
        res[f"cnn, logits x{s} (softer)"] = row(_softmax(s * xv[:, :k]), _softmax(s * xt[:, :k]))
    folds = np.random.default_rng(0).integers(0, 5, len(pv))
    for target_name, target in (("soft", pv), ("plurality", np.eye(k)[pv.argmax(1)])):
        for lam in a.lam:
            cv = np.zeros_like(pv)
            for f in range(5):
                w, b = fit_layer(xv[folds != f], target[folds != f], k, lam)
                cv[folds == f] = _softmax(xv[folds == f] @ w + b)
            w, b = fit_layer(xv, target, k, lam)
            res[f"cnn + mesh, {target_name} targets, lam {lam}"] = row(cv, _softmax(xt @ w + b))
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
