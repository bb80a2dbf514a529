"""Expression and emotion accuracy on FER+ valid, through the same path as ``cem annotate --faces whole``.

Protocol (FER+ plurality protocol): every face of ``../shared/data/ferplus/valid.npz`` with at least 5 of
10 votes on the eight emotions (cem.datasets) is analysed by ``Pipeline.analyze(face, faces="whole")``
(48x48 grayscale -> RGB; the mesh, AUs, expression CNN, rules reasoner and fusion all run). Metrics
(cem.eval): accuracy and macro-F1 against the plurality label with ties excluded, mean KL(human || model)
in nats with model probabilities clipped at 1e-6, mean JS divergence in bits, NLL, Brier, 15-bin ECE of
the top-1 confidence. ``expression`` is the CNN alone, ``emotion`` the fused output.

``--fit-fusion`` also fits the fusion's reasoner weight and temperature on these faces (grid over the
weight, golden-section over the temperature, minimising the mean cross-entropy to the human
distributions) and prints the values to put in ``configs/default.yaml``.
``--baseline-fer PY`` runs the ``fer`` package's mini-Xception (in the Python interpreter PY, which must
have ``fer`` and TensorFlow) on the same faces and reports the same metrics; contempt, which that model
lacks, gets probability 0 (clipped to 1e-6).

Run: ``python benchmarks/expression_ferplus.py [--fit-fusion] [--baseline-fer /path/to/python] [--json OUT]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import emit

HERE = Path(__file__).resolve().parent


def run_pipeline(pixels: np.ndarray, limit: int | None = None) -> dict[str, np.ndarray]:
    import cem

    pipe = cem.Pipeline.from_config("default")
    labels = pipe.config.labels
    expr, emo, rules = [], [], []
    for px in pixels[:limit]:
        face_rgb = np.repeat(px[:, :, None], 3, axis=2)
        r = pipe.analyze(face_rgb, faces="whole")
        f = r.faces[0]
        expr.append([f.evidence.expression[k] for k in labels])
        emo.append([f.emotion[k] for k in labels])
        rr = pipe.reasoner.reason_face(f.evidence)
        rules.append([rr.distribution[k] for k in labels])
    pipe.close()
    return {"expression": np.array(expr), "emotion": np.array(emo), "rules": np.array(rules)}


def fer_baseline(python: str, pixels: np.ndarray) -> np.ndarray:
    """Probabilities of the fer package's model over the 8 FER+ labels (contempt = 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "pixels.npy", pixels)
        subprocess.run([python, str(HERE / "_fer_baseline.py"), str(Path(tmp) / "pixels.npy"),
                        str(Path(tmp) / "probs.npy")], check=True)
        return np.load(Path(tmp) / "probs.npy")


def main(argv: list[str] | None = None) -> int:
    from cem.datasets import load_ferplus, shared_data_dir
    from cem.eval import distribution_metrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-fusion", action="store_true")
    ap.add_argument("--baseline-fer", metavar="PYTHON")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if shared_data_dir() is None:
        print("skipped: ../shared/data/ferplus not found", file=sys.stderr)
        return 0
    os.environ.setdefault("GLOG_minloglevel", "2")
    valid = load_ferplus("valid")
    human = valid.distribution[: a.limit]
    out = run_pipeline(valid.pixels, a.limit)
    res: dict = {"data": "FER+ valid.npz", "faces": len(human),
                 "expression": distribution_metrics(human, out["expression"]),
                 "emotion": distribution_metrics(human, out["emotion"]),
                 "rules_reasoner_alone": distribution_metrics(human, out["rules"])}
    if a.fit_fusion:
        from cem.fuse import fit_fusion

        res["fitted_fusion"] = fit_fusion(out["expression"], out["rules"], human)
    if a.baseline_fer:
        res["fer_package"] = distribution_metrics(human, fer_baseline(a.baseline_fer, valid.pixels[: a.limit]))
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
