"""Expression model beyond FER2013: posed faces of ``../shared/data/tcce_dev`` beside FER+ valid.

Protocol:

* tcce_dev (333 front-view posed photos of 7 performers; see ``../shared/data/README.md``): each photo goes
  through the FER stage exactly as in ``cem annotate`` (MediaPipe detection, mesh, eye-aligned 48x48 crop);
  the largest detected face is scored (every photo shows one performer). Metrics:
  - ``acc7_posed``: accuracy of the argmax over the 7 classes (neutral + six; contempt excluded, since
    nobody posed it) against the expression the performer was asked to pose (``labels_single.csv``);
  - ``acc6_raters``: accuracy of the argmax over the six rated emotions against the raters' majority
    (``labels.csv``; neutral and contempt were not offered to raters, so both sides are renormalised over
    the six), photos whose rater majority is tied excluded;
  - ``js6``: mean JS divergence (bits) between the raters' and the model's six-way distributions;
  - ``neutral_on_emotional``: share of emotion-posed photos called neutral; recall per posed emotion.
* against the person's own neutral face (``--subject-baseline``): each photo's distribution measured with
  ``ExpressionModel.relative_to`` against the mean of the *other* neutral photos of the same performer (the
  two digits that start the file name), as ``cem annotate`` does for a manifest with ``subject`` and
  ``neutral`` columns; one row per shrink value (0 = no correction; the shipped value is
  ``cem.fer.expression.SUBJECT_SHRINK``), packaged model only.
* FER+ valid (``cem.datasets``; faces with >= 5 emotion votes): plurality accuracy, macro-F1, KL, JS, ECE
  (``cem.eval.distribution_metrics``) of the model's calibrated distribution on the 48x48 crops.

* the fused ``emotion`` (``--fusion-sweep``): the CNN's distribution pooled with the rules reasoner's (AU
  prototypes) for each photo's largest face, as the reasoner weight varies (0 = the CNN alone; the default
  config's 0.1 was fitted on FER+ valid), and the weight chosen for each performer on the other six.

Run: ``python benchmarks/expression_tcce.py [--model FOLDER ...] [--subject-baseline] [--fusion-sweep]
[--json OUT]``; several
``--model`` folders are also scored as an ensemble (mean logits). Default: the packaged model. Skips without
``../shared``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from _common import emit

LABELS7 = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear"]
RATED6 = LABELS7[1:]
CACHE = Path("/tmp/cem_tcce_crops.npz")


def tcce_crops(root: Path) -> tuple[list[str], np.ndarray]:
    """(image names, (N, 48, 48) crops) through the FER stage's own detection and alignment."""
    if CACHE.exists():
        d = np.load(CACHE)
        return list(d["names"]), d["crops"]
    from PIL import Image

    import cem

    pipe = cem.Pipeline.from_config("default")
    captured: list[np.ndarray] = []
    model = pipe.fer.expression
    original = model.predict
    model.predict = lambda crops: (captured.append(np.asarray(crops)), original(crops))[1]  # type: ignore[method-assign]
    names, crops = [], []
    for path in sorted((root / "images").glob("*.jpg")):
        captured.clear()
        ev = pipe.fer.measure(np.asarray(Image.open(path).convert("RGB")))
        if not ev:
            print(f"{path.name}: no face detected (scored as missing)", file=sys.stderr)
            continue
        largest = max(range(len(ev)), key=lambda i: ev[i].bbox[2] * ev[i].bbox[3])
        names.append(path.name)
        crops.append(captured[0][largest])
    pipe.close()
    arr = np.stack(crops)
    np.savez(CACHE, names=np.array(names), crops=arr)
    return names, arr


def read_tcce_labels(root: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    posed = {Path(r["image"]).name: r["label"] for r in csv.DictReader(open(root / "labels_single.csv"))}
    raters = {}
    for r in csv.DictReader(open(root / "labels.csv")):
        raters[Path(r["image"]).name] = np.array([float(r[k]) for k in RATED6])
    return posed, raters


def logits_of(folders: list[str], crops: np.ndarray) -> tuple[np.ndarray, float, list[str]]:
    """Mean logits of the models in ``folders`` (flip-averaged where the first model's config.json sets
    ``test_time_flip``, as inference does), their mean temperature and label order."""
    from cem.training import load_model_folder, predict_logits

    nets, cfgs = zip(*(load_model_folder(f) for f in folders))
    flip = bool(cfgs[0].get("test_time_flip", False))
    return (predict_logits(list(nets), crops, flip=flip), float(np.mean([c["temperature"] for c in cfgs])),
            cfgs[0]["labels"])


def score_tcce(p: np.ndarray, labels: list[str], names: list[str], posed: dict, raters: dict) -> dict:
    from cem.eval import js_divergence

    idx7 = [labels.index(k) for k in LABELS7]
    idx6 = [labels.index(k) for k in RATED6]
    y7 = np.array([LABELS7.index(posed[n]) for n in names])
    pred7 = p[:, idx7].argmax(1)
    h6 = np.stack([raters[n] for n in names])
    m6 = p[:, idx6] / p[:, idx6].sum(1, keepdims=True)
    top = h6.max(1, keepdims=True)
    untied = np.isclose(h6, top).sum(1) == 1
    emotional = y7 != 0
    out = {
        "n": len(names),
        "acc7_posed": float((pred7 == y7).mean()),
        "acc6_raters": float((m6.argmax(1) == h6.argmax(1))[untied].mean()),
        "js6": js_divergence(h6, m6),
        "neutral_on_emotional": float((pred7[emotional] == 0).mean()),
    }
    for k, lab in enumerate(LABELS7):
        out[f"recall_{lab}"] = float((pred7[y7 == k] == k).mean()) if (y7 == k).any() else float("nan")
    return out


def subject_relative(model, p: np.ndarray, names: list[str], posed: dict, shrink: float) -> np.ndarray:
    """``p`` (the packaged ``model``'s distributions), each against its performer's other neutral photos."""
    from cem.fer.expression import mean_log_probs

    performer = np.array([n[:2] for n in names])
    neutral = np.array([posed[n] == "neutral" for n in names])
    out = p.copy()
    for i in range(len(names)):
        ref = (performer == performer[i]) & neutral
        ref[i] = False  # a neutral photo is never its own reference
        if ref.any():
            out[i] = model.relative_to(p[i: i + 1], mean_log_probs(p[ref]), shrink)[0]
    return out


FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5)


