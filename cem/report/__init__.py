"""``cem report``: one self-contained HTML file for a cem JSONL (no network, no external assets).

Per image: a thumbnail (downscaled to ``THUMB_PX``, re-encoded as JPEG, embedded as a data URI) with numbered
face boxes, and per face the emotion distribution beside the expression model's as bars, AU intensities, cues
with their grounding as badges, the rationale, and any error. A summary (counts, emotion histogram) and
filters (top emotion, errors only) sit at the top; video key moments also get one emotion-over-time chart per
tracked face. The first 40 cards render at once and the rest lazily as they scroll into view, so a report of
a few thousand images stays responsive.

Safety, because records and file names are data that anyone may have written:

* the page is rendered by Jinja2 with autoescaping (``report.html.j2``); there is no string substitution;
* the cards' data travel as JSON in a ``<script type="application/json">`` block in which ``<``, ``>``, ``&``
  and every non-ASCII character (U+2028/2029 included) are ``\\u`` escapes, so no value can close the block;
  the page's script reads it with ``JSON.parse`` and builds the DOM with ``textContent`` and DOM properties,
  never ``innerHTML``; the only image URLs are the JPEG data URIs written here, checked again in the page;
* a Content-Security-Policy allows only the page's own script and style (by hash) and ``data:`` images:
  no inline event handler, no remote load;
* each record is checked before use: a line that is not a usable record (not JSON, wrong types, ``faces``
  not a list, strings where numbers belong ...) is skipped with a message naming the file and line, and the
  page shows how many were skipped; NaN/Infinity in a record are shown as ``n/a`` and counted; long texts and
  cue lists are cut (``MAX_TEXT``, ``MAX_CUES``) with a note of how much was left out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cem.report.records import (
    Line,
    Problem,
    RecordError,
    bbox,
    distribution,
    face_list,
    need,
    number,
    read_lines,
    visible,
)

THUMB_PX = 320
MAX_TEXT = 4000  # characters of a rationale, cue, error or context shown (the rest is cut, and said so)
MAX_CUES = 50  # cues shown per face
MAX_FACES = 100  # faces shown per image
MAX_KEYS = 60  # labels and AUs shown per face; emotions in the histogram
MAX_EXTRA = 20  # extra top-level fields (manifest columns) shown per card
MAX_PROBLEMS_SHOWN = 200  # skipped-line messages listed in the page (all are counted)
_HERE = Path(__file__).parent
# top-level record fields the report shows in their own place; any other field is shown as "name: value"
_KNOWN = frozenset({"image", "image_bytes", "width", "height", "faces", "context", "error", "provenance"})
_KNOWN_MOMENT = _KNOWN | {"video", "frame", "time", "track_id", "t_start", "t_end", "key_reason"}
_COLORS = ["#888", "#e6a700", "#1f9bd1", "#3949ab", "#d32f2f", "#2e7d32", "#7b1fa2", "#6d4c41"]
_GROUNDING = ("supported", "contradicted", "unverifiable")


class ReportError(ValueError):
    """No report can be made: the results file holds no usable record, or a file cannot be read or written."""


@dataclass
class ReportSummary:
    """What :func:`write_report` wrote: counts, and every line it skipped with the reason."""

    images: int  # photos (records that are not a video's)
    faces: int
    non_finite: int
    problems: list[Problem] = field(default_factory=list)
    moments: int = 0  # video key moments
    videos: int = 0  # videos: their summary records, or their error records when they could not be read


# ---------------------------------------------------------------------------------------------------
# One record -> the card data the page's script draws


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    """Text as shown: lone surrogates written out (:func:`visible`), cut at ``limit`` characters."""
    text = visible(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def _text(obj: dict[str, Any], key: str, what: str) -> str | None:
    value = need(obj, key, str, what, optional=True)
    return None if value is None else _clip(value)


def _scalar(value: Any) -> str:
    """An extra field's value as one line of text (objects and lists as compact JSON)."""
    if isinstance(value, str):
        return _clip(value, 200)
    return _clip(json.dumps(value, ensure_ascii=False, default=str), 200)


