"""Metrics for blended emotion distributions against human label distributions.

All functions take ``p_human`` (N, K) and ``p_model`` (N, K) arrays of probabilities over the same
K labels (rows need not be normalised; they are normalised here) and return plain floats.

Formulas (documented so results can be reproduced by hand):

* plurality label: the argmax of the human distribution; a row whose maximum is shared by two or more
  labels is a *tie* and is excluded from accuracy, macro-F1, NLL, Brier and ECE (ties are counted).
* accuracy: mean of ``argmax(p_model) == plurality``.
* macro-F1: unweighted mean over labels that occur as plurality or prediction of per-label F1.
* KL(human || model) in nats: ``sum_k h_k * (ln h_k - ln m_k)`` with ``m`` clipped at 1e-6 and renormalised,
  terms with ``h_k = 0`` contributing 0; averaged over all rows.
* JS divergence in bits: ``0.5 KL(h || a) + 0.5 KL(m || a)`` with ``a = (h + m) / 2``, log base 2; in [0, 1].
* NLL: ``-ln m[plurality]`` (m clipped at 1e-6), over non-tied rows.
* Brier: ``sum_k (m_k - onehot(plurality)_k)^2``, over non-tied rows.
* ECE (15 equal-width bins of the top-1 confidence): ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def normalise(p: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (all-zero rows stay zero)."""
    p = np.asarray(p, dtype=np.float64)
    s = p.sum(axis=1, keepdims=True)
    return np.divide(p, s, out=np.zeros_like(p), where=s > 0)


def plurality(p_human: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plurality label per row and a mask of rows that are *not* ties."""
    h = np.asarray(p_human, dtype=np.float64)
    top = h.max(axis=1, keepdims=True)
    n_top = np.isclose(h, top, rtol=0, atol=1e-9).sum(axis=1)
    return h.argmax(axis=1), n_top == 1


def _clip(p: np.ndarray) -> np.ndarray:
    return normalise(np.clip(normalise(p), EPS, None))


def kl_divergence(p_human: np.ndarray, p_model: np.ndarray) -> float:
    h, m = normalise(p_human), _clip(p_model)
    terms = np.where(h > 0, h * (np.log(np.where(h > 0, h, 1.0)) - np.log(m)), 0.0)
    return float(terms.sum(axis=1).mean())


def js_divergence(p_human: np.ndarray, p_model: np.ndarray) -> float:
    h, m = normalise(p_human), normalise(p_model)
    a = (h + m) / 2

    def _kl2(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        safe_p = np.where(p > 0, p, 1.0)
        safe_q = np.where(q > 0, q, 1.0)
        return np.where(p > 0, p * (np.log2(safe_p) - np.log2(safe_q)), 0.0).sum(axis=1)

    return float((0.5 * _kl2(h, a) + 0.5 * _kl2(m, a)).mean())


def accuracy(p_human: np.ndarray, p_model: np.ndarray) -> float:
    y, keep = plurality(p_human)
    return float((np.asarray(p_model).argmax(axis=1)[keep] == y[keep]).mean())


def macro_f1(p_human: np.ndarray, p_model: np.ndarray) -> float:
    y, keep = plurality(p_human)
    y, pred = y[keep], np.asarray(p_model).argmax(axis=1)[keep]
    scores = []
    for k in np.union1d(y, pred):
        tp = np.sum((pred == k) & (y == k))
        fp = np.sum((pred == k) & (y != k))
        fn = np.sum((pred != k) & (y == k))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def nll(p_human: np.ndarray, p_model: np.ndarray) -> float:
    y, keep = plurality(p_human)
    m = _clip(p_model)[keep]
    return float(-np.log(m[np.arange(len(m)), y[keep]]).mean())


def brier(p_human: np.ndarray, p_model: np.ndarray) -> float:
    y, keep = plurality(p_human)
    m = normalise(p_model)[keep]
    onehot = np.eye(m.shape[1])[y[keep]]
    return float(((m - onehot) ** 2).sum(axis=1).mean())


def expected_calibration_error(p_human: np.ndarray, p_model: np.ndarray, bins: int = 15) -> float:
    y, keep = plurality(p_human)
    m = normalise(p_model)[keep]
    conf, pred = m.max(axis=1), m.argmax(axis=1)
    correct = (pred == y[keep]).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def confusion_matrix(p_human: np.ndarray, p_model: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts[true plurality, predicted] over non-tied rows."""
    y, keep = plurality(p_human)
    pred = np.asarray(p_model).argmax(axis=1)[keep]
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (y[keep], pred), 1)
    return cm


def distribution_metrics(p_human: np.ndarray, p_model: np.ndarray) -> dict[str, float | int]:
    """All headline metrics in one dict: n, n_scored, accuracy, macro_f1, kl, js, nll, brier, ece."""
    _, keep = plurality(p_human)
    return {
        "n": int(len(keep)),
        "n_scored": int(keep.sum()),
        "accuracy": accuracy(p_human, p_model),
        "macro_f1": macro_f1(p_human, p_model),
        "kl": kl_divergence(p_human, p_model),
        "js": js_divergence(p_human, p_model),
        "nll": nll(p_human, p_model),
        "brier": brier(p_human, p_model),
        "ece": expected_calibration_error(p_human, p_model),
    }


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counted 1/2 (Mann-Whitney U)."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(scores_pos, float), np.asarray(scores_neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