def fusion_sweep(root: Path, posed: dict, raters: dict) -> dict:
    """The fused ``emotion`` (the answer users read: the CNN pooled with the rules reasoner's AU prototypes) on
    every photo, as the reasoner weight varies (the default config's temperature), and the weight chosen
    leaving one performer out (by acc7 + acc6 on the other six)."""
    from PIL import Image

    import cem
    from cem.config import FusionConfig
    from cem.fuse import pool

    pipe = cem.Pipeline.from_config("default")
    labels, temperature = list(pipe.config.labels), pipe.config.fusion.temperature
    names, pairs = [], []
    for path in sorted((root / "images").glob("*.jpg")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        ev = pipe.fer.measure(rgb)
        if not ev:
            continue
        face = max(ev, key=lambda f: f.bbox[2] * f.bbox[3])
        names.append(path.name)
        pairs.append((face.expression, pipe.reasoner.reason(rgb, [face], None)[0].distribution))
    pipe.close()

    def fused(w: float, keep: np.ndarray) -> np.ndarray:
        fusion = FusionConfig(expression_weight=1.0, reasoner_weight=w, temperature=temperature)
        return np.array([[d[k] for k in labels] for d in (pool(pe, pr, labels, fusion)
                                                           for (pe, pr), k_ in zip(pairs, keep) if k_)])

    every = np.ones(len(names), bool)
    out: dict = {f"fused[reasoner_weight={w}]": score_tcce(fused(w, every), labels, names, posed, raters)
                 for w in FUSION_WEIGHTS}
    performer = np.array([n[:2] for n in names])
    chosen = {}
    for p in sorted(set(performer)):
        rest = performer != p
        rest_names = [n for n, k in zip(names, rest) if k]
        chosen[p] = max(FUSION_WEIGHTS, key=lambda w: sum(
            score_tcce(fused(w, rest), labels, rest_names, posed, raters)[m] for m in ("acc7_posed", "acc6_raters")))
    out["fused_lopo_weight_by_performer"] = chosen
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="model folder (repeat; default: packaged)")
    ap.add_argument("--no-ensemble", action="store_true")
    ap.add_argument("--subject-baseline", action="store_true",
                    help="also score the packaged model against each performer's own neutral photos")
    ap.add_argument("--fusion-sweep", action="store_true",
                    help="also score the fused emotion (CNN + rules reasoner) as the reasoner weight varies")
    ap.add_argument("--json")
    a = ap.parse_args()
    from cem.datasets import load_ferplus, shared_data_dir
    from cem.eval import distribution_metrics
    from cem.fer.expression import DEFAULT_WEIGHTS
    from cem.training import softmax

    data = shared_data_dir()
    if data is None or not (data / "tcce_dev").is_dir():
        print("skipped: ../shared/data (ferplus, tcce_dev) not found", file=sys.stderr)
        return 0
    names, crops = tcce_crops(data / "tcce_dev")
    posed, raters = read_tcce_labels(data / "tcce_dev")
    valid = load_ferplus("valid")
    folders = a.model or [str(DEFAULT_WEIGHTS)]
    runs = [[f] for f in folders] + ([folders] if len(folders) > 1 and not a.no_ensemble else [])
    results = {}
    for group in runs:
        key = "+".join(Path(f).name for f in group)
        z_t, temperature, labels = logits_of(group, crops)
        z_v, _, _ = logits_of(group, valid.pixels)
        row = score_tcce(softmax(z_t, temperature), labels, names, posed, raters)
        fer = distribution_metrics(valid.distribution, softmax(z_v, temperature))
        row.update({f"ferplus_{k}": v for k, v in fer.items() if k in ("accuracy", "macro_f1", "kl", "js", "ece")})
        results[key] = row
        print(key, " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    if a.subject_baseline:
        from cem.fer.expression import SUBJECT_SHRINK, ExpressionModel

        model = ExpressionModel.from_pretrained()
        p = model.predict(crops)  # once; each shrink value only re-weights these
        for shrink in sorted({0.0, 0.25, 0.5, 0.75, 1.0, SUBJECT_SHRINK}):
            key = f"subject_baseline[shrink={shrink}]"
            results[key] = score_tcce(subject_relative(model, p, names, posed, shrink), model.labels, names, posed,
                                      raters)
            print(key, " ".join(f"{k}={v:.3f}" for k, v in results[key].items() if isinstance(v, float)), flush=True)
    if a.fusion_sweep:
        sweep = fusion_sweep(data / "tcce_dev", posed, raters)
        for key, row in sweep.items():
            shown = row.items() if key.startswith("fused[") else ()
            print(key, " ".join(f"{k}={v:.3f}" for k, v in shown if isinstance(v, float)) or row, flush=True)
        results.update(sweep)
    emit(results, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
