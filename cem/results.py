"""Results as pandas DataFrames: one row per face, read from a cem JSONL, with column groups.

```python
import cem

df = cem.read_results("out.jsonl")        # one row per face; an image without faces is one row too
df.cem.emotion                            # fused emotion distribution (columns: labels)
df.cem.aus, df.cem.au_presence            # AU intensities (0-5) and presence flags (columns: AU codes)
df.cem.expression, df.cem.pose, df.cem.bbox, df.cem.quality, df.cem.info
cues = cem.results.read_cues("out.jsonl")  # one row per cue, with image and face_index
```

The columns are the flat projection of the record types in :mod:`cem.contract` (see ``docs/output.md``).
Every record is validated against the contract as it is read; a line that is not a valid record is skipped
with a :class:`CorruptLinesWarning` that names the file, how many lines and which. :func:`write_table`
writes the same table as CSV or Parquet, byte for byte the same for the same JSONL.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cem.contract import (
    CUE_COLUMNS,
    FERPLUS_LABELS,
    RecordError,
    column_groups,
    cue_rows,
    face_rows,
    face_table_columns,
    order_columns,
    validate_record,
)
from cem.sinks import mixed_settings, table_format

__all__ = ["read_results", "read_cues", "write_table", "read_records", "CorruptLinesWarning", "TableSummary",
           "CemAccessor"]


class CorruptLinesWarning(UserWarning):
    """Lines of a results file that are not valid records (they were skipped)."""


class MixedSettingsWarning(UserWarning):
    """The records of a results file were made with different settings (``provenance_settings``): a resumed run
    after a config change, or outputs concatenated. Their numbers are not comparable as one sample."""


@dataclass
class ReadReport:
    """What reading a results file skipped: (line number, why) per bad line."""

    path: str
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def message(self) -> str:
        lines = ", ".join(str(n) for n, _ in self.skipped[:20]) + (", ..." if len(self.skipped) > 20 else "")
        first = self.skipped[0][1]
        return (f"{self.path}: skipped {len(self.skipped)} line(s) that are not valid cem records "
                f"(line {lines}); first: {first}")


def read_records(path: str | os.PathLike, report: ReadReport | None = None) -> Iterator[dict[str, Any]]:
    """Valid records of a JSONL file, as written (dicts). Lines that are not JSON objects or do not satisfy
    the contract are skipped and listed in ``report`` (blank lines are ignored)."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                validate_record(rec, unknown_fields=True)
            except json.JSONDecodeError as e:
                if report is not None:
                    report.skipped.append((n, f"line {n}: not JSON ({e.msg})"))
                continue
            except RecordError as e:
                if report is not None:
                    report.skipped.append((n, f"line {n}: {e}"))
                continue
            except (ValueError, RecursionError) as e:  # a 5,000-digit number, JSON nested 100,000 deep
                if report is not None:
                    report.skipped.append((n, f"line {n}: not readable JSON ({type(e).__name__}: {str(e)[:200]})"))
                continue
            yield rec


def _read_rows(path: str | os.PathLike, project: Callable[[dict[str, Any]], list[dict[str, Any]]]
               ) -> tuple[list[dict[str, Any]], ReadReport]:
    report = ReadReport(os.fspath(path))
    rows = [row for rec in read_records(path, report) for row in project(rec)]
    if report.skipped:
        warnings.warn(report.message(), CorruptLinesWarning, stacklevel=3)
    return rows, report


_INT_COLUMNS = frozenset({"width", "height", "face_index", "face_px", "provenance_faces_skipped",
                          "video_summary_frames", "video_summary_moments", "video_summary_frames_decoded",
                          "video_summary_frames_declared"})
_BOOL_COLUMNS = frozenset({"extreme_pose", "cut_by_frame", "too_small", "mesh_failed", "provenance_context_used",
                           "video_summary_complete"})
_FLOAT_COLUMNS = frozenset({"x", "y", "w", "h", "detection_score", "yaw", "pitch", "roll", "blur", "weight"})


