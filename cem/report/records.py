"""Reading a cem JSONL that may have been edited by hand, truncated or corrupted, for ``cem report`` and
``cem eval``: every line is either a record (a JSON object) or a :class:`Problem` naming the file and line.

Non-finite numbers (``NaN``, ``Infinity``, or a literal such as ``1e999`` that overflows a float) are not
valid JSON and cannot be drawn or scored: they are read as ``None`` and counted per record, so that callers
can say so. Bytes that are not UTF-8 are kept as surrogate escapes (the same convention as file names on
POSIX), so a record whose path is not UTF-8 still names that path losslessly.

The shape checks here are the ones both readers need; each reader then checks the fields it uses with
:func:`need`, :func:`number` and friends, which raise :class:`RecordError` with the field's path.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any


class RecordError(ValueError):
    """A record whose shape makes it unusable; the message names the field and what is wrong with it."""


@dataclass(frozen=True)
class Problem:
    """A line that was skipped: ``where`` is ``file:line`` (``line`` orders problems by position)."""

    where: str
    message: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Line:
    """One JSON object read from a JSONL line: its location, the object, how many non-finite numbers in it
    were replaced by ``None``."""

    where: str
    line: int
    record: dict[str, Any]
    non_finite: int = 0


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


class _Decoder:
    """json.loads hooks that turn non-finite numbers into None and count them (per line)."""

    def __init__(self) -> None:
        self.count = 0

    def constant(self, token: str) -> None:  # NaN, Infinity, -Infinity
        self.count += 1
        return None

    def float(self, token: str) -> float | None:
        v = float(token)
        if math.isfinite(v):
            return v
        self.count += 1  # 1e999 and the like
        return None

    def int(self, token: str) -> int | None:
        if len(token.lstrip("-")) > 308:  # beyond float range (and Python refuses over 4300 digits)
            self.count += 1
            return None
        return int(token)


def read_lines(path: str | os.PathLike[str]) -> tuple[list[Line], list[Problem]]:
    """Every JSON object in ``path`` with its line number, and a :class:`Problem` for every other non-blank
    line (not JSON, or JSON that is not an object). Raises ``OSError`` if the file cannot be read."""
    name = os.fspath(path)
    lines: list[Line] = []
    problems: list[Problem] = []
    with open(name, "rb") as fh:
        raws = list(fh)
    for n, raw in enumerate(raws, start=1):
        where = f"{name}:{n}"
        if not raw.strip():
            continue
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark an editor added (read_results skips it)
            raw = raw[3:]
        text = raw.decode("utf-8", errors="surrogateescape")
        hooks = _Decoder()
        try:
            obj = json.loads(text, parse_constant=hooks.constant, parse_float=hooks.float, parse_int=hooks.int)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e) or type(e).__name__
            problems.append(Problem(where, f"not valid JSON ({reason})", n))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(where, f"not a JSON object ({_type_name(obj)})", n))
            continue
        lines.append(Line(where, n, obj, hooks.count))
    return lines, problems


# lone surrogates, and the bidirectional controls that reorder the text around them (U+202E turned
# "anna<RLO>gpj.bob" into "anna bob.jpg" on the page, with the image size after it reversed too)
_SURROGATE = re.compile("[\ud800-\udfff\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def _escape_surrogate(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with every lone surrogate written out: a byte that was not UTF-8 (a surrogate escape,
    U+DC80..U+DCFF) as ``\\xNN``, any other as ``\\uNNNN``. Such text cannot be encoded as UTF-8, and
    browsers handle it badly (headless Chromium crashes serialising it), so the report shows it escaped.
    Bidirectional controls (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F, U+061C) are written out as
    ``\\uNNNN`` too: shown as they act, they reorder a file name or a context (and the text beside it) into
    something else than what the file or the model has."""
    return _SURROGATE.sub(_escape_surrogate, text) if _SURROGATE.search(text) else text


# ---------------------------------------------------------------------------------------------------
# Field checks shared by the report and eval readers


def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, optional: bool = False) -> Any:
    """``obj[key]`` if it has type ``kind`` (``None`` too when ``optional``), else :class:`RecordError`
    naming ``what`` (the field's path, e.g. ``faces[0].bbox``)."""
    value = obj.get(key)
    if value is None and optional:
        return None
    if value is None and key not in obj:
        raise RecordError(f"no '{what}' field")
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise RecordError(f"'{what}' is a boolean")
    if not isinstance(value, kind):
        raise RecordError(f"'{what}' is {_type_name(value)}")
    return value


def number(value: Any, what: str, optional: bool = False) -> float | None:
    """A finite number (ints and floats, not booleans or numeric strings), or ``None`` when ``optional``."""
    if value is None:
        if optional:
            return None
        raise RecordError(f"'{what}' is null (or was NaN/Infinity in the file)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"'{what}' is {_type_name(value)}, expected a number")
    if not math.isfinite(value):
        raise RecordError(f"'{what}' is not finite")
    return float(value)


def face_list(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's ``faces`` (missing or null means none), each checked to be an object."""
    faces = record.get("faces")
    if faces is None:
        return []
    if not isinstance(faces, list):
        raise RecordError(f"'faces' is {_type_name(faces)}, expected a list")
    for i, f in enumerate(faces):
        if not isinstance(f, dict):
            raise RecordError(f"'faces[{i}]' is {_type_name(f)}, expected an object")
    return faces


def bbox(face: dict[str, Any], what: str) -> tuple[float, float, float, float]:
    """A face's ``[x, y, w, h]``: four finite numbers, width and height not negative."""
    box = need(face, "bbox", list, f"{what}.bbox")
    if len(box) != 4:
        raise RecordError(f"'{what}.bbox' has {len(box)} values, expected 4")
    x, y, w, h = (number(v, f"{what}.bbox[{i}]") for i, v in enumerate(box))
    assert x is not None and y is not None and w is not None and h is not None
    if w < 0 or h < 0:
        raise RecordError(f"'{what}.bbox' has a negative width or height")
    return x, y, w, h


def distribution(face: dict[str, Any], key: str, what: str, *, strict: bool) -> dict[str, float | None]:
    """A face's label -> probability mapping (``emotion`` or ``expression``; missing means empty).

    ``strict``: every value must be a finite number >= 0 (for scoring); otherwise ``None`` (a non-finite
    number in the file) is kept, to be shown as missing."""
    from cem.contract import DISTRIBUTION_TOLERANCE

    dist = need(face, key, dict, f"{what}.{key}", optional=True) or {}
    out: dict[str, float | None] = {}
    for label, v in dist.items():
        p = number(v, f"{what}.{key}[{label!r}]", optional=not strict)
        if p is not None and p < 0:
            raise RecordError(f"'{what}.{key}[{label!r}]' is negative ({p})")
        if strict and p is not None and p > 1 + DISTRIBUTION_TOLERANCE:
            raise RecordError(f"'{what}.{key}[{label!r}]' is above 1 ({p}): not a probability")
        out[label] = p
    total = sum(p for p in out.values() if p is not None)
    # as the contract has it: a distribution that does not sum to 1 was edited or broken, not renormalised here
    if strict and out and math.isfinite(total) and abs(total - 1.0) > DISTRIBUTION_TOLERANCE:
        raise RecordError(f"'{what}.{key}' sums to {total:.6g}, not 1: not a distribution")
    return out
