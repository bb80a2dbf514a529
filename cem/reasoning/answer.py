"""The reasoner's answer: JSON schema, a bounded EBNF grammar for constrained decoding, a lenient parser.

In the answer, ``index`` is the face *number* as the prompt shows it (1..n, "Face 1"); the parser turns it
into the record's 0-based index.

Constrained decoding uses xgrammar (chosen over lm-format-enforcer, whose transformers integration does
not import under transformers 5, and outlines, which pulls a heavier stack for the same EBNF engine). The
grammar leaves no free whitespace and bounds every number (0, 1 or 0.d[d]) and string (at most
``MAX_TEXT`` characters of a safe alphabet), the number of cues per face (``MAX_CUES``) and the faces (exactly
the detected ones, in order), so even a randomly initialised model emits valid JSON in a bounded number of
tokens.

The parser is lenient and never raises: JSON inside prose or code fences, trailing commas, single quotes,
numbers as strings or percentages, distributions that sum to 100 or to anything positive; unknown labels
are dropped. It returns per-face answers or a clear error. What it does not accept:

- an answer cut off before its JSON closes (a token limit): it is an error, not a partial distribution, since
  the labels that were never written may be the model's real answer;
- where the reply holds several JSON values (a draft, an echoed example), it reads the *last* one with a
  ``faces`` list (the final answer), not the first;
- faces numbered from 0 are read as such when a 0 is among the numbers and none is beyond n-1; any other
  out-of-range number drops that face rather than putting its answer on another person.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from cem.contract import Cue
from cem.prompting import inert_text

MAX_CUES = 4
MAX_TEXT = 80
SOURCES = ("face", "scene", "body", "text")


def answer_json_schema(labels: list[str], n_faces: int, max_cues: int = MAX_CUES,
                       max_text: int = MAX_TEXT) -> dict[str, Any]:
    """JSON schema of an answer (sent as ``response_format`` to OpenAI-compatible servers)."""
    number = {"type": "number", "minimum": 0, "maximum": 1}
    return {
        "type": "object", "additionalProperties": False, "required": ["faces"],
        "properties": {"faces": {
            "type": "array", "minItems": n_faces, "maxItems": n_faces,
            "items": {
                "type": "object", "additionalProperties": False,
                "required": ["index", "distribution", "cues", "rationale"],
                "properties": {
                    "index": {"type": "integer", "minimum": 1, "maximum": max(1, n_faces)},
                    "distribution": {"type": "object", "additionalProperties": False, "required": list(labels),
                                     "properties": {lab: number for lab in labels}},
                    "cues": {"type": "array", "maxItems": max_cues, "items": {
                        "type": "object", "additionalProperties": False,
                        "required": ["cue", "source", "au", "supports", "weight"],
                        "properties": {
                            "cue": {"type": "string", "maxLength": max_text},
                            "source": {"enum": list(SOURCES)},
                            "au": {"anyOf": [{"type": "string", "pattern": "^AU[0-9]{2}$"}, {"type": "null"}]},
                            "supports": {"enum": list(labels)},
                            "weight": number}}},
                    "rationale": {"type": "string", "maxLength": 2 * max_text},
                }}}},
    }


def _lit(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def answer_grammar(labels: list[str], n_faces: int, au_codes: list[str], max_cues: int = MAX_CUES,
                   max_text: int = MAX_TEXT) -> str:
    """EBNF (xgrammar/GBNF dialect) for an answer about exactly ``n_faces`` faces, in order."""
    q = '\\"'
    lines = []
    faces = " \",\" ".join(f"face{i}" for i in range(1, n_faces + 1)) if n_faces else ""
    lines.append(f'root ::= "{{{q}faces{q}:[" {faces} "]}}"')
    dist = ' "," '.join(f'"{q}{lab}{q}:" num' for lab in labels)
    for i in range(1, n_faces + 1):
        lines.append(f'face{i} ::= "{{{q}index{q}:{i},{q}distribution{q}:{{" dist "}},{q}cues{q}:[" cues "],'
                     f'{q}rationale{q}:" longtext "}}"')
    lines.append(f"dist ::= {dist}")
    lines.append(f'cues ::= "" | cue ("," cue){{0,{max_cues - 1}}}')
    lines.append(f'cue ::= "{{{q}cue{q}:" text ",{q}source{q}:" source ",{q}au{q}:" au ",{q}supports{q}:" label '
                 f'",{q}weight{q}:" num "}}"')
    lines.append("source ::= " + " | ".join(f'"{q}{s}{q}"' for s in SOURCES))
    lines.append('au ::= "null" | ' + " | ".join(f'"{q}{a}{q}"' for a in au_codes))
    lines.append("label ::= " + " | ".join(f'"{q}{lab}{q}"' for lab in labels))
    lines.append('num ::= "0" | "1" | "0." [0-9] [0-9]?')
    lines.append(f'text ::= "{q}" [a-zA-Z0-9 ,.()\'-]{{1,{max_text}}} "{q}"')
    lines.append(f'longtext ::= "{q}" [a-zA-Z0-9 ,.()\'-]{{1,{2 * max_text}}} "{q}"')
    return "\n".join(lines)


def max_answer_chars(labels: list[str], n_faces: int, au_codes: list[str], max_cues: int = MAX_CUES,
                     max_text: int = MAX_TEXT) -> int:
    """Upper bound on the length of any answer the grammar admits. Every token is at least one character,
    so generation with at least this many new tokens always completes the JSON."""
    num = 4
    dist = sum(len(lab) + 3 + num for lab in labels) + len(labels)
    longest_label = max(len(lab) for lab in labels) + 2
    cue = (len('{"cue":,"source":,"au":,"supports":,"weight":}') + max_text + 2 + 7 + 6 + longest_label + num)
    face = (len('{"index":,"distribution":{},"cues":[],"rationale":}') + len(str(n_faces)) + dist
            + max_cues * (cue + 1) + 2 * max_text + 2)
    return len('{"faces":[]}') + n_faces * (face + 1)


# ------------------------------------------------------------------------------------------------ parsing

MAX_CANDIDATES = 16  # JSON spans parsed from each end of a reply


def _fenced(text: str) -> list[str]:
    r"""The contents of closed ``` code fences (an optional ``json`` tag dropped), found with ``str.find`` in
    linear time (a regex with ``\s*(.*?)`` took quadratic time on an unclosed fence followed by whitespace)."""
    out = []
    at = 0
    while (start := text.find("```", at)) >= 0:
        end = text.find("```", start + 3)
        if end < 0:
            break
        body = text[start + 3: end]
        out.append(body[4:] if body[:4].lower() == "json" else body)
        at = end + 3
    return [b.strip() for b in out]