def _dtype_without_values(col: str) -> str:
    """The dtype of a column that no row fills (faces_skipped in an ordinary run, every face column of an output
    without faces): the contract's type, so the column has the same dtype in every table."""
    if col in _INT_COLUMNS:
        return "Int64"
    if col in _BOOL_COLUMNS or col.endswith("_present"):
        return "boolean"
    if (col in _FLOAT_COLUMNS or col.startswith(("expression_", "emotion_", "provenance_timings_ms_"))
            or re.fullmatch(r"AU\d+", col)):
        return "float64"
    return "object"


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A DataFrame with nullable dtypes chosen from the values as read: bool -> boolean, int -> Int64,
    numbers -> float64, text -> object; so a column keeps its type when some rows (images without faces)
    have no value."""
    data: dict[str, pd.Series] = {}
    for col in columns:
        raw = [r.get(col) for r in rows]
        values = [v for v in raw if v is not None]
        dtype: str = "object"
        if values and all(isinstance(v, bool) for v in values):
            dtype = "boolean"
        elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            dtype = "Int64"
        elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            dtype = "float64"
        elif not values:
            dtype = _dtype_without_values(col)
        data[col] = pd.Series(raw, dtype=dtype)
    return pd.DataFrame(data, columns=columns)


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """The records of a cem JSONL as a DataFrame, one row per face (image and provenance fields repeated).

    An image without faces (an error, or no face found) is one row with missing face columns and its
    ``error``, so no input is invisible. Columns: see :func:`cem.contract.order_columns`; groups through
    the ``df.cem`` accessor. ``df.attrs["skipped_lines"]`` lists lines that were skipped (also warned).
    """
    rows, report = _read_rows(path, face_rows)
    seen = [k for r in rows for k in r]
    # the labels of the records' distributions (a config may add some); the FER+ eight when no face was found
    labels = list(dict.fromkeys(k.removeprefix("expression_") for k in seen if k.startswith("expression_")))
    columns = order_columns([*seen, *face_table_columns(labels or FERPLUS_LABELS)])
    df = _frame(rows, columns)
    df.attrs["source"] = os.fspath(path)
    df.attrs["skipped_lines"] = [n for n, _ in report.skipped]
    df.attrs["skipped_reasons"] = [why for _, why in report.skipped]
    if "provenance_settings" in df:
        # records of a cem that wrote no digest are a group of their own ("unrecorded")
        made_with = df.groupby(df["provenance_settings"].fillna("unrecorded"))["image"].nunique()
        mixed = mixed_settings(os.fspath(path), {str(k): int(v) for k, v in made_with.items()})
        if mixed:
            warnings.warn(mixed, MixedSettingsWarning, stacklevel=2)
    return df


def read_cues(path: str | os.PathLike) -> pd.DataFrame:
    """One row per cue of every face: image, face_index, cue, source, au, supports, weight, grounding, role."""
    rows, report = _read_rows(path, cue_rows)
    df = _frame(rows, list(CUE_COLUMNS))
    df.attrs["skipped_lines"] = [n for n, _ in report.skipped]
    return df


@dataclass
class TableSummary:
    """What :func:`write_table` wrote: rows, the photos and videos they came from, the lines skipped and why."""

    path: str
    rows: int
    images: int  # photos (a video's rows are counted in ``videos``)
    skipped_lines: list[int]
    skipped_reasons: list[str]
    videos: int = 0
    mixed_settings: str | None = None  # read_results' MixedSettingsWarning, when the records' settings differ

    def describe(self) -> str:
        """``"12 rows (3 images, 1 video)"``: what the table holds, as the CLI says it."""
        parts = [f"{self.images} image{'s' if self.images != 1 else ''}"]
        if self.videos:
            parts.append(f"{self.videos} video{'s' if self.videos != 1 else ''}")
        return f"{self.rows} row{'s' if self.rows != 1 else ''} ({', '.join(parts)})"


def _nul_free(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each NUL in its text cells (a context or manifest cell that held one) written as U+FFFD:
    CSV readers end a cell at a NUL (pandas read ``abc\0def`` as ``abc``). The JSONL keeps the text as given."""
    text = [c for c in df.columns if df[c].dtype == object or isinstance(df[c].dtype, pd.StringDtype)]
    marked = [c for c in text if df[c].map(lambda v: isinstance(v, str) and "\x00" in v).any()]
    if not marked:
        return df
    out = df.copy()
    for c in marked:
        out[c] = out[c].map(lambda v: v.replace("\x00", "\ufffd") if isinstance(v, str) else v)
    return out


