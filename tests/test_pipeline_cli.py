"""The Python API and `cem annotate` as the interface contract defines them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cem
from cem.schema import RECORD_JSON_SCHEMA


def _validate(record):
    import jsonschema

    jsonschema.validate(record, RECORD_JSON_SCHEMA)
    for f in record["faces"]:
        assert abs(sum(f["emotion"].values()) - 1) < 1e-3
        assert abs(sum(f["expression"].values()) - 1) < 1e-3
        assert list(f["emotion"]) == ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                                      "contempt"]
        assert f["top_emotion"] == max(f["emotion"], key=f["emotion"].get)


def test_record_matches_contract(pipeline, astronaut):
    d = pipeline.analyze(astronaut).to_dict()
    _validate(d)
    assert set(d) == {"image", "width", "height", "faces", "context", "error", "provenance"}
    face = d["faces"][0]
    assert {"index", "bbox", "detection_score", "pose", "quality", "aus", "expression", "emotion", "top_emotion",
            "cues", "rationale"} <= set(face)
    assert d["provenance"]["reasoner"] == "rules" and d["provenance"]["cem_version"] == cem.__version__
    assert d["provenance"]["timings_ms"]["fer"] > 0


def test_rules_reasoner_reads_happiness_with_grounded_cues(pipeline, astronaut):
    face = pipeline.analyze(astronaut).faces[0]
    assert face.top_emotion == "happiness"
    assert {c.au for c in face.cues} >= {"AU06", "AU12"}
    assert all(c.grounding == "supported" for c in face.cues)
    # cues for other labels are kept, marked as alternatives to the answer
    assert all((c.supports == "happiness") == (c.role == "for") for c in face.cues)
    assert "AU12" in face.rationale and face.rationale.startswith("Happiness")


def test_analyze_many_keeps_order_and_contexts(pipeline, astronaut, tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(astronaut).save(p)
    results = list(pipeline.analyze_many([str(p), str(tmp_path / "missing.png")], contexts=["x", None]))
    assert [r.image for r in results] == [str(p), str(tmp_path / "missing.png")]
    assert results[0].error is None and "file not found" in results[1].error


def test_from_config_overrides_and_errors():
    from cem.config import Config, ConfigError

    c = Config.load("default", faces="whole", fusion__reasoner_weight=0.25)
    assert c.faces.mode == "whole" and c.fusion.reasoner_weight == 0.25
    with pytest.raises(ConfigError, match="unknown override"):
        Config.load("default", colour="blue")
    with pytest.raises(ConfigError, match="not found"):
        Config.load("no-such-config")
    with pytest.raises(ConfigError, match="faces.mode"):
        Config.load("default", faces="some")


def _cem(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cem.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, astronaut):
    from skimage import data

    root = tmp_path_factory.mktemp("imgs")
    Image.fromarray(astronaut).save(root / "astronaut.jpg")
    Image.fromarray(data.coffee()).save(root / "coffee.png")
    (root / "sub").mkdir()
    Image.fromarray(astronaut[:, ::-1].copy()).save(root / "sub" / "mirror.png")
    good = (root / "astronaut.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is a text file, not a picture")
    return root


def test_annotate_folder_with_bad_files(image_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    r = _cem("annotate", str(image_folder), "-o", str(out))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {rec["image"].split("/")[-1]: rec for rec in recs}
    assert set(by_name) == {"astronaut.jpg", "coffee.png", "mirror.png", "corrupt.jpg", "empty.png", "notes.jpg"}
    errors = {k for k, v in by_name.items() if v["error"]}
    assert errors == {"corrupt.jpg", "empty.png", "notes.jpg"}
    assert "corrupt" in by_name["corrupt.jpg"]["error"] and "empty" in by_name["empty.png"]["error"]
    assert by_name["coffee.png"]["faces"] == []
    assert len(by_name["astronaut.jpg"]["faces"]) == 1 and len(by_name["mirror.png"]["faces"]) == 1
    for rec in recs:
        _validate(rec)
    assert "3 errors" in r.stderr


def test_annotate_resume_repairs_and_skips(image_folder, tmp_path):
    out = tmp_path / "out.jsonl"
    assert _cem("annotate", str(image_folder / "astronaut.jpg"), str(image_folder / "coffee.png"), "-o",
                str(out)).returncode == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:40])  # a crash in the middle of the second record
    r = _cem("annotate", str(image_folder / "astronaut.jpg"), str(image_folder / "coffee.png"),
             str(image_folder / "sub" / "mirror.png"), "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["image"].split("/")[-1] for x in recs] == ["astronaut.jpg", "coffee.png", "mirror.png"]


def test_annotate_context_file_and_whole_faces(image_folder, tmp_path):
    ctx = tmp_path / "ctx.csv"
    ctx.write_text("image,context\nastronaut.jpg,at a launch\n")
    out = tmp_path / "o.jsonl"
    r = _cem("annotate", str(image_folder / "astronaut.jpg"), "-o", str(out), "--faces", "whole",
             "--context-file", str(ctx))
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["faces"][0]["bbox"] == [0.0, 0.0, 512.0, 512.0]


def test_unusable_arguments_exit_nonzero(image_folder, tmp_path):
    r = _cem("annotate", str(image_folder / "astronaut.jpg"), "-o", str(tmp_path / "x.jsonl"), "--reasoner",
             "transformers")
    # the pre-flight check names what is missing and how to give it, before any image
    assert r.returncode == 2 and "no model: set reasoner.model or pass --model" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cem("annotate", str(image_folder), "-o", str(tmp_path / "x.jsonl"), "--config", "nonexistent")
    assert r.returncode != 0 and "not found" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_help_is_light():
    code = ("import sys, cem.cli; heavy = [m for m in ('torch', 'mediapipe', 'cv2') if m in sys.modules]; "
            "print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]"


def test_dry_run_lists_without_processing(image_folder, tmp_path):
    r = _cem("annotate", str(image_folder), "-o", str(tmp_path / "d.jsonl"), "--dry-run", "--limit", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    assert not (tmp_path / "d.jsonl").exists()


def test_array_input_and_grayscale(pipeline, astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    r = pipeline.analyze(gray)
    assert r.error is None and len(r.faces) == 1


def test_a_reasoner_exception_on_one_image_leaves_the_others_answered(pipeline, astronaut, monkeypatch):
    """Whatever a backend raises for one image of a batch, the pipeline asks each image alone, so the
    error lands on the image that caused it."""
    real = pipeline.reasoner.reason_batch

    def reason_batch(jobs):
        if any(j.context == "poison" for j in jobs):
            raise KeyError("a malformed reply for this image")
        return real(jobs)

    monkeypatch.setattr(pipeline.reasoner, "reason_batch", reason_batch)
    recs = [r.to_dict() for r in pipeline.analyze_many([astronaut] * 3, ["ok", "poison", "ok"], batch_size=3)]
    assert [("error" in r["faces"][0]) for r in recs] == [False, True, False]
    assert recs[1]["faces"][0]["error"].startswith("reasoner failed (model-error): KeyError")
    assert recs[1]["faces"][0]["expression"]  # its own measurements are kept


def test_a_closed_pipeline_used_again_loads_its_stage_anew(astronaut):
    p = cem.Pipeline.from_config("default")
    lazy = p.analyze_many([astronaut])  # an iterator: read after close, as a notebook might
    p.close()
    p.close()
    assert len(next(iter(lazy)).faces) == 1 and len(p.analyze(astronaut).faces) == 1
    p.close()