@dataclass
class _Moment:
    """A video key moment: which track of which video, when, and its emotion distribution."""

    video: str
    track: int
    t: float
    emotion: dict[str, float | None]
    # which input the video was (one video may be a manifest's two rows, under two contexts): charts are per input
    source: str = ""


class _Thumbnails:
    """Thumbnails by image path (each file read once); a path is tried as given, then relative to the
    results file's folder. Only regular files are read (a FIFO or device would block or never end)."""

    def __init__(self, base_dirs: Sequence[Path], max_pixels: int) -> None:
        self.base_dirs, self.max_pixels = list(base_dirs), max_pixels
        self.cache: dict[tuple[str, int | None], tuple[str | None, float, str | None, tuple[int, int] | None]] = {}

    def _find(self, image: str) -> str | None:
        candidates = [image] + ([] if os.path.isabs(image) else [str(d / image) for d in self.base_dirs])
        # isfile is False for what cannot be stat'ed, including names with NUL or too long for the system
        return next((c for c in candidates if os.path.isfile(c)), None)

    def get(self, image: str, frame: int | None = None
            ) -> tuple[str | None, float, str | None, tuple[int, int] | None]:
        """(JPEG data URI or None, scale from original to thumbnail pixels, why there is none, the picture's
        size as read); ``frame``: that frame of a video (a key moment's)."""
        if (image, frame) not in self.cache:
            self.cache[(image, frame)] = self._make(image, frame)
        return self.cache[(image, frame)]

    def _make(self, image: str, frame: int | None) -> tuple[str | None, float, str | None, tuple[int, int] | None]:
        from PIL import Image

        from cem.io import load_image
        from cem.video import frame_at

        path = self._find(image)
        if path is None:
            kind = "video" if frame is not None else "image"
            return None, 1.0, f"no thumbnail: the {kind} file is not found from here", None
        try:
            rgb = load_image(path, self.max_pixels) if frame is None else frame_at(path, frame, self.max_pixels)
        except (OSError, ValueError) as e:  # ImageLoadError and VideoError are ValueErrors
            return None, 1.0, f"no thumbnail: {_clip(str(e), 300)}", None
        im = Image.fromarray(rgb)
        size = im.size
        scale = min(1.0, THUMB_PX / max(im.size))
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), scale, None, size


def _pairs(dist: dict[str, float | None]) -> list[list[Any]]:
    return [[_clip(k, 60), v] for k, v in list(dist.items())[:MAX_KEYS]]


def _face(f: dict[str, Any], i: int, scale: float) -> dict[str, Any]:
    what = f"faces[{i}]"
    index = need(f, "index", int, f"{what}.index", optional=True)
    box = None
    raw_box = f.get("bbox")
    if raw_box is not None and not (isinstance(raw_box, list) and None in raw_box):  # NaN there: no box drawn
        box = [round(v * scale, 1) for v in bbox(f, what)]
    track = need(f, "track_id", int, f"{what}.track_id", optional=True)
    aus = []
    for code, au in list((need(f, "aus", dict, f"{what}.aus", optional=True) or {}).items())[:MAX_KEYS]:
        if not isinstance(au, dict):
            raise RecordError(f"'{what}.aus[{code!r}]' is not an object")
        present = need(au, "present", bool, f"{what}.aus[{code!r}].present", optional=True)
        aus.append([_clip(code, 40), number(au.get("intensity"), f"{what}.aus[{code!r}].intensity", optional=True),
                    bool(present)])
    cues_in = need(f, "cues", list, f"{what}.cues", optional=True) or []
    cues = []
    for j, c in enumerate(cues_in[:MAX_CUES]):
        cw = f"{what}.cues[{j}]"
        if not isinstance(c, dict):
            raise RecordError(f"'{cw}' is not an object")
        cues.append({"cue": _text(c, "cue", f"{cw}.cue") or "", "supports": _text(c, "supports", f"{cw}.supports"),
                     "grounding": _text(c, "grounding", f"{cw}.grounding"), "role": _text(c, "role", f"{cw}.role")})
    return {
        "index": i if index is None else index, "box": box, "track": track,
        "top": _text(f, "top_emotion", f"{what}.top_emotion"),
        "emotion": _pairs(distribution(f, "emotion", what, strict=False)),
        "expression": _pairs(distribution(f, "expression", what, strict=False)),
        "aus": aus, "cues": cues, "more_cues": max(0, len(cues_in) - MAX_CUES),
        "rationale": _text(f, "rationale", f"{what}.rationale"), "error": _text(f, "error", f"{what}.error"),
    }


