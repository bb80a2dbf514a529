"""The HTML report: self-contained, safe with hostile data, and rendered for real in headless Chromium.

The Chromium tests skip (saying why) only when no Chromium is installed; CI installs the Debian package.
Hostile cases are generated here: files whose names are markup or script, records whose every text field
carries a payload that would set ``document.title`` if it ever ran, and hand-corrupted records.
"""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cem.cli import main
from cem.report import MAX_CUES, MAX_FACES, MAX_KEYS, build_report, script_json, write_report

PWNED = "PWNED"
RUN = f"document.title='{PWNED}'"
# payloads that execute script if they ever become markup, a URL or template code
PAYLOADS = [
    f"<img src=x onerror=\"{RUN}\">", f"<svg onload={RUN}>", f"</script><script>{RUN}</script>",
    f"<!--<script>{RUN}//", f"javascript:{RUN}", f"\"><img src=x onerror={RUN}>", f"'-{RUN}-'",
    f"${{{RUN}}}", "{{ 7*7 }}{% raw %}", "__DATA__", "__TIMELINES__", "a\u2028b\u2029c",
    f"</style><img src=x onerror={RUN}>",
]


@pytest.fixture(scope="module")
def records(pipeline, astronaut, tmp_path_factory):
    import cv2

    root = tmp_path_factory.mktemp("rep")
    canvas = np.full((300, 700, 3), 190, np.uint8)
    face = cv2.resize(np.ascontiguousarray(astronaut[30:270, 110:350]), (220, 220))
    canvas[40:260, 20:240] = face
    canvas[40:260, 400:620] = face[:, ::-1]
    Image.fromarray(canvas).save(root / "two.png")
    Image.fromarray(astronaut).save(root / "one.jpg")
    (root / "bad.jpg").write_bytes(b"nope")
    recs = [pipeline.analyze(str(root / n)).to_dict() for n in ("two.png", "one.jpg", "bad.jpg")]
    assert [len(r["faces"]) for r in recs] == [2, 1, 0]
    return recs


def _data(page: str) -> dict[str, Any]:
    return json.loads(re.search(r'<script type="application/json" id="cem-data">(.*?)</script>', page, re.S).group(1))


def test_report_is_self_contained(records):
    page = build_report(records)
    assert not re.search(r"""(src|href)=["']?https?://""", page)
    assert "<script src" not in page and "<link" not in page
    data = _data(page)
    assert data["summary"]["faces"] == 3 and data["summary"]["images"] == 3 and data["summary"]["errors"] == 1
    assert data["cards"][0]["thumb"].startswith("data:image/jpeg;base64,")
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    assert "default-src 'none'" in csp and "img-src data:" in csp and "unsafe-inline" not in csp


def test_script_json_cannot_close_its_block():
    text = script_json({"a": "</script><!--<script>&\u2028\u2029\udce9"})
    assert not re.search(r"[<>&\u2028\u2029]", text) and text.isascii()
    assert json.loads(text) == {"a": "</script><!--<script>&\u2028\u2029\udce9"}
    with pytest.raises(ValueError):
        script_json({"a": float("nan")})


# ---------------------------------------------------------------------------------------------------
# Chromium


def chromium_flags(tmp_path, window: str, budget_ms: int) -> list[str]:
    """Headless Chromium as this machine's closed network needs it (no background connections)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium'); report not rendered")
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={window}",
            f"--virtual-time-budget={budget_ms}"]


def dump_dom(page: Path, tmp_path, window: str = "1280,2400", budget_ms: int = 4000) -> str:
    flags = chromium_flags(tmp_path, window, budget_ms)
    return subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout


class Dom(HTMLParser):
    """The elements of a dumped DOM: tag, attributes and text (all descendants' text)."""

    VOID = {"img", "meta", "input", "br", "hr", "link", "source"}

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": []}
        self.elements.append(el)
        if tag not in self.VOID:
            self._open.append(el)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self._open:
            el["text"].append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.elements if e["tag"] == tag
                and (cls is None or cls in (e["attrs"].get("class") or "").split())]

    @staticmethod
    def text(el: dict[str, Any]) -> str:
        return "".join(el["text"])


