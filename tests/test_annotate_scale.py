"""Annotating sets: manifests, CSV tables, parallel workers, and `cem eval` against hand-computed values."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def _cem(*args):
    return subprocess.run([sys.executable, "-m", "cem.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, astronaut):
    from skimage import data

    root = tmp_path_factory.mktemp("set")
    Image.fromarray(astronaut).save(root / "a.jpg")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(root / "b.png")
    Image.fromarray(data.coffee()).save(root / "c.png")
    (root / "d.jpg").write_bytes(b"not a jpeg")
    return root


def test_manifest_csv_and_extra_columns(small_set, tmp_path):
    man = small_set / "manifest.csv"
    man.write_text("image,context,participant\na.jpg,at a launch,P01\nc.png,,P02\nd.jpg,,P03\n")
    out, table = tmp_path / "o.jsonl", tmp_path / "o.csv"
    r = _cem("annotate", str(man), "-o", str(out), "--csv", str(table))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["meta"] for x in recs] == [{"participant": p} for p in ("P01", "P02", "P03")]
    assert [x["context"] for x in recs] == ["at a launch", None, None]
    assert recs[0]["image"] == str(small_set / "a.jpg")
    rows = list(csv.DictReader(table.open()))
    assert [row["meta.participant"] for row in rows] == ["P01", "P02", "P03"]  # coffee: one row, no face
    header = next(csv.reader(table.open()))
    assert header[:7] == ["image", "width", "height", "context", "error", "meta.participant", "face_index"]
    assert "AU12" in header and "expression_happiness" in header and "emotion_contempt" in header
    assert header.index("top_emotion") > header.index("emotion_contempt") and header[-1].startswith("provenance_")
    assert rows[0]["top_emotion"] == recs[0]["faces"][0]["top_emotion"]
    assert float(rows[0]["AU12"]) == recs[0]["faces"][0]["aus"]["AU12"]["intensity"]
    assert rows[1]["face_index"] == "" and rows[2]["error"].endswith("not an image file PIL can read")


def test_workers_do_not_change_output(small_set, tmp_path):
    one, two = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    assert _cem("annotate", str(small_set), "-o", str(one)).returncode == 0
    r = _cem("annotate", str(small_set), "-o", str(two), "--workers", "2")
    assert r.returncode == 0, r.stderr

    def strip(path):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        for rec in recs:
            rec["provenance"].pop("timings_ms")
        return recs

    assert strip(one) == strip(two)


def _record(image, expression, emotion):
    face = {"index": 0, "bbox": [0, 0, 10, 10], "expression": dict(zip(LABELS, expression)),
            "emotion": dict(zip(LABELS, emotion))}
    return {"image": image, "faces": [face], "error": None}


LABELS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]


def test_eval_json_against_hand_values(tmp_path):
    e1 = [0.7, 0.3, 0, 0, 0, 0, 0, 0]
    e2 = [0.2, 0.6, 0.2, 0, 0, 0, 0, 0]
    recs = [_record("x/1.png", e1, e1), _record("x/2.png", e2, [0.5, 0.3, 0.2, 0, 0, 0, 0, 0]),
            {"image": "x/3.png", "faces": [], "error": None}]
    res = tmp_path / "r.jsonl"
    res.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    labels = tmp_path / "l.csv"
    # distribution labels; image 2 raters were not offered contempt/fear (empty cells)
    labels.write_text("image,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt\n"
                      "1.png,8,2,0,0,0,0,0,0\n2.png,1,3,0,0,0,0,,\n3.png,0,10,0,0,0,0,0,0\n")
    r = _cem("eval", str(res), "--labels", str(labels), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ex, em = out["expression"], out["emotion"]
    assert ex["n"] == 2 and ex["n_scored"] == 2 and out["missing"] == 1
    assert ex["accuracy"] == 1.0 and em["accuracy"] == 0.5
    clip = lambda p: np.clip(p, 1e-6, None) / np.clip(p, 1e-6, None).sum()
    h1, h2 = np.array([0.8, 0.2]), np.array([0.25, 0.75])
    m1 = clip(np.array(e1))
    m2 = clip(np.array(e2[:6]) / sum(e2[:6]))  # fear, contempt left out for image 2
    kl = (h1 @ np.log(h1 / m1[:2]) + h2 @ np.log(h2 / m2[:2])) / 2
    assert ex["kl"] == pytest.approx(kl, rel=1e-4)
    assert ex["nll"] == pytest.approx(-(math.log(m1[0]) + math.log(m2[1])) / 2, rel=1e-4)
    assert set(ex) == {"n", "n_scored", "accuracy", "macro_f1", "kl", "js", "nll", "brier", "ece"}
    plots = tmp_path / "plots"
    r = _cem("eval", str(res), "--labels", str(labels), "--plots", str(plots))
    assert r.returncode == 0 and (plots / "reliability.png").stat().st_size > 5000
    assert (plots / "confusion.png").stat().st_size > 5000


def test_eval_single_labels_and_bad_label(tmp_path):
    res = tmp_path / "r.jsonl"
    res.write_text(json.dumps(_record("1.png", [0.1, 0.9, 0, 0, 0, 0, 0, 0], [0.1, 0.9, 0, 0, 0, 0, 0, 0])) + "\n")
    good, bad = tmp_path / "g.csv", tmp_path / "b.csv"
    good.write_text("image,label\n1.png,happiness\n")
    bad.write_text("image,label\n1.png,joy\n")
    out = json.loads(_cem("eval", str(res), "--labels", str(good), "--json").stdout)
    assert out["expression"]["accuracy"] == 1.0
    assert out["expression"]["nll"] == pytest.approx(-math.log(0.9 / (1 + 6e-6)), rel=1e-4)
    r = _cem("eval", str(res), "--labels", str(bad))
    assert r.returncode == 2 and "'joy' is not one of" in r.stderr


def test_resume_after_sigkill_yields_one_record_per_input(small_set, tmp_path):
    import os
    import signal
    import time

    imgs = tmp_path / "many"
    imgs.mkdir()
    src = (small_set / "a.jpg").read_bytes()
    for i in range(40):
        (imgs / f"{i:03d}.jpg").write_bytes(src)
    out = tmp_path / "run.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "cem.cli", "annotate", str(imgs), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = out.read_text().count("\n")
    assert 5 <= n_before < 40
    r = _cem("annotate", str(imgs), "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    images = [json.loads(x)["image"] for x in out.read_text().splitlines()]
    assert sorted(images) == sorted(str(p) for p in imgs.glob("*.jpg"))  # each exactly once


def test_manifest_with_missing_file_gives_error_record(small_set, tmp_path):
    man = tmp_path / "m.csv"
    man.write_text(f"image\n{small_set / 'a.jpg'}\nmissing.jpg\n")
    out = tmp_path / "o.jsonl"
    assert _cem("annotate", str(man), "-o", str(out)).returncode == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0]["error"] is None and "file not found" in recs[1]["error"]
    assert recs[1]["image"] == str(tmp_path / "missing.jpg")


def test_csv_columns_stable_for_0_1_3_faces(pipeline, astronaut, small_set, tmp_path):
    import cv2

    canvas = np.full((300, 1000, 3), 190, np.uint8)
    face = cv2.resize(np.ascontiguousarray(astronaut[30:270, 110:350]), (220, 220))
    for x in (20, 390, 760):
        canvas[40:260, x : x + 220] = face
    Image.fromarray(canvas).save(tmp_path / "three.png")
    out, table = tmp_path / "o.jsonl", tmp_path / "o.csv"
    r = _cem("annotate", str(small_set / "c.png"), str(small_set / "a.jpg"), str(tmp_path / "three.png"),
             "-o", str(out), "--csv", str(table))
    assert r.returncode == 0, r.stderr
    from cem.contract import AU_NAMES

    lines = list(csv.reader(table.open()))
    head = lines[0]
    assert [c for c in head if c in AU_NAMES] == list(AU_NAMES)  # every AU, in registry order
    assert [c for c in head if c.startswith("emotion_")] == [f"emotion_{k}" for k in LABELS]
    rows = [dict(zip(lines[0], line)) for line in lines[1:]]
    assert [row["image"].split("/")[-1] for row in rows] == ["c.png", "a.jpg"] + ["three.png"] * 3
    assert [row["face_index"] for row in rows] == ["", "0", "0", "1", "2"]
    assert all(len(line) == len(lines[0]) for line in lines)
    for row in rows[1:]:
        assert all(row[au] != "" for au in AU_NAMES)
        assert abs(sum(float(row[f"emotion_{k}"]) for k in LABELS) - 1) < 1e-3