def _moment(rec: dict[str, Any], faces: list[dict[str, Any]]) -> _Moment | None:
    """A video key moment is a record with a ``video`` whose face carries its ``track_id`` (the pipeline
    writes it there; a manifest column named ``track_id`` only reaches the top level, so it cannot pass)."""
    if not isinstance(rec.get("video"), str) or len(faces) != 1:
        return None
    track = faces[0].get("track_id")
    t = number(rec.get("t_end", rec.get("time")), "t_end", optional=True)
    if not isinstance(track, int) or isinstance(track, bool) or t is None:
        return None
    context, meta = rec.get("context"), rec.get("meta")
    source = "; ".join(x for x in (context if isinstance(context, str) else None,
                                   json.dumps(meta, sort_keys=True, default=str) if meta else None) if x)
    return _Moment(rec["video"], track, t, distribution(faces[0], "emotion", "faces[0]", strict=False), source)


def _card(line: Line, thumbs: _Thumbnails) -> tuple[dict[str, Any], _Moment | None]:
    rec = line.record
    image = need(rec, "image", str, "image")
    if not image:
        raise RecordError("'image' is empty")
    error = _text(rec, "error", "error")
    faces = face_list(rec)
    dims = [number(rec.get(k), k, optional=True) for k in ("width", "height")]
    moment = _moment(rec, faces)
    notes = []
    uri, scale = None, 1.0
    is_video = isinstance(rec.get("video"), str)
    frame = rec.get("frame") if moment is not None else None
    # a key moment shows its frame; a video's summary record has no single picture to show
    if not error and (not is_video or (isinstance(frame, int) and not isinstance(frame, bool) and frame >= 0)):
        exact = rec.get("image_bytes")  # a name that is not UTF-8: its exact bytes find the file
        try:
            path = os.fsdecode(base64.b64decode(exact, validate=True)) if isinstance(exact, str) else image
        except (ValueError, TypeError):
            path = image
        uri, scale, why, size = thumbs.get(path, frame if is_video else None)
        made_on = (round(dims[0]), round(dims[1])) if dims[0] is not None and dims[1] is not None else None
        if uri is not None and size is not None and made_on is not None and size != made_on:
            # the file changed since, or another file has its name here: its boxes would be drawn in the wrong place
            uri, why = None, (f"no thumbnail: the file found is {size[0]}x{size[1]} px, the record was made on "
                              f"{made_on[0]}x{made_on[1]} (changed since, or another file of that name)")
        if why:
            notes.append(why)
    if line.non_finite:
        notes.append(f"{line.non_finite} NaN/Infinity value(s) in this record are shown as n/a")
    if len(faces) > MAX_FACES:
        notes.append(f"{len(faces)} faces: the first {MAX_FACES} are shown")
    card = {
        "image": _clip(image, 1000), "thumb": uri, "w": None if dims[0] is None else round(dims[0]),
        "h": None if dims[1] is None else round(dims[1]), "error": error,
        "context": _text(rec, "context", "context"),
        "moment": None if moment is None else f"t = {moment.t:.2f} s, track {moment.track}",
        "extra": [[_clip(k, 60), _scalar(v)] for k, v in rec.items()
                  if k not in (_KNOWN if moment is None else _KNOWN_MOMENT)][:MAX_EXTRA],
        "notes": notes, "faces": [_face(f, i, scale) for i, f in enumerate(faces[:MAX_FACES])],
        "n_faces": len(faces),  # all of the record's faces, shown or not (the page's summary counts them)
        # what the record is, for the summary's counts: a photo, a key moment, or a video's summary or error
        "kind": "moment" if moment is not None else (
            "video" if isinstance(rec.get("video"), str) and ("video_summary" in rec or error) else "image"),
    }
    return card, moment