def write_table(jsonl_path: str | os.PathLike, out_path: str | os.PathLike) -> TableSummary:
    """Write the per-face table of ``jsonl_path`` to ``out_path``: CSV (``.csv``) or Parquet (``.parquet``,
    needs pyarrow). The same JSONL always gives the same bytes. The file is replaced only once it is
    complete. Corrupt lines are skipped (see :func:`read_results`) and counted in the summary; a file
    without a single usable record is an error (ValueError, nothing written), as for ``cem report``."""
    out = Path(out_path)
    fmt = table_format(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorruptLinesWarning)
        warnings.simplefilter("always", MixedSettingsWarning)
        df = read_results(jsonl_path)
    mixed = next((str(w.message) for w in caught if issubclass(w.category, MixedSettingsWarning)), None)
    if len(df) == 0:
        skipped, reasons = df.attrs["skipped_lines"], df.attrs["skipped_reasons"]
        raise ValueError(f"{jsonl_path}: no usable record to tabulate"
                         + (f" ({len(skipped)} line(s) skipped; first: {reasons[0]})" if skipped else
                            " (the file holds no records)"))
    tmp = out.with_name(f".{out.name}.part")
    out.parent.mkdir(parents=True, exist_ok=True)  # as the JSONL output's folder is
    try:
        if fmt == "csv":
            _nul_free(df).to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8", errors="surrogateescape")
        else:
            df.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    videos = df["video"].dropna() if "video" in df else pd.Series(dtype=object)
    return TableSummary(os.fspath(out), len(df), int(df["image"].drop(videos.index).nunique()),
                        list(df.attrs["skipped_lines"]), list(df.attrs["skipped_reasons"]),
                        videos=int(videos.nunique()), mixed_settings=mixed)


@pd.api.extensions.register_dataframe_accessor("cem")
class CemAccessor:
    """Column groups of a face table (``df.cem.<group>``), in the spirit of Py-Feat's ``Fex``.

    ``aus`` (intensities) and ``au_presence`` (booleans) have the AU codes as columns; ``expression`` and
    ``emotion`` have the labels; ``pose``, ``bbox``, ``quality`` and ``info`` (image-level and provenance
    fields) keep their column names.
    """

    def __init__(self, df: pd.DataFrame) -> None:
        self._df = df

    def _group(self, name: str, strip_prefix: str = "", strip_suffix: str = "") -> pd.DataFrame:
        cols = column_groups(list(self._df.columns))[name]
        out = self._df[cols]
        if strip_prefix or strip_suffix:
            out = out.rename(columns=lambda c: c.removeprefix(strip_prefix).removesuffix(strip_suffix))
        return out

    @property
    def aus(self) -> pd.DataFrame:
        return self._group("aus")

    @property
    def au_presence(self) -> pd.DataFrame:
        return self._group("au_presence", strip_suffix="_present")

    @property
    def expression(self) -> pd.DataFrame:
        return self._group("expression", strip_prefix="expression_")

    @property
    def emotion(self) -> pd.DataFrame:
        return self._group("emotion", strip_prefix="emotion_")

    @property
    def pose(self) -> pd.DataFrame:
        return self._group("pose")

    @property
    def bbox(self) -> pd.DataFrame:
        return self._group("bbox")

    @property
    def quality(self) -> pd.DataFrame:
        return self._group("quality")

    @property
    def info(self) -> pd.DataFrame:
        return self._group("info")
