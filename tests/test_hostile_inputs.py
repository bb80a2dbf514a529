"""Hostile inputs and crashes: nothing lost, nothing hung, every bad input one clear error record.

Everything is generated on the spot. Each case asserts the exact records written, that no valid record
was lost, that the error names the input and the problem, and the exit status. CLI cases run the real
``cem`` in a subprocess; API cases call :func:`cem.runner.annotate` with the session's pipeline. Tests that
need file permissions to bite run the CLI without the DAC capabilities when the suite runs as root.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cem.config import Config, ConfigError
from cem.runner import RunError, annotate
from cem.sinks import OutputLock

ROOT = os.geteuid() == 0
SETPRIV = shutil.which("setpriv")


def _cem(*args, cwd=None, drop_dac=False, timeout=300):
    """Run the real CLI. ``drop_dac``: as root, without the capabilities that bypass file permissions."""
    cmd = [sys.executable, "-m", "cem.cli", *map(os.fsdecode, args)]
    if drop_dac and ROOT:
        cmd = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, errors="replace")


def _strict_records(path) -> list[dict]:
    """Every line must be strict UTF-8 JSON (no NaN/Infinity) holding an object."""
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")

    out = []
    for line in Path(path).read_bytes().splitlines():
        rec = json.loads(line.decode("utf-8"), parse_constant=no_constants)
        assert isinstance(rec, dict)
        out.append(rec)
    return out


def _strip_timings(recs):
    for r in recs:
        r["provenance"].pop("timings_ms", None)
    return recs


@pytest.fixture(scope="module")
def face_png(tmp_path_factory, face_crop) -> Path:
    p = tmp_path_factory.mktemp("face") / "face.png"
    Image.fromarray(face_crop).resize((96, 96)).save(p)
    return p


def _run(pipeline, inputs, out, **kw):
    kw.setdefault("faces", "whole")
    kw.setdefault("progress", False)
    messages: list[str] = []
    summary = annotate(pipeline, [os.fspath(i) for i in inputs], out, echo=messages.append, **kw)
    return summary, messages


# ---------------------------------------------------------------- one folder of everything that can go wrong
@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory, face_png) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    good = face_png.read_bytes()
    (root / "good.png").write_bytes(good)
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as fh:  # a name that is not UTF-8
        fh.write(good)
    (root / "a: b.png").write_text("not a picture, and a name with ': ' in it")
    (root / "dir.jpg").mkdir()
    (root / "dir.jpg" / "inner.png").write_bytes(good)
    os.symlink("loop.jpg", root / "loop.jpg")
    os.symlink("nowhere.png", root / "dangling.jpg")
    os.mkfifo(root / "fifo.jpg")
    Image.new("L", (70000, 10)).save(root / "wide.png")
    Image.new("L", (2000, 40)).save(root / "strip.png")
    Image.new("RGB", (2600, 1800), (120, 110, 100)).save(root / "big.png")
    (root / "empty.png").write_bytes(b"")
    (root / "locked").mkdir()
    (root / "locked" / "hidden.png").write_bytes(good)
    (root / "locked").chmod(0)
    (root / "secret.png").write_bytes(good)
    (root / "secret.png").chmod(0)
    return root


EXPECTED_ERRORS = {
    "a: b.png": "not an image file PIL can read",
    "dir.jpg": "is a folder, not an image",
    "loop.jpg": "symbolic link loop",
    "dangling.jpg": "broken symbolic link",
    "fifo.jpg": "not a regular file (a FIFO",
    "wide.png": "image too large: 70000x10 px, limit 65535 px per side",
    "empty.png": "empty file (0 bytes)",
    "locked": "permission denied (a folder that cannot be listed)",
    "secret.png": "permission denied",
}
EXPECTED_OK = {"good.png", "caf\\xe9.png", "inner.png", "big.png", "strip.png"}


@pytest.mark.skipif(ROOT and not SETPRIV, reason="running as root without setpriv: permissions do not bite")
def test_cli_hostile_folder_one_record_each_then_resume_then_workers(hostile_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    r = _cem("annotate", hostile_folder, "-o", out, "--faces", "whole", "--csv", tmp_path / "t.csv",
             drop_dac=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    recs = _strict_records(out)
    by_name = {Path(rec["image"]).name: rec for rec in recs}
    assert len(recs) == len(EXPECTED_ERRORS) + len(EXPECTED_OK) == len(by_name)
    for name, problem in EXPECTED_ERRORS.items():
        rec = by_name[name]
        assert rec["error"].startswith(rec["image"] + ": ") and problem in rec["error"], rec["error"]
        assert rec["faces"] == []
    for name in EXPECTED_OK:
        assert by_name[name]["error"] is None and len(by_name[name]["faces"]) == 1, by_name[name]
    # the non-UTF-8 name: shown with \xNN, and exactly recoverable
    raw = by_name["caf\\xe9.png"]
    assert base64.b64decode(raw["image_bytes"]) == os.path.join(os.fsencode(hostile_folder), b"caf\xe9.png")
    assert all("image_bytes" not in rec for name, rec in by_name.items() if name != "caf\\xe9.png")
    # the summary groups problems without the names (a name with ': ' does not garble it)
    assert f"{len(recs)} images, {len(EXPECTED_OK)} faces, {len(EXPECTED_ERRORS)} errors" in r.stderr
    assert "  1 x not an image file PIL can read" in r.stderr and "  1 x b.png" not in r.stderr
    assert "  2 x permission denied" in r.stderr
    before = out.read_bytes()

    r2 = _cem("annotate", hostile_folder, "-o", out, "--faces", "whole", "--resume", drop_dac=True)
    assert r2.returncode == 0, r2.stderr
    assert out.read_bytes() == before  # nothing redone, nothing lost, the non-UTF-8 name matched
    assert f"{len(recs)} input(s) already in" in r2.stderr and "0 images" in r2.stderr

    par = tmp_path / "par.jsonl"
    r3 = _cem("annotate", hostile_folder, "-o", par, "--faces", "whole", "--workers", "2", drop_dac=True)
    assert r3.returncode == 0, r3.stderr
    assert _strip_timings(_strict_records(par)) == _strip_timings(recs)


# ---------------------------------------------------------------- arguments that find nothing: exit 2
@pytest.mark.parametrize("make,arg,problem", [
    (lambda d: None, "*.jpg", "no file matches this pattern"),
    (lambda d: None, "typo.jpg", "typo.jpg: file not found"),
    (lambda d: None, "typo_folder/", "file not found"),
    (lambda d: (d / "empty").mkdir(), "empty", "no image files in this folder"),
    (lambda d: (d / "m.csv").write_text("\ufeffimage,context\n", encoding="utf-8"), "m.csv", "has no rows"),
])
def test_nothing_found_is_an_unusable_argument(tmp_path, make, arg, problem):
    make(tmp_path)
    r = _cem("annotate", arg, "-o", tmp_path / "o.jsonl", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert problem in r.stderr and "Traceback" not in r.stderr and "already" not in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_empty_glob_beside_a_real_file_is_a_note(pipeline, face_png, tmp_path):
    summary, _ = _run(pipeline, [face_png, tmp_path / "*.nothing"], tmp_path / "o.jsonl")
    assert summary.exit_code == 0 and summary.images == 1
    assert any("no file matches this pattern" in line for line in summary.lines())
    assert len(_strict_records(tmp_path / "o.jsonl")) == 1


def test_same_file_named_twice_is_one_record(pipeline, face_png, tmp_path):
    summary, _ = _run(pipeline, [face_png, face_png, face_png.parent], tmp_path / "o.jsonl")
    assert summary.images == 1 and len(_strict_records(tmp_path / "o.jsonl")) == 1


# ---------------------------------------------------------------- outputs that cannot be written: exit 2
@pytest.mark.parametrize("target,problem", [
    ("/dev/null/x.jsonl", "cannot create its folder"),
    ("{tmp}", "is a folder"),
])
def test_unwritable_output_is_a_clear_error(face_png, tmp_path, target, problem):
    r = _cem("annotate", face_png, "-o", target.format(tmp=tmp_path))
    assert r.returncode == 2 and problem in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_outputs_that_would_block_or_destroy_are_refused(face_png, tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    r = _cem("annotate", face_png, "-o", fifo, timeout=60)  # opening a FIFO for writing would block forever
    assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis, chapter 1\nchapter 2\n")
    r = _cem("annotate", face_png, "-o", notes, "--resume")
    assert r.returncode == 2 and "holds no cem record" in r.stderr, r.stderr
    assert notes.read_text() == "my thesis, chapter 1\nchapter 2\n" and not Path(f"{notes}.rejected").exists()
    out = tmp_path / "o.jsonl"
    r = _cem("annotate", face_png, "-o", out, "--csv", out)
    assert r.returncode == 2 and "is the JSONL output itself" in r.stderr and not out.exists()


def test_check_command_answers_without_a_traceback():
    import importlib.util

    r = _cem("check", "--config", "default")
    assert "Traceback" not in r.stderr
    if importlib.util.find_spec("cem.preflight") is None:
        assert r.returncode == 2 and "no pre-flight module" in r.stderr
    else:
        assert r.returncode == 0, r.stdout + r.stderr


def test_check_command_checks_the_expression_model_annotate_would_load(tmp_path):
    """`cem check` said "ready" for configs whose expression weights or device annotate then refused."""
    from cem.preflight import preflight

    assert preflight(Config.load("default")).ok
    for override, words in (({"expression__weights": str(tmp_path / "none")}, "expected config.json"),
                            ({"expression__device": "cuda:7"}, "device 'cuda:7'")):  # no GPU here
        report = preflight(Config.load("default", **override))
        assert not report.ok and any(words in p for p in report.problems), report.text
    with pytest.raises(ConfigError, match="'banana' is not a device torch knows"):  # refused as it loads
        Config.load("default", expression__device="banana")
    (tmp_path / "w.yaml").write_text(f"expression: {{weights: {tmp_path / 'none'}}}\n")
    r = _cem("check", "--config", tmp_path / "w.yaml")
    assert r.returncode == 2 and "expression model" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.skipif(ROOT and not SETPRIV, reason="running as root without setpriv: permissions do not bite")
def test_output_in_a_read_only_folder(face_png, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = _cem("annotate", face_png, "-o", ro / "o.jsonl", drop_dac=True)
    assert r.returncode == 2 and "permission denied" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unwritable_table_is_reported_after_the_records(pipeline, face_png, tmp_path):
    with pytest.raises(RunError, match="--csv /dev/null/t.csv: cannot write the table"):
        _run(pipeline, [face_png], tmp_path / "o.jsonl", csv="/dev/null/t.csv")
    assert len(_strict_records(tmp_path / "o.jsonl")) == 1  # the records were kept


# ---------------------------------------------------------------- one writer per output
def test_second_writer_is_refused(pipeline, face_png, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"image": "kept.png", "faces": [], "error": null}\n')
    lock = OutputLock(out)
    try:
        with pytest.raises(RunError, match="being written by another cem run"):
            _run(pipeline, [face_png], out, resume=True)
        r = _cem("annotate", face_png, "-o", out)
        assert r.returncode == 2 and "being written by another cem run" in r.stderr
    finally:
        lock.release()
    assert out.read_text() == '{"image": "kept.png", "faces": [], "error": null}\n'
    assert not Path(str(out) + ".lock").exists()
    summary, _ = _run(pipeline, [face_png], out, resume=True)  # free again
    assert summary.images == 1 and len(_strict_records(out)) == 2


def test_two_resumed_runs_at_once_do_not_duplicate(face_png, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(8):
        shutil.copy(face_png, imgs / f"{i}.png")
    out = tmp_path / "o.jsonl"
    first = subprocess.Popen([sys.executable, "-m", "cem.cli", "annotate", str(imgs), "-o", str(out), "--faces",
                              "whole", "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not Path(str(out) + ".lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    second = _cem("annotate", imgs, "-o", out, "--faces", "whole", "--resume")
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and "being written by another cem run" in second.stderr
    images = [r["image"] for r in _strict_records(out)]
    assert sorted(images) == sorted(str(p) for p in imgs.glob("*.png"))


# ---------------------------------------------------------------- resume never deletes
def test_resume_moves_bad_lines_aside_and_keeps_every_record(pipeline, face_png, tmp_path):
    imgs = [tmp_path / f"{i}.png" for i in range(4)]
    for p in imgs:
        shutil.copy(face_png, p)
    out = tmp_path / "o.jsonl"
    _run(pipeline, imgs[:3], out)
    good = out.read_bytes().splitlines(keepends=True)
    bad = [b"{corrupt\n", b"[1, 2, 3]\n", b'"a string"\n', b'{"no_image": 1}\n', b"\xff\xfe\n"]
    half = b'{"image": "' + str(imgs[3]).encode()  # a crash while writing the last line
    out.write_bytes(good[0] + bad[0] + bad[1] + good[1] + bad[2] + bad[3] + bad[4] + good[2] + half)
    summary, _ = _run(pipeline, imgs, out, resume=True)
    assert summary.rejected == 6 and summary.skipped == 3 and summary.images == 1
    assert out.read_bytes().splitlines(keepends=True)[:3] == good  # every valid record kept, in order
    assert [r["image"] for r in _strict_records(out)] == [str(p) for p in imgs]
    rejected = Path(str(out) + ".rejected").read_bytes()
    assert rejected == b"".join(bad) + half + b"\n"
    assert any(".rejected" in line for line in summary.lines())
    summary, _ = _run(pipeline, imgs, out, resume=True)  # a clean file: nothing moved, nothing redone
    assert summary.rejected == 0 and summary.images == 0
    assert Path(str(out) + ".rejected").read_bytes() == rejected


def test_resume_completes_a_last_record_missing_its_newline(pipeline, face_png, tmp_path):
    out = tmp_path / "o.jsonl"
    _run(pipeline, [face_png], out)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    other = tmp_path / "b.png"
    shutil.copy(face_png, other)
    summary, _ = _run(pipeline, [face_png, other], out, resume=True)
    assert summary.repaired and summary.rejected == 0 and summary.images == 1
    assert [r["image"] for r in _strict_records(out)] == [str(face_png), str(other)]


# ---------------------------------------------------------------- manifests and context files
def test_manifest_bom_contexts_duplicates_long_fields_and_colliding_columns(pipeline, face_png, tmp_path):
    shutil.copy(face_png, tmp_path / "a.png")
    shutil.copy(face_png, tmp_path / "b.png")
    huge = "x" * 200_000  # beyond the csv module's default field limit (128 KiB)
    man = tmp_path / "m.csv"
    man.write_text("\ufeffimage,context,track_id,faces\n"
                   "a.png,at a party,7,x\n"
                   "a.png,at a funeral,8,y\n"
                   "a.png,at a party,9,z\n"
                   ",lonely context,,\n"
                   f"b.png,{huge},,\n"
                   "a.png,at a party,7,x\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    summary, _ = _run(pipeline, [man], out)
    recs = _strict_records(out)
    # a row that differs in any column is its own input (line 4: the same image and context, another trial);
    # only the exact repeat on line 7 is skipped
    assert len(recs) == 5 and summary.images == 5
    a1, a2, a3, empty, b = recs
    assert (a1["context"], a2["context"], a3["context"]) == ("at a party", "at a funeral", "at a party")
    assert a1["meta"] == {"track_id": "7", "faces": "x"} and isinstance(a1["faces"], list) and "track_id" not in a1
    assert a3["meta"] == {"track_id": "9", "faces": "z"}
    assert empty["image"] == f"{man}:5" and empty["error"] == f"{man}:5: empty 'image' cell"
    assert b["image"] == str(tmp_path / "b.png") and b["faces"] == [] and b["context"] is None
    assert f"context in {man}:6 has 200000 characters, more than the limit of 4000" in b["error"]
    assert any(f"{man}:7" in n and f"repeats {man}:2" in n for n in summary.notes)
    again, _ = _run(pipeline, [man], out, resume=True)  # keyed by (image, context, meta): nothing redone
    assert again.images == 0 and again.skipped == 5 and len(_strict_records(out)) == 5


def test_context_file_with_bom_long_field_and_conflicts(pipeline, face_png, tmp_path):
    ctx = tmp_path / "ctx.csv"
    ctx.write_text(f"\ufeffimage,context\n{face_png.name},{'y' * 150_000}\n", encoding="utf-8")
    summary, _ = _run(pipeline, [face_png], tmp_path / "o.jsonl", context_file=ctx)
    (rec,) = _strict_records(tmp_path / "o.jsonl")
    assert rec["error"].startswith(f"{face_png}: context in {ctx}:2 has 150000 characters")
    conflict = tmp_path / "c.csv"
    conflict.write_text(f"image,context\n{face_png.name},one\nother.png,x\n{face_png.name},two\n")
    with pytest.raises(RunError, match=r"lines 2 and 4 give two different contexts for 'face.png'"):
        _run(pipeline, [face_png], tmp_path / "o2.jsonl", context_file=conflict)
    r = _cem("annotate", face_png, "-o", tmp_path / "o3.jsonl", "--context-file", tmp_path / "missing.csv")
    assert r.returncode == 2 and "missing.csv: cannot open (file not found)" in r.stderr


def test_manifest_without_image_column_and_binary_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,context\nx.png,y\n")
    r = _cem("annotate", tmp_path / "m.csv", "-o", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "m.csv: needs the column(s) 'image'" in r.stderr
    (tmp_path / "b.csv").write_bytes(b"image\n\xff\xfe\x00junk\n")
    r = _cem("annotate", tmp_path / "b.csv", "-o", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "b.csv: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    assert 'save it as "CSV UTF-8"' in r.stderr


def test_a_semicolon_separated_manifest_is_named_as_such(tmp_path):
    from cem.io import InputError, read_manifest

    (tmp_path / "m.csv").write_text("image;context\nx.png;at work\n")
    with pytest.raises(InputError, match="it looks separated by ';': save it comma-separated"):
        read_manifest(tmp_path / "m.csv")


# ---------------------------------------------------------------- what a reasoner sends back
def _patch_reason(monkeypatch, pipeline, reason):
    """Make the pipeline's reasoner answer through ``reason(image, faces, context)`` per image, by the
    protocol's one entry point (``reason_batch``)."""
    monkeypatch.setattr(pipeline.reasoner, "reason_batch",
                        lambda jobs: [reason(j.image, j.faces, j.context) for j in jobs])


