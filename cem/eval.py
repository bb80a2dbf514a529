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
* a metric over non-tied rows is NaN when every row is a tie.

``cem eval`` (:func:`evaluate_file`) scores a results JSONL against a labels CSV. With imperfect input,
every case below is an error naming the file, line and column, or is counted in the output; none is
resolved silently:

* labels file: UTF-8 CSV (a byte-order mark is fine) with an ``image`` column and either ``label`` (one
  label per image) or columns named after labels (counts or proportions; an empty cell means the label
  was not offered to that image's raters, and is left out of that row on both sides; a label without a
  column is left out of every row, and listed in ``labels_without_column``). Column names and label
  values are matched whatever their case. A cell that is not a finite number >= 0, an unknown label
  (a value, or a column that is not a label), a single label column, a row without votes, or two rows
  for one image (after path normalisation) is an error: votes for one image belong in one row.
* matching: a label row's ``image`` is matched to the record whose ``image`` is the same path: the same
  string, or the same file once both are resolved (the label path relative to the labels file's folder or
  the current directory; the record's relative to the current directory or the results file's folder).
  Only if no record matches by path does the base name decide, and only when exactly one record has that
  base name: two records of that name in different folders are an error naming both. Two label rows
  matching one record, or one label row matching two records (an image annotated twice), are errors.
* faces: an optional ``face`` column gives the face index to score; without it an image with several
  faces is scored by its largest face (bounding-box area), and the number of such images is reported
  (``multi_face``).
* records: a results line that is not a record, or a matched record whose face fields have the wrong
  shape or a NaN/Infinity, is skipped and listed (``problems``); its label row counts as missing.
  Labelled images with no record, an error record, or no face are ``missing`` with the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cem.report.records import Line, Problem, RecordError, bbox, distribution, face_list, need, read_lines

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
    if not keep.any():
        return math.nan
    return float((np.asarray(p_model).argmax(axis=1)[keep] == y[keep]).mean())


def macro_f1(p_human: np.ndarray, p_model: np.ndarray) -> float:
    y, keep = plurality(p_human)
    if not keep.any():
        return math.nan
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
    if not keep.any():
        return math.nan
    m = _clip(p_model)[keep]
    return float(-np.log(m[np.arange(len(m)), y[keep]]).mean())


def brier(p_human: np.ndarray, p_model: np.ndarray) -> float:
    y, keep = plurality(p_human)
    if not keep.any():
        return math.nan
    m = normalise(p_model)[keep]
    onehot = np.eye(m.shape[1])[y[keep]]
    return float(((m - onehot) ** 2).sum(axis=1).mean())


def expected_calibration_error(p_human: np.ndarray, p_model: np.ndarray, bins: int = 15) -> float:
    y, keep = plurality(p_human)
    if not keep.any():
        return math.nan
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



FIELDS = ("expression", "emotion")  # the distributions scored, side by side


class EvalError(ValueError):
    """A labels or results file that cannot be scored; the message names the file, line and column."""


@dataclass(frozen=True)
class LabelRow:
    """One labelled image: the path as written, its line in the labels file, the human votes over the
    labels (NaN = not offered to the raters) and the face index to score (None: the largest face)."""

    image: str
    line: int
    votes: np.ndarray
    face: int | None = None


@dataclass
class LabelSet:
    """The rows of a labels file, in file order, with the file's path (relative images resolve against it)."""

    path: str
    labels: list[str]
    rows: list[LabelRow]
    # labels the file has no column for (label columns only): not offered to any rater, so left out on both
    # sides, and reported, since a missing column changes what is scored
    without_column: list[str] = field(default_factory=list)