def assert_inert(dom: Dom, title: str) -> None:
    """No script from the data ran, and none of it became an element, handler or URL."""
    assert Dom.text(dom.find("title")[0]) == title  # document.title unchanged (later ones are SVG tooltips)
    handlers = [(e["tag"], k) for e in dom.elements for k in e["attrs"] if k.lower().startswith("on")]
    assert handlers == []
    assert [e["attrs"].get("type") for e in dom.find("script")] == ["application/json", None]
    for img in dom.find("img"):
        assert img["attrs"]["src"].startswith("data:image/jpeg;base64,")
    svgs_outside = len(dom.find("svg")) - len([e for e in dom.find("svg", "timeline")])
    assert svgs_outside == 0
    urls = [(e["tag"], k, v) for e in dom.elements for k, v in e["attrs"].items()
            if k in ("href", "src", "xlink:href", "action", "formaction", "data", "poster", "srcset", "style")
            and not (v or "").startswith("data:image/jpeg;base64,")]
    assert all("javascript:" not in (v or "").lower() and "url(" not in (v or "") for _, _, v in urls), urls


def test_report_in_headless_chromium(records, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(build_report(records))
    markup = dump_dom(page, tmp_path)
    dom = Dom(markup)
    assert len(dom.find("div", "face")) == 3  # drawn by the page's script
    boxes = dom.find("div", "box")
    assert len(boxes) == 3 and all(re.match(r"left: [\d.]+px; top: [\d.]+px", b["attrs"]["style"]) for b in boxes)
    assert "not an image file" in markup and len(dom.find("span", "supported")) >= 1
    assert_inert(dom, "cem report")
    shot = tmp_path / "shot.png"
    subprocess.run([*chromium_flags(tmp_path, "1280,2400", 4000), f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape[1] == 1280 and img.std() > 10  # not a blank page


def test_large_report_renders_lazily(records, tmp_path):
    many = [records[1]] * 300  # one face each
    page = tmp_path / "big.html"
    page.write_text(build_report(many))
    dom = Dom(dump_dom(page, tmp_path, "1280,1000", 3000))
    rendered = len(dom.find("div", "face"))
    assert 40 <= rendered < 300  # the first cards at once, the rest only near the viewport
    assert len(dom.find("section", "card")) == 300  # every card exists, for filtering


# ---------------------------------------------------------------------------------------------------
# Video key moments


def _moment(t, p, labels, video="v.mp4", track=3, **top):
    face = {"index": 0, "bbox": [0, 0, 10, 10], "top_emotion": labels[int(np.argmax(p))],
            "emotion": dict(zip(labels, p)), "expression": dict(zip(labels, p)), "aus": {}, "cues": [],
            "rationale": "", "track_id": track}
    return {"image": video, "video": video, "track_id": track, "t_start": 0.0, "t_end": t, "faces": [face],
            "error": None, "width": 10, "height": 10} | top


def test_video_tracks_get_a_timeline_plot():
    labels = ["neutral", "happiness", "sadness"]
    page = build_report([_moment(0.0, [0.8, 0.1, 0.1], labels), _moment(2.0, [0.2, 0.7, 0.1], labels),
                         _moment(4.0, [0.1, 0.1, 0.8], labels)])
    svg = re.search(r'<section id="timelines">(.*?)</section>', page, re.S).group(1)
    assert svg.count("<polyline") == 3 and "track 3" in svg
    happiness = re.search(r'points="([^"]+)"><title>happiness', svg).group(1).split()
    assert len(happiness) == 3
    ys = [float(p.split(",")[1]) for p in happiness]
    assert ys[1] < ys[0] and ys[1] < ys[2]  # the peak of happiness is at t = 2 s (SVG y grows downwards)


def test_one_video_under_two_contexts_gets_two_timelines_and_moments_show_their_frame(tmp_path):
    """A manifest naming one video twice (a party, a funeral) got one chart with both series interleaved; key
    moments had no picture, and the video's summary card said the video was "not an image file"."""
    import cv2

    labels = ["neutral", "happiness", "sadness"]
    video = tmp_path / "v.mp4"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(20):
        vw.write(np.full((48, 64, 3), i * 10, np.uint8))
    vw.release()
    records = [_moment(t, p, labels, video=str(video), frame=int(t * 10), context=ctx, width=64, height=48)
               for ctx in ("at a party", "at a funeral")
               for t, p in ((0.0, [0.8, 0.1, 0.1]), (1.0, [0.2, 0.7, 0.1]))]
    records.append({"image": str(video), "video": str(video), "width": 64, "height": 48, "faces": [], "error": None,
                    "video_summary": {"frames": 20, "moments": 4, "complete": True}})
    page = build_report(records)
    svg = re.search(r'<section id="timelines">(.*?)</section>', page, re.S).group(1)
    assert "v.mp4 (at a party)" in svg and "v.mp4 (at a funeral)" in svg and svg.count("<polyline") == 6
    data = _data(page)
    cards = data["cards"] if isinstance(data, dict) else data
    moments = [c for c in cards if c["moment"]]
    assert len(moments) == 4 and all(c["thumb"] and c["thumb"].startswith("data:image/jpeg") for c in moments)
    (summary,) = [c for c in cards if c["kind"] == "video"]
    assert summary["thumb"] is None and not summary["notes"]


def test_the_report_summary_counts_images_key_moments_and_videos_apart(tmp_path):
    """`cem report` on a video run said "3 images" for one photo and two key moments."""
    labels = ["neutral", "happiness"]
    image = {"image": "a.jpg", "width": 10, "height": 10, "error": None, "faces": [
        {"index": 0, "bbox": [0, 0, 5, 5], "emotion": {"neutral": 0.3, "happiness": 0.7}, "top_emotion": "happiness"}]}
    summary = {"image": "v.mp4", "video": "v.mp4", "width": 10, "height": 10, "faces": [], "error": None,
               "video_summary": {"frames": 20, "moments": 2, "complete": True}}
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            (image, _moment(0.0, [0.8, 0.2], labels), _moment(2.0, [0.2, 0.8], labels), summary)))
    res = CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "report of 1 images, 2 key moments, 1 videos, 3 faces" in res.stderr
    page = (tmp_path / "r.html").read_text(encoding="utf-8")  # the page's own summary line says the same
    assert '<div id="summary">1 images, 2 key moments, 1 videos, 3 faces, 0 errors' in page


def test_manifest_track_id_column_neither_breaks_nor_fakes_a_timeline():
    labels = ["neutral", "happiness"]
    image = {"image": "a.jpg", "track_id": "abc", "video": "clip-7", "faces": [
        {"index": 0, "bbox": [0, 0, 5, 5], "emotion": {"neutral": 0.3, "happiness": 0.7}, "top_emotion": "happiness"}]}
    # a video run whose manifest also has a track_id column: the record's value is the manifest's
    moments = [_moment(t, [1 - t / 4, t / 4], labels, track_id="manifest-x") for t in (0.0, 2.0, 4.0)]
    page = build_report([image, *moments])
    data = _data(page)
    assert (data["summary"]["images"], data["summary"]["moments"], data["summary"]["skipped"]) == (1, 3, 0)
    assert ["track_id", "abc"] in data["cards"][0]["extra"] and data["cards"][0]["moment"] is None
    assert page.count('<svg class="timeline"') == 1 and "track 3" in page  # the face's track, not the column


# ---------------------------------------------------------------------------------------------------
# Hostile input: names, fields, corrupt records


# (raw JSONL line, what the skip message says); each must be skipped, never a traceback
CORRUPT = [
    ("[1, 2, 3]", "not a JSON object (a list)"),
    ('"just text"', "not a JSON object (a string)"),
    ("null", "not a JSON object (null)"),
    ('{"image": "t.jpg", "fa', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"faces": []}', "no 'image' field"),
    ('{"image": 5}', "'image' is an integer"),
    ('{"image": ""}', "'image' is empty"),
    ('{"image": "t.jpg", "faces": "oops"}', "'faces' is a string, expected a list"),
    ('{"image": "t.jpg", "faces": {"0": {}}}', "'faces' is an object, expected a list"),
    ('{"image": "t.jpg", "faces": [1]}', "'faces[0]' is an integer, expected an object"),
    ('{"image": "t.jpg", "faces": [{"bbox": "0,0,1,1"}]}', "'faces[0].bbox' is a string"),
    ('{"image": "t.jpg", "faces": [{"bbox": [1, 2, 3]}]}', "'faces[0].bbox' has 3 values, expected 4"),
    ('{"image": "t.jpg", "faces": [{"bbox": ["1", "2", "3", "4"]}]}',
     "'faces[0].bbox[0]' is a string, expected a number"),
    ('{"image": "t.jpg", "faces": [{"bbox": [0, 0, -3, 4]}]}', "'faces[0].bbox' has a negative width or height"),
    ('{"image": "t.jpg", "faces": [{"emotion": {"happiness": "0.9"}}]}',
     "'faces[0].emotion['happiness']' is a string, expected a number"),
    ('{"image": "t.jpg", "faces": [{"emotion": [0.1, 0.9]}]}', "'faces[0].emotion' is a list"),
    ('{"image": "t.jpg", "faces": [{"emotion": {"happiness": true}}]}', "'faces[0].emotion['happiness']' is a boolean"),
    ('{"image": "t.jpg", "faces": [{"aus": {"AU12": 3.0}}]}', "'faces[0].aus['AU12']' is not an object"),
    ('{"image": "t.jpg", "faces": [{"aus": {"AU12": {"intensity": "high"}}}]}',
     "'faces[0].aus['AU12'].intensity' is a string"),
    ('{"image": "t.jpg", "faces": [{"cues": "smile"}]}', "'faces[0].cues' is a string"),
    ('{"image": "t.jpg", "faces": [{"cues": [5]}]}', "'faces[0].cues[0]' is not an object"),
    ('{"image": "t.jpg", "faces": [{"cues": [{"cue": ["a"]}]}]}', "'faces[0].cues[0].cue' is a list"),
    ('{"image": "t.jpg", "faces": [{"rationale": 5}]}', "'faces[0].rationale' is an integer"),
    ('{"image": "t.jpg", "faces": [{"index": "0"}]}', "'faces[0].index' is a string"),
    ('{"image": "t.jpg", "faces": [{"track_id": "abc"}]}', "'faces[0].track_id' is a string"),
    ('{"image": "t.jpg", "error": {"msg": 1}}', "'error' is an object"),
    ('{"image": "t.jpg", "width": "512"}', "'width' is a string, expected a number"),
    ('{"image": "t.jpg", "context": 7}', "'context' is an integer"),
]


@pytest.fixture(scope="module")
def hostile(records, tmp_path_factory):
    """A results file mixing valid records with hostile names and fields, NaN, huge lists, and every
    corrupt shape above; returns (jsonl path, valid image names in order, valid face count, skip messages)."""
    root = tmp_path_factory.mktemp("hostile")
    one = records[1]
    src = Path(one["image"])
    lines: list[bytes] = []
    valid: list[str] = []
    faces = 0
    expected_skips: list[tuple[str, str]] = []  # (file:line: , reason)

    def add(rec: dict[str, Any]) -> None:
        nonlocal faces
        lines.append(json.dumps(rec, ensure_ascii=True).encode())
        valid.append(rec["image"])
        faces += len(rec.get("faces") or [])

    add(one)
    lines.append(b"")  # blank lines are neither records nor problems
    for i, payload in enumerate(PAYLOADS):  # real image files whose names are the payloads
        name = payload.replace("/", "\u2215") + ".jpg"
        path = root / name
        shutil.copy(src, path)
        rec = copy.deepcopy(one)
        rec["image"] = str(path)
        f = rec["faces"][0]
        # every text field of the record carries a payload too
        f["rationale"], f["top_emotion"], f["error"] = payload, payload, f"face error {payload}"
        f["cues"] = [{"cue": payload, "supports": payload, "grounding": payload, "role": payload, "weight": 1.0},
                     {"cue": "x", "supports": "y", "grounding": f'supported" onmouseover="{RUN}', "role": "for"}]
        f["emotion"] = {payload: 0.6, **{k: 0.4 / 8 for k in list(f["emotion"])}}
        f["aus"] = {payload: {"intensity": 1.0, "present": True}, **f["aus"]}
        rec["context"] = payload
        rec[payload] = payload  # a manifest column named like a payload
        rec["track_id"] = payload  # a manifest column named track_id (issue 12)
        if i % 2:
            rec["error"] = payload
        add(rec)
    for body in (f'<svg xmlns="http://www.w3.org/2000/svg" onload="{RUN}"/>', f"<script>{RUN}</script>"):
        for name in ("evil.svg", f"evil{len(valid)}.jpg"):  # SVG, and SVG under an image name
            (root / name).write_text(body)
            add({"image": str(root / name), "width": 10, "height": 10, "faces": []})
    add({"image": f"javascript:{RUN}", "faces": []})  # not a file: a name only, never a URL
    weird = os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9 \xff.jpg")  # not UTF-8: surrogate escapes
    shutil.copy(src, weird)
    add({**copy.deepcopy(one), "image": weird})
    big = copy.deepcopy(one)
    big["image"] = "many-cues.jpg"
    big["faces"][0]["cues"] = [{"cue": f"cue {i}", "supports": "happiness", "grounding": "unverifiable"}
                               for i in range(100_000)]
    big["faces"][0]["rationale"] = "x" * 1_000_000
    add(big)
    video = f"__TIMELINES__<svg onload={RUN}>.mp4"  # a video report: key moments get a timeline chart
    for t in (0.0, 1.5):
        m = _moment(t, [0.5, 0.5], [PAYLOADS[0], "happiness"], video=video, track_id=PAYLOADS[1])
        m["faces"][0]["top_emotion"] = PAYLOADS[2]
        add(m)
    add({"image": "minimal.jpg"})
    add({"image": "null-faces.jpg", "faces": None})
    # lines written by hand: NaN and Infinity (not JSON), a non-UTF-8 byte inside a string
    nan = copy.deepcopy(one)
    nan["image"] = "nan-" + one["image"]
    nan["faces"][0]["emotion"]["happiness"], nan["faces"][0]["bbox"][0] = "@NaN@", "@Infinity@"
    nan["faces"][0]["aus"]["AU12"]["intensity"] = "@1e999@"
    lines.append(re.sub(r'"@(NaN|Infinity|1e999)@"', r"\1", json.dumps(nan)).encode())
    valid.append("nan-" + one["image"])
    faces += 1
    lines.append(b'{"image": "raw-\xe9-byte.jpg", "faces": []}')
    valid.append(os.fsdecode(b"raw-\xe9-byte.jpg"))
    path = root / "__DATA__.jsonl"
    for raw, reason in CORRUPT:
        lines.append(raw.encode())
        expected_skips.append((f"{path}:{len(lines)}: ", reason))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, valid, faces, expected_skips


def _shown(name: str) -> str:
    """How the report shows a name: a byte that was not UTF-8 (a surrogate escape) as a \\xNN escape."""
    return re.sub("[\udc80-\udcff]", lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", name)


def test_hostile_report_via_cli(hostile, tmp_path):
    path, valid, n_faces, skips = hostile
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", str(path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.exception is None
    stderr = res.stderr.splitlines()
    for where, reason in skips[:20]:  # each skipped line is named on stderr with its reason (the first 20)
        assert any(line.startswith(f"cem: {where}") and reason in line for line in stderr), (where, reason)
    assert f"and {len(skips) - 20} more skipped lines" in res.stderr
    summary = f"report of {len(valid) - 2} images, 2 key moments, {n_faces} faces, {len(skips)} lines skipped"
    assert summary in res.stderr
    page = out.read_text(encoding="utf-8")
    assert "<title>cem report: __DATA__.jsonl</title>" in page
    assert page.count('<svg class="timeline"') == 1 and "__TIMELINES__&lt;svg onload=" in page
    data = _data(page)
    assert data["summary"]["images"] + data["summary"]["moments"] == len(valid)
    assert data["summary"]["moments"] == 2 and data["summary"]["skipped"] == len(skips)
    assert data["summary"]["non_finite"] == 1
    assert [c["image"] for c in data["cards"]] == [_shown(v) for v in valid]
    listed = re.findall(r"<li>(.*?)</li>", re.search(r'<details id="skipped">(.*?)</details>', page, re.S).group(1))
    assert len(listed) == len(skips)  # all of them, in file order
    for item, (where, reason) in zip(listed, skips):
        assert html.unescape(item).startswith(where) and reason in html.unescape(item), (item, where, reason)
    cues = data["cards"][valid.index("many-cues.jpg")]["faces"][0]
    assert len(cues["cues"]) == MAX_CUES and cues["more_cues"] == 100_000 - MAX_CUES
    assert len(cues["rationale"]) < 5000 and "more characters" in cues["rationale"]
    nan_card = data["cards"][valid.index("nan-" + valid[0])]
    assert nan_card["faces"][0]["box"] is None and any("NaN/Infinity" in n for n in nan_card["notes"])
    assert dict(nan_card["faces"][0]["emotion"])["happiness"] is None
    thumbs = [c["thumb"] is not None for c in data["cards"]]
    assert sum(thumbs) >= len(PAYLOADS) // 2 + 2  # the payload-named copies of a real image got thumbnails


@pytest.mark.parametrize("csp", [True, False], ids=["with-csp", "escaping-alone"])
def test_hostile_report_in_chromium(hostile, tmp_path, csp):
    """No payload runs, with the Content-Security-Policy and without it (escaping alone must hold)."""
    path, valid, n_faces, skips = hostile
    title = f"__DATA__ </title><script>{RUN}</script>{PAYLOADS[0]}"
    out = tmp_path / "r.html"
    write_report(path, out, title=title)
    page = out.read_text(encoding="utf-8")
    if not csp:
        page, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
        assert n == 1
        out.write_text(page, encoding="utf-8")
    dom = Dom(dump_dom(out, tmp_path))
    assert_inert(dom, title)
    assert [Dom.text(e) for e in dom.find("b", "name")] == [_shown(v) for v in valid]  # every valid card
    assert len(dom.find("div", "face")) == n_faces
    summary = [Dom.text(d) for d in dom.elements if d["attrs"].get("id") == "summary"]
    assert len(summary) == 1 and f"{len(skips)} lines skipped" in summary[0]
    assert len(dom.find("img")) >= len(PAYLOADS) // 2 + 2


def test_payload_detection_is_real(tmp_path):
    """Control: the same check sees a payload that does run (without the policy), and the policy stops it."""
    page = build_report([{"image": "a.jpg", "faces": []}], title="t")
    injected = page.replace("<main", f'<img src="x" onerror="{RUN}"><main', 1)
    for keep_csp, title in ((False, PWNED), (True, "t")):
        html_ = injected if keep_csp else re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", injected)
        out = tmp_path / f"c{keep_csp}.html"
        out.write_text(html_, encoding="utf-8")
        assert Dom.text(Dom(dump_dom(out, tmp_path, budget_ms=2000)).find("title")[0]) == title


def test_report_cli_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = CliRunner().invoke(main, ["report", str(empty), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and f"{empty}: no usable cem record (empty file)" in res.stderr
    junk = tmp_path / "junk.jsonl"
    junk.write_text("[1]\nnot json\n")
    res = CliRunner().invoke(main, ["report", str(junk), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2
    assert f"{junk}: no usable cem record (2 lines skipped; first: {junk}:1: not a JSON object (a list))" in res.stderr
    assert not (tmp_path / "r.html").exists()
    good = tmp_path / "good.jsonl"
    good.write_text('{"image": "a.jpg", "faces": []}\n')
    res = CliRunner().invoke(main, ["report", str(good), "-o", "/dev/null/r.html"])
    assert res.exit_code == 2 and "/dev/null/r.html: cannot write the report (Not a directory)" in res.stderr
    res = CliRunner().invoke(main, ["report", str(tmp_path / "typo.jsonl"), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_huge_records_are_cut_and_say_so():
    labels = [f"label{i}" for i in range(500)]
    f = {"index": 0, "bbox": [0, 0, 1, 1], "emotion": {k: 1 / 500 for k in labels}, "top_emotion": "label0"}
    data = _data(build_report([{"image": "crowd.jpg", "faces": [f | {"index": i} for i in range(300)]}]))
    card = data["cards"][0]
    assert len(card["faces"]) == MAX_FACES and card["notes"] == [
        f"300 faces: the first {MAX_FACES} are shown", "no thumbnail: the image file is not found from here"][::-1]
    # the summary counts every face of the records, not only those shown
    assert len(card["faces"][0]["emotion"]) == MAX_KEYS and data["summary"]["faces"] == 300


def test_a_name_that_is_not_utf8_gets_its_thumbnail(records, tmp_path):
    """The record names the file with its exact bytes (image_bytes): the report finds the file by them, and
    image_bytes is a record field, not a manifest column to list on the card."""
    import base64

    from cem.sinks import image_fields

    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.png")
    Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(odd)
    rec = copy.deepcopy(records[1]) | image_fields(odd) | {"width": 60, "height": 40}  # the size it was made on
    assert base64.b64decode(rec["image_bytes"]) == os.fsencode(odd)
    card = _data(build_report([rec]))["cards"][0]
    assert card["thumb"] and card["thumb"].startswith("data:image/") and card["extra"] == []


def test_a_byte_order_mark_and_records_made_with_two_settings(tmp_path):
    """A JSONL an editor saved with a BOM lost its first record in `cem report` (read_results and --resume
    read it); records made with two settings were pooled in the page without a word (read_results warns)."""
    def image(name, digest):
        return {"image": name, "width": 10, "height": 10, "error": None, "provenance": {"settings": digest},
                "faces": [{"index": 0, "bbox": [0, 0, 5, 5], "emotion": {"neutral": 0.3, "happiness": 0.7},
                           "top_emotion": "happiness"}]}

    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(image(f"{k}.jpg", "aaa")) + "\n" for k in "ab").encode())
    res = CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0 and "report of 2 images" in res.stderr and "skipped" not in res.stderr, res.stderr
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="mixed-settings"' not in page
    with path.open("a") as fh:
        fh.write(json.dumps(image("c.jpg", "bbb")) + "\n")
    assert CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path / "r.html")]).exit_code == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="mixed-settings">Note: the records were made with 2 different settings (aaa: 2 image(s), ' \
           'bbb: 1 image(s))' in page


def test_a_file_that_no_longer_matches_its_record_gets_no_thumbnail(tmp_path):
    """A photo resized after it was annotated (or another file of that name found from here) was shown with
    the record's boxes in the wrong place, and nothing said so."""
    from PIL import Image

    from cem.report import build_report

    Image.new("RGB", (250, 200), "gray").save(tmp_path / "a.jpg")
    face = {"index": 0, "bbox": [175, 137, 100, 100], "emotion": {"neutral": 0.3, "happiness": 0.7},
            "top_emotion": "happiness"}
    rec = {"image": str(tmp_path / "a.jpg"), "width": 500, "height": 400, "error": None, "faces": [face]}
    card = _data(build_report([rec]))["cards"][0]
    assert card["thumb"] is None
    assert any("the file found is 250x200 px, the record was made on 500x400" in n for n in card["notes"])
    card = _data(build_report([rec | {"width": 250, "height": 200}]))["cards"][0]  # the size it was made on
    assert card["thumb"].startswith("data:image/jpeg;base64,") and not card["notes"]


def test_bidi_controls_in_names_and_contexts_are_shown_not_obeyed(tmp_path):
    """U+202E in a file name displayed "anna<RLO>gpj.bob" as "anna bob.jpg" (and reversed the image size after
    it); in a context it showed "at a funeral party" where the model read "at a larenuf party". Such controls are
    written out as \\u202e, as lone surrogates are."""
    rec = {"image": "in/anna\u202egpj.bob", "width": 256, "height": 341, "faces": [],
           "context": "at a \u202elarenuf\u202c party", "error": None}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", str(path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    for control in ("\u202e", "\u202c"):
        assert control not in page and json.dumps(control) not in page  # neither raw nor as a JSON escape
    assert "anna\\\\u202egpj.bob" in page and "larenuf\\\\u202c party" in page