def _reasoner_answering(distribution, rationale="", cue_text="lip corners up"):
    from cem.reasoning.base import FaceReasoning
    from cem.schema import Cue

    def reason(image, faces, context):
        return [FaceReasoning(f.index, dict(distribution), [Cue(cue_text, "face", "happiness", 0.5, "AU12")],
                              rationale) for f in faces]
    return reason


def test_lone_surrogates_in_a_reply_are_written_as_valid_utf8(pipeline, face_png, tmp_path, monkeypatch):
    labels = pipeline.config.labels
    fake = _reasoner_answering({k: 1 / len(labels) for k in labels}, rationale="caf\udce9 and x\ud800y",
                               cue_text="smile\udfff")
    _patch_reason(monkeypatch, pipeline, fake)
    summary, _ = _run(pipeline, [face_png], tmp_path / "o.jsonl")
    (rec,) = _strict_records(tmp_path / "o.jsonl")
    assert rec["error"] is None and summary.images == 1
    assert "caf\\xe9 and x\ufffdy" in rec["faces"][0]["rationale"]  # the reasoner's words, quoted
    assert rec["faces"][0]["cues"][0]["cue"] == "smile\ufffd"


def test_non_finite_reasoner_numbers_fail_that_face_only(pipeline, face_png, tmp_path, monkeypatch):
    labels = pipeline.config.labels
    nan_reason = _reasoner_answering({k: float("nan") for k in labels})
    good_reason = _reasoner_answering({k: 1 / len(labels) for k in labels})
    other = tmp_path / "ok.png"
    shutil.copy(face_png, other)
    _patch_reason(monkeypatch, pipeline, lambda image, faces, context: (
        nan_reason if context == "nan" else good_reason)(image, faces, context))
    man = tmp_path / "m.csv"
    man.write_text(f"image,context\n{face_png},nan\n{other},fine\n")
    summary, _ = _run(pipeline, [man], tmp_path / "o.jsonl")
    bad, ok = _strict_records(tmp_path / "o.jsonl")  # strict: no NaN reaches the JSON
    assert bad["image"] == str(face_png) and bad["error"] is None and bad["context"] == "nan"
    (face,) = bad["faces"]
    assert face["error"].startswith("reasoner failed (invalid-answer): its distribution has NaN")
    # the expression model's alone (through the fusion temperature), as the error says
    assert all(abs(face["emotion"][k] - face["expression"][k]) < 0.01 for k in labels)
    assert ok["error"] is None and len(ok["faces"]) == 1 and "error" not in ok["faces"][0]
    assert summary.images == 2 and summary.reasoner_failed == {"invalid-answer": 1}


def test_reasoner_failing_on_every_face_exits_3(pipeline, face_png, tmp_path, monkeypatch):
    def broken(image, faces, context):
        raise TimeoutError("server did not answer")

    _patch_reason(monkeypatch, pipeline, broken)
    summary, _ = _run(pipeline, [face_png], tmp_path / "o.jsonl")
    (rec,) = _strict_records(tmp_path / "o.jsonl")
    assert rec["faces"][0]["error"].startswith("reasoner failed (model-error): TimeoutError: server did not answer")
    assert summary.exit_code == 3 and summary.reasoner_failed == {"model-error": 1}
    assert any("the expression model's alone" in line for line in summary.lines())


def test_reasoner_failing_on_some_faces_is_counted_not_fatal(pipeline, face_png, tmp_path, monkeypatch):
    labels = pipeline.config.labels
    monkeypatch.setattr(pipeline.reasoner, "batch_size", 1)  # a failing call fails its batch: one image each
    good = _reasoner_answering({k: 1 / len(labels) for k in labels})

    def flaky(image, faces, context):
        if context == "fail":
            raise ConnectionError("refused")
        return good(image, faces, context)

    _patch_reason(monkeypatch, pipeline, flaky)
    man = tmp_path / "m.csv"
    man.write_text(f"image,context\n{face_png},fail\n{face_png},fine\n")
    summary, _ = _run(pipeline, [man], tmp_path / "o.jsonl")
    assert summary.exit_code == 0 and summary.reasoner_failed == {"model-error": 1} and summary.faces == 2
    assert any("reasoner failed on 1 of 2 faces" in line for line in summary.lines())


def test_cli_unreachable_server_never_exits_0(face_png, tmp_path):
    import importlib.util

    out = tmp_path / "o.jsonl"
    r = _cem("annotate", face_png, "-o", out, "--faces", "whole", "--reasoner", "openai", "--model", "m",
             "--base-url", "http://127.0.0.1:9/v1", timeout=120)
    assert "Traceback" not in r.stderr
    if importlib.util.find_spec("cem.preflight") is not None:  # the pre-flight check stops it before any image
        assert r.returncode == 2 and not out.exists(), r.stderr
    else:  # the reasoner fails on every face: records are written, the exit status says so
        assert r.returncode == 3, r.stderr
        (rec,) = _strict_records(out)
        assert rec["faces"][0]["error"].startswith("reasoner")
        assert "the expression model's alone" in r.stderr


def test_batches_reach_the_reasoner(pipeline, face_png, tmp_path, monkeypatch):
    from cem.reasoning.rules import RulesReasoner

    sizes: list[int] = []

    def reason_batch(jobs):
        sizes.append(len(jobs))
        return [RulesReasoner(pipeline.config.labels).reason(j.image, j.faces, j.context) for j in jobs]

    monkeypatch.setattr(pipeline.reasoner, "reason_batch", reason_batch, raising=False)
    monkeypatch.setattr(pipeline.reasoner, "batch_size", 3, raising=False)
    imgs = []
    for i in range(7):
        imgs.append(tmp_path / f"{i}.png")
        shutil.copy(face_png, imgs[-1])
    summary, _ = _run(pipeline, imgs, tmp_path / "o.jsonl")
    assert sizes == [3, 3, 1] and summary.images == 7 and summary.n_errors == 0


# ---------------------------------------------------------------- geometry and workers
def test_loader_bounds_geometry_and_keeps_sane_large_images(tmp_path):
    from cem.io import ImageLoadError, load_image

    Image.new("L", (70000, 10)).save(tmp_path / "p.png")
    with pytest.raises(ImageLoadError, match=r"p.png: image too large: 70000x10 px, limit 65535 px per side"):
        load_image(tmp_path / "p.png")
    assert load_image(np.zeros((30, 1, 3), np.uint8)).shape == (30, 1, 3)  # legal; the FER stage bounds it
    Image.new("L", (33000, 1000)).save(tmp_path / "wide.png")  # legal too: analysed, not refused
    assert load_image(tmp_path / "wide.png").shape == (1000, 33000, 3)
    Image.new("RGB", (6000, 4000)).save(tmp_path / "ok.jpg")
    assert load_image(tmp_path / "ok.jpg").shape == (4000, 6000, 3)