def _candidates(text: str, nested: bool = False) -> tuple[list[str], bool]:
    """(code-fenced blocks, every balanced top-level {...}/[...] span, then the text itself; whether an
    answer is left open at the end: a top-level value that never closes, has begun a faces or distribution
    key and holds no complete answer, as a reply cut off by a token limit has). A stray opener in prose
    ("[see above) {...}") leaves the complete answer after it a candidate: the open part is scanned once more."""
    out = [] if nested else _fenced(text)
    pairs = {"{": "}", "[": "]"}
    stack: list[str] = []
    start, in_str, esc = None, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and stack:
            in_str = True
        elif ch in pairs:
            if not stack:
                start = i
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack and start is not None:
                out.append(text[start : i + 1])
    open_tail = text[start:] if stack and start is not None else ""
    cut = False
    if open_tail and not nested:
        inner, _ = _candidates(open_tail[1:], nested=True)
        complete = [c for c in inner if _has_faces(_loads(c))]
        out += complete
        cut = not complete and bool(_ANSWER_KEY.search(open_tail))
    if len(out) > 2 * MAX_CANDIDATES:  # a degenerate reply ({a}{a}...): parsing each span costs CPU
        out = out[:MAX_CANDIDATES] + out[-MAX_CANDIDATES:]
    if not nested:
        out.append(text)
    return out, cut


_ANSWER_KEY = re.compile(r"""["']?\b(faces|distribution)\b["']?\s*:""", re.I)


def _has_faces(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("faces"), list)


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except (json.JSONDecodeError, RecursionError, ValueError):
        pass
    fixed = re.sub(r",\s*([}\]])", r"\1", s)  # trailing commas
    try:
        return json.loads(fixed)
    except (json.JSONDecodeError, RecursionError, ValueError):
        pass
    if "'" in fixed and '"' not in fixed:
        try:
            return json.loads(fixed.replace("'", '"'))
        except (json.JSONDecodeError, RecursionError, ValueError):
            pass
    return None


