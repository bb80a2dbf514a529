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
