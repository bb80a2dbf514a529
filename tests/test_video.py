"""Video: frame sampling and timestamps, one stable track re-acquired after a gap, key moments at an
expression change, outputs, flat memory. Videos are written by the tests themselves with OpenCV."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cem.schema import FaceEvidence, Quality
from cem.video import VideoOptions, track_video

FPS = 30


def write_video(path, frames, fps=FPS, fourcc="mp4v"):
    import cv2

    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


def moving_face_frames(face, n_move=45, n_gap=15, n_back=30, size=(360, 640)):
    """The face moves left to right, leaves for n_gap frames, and comes back where it left."""
    import cv2

    f = cv2.resize(face, (160, 160))
    frames = []
    for i in range(n_move + n_gap + n_back):
        canvas = np.full((*size, 3), 170, np.uint8)
        if i < n_move:
            x = 40 + int(400 * i / (n_move - 1))
        elif i < n_move + n_gap:
            frames.append(canvas)
            continue
        else:
            x = 440
        canvas[100:260, x : x + 160] = f
        frames.append(canvas)
    return frames


@pytest.fixture(scope="module")
def video(tmp_path_factory, face_crop):
    return write_video(tmp_path_factory.mktemp("vid") / "walk.mp4", moving_face_frames(face_crop))


def test_frames_timestamps_and_one_track_reacquired(pipeline, video):
    frames = list(pipeline.analyze_video(video, options=VideoOptions(reason=False)))
    assert [vf.frame for vf in frames] == list(range(90))
    assert [vf.time for vf in frames] == pytest.approx([i / FPS for i in range(90)])
    with_face = [vf.frame for vf in frames if vf.faces]
    assert set(range(45)) <= set(with_face) and set(range(62, 90)) <= set(with_face)
    assert not any(vf.faces for vf in frames[47:58])  # the gap
    ids = {f.track_id for vf in frames for f in vf.faces}
    assert ids == {0}  # one person, one series, re-acquired after leaving
    xs = [vf.faces[0].evidence.bbox[0] for vf in frames[:45]]
    assert xs[-1] - xs[0] > 300  # the box follows the face


def test_sampling_every_and_fps(pipeline, video):
    every = list(pipeline.analyze_video(video, every=3, options=VideoOptions(reason=False)))
    assert [vf.frame for vf in every] == list(range(0, 90, 3))
    fps = list(pipeline.analyze_video(video, fps=10, options=VideoOptions(reason=False)))
    assert [vf.frame for vf in fps] == list(range(0, 90, 3))
    # rates that are no whole divisor of the clip's: the rate asked for, on average (a rounded frame step
    # gave 7.5 for 7 and 15 for 12, 18 and 20)
    fps7 = [vf.frame for vf in pipeline.analyze_video(video, fps=7, options=VideoOptions(reason=False))]
    assert len(fps7) == 21 and fps7[:4] == [0, 5, 9, 13]
    from cem.video import _sampled

    for rate in (12, 18, 20, 24, 29):
        assert sum(_sampled(i, 30.0, None, rate) for i in range(3000)) == rate * 100
    assert all(_sampled(i, 30.0, None, 45) for i in range(100))  # above the clip's rate: every frame


class ScriptedStage:
    """A FER stage whose faces change expression at frame 30 (to test key-moment logic in isolation)."""

    def __init__(self, labels):
        self.labels = labels

    def measure(self, rgb, faces=None, boxes=None, baseline=None, box_extents=None):  # FERStage.measure's signature
        frame_no = int(rgb[0, 0, 0])  # the frame number, decoded from the frame's top-left block
        expr = np.full(len(self.labels), 0.01)
        expr[self.labels.index("happiness" if frame_no < 30 else "sadness")] = 1.0
        expr /= expr.sum()
        return [FaceEvidence(index=0, bbox=(100.0, 100.0, 80.0, 80.0), detection_score=0.9, pose=None,
                             quality=Quality(80, 0.1, False), aus={}, expression=dict(zip(self.labels, expr)))]


def test_key_moment_emitted_at_the_expression_change(tmp_path):
    labels = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
    frames = []
    for i in range(60):
        f = np.full((64, 64, 3), 0, np.uint8)
        f[:8, :8] = i * 4  # survives mp4 compression well enough at block level
        frames.append(f)
    path = write_video(tmp_path / "s.mp4", frames)

    class Stage(ScriptedStage):
        def measure(self, rgb, faces=None, boxes=None, baseline=None, box_extents=None):
            rgb = rgb.copy()
            rgb[0, 0, 0] = int(round(rgb[:8, :8, 0].mean() / 4))
            return super().measure(rgb, faces, boxes, baseline, box_extents)

    opts = VideoOptions(key_interval_s=10.0, change_threshold=0.2, smooth_tau_s=0.05)
    out = list(track_video(Stage(labels), str(path), labels, opts))
    keys = [(vf.frame, f.key_reason) for vf in out for f in vf.faces if f.key]
    assert keys[0] == (0, "first appearance")
    change = [k for k in keys if k[1].startswith("expression change")]
    assert change and 30 <= change[0][0] <= 34  # emitted right at the change, not at an interval
    assert len(keys) <= 4


def test_interval_key_moments_fall_on_whole_intervals(tmp_path):
    """Frame times are i / fps: 260/30 - 200/30 falls a hair under 2.0, and the moment slipped to frame 261."""
    labels = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
    path = write_video(tmp_path / "still.mp4", [np.zeros((64, 64, 3), np.uint8)] * 300)
    class LateStage(ScriptedStage):  # the face appears at frame 1: the moments fall on 1 + 60 k
        calls = 0

        def measure(self, rgb, faces=None, boxes=None, baseline=None, box_extents=None):
            self.calls += 1
            return [] if self.calls == 1 else super().measure(rgb, faces, boxes, baseline, box_extents)

    out = list(track_video(LateStage(labels), str(path), labels,
                           VideoOptions(key_interval_s=2.0, change_threshold=5.0)))
    keys = [vf.frame for vf in out for f in vf.faces if f.key]
    assert keys == [1, 61, 121, 181, 241]


def test_cli_video_outputs(video, tmp_path):
    import csv

    moments, table = tmp_path / "m.jsonl", tmp_path / "f.csv"
    r = subprocess.run([sys.executable, "-m", "cem.cli", "annotate", str(video), "-o", str(moments), "--frames",
                        str(table), "--every", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    *recs, done = [json.loads(x) for x in moments.read_text().splitlines()]
    assert done["video_summary"] == {"frames": 45, "moments": len(recs), "complete": True,  # marks it finished
                                     "frames_decoded": 90, "frames_declared": 90, "frame_sampling": "every 2 frames"}
    assert recs and all({"track_id", "t_start", "t_end", "faces"} <= set(x) for x in recs)
    assert recs[0]["key_reason"] == "first appearance" and recs[0]["faces"][0]["track_id"] == 0
    face = recs[0]["faces"][0]
    assert abs(sum(face["emotion"].values()) - 1) < 1e-3 and face["aus"]
    rows = list(csv.DictReader(table.open()))
    assert 30 <= len(rows) <= 45 and {r["track_id"] for r in rows} == {"0"}
    assert [float(r["time"]) for r in rows] == sorted(float(r["time"]) for r in rows)
    assert "AU12_rel" in rows[0] and "expression_happiness" in rows[0]
    # the face table of a video's records counts the video, not "1 images"
    faces = tmp_path / "faces.csv"
    r = subprocess.run([sys.executable, "-m", "cem.cli", "table", str(moments), "-o", str(faces)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # one row per key moment's face and one for the summary record (no faces)
    assert f"{len(recs) + 1} rows (0 images, 1 video)" in r.stderr


def test_how_short_a_video_may_end_before_it_is_cut():
    from cem.video import DecodeStats

    assert DecodeStats(24, 22).cut_short and not DecodeStats(24, 23).cut_short  # one frame: an estimate's error
    assert DecodeStats(108_000, 107_800).cut_short and not DecodeStats(108_000, 107_900).cut_short  # 0.1 %
    assert not DecodeStats(None, 5).cut_short and not DecodeStats(5, 24).cut_short


def test_a_cut_video_is_processed_as_far_as_it_goes_and_says_it_is_not_complete(pipeline, face_crop, tmp_path):
    """A file that ends before the frames its header declares (a copy cut short, a damaged disk) gives its key
    moments and frame rows up to the cut, then a summary with complete: false and a run note (it said true)."""
    from cem.runner import annotate

    whole = write_video(tmp_path / "whole.avi", moving_face_frames(face_crop, n_move=30, n_gap=0, n_back=30),
                        fourcc="MJPG")  # an AVI still opens when its end is cut (an MP4 loses its index)
    cut = tmp_path / "cut.avi"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    out, frames = tmp_path / "m.jsonl", tmp_path / "f.csv"
    summary = annotate(pipeline, [str(whole), str(cut)], out, progress=False, every=5, frames=frames)
    done = {r["video"]: r["video_summary"] for r in map(json.loads, out.read_text().splitlines())
            if "video_summary" in r}
    assert done[str(whole)] == {"frames": 12, "moments": done[str(whole)]["moments"], "complete": True,
                                "frames_decoded": 60, "frames_declared": 60, "frame_sampling": "every 5 frames"}
    s = done[str(cut)]
    assert s["complete"] is False and s["frames_declared"] == 60 and 20 <= s["frames_decoded"] < 58
    assert s["frames"] == -(-s["frames_decoded"] // 5) and s["moments"] >= 1
    assert any(f"{cut}: the file ended after {s['frames_decoded']} of the 60 frames" in n for n in summary.notes)
    assert not any(str(whole) in n for n in summary.notes)
    moments = [r for r in map(json.loads, out.read_text().splitlines()) if r.get("video") == str(cut) and "frame" in r]
    assert len(moments) == s["moments"] and all(m["frame"] < s["frames_decoded"] for m in moments)


def test_unreadable_video_is_an_error_record(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    out = tmp_path / "m.jsonl"
    r = subprocess.run([sys.executable, "-m", "cem.cli", "annotate", str(bad), "-o", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0
    rec = json.loads(out.read_text())
    assert rec["error"] and str(bad) in rec["error"]


def test_memory_flat_on_a_long_video(tmp_path, face_crop):
    import cv2

    f = cv2.resize(face_crop, (120, 120))
    frames = []
    for i in range(400):
        c = np.full((180, 320, 3), 160, np.uint8)
        x = 20 + (i * 3) % 160
        c[30:150, x : x + 120] = f
        frames.append(c)
    path = write_video(tmp_path / "long.mp4", frames)
    code = ("import resource, sys, cem; from cem.video import VideoOptions; "
            "p = cem.Pipeline.from_config('default'); n = int(sys.argv[2]); rss = []\n"
            "for i, vf in enumerate(p.analyze_video(sys.argv[1], options=VideoOptions(reason=False))):\n"
            "    if i in (n // 4, n - 1): rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            "print(rss[1] - rss[0])")
    r = subprocess.run([sys.executable, "-c", code, str(path), "400"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    growth_kb = int(r.stdout.strip().splitlines()[-1])
    assert growth_kb < 40_000  # frames 100..400 add (almost) nothing


def test_parquet_frame_table(pipeline, video, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from cem.contract import frame_columns
    from cem.fer.aus import AU_NAMES
    from cem.video import FrameTableWriter, frame_rows

    labels = pipeline.config.labels
    path = tmp_path / "frames.parquet"
    writer = FrameTableWriter(path, frame_columns(labels, list(AU_NAMES)))
    n = 0
    for vf in pipeline.analyze_video(video, every=5, options=VideoOptions(reason=False)):
        rows = frame_rows(vf, labels, list(AU_NAMES), str(video))
        n += len(rows)
        writer.write(rows)
    writer.close()
    table = pq.read_table(path)
    assert table.num_rows == n > 0
    assert table.column_names == frame_columns(labels, list(AU_NAMES))
    assert set(table.column("track_id").to_pylist()) == {0}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_frame_table_resume_keeps_old_rows_and_skips_repeats(tmp_path, suffix):
    from cem.video import FrameTableWriter

    if suffix == "parquet":
        pytest.importorskip("pyarrow")
    cols = ["video", "time", "frame", "track_id", "x"]
    row = lambda f: {"video": "v.mp4", "time": f / 10, "frame": f, "track_id": 0, "x": float(f)}  # noqa: E731
    path = tmp_path / f"frames.{suffix}"
    w = FrameTableWriter(path, cols)
    w.write([row(0), row(1)])
    w.close()
    w = FrameTableWriter(path, cols, resume=True)  # an interrupted video, processed again from its start
    w.write([row(0), row(1), row(2)])
    w.close()
    if suffix == "csv":
        import csv

        frames = [int(r["frame"]) for r in csv.DictReader(path.open())]
    else:
        import pyarrow.parquet as pq

        frames = pq.read_table(path).column("frame").to_pylist()
    assert frames == [0, 1, 2]
    with pytest.raises(Exception, match="columns differ"):
        FrameTableWriter(path, cols[:-1], resume=True)


def test_one_video_in_two_manifest_rows_resumed_keeps_both_rows_moments(pipeline, video, tmp_path):
    """A second manifest row for the same video (another rater's column) added before --resume is a new input:
    its key moments are written too, not taken for the first row's (the moment key includes the columns)."""
    from cem.runner import annotate

    out = tmp_path / "m.jsonl"
    one, two = tmp_path / "a.csv", tmp_path / "b.csv"
    one.write_text(f"image,rater\n{video},a\n")
    two.write_text(f"image,rater\n{video},a\n{video},b\n")
    annotate(pipeline, [str(one)], out, progress=False, every=3)
    annotate(pipeline, [str(two)], out, progress=False, every=3, resume=True)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    moments = {r: [x["frame"] for x in recs if "frame" in x and x["meta"]["rater"] == r] for r in "ab"}
    summaries = {x["meta"]["rater"]: x["video_summary"]["moments"] for x in recs if "video_summary" in x}
    assert moments["a"] and moments["a"] == moments["b"]
    assert summaries == {"a": len(moments["a"]), "b": len(moments["b"])}


def test_frame_table_tells_one_video_under_two_contexts_apart_and_resumes_both(pipeline, video, tmp_path):
    """The frame table carries each row's context and manifest columns: one video under two contexts gives two
    sets of rows that can be told apart, and a resume that adds the second context writes its rows (they were
    taken for the first context's and dropped)."""
    import csv

    from cem.runner import annotate

    out, frames = tmp_path / "m.jsonl", tmp_path / "frames.csv"
    one, two = tmp_path / "a.csv", tmp_path / "b.csv"
    one.write_text(f"image,context,rater\n{video},a talk,r1\n")
    two.write_text(f"image,context,rater\n{video},a talk,r1\n{video},a debate,r1\n")
    summary = annotate(pipeline, [str(one)], out, progress=False, every=5, frames=frames)
    assert not any("subject" in n for n in summary.notes)
    first = list(csv.DictReader(frames.open(encoding="utf-8")))
    assert first and {(r["video"], r["context"], r["meta.rater"]) for r in first} == {(str(video), "a talk", "r1")}
    assert list(first[0])[:4] == ["video", "context", "meta.rater", "time"]
    annotate(pipeline, [str(two)], out, progress=False, every=5, frames=frames, resume=True)
    rows = list(csv.DictReader(frames.open(encoding="utf-8")))
    from cem.runner import RunError

    # a new run's records go elsewhere, but this frame table cannot be rebuilt: it is not replaced unasked
    with pytest.raises(RunError, match=r"--frames .*frames.csv already holds an earlier run's frame table"):
        annotate(pipeline, [str(one)], tmp_path / "elsewhere.jsonl", progress=False, every=5, frames=frames)
    assert list(csv.DictReader(frames.open(encoding="utf-8"))) == rows
    subj = tmp_path / "s.csv"  # a subject column means nothing for a video: said, not silently carried
    subj.write_text(f"image,subject\n{video},P1\n")
    said = annotate(pipeline, [str(subj)], tmp_path / "s.jsonl", progress=False, every=30).notes
    assert any("a video's 'subject' column is carried under meta only" in n for n in said)
    by_context = {c: [(r["frame"], r["track_id"]) for r in rows if r["context"] == c] for c in ("a talk", "a debate")}
    assert by_context["a talk"] == [(r["frame"], r["track_id"]) for r in first]  # kept once, not repeated
    assert by_context["a debate"] == by_context["a talk"]
    # a table written without these columns (another cem version, other manifest columns) is not resumed into
    three = tmp_path / "c.csv"
    three.write_text(f"image,context,condition\n{video},a talk,x\n")
    with pytest.raises(RunError, match=r"columns differ.*this run also writes meta\.condition.*give --frames a new"):
        annotate(pipeline, [str(three)], tmp_path / "n.jsonl", progress=False, every=5, frames=frames, resume=True)
    assert not (tmp_path / "n.jsonl").exists()  # refused before the JSONL output was opened


def test_video_options_that_would_do_nothing_are_refused(video, face_crop, tmp_path):
    """Options a new user can pass by mistake are refused (exit 2, saying why) instead of being ignored:
    --every/--fps without a video, both together, --faces whole on a video, Ray options without --engine ray."""
    out = str(tmp_path / "o.jsonl")
    face_png = tmp_path / "face.png"
    Image.fromarray(face_crop).save(face_png)
    cases = [(["annotate", str(face_png), "-o", out, "--every", "2"], "--every applies to video inputs"),
             (["annotate", str(face_png), "-o", out, "--fps", "5"], "--fps applies to video inputs"),
             (["annotate", str(video), "-o", out, "--every", "2", "--fps", "5"], "give one of them"),
             (["annotate", str(video), "-o", out, "--faces", "whole"], "--faces whole does not apply to videos"),
             (["annotate", str(face_png), "-o", out, "--fer-actors", "4"], "--fer-actors applies to --engine ray")]
    for args, words in cases:
        r = subprocess.run([sys.executable, "-m", "cem.cli", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o.jsonl").exists()


def test_a_cut_parquet_frame_table_is_named_with_what_to_do(tmp_path):
    """A run killed while writing a Parquet frame table leaves it without its footer: resuming into it says so
    and what to do, instead of pyarrow's bare message."""
    pytest.importorskip("pyarrow")
    from cem.video import FrameTableWriter, VideoError

    path = tmp_path / "frames.parquet"
    path.write_bytes(b"PAR1" + bytes(200))
    with pytest.raises(VideoError, match=r"not a readable Parquet table .*move it away and resume"):
        FrameTableWriter(path, ["video", "time", "frame", "track_id"], resume=True)


def test_resume_with_a_new_frame_table_says_why_it_stays_empty(pipeline, video, tmp_path):
    """A finished video is skipped by --resume, so a frame table asked for only now gets none of its rows: the
    run says so. A run of videos alone reports no "0 images" line."""
    from cem.runner import annotate

    out, notes = tmp_path / "m.jsonl", []
    first = annotate(pipeline, [str(video)], out, progress=False, every=3, frames=tmp_path / "a.csv")
    assert not any("images" in line for line in first.lines())
    assert any("video(s)" in x and x.endswith(f"-> {out}") for x in first.lines())
    again = annotate(pipeline, [str(video)], out, progress=False, every=3, frames=tmp_path / "b.csv", resume=True,
                     echo=notes.append)
    assert not any("images" in line for line in again.lines())  # a resume of videos alone: no "0 images" either
    assert any("was finished in an earlier run" in n and "b.csv" in n for n in notes)
    notes.clear()
    annotate(pipeline, [str(video)], out, progress=False, every=3, frames=tmp_path / "a.csv", resume=True,
             echo=notes.append)
    assert not any("was finished in an earlier run" in n for n in notes)  # its rows are in a.csv already


def test_landmarks_reach_key_moment_records_too(pipeline, video, tmp_path):
    """--landmarks filled image records only; a key moment is an image record of its frame."""
    from cem.runner import annotate

    out = tmp_path / "m.jsonl"
    annotate(pipeline, [str(video)], out, progress=False, every=10, landmarks=True)
    moments = [r for r in map(json.loads, out.read_text().splitlines()) if "frame" in r]
    assert moments and all(len(m["faces"][0]["landmarks"]) == 478 for m in moments)
    plain = tmp_path / "p.jsonl"
    annotate(pipeline, [str(video)], plain, progress=False, every=10)
    assert all("landmarks" not in m["faces"][0] for m in map(json.loads, plain.read_text().splitlines())
               if "frame" in m)


def test_the_image_size_limits_hold_for_video_frames(pipeline, tmp_path, monkeypatch):
    """image.max_pixels refused a photo while frames of the same size were processed."""
    from cem.runner import annotate
    from cem.video import VideoError, iter_frames

    path = write_video(tmp_path / "v.mp4", [np.zeros((48, 64, 3), np.uint8)] * 3)
    with pytest.raises(VideoError, match=r"frames: image too large: 64x48 = 3072 pixels exceeds the limit of 1000"):
        next(iter_frames(str(path), max_pixels=1000))
    assert len(list(iter_frames(str(path), max_pixels=3072))) == 3
    monkeypatch.setattr(pipeline.fer.config.image, "max_pixels", 1000)
    out = tmp_path / "o.jsonl"
    annotate(pipeline, [str(path)], out, progress=False)
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert "exceeds the limit of 1000" in rec["error"] and rec["video"] == str(path)


def test_a_still_face_keeps_its_box_between_detections(pipeline, face_crop, tmp_path):
    """On tracked frames the box follows the mesh's scale from the last detection: a face that does not move
    keeps the detector's box (it shrank by about 2 % a frame, 17 % in nine, and jumped back at each
    detection, which moved quality.face_px and the AUs with it)."""
    import cv2

    canvas = np.full((360, 640, 3), 90, np.uint8)
    canvas[40:300, 220:480] = cv2.resize(face_crop, (260, 260))
    path = write_video(tmp_path / "still.mp4", [canvas] * 25)
    frames = list(pipeline.analyze_video(path, options=VideoOptions(reason=False)))
    sides = [vf.faces[0].evidence.bbox[2] for vf in frames]
    assert len(sides) == 25
    detected = sides[0]  # frame 0 is a detection frame, then 9 tracked frames
    assert max(abs(s - detected) for s in sides) < 0.03 * detected, [round(s, 1) for s in sides]
    face_px = [vf.faces[0].raw.quality.face_px for vf in frames]
    assert max(face_px) - min(face_px) <= 0.03 * max(face_px)


def test_video_arguments_checked_before_the_first_frame_and_numpy_numbers_taken(pipeline, video, tmp_path):
    """A context that analyze refuses is refused by analyze_video before any frame (it failed at the first
    key moment, after the frames so far had been measured); numpy numbers (a DataFrame's values) are valid
    every/fps; a URL is said to be one."""
    from cem.video import VideoError

    for bad in (5, "x" * 5000):
        gen = pipeline.analyze_video(video, context=bad)  # type: ignore[arg-type]
        with pytest.raises((TypeError, ValueError), match="context"):
            next(gen)
    frames = list(pipeline.analyze_video(video, every=np.int64(30), options=VideoOptions(reason=False)))
    assert [vf.frame for vf in frames] == [0, 30, 60]
    assert len(list(pipeline.analyze_video(video, fps=np.float32(1), options=VideoOptions(reason=False)))) == 3
    with pytest.raises(VideoError, match="a URL; cem reads local files only"):
        next(pipeline.analyze_video("https://example.org/clip.mp4"))


def test_a_frame_table_cut_mid_row_is_mended_on_resume(tmp_path):
    """A run stopped while writing a row (killed, disk full) leaves half a row without its newline; the resumed
    run used to append after it (a corrupt table) and count its frame as written (a lost row)."""
    import csv

    from cem.video import FrameTableWriter

    cols = ["video", "context", "frame", "track_id", "x"]
    row = lambda f: {"video": "v.mp4", "context": "a, \"quoted\"\nline", "frame": f, "track_id": 0,  # noqa: E731
                     "x": float(f)}
    path = tmp_path / "frames.csv"
    w = FrameTableWriter(path, cols)
    w.write([row(0), row(1), row(2)])
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"v.mp4") + 9])  # the last row cut inside its quoted context
    w = FrameTableWriter(path, cols, resume=True)
    w.write([row(0), row(1), row(2), row(3)])
    w.close()
    rows = list(csv.DictReader(path.open(newline="")))
    assert [int(r["frame"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["context"] == row(0)["context"] and len(r) == len(cols) for r in rows)
    # a blank last line is no cut row; a header cut before its end is a table without rows, started again
    path.write_bytes(path.read_bytes() + b"\r\n")
    w = FrameTableWriter(path, cols, resume=True)
    w.write([row(4)])
    w.close()
    assert [int(r["frame"]) for r in csv.DictReader(path.open(newline=""))] == [0, 1, 2, 3, 4]
    path.write_bytes(b"video,cont")
    w = FrameTableWriter(path, cols, resume=True)
    w.write([row(0)])
    w.close()
    assert [int(r["frame"]) for r in csv.DictReader(path.open(newline=""))] == [0]
    # damage before the last row (what the old resume left: a cut row with the next one glued on) is refused,
    # before anything is written, rather than cut away with every row after it
    w = FrameTableWriter(path, cols, resume=True)
    w.write([row(1), row(2)])
    w.close()
    damaged = path.read_bytes().replace(b"v.mp4,", b"", 1)
    stray_quote = path.read_bytes().replace(b"v.mp4,", b'v.mp4,"', 1)  # reads every later row into one cell
    for bad in (damaged, stray_quote, path.read_bytes().replace(b"v.mp4", b"v\xff.mp4", 1)):
        path.write_bytes(bad)
        for attempt in (lambda: FrameTableWriter.check_resume(path, cols),
                        lambda: FrameTableWriter(path, cols, resume=True)):
            with pytest.raises(Exception, match="move it away and resume"):
                attempt()
        assert path.read_bytes() == bad
    # a last row cut inside a character is a cut row; a one-line file that is no table cem began is not wiped
    w = FrameTableWriter(path, cols)
    w.write([row(0), {**row(1), "context": "café"}])
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex("é".encode()) + 1])
    w = FrameTableWriter(path, cols, resume=True)
    w.write([row(0), row(1)])
    w.close()
    assert [int(r["frame"]) for r in csv.DictReader(path.open(newline=""))] == [0, 1]
    path.write_bytes(b"participant,condition,score")
    with pytest.raises(Exception, match="columns differ"):
        FrameTableWriter(path, cols, resume=True)
    assert path.read_bytes() == b"participant,condition,score"