# a number or face number written as text is short ("0.35", "35 %", "face #2"); longer text is none
_MAX_NUMBER_TEXT = 40


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        try:
            f = float(v)
        except OverflowError:  # a 400-digit integer: no usable number, not a failed answer
            return None
    elif isinstance(v, str):
        # stripped and bounded first: whitespace runs around optional parts made the match cubic in the text's
        # length (a model padding "1" with 60,000 spaces took 35 s to parse)
        v = v.strip()
        m = re.fullmatch(r"([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)[ \t]*(%?)", v) if len(v) <= _MAX_NUMBER_TEXT else None
        if not m:
            return None
        f = float(m.group(1)) / (100.0 if m.group(2) else 1.0)
    else:
        return None
    return f if math.isfinite(f) and f >= 0 else None



def _face_number(v: Any) -> int | None:
    """A face number as an answer gives it: 2, 2.0, "2", "Face 2", "face #2"; None otherwise."""
    if isinstance(v, str):
        v = v.strip()
        m = re.fullmatch(r"(?:face[ \t]*)?(?:#[ \t]*)?(\d{1,4})", v, re.I) if len(v) <= _MAX_NUMBER_TEXT else None
        return int(m.group(1)) if m else None
    n = _number(v)
    return int(n) if n is not None and float(n).is_integer() and n < 10_000 else None


def _as_mapping(raw: Any) -> Any:
    """A distribution given as a list ([{"label": .., "p": ..}] or [["happiness", 0.9]]) as a dict; other
    values unchanged. Every form then goes through the same checks."""
    if not isinstance(raw, list):
        return raw
    pairs: dict[str, Any] = {}
    for item in raw:
        if isinstance(item, dict) and len(item) >= 2:
            name_key = next((k for k in ("label", "emotion", "name") if k in item), None)
            value_key = next((k for k in ("p", "prob", "probability", "score", "value", "weight") if k in item), None)
            first, second = ((item[name_key], item[value_key]) if name_key and value_key
                             else list(item.values())[:2])  # by position only when the keys say nothing
            if str(first) in pairs:  # which of the two values is meant cannot be known
                first = f"{first} (given twice)"
            pairs[str(first)] = second
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pairs[str(item[0]) + (" (given twice)" if str(item[0]) in pairs else "")] = item[1]
        else:
            pairs[f"unreadable item {str(item)[:30]}"] = None
    return pairs


def _distribution(raw: Any, labels: list[str]) -> dict[str, float] | None:
    raw = _as_mapping(raw)
    if not isinstance(raw, dict):
        return None
    lower = {str(k).strip().lower(): v for k, v in raw.items()}
    vals = {lab: _number(lower.get(lab)) or 0.0 for lab in labels}
    total = sum(vals.values())
    if total <= 0:
        return None
    return {k: v / total for k, v in vals.items()}


def parse_answer(text: Any, labels: list[str], n_faces: int,
                 max_cues: int | None = None) -> tuple[dict[int, dict[str, Any]], str | None]:
    """Text -> ({0-based face index: {"distribution", "cues", "rationale"}}, error or None). Never raises.

    With ``max_cues`` set (strict mode, for answers no grammar constrained) a face whose distribution has
    an unknown label or a value that is not a finite number in [0, 100], or that has more than
    ``max_cues`` cues, gets no answer, and the error says why."""
    try:
        return _parse(text, labels, n_faces, max_cues)
    except Exception as e:  # the contract of this function is "never raises"; report, don't crash
        return {}, f"unparseable answer ({type(e).__name__}: {e})"


def _strict_problem(f: dict[str, Any], labels: list[str], max_cues: int) -> str | None:
    raw = _as_mapping(f.get("distribution", f.get("emotions")))
    if isinstance(raw, dict):
        for k, v in raw.items():
            if str(k).strip().lower() not in labels:
                return f"unknown label {str(k)[:40]!r} in the distribution"
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"distribution value for {str(k)[:40]!r} is not a number"
            if not 0 <= v <= 100 or not math.isfinite(v):  # (a huge integer fails the range first)
                return f"distribution value for {str(k)[:40]!r} is out of range ({repr(v)[:24]})"
    cues = f.get("cues") or []
    if not isinstance(cues, list):
        return "cues is not a list"
    if len(cues) > max_cues:
        return f"{len(cues)} cues (at most {max_cues})"
    return None


