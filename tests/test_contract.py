"""The contract: records of real runs validate against the generated JSON Schemas, bad numbers are errors,
the flat tables round-trip the JSONL, and there is one label and one AU registry."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import ValidationError

from cem.contract import (
    AU_DESCRIPTIONS,
    AU_NAMES,
    FERPLUS_LABELS,
    POSE_COLUMNS,
    QUALITY_COLUMNS,
    ActionUnit,
    Cue,
    FaceEvidence,
    FaceResult,
    ImageResult,
    Pose,
    Provenance,
    Quality,
    RecordError,
    error_record,
    frame_columns,
    json_schema,
    validate_record,
)


def _validate(record: dict, kind: str) -> None:
    jsonschema.validate(record, json_schema(kind))
    validate_record(record, kind)


def _face(index: int = 0, emotion: dict | None = None, **kw) -> FaceResult:
    ev = FaceEvidence(index, (10.04, 20.0, 100.0, 120.0), 0.93456, Pose(-3.14159, 4.0, 1.2),
                      Quality(180, 0.1234, False), {"AU12": ActionUnit(2.71828, True), "AU04": ActionUnit(0.2, False)},
                      {"neutral": 0.02, "happiness": 0.98}, landmarks=np.arange(478 * 3, dtype=float).reshape(478, 3))
    return FaceResult(ev, emotion or {"neutral": 0.03, "happiness": 0.97},
                      [Cue("lip corners pulled up", "face", "happiness", 0.61234, "AU12", "supported")], "smiles", **kw)


def _result(*faces: FaceResult, **kw) -> ImageResult:
    prov = Provenance("0.1.0", "default", "rules", None, None, {"fer": 9.12345, "reason": 0.4})
    return ImageResult("a.jpg", 512, 512, list(faces), prov, **kw)


def test_to_dict_is_the_documented_record():
    d = _result(_face(), context="at a party", meta={"site": "north"}).to_dict()
    assert d == {
        "image": "a.jpg", "width": 512, "height": 512,
        "faces": [{"index": 0, "bbox": [10.0, 20.0, 100.0, 120.0], "detection_score": 0.9346,
                   "pose": {"yaw": -3.14, "pitch": 4.0, "roll": 1.2},
                   "quality": {"face_px": 180, "blur": 0.123, "extreme_pose": False, "cut_by_frame": False,
                               "too_small": False, "mesh_failed": False},
                   "aus": {"AU12": {"intensity": 2.718, "present": True}, "AU04": {"intensity": 0.2, "present": False}},
                   "expression": {"neutral": 0.02, "happiness": 0.98},
                   "emotion": {"neutral": 0.03, "happiness": 0.97}, "top_emotion": "happiness",
                   "cues": [{"cue": "lip corners pulled up", "source": "face", "au": "AU12", "supports": "happiness",
                             "weight": 0.612, "grounding": "supported", "role": "for"}],
                   "rationale": "smiles"}],
        "context": "at a party", "error": None,
        "provenance": {"cem_version": "0.1.0", "config": "default", "reasoner": "rules", "model": None,
                       "template": None, "timings_ms": {"fer": 9.12, "reason": 0.4}, "context_used": False},
        "meta": {"site": "north"}}
    assert list(d["faces"][0]["cues"][0]) == ["cue", "source", "au", "supports", "weight", "grounding", "role"]
    _validate(d, "image")
    # landmarks only when asked for; an error on a face is written, none is omitted
    with_mesh = _result(_face(error="reasoner failed (timeout): no reply in 60 s")).to_dict(landmarks=True)
    face = with_mesh["faces"][0]
    assert len(face["landmarks"]) == 478 and face["landmarks"][1] == [3.0, 4.0, 5.0]
    assert face["error"].startswith("reasoner failed (timeout)")
    _validate(with_mesh, "image")


def test_bad_numbers_are_errors_that_name_the_field():
    with pytest.raises(ValidationError, match="finite"):
        _face(emotion={"neutral": float("nan"), "happiness": 1.0})
    with pytest.raises(ValidationError, match="sum to 1"):
        _face(emotion={"neutral": 0.5, "happiness": 0.9})
    with pytest.raises(ValidationError):
        FaceEvidence(0, (0, 0, 1, 1), 0.5, None, Quality(1, 0.1, False), {"AU1": ActionUnit(1.0, True)}, {})
    with pytest.raises(ValidationError):
        Cue("x", "face", "happiness", 0.5, au="12")
    with pytest.raises(ValidationError):
        Pose(float("inf"), 0, 0)
    # a value changed after construction is caught when the record is written: no NaN reaches a file
    face = _face()
    face.emotion["happiness"] = float("nan")
    with pytest.raises(RecordError, match=r"a\.jpg: face 0: .*emotion\.happiness.*finite"):
        _result(face).to_dict()
    res = _result(_face())
    res.provenance.timings_ms["fer"] = float("inf")
    with pytest.raises(RecordError, match=r"a\.jpg.*provenance\.timings_ms\.fer"):
        res.to_dict()
    with pytest.raises(RecordError, match=r"a\.jpg.*site.*[Ee]xtra inputs are not permitted"):
        validate_record(_result(_face()).to_dict() | {"site": "north"})  # undeclared fields: under meta only
    # a record read back with NaN (Python's json accepts it) is refused too
    rec = _result(_face()).to_dict()
    rec["faces"][0]["pose"]["yaw"] = json.loads("NaN")
    with pytest.raises(RecordError, match="pose.yaw"):
        validate_record(rec)
    rec = _result(_face()).to_dict()
    rec["faces"][0]["top_emotion"] = "neutral"
    with pytest.raises(RecordError, match="most probable"):
        validate_record(rec)
    with pytest.raises(RecordError, match="JSON object"):
        validate_record([1, 2, 3])  # type: ignore[arg-type]


def test_pipeline_records_validate(pipeline, astronaut, two_faces, tmp_path):
    one = pipeline.analyze(astronaut).to_dict()
    two = pipeline.analyze(two_faces).to_dict()
    assert len(one["faces"]) == 1 and len(two["faces"]) == 2
    for rec in (one, two):
        _validate(rec, "image")
    missing = pipeline.analyze(str(tmp_path / "missing.png")).to_dict()
    assert "file not found" in missing["error"]
    _validate(missing, "error")
    _validate(missing, "image")
    prov = Provenance("0.1.0", "default", "rules", None, None)
    rec = error_record("clip.mp4", "clip.mp4: OpenCV cannot open this video", prov, context="ctx")
    _validate(rec, "error")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(one, json_schema("error"))


def _write_video(path, frames, fps=10):
    import cv2

    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


def test_video_moment_records_and_frame_rows_validate(pipeline, face_crop, tmp_path):
    from cem.video import frame_rows

    canvas = np.full((240, 320, 3), 170, np.uint8)
    canvas[20:220, 60:260] = np.asarray(Image.fromarray(face_crop).resize((200, 200)))
    video = _write_video(tmp_path / "v.mp4", [canvas] * 6)
    moments, rows = [], []
    for vf in pipeline.analyze_video(str(video), context="a talk", every=2):
        moments.extend(vf.moments)
        rows.extend(frame_rows(vf, pipeline.config.labels, list(AU_NAMES), str(video)))
    assert moments and rows
    for m in moments:
        _validate(m, "moment")
        assert m["context"] == "a talk" and m["faces"][0]["track_id"] == m["track_id"]
    for r in rows:
        _validate(r, "frame")
        assert list(r) == frame_columns(pipeline.config.labels, list(AU_NAMES))


def _run_jsonl(pipeline, astronaut, two_faces, tmp_path):
    Image.fromarray(two_faces).save(tmp_path / "two.png")
    Image.fromarray(astronaut).save(tmp_path / "one.jpg")
    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "blank.png")
    names = ["two.png", "one.jpg", "blank.png", "missing.png"]
    recs = [pipeline.analyze(str(tmp_path / n)).to_dict() for n in names]
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


def test_read_results_round_trips_the_jsonl(pipeline, astronaut, two_faces, tmp_path):
    from cem.results import read_cues, read_results

    path, recs = _run_jsonl(pipeline, astronaut, two_faces, tmp_path)
    df = read_results(path)
    assert len(df) == 2 + 1 + 1 + 1  # faces, plus one row each for the image without a face and the error
    assert df["image"].tolist() == [recs[0]["image"]] * 2 + [r["image"] for r in recs[1:]]
    i = 0
    for rec in recs:
        for face in rec["faces"] or [None]:
            row = df.iloc[i]
            i += 1
            assert row["width"] == rec["width"] if rec["width"] else row.isna()["width"]
            if face is None:
                assert row.isna()["face_index"] and row.isna()["x"] and row.isna()["emotion_happiness"]
                assert (row["error"] == rec["error"]) if rec["error"] else row.isna()["error"]
                continue
            assert row["face_index"] == face["index"]
            assert [row[c] for c in "xywh"] == face["bbox"]
            assert {c: row[c] for c in POSE_COLUMNS} == face["pose"]
            assert {c: row[c] for c in QUALITY_COLUMNS} == face["quality"]
            assert {k: row[k] for k in face["aus"]} == {k: a["intensity"] for k, a in face["aus"].items()}
            assert {k: row[f"{k}_present"] for k in face["aus"]} == {k: a["present"] for k, a in face["aus"].items()}
            assert {k: row[f"expression_{k}"] for k in face["expression"]} == face["expression"]
            assert {k: row[f"emotion_{k}"] for k in face["emotion"]} == face["emotion"]
            assert row["top_emotion"] == face["top_emotion"] and row["rationale"] == face["rationale"]
            assert row["provenance_timings_ms_fer"] == rec["provenance"]["timings_ms"]["fer"]
    cues = read_cues(path)
    assert len(cues) == sum(len(f["cues"]) for r in recs for f in r["faces"]) > 0
    assert set(cues["face_index"]) <= {0, 1} and cues.columns[:3].tolist() == ["image", "face_index", "cue"]


def test_accessors_return_the_column_groups(pipeline, astronaut, two_faces, tmp_path):
    from cem.results import read_results

    df = read_results(_run_jsonl(pipeline, astronaut, two_faces, tmp_path)[0])
    assert df.cem.aus.columns.tolist() == list(AU_NAMES)
    assert df.cem.au_presence.columns.tolist() == list(AU_NAMES)
    assert str(df.cem.au_presence.dtypes.iloc[0]) == "boolean"
    assert df.cem.expression.columns.tolist() == list(FERPLUS_LABELS)
    assert df.cem.emotion.columns.tolist() == list(FERPLUS_LABELS)
    assert np.allclose(df.cem.emotion.dropna().sum(axis=1), 1, atol=1e-3)
    assert df.cem.pose.columns.tolist() == list(POSE_COLUMNS)
    assert df.cem.bbox.columns.tolist() == ["x", "y", "w", "h"]
    assert df.cem.quality.columns.tolist() == list(QUALITY_COLUMNS)
    info = df.cem.info.columns.tolist()
    assert info[:5] == ["image", "width", "height", "context", "error"]
    assert "provenance_reasoner" in info and "x" not in info
    assert str(df["face_index"].dtype) == "Int64" and len(set(df.columns)) == len(df.columns)
    # a column no record fills still has its contract type (faces_skipped was object in every ordinary run)
    assert df["provenance_faces_skipped"].isna().all() and str(df["provenance_faces_skipped"].dtype) == "Int64"


def test_write_table_is_byte_stable_and_matches_read_results(pipeline, astronaut, two_faces, tmp_path):
    import pandas as pd

    from cem.results import read_results, write_table

    path, _ = _run_jsonl(pipeline, astronaut, two_faces, tmp_path)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_table(path, a)
    summary = write_table(copy, b)
    assert a.read_bytes() == b.read_bytes() and summary.rows == 5 and summary.images == 4
    back = pd.read_csv(a)
    df = read_results(path)
    assert back.columns.tolist() == df.columns.tolist()
    assert np.allclose(back[df.cem.emotion.columns.map("emotion_{}".format)].to_numpy(float),
                       df.filter(like="emotion_").to_numpy(float), equal_nan=True)
    from cem.cli import main

    r = CliRunner().invoke(main, ["table", str(path), "-o", str(tmp_path / "c.csv")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.csv").read_bytes() == a.read_bytes()
    pytest.importorskip("pyarrow")
    write_table(path, tmp_path / "t.parquet")
    pq = pd.read_parquet(tmp_path / "t.parquet")
    assert pq.columns.tolist() == df.columns.tolist() and pq["face_index"].tolist()[:2] == [0, 1]
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        write_table(path, tmp_path / "t.xlsx")


def test_corrupt_lines_are_skipped_and_reported(tmp_path):
    from cem.cli import main
    from cem.results import CorruptLinesWarning, read_results

    good = _result(_face(0), _face(1)).to_dict()
    nan_rec = json.dumps(good).replace('"yaw": -3.14', '"yaw": NaN')
    path = tmp_path / "out.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", "[1, 2, 3]", nan_rec, "", json.dumps(good),
                               '{"image": "half", "wid']) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_results(path)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CorruptLinesWarning)]
    assert len(msgs) == 1 and str(path) in msgs[0] and "skipped 4 line(s)" in msgs[0]
    assert "line 2, 3, 4, 7" in msgs[0]
    assert len(df) == 4 and df.attrs["skipped_lines"] == [2, 3, 4, 7]
    assert not math.isnan(df["yaw"].iloc[0])
    r = CliRunner().invoke(main, ["table", str(path), "-o", str(tmp_path / "t.csv")])
    assert r.exit_code == 0
    assert "skipped 4 line(s)" in r.output and "line 2, 3, 4, 7" in r.output and "4 rows (1 image)" in r.output
    assert "first: line 2: not JSON" in r.output
    # nothing usable at all: an error naming the file and the first problem, and no table written
    for text, why in (("{not json\n[1]\n", "2 line(s) skipped; first: line 1: not JSON"), ("", "holds no records")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        r = CliRunner().invoke(main, ["table", str(bad), "-o", str(tmp_path / "bad.csv")])
        assert r.exit_code == 2 and "no usable record" in r.output and why in r.output, r.output
        assert not (tmp_path / "bad.csv").exists()


def test_schema_command_prints_each_generated_schema():
    from cem.cli import main

    for kind in ("image", "moment", "error", "frame"):
        r = CliRunner().invoke(main, ["schema", "--kind", kind])
        assert r.exit_code == 0 and json.loads(r.output) == json_schema(kind)
    assert json.loads(CliRunner().invoke(main, ["schema"]).output)["title"] == "cem image record"
    assert CliRunner().invoke(main, ["schema", "--kind", "nope"]).exit_code == 2
    from cem.schema import RECORD_JSON_SCHEMA  # the old name still imports (other branches use it)

    assert RECORD_JSON_SCHEMA == json_schema("image")


def test_generated_schemas_describe_every_field():
    for kind in ("image", "moment", "error", "frame"):
        schema = json_schema(kind)
        for name, sub in {kind: schema, **schema.get("$defs", {})}.items():
            assert sub.get("properties"), f"{kind}: {name} has no properties in its schema"
    cue = json_schema("image")["$defs"]["Cue"]
    assert cue["required"] == ["cue", "source", "supports", "weight", "au", "grounding", "role"]
    assert cue["properties"]["role"]["enum"] == ["for", "alternative", "against"]
    face = json_schema("moment")["$defs"]["FaceRecord"]
    assert "landmarks" in face["properties"] and "landmarks" not in face["required"]


def test_one_label_registry_and_one_au_registry():
    import cem.datasets
    from cem.config import Config
    from cem.fer import aus

    assert cem.datasets.FERPLUS_LABELS is FERPLUS_LABELS
    assert Config.load("default").labels == list(FERPLUS_LABELS)
    assert aus.AU_NAMES is AU_NAMES
    assert [d.code for d in aus.AU_DEFINITIONS] == list(AU_NAMES) == list(AU_DESCRIPTIONS)
    assert aus.AU_DEFINITIONS[0].name == "inner brow raiser"
    schema = json.dumps(json_schema("image"))
    assert "^AU[0-9]{2}$" in schema


def test_docs_output_page_is_generated_from_the_contract():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "docs" / "gen_output.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_cem_does_not_import_pandas():
    code = "import sys, cem; cem.read_results; assert 'pandas' in sys.modules; print('ok')"
    lazy = "import sys, cem, cem.contract, cem.cli; assert 'pandas' not in sys.modules, 'pandas imported'"
    for c in (lazy, code):
        r = subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr


def test_records_made_with_different_settings_are_read_with_a_warning(pipeline, astronaut, two_faces, tmp_path):
    """Outputs concatenated, or a run resumed after a config change: the table mixes settings, and says so."""
    import warnings

    from cem.results import MixedSettingsWarning, read_results

    path, recs = _run_jsonl(pipeline, astronaut, two_faces, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_results(path)  # one run: no warning
    other = pipeline.__class__.from_config("default", fusion__reasoner_weight=0.3).analyze(str(tmp_path / "one.jpg"))
    with path.open("a") as fh:
        fh.write(json.dumps(other.to_dict()) + "\n")
    with pytest.warns(MixedSettingsWarning, match="2 different settings"):
        df = read_results(path)
    assert df["provenance_settings"].nunique() == 2
    # the table pools them too, and says so (the warning was swallowed by `cem table` and --csv)
    from click.testing import CliRunner

    from cem.cli import main

    r = CliRunner().invoke(main, ["table", str(path), "-o", str(tmp_path / "t.csv")])
    assert r.exit_code == 0 and "cem: note:" in r.output and "2 different settings" in r.output