def test_video_options_are_checked_before_the_first_frame(pipeline, video):
    for bad, words in [({"smooth_tau_s": 0}, "smooth_tau_s must be a number > 0"),
                       ({"baseline_min": 0}, "baseline_min must be a whole number >= 1"),
                       ({"max_gap_s": -1}, "max_gap_s must be a number >= 0"),
                       ({"detect_every": 2.5}, "detect_every must be a whole number"),
                       ({"change_threshold": float("nan")}, "change_threshold")]:
        with pytest.raises(ValueError, match=words):
            next(pipeline.analyze_video(video, options=VideoOptions(reason=False, **bad)))
    with pytest.raises(ValueError, match="not a value a record can hold"):
        next(pipeline.analyze_video(video, meta={"n": float("nan")}))


def test_a_video_whose_name_is_not_utf8_is_read(pipeline, video, tmp_path):
    """OpenCV crashes the whole process (a segmentation fault) on such a name; cem opens it through a link."""
    import os
    import shutil

    name = os.path.join(os.fsencode(tmp_path), b"clip\xff.mp4")
    try:
        shutil.copy(video, name)
    except OSError:
        pytest.skip("the file system refuses names that are not UTF-8")
    frames = list(pipeline.analyze_video(os.fsdecode(name), every=30, options=VideoOptions(reason=False)))
    assert [vf.frame for vf in frames] == [0, 30, 60] and all(vf.faces for vf in frames[:2])
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "cem.cli", "annotate", os.fsdecode(name), "-o", str(out),
                        "--every", "30", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[-1]["video_summary"]["frames"] == 3 and records[-1]["image_bytes"]