# ---------------------------------------------------------------------------------------------------
# Timelines (video key moments), drawn as inline SVG by the template


def _timelines(moments: list[_Moment], width: int = 560, height: int = 140, pad: int = 28) -> list[dict[str, Any]]:
    """One chart per (video, track): for each label a polyline of its probability over time."""
    series: dict[tuple[str, str, int], list[_Moment]] = {}
    for m in moments:
        series.setdefault((m.video, m.source, m.track), []).append(m)
    charts = []
    for (video, source, track), ms in series.items():
        ms.sort(key=lambda m: m.t)
        t0, t1 = ms[0].t, ms[-1].t
        span = t1 - t0 if t1 > t0 else 1.0
        labels = list(dict.fromkeys(k for m in ms for k in m.emotion))
        lines = []
        for i, lab in enumerate(labels):
            pts = []
            for m in ms:
                p = m.emotion.get(lab)
                if p is not None:
                    x = pad + (m.t - t0) / span * (width - 2 * pad)
                    y = height - pad - min(max(p, 0.0), 1.0) * (height - 2 * pad)
                    pts.append(f"{x:.1f},{y:.1f}")
            lines.append({"label": _clip(lab, 60), "color": _COLORS[i % len(_COLORS)], "points": " ".join(pts)})
        name = Path(video).name + (f" ({source})" if source else "")
        charts.append({"name": _clip(name, 200), "track_id": track, "t0": t0, "t1": t1,
                       "width": width, "height": height, "pad": pad, "lines": lines})
    return charts


# ---------------------------------------------------------------------------------------------------
# The page


def script_json(obj: Any) -> str:
    """JSON that is safe as the text of a ``<script type="application/json">`` element: ASCII only (so
    U+2028/2029 and lone surrogates are escapes too) and no ``<``, ``>`` or ``&`` (so ``</script>`` and
    ``<!--`` cannot occur). Non-finite numbers are refused (they are not JSON)."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


@functools.lru_cache(maxsize=1)
def _assets() -> tuple[Any, str, str]:
    """The Jinja2 template (autoescaping on), the page's script and its style sheet (read once)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_HERE)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return (env.get_template("report.html.j2"), (_HERE / "report.js").read_text(encoding="utf-8"),
            (_HERE / "report.css").read_text(encoding="utf-8"))


@dataclass
class _Collected:
    """The cards that can be shown, the key moments among them, and every line that was skipped."""

    cards: list[dict[str, Any]]
    moments: list[_Moment]
    problems: list[Problem]
    non_finite: int
    mixed_settings: str | None = None  # the records were made with several settings (pooled in the page)

    def summary(self) -> dict[str, Any]:
        faces = [f for c in self.cards for f in c["faces"]]
        kinds = Counter(c["kind"] for c in self.cards)
        return {
            "images": kinds["image"], "moments": kinds["moment"], "videos": kinds["video"],
            "faces": sum(c["n_faces"] for c in self.cards), "skipped": len(self.problems),
            "non_finite": self.non_finite, "mixed_settings": self.mixed_settings,
            "errors": sum(1 for c in self.cards if c["error"]) + sum(1 for f in faces if f["error"]),
            "top_emotions": [[k, n] for k, n in Counter(f["top"] for f in faces if f["top"]).most_common(MAX_KEYS)],
        }


