"""``cem report``: one self-contained HTML file for a cem JSONL (no network, no external assets).

Per image: a thumbnail (downscaled to ``THUMB_PX``, JPEG, embedded as a data URI) with numbered face boxes,
and per face the emotion distribution beside the expression model's as bars, AU intensities, cues with
their grounding as badges, the rationale, and any error. A summary (counts, emotion histogram) and
filters (top emotion, errors only) sit at the top. The first 40 cards render at once and the rest
lazily as they scroll into view, so a report of a few thousand images stays responsive.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

THUMB_PX = 320


def _thumbnail(path: str, max_pixels: int) -> tuple[str | None, float]:
    """(data URI or None, scale from original pixels to thumbnail pixels)."""
    from PIL import Image

    from cem.io import ImageLoadError, load_image

    try:
        rgb = load_image(path, max_pixels)
    except (ImageLoadError, OSError):
        return None, 1.0
    im = Image.fromarray(rgb)
    scale = min(1.0, THUMB_PX / max(im.size))
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), scale


def _card_data(rec: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    uri, scale = _thumbnail(rec["image"], max_pixels) if not rec.get("error") else (None, 1.0)
    faces = []
    for f in rec.get("faces") or []:
        faces.append({
            "index": f["index"], "box": [v * scale for v in f["bbox"]], "top": f.get("top_emotion", ""),
            "emotion": f.get("emotion", {}), "expression": f.get("expression", {}),
            "aus": {k: v["intensity"] for k, v in (f.get("aus") or {}).items()},
            "present": [k for k, v in (f.get("aus") or {}).items() if v.get("present")],
            "cues": f.get("cues", []), "rationale": f.get("rationale", ""), "error": f.get("error"),
            "quality": f.get("quality", {}), "pose": f.get("pose"),
        })
    return {"image": rec["image"], "thumb": uri, "w": rec.get("width"), "h": rec.get("height"),
            "scale": scale, "error": rec.get("error"), "faces": faces}


def timelines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Video key-moment records grouped per (video, track): time points and the emotion distribution."""
    series: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        if "track_id" not in r or not r.get("faces"):
            continue
        key = (r.get("video", r["image"]), int(r["track_id"]))
        s = series.setdefault(key, {"video": key[0], "track_id": key[1], "t": [], "emotion": []})
        s["t"].append(float(r.get("t_end", r.get("time", 0.0))))
        s["emotion"].append(r["faces"][0]["emotion"])
    return list(series.values())


def timeline_svg(series: dict[str, Any], width: int = 560, height: int = 140) -> str:
    """An inline SVG line chart of one track's emotion probabilities over time (no external assets)."""
    colors = ["#888", "#e6a700", "#1f9bd1", "#3949ab", "#d32f2f", "#2e7d32", "#7b1fa2", "#6d4c41"]
    ts = series["t"]
    t0, t1 = min(ts), max(ts) if max(ts) > min(ts) else min(ts) + 1
    labels = list(series["emotion"][0])
    pad = 28
    def xy(t: float, p: float) -> str:
        return f"{pad + (t - t0) / (t1 - t0) * (width - 2 * pad):.1f},{height - pad - p * (height - 2 * pad):.1f}"
    lines = []
    for i, lab in enumerate(labels):
        pts = " ".join(xy(t, e.get(lab, 0.0)) for t, e in zip(ts, series["emotion"]))
        lines.append(f'<polyline fill="none" stroke="{colors[i % len(colors)]}" stroke-width="2" points="{pts}">'
                     f"<title>{html.escape(lab)}</title></polyline>")
    legend = " ".join(f'<tspan fill="{colors[i % len(colors)]}">{html.escape(lab)}</tspan>'
                      for i, lab in enumerate(labels))
    return (f'<svg class="timeline" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<rect width="{width}" height="{height}" fill="#fff" stroke="#ddd"/>'
            f'<text x="{pad}" y="14" font-size="11">{html.escape(Path(series["video"]).name)} track '
            f'{series["track_id"]}: emotion over time ({t0:.1f}-{t1:.1f} s)</text>'
            f'<text x="{pad}" y="{height - 6}" font-size="10">{legend}</text>' + "".join(lines) + "</svg>")


def build_report(records: list[dict[str, Any]], title: str = "cem report", max_pixels: int = 50_000_000) -> str:
    cards = [_card_data(r, max_pixels) for r in records]
    tops = Counter(f["top"] for c in cards for f in c["faces"])
    n_faces = sum(len(c["faces"]) for c in cards)
    n_err = sum(1 for c in cards if c["error"]) + sum(1 for c in cards for f in c["faces"] if f["error"])
    labels = list(dict.fromkeys(k for c in cards for f in c["faces"] for k in f["emotion"]))
    summary = {"images": len(cards), "faces": n_faces, "errors": n_err, "top_emotions": dict(tops.most_common()),
               "labels": labels}
    payload = json.dumps({"summary": summary, "cards": cards}).replace("</", "<\\/")
    charts = "".join(timeline_svg(s) for s in timelines(records))
    return (_TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
            .replace("__TIMELINES__", f'<section id="timelines">{charts}</section>' if charts else ""))


def write_report(jsonl: str | Path, out: str | Path, title: str | None = None) -> dict[str, int]:
    from cem.io import read_jsonl

    records = list(read_jsonl(jsonl))
    Path(out).write_text(build_report(records, title or f"cem report: {Path(jsonl).name}"), encoding="utf-8")
    return {"images": len(records), "faces": sum(len(r.get("faces") or []) for r in records)}


_TEMPLATE = (Path(__file__).parent / "report_template.html").read_text(encoding="utf-8")