def test_the_run_summary_image_rate_leaves_out_the_time_spent_on_videos(tmp_path):
    """A run of 40 photos and a long video said "40 images ... in 22.3 s (1.8 images/s)": the video's time."""
    from cem.runner import RunSummary

    summary = RunSummary(tmp_path / "o.jsonl", images=40, faces=40, videos=1, frames=300, moments=4,
                         elapsed_s=22.0, video_s=20.0)
    (line,) = [x for x in summary.lines() if "40 images" in x]
    assert "in 2.0 s (20.0 images/s)" in line


def test_an_interrupted_video_is_not_resumed_at_another_sampling(pipeline, video, tmp_path):
    """Key moments and the summary say how the frames were sampled; a video left unfinished at --every 3 is not
    continued at --fps 7 (its moments would mix two samplings), while a finished one is skipped at any."""
    from cem.runner import RunError, annotate

    out = tmp_path / "m.jsonl"
    annotate(pipeline, [str(video)], out, progress=False, every=3)
    *moments, done = [json.loads(x) for x in out.read_text().splitlines()]
    assert moments and {m["frame_sampling"] for m in moments} == {"every 3 frames"}
    assert done["video_summary"]["frame_sampling"] == "every 3 frames"
    assert annotate(pipeline, [str(video)], out, progress=False, fps=7, resume=True).skipped == 1  # finished
    out.write_text("".join(x + "\n" for x in out.read_text().splitlines()[:-1]))  # as if killed before the end
    with pytest.raises(RunError, match=r"begun in .*m\.jsonl sampling every 3 frames, and this run samples 7 fps"):
        annotate(pipeline, [str(video)], out, progress=False, fps=7, resume=True)
    annotate(pipeline, [str(video)], out, progress=False, every=3, resume=True)  # the same sampling continues it
    *again, done_again = [json.loads(x) for x in out.read_text().splitlines()]
    assert again == moments and done_again["video_summary"] == done["video_summary"]