def test_worker_crash_and_hang_become_error_records(face_png, tmp_path):
    import signal

    from cem.config import Config
    from cem.parallel import WorkerPool

    slow = []
    for name in ("crash.png", "hang.png"):
        slow.append(tmp_path / name)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), np.uint8)).save(slow[-1])
    paths = [str(face_png), str(slow[0]), str(slow[1]), str(face_png)]
    pool = WorkerPool(Config.load("default", faces="whole"), 1, image_timeout_s=3.0)
    stop = threading.Event()

    def saboteur():  # SIGKILL the worker busy with crash.png, SIGSTOP the one busy with hang.png
        done: set[str] = set()
        while not stop.is_set() and len(done) < 2:
            for w in list(pool.workers):
                job = w.job
                if job and job[1] in map(str, slow) and job[1] not in done:
                    os.kill(w.proc.pid, signal.SIGKILL if job[1].endswith("crash.png") else signal.SIGSTOP)
                    done.add(job[1])
            time.sleep(0.001)

    t = threading.Thread(target=saboteur, daemon=True)
    t.start()
    try:
        results = [m for _, m in pool.measure(paths)]
    finally:
        stop.set()
        t.join()
    assert [m.name for m in results] == paths
    ok1, crashed, hung, ok2 = results
    assert ok1.error is None and ok2.error is None and len(ok2.evidence) == 1
    assert crashed.error == (f"{slow[0]}: the worker process crashed while analysing this image "
                             f"(killed by signal SIGKILL)")
    assert hung.error == f"{slow[1]}: analysis timed out after 3 s (the worker was stopped)"


def test_a_hung_image_does_not_hold_back_the_images_finished_after_it(face_png, tmp_path, monkeypatch):
    """With workers, results come in input order, except behind an image that runs long: after HOLD_BACK_S the
    finished ones are released (they waited for its time limit, in memory and out of the output file)."""
    import signal

    import cem.parallel
    from cem.config import Config
    from cem.parallel import WorkerPool

    monkeypatch.setattr(cem.parallel, "HOLD_BACK_S", 1.0)
    hang = tmp_path / "hang.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), np.uint8)).save(hang)
    paths = [str(hang)] + [str(face_png)] * 4
    pool = WorkerPool(Config.load("default", faces="whole"), 2, image_timeout_s=12.0)
    stop = threading.Event()

    dispatched: list[float] = []

    def saboteur():  # SIGSTOP the worker busy with hang.png: it never answers
        while not stop.is_set():
            for w in list(pool.workers):
                if w.job and w.job[1] == str(hang):
                    os.kill(w.proc.pid, signal.SIGSTOP)
                    dispatched.append(w.started)
                    return
            time.sleep(0.001)

    t = threading.Thread(target=saboteur, daemon=True)
    t.start()
    got, when = [], []
    try:
        for idx, m in pool.measure(paths):
            got.append((idx, m.error))
            when.append(time.monotonic())
    finally:
        stop.set()
        t.join()
    assert [i for i, _ in got] == [1, 2, 3, 4, 0]  # the four finished images first, then the hung one
    assert all(e is None for _, e in got[:4]) and "timed out after 12 s" in got[4][1]
    # released long before the hung image's time limit (seconds since it was given to its worker)
    assert max(when[:4]) - dispatched[0] < 10 and when[4] - dispatched[0] >= 12


def test_runner_pairs_out_of_order_pooled_results_with_their_inputs_and_keeps_errors(pipeline, face_png, tmp_path,
                                                                                 monkeypatch):
    """The runner pairs each pooled result with its own input when the pool releases results out of order,
    and writes the inputs measured in the runner (errors) once each, next to their neighbours."""
    import cem.parallel
    from cem.pipeline import MeasuredImage
    from cem.runner import annotate

    names = []
    for k in range(4):
        shutil.copy(face_png, tmp_path / f"{k}.png")
        names.append(str(tmp_path / f"{k}.png"))
    man = tmp_path / "m.csv"  # line 4 has no image: an error found before anything is measured
    man.write_text("image,rater\n0.png,a\n1.png,a\n,a\n2.png,a\n3.png,a\n")

    def measure(self, paths):  # the last image first, as a pool does behind a slow one
        order = [len(paths) - 1, *range(len(paths) - 1)]
        for i in order:
            yield i, MeasuredImage(paths[i], None, [], {}, f"{paths[i]}: measured by the fake pool")

    monkeypatch.setattr(cem.parallel.WorkerPool, "measure", measure)
    out = tmp_path / "o.jsonl"
    annotate(pipeline, [str(man)], out, progress=False, workers=2)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    # the error of line 4 comes out before the first pooled result after it (here the released 3.png)
    assert [r["image"] for r in recs] == [f"{man}:4", names[3], names[0], names[1], names[2]]
    assert [r["meta"] for r in recs] == [{"rater": "a"}] * 5
    assert all(r["error"] == f"{r['image']}: measured by the fake pool" for r in recs if r["image"] in names)
    assert recs[0]["error"] == f"{man}:4: empty 'image' cell"


def test_retry_errors_redoes_this_runs_failed_inputs_and_replaces_their_records(pipeline, face_png, tmp_path):
    """--resume skips an input whose record is an error; --retry-errors does it again (the missing file now
    exists) and removes the old error record, leaving error records of other runs' inputs alone."""
    shutil.copy(face_png, tmp_path / "ok.png")
    late, other = tmp_path / "late.png", tmp_path / "other.png"
    other.write_bytes(b"not an image")
    out = tmp_path / "o.jsonl"
    _run(pipeline, [tmp_path / "ok.png", late], out)
    _run(pipeline, [other], out, resume=True)  # another input's error, not part of the runs below
    assert [bool(r["error"]) for r in _strict_records(out)] == [False, True, True]
    shutil.copy(face_png, late)
    again, _ = _run(pipeline, [tmp_path / "ok.png", late], out, resume=True)
    assert again.images == 0 and again.skipped == 2  # an error record counts as done without the flag
    with pytest.raises(RunError, match="--retry-errors applies to --resume"):
        _run(pipeline, [late], out, retry_errors=True)
    dry = _run(pipeline, [tmp_path / "ok.png", late], out, resume=True, retry_errors=True, dry_run=True)[0]
    assert dry.planned == [str(late)] and len(_strict_records(out)) == 3  # a dry run changes nothing
    summary, said = _run(pipeline, [tmp_path / "ok.png", late], out, resume=True, retry_errors=True)
    assert summary.images == 1 and summary.skipped == 1 and summary.retried == 1
    assert any("--retry-errors: 1 record(s) with an error are removed" in n for n in said)  # said before the work
    recs = _strict_records(out)
    assert [(Path(r["image"]).name, bool(r["error"])) for r in recs] == [
        ("ok.png", False), ("other.png", True), ("late.png", False)]
    assert len(recs[2]["faces"]) == 1
    r = _cem("annotate", late, "-o", out, "--retry-errors")
    assert r.returncode == 2 and "--retry-errors applies to --resume" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- video resume