def _clean(s: str, limit: int) -> str:
    """Text from an answer, bounded and inert (:func:`cem.prompting.inert_text`, as contexts are kept): a NUL
    cut the rationale short where pandas read the CSV table, a right-to-left override turned the report's text
    around; lone surrogates (valid JSON escapes, not encodable) are dropped with them."""
    return inert_text(s[:limit])


def _read_faces(faces: list[Any], labels: list[str], n_faces: int, max_cues: int | None
                ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The per-face answers of one ``faces`` list and the problems of the faces it gives none for."""
    out: dict[int, dict[str, Any]] = {}
    problems: dict[int, str] = {}
    numbers = [_face_number(f.get("index", f.get("face"))) if isinstance(f, dict) else None for f in faces]
    given = {k for k in numbers if k is not None}
    # faces numbered from 0 (as in 0-based code): a 0 among the numbers, none beyond n-1, and not every face
    # numbered 1..n (then a 0 is an extra entry, not a numbering)
    offset = 0 if 0 in given and max(given) <= n_faces - 1 and not set(range(1, n_faces + 1)) <= given else 1
    for pos, f in enumerate(faces):
        if not isinstance(f, dict):
            continue
        number = numbers[pos]
        if number is None and given:  # unnumbered beside numbered entries: whose it is cannot be known
            continue
        idx = number - offset if number is not None else pos
        if n_faces == 1 and not given & {0, 1}:  # one face, numbered oddly: it is that face
            idx = 0
        if not 0 <= idx < n_faces or idx in out:
            continue
        if max_cues is not None and (problem := _strict_problem(f, labels, max_cues)):
            problems[idx] = problem
            continue
        dist = _distribution(f.get("distribution", f.get("emotions")), labels)
        if dist is None:
            continue
        cues = []
        for c in f.get("cues") or []:
            if not isinstance(c, dict) or not isinstance(c.get("cue"), str):
                continue
            src = str(c.get("source", "face")).lower()
            sup = str(c.get("supports", "")).lower()
            au = c.get("au")
            au = au.upper() if isinstance(au, str) and re.fullmatch(r"(?i)AU\d{2}", au.strip()) else None
            w = _number(c.get("weight"))
            cues.append(Cue(cue=_clean(c["cue"], 200), source=src if src in SOURCES else "face",  # type: ignore[arg-type]
                            supports=sup if sup in labels else "", weight=min(1.0, w if w is not None else 0.5),
                            au=au))
        rationale = f.get("rationale")
        out[idx] = {"distribution": dist, "cues": [c for c in cues if c.supports],
                    "rationale": _clean(rationale, 500) if isinstance(rationale, str) else ""}
        problems.pop(idx, None)
    return out, problems


def _parse(text: Any, labels: list[str], n_faces: int,
           max_cues: int | None = None) -> tuple[dict[int, dict[str, Any]], str | None]:
    if not isinstance(text, str):
        return {}, f"answer is not text ({type(text).__name__})"
    candidates, cut = _candidates(text)
    if cut:  # the final answer was cut (a complete draft before it is not the answer)
        return {}, ("the answer is cut off: its JSON never closes (the model reached its token limit?), "
                    "so the labels it did not write are unknown")
    parsed = [d for d in map(_loads, candidates) if isinstance(d, (dict, list))]
    with_faces = [d for d in parsed if _has_faces(d)]
    if not parsed:
        snippet = text.strip().replace("\n", " ")[:80]
        return {}, f"no JSON found in the answer: {snippet!r}"
    # the last complete answer that gives a face a valid answer wins (a draft may come first, an echoed
    # example with all-zero values after it); else the last one, for its error
    best: tuple[dict[int, dict[str, Any]], dict[int, str]] | None = None
    for data in reversed(with_faces) if with_faces else parsed[:1]:
        faces = data.get("faces") if isinstance(data, dict) else data
        if isinstance(data, dict) and faces is None and "distribution" in data:
            faces = [data]
        if not isinstance(faces, list):
            return {}, "answer has no 'faces' list"
        found = _read_faces(faces, labels, n_faces, max_cues)
        if best is None or (found[0] and not best[0]):
            best = found
        if found[0]:
            break
    assert best is not None
    out, problems = best
    missing = [i + 1 for i in range(n_faces) if i not in out]
    err = None
    if missing:
        why = "; ".join(f"face {i + 1}: {p}" for i, p in sorted(problems.items()) if i not in out)
        err = f"no valid answer for face(s) {missing}" + (f" ({why})" if why else "")
    return out, err