def _collect(records: Iterable[dict[str, Any] | Line], problems: Sequence[Problem],
             thumbs: _Thumbnails) -> _Collected:
    from cem.sinks import mixed_settings, settings_of

    out = _Collected([], [], list(problems), 0)
    shown: list[dict[str, Any]] = []
    for i, item in enumerate(records):
        line = item if isinstance(item, Line) else Line(f"record {i + 1}", i + 1, item)
        try:
            card, moment = _card(line, thumbs)
        except RecordError as e:
            out.problems.append(Problem(line.where, f"skipped: {e}", line.line))
            continue
        out.cards.append(card)
        shown.append(line.record)
        out.non_finite += bool(line.non_finite)
        if moment is not None:
            out.moments.append(moment)
    out.problems.sort(key=lambda p: p.line)
    out.mixed_settings = mixed_settings(None, settings_of(shown))
    return out


def _render(rep: _Collected, title: str) -> str:
    from markupsafe import Markup

    template, script, style = _assets()
    summary = rep.summary()
    csp = (f"default-src 'none'; script-src '{_sha256(script)}'; style-src '{_sha256(style)}'; "
           "img-src data:; base-uri 'none'; form-action 'none'")
    return str(template.render(
        title=visible(title), csp=csp, summary=summary, timelines=_timelines(rep.moments),
        problems=[visible(str(p)) for p in rep.problems[:MAX_PROBLEMS_SHOWN]],
        problems_more=max(0, len(rep.problems) - MAX_PROBLEMS_SHOWN),
        # escaped by script_json, and the package's own script and style: Markup, so not escaped again
        data_json=Markup(script_json({"summary": summary, "cards": rep.cards})),
        script=Markup(script), style=Markup(style),
    ))


def build_report(records: Iterable[dict[str, Any] | Line], title: str = "cem report",
                 max_pixels: int = 50_000_000, problems: Sequence[Problem] = (),
                 base_dirs: Sequence[str | os.PathLike[str]] = ()) -> str:
    """The HTML page for ``records`` (dicts, or :class:`~cem.report.records.Line` s with their location).

    A record that cannot be shown is skipped and added to the page's list of skipped lines, after
    ``problems`` (lines already rejected by the reader). ``base_dirs``: folders where relative image
    paths are also looked up for thumbnails (after the current directory)."""
    thumbs = _Thumbnails([Path(d) for d in base_dirs], max_pixels)
    return _render(_collect(records, problems, thumbs), title)


def write_report(jsonl: str | os.PathLike[str], out: str | os.PathLike[str], title: str | None = None,
                 max_pixels: int = 50_000_000) -> ReportSummary:
    """Read ``jsonl`` (lines that are not records are skipped and listed), write the page to ``out``.

    Raises :class:`ReportError` when the file holds no usable record or a file cannot be read or written.
    The page goes to a temporary file first, so ``out`` is never left half-written."""
    name = os.fspath(jsonl)
    try:
        lines, problems = read_lines(jsonl)
    except OSError as e:
        raise ReportError(f"{name}: cannot read ({e.strerror or e})") from e
    rep = _collect(lines, problems, _Thumbnails([Path(name).parent], max_pixels))
    if not rep.cards:
        detail = f"{len(rep.problems)} lines skipped; first: {rep.problems[0]}" if rep.problems else "empty file"
        raise ReportError(f"{name}: no usable cem record ({detail})")
    page = _render(rep, title if title is not None else f"cem report: {Path(name).name}")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(page.encode("utf-8"))  # every text in it went through visible(): no lone surrogates
        os.replace(tmp, out)
    except OSError as e:
        raise ReportError(f"{os.fspath(out)}: cannot write the report ({e.strerror or e})") from e
    finally:
        if tmp.exists():  # only when writing failed half-way
            tmp.unlink()
    counts = rep.summary()
    return ReportSummary(counts["images"], counts["faces"], rep.non_finite, rep.problems,
                         moments=counts["moments"], videos=counts["videos"])