def rotated_container(path, upright_frames, fps=FPS):
    """A portrait clip as phones store it: the frames sideways (turned 90 degrees counter-clockwise), with a
    display matrix in the MP4 track header (tkhd) that tells players to turn them 90 degrees clockwise."""
    import struct

    import cv2

    side = [np.ascontiguousarray(np.rot90(f)) for f in upright_frames]  # np.rot90: counter-clockwise
    write_video(path, side, fps)
    data = bytearray(path.read_bytes())
    i = data.find(b"tkhd")
    version = data[i + 4]
    # after the box type: version/flags 4, times, track id, reserved, duration (20 or 32), reserved 8, layer,
    # alternate group, volume, reserved 8; then the 3x3 matrix (16.16 fixed point, w 2.30)
    off = i + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    h = side[0].shape[0]
    matrix = [0, 0x10000, 0, -0x10000 & 0xFFFFFFFF, 0, 0, h << 16, 0, 0x40000000]
    data[off: off + 36] = struct.pack(">9I", *matrix)
    path.write_bytes(bytes(data))
    cap = cv2.VideoCapture(str(path))
    angle = cap.get(cv2.CAP_PROP_ORIENTATION_META)
    cap.release()
    return angle


def test_a_portrait_phone_video_is_measured_upright(pipeline, face_crop, tmp_path):
    """A clip whose container says 'rotate 90' (how phones store portrait video) was measured sideways: width
    and height swapped, roll about -75 degrees, a smile read as half as happy and never a key moment."""
    import cv2

    from cem.video import frame_at

    canvas = np.full((480, 320, 3), 170, np.uint8)  # portrait: 320 wide, 480 high
    canvas[120:320, 60:260] = cv2.resize(face_crop, (200, 200))
    frames = [canvas] * 8
    upright = write_video(tmp_path / "upright.mp4", frames)
    angle = rotated_container(tmp_path / "phone.mp4", frames)
    if angle != 90:
        pytest.skip(f"this OpenCV build does not read the MP4 display matrix (says {angle})")
    opts = VideoOptions(reason=False)
    want = list(pipeline.analyze_video(upright, options=opts))
    got = list(pipeline.analyze_video(tmp_path / "phone.mp4", options=opts))
    assert [(vf.width, vf.height) for vf in got] == [(320, 480)] * 8
    for a, b in zip(want, got):
        assert len(a.faces) == len(b.faces) == 1
        ea, eb = a.faces[0].raw, b.faces[0].raw
        assert abs(eb.pose.roll) < 10 and abs(eb.pose.roll - ea.pose.roll) < 3
        assert np.allclose(ea.bbox, eb.bbox, atol=6)
        assert max(abs(ea.expression[k] - eb.expression[k]) for k in ea.expression) < 0.1
    # the report's picture of a key moment is the upright frame too, so that its boxes fall on the face
    assert frame_at(str(tmp_path / "phone.mp4"), 3, 10**8).shape[:2] == (480, 320)


def test_a_full_disk_names_the_frame_table_and_what_is_kept(tmp_path):
    """The JSONL output said which file a full disk stopped and that --resume continues; the --frames table
    ended the run with a bare "[Errno 28] No space left on device"."""
    import csv

    from cem.video import FrameTableWriter

    cols = ["video", "context", "frame", "track_id"]
    w = FrameTableWriter(tmp_path / "frames.csv", cols)
    w._fh.close()
    w._fh = open("/dev/full", "w", newline="", encoding="utf-8")  # noqa: SIM115
    w._w = csv.DictWriter(w._fh, fieldnames=cols)
    w.write([{"video": "v.mp4", "context": None, "frame": 0, "track_id": 0}])  # buffered: fails on the way out
    with pytest.raises(OSError, match=r"frames.csv: cannot write the frame table \(no space left on device\); the "
                                      r"rows written before are kept: make room and run again with --resume"):
        w.close()