def _cell_number(path: str, line: int, column: str, cell: str) -> float:
    try:
        if "_" in cell:  # Python reads "1_0" as 10; a labels file means no such thing
            raise ValueError
        v = float(cell)
    except ValueError:
        raise EvalError(f"{path}:{line}: column {column!r}: {cell!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise EvalError(f"{path}:{line}: column {column!r}: {cell!r} is not a finite number >= 0")
    return v


def read_labels_csv(path: str | os.PathLike[str], labels: list[str]) -> LabelSet:
    """Human labels per image from a CSV (see the policy above): ``image,label`` (single labels) or
    ``image,<label columns>`` (counts or proportions), with an optional ``face`` column."""
    import csv

    name = os.fspath(path)
    rows: list[LabelRow] = []
    seen: dict[str, int] = {}
    reader: Any = None  # for the line number of a CSV error
    try:
        with open(name, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise EvalError(f"{name}: empty file (expected a header row with an 'image' column)")
            known = {"image", "label", "face", *labels}
            # the names cem reads are matched whatever their case ("Image", "Happiness")
            cols = [h.strip().lower() if h.strip().lower() in known else h.strip() for h in header]
            dup_cols = sorted({c for c in cols if c and cols.count(c) > 1})
            if dup_cols:
                raise EvalError(f"{name}:1: column {dup_cols[0]!r} appears more than once in the header")
            if "image" not in cols:
                raise EvalError(f"{name}:1: the labels file needs an 'image' column (found {cols})")
            single = "label" in cols
            dist_cols = [c for c in cols if c in labels]
            if single and dist_cols:
                raise EvalError(f"{name}:1: both a 'label' column and label columns {dist_cols}: use one of them")
            if not single and not dist_cols:
                raise EvalError(f"{name}:1: expected a 'label' column or columns named after labels {labels}")
            if not single:
                unknown = [c for c in cols if c and c not in known]
                if unknown:  # a misspelt label column would silently leave that label out of the scoring
                    hint = _closest_label(unknown[0], labels)
                    raise EvalError(f"{name}:1: column {unknown[0]!r} is not a label"
                                    + (f" (did you mean {hint!r}?)" if hint else "")
                                    + f"; label columns must be among {labels} (plus 'image' and 'face')")
                if len(dist_cols) < 2:
                    raise EvalError(f"{name}:1: only one label column ({dist_cols[0]!r}): a distribution over one "
                                    f"label always agrees; give a column per label offered to the raters")
            for cells in reader:
                n = reader.line_num
                if not any(c.strip() for c in cells):
                    continue  # blank rows (spreadsheets add them)
                if any(c.strip() for c in cells[len(cols):]):
                    raise EvalError(f"{name}:{n}: {len(cells)} cells, but the header has {len(cols)} columns")
                unnamed = [i for i, c in enumerate(cols) if not c and i < len(cells) and cells[i].strip()]
                if unnamed:  # values under a column without a name would be left out of the scoring unseen
                    raise EvalError(f"{name}:{n}: a value ({cells[unnamed[0]].strip()!r}) in column {unnamed[0] + 1}, "
                                    f"which has no name in the header")
                row = {c: (cells[i].strip() if i < len(cells) else "") for i, c in enumerate(cols)}
                image = row["image"]
                if not image:
                    raise EvalError(f"{name}:{n}: column 'image' is empty")
                key = os.path.normpath(image)
                if key in seen:
                    raise EvalError(f"{name}:{n}: image {image!r} already has a row (line {seen[key]}); "
                                    "put all votes for one image in one row")
                seen[key] = n
                if single:
                    row["label"] = row["label"].lower() if row["label"].lower() in labels else row["label"]
                    if row["label"] not in labels:
                        raise EvalError(f"{name}:{n}: column 'label': {row['label']!r} is not one of {labels}")
                    v = np.zeros(len(labels))
                    v[labels.index(row["label"])] = 1.0
                else:
                    v = np.full(len(labels), np.nan)
                    for c in dist_cols:
                        if row[c]:
                            v[labels.index(c)] = _cell_number(name, n, c, row[c])
                    total = sum(float(x) for x in v if not math.isnan(x))  # Python floats: inf, no warning
                    if not total > 0:
                        raise EvalError(f"{name}:{n}: no positive label value for {image!r}")
                    if not math.isfinite(total):
                        raise EvalError(f"{name}:{n}: the label values of {image!r} are too large to add up")
                face = None
                if row.get("face"):
                    if not (row["face"].isascii() and row["face"].isdigit()):  # "²" and "١" are digits too
                        raise EvalError(f"{name}:{n}: column 'face': {row['face']!r} is not a face index (0, 1, ...)")
                    face = int(row["face"])
                rows.append(LabelRow(image, n, v, face))
    except UnicodeDecodeError as e:
        raise EvalError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        where = f"{name}:{reader.line_num}" if reader is not None else name
        raise EvalError(f"{where}: not a readable CSV ({e})") from None
    except OSError as e:
        raise EvalError(f"{name}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise EvalError(f"{name}: no label rows after the header")
    return LabelSet(name, list(labels), rows, [] if single else [lab for lab in labels if lab not in dist_cols])


def _closest_label(name: str, labels: list[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(name.lower(), labels, n=1, cutoff=0.6)
    return found[0] if found else None


def _renormalise_rated(human: np.ndarray, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels a row's raters were not offered (NaN) are removed from both sides and the rest renormalised."""
    rated = ~np.isnan(human)
    h = np.where(rated, human, 0.0)
    m = np.where(rated, model, 0.0)
    return normalise(h), normalise(np.where(m.sum(1, keepdims=True) > 0, m, rated.astype(float)))


@dataclass
class Matched:
    """Label rows paired with the model's distributions of the face scored for them.

    ``human`` is (N, K) with NaN for labels not offered; ``model[field]`` is (N, K) for field in
    ``expression`` and ``emotion``; ``missing`` holds ``{"image", "line", "reason"}`` for label rows not
    scored; ``problems`` the results lines that were skipped."""

    labels: list[str]
    images: list[str] = field(default_factory=list)
    human: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    model: dict[str, np.ndarray] = field(default_factory=dict)
    missing: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    multi_face: int = 0
    by_name: int = 0

    def pair(self, field_name: str) -> tuple[np.ndarray, np.ndarray]:
        """(human, model) for ``field_name``, with labels not offered removed and rows renormalised."""
        return _renormalise_rated(self.human, self.model[field_name])


class _RecordIndex:
    """Records by image string, by resolved path and by base name (each key -> every record with it)."""

    def __init__(self, lines: list[Line], results_dir: str) -> None:
        self.exact: dict[str, list[Line]] = {}
        self.resolved: dict[str, list[Line]] = {}
        self.names: dict[str, list[Line]] = {}
        for ln in lines:
            image = ln.record["image"]
            self.exact.setdefault(image, []).append(ln)
            for p in _resolutions(image, results_dir):
                self.resolved.setdefault(p, []).append(ln)
            self.names.setdefault(os.path.basename(image), []).append(ln)

    def find(self, row: LabelRow, labels_dir: str, labels_path: str) -> tuple[Line | None, bool]:
        """The record for ``row`` and whether only its base name matched; errors for ambiguity."""
        # a labels file written on Windows (photos\a.jpg) names the same file as photos/a.jpg here
        spellings = list(dict.fromkeys([row.image, row.image.replace("\\", "/") if os.sep == "/" else row.image]))
        found = next((self.exact[s] for s in spellings if s in self.exact), None) or _unique(
            ln for s in spellings for p in _resolutions(s, labels_dir) for ln in self.resolved.get(p, []))
        by_name = False
        if not found:
            found, by_name = self.names.get(os.path.basename(spellings[-1]), []), True
            images = list(dict.fromkeys(ln.record["image"] for ln in found))
            if len(images) > 1:
                raise EvalError(f"{labels_path}:{row.line}: {row.image!r} matches no record by path, and its base "
                                f"name matches records of different files: {images[0]!r} ({found[0].where}) and "
                                f"{images[1]!r}; write the image's path as in the results")
        if len(found) > 1:
            raise EvalError(f"{labels_path}:{row.line}: {row.image!r} has {len(found)} records "
                            f"({found[0].where} and {found[1].where}): score a results file with one record per image")
        return (found[0] if found else None), by_name and bool(found)


def _resolutions(image: str, base: str) -> list[str]:
    """The absolute paths a path as given may mean: itself from the current directory, or from ``base``."""
    if os.path.isabs(image):
        return [os.path.normpath(image)]
    return list(dict.fromkeys([os.path.abspath(image), os.path.abspath(os.path.join(base, image))]))


def _unique(lines: Iterable[Line]) -> list[Line]:
    return list({id(ln): ln for ln in lines}.values())


def _scored_face(rec: dict[str, Any], row: LabelRow, fields: tuple[str, ...], labels: list[str],
                 ) -> tuple[dict[str, np.ndarray] | None, str, bool]:
    """(model distributions of the face to score, or None with the reason; whether it was the largest of
    several). Raises RecordError for a record whose needed fields have the wrong shape."""
    faces = face_list(rec)
    error = need(rec, "error", str, "error", optional=True)
    if not faces:
        return None, (f"the record has an error: {error}" if error else "no face found"), False
    largest = False
    if row.face is not None:
        indices = [need(f, "index", int, f"faces[{i}].index", optional=True) for i, f in enumerate(faces)]
        picked = [i for i, ix in enumerate(indices) if (i if ix is None else ix) == row.face]
        if not picked:
            return None, f"no face {row.face} (the record has {len(faces)})", False
        i = picked[0]
    elif len(faces) == 1:
        i = 0
    else:
        areas = [bx[2] * bx[3] for bx in (bbox(f, f"faces[{j}]") for j, f in enumerate(faces))]
        i, largest = int(np.argmax(areas)), True
    out = {}
    for fld in fields:
        dist = distribution(faces[i], fld, f"faces[{i}]", strict=True)
        out[fld] = np.array([dist.get(k) or 0.0 for k in labels], dtype=float)  # each in [0, 1]: checked
    return out, "", largest


def match_records(records: Sequence[dict[str, Any] | Line], label_set: LabelSet,
                  results_path: str | os.PathLike[str] | None = None) -> Matched:
    """Pair every label row with its record's face (policy above). ``records`` are dicts or
    :class:`~cem.report.records.Line` s (which name their file and line in messages)."""
    lines = [r if isinstance(r, Line) else Line(f"record {i + 1}", i + 1, r) for i, r in enumerate(records)]
    out = Matched(list(label_set.labels))
    usable = []
    for ln in lines:
        image = ln.record.get("image")
        if not isinstance(image, str) or not image:
            out.problems.append(Problem(ln.where, "skipped: no 'image' path (not a string, or empty)", ln.line))
        else:
            usable.append(ln)
    index = _RecordIndex(usable, os.path.dirname(os.fspath(results_path)) if results_path else ".")
    labels_dir = os.path.dirname(label_set.path)
    used: dict[int, LabelRow] = {}
    hs: list[np.ndarray] = []
    ms: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    bad: set[int] = set()
    for row in label_set.rows:
        found, by_name = index.find(row, labels_dir, label_set.path)
        if found is None:
            out.missing.append({"image": row.image, "line": row.line, "reason": "no record"})
            continue
        ln = found
        if id(ln) in used:
            other = used[id(ln)]
            raise EvalError(f"{label_set.path}: lines {other.line} and {row.line} ({other.image!r}, {row.image!r}) "
                            f"both match the record of {ln.record['image']!r} ({ln.where})")
        used[id(ln)] = row
        try:
            dists, reason, largest = _scored_face(ln.record, row, FIELDS, label_set.labels)
        except RecordError as e:
            if id(ln) not in bad:
                bad.add(id(ln))
                out.problems.append(Problem(ln.where, f"skipped: {e}", ln.line))
            out.missing.append({"image": row.image, "line": row.line, "reason": f"record skipped ({e})"})
            continue
        if dists is None:
            out.missing.append({"image": row.image, "line": row.line, "reason": reason})
            continue
        out.images.append(row.image)
        hs.append(row.votes)
        for f in FIELDS:
            ms[f].append(dists[f])
        out.multi_face += largest
        out.by_name += by_name
    k = len(label_set.labels)
    out.human = np.array(hs, dtype=float).reshape(-1, k)
    out.model = {f: np.array(ms[f], dtype=float).reshape(-1, k) for f in FIELDS}
    out.problems.sort(key=lambda p: p.line)
    return out


def evaluate_matched(matched: Matched) -> dict[str, Any]:
    """``{"expression": metrics, "emotion": metrics, "confusion": {...}, "labels", "missing": [...],
    "multi_face", "matched_by_name", "problems": [...]}``; an :class:`EvalError` when nothing was scored.
    A metric that has no row to average (every scored row a tie) is ``None``."""
    if len(matched.human) == 0:
        first = matched.missing[0] if matched.missing else None
        detail = f"; first: {first['image']!r} (line {first['line']}): {first['reason']}" if first else ""
        raise EvalError(f"no labelled image matched a record with a face ({len(matched.missing)} missing{detail})")
    out: dict[str, Any] = {"labels": matched.labels, "confusion": {}}
    for fld in FIELDS:
        h, m = matched.pair(fld)
        metrics = distribution_metrics(h, m)  # NaN where no untied row is left: reported as None
        out[fld] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        out["confusion"][fld] = confusion_matrix(h, m, len(matched.labels)).tolist()
    out.update(missing=matched.missing, multi_face=matched.multi_face, matched_by_name=matched.by_name,
               problems=[str(p) for p in matched.problems])
    return out


def evaluate_file(results: str | os.PathLike[str], labels_csv: str | os.PathLike[str],
                  labels: list[str]) -> tuple[dict[str, Any], Matched]:
    """Read both files, match and score (:func:`evaluate_matched`); lines of ``results`` that are not
    records are listed in ``problems``. Raises :class:`EvalError` for a file that cannot be used."""
    label_set = read_labels_csv(labels_csv, labels)
    name = os.fspath(results)
    try:
        lines, problems = read_lines(name)
    except OSError as e:
        raise EvalError(f"{name}: cannot read ({e.strerror or e})") from None
    if not lines:
        detail = f"{len(problems)} lines, none a record; first: {problems[0]}" if problems else "empty file"
        raise EvalError(f"{name}: no cem records ({detail})")
    matched = match_records(lines, label_set, name)
    matched.problems = sorted([*problems, *matched.problems], key=lambda p: p.line)
    out = evaluate_matched(matched)
    out["labels_without_column"] = label_set.without_column
    from cem.sinks import mixed_settings, settings_of

    out["mixed_settings"] = mixed_settings(name, settings_of(line.record for line in lines))  # scored together
    return out, matched


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


def write_plots(matched: Matched, out_dir: str | os.PathLike[str]) -> list[str]:
    """Reliability diagram and confusion matrices (PNG) for expression and emotion; returns the paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, fld in zip(axes, FIELDS):
        h, m = matched.pair(fld)
        bins = [b for b in reliability_bins(h, m) if b["n"]]
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / 15,
               edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3", ms=3)
        ax.set(title=f"{fld}: ECE {expected_calibration_error(h, m):.3f}", xlabel="top-1 confidence",
               ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    p = d / "reliability.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, fld in zip(axes, FIELDS):
        h, m = matched.pair(fld)
        labels = matched.labels
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
        ax.set(title=f"{fld} (rows: human plurality)", xlabel="predicted", ylabel="human")
    fig.tight_layout()
    p = d / "confusion.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    return written