# ---------------------------------------------------------------------------------------------------
# Evaluating a cem output file against human labels (`cem eval`)


def read_labels_csv(path: str, labels: list[str]) -> dict[str, np.ndarray]:
    """Human labels per image from a CSV: ``image,label`` (single labels) or ``image,<label columns>``
    (counts or proportions). An empty cell means "not rated": that label is left out of that row and the
    rest renormalised (stored as NaN, handled by :func:`_renormalise_rated`)."""
    import csv

    out: dict[str, np.ndarray] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "image" not in cols:
            raise ValueError(f"{path}: the labels file needs an 'image' column")
        single = "label" in cols
        dist_cols = [c for c in cols if c in labels]
        if not single and not dist_cols:
            raise ValueError(f"{path}: expected a 'label' column or columns named after labels {labels}")
        for n, row in enumerate(reader, start=2):
            if single:
                lab = (row["label"] or "").strip()
                if lab not in labels:
                    raise ValueError(f"{path}:{n}: label {lab!r} is not one of {labels}")
                v = np.zeros(len(labels))
                v[labels.index(lab)] = 1.0
            else:
                v = np.full(len(labels), np.nan)
                for c in dist_cols:
                    cell = (row[c] or "").strip()
                    if cell:
                        try:
                            v[labels.index(c)] = float(cell)
                        except ValueError:
                            raise ValueError(f"{path}:{n}: column {c!r} is not a number: {cell!r}") from None
                if np.nansum(v) <= 0:
                    raise ValueError(f"{path}:{n}: no positive label value for {row['image']!r}")
            out[row["image"]] = v
    return out


def _renormalise_rated(human: np.ndarray, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels a row's raters were not offered (NaN) are removed from both sides and the rest renormalised."""
    rated = ~np.isnan(human)
    h = np.where(rated, human, 0.0)
    m = np.where(rated, model, 0.0)
    return normalise(h), normalise(np.where(m.sum(1, keepdims=True) > 0, m, rated.astype(float)))


def match_records(records: list[dict], human: dict[str, np.ndarray], field: str,
                  labels: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pairs (human, model[field]) per labelled image. An image is scored by its largest face; labelled
    images without a record, with an error or without a face are returned as ``missing``."""
    from pathlib import Path

    by_key: dict[str, dict] = {}
    for r in records:
        by_key[r["image"]] = r
        by_key.setdefault(Path(r["image"]).name, r)
    hs, ms, missing = [], [], []
    for image, h in human.items():
        r = by_key.get(image) or by_key.get(Path(image).name)
        faces = (r or {}).get("faces") or []
        if not faces:
            missing.append(image)
            continue
        face = max(faces, key=lambda f: f["bbox"][2] * f["bbox"][3])
        hs.append(h)
        ms.append([face[field].get(k, 0.0) for k in labels])
    if not hs:
        return np.zeros((0, len(labels))), np.zeros((0, len(labels))), missing
    return np.array(hs, dtype=float), np.array(ms, dtype=float), missing


def evaluate_records(records: list[dict], human: dict[str, np.ndarray], labels: list[str]) -> dict:
    """``{"expression": metrics, "emotion": metrics, "missing": [...], "confusion": {...}}``."""
    out: dict = {}
    for field in ("expression", "emotion"):
        h, m, missing = match_records(records, human, field, labels)
        if len(h) == 0:
            raise ValueError("no labelled image matched a record with a face")
        h, m = _renormalise_rated(h, m)
        out[field] = distribution_metrics(h, m)
        out.setdefault("confusion", {})[field] = confusion_matrix(h, m, len(labels)).tolist()
        out["missing"] = missing
    out["labels"] = labels
    return out


def reliability_bins(p_human: np.ndarray, p_model: np.ndarray, bins: int = 15) -> list[dict]:
    """Per confidence bin: count, mean confidence, accuracy (non-tied rows), for reliability diagrams."""
    y, keep = plurality(p_human)
    m = normalise(p_model)[keep]
    conf, correct = m.max(1), (m.argmax(1) == y[keep])
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int((idx == b).sum()),
             "confidence": float(conf[idx == b].mean()) if (idx == b).any() else None,
             "accuracy": float(correct[idx == b].mean()) if (idx == b).any() else None} for b in range(bins)]


def write_plots(records: list[dict], human: dict[str, np.ndarray], labels: list[str], out_dir: str) -> list[str]:
    """Reliability diagram and confusion matrices (PNG) for expression and emotion; returns the paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, field in zip(axes, ("expression", "emotion")):
        h, m, _ = match_records(records, human, field, labels)
        h, m = _renormalise_rated(h, m)
        bins = [b for b in reliability_bins(h, m) if b["n"]]
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / 15,
               edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3", ms=3)
        ax.set(title=f"{field}: ECE {expected_calibration_error(h, m):.3f}", xlabel="top-1 confidence",
               ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    p = d / "reliability.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, field in zip(axes, ("expression", "emotion")):
        h, m, _ = match_records(records, human, field, labels)
        h, m = _renormalise_rated(h, m)
        cm = confusion_matrix(h, m, len(labels)).astype(float)
        rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
        ax.set(title=f"{field} (rows: human plurality)", xlabel="predicted", ylabel="human")
    fig.tight_layout()
    p = d / "confusion.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    return written