@pytest.fixture(scope="module")
def short_video(tmp_path_factory, face_crop):
    import cv2

    f = cv2.resize(face_crop, (120, 120))
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 180))
    for i in range(40):
        c = np.full((180, 320, 3), 160, np.uint8)
        x = 20 + i * 4
        c[30:150, x : x + 120] = f
        vw.write(cv2.cvtColor(c, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


def test_video_resume_keeps_frames_and_finishes_an_interrupted_video(pipeline, short_video, tmp_path):
    import csv

    out, frames = tmp_path / "m.jsonl", tmp_path / "f.csv"
    summary, _ = _run(pipeline, [short_video], out, frames=frames, every=4, faces=None)
    recs = _strict_records(out)
    moments = [r for r in recs if "frame" in r]
    assert moments and recs[-1]["video_summary"] == {"frames": 10, "moments": len(moments), "complete": True,
                                                     "frames_decoded": 40, "frames_declared": 40,
                                                     "frame_sampling": "every 4 frames"}
    rows = frames.read_text().splitlines()
    assert len(rows) > 6  # header + the face on (nearly) every one of 10 sampled frames
    # an interruption after the first moment and three frame rows
    out.write_text(json.dumps(moments[0]) + "\n")
    frames.write_text("\n".join(rows[:4]) + "\n")
    summary, _ = _run(pipeline, [short_video], out, frames=frames, every=4, faces=None, resume=True)
    again = _strict_records(out)
    assert _strip_timings(again) == _strip_timings(recs)  # nothing twice, nothing missing
    assert frames.read_text().splitlines() == rows
    assert list(csv.DictReader(frames.open()))[0]["video"] == str(short_video)
    # a finished video is skipped, and its table is left whole
    summary, _ = _run(pipeline, [short_video], out, frames=frames, every=4, faces=None, resume=True)
    assert summary.skipped == 1 and summary.moments == 0
    assert frames.read_text().splitlines() == rows and len(_strict_records(out)) == len(recs)


def test_analyze_video_leaves_the_callers_options_alone(pipeline, short_video):
    from cem.video import VideoOptions

    opts = VideoOptions(reason=False)
    n = sum(1 for _ in pipeline.analyze_video(short_video, every=8, options=opts))
    assert n == 5 and opts.every is None and opts.fps is None


# ---------------------------------------------------------------- flags
def test_landmarks_only_when_asked(pipeline, astronaut, tmp_path):
    Image.fromarray(astronaut).save(tmp_path / "a.png")
    _run(pipeline, [tmp_path / "a.png"], tmp_path / "plain.jsonl", faces=None)
    _run(pipeline, [tmp_path / "a.png"], tmp_path / "lm.jsonl", faces=None, landmarks=True)
    (plain,), (lm,) = _strict_records(tmp_path / "plain.jsonl"), _strict_records(tmp_path / "lm.jsonl")
    assert "landmarks" not in plain["faces"][0]
    points = lm["faces"][0]["landmarks"]
    assert len(points) == 478 and all(len(p) == 3 for p in points)
    x, y, w, h = lm["faces"][0]["bbox"]
    assert x - w / 2 < np.median([p[0] for p in points]) < x + 1.5 * w


def test_base_url_flag_beats_environment_and_config(monkeypatch):
    from cem.cli import _load_config

    monkeypatch.setenv("OPENAI_BASE_URL", "http://env:1/v1")
    from cem.reasoning.openai_backend import resolve_base_url

    cfg = _load_config("vllm", "http://flag:2/v1")
    assert resolve_base_url(cfg.reasoner.options) == ("http://flag:2/v1", "--base-url")
    assert resolve_base_url(_load_config("vllm", None).reasoner.options) == ("http://env:1/v1", "$OPENAI_BASE_URL")
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert resolve_base_url(_load_config("vllm", None).reasoner.options)[1] == "config (reasoner.options.base_url)"


def test_table_after_resume_holds_every_row_with_aligned_columns(pipeline, face_png, tmp_path):
    import csv

    for n in ("a", "b", "c"):
        shutil.copy(face_png, tmp_path / f"{n}.png")
    m1, m2 = tmp_path / "m1.csv", tmp_path / "m2.csv"
    m1.write_text("image,participant\na.png,P1\nb.png,P2\n")
    m2.write_text("image,site,participant\nc.png,Leeds,P3\n")
    out, table = tmp_path / "o.jsonl", tmp_path / "t.csv"
    _run(pipeline, [m1], out, csv=table)
    summary, _ = _run(pipeline, [m1, m2], out, csv=table, resume=True)
    assert summary.images == 1 and summary.skipped == 2
    lines = list(csv.reader(table.open()))
    header, rows = lines[0], [dict(zip(lines[0], line)) for line in lines[1:]]
    assert all(len(line) == len(header) for line in lines)
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.png", "c.png"]
    assert [(r["meta.participant"], r["meta.site"]) for r in rows] == [("P1", ""), ("P2", ""), ("P3", "Leeds")]


# ---------------------------------------------------------------- every record kind against the contract
def test_every_record_kind_written_satisfies_the_json_schema(pipeline, astronaut, face_png, short_video, tmp_path):
    """One run writes every kind of record (an image with faces, one with none, an error, a name that is
    not UTF-8, manifest columns, video key moments and the video's summary); the Ray engine's record path
    adds provenance.node. Each record must satisfy `cem schema --kind <its kind>`, and the --csv table is
    `cem table`'s, byte for byte, with the manifest columns as meta.<column>."""
    import csv

    import jsonschema
    from click.testing import CliRunner

    from cem.cli import main
    from cem.contract import json_schema, record_kind, validate_record
    from cem.engines.ray_engine import _records

    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(astronaut).save(d / "face.png")
    Image.new("RGB", (96, 96), (128, 128, 128)).save(d / "blank.png")
    odd = os.fsdecode(os.path.join(os.fsencode(d), b"caf\xe9.png"))
    shutil.copy(d / "face.png", odd)
    (d / "m.csv").write_text(f"image,context,participant\nface.png,at a party,P1\nblank.png,,P2\nmissing.png,,P3\n"
                             f"{short_video},,P4\n", encoding="utf-8")
    out, table = tmp_path / "o.jsonl", tmp_path / "t.csv"
    summary, _ = _run(pipeline, [d / "m.csv", odd], out, faces=None, csv=table)
    assert summary.exit_code == 0
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    recs.append(json.loads(_records(pipeline, [pipeline.measure(str(d / "face.png"))], ["at a party"],
                                    [{"participant": "P5"}], ["node-1"])[0]))
    kinds = []
    for rec in recs:
        kind = record_kind(rec)
        kinds.append(kind)
        jsonschema.validate(rec, json_schema(kind), cls=jsonschema.Draft202012Validator)
        validate_record(rec)
    assert sorted(set(kinds)) == ["error", "image", "moment", "video"]
    by = {Path(r["image"]).name: r for r in recs[:-1] if record_kind(r) in ("image", "error")}
    assert by["face.png"]["faces"] and by["face.png"]["meta"] == {"participant": "P1"}
    assert by["blank.png"]["faces"] == [] and by["blank.png"]["error"] is None
    assert by["missing.png"]["error"].endswith("file not found") and by["missing.png"]["meta"] == {"participant": "P3"}
    assert base64.b64decode(by["caf\\xe9.png"]["image_bytes"]) == os.fsencode(odd) and "meta" not in by["caf\\xe9.png"]
    assert all(r["meta"] == {"participant": "P4"} for r in recs if record_kind(r) in ("moment", "video"))
    assert recs[-1]["provenance"]["node"] == "node-1" and recs[-1]["meta"] == {"participant": "P5"}
    # a record the contract does not declare is refused by its schema
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(by["face.png"] | {"participant": "P1"}, json_schema("image"))
    # --csv is `cem table`: the same bytes; manifest columns as meta.<column>
    r = CliRunner().invoke(main, ["table", str(out), "-o", str(tmp_path / "t2.csv")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t2.csv").read_bytes() == table.read_bytes()
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    assert {row["meta.participant"] for row in rows} == {"P1", "P2", "P3", "P4", ""}


# ---------------------------------------------------------------- subject baselines (manifest columns)
def test_subject_column_measures_aus_against_that_subjects_baseline(pipeline, astronaut, tmp_path):
    """Subject A's neutral-flagged photo is the smiling astronaut itself, so her other copy of it shows no
    change from her own resting face: AU12 drops well below its value against the average face. Subject B
    has no neutral photo and two photos: too few for a median (each would be half its own reference, a
    single photo all of it: every AU read about 0), so the average face, with a note. A photo without a
    subject keeps the average face."""
    for name in ("a1.png", "a2.png", "b1.png", "b2.png", "c.png"):
        Image.fromarray(astronaut).save(tmp_path / name)
    man = tmp_path / "m.csv"
    man.write_text("image,subject,neutral\na1.png,A,yes\na2.png,A,\nb1.png,B,\nb2.png,B,\nc.png,,\n")
    summary, _ = _run(pipeline, [man], tmp_path / "o.jsonl", faces=None)
    recs = {Path(r["image"]).name: r for r in _strict_records(tmp_path / "o.jsonl")}
    assert summary.n_errors == 0 and all(len(r["faces"]) == 1 for r in recs.values())
    assert recs["a2.png"]["provenance"]["baseline"] == "A: neutral (1 photo)"
    assert recs["b1.png"]["provenance"]["baseline"].startswith(
        "B: none (a median baseline needs at least 5 photos with a face of the subject, and 2 of 2 have one")
    assert recs["b1.png"]["faces"][0]["aus"] == recs["c.png"]["faces"][0]["aus"]  # the average face
    assert any("subject 'B': no baseline: a median baseline needs at least 5" in n for n in summary.notes)
    assert "baseline" not in recs["c.png"]["provenance"]
    average = recs["c.png"]["faces"][0]["aus"]["AU12"]["intensity"]
    own = recs["a2.png"]["faces"][0]["aus"]["AU12"]["intensity"]
    assert average > 1.0 and own < average / 2
    # A's expression is measured against her neutral photo too (a smiling "neutral" face: happiness falls);
    # B's median of unlabelled photos is no neutral face, so B's expression is the average-face one
    happy = {k: r["faces"][0]["expression"]["happiness"] for k, r in recs.items()}
    calm = {k: r["faces"][0]["expression"]["neutral"] for k, r in recs.items()}
    assert happy["a2.png"] < happy["c.png"] and calm["a2.png"] > 5 * calm["c.png"]  # the offset is capped
    assert happy["b1.png"] == pytest.approx(happy["c.png"], abs=1e-9)
    assert recs["a2.png"]["meta"] == {"subject": "A", "neutral": ""}
    # one photo in two rows of a subject, flagged neutral in one: neutral, whichever row comes first
    for rows in ("b1.png,B,1\nb1.png,B,\nb2.png,B,\n", "b1.png,B,\nb1.png,B,1\nb2.png,B,\n"):
        (tmp_path / "twice.csv").write_text("image,subject,neutral\n" + rows)
        _run(pipeline, [tmp_path / "twice.csv"], tmp_path / "twice.jsonl", faces=None, overwrite=True)
        b2 = next(r for r in _strict_records(tmp_path / "twice.jsonl") if r["image"].endswith("b2.png"))
        assert b2["provenance"]["baseline"] == "B: neutral (1 photo)", rows
    (tmp_path / "bad.csv").write_text("image,subject,neutral\na1.png,A,maybe\n")
    _run(pipeline, [tmp_path / "bad.csv"], tmp_path / "bad.jsonl", faces=None)
    (bad,) = _strict_records(tmp_path / "bad.jsonl")
    assert "column 'neutral' must be true or false" in bad["error"]


def test_a_median_baseline_measures_each_photo_once_with_the_same_records(pipeline, astronaut, tmp_path,
                                                                           monkeypatch):
    """Without a neutral flag, the photos that make a subject's median are measured once: their AUs are then
    re-measured against the median from their meshes (they were measured twice, 1.8x the time). The records
    are the ones a second pass gives, and an unreadable photo is still its own error record."""
    import cem.fer.stage
    from cem.fer.stage import FERStage

    monkeypatch.setattr(cem.fer.stage, "MEDIAN_MIN_PHOTOS", 1)  # three photos make the median here

    rng = np.random.default_rng(3)
    for k in range(3):  # three different photos: a zoom and shift of the astronaut each
        crop = astronaut[20 * k: 400 + 20 * k, 30 * k: 400 + 30 * k]
        Image.fromarray(crop).resize((360, 360)).save(tmp_path / f"p{k}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken" + rng.bytes(20))
    man = tmp_path / "m.csv"
    man.write_text("image,subject\np0.png,S\np1.png,S\nbad.png,S\np2.png,S\n")
    calls = []
    original = FERStage.measure

    def counted(self, rgb, *a, **kw):
        calls.append(kw.get("baseline"))
        return original(self, rgb, *a, **kw)

    monkeypatch.setattr(FERStage, "measure", counted)
    _run(pipeline, [man], tmp_path / "o.jsonl", faces=None)
    assert len(calls) == 3 and all(b is None for b in calls)  # p0, p1, p2 once each; bad.png never decodes
    recs = {Path(r["image"]).name: r for r in _strict_records(tmp_path / "o.jsonl")}
    assert "bad.png" in recs and recs["bad.png"]["error"] and recs["p1.png"]["provenance"]["baseline"] == \
        "S: median of 3 of 4 photos"
    monkeypatch.setattr(FERStage, "measure", original)
    base = pipeline.baseline([str(tmp_path / f"p{k}.png") for k in range(3)])
    for k in range(3):  # the second pass, as before: the same faces, AUs and expressions
        again = pipeline.measure(str(tmp_path / f"p{k}.png"), baseline=base).evidence
        faces = recs[f"p{k}.png"]["faces"]
        assert len(faces) == len(again) == 1
        assert {c: a["intensity"] for c, a in faces[0]["aus"].items()} == pytest.approx(
            {c: a.intensity for c, a in again[0].aus.items()}, abs=2e-3)
        assert faces[0]["expression"] == pytest.approx(again[0].expression, abs=1e-5)
    assert any(abs(recs["p0.png"]["faces"][0]["aus"][c]["intensity"]
                   - pipeline.measure(str(tmp_path / "p0.png")).evidence[0].aus[c].intensity) > 0.05
               for c in recs["p0.png"]["faces"][0]["aus"])  # the median did change the AUs


def test_a_bad_neutral_photo_costs_only_its_own_record(pipeline, astronaut, tmp_path):
    """One of A's neutral photos is corrupt and one shows no face: the baseline is built from the one usable
    photo and says so ("1 of 3"); only the corrupt file is an error record. B's only neutral photo is missing:
    B's photos are still measured, against the average face, and their records say why. The same image in two
    rows for two subjects is two inputs, and header names are matched whatever their case."""
    for name in ("a1.png", "a2.png", "b1.png"):
        Image.fromarray(astronaut).save(tmp_path / name)
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    man = tmp_path / "m.csv"
    man.write_text("Image,Subject,Neutral\na1.png,A,yes\ncorrupt.png,A,yes\nblank.png,A,yes\na2.png,A,no\n"
                   "gone.png,B,yes\nb1.png,B,no\na1.png,C,no\n")
    summary, _ = _run(pipeline, [man], tmp_path / "o.jsonl", faces=None)
    recs = _strict_records(tmp_path / "o.jsonl")
    by = {(Path(r["image"]).name, (r.get("meta") or {}).get("subject")): r for r in recs}
    assert len(recs) == 7
    assert by[("a2.png", "A")]["provenance"]["baseline"] == "A: neutral (1 of 3 photos)"
    assert by[("a2.png", "A")]["faces"] and by[("a2.png", "A")]["error"] is None
    assert "corrupt" in by[("corrupt.png", "A")]["error"] and by[("gone.png", "B")]["error"].endswith("file not found")
    b1 = by[("b1.png", "B")]
    assert b1["error"] is None and len(b1["faces"]) == 1
    assert b1["provenance"]["baseline"].startswith("B: none (no usable neutral photo: ")
    assert "file not found" in b1["provenance"]["baseline"]
    assert any("subject 'B': no baseline" in n for n in summary.notes)
    # against the average face B's photo reads like the subject-less run of the same image
    plain = pipeline.analyze(str(tmp_path / "b1.png")).faces[0].evidence
    assert b1["faces"][0]["aus"]["AU12"]["intensity"] == pytest.approx(plain.aus["AU12"].intensity, abs=1e-3)
    # a1.png is A's neutral photo and, in another row, C's only photo: too few for a median (of one photo, that
    # photo: it would be measured against itself), so the average face
    assert by[("a1.png", "C")]["provenance"]["baseline"].startswith("C: none (a median baseline needs at least 5")
    assert by[("a1.png", "C")]["faces"][0]["aus"]["AU12"]["present"] is True
    assert by[("a1.png", "A")]["provenance"]["baseline"] == "A: neutral (1 of 3 photos)"


def test_manifest_rows_that_differ_only_in_other_columns_are_not_repeats(tmp_path):
    """Duplicates are judged on the whole row: the same image for two subjects is two inputs; the same row
    twice is one; an image named plainly (a folder) and in a manifest row is the manifest row."""
    from cem.io import collect_inputs

    (tmp_path / "imgs").mkdir()
    for name in ("x.png", "y.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / name)
    man = tmp_path / "m.csv"
    man.write_text("image,subject,neutral\nimgs/x.png,P1,yes\nimgs/x.png,P2,yes\nimgs/x.png,P1,yes\n")
    for order in ([tmp_path / "imgs", man], [man, tmp_path / "imgs"]):
        found = collect_inputs(order)
        rows = sorted((Path(it.path).name, it.extra.get("subject", "")) for it in found.items)
        assert rows == [("x.png", "P1"), ("x.png", "P2"), ("y.png", "")], order
        assert len(found.duplicates) == 1 and "repeats" in found.duplicates[0]
    (tmp_path / "n.csv").write_text("image,neutral\nimgs/x.png,yes\n")
    assert any("has no effect without a 'subject' column" in n for n in collect_inputs([tmp_path / "n.csv"]).notes)


def test_a_subject_baseline_loads_one_photo_at_a_time(pipeline, astronaut, tmp_path, monkeypatch):
    """Memory must not grow with a subject's photo count: the baseline's photos are decoded and measured in
    turn, never all held at once."""
    import cem.pipeline as pipeline_module

    for i in range(5):
        Image.fromarray(astronaut).save(tmp_path / f"p{i}.png")
    alive: list[int] = []
    real_load = pipeline_module.load_image
    real_measure = pipeline.fer.measure

    def load(*a, **k):
        alive.append(1)
        assert len(alive) == 1, "a second photo was loaded before the first was measured"
        return real_load(*a, **k)

    def measure(*a, **k):
        out = real_measure(*a, **k)
        alive.pop()
        return out

    monkeypatch.setattr(pipeline_module, "load_image", load)
    monkeypatch.setattr(pipeline.fer, "measure", measure)
    base = pipeline.baseline([str(tmp_path / f"p{i}.png") for i in range(5)])
    assert base.faces == 5


def test_an_output_that_is_also_an_input_is_refused_and_the_input_kept(face_png, tmp_path):
    """`-o photo.jpg`, `-o manifest.csv`, `--csv manifest.csv`, a report or table over its own results:
    each would destroy an input before reading it; each is exit 2, nothing written."""
    img = tmp_path / "face.png"
    shutil.copy(face_png, img)
    man = tmp_path / "m.csv"
    man.write_text(f"image,context\n{img},at home\n")
    before = {p: p.read_bytes() for p in (img, man)}
    for args in (("annotate", img, "-o", img), ("annotate", man, "-o", man),
                 ("annotate", man, "-o", tmp_path / "o.jsonl", "--csv", man),
                 ("annotate", img, "-o", tmp_path / "o2.jsonl", "--context-file", man, "--csv", man)):
        r = _cem(*args, "--faces", "whole")
        assert r.returncode == 2 and "is also an input of this run" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in (img, man)} == before
    assert not (tmp_path / "o.jsonl").exists()
    r = _cem("annotate", img, "-o", tmp_path / "ok.jsonl", "--faces", "whole")
    assert r.returncode == 0, r.stderr
    for cmd in ("report", "table"):
        r = _cem(cmd, tmp_path / "ok.jsonl", "-o", tmp_path / "ok.jsonl")
        assert r.returncode == 2 and "would overwrite the results" in r.stderr, r.stderr
    assert len(_strict_records(tmp_path / "ok.jsonl")) == 1


def test_a_manifest_naming_a_column_twice_is_refused(face_png, tmp_path):
    man = tmp_path / "m.csv"
    man.write_text(f"image,context,image\n{face_png},x,elsewhere.png\n")
    r = _cem("annotate", man, "-o", tmp_path / "o.jsonl", "--faces", "whole")
    assert r.returncode == 2 and "names column(s) 'image' more than once" in r.stderr, r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_wrong_arguments_to_the_python_api_are_named_not_guessed(pipeline, astronaut, tmp_path):
    """What a new user passes by mistake: a wrong input to analyze is that image's error (analyze never raises
    for a bad image); a wrong *call* (one path to analyze_many, an unknown faces mode, mismatched contexts, a
    non-string context, a path as a baseline) is a TypeError/ValueError saying what was expected, raised
    before any image is measured."""
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    for bad, words in ((None, "not an image"), ([astronaut], "use analyze_many"),
                       (path.read_bytes(), "encoded image data"),
                       (np.full((50, 50, 3), np.nan), "NaN or infinite"), (np.zeros((4, 4), object), "dtype object")):
        res = pipeline.analyze(bad)
        assert res.faces == [] and words in res.error, (type(bad), res.error)
    with pytest.raises(TypeError, match="for one image use analyze"):
        list(pipeline.analyze_many(str(path)))
    with pytest.raises(ValueError, match="2 images but 1 contexts"):
        list(pipeline.analyze_many([str(path), str(path)], contexts=["x"]))
    with pytest.raises(ValueError, match="faces must be 'detect' or 'whole'"):
        pipeline.analyze(str(path), faces="WHOLE")
    with pytest.raises(TypeError, match="a context must be a string"):
        pipeline.analyze(str(path), context=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of images"):
        pipeline.baseline(str(path))
    with pytest.raises(ValueError, match="no images given"):
        pipeline.baseline([])
    with pytest.raises(TypeError, match="baseline must come from Pipeline.baseline"):
        pipeline.measure(str(path), baseline=str(path))
    # the FER stage's own API (docs/action-units.md) checks its input too
    for wrong in (str(path), astronaut[..., 0], astronaut.astype(np.float32)):
        with pytest.raises(ValueError, match=r"RGB uint8 array of shape \(H, W, 3\)"):
            pipeline.fer.measure(wrong)
    # a baseline passed without a name is still named in the record
    base = pipeline.baseline([str(path)], neutral=True)
    res = pipeline.reason_many([pipeline.measure(str(path), baseline=base)], [None])[0]
    assert res.provenance.baseline == "neutral baseline of 1 photo"
    # a 1-bit image as NumPy hands it over (bool) is the same picture as its uint8 form
    gray = (astronaut.mean(axis=2) > 100)
    as_bool, as_uint8 = pipeline.analyze(gray), pipeline.analyze(gray.astype(np.uint8) * 255)
    assert [f.evidence.bbox for f in as_bool.faces] == [f.evidence.bbox for f in as_uint8.faces]


def test_table_paths_are_checked_before_the_run_and_replacing_an_output_is_said(pipeline, face_png, tmp_path):
    """--csv through a link to the output's folder is the output itself (refused, the records kept); a table
    name cem cannot write is refused before any image is annotated; a run without --resume over an existing
    output says that it replaces it; a table in a folder that does not exist yet is created with it."""
    out_dir = tmp_path / "cv"
    out_dir.mkdir()
    (tmp_path / "link").symlink_to(out_dir)
    out = out_dir / "o.jsonl"
    with pytest.raises(RunError, match="is the JSONL output itself"):
        _run(pipeline, [face_png], out, csv=tmp_path / "link" / "o.jsonl")
    for bad in ("t.xlsx", "t"):
        with pytest.raises(RunError, match="the table must end in .csv or .parquet"):
            _run(pipeline, [face_png], out, csv=tmp_path / bad)
        assert not out.exists()  # refused before anything was written
    notes: list[str] = []
    _run(pipeline, [face_png], out, csv=tmp_path / "new" / "t.csv")
    assert (tmp_path / "new" / "t.csv").is_file() and len(_strict_records(out)) == 1
    with pytest.raises(RunError, match="already holds the records of an earlier run; --resume continues it"):
        annotate(pipeline, [face_png], out, progress=False, echo=notes.append)  # a forgotten --resume
    assert len(_strict_records(out)) == 1  # nothing emptied
    summary = annotate(pipeline, [face_png], out, progress=False, echo=notes.append, overwrite=True)
    assert summary.images == 1 and any("is replaced (--overwrite)" in n for n in notes)
    with pytest.raises(RunError, match="give one of them"):
        annotate(pipeline, [face_png], out, progress=False, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="the rules reasoner uses no model"):
        Config.load("default", model="llava-hf/llava-1.5-7b-hf")


def test_cells_without_a_column_and_context_rows_without_an_input_are_not_dropped_unseen(tmp_path):
    """A manifest row with more cells than the header is that row's error (its extra cells would be lost);
    a context-file row that names no input is reported (a typo would otherwise leave an image without its
    context)."""
    from cem.io import collect_inputs, read_context_csv

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    man = tmp_path / "m.csv"
    man.write_text("image,context\na.png,at home,extra cell\nb.png,at work,\n")
    a, b = collect_inputs([man]).items
    assert a.error == f"{tmp_path / 'a.png'}: {man}:2: 3 cells, but the header has 2 columns"
    assert b.error is None and b.context == "at work"  # an empty trailing cell is what spreadsheets write
    ctx = tmp_path / "ctx.csv"
    ctx.write_text("image,context\na.png,at home\nbb.png,typo\n")
    found = collect_inputs([tmp_path / "a.png"], read_context_csv(ctx))
    assert found.items[0].context == "at home"
    assert found.notes == ["1 context row(s) match no input (first: 'bb.png'); they are not used"]


def test_one_path_given_as_a_string_is_one_input_not_its_characters(pipeline, face_png, tmp_path, monkeypatch):
    """``pipe.annotate("photos/", ...)`` iterated the string: "/" made it annotate the whole file system."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(face_png, folder / "a.png")
    for one in (f"{folder}/", folder):  # a str with the trailing slash, and a Path
        planned = pipeline.annotate(one, tmp_path / "o.jsonl", dry_run=True, progress=False).planned
        assert planned == [str(folder / "a.png")], one
    monkeypatch.chdir(tmp_path)
    assert pipeline.annotate("photos", "o.jsonl", dry_run=True, progress=False).planned == [
        os.path.join("photos", "a.png")]
    for bad, words in ((b"photos", "not bytes"), ([folder, 3], "not int"), (7, "not int")):
        with pytest.raises(TypeError, match=words):
            pipeline.annotate(bad, tmp_path / "o.jsonl", progress=False)


def test_options_that_would_be_ignored_are_refused_in_python_too(pipeline, face_png, tmp_path):
    """--image-timeout without workers protected nothing; analyze_video took every=0, fps=-1 and both at once
    (every frame, silently)."""
    with pytest.raises(RunError, match="--image-timeout applies to --workers 2 or more"):
        _run(pipeline, [face_png], tmp_path / "o.jsonl", image_timeout_s=5.0)
    r = _cem("annotate", face_png, "-o", tmp_path / "o.jsonl", "--image-timeout", "5")
    assert r.returncode == 2 and "--image-timeout applies to --workers 2" in r.stderr
    video = tmp_path / "v.avi"
    import cv2

    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        vw.write(np.zeros((48, 64, 3), np.uint8))
    vw.release()
    for kw, words in (({"every": 0}, "every must be a whole number >= 1"), ({"every": 2.5}, "every must be"),
                      ({"fps": -1}, "fps must be a number > 0"), ({"fps": float("nan")}, "fps must be"),
                      ({"every": 2, "fps": 5}, "give one of them")):
        with pytest.raises(ValueError, match=words):
            next(pipeline.analyze_video(str(video), **kw))
        with pytest.raises(RunError):
            annotate(pipeline, [str(video)], tmp_path / "v.jsonl", progress=False, **kw)
    assert len(list(pipeline.analyze_video(str(video), every=2))) == 2


def test_a_hostile_jsonl_line_is_skipped_and_named_by_every_reader(pipeline, face_png, tmp_path):
    """A 5,000-digit number or JSON nested 200,000 deep is not a record: table, read_results and resume skip it
    (resume moves it to OUT.rejected); they crashed with ValueError / RecursionError."""
    import cem

    out = tmp_path / "o.jsonl"
    _run(pipeline, [face_png], out)
    good = out.read_text()
    for name, line in (("big", '{"image": ' + "9" * 5000 + "}"), ("deep", "[" * 200_000 + "]" * 200_000)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(good + line + "\n")
        with pytest.warns(UserWarning, match="line 2: not readable JSON"):
            assert len(cem.read_results(path)) == 1
        r = _cem("table", path, "-o", tmp_path / f"{name}.csv")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        summary, _ = _run(pipeline, [face_png, tmp_path / "extra.png"], path, resume=True)
        assert summary.rejected == 1 and len(_strict_records(path)) == 2
        assert Path(f"{path}.rejected").read_text().strip() == line


def test_a_nul_in_a_context_or_manifest_cell_does_not_cut_the_csv_table(pipeline, face_png, tmp_path):
    """A NUL in a context-file cell went raw into the CSV, where pandas read "abc\0def" as "abc" (as it did for
    rationales before they were made inert). The JSONL keeps the text as given; the CSV shows U+FFFD there."""
    import pandas as pd

    from cem.results import write_table

    shutil.copy(face_png, tmp_path / "a.png")
    man = tmp_path / "m.csv"
    man.write_bytes(b"image,context,note\na.png,abc\x00def,x\x00y\n")
    out = tmp_path / "o.jsonl"
    _run(pipeline, [man], out)
    (rec,) = _strict_records(out)
    assert rec["context"] == "abc\x00def"
    write_table(out, tmp_path / "t.csv")
    assert b"\x00" not in (tmp_path / "t.csv").read_bytes()
    df = pd.read_csv(tmp_path / "t.csv")
    assert df["context"].tolist() == ["abc\ufffddef"] and df["meta.note"].tolist() == ["x\ufffdy"]


def test_a_table_without_any_face_still_has_the_face_columns(pipeline, tmp_path):
    """README: "one row per face with fixed columns". A run where no face was found gave a table of image and
    provenance columns only (df.groupby("top_emotion") raised KeyError, and tables of runs did not line up)."""
    import cem
    from cem.contract import AU_NAMES, FERPLUS_LABELS

    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(tmp_path / "gray.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "o.jsonl"
    _run(pipeline, [tmp_path / "gray.png", tmp_path / "broken.png"], out, faces=None)
    df = cem.read_results(out)
    assert len(df) == 2 and df["face_index"].isna().all()
    for col in ("top_emotion", "x", "yaw", "face_px", "AU12", "AU12_present", "expression_happiness",
                "emotion_contempt", "face_error"):
        assert col in df.columns, col
    assert df.cem.emotion.shape == (2, len(FERPLUS_LABELS)) and df.cem.aus.shape == (2, len(AU_NAMES))
    assert df.groupby("top_emotion", dropna=False).size().sum() == 2
    with_face = tmp_path / "f.jsonl"
    _run(pipeline, [tmp_path / "gray.png"], with_face, faces="whole")
    data = [c for c in df.columns if not c.startswith("provenance_")]  # timings differ with the work done
    assert [c for c in cem.read_results(with_face).columns if not c.startswith("provenance_")] == data


def test_records_say_how_they_were_made_and_resume_notes_other_settings(pipeline, face_png, tmp_path):
    """Provenance records the faces mode and a digest of every setting (overrides included): a --resume with
    --faces whole over detected faces, or with another fusion weight, appended silently and every record said
    only config "default"."""
    from cem.config import Config

    out = tmp_path / "o.jsonl"
    _run(pipeline, [face_png], out, faces=None)
    rec = _strict_records(out)[0]
    assert rec["provenance"]["faces"] == "detect"
    assert rec["provenance"]["settings"] == Config.load("default").digest()
    assert Config.load("default", fusion__reasoner_weight=5.0).digest() != Config.load("default").digest()
    shutil.copy(face_png, tmp_path / "b.png")
    _, notes = _run(pipeline, [face_png, tmp_path / "b.png"], out, resume=True, faces="whole")
    assert any("1 record(s) were made with another faces (this run: faces whole)" in n for n in notes), notes
    assert [r["provenance"]["faces"] for r in _strict_records(out)] == ["detect", "whole"]
    _run(pipeline, [face_png], tmp_path / "o2.jsonl", faces=None)
    _, again = _run(pipeline, [face_png], tmp_path / "o2.jsonl", faces=None, resume=True)
    assert not any("were made with another" in n for n in again)  # same settings: nothing to say
    other = cem_pipeline_with(fusion__reasoner_weight=5.0)
    try:
        summary = annotate(other, [str(face_png)], tmp_path / "o2.jsonl", resume=True, progress=False,
                           echo=(msgs := []).append)
    finally:
        other.close()
    assert summary.skipped == 1 and any("another settings" in n for n in msgs), msgs


def test_records_name_the_expression_weights_and_resume_notes_weights_changed_in_place(pipeline, face_png,
                                                                                       tmp_path):
    """Weights retrained or recalibrated in their folder kept the config and its settings digest, so records
    made before and after could not be told apart: provenance.expression_model names them by content."""
    import hashlib
    import json

    import cem
    from cem.fer.expression import DEFAULT_WEIGHTS

    out = tmp_path / "o.jsonl"
    _run(pipeline, [face_png], out)
    files = b"".join((DEFAULT_WEIGHTS / n).read_bytes() for n in ("config.json", "model.safetensors"))
    packaged = f"packaged@{hashlib.sha256(files).hexdigest()[:12]}"
    assert _strict_records(out)[0]["provenance"]["expression_model"] == packaged
    assert cem.read_results(out)["provenance_expression_model"].tolist() == [packaged]
    mine = tmp_path / "my-model"
    shutil.copytree(DEFAULT_WEIGHTS, mine)
    own = cem_pipeline_with(expression__weights=str(mine))
    try:
        before = own.provenance().expression_model
        assert before is not None and before.startswith("my-model@") and before[-12:] == packaged[-12:]
        _run(own, [face_png], tmp_path / "mine.jsonl")
        cfg = json.loads((mine / "config.json").read_text())
        cfg["temperature"] = 0.9  # recalibrated in place: same folder, same settings digest
        (mine / "config.json").write_text(json.dumps(cfg))
        after = own.provenance().expression_model
        assert after is not None and after.startswith("my-model@") and after != before
        shutil.copy(face_png, tmp_path / "b.png")
        _, notes = _run(own, [face_png, tmp_path / "b.png"], tmp_path / "mine.jsonl", resume=True)
    finally:
        own.close()
    assert any(f"1 record(s) were made with another expression_model (this run: expression_model {after})" in n
               for n in notes), notes
    (mine / "model.safetensors").unlink()  # unreadable weights: no id (the record's error says why)
    from cem.fer.expression import model_id

    assert model_id(mine) is None


def cem_pipeline_with(**overrides):
    import cem

    return cem.Pipeline.from_config("default", **overrides)


def test_contexts_given_as_a_mapping_are_checked_per_image(pipeline, face_png, tmp_path):
    """An over-long context in annotate(contexts={...}) escaped the check and crashed the run after the old
    output had been replaced (its batch-mate's record was lost too): now it is that image's error record."""
    from cem.contract import MAX_CONTEXT_CHARS

    shutil.copy(face_png, tmp_path / "a.png")
    shutil.copy(face_png, tmp_path / "b.png")
    out = tmp_path / "o.jsonl"
    _run(pipeline, [tmp_path / "a.png", tmp_path / "b.png"], out,
         contexts={"b.png": "x" * (MAX_CONTEXT_CHARS + 1), "a.png": "at work"})
    a, b = _strict_records(out)
    assert a["error"] is None and a["context"] == "at work" and len(a["faces"]) == 1
    assert "more than the limit of 4000" in b["error"] and b["image"] == str(tmp_path / "b.png")
    _run(pipeline, [tmp_path / "a.png"], tmp_path / "p.jsonl", contexts={"a.png": 7})
    assert "is int, not text" in _strict_records(tmp_path / "p.jsonl")[0]["error"]


def test_a_resume_that_changes_a_subjects_baseline_says_so(pipeline, astronaut, tmp_path, monkeypatch):
    """c.png was missing in the first run, so s1's median came from 2 of 3 photos; once it is there,
    --retry-errors measures it against a median of 3 while a and b keep the old one: the run says so."""
    import cem.fer.stage

    monkeypatch.setattr(cem.fer.stage, "MEDIAN_MIN_PHOTOS", 1)  # medians of two and three photos here
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        Image.fromarray(astronaut[10 * k:, 10 * k:]).save(tmp_path / f"src-{name}")
    shutil.copy(tmp_path / "src-a.png", tmp_path / "a.png")
    shutil.copy(tmp_path / "src-b.png", tmp_path / "b.png")
    man = tmp_path / "m.csv"
    man.write_text("image,subject\na.png,s1\nb.png,s1\nc.png,s1\n")
    out = tmp_path / "o.jsonl"
    _run(pipeline, [man], out, faces=None)
    assert {r["provenance"].get("baseline") for r in _strict_records(out) if not r["error"]} == {
        "s1: median of 2 of 3 photos"}
    again, _ = _run(pipeline, [man], out, faces=None, resume=True)
    assert not any("another baseline" in n for n in again.notes)  # nothing new: the same baseline
    shutil.copy(tmp_path / "src-c.png", tmp_path / "c.png")
    summary, _ = _run(pipeline, [man], out, faces=None, resume=True, retry_errors=True)
    assert any("subject 's1': 2 photo(s) done in an earlier run were measured against another baseline than this "
               "run's (s1: median of 3 photos)" in n for n in summary.notes), summary.notes
    assert [r["provenance"].get("baseline") for r in _strict_records(out)] == [
        "s1: median of 2 of 3 photos", "s1: median of 2 of 3 photos", "s1: median of 3 photos"]


def test_manifest_cells_nobody_named_and_inputs_nobody_found_are_said_clearly(pipeline, face_png, tmp_path):
    """A value under an empty header cell was dropped unseen; 400 missing files made one 13 KB error line,
    and no input at all said "no input found: " and nothing after it."""
    from cem.io import read_manifest

    shutil.copy(face_png, tmp_path / "a.png")
    man = tmp_path / "m.csv"
    man.write_text("image,,rater\na.png,IMPORTANT,r1\na.png,,r2\n")
    first, second = read_manifest(man)
    assert "a value in column 2, whose header cell is empty" in (first.error or "")
    assert second.error is None and second.extra == {"rater": "r2"}
    many = tmp_path / "many.csv"
    many.write_text("image\n" + "".join(f"missing/{k}.jpg\n" for k in range(400)))
    with pytest.raises(RunError) as e:
        _run(pipeline, [many], tmp_path / "o.jsonl")
    assert str(e.value).endswith("; and 395 more") and len(str(e.value)) < 1000
    with pytest.raises(RunError, match="no input given"):
        _run(pipeline, [], tmp_path / "o.jsonl")


def test_odd_python_inputs_get_a_result_or_a_clear_error(pipeline, face_png):
    """A 0-d array is an error result (it raised IndexError); a URL is said to be one (it read "file not
    found"); contexts left over when an iterator of images runs out are an error, as with a list (they were
    dropped, so images and contexts could be out of step unnoticed)."""
    res = pipeline.analyze(np.array(5))
    assert res.error and "shape ()" in res.error and not res.faces
    res = pipeline.analyze("https://example.org/face.jpg")
    assert res.error == ("https://example.org/face.jpg: a URL; cem reads local files only (it never downloads): "
                         "download it first and pass the file's path")
    with pytest.raises(ValueError, match="2 images but 3 contexts"):
        list(pipeline.analyze_many((p for p in [face_png, face_png]), contexts=["a", "b", "c"]))
    got = list(pipeline.analyze_many((p for p in [face_png, face_png]), contexts=["a", "b"]))
    assert [r.context for r in got] == ["a", "b"]


def test_a_results_file_saved_with_a_byte_order_mark_keeps_its_first_record(pipeline, face_png, tmp_path):
    """Editors on Windows save UTF-8 with a BOM; the first record of such a file was skipped as not JSON."""
    import cem

    out = tmp_path / "out.jsonl"
    pipeline.annotate([str(face_png)], out)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    assert len(cem.read_results(bom)) == len(cem.read_results(out)) == 1


def test_workers_from_a_script_without_a_main_guard_say_what_to_do(face_png, tmp_path):
    """Worker processes are spawned and import the script: without the main guard its top level starts the run
    again in each worker, which dies. The error says how to write the script (it said only that a worker could
    not start)."""
    images = [str(face_png), str(shutil.copy(face_png, tmp_path / "second.png"))]
    script = tmp_path / "run.py"
    script.write_text("import cem\n"
                      f"cem.Pipeline.from_config('default').annotate({images!r}, {str(tmp_path / 'o.jsonl')!r},"
                      " workers=2)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0
    assert "a worker could not start" in r.stderr and "if __name__ == \"__main__\":" in r.stderr, r.stderr[-2000:]


def test_a_second_run_through_a_symlink_to_the_output_is_refused(tmp_path):
    from cem.sinks import JsonlSink, OutputError

    out = tmp_path / "o.jsonl"
    (tmp_path / "link.jsonl").symlink_to(out)
    with JsonlSink(out):
        with pytest.raises(OutputError, match="being written by another cem run"):
            JsonlSink(tmp_path / "link.jsonl", overwrite=True)


def test_a_closed_or_broken_stderr_does_not_stop_a_run(face_png, tmp_path):
    """Progress bars and notes go to stderr best effort: `2>&-` or a reader that went away (`| head`) must not
    cost the records."""
    folder = _copies(face_png, tmp_path / "in", 7)  # more than PROGRESS_MIN_IMAGES: the progress bar is drawn
    out = tmp_path / "o.jsonl"
    import shlex

    run = f"{shlex.quote(sys.executable)} -m cem.cli annotate {shlex.quote(str(folder))} -o {shlex.quote(str(out))}"
    r = subprocess.run(["sh", "-c", f"exec {run} 2>&-"], stdout=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0 and len(_strict_records(out)) == 7
    out.unlink()  # and a reader that goes away at once (`| head -c 1`)
    r = subprocess.run(["sh", "-c", f"{run} 2>&1 | head -c 1 >/dev/null"], timeout=300)
    assert len(_strict_records(out)) == 7
    assert not (tmp_path / "o.jsonl.lock").exists() or (tmp_path / "o.jsonl.lock").stat().st_size == 0


def test_resuming_with_a_new_context_says_that_the_images_are_done_again(pipeline, face_png, tmp_path):
    out = tmp_path / "o.jsonl"
    annotate(pipeline, [face_png], out, progress=False, context="at a party")
    notes: list[str] = []
    annotate(pipeline, [face_png], out, progress=False, context="at a funeral", resume=True, echo=notes.append)
    assert [r["context"] for r in _strict_records(out)] == ["at a party", "at a funeral"]
    assert any("1 input(s) have records in" in n and "under another context" in n for n in notes), notes


def test_a_folder_says_which_videos_and_unread_photo_formats_it_left_out(face_png, tmp_path):
    import shutil

    from cem.io import collect_inputs

    shutil.copy(face_png, tmp_path / "face.png")
    for name in ("a.heic", "b.HEIC", "c.mp4"):
        (tmp_path / name).write_bytes(b"\0")
    found = collect_inputs([str(tmp_path)])
    notes = " ".join(found.notes)
    assert [Path(it.path).name for it in found.items] == ["face.png"]
    assert "left out 1 .mp4 video file(s)" in notes and "2 .heic photo(s) in formats cem does not read" in notes


def test_a_manifest_path_written_relative_to_the_current_folder_gets_a_hint(face_png, tmp_path, monkeypatch):
    import shutil

    from cem.io import read_manifest

    (tmp_path / "proj" / "photos").mkdir(parents=True)
    shutil.copy(face_png, tmp_path / "proj" / "photos" / "a.png")
    manifest = tmp_path / "proj" / "m.csv"
    manifest.write_text("image\nproj/photos/a.png\nphotos/a.png\n")
    monkeypatch.chdir(tmp_path)
    wrong, right = read_manifest("proj/m.csv")
    assert "relative paths in a manifest are relative to its folder (proj)" in wrong.error
    assert right.error is None and right.found


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGHUP under nohup"])
def test_sigterm_stops_a_run_as_ctrl_c_does(face_png, tmp_path, name):
    """kill / systemd stop: the records so far are kept, the run says to --resume, exit 143, no traceback. A
    closed terminal or dropped ssh session (SIGHUP) killed the run without a word and lost the batch in hand:
    it stops the same way (exit 129), except under nohup, which asks for the run to go on."""
    import signal

    sig = getattr(signal, name.split()[0])
    nohup = name.endswith("nohup")
    folder = _copies(face_png, tmp_path / "in", 400)
    out = tmp_path / "o.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "cem.cli", "annotate", str(folder), "-o", str(out),
                             "--no-progress"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.2)
    proc.send_signal(sig)
    if nohup:
        time.sleep(3)
        assert proc.poll() is None, "nohup: the run goes on"
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    records = _strict_records(out)
    stopped = signal.SIGTERM if nohup else sig
    assert proc.returncode == 128 + stopped and "run again with --resume" in err, err
    assert f"stopped ({stopped.name})" in err and "Traceback" not in err
    assert 0 < len(records) < 400
    assert len({r["image"] for r in records}) == len(records)


def test_a_full_disk_names_the_output_and_what_is_kept(tmp_path):
    from cem.sinks import JsonlSink

    sink = JsonlSink(tmp_path / "o.jsonl")
    sink.open()
    sink._fh.close()
    sink._fh = open("/dev/full", "wb", buffering=0)  # every write: no space left on device
    with pytest.raises(OSError, match=r"o.jsonl: cannot write \(no space left on device\); the records written "
                                      r"before are kept"):
        sink.write({"image": "x.png", "faces": [], "error": None})
    sink._fh.close()
    sink._fh = None
    sink.close()
    # a buffered file (as the run's is): closing it flushed the failed record again, and that bare
    # "[Errno 28] No space left on device" replaced the message above
    sink = JsonlSink(tmp_path / "b.jsonl")
    sink.open()
    sink._fh.close()
    sink._fh = open("/dev/full", "wb")  # noqa: SIM115
    with pytest.raises(OSError, match=r"b.jsonl: cannot write \(no space left on device\); the records written"):
        try:
            sink.write({"image": "x.png", "faces": [], "error": None})
        finally:
            sink.close()


def test_a_run_stopped_with_ctrl_z_and_continued_times_no_image_out(face_png, tmp_path):
    """Ctrl-Z stops the run and its workers; the time it stands still is no image's (it used to turn the
    images in progress into timeout error records)."""
    import signal

    folder = _copies(face_png, tmp_path / "in", 150)
    out = tmp_path / "o.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "cem.cli", "annotate", str(folder), "-o", str(out),
                             "--no-progress", "--workers", "2", "--image-timeout", "3"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGSTOP)  # as the shell's Ctrl-Z: the whole job
    time.sleep(5)  # longer than the time limit
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    records = _strict_records(out)
    assert proc.returncode == 0 and len(records) == 150, err
    assert not [r["error"] for r in records if r.get("error")], err


def test_signal_handlers_are_put_back_chained_and_left_alone_outside_the_main_thread():
    """The CLI's SIGTERM and the pool's SIGCONT handlers live only as long as their block; a chained handler
    also calls the one that was there (another part of the program watching the same signal)."""
    import signal
    import threading

    from cem.signals import handling

    seen: list[str] = []
    outer = signal.signal(signal.SIGUSR1, lambda num, frame: seen.append("outer"))
    try:
        with handling(signal.SIGUSR1, lambda num, frame: seen.append("inner"), chain=True) as installed:
            assert installed
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        assert seen == ["inner", "outer"]
        with pytest.raises(RuntimeError), handling(signal.SIGUSR1, lambda num, frame: seen.append("replaced")):
            raise RuntimeError("the block fails")
        os.kill(os.getpid(), signal.SIGUSR1)  # the outer handler is back, even after the failed block
        time.sleep(0.05)
        assert seen == ["inner", "outer", "outer"]
        results: list[bool] = []

        def in_thread() -> None:
            with handling(signal.SIGUSR1, lambda num, frame: None) as ok:
                results.append(ok)

        before = signal.getsignal(signal.SIGUSR1)
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        assert results == [False] and signal.getsignal(signal.SIGUSR1) is before
        with handling(None, lambda num, frame: None) as ok:  # a platform without the signal (SIGCONT on Windows)
            assert not ok
    finally:
        signal.signal(signal.SIGUSR1, outer)


def test_ray_and_dry_runs_treat_an_earlier_output_as_the_local_run_does(face_png, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"image": "kept.png", "faces": [], "error": null}\n')
    r = _cem("annotate", face_png, "-o", out, "--engine", "ray")
    assert r.returncode == 2 and "records of an earlier run" in r.stderr
    r = _cem("annotate", face_png, "-o", out, "--dry-run")
    assert r.returncode == 0 and "the run would be refused without --resume" in r.stderr
    assert out.read_text().count("\n") == 1


def _copies(face_png: Path, folder: Path, n: int) -> Path:
    """``folder`` with ``n`` copies of the face (f000.png, ...)."""
    folder.mkdir()
    for i in range(n):
        shutil.copy(face_png, folder / f"f{i:03d}.png")
    return folder


def test_more_workers_than_cores_gets_a_note(pipeline, face_png, tmp_path, monkeypatch):
    """The cores counted are those this process may use: under `taskset -c 0` on a larger machine the note
    was missing (os.cpu_count() counts the machine's)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    notes: list[str] = []
    summary = annotate(pipeline, [face_png], tmp_path / "o.jsonl", workers=2, progress=False, echo=notes.append)
    assert summary.images == 1
    assert any("--workers 2 on 1 CPU core(s)" in n and "slower, not faster" in n for n in notes), notes


def test_odd_output_paths_get_clear_answers(face_png, tmp_path):
    """A symlink loop as the output is refused with a message (not a traceback); a file holding only
    whitespace is no earlier run; a refusal exits 2 even when stderr cannot take the message."""
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    r = _cem("annotate", face_png, "-o", loop)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    r = _cem("annotate", face_png, "-o", blank)
    assert r.returncode == 0 and len(_strict_records(blank)) == 1, r.stderr
    r = subprocess.run(["sh", "-c", f"{sys.executable} -m cem.cli annotate {face_png} -o {blank} 2>/dev/full"],
                       timeout=300)
    assert r.returncode == 2  # refused (it holds a record now), said or not


def test_an_existing_table_is_not_replaced_unasked(pipeline, face_png, tmp_path):
    keep = tmp_path / "keep.csv"
    keep.write_text("my,own\n1,2\n")
    with pytest.raises(RunError, match="--csv .*keep.csv already exists; --overwrite replaces it"):
        annotate(pipeline, [face_png], tmp_path / "o.jsonl", csv=keep, progress=False)
    assert keep.read_text() == "my,own\n1,2\n" and not (tmp_path / "o.jsonl").exists()
    annotate(pipeline, [face_png], tmp_path / "o.jsonl", csv=keep, progress=False, overwrite=True)
    annotate(pipeline, [face_png], tmp_path / "o.jsonl", csv=keep, progress=False, resume=True)  # rebuilt
    assert keep.read_text().startswith("image,")


def test_one_pipeline_used_from_two_threads_gives_what_one_thread_gives(pipeline, face_png, tmp_path):
    """MediaPipe's graphs take one image at a time: two notebook threads sharing a Pipeline broke its graphs
    for good (every image of both threads, and every later one, an error record)."""
    Image.open(face_png).resize((320, 320)).save(tmp_path / "big.png")  # the detect path, not only the mesh
    images = [str(face_png), str(tmp_path / "big.png")] * 4

    def essence(result):
        d = result.to_dict()
        return d["error"], [(f["bbox"], f["expression"], f["emotion"]) for f in d["faces"]]

    alone = [essence(pipeline.analyze(p)) for p in images]
    got: dict[int, list] = {}

    def work(k: int) -> None:
        got[k] = [essence(pipeline.analyze(p)) for p in images]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == alone and got[1] == alone
    assert all(err is None and faces for err, faces in alone)


def test_a_pil_image_that_cannot_be_decoded_is_an_error_record_not_an_exception(pipeline, face_png, tmp_path):
    import io

    buf = io.BytesIO()
    Image.open(face_png).convert("RGB").save(buf, "JPEG")
    data = buf.getvalue()
    cut = Image.open(io.BytesIO(data[: len(data) // 2]))  # PIL decodes lazily: the cut shows only now
    closed = Image.open(io.BytesIO(data))
    closed.close()
    results = list(pipeline.analyze_many([str(face_png), cut, closed, str(face_png)]))
    assert [r.error is None for r in results] == [True, False, False, True]
    assert "truncated" in results[1].error and "closed" in results[2].error
    assert results[0].faces and results[3].faces


def test_the_frame_table_is_locked_and_is_not_the_face_table(face_png, tmp_path):
    from cem.runner import RunError

    video = tmp_path / "v.mp4"
    import cv2

    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 96))
    for _ in range(5):
        vw.write(cv2.cvtColor(np.asarray(Image.open(face_png).convert("RGB")), cv2.COLOR_RGB2BGR))
    vw.release()
    table = tmp_path / "t.csv"
    r = _cem("annotate", video, "-o", tmp_path / "o.jsonl", "--frames", table, "--csv", f"{tmp_path}/./t.csv")
    assert r.returncode == 2 and "are the same file" in r.stderr and not table.exists(), r.stderr
    held = OutputLock(table)  # another run writing that frame table
    try:
        with pytest.raises(RunError, match="--frames .*t.csv is being written by another cem run"):
            annotate(Config.load("default"), [video], tmp_path / "o2.jsonl", frames=table, progress=False)
    finally:
        held.release()
    assert not (tmp_path / "o2.jsonl").exists()
    annotate(Config.load("default"), [video], tmp_path / "o2.jsonl", frames=table, progress=False)
    assert table.read_text().count("\n") == 6 and not Path(f"{table}.lock").exists()


def test_an_output_named_as_a_table_is_refused_by_the_local_runner(face_png, tmp_path):
    """`-o out.parquet` wrote JSON lines under a Parquet name (pandas.read_parquet then failed on it)."""
    for name in ("o.parquet", "o.CSV", "o.csv.gz"):
        r = _cem("annotate", face_png, "-o", tmp_path / name)
        assert r.returncode == 2 and "name it .jsonl" in r.stderr and not (tmp_path / name).exists(), r.stderr
    from cem.runner import _named_as_table

    assert not _named_as_table(Path("run.csv.jsonl")) and not _named_as_table(Path("x.JSONL"))
    assert _named_as_table(Path("y.PQ")) and not _named_as_table(Path("records"))


def test_an_output_named_dash_is_refused_not_written_as_a_file(face_png, tmp_path):
    """`-o -` (standard output, as many tools spell it) wrote a file named "-"."""
    r = _cem("annotate", face_png, "-o", "-", cwd=tmp_path)
    assert r.returncode == 2 and "not to standard output" in r.stderr and not (tmp_path / "-").exists()


def test_analyze_many_answers_what_it_measured_before_the_source_failed(pipeline, face_png):
    import pandas as pd

    def source():
        yield str(face_png)
        yield str(face_png)
        raise RuntimeError("the caller's generator broke")

    got = []
    with pytest.raises(RuntimeError, match="generator broke"):
        for result in pipeline.analyze_many(source(), faces="whole"):
            got.append(result)
    assert len(got) == 2 and all(r.faces for r in got)  # they were measured, then thrown away, before
    # a pandas Series of contexts: by position with the default index (a blank cell is no context), by image
    # with an index of paths or names (df.set_index("image")["context"]); a set has no order to align
    results = list(pipeline.analyze_many([str(face_png)] * 2, contexts=pd.Series(["a", float("nan")]),
                                         faces="whole"))
    assert [r.context for r in results] == ["a", None]
    other = face_png.with_name("other.png")
    shutil.copy(face_png, other)
    by_name = pd.Series(["ctx of other", "ctx of face"], index=["other.png", str(face_png)])
    results = list(pipeline.analyze_many([str(face_png), str(other)], contexts=by_name, faces="whole"))
    assert [r.context for r in results] == ["ctx of face", "ctx of other"]
    with pytest.raises(TypeError, match="not set"):
        next(pipeline.analyze_many([str(face_png)] * 2, contexts={"a", "b"}))
    # a sorted or filtered frame's column keeps its row numbers: still by position, as before
    frame = pd.DataFrame({"image": [str(face_png), str(other)], "context": ["one", "two"], "score": [2, 1]})
    ordered = frame.sort_values("score")
    results = list(pipeline.analyze_many(ordered["image"], contexts=ordered["context"], faces="whole"))
    assert [r.context for r in results] == ["two", "one"]


def test_closing_a_pipeline_while_other_threads_use_it_costs_no_image(pipeline, face_png, tmp_path):
    """close() from another thread (a notebook cell) while images are measured: each image finishes, and the
    next loads the stage again (one image became an error record, and a video stopped)."""
    import cem

    pipe = cem.Pipeline.from_config("default")
    Image.open(face_png).resize((320, 320)).save(tmp_path / "big.png")
    errors: list[str] = []

    def work() -> None:
        for _ in range(6):
            r = pipe.analyze(str(tmp_path / "big.png"))
            if r.error or not r.faces:
                errors.append(r.error or "no face")

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(6):
        time.sleep(0.05)
        pipe.close()
    for t in threads:
        t.join()
    pipe.close()
    assert errors == []


def test_one_file_under_several_spellings_of_its_path_is_one_input(pipeline, face_png, tmp_path, monkeypatch):
    """`set40 ./set40/x.jpg set40//x.jpg` gave three records of one file, and `--resume` with `./set40` after
    `set40` annotated every image again. An absolute name is another input (a record's relative name means the
    folder its run started in), and the run says that it looks like a file the output holds."""
    monkeypatch.chdir(tmp_path)
    _copies(face_png, tmp_path / "set", 2)
    out = tmp_path / "o.jsonl"
    summary, _ = _run(pipeline, ["set", "./set/f000.png", "set//f001.png", "set/"], out)
    recs = _strict_records(out)
    assert summary.images == 2 and sorted(r["image"] for r in recs) == ["set/f000.png", "set/f001.png"]
    again, said = _run(pipeline, ["./set/", "set//"], out, resume=True)
    assert again.images == 0 and again.skipped == 2 and not any("another name" in n for n in said)
    summary, said = _run(pipeline, [str(tmp_path / "set" / "f000.png")], out, resume=True)
    assert summary.images == 1 and any("1 input(s) seem to be files that" in n and "another name" in n
                                       for n in said), said
    # another folder's file of the same relative name is its own input, not taken for done
    (tmp_path / "other").mkdir()
    _copies(face_png, tmp_path / "other" / "set", 1)
    monkeypatch.chdir(tmp_path / "other")
    assert _run(pipeline, [str(tmp_path / "other" / "set")], out, resume=True)[0].images == 1


def test_the_csv_table_of_a_run_resumed_with_other_settings_says_it_pools_them(pipeline, face_png, tmp_path):
    """`--csv` after a resume with another config wrote a table of two settings without a word."""
    import cem

    _copies(face_png, tmp_path / "set", 2)
    out, table = tmp_path / "o.jsonl", tmp_path / "o.csv"
    _run(pipeline, [tmp_path / "set" / "f000.png"], out)
    other = cem.Pipeline.from_config("default", fusion__reasoner_weight=0.3)
    try:
        summary, said = _run(other, [tmp_path / "set"], out, resume=True, csv=table)
    finally:
        other.close()
    assert summary.images == 1 and summary.skipped == 1 and table.is_file()
    assert any(n.startswith("cem: note: ") and "2 different settings" in n for n in said), said


def test_a_name_that_is_not_utf8_is_one_input_under_two_spellings(pipeline, face_png, tmp_path, monkeypatch):
    """Such names are keyed by their exact bytes; `./d/<0xe9>.png` after `d/<0xe9>.png` was annotated again."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    odd = os.fsdecode(b"d/caf\xe9.png")
    shutil.copy(face_png, odd)
    out = tmp_path / "o.jsonl"
    assert _run(pipeline, [odd], out)[0].images == 1
    again, _ = _run(pipeline, ["./" + odd, "d//" + os.path.basename(odd)], out, resume=True)
    assert again.images == 0 and again.skipped == 1 and len(_strict_records(out)) == 1


def test_a_ctrl_c_while_a_batch_is_written_leaves_each_input_one_record(pipeline, face_png, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) landing while a reasoning batch's records were being written made the interrupt
    handler write the whole batch again: up to 31 duplicate records, kept by --resume, counted twice by the
    table and the report, and refused by cem eval."""
    import cem.sinks

    for k in range(6):
        shutil.copy(face_png, tmp_path / f"{k}.png")
    real = cem.sinks.JsonlSink.write
    written = []

    def write(self, record):
        out = real(self, record)
        written.append(record)
        if len(written) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, right after the batch's second record
        return out

    monkeypatch.setattr(cem.sinks.JsonlSink, "write", write)
    out = tmp_path / "o.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _run(pipeline, sorted(tmp_path.glob("*.png")), out)
    names = [r["image"] for r in _strict_records(out)]
    assert len(names) == len(set(names)) == 6  # the rest of the batch written once, none twice
    monkeypatch.setattr(cem.sinks.JsonlSink, "write", real)
    summary, _ = _run(pipeline, sorted(tmp_path.glob("*.png")), out, resume=True)
    assert summary.skipped == 6 and len(_strict_records(out)) == 6


def test_resume_repairs_the_file_a_link_names_in_place_and_keeps_its_mode(pipeline, face_png, tmp_path, monkeypatch):
    """The repair of a torn output replaced it by a copy: a linked output became a plain file (the file it
    pointed to left torn), a 0600 output became 0644, a hard link was cut, and on a nearly full disk each failed
    attempt left a hidden copy behind and appended the torn line to OUT.rejected again."""
    import stat as st

    import cem.sinks

    for k in range(3):
        shutil.copy(face_png, tmp_path / f"{k}.png")
    store = tmp_path / "store"
    store.mkdir()
    real = store / "real.jsonl"
    _run(pipeline, [tmp_path / "0.png", tmp_path / "1.png"], real)
    real.write_bytes(real.read_bytes() + b'{"image": "torn')  # a run killed while writing
    real.chmod(0o600)
    os.link(real, tmp_path / "hard.jsonl")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    _run(pipeline, sorted(tmp_path.glob("*.png")), link, resume=True)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert [Path(r["image"]).name for r in _strict_records(real)] == ["0.png", "1.png", "2.png"]
    assert st.S_IMODE(real.stat().st_mode) == 0o600 and real.stat().st_nlink == 2  # repaired in place
    assert (tmp_path / "hard.jsonl").read_bytes() == real.read_bytes()
    rejected = tmp_path / "link.jsonl.rejected"  # beside the name the user gave (OUT.rejected)
    assert rejected.read_bytes().startswith(b'{"image": "torn')
    # a line to drop in the middle needs a copy: it keeps the mode, and a copy that fails leaves nothing behind
    lines = real.read_bytes().splitlines(keepends=True)
    real.write_bytes(lines[0] + b"not a record\n" + b"".join(lines[1:]) + b'{"image": "torn again')
    before = rejected.read_bytes()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cem.sinks.os, "replace", full_disk)
    with pytest.raises(RunError, match="no space left"):
        _run(pipeline, sorted(tmp_path.glob("*.png")), link, resume=True)
    assert not [p.name for p in store.iterdir() if p.name.endswith(".tmp")]  # no copy left behind
    assert rejected.read_bytes() == before  # as it was: the next attempt starts the same
    monkeypatch.undo()
    _run(pipeline, sorted(tmp_path.glob("*.png")), link, resume=True)
    assert link.is_symlink() and st.S_IMODE(real.stat().st_mode) == 0o600
    assert [Path(r["image"]).name for r in _strict_records(real)] == ["0.png", "1.png", "2.png"]


def test_records_with_a_field_this_cem_does_not_know_are_read_not_dropped(pipeline, face_png, tmp_path):
    """A top-level field cem does not know (a note added by hand, a newer cem's field) made cem table,
    read_results and --csv drop the record ("Extra inputs are not permitted") while --resume counted it as done:
    readers leave it out, as they do inside faces and provenance. Writers still refuse a misnamed field."""
    import cem
    from cem.contract import RecordError, validate_record
    from cem.results import write_table

    out = tmp_path / "o.jsonl"
    _run(pipeline, [face_png], out)
    (rec,) = _strict_records(out)
    out.write_text(json.dumps({**rec, "note": "checked by hand"}) + "\n")
    df = cem.read_results(out)
    assert len(df) == 1 and "note" not in df.columns and df["image"].tolist() == [rec["image"]]
    assert write_table(out, tmp_path / "t.csv").rows == 1
    with pytest.raises(RecordError, match="note"):
        validate_record({**rec, "note": "x"})


def test_a_ctrl_c_that_native_code_turns_into_another_error_still_stops_the_run(pipeline, face_png, monkeypatch):
    """A KeyboardInterrupt raised while MediaPipe called back into Python came out of it as "Error calling
    function `<lambda>`: KeyboardInterrupt": one image's "FER stage failed" error record, and the run went on
    (or exit 2 while the models loaded). It is the user's stop, not the image's failure."""
    from cem.signals import clear_stop, is_interrupt, request_stop

    disguised = RuntimeError("Error calling function `<lambda>`: KeyboardInterrupt: ")
    assert is_interrupt(disguised) and is_interrupt(KeyboardInterrupt())
    assert is_interrupt(ValueError("Error calling function `<lambda>`: KeyboardInterrupt: "))
    assert not is_interrupt(RuntimeError("CUDA out of memory")) and not is_interrupt(ValueError("bad"))
    # a message that only quotes the word (a file named KeyboardInterrupt.jpg) is no interrupt
    assert not is_interrupt(OSError(2, "No such file", "/x/KeyboardInterrupt.jpg"))
    assert not is_interrupt(ValueError("no input found: /x/KeyboardInterrupt/a.jpg: file not found"))
    request_stop()  # the CLI's handlers note a stop: then any failure is the stop's
    try:
        assert is_interrupt(ValueError("bad"))
    finally:
        clear_stop()
    assert not is_interrupt(ValueError("bad"))

    def measure(*a, **k):
        raise disguised

    monkeypatch.setattr(pipeline.fer, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        pipeline.measure(str(face_png))
    monkeypatch.setattr(pipeline.fer, "measure", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert "FER stage failed (RuntimeError: boom)" in pipeline.measure(str(face_png)).error  # a real failure


def test_resume_moves_a_second_record_of_an_input_to_rejected(pipeline, face_png, tmp_path):
    """A run stopped while it wrote a batch could write the batch again (mended above), and --resume kept the
    copies: cem table and the report counted them twice and cem eval refused the file. The first record of an
    input stays; later ones go to OUT.rejected, and the run says so."""
    shutil.copy(face_png, tmp_path / "a.png")
    shutil.copy(face_png, tmp_path / "b.png")
    out = tmp_path / "o.jsonl"
    _run(pipeline, [tmp_path / "a.png", tmp_path / "b.png"], out)
    first, second = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(first + second + first + second)
    summary, _ = _run(pipeline, [tmp_path / "a.png", tmp_path / "b.png"], out, resume=True)
    assert summary.skipped == 2 and summary.images == 0
    assert out.read_bytes() == first + second
    assert (tmp_path / "o.jsonl.rejected").read_bytes() == first + second
    assert any("2 line(s) of" in line and "(2 a second record of an input already recorded) were moved to" in line
               for line in summary.lines()), summary.lines()


def test_a_repair_stopped_half_way_keeps_every_line_in_one_of_the_two_files(tmp_path, monkeypatch):
    """Resume never deletes: a Ctrl-C (or a failed fsync) after the output was cut in place rolled OUT.rejected
    back too, so the cut lines were in neither file. And two outputs of one folder repaired at once by one
    process shared a temporary name (one's records ended up in the other)."""
    import cem.sinks
    from cem.sinks import JsonlSink

    good = b'{"image": "a.jpg", "faces": [], "error": null}\n'
    out = tmp_path / "o.jsonl"
    out.write_bytes(good + b"not a record\n")
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the output's, once it is cut
            raise KeyboardInterrupt
        return real_fsync(fd)

    monkeypatch.setattr(cem.sinks.os, "fsync", fsync)
    sink = JsonlSink(out, resume=True)
    with pytest.raises(KeyboardInterrupt):
        sink.open()
    sink.close()
    assert out.read_bytes() == good and (tmp_path / "o.jsonl.rejected").read_bytes() == b"not a record\n"
    monkeypatch.undo()
    names = set()
    real_replace = os.replace

    def record(src, dst):
        names.add(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(cem.sinks.os, "replace", record)
    for name in ("p.jsonl", "q.jsonl"):  # a line to drop in the middle: repaired through a copy
        (tmp_path / name).write_bytes(b"junk\n" + good)
        sink = JsonlSink(tmp_path / name, resume=True)
        sink.open()
        sink.close()
    assert len(names) == 2 and all(n.startswith(".cem-rewrite.") for n in names)  # one name per copy
