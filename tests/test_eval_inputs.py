"""``cem eval`` with imperfect input: every case either gives the exact error (exit status 2) or the exact
metric, with skipped and ambiguous items counted. Records and label files are written on the spot."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cem.cli import main
from cem.eval import EvalError, evaluate_file, read_labels_csv

LABELS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]


def dist(**p: float) -> dict[str, float]:
    return {k: p.get(k, 0.0) for k in LABELS}


def face(index: int = 0, bbox=(0, 0, 50, 50), **p: float) -> dict:
    d = dist(**p)
    return {"index": index, "bbox": list(bbox), "emotion": d, "expression": d, "top_emotion": max(d, key=d.get)}


def rec(image: str, *faces: dict, **extra) -> dict:
    return {"image": image, "width": 100, "height": 100, "faces": list(faces), "error": None} | extra


def write_jsonl(path: Path, *items: dict | str) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def write_csv(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def run_eval(results: Path, labels: Path, *more: str):
    res = CliRunner().invoke(main, ["eval", str(results), "--labels", str(labels), "--json", *more])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res, (json.loads(res.stdout) if res.exit_code == 0 else None)


def fails(results: Path, labels: Path, message: str) -> None:
    res, _ = run_eval(results, labels)
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == f"cem: error: {message}"


def test_scores_by_hand_with_bom_labels(tmp_path):
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=0.8, neutral=0.2)),
                          rec("b.jpg", face(sadness=0.6, neutral=0.4)))
    labels = write_csv(tmp_path / "l.csv", "image,neutral,happiness,sadness\na.jpg,1,3,0\nb.jpg,1,0,3\n", bom=True)
    res, out = run_eval(results, labels)
    assert res.exit_code == 0, res.output
    m = out["emotion"]
    assert m["n"] == 2 and m["accuracy"] == 1.0
    # only the offered labels (the three columns) are scored; the model is renormalised over them
    kl_a = 0.25 * math.log(0.25 / 0.2) + 0.75 * math.log(0.75 / 0.8)
    kl_b = 0.25 * math.log(0.25 / 0.4) + 0.75 * math.log(0.75 / 0.6)
    assert m["kl"] == pytest.approx((kl_a + kl_b) / 2, abs=1e-5)
    assert out["missing"] == 0 and out["multi_face"] == 0 and out["skipped"] == 0 and out["matched_by_name"] == 0


def test_labels_without_a_column_are_reported_and_names_match_whatever_their_case(tmp_path):
    """A labels file that covers only some labels scores those alone (as before) but says which were left
    out, in --json and on stderr; `Image`, `Happiness` and a `Sadness` label value are read as cem's names."""
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=0.8, neutral=0.2)),
                          rec("b.jpg", face(sadness=0.6, neutral=0.4)))
    labels = write_csv(tmp_path / "l.csv", "Image,Neutral,HAPPINESS,sadness\na.jpg,1,3,0\nb.jpg,1,0,3\n")
    res, out = run_eval(results, labels)
    assert res.exit_code == 0, res.output
    assert out["labels_without_column"] == [lab for lab in LABELS if lab not in ("neutral", "happiness", "sadness")]
    assert f"{labels} has no column for surprise, anger, disgust, fear, contempt" in res.stderr
    assert out["emotion"]["accuracy"] == 1.0
    single = write_csv(tmp_path / "s.csv", "IMAGE,Label\na.jpg,Happiness\nb.jpg,SADNESS\n")
    res, out = run_eval(results, single)
    assert res.exit_code == 0, res.output
    assert out["labels_without_column"] == [] and out["emotion"]["accuracy"] == 1.0 and "no column" not in res.stderr


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1", "-0.5", "abc", "1,5"])
def test_bad_label_cells_are_errors(tmp_path, cell):
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=1.0)), rec("b.jpg", face(sadness=1.0)))
    labels = write_csv(tmp_path / "l.csv", f'image,neutral,happiness\na.jpg,1,3\nb.jpg,2,"{cell}"\n')
    kind = "a number" if cell in ("abc", "1,5") else "a finite number >= 0"
    fails(results, labels, f"{labels}:3: column 'happiness': {cell!r} is not {kind}")


@pytest.mark.parametrize(("csv", "message"), [
    ("", "{l}: empty file (expected a header row with an 'image' column)"),
    ("image,neutral,happiness\n", "{l}: no label rows after the header"),
    ("path,happiness\na.jpg,1\n", "{l}:1: the labels file needs an 'image' column (found ['path', 'happiness'])"),
    ("image,mood\na.jpg,1\n", "{l}:1: expected a 'label' column or columns named after labels " + str(LABELS)),
    ("image,label,happiness\na.jpg,happiness,1\n",
     "{l}:1: both a 'label' column and label columns ['happiness']: use one of them"),
    ("image,happiness,happiness\na.jpg,1,2\n", "{l}:1: column 'happiness' appears more than once in the header"),
    ("image,label\na.jpg,joy\n", "{l}:2: column 'label': 'joy' is not one of " + str(LABELS)),
    ("image,neutral,happiness\na.jpg,,\n", "{l}:2: no positive label value for 'a.jpg'"),
    ("image,neutral,happiness\na.jpg,0,0\n", "{l}:2: no positive label value for 'a.jpg'"),
    ("image,neutral,happiness\n,0,1\n", "{l}:2: column 'image' is empty"),
    ("image,neutral,happiness\na.jpg,0,1,7\n", "{l}:2: 4 cells, but the header has 3 columns"),
    ("image,neutral,happiness\na.jpg,0,1\nb.jpg,0,1\na.jpg,0,2\n",
     "{l}:4: image 'a.jpg' already has a row (line 2); put all votes for one image in one row"),
    ("image,neutral,happiness\nd/a.jpg,0,1\n./d//a.jpg,0,2\n",
     "{l}:3: image './d//a.jpg' already has a row (line 2); put all votes for one image in one row"),
    ("image,neutral,happiness,face\na.jpg,0,1,first\n",
     "{l}:2: column 'face': 'first' is not a face index (0, 1, ...)"),
    ("image,neutral,happiness,face\na.jpg,0,1,-1\n", "{l}:2: column 'face': '-1' is not a face index (0, 1, ...)"),
    ("image,neutral,happyness\na.jpg,0,1\n",
     "{l}:1: column 'happyness' is not a label (did you mean 'happiness'?); label columns must be among " + str(LABELS)
     + " (plus 'image' and 'face')"),
    ("image,neutral\na.jpg,1\n", "{l}:1: only one label column ('neutral'): a distribution over one label always "
                                  "agrees; give a column per label offered to the raters"),
])
def test_bad_label_files_are_errors(tmp_path, csv, message):
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=1.0)))
    labels = write_csv(tmp_path / "l.csv", csv)
    fails(results, labels, message.format(l=labels))


def test_label_file_that_is_not_utf8(tmp_path):
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=1.0)))
    labels = tmp_path / "l.csv"
    labels.write_bytes(b"image,neutral,happiness\ncaf\xe9.jpg,0,1\n")
    fails(results, labels, f"{labels}: not UTF-8 text (byte 27: invalid continuation byte)")


def test_results_files_that_are_not_usable(tmp_path):
    labels = write_csv(tmp_path / "l.csv", "image,neutral,happiness\na.jpg,0,1\n")
    fails(write_jsonl(tmp_path / "e.jsonl"), labels, f"{tmp_path / 'e.jsonl'}: no cem records (empty file)")
    junk = write_jsonl(tmp_path / "j.jsonl", "[1, 2]", "{not json")
    fails(junk, labels, f"{junk}: no cem records (2 lines, none a record; first: {junk}:1: not a JSON object (a list))")
    other = write_jsonl(tmp_path / "o.jsonl", rec("zzz.jpg", face(happiness=1.0)))
    fails(other, labels,
          "no labelled image matched a record with a face (1 missing; first: 'a.jpg' (line 2): no record)")
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "typo.jsonl"), "--labels", str(labels)])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_paths_match_before_base_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # same base name in two folders, opposite predictions: only a path match can score both right
    results = write_jsonl(tmp_path / "r.jsonl", rec("d1/x.jpg", face(happiness=0.9, neutral=0.1)),
                          rec("d2/x.jpg", face(sadness=0.9, neutral=0.1)))
    (tmp_path / "labels").mkdir()
    labels = write_csv(tmp_path / "labels" / "l.csv",  # one relative to the labels file, one to the cwd
                       "image,label\n../d1/x.jpg,happiness\nd2/x.jpg,sadness\n")
    res, out = run_eval(results, labels)
    assert res.exit_code == 0, res.output
    assert out["emotion"]["n"] == 2 and out["emotion"]["accuracy"] == 1.0 and out["matched_by_name"] == 0
    ambiguous = write_csv(tmp_path / "a.csv", "image,label\nx.jpg,happiness\n")
    fails(results, ambiguous, f"{ambiguous}:2: 'x.jpg' matches no record by path, and its base name matches records "
                              f"of different files: 'd1/x.jpg' ({results}:1) and 'd2/x.jpg'; write the image's path "
                              "as in the results")


def test_a_labels_file_written_on_windows_matches_by_path_and_by_name(tmp_path, monkeypatch):
    """`photos\\a.jpg` matched nothing here, not even by its base name."""
    monkeypatch.chdir(tmp_path)
    results = write_jsonl(tmp_path / "r.jsonl", rec("photos/a.jpg", face(happiness=1.0)),
                          rec("/elsewhere/b.jpg", face(sadness=1.0)))
    labels = write_csv(tmp_path / "l.csv", "image,label\nphotos\\a.jpg,happiness\nC:\\data\\b.jpg,sadness\n")
    res, out = run_eval(results, labels)
    assert res.exit_code == 0, res.output
    assert out["emotion"]["n"] == 2 and out["emotion"]["accuracy"] == 1.0 and out["matched_by_name"] == 1


def test_base_name_fallback_only_when_unambiguous(tmp_path):
    results = write_jsonl(tmp_path / "r.jsonl", rec("/elsewhere/run/y.jpg", face(happiness=1.0)))
    labels = write_csv(tmp_path / "l.csv", "image,label\ny.jpg,happiness\n")
    res, out = run_eval(results, labels)
    assert res.exit_code == 0 and out["matched_by_name"] == 1 and out["emotion"]["accuracy"] == 1.0
    two = write_csv(tmp_path / "two.csv", "image,label\na/y.jpg,happiness\nb/y.jpg,sadness\n")
    fails(results, two, f"{two}: lines 2 and 3 ('a/y.jpg', 'b/y.jpg') both match the record of "
                        f"'/elsewhere/run/y.jpg' ({results}:1)")


def test_an_image_annotated_twice_is_an_error(tmp_path):
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=1.0)), rec("a.jpg", face(sadness=1.0)))
    labels = write_csv(tmp_path / "l.csv", "image,label\na.jpg,happiness\n")
    fails(results, labels, f"{labels}:2: 'a.jpg' has 2 records ({results}:1 and {results}:2): score a results "
                           "file with one record per image")


def test_several_faces_largest_by_default_or_the_face_column(tmp_path):
    two = rec("g.jpg", face(0, (0, 0, 10, 10), sadness=1.0), face(1, (20, 20, 60, 60), happiness=1.0))
    results = write_jsonl(tmp_path / "r.jsonl", two, rec("s.jpg", face(surprise=1.0)))
    labels = write_csv(tmp_path / "l.csv", "image,label\ng.jpg,happiness\ns.jpg,surprise\n")
    res, out = run_eval(results, labels)
    assert out["emotion"]["accuracy"] == 1.0 and out["multi_face"] == 1  # the largest face: happiness
    picked = write_csv(tmp_path / "p.csv", "image,label,face\ng.jpg,happiness,0\ns.jpg,surprise,\n")
    res, out = run_eval(results, picked)
    assert out["emotion"]["accuracy"] == 0.5 and out["multi_face"] == 0  # face 0 says sadness
    absent = write_csv(tmp_path / "x.csv", "image,label,face\ng.jpg,happiness,5\ns.jpg,surprise,\n")
    res, out = run_eval(results, absent)
    assert out["emotion"]["n"] == 1 and out["missing"] == 1
    assert out["missing_images"] == [{"image": "g.jpg", "line": 2, "reason": "no face 5 (the record has 2)"}]


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    """Hand-corrupted records matched by label rows: skipped with file:line and reason, never a traceback;
    the metrics cover the one good record only."""
    nan_line = json.dumps(rec("nan.jpg", face(happiness=1.0))).replace('"happiness": 1.0', '"happiness": NaN', 1)
    corrupt = [
        ("faces-str.jpg", rec("faces-str.jpg") | {"faces": "oops"}, "'faces' is a string, expected a list"),
        ("faces-int.jpg", rec("faces-int.jpg") | {"faces": [1]}, "'faces[0]' is an integer, expected an object"),
        ("nan.jpg", nan_line, "'faces[0].emotion['happiness']' is null (or was NaN/Infinity in the file)"),
        ("str.jpg", rec("str.jpg", face(happiness=1.0) | {"emotion": {"happiness": "0.9"}}),
         "'faces[0].emotion['happiness']' is a string, expected a number"),
        ("neg.jpg", rec("neg.jpg", face(happiness=-0.5)), "'faces[0].expression['happiness']' is negative (-0.5)"),
        ("list.jpg", rec("list.jpg", face(happiness=1.0) | {"emotion": [0.1, 0.9]}), "'faces[0].emotion' is a list"),
        # values the contract refuses (an edited file): eval scored them, renormalised, as if they were fine
        ("fifty.jpg", rec("fifty.jpg", face(happiness=1.0) | {"emotion": {"happiness": 50.0}}),
         "'faces[0].emotion['happiness']' is above 1 (50.0): not a probability"),
        ("zeros.jpg", rec("zeros.jpg", face(happiness=1.0) | {"emotion": {"happiness": 0.0, "neutral": 0.0}}),
         "'faces[0].emotion' sums to 0, not 1: not a distribution"),
        ("bbox.jpg", rec("bbox.jpg", face(happiness=1.0), face(1, happiness=1.0) | {"bbox": ["1", "2", "3", "4"]}),
         "'faces[1].bbox[0]' is a string, expected a number"),
        ("err.jpg", rec("err.jpg") | {"error": ["not", "text"]}, "'error' is a list"),
    ]
    results = write_jsonl(tmp_path / "r.jsonl", rec("good.jpg", face(happiness=0.7, neutral=0.3)),
                          *[c[1] for c in corrupt], {"image": 7}, "[1]", "{truncated",
                          rec("failed.jpg", error="not an image file PIL can read"))
    rows = "".join(f"{name},happiness\n" for name, _, _ in corrupt)
    labels = write_csv(tmp_path / "l.csv", f"image,label\ngood.jpg,happiness\n{rows}failed.jpg,happiness\n")
    res, out = run_eval(results, labels)
    assert res.exit_code == 0, res.output
    assert out["emotion"]["n"] == 1 and out["emotion"]["accuracy"] == 1.0
    assert out["emotion"]["nll"] == pytest.approx(-math.log(0.7), abs=1e-5)
    n = len(corrupt)
    expected = [f"{results}:{i + 2}: skipped: {reason}" for i, (_, _, reason) in enumerate(corrupt)] + [
        f"{results}:{n + 2}: skipped: no 'image' path (not a string, or empty)",
        f"{results}:{n + 3}: not a JSON object (a list)",
        f"{results}:{n + 4}: not valid JSON (Expecting property name enclosed in double quotes)"]
    assert out["problems"] == expected and out["skipped"] == len(expected)
    assert [line.removeprefix("cem: ") for line in res.stderr.splitlines()] == expected
    reasons = {m["image"]: m["reason"] for m in out["missing_images"]}
    assert reasons["failed.jpg"] == "the record has an error: not an image file PIL can read"
    assert reasons["faces-str.jpg"] == "record skipped ('faces' is a string, expected a list)"
    assert out["missing"] == n + 1


def test_python_api_and_plots(tmp_path):
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=0.9, neutral=0.1)),
                          rec("b.jpg", face(neutral=0.6, sadness=0.4)))
    labels = write_csv(tmp_path / "l.csv", "image,label\na.jpg,happiness\nb.jpg,sadness\n")
    ls = read_labels_csv(labels, LABELS)
    assert [(r.image, r.line, r.face) for r in ls.rows] == [("a.jpg", 2, None), ("b.jpg", 3, None)]
    assert np.array_equal(ls.rows[1].votes, np.eye(8)[3])
    res, matched = evaluate_file(results, labels, LABELS)
    assert res["emotion"]["accuracy"] == 0.5 and res["confusion"]["emotion"][3][0] == 1
    with pytest.raises(EvalError, match="no label rows"):
        read_labels_csv(write_csv(tmp_path / "h.csv", "image,label\n"), LABELS)
    res, out = run_eval(results, labels, "--plots", str(tmp_path / "plots"))
    assert res.exit_code == 0
    assert [Path(p).name for p in out["plots"]] == ["reliability.png", "confusion.png"]
    assert all(Path(p).stat().st_size > 1000 for p in out["plots"])


def test_extreme_values(tmp_path):
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=1.0)), rec("b.jpg", face(sadness=1.0)),
                          rec("big.jpg", face(happiness=1e308, neutral=1e308)))
    huge = write_csv(tmp_path / "h.csv", "image,neutral,happiness\na.jpg,1e308,1e308\n")
    fails(results, huge, f"{huge}:2: the label values of 'a.jpg' are too large to add up")
    long = write_csv(tmp_path / "long.csv", f"image,neutral,happiness\na.jpg,0,1\nb.jpg,0,{'1' * 200_000}\n")
    fails(results, long, f"{long}:3: not a readable CSV (field larger than field limit (131072))")
    labels = write_csv(tmp_path / "l.csv", "image,neutral,happiness\na.jpg,1,1\nbig.jpg,0,1\n")
    res, out = run_eval(results, labels)
    assert out["problems"] == [f"{results}:3: skipped: 'faces[0].expression['neutral']' is above 1 (1e+308): not "
                               f"a probability"]
    # the one scored row is a tie: accuracy and the like have no row to average (None, "n/a"), KL does
    assert out["emotion"]["n"] == 1 and out["emotion"]["n_scored"] == 0 and out["emotion"]["accuracy"] is None
    kl = 0.5 * math.log(0.5 / (1 - 7e-6)) + 0.5 * math.log(0.5 / 1e-6)
    assert out["emotion"]["kl"] == pytest.approx(kl, rel=1e-3) and out["emotion"]["ece"] is None
    text = CliRunner().invoke(main, ["eval", str(results), "--labels", str(labels)])
    assert text.exit_code == 0 and re.search(r"^accuracy\s+n/a\s+n/a$", text.stdout, re.M)


def test_records_made_with_two_settings_are_scored_with_a_note_and_a_bom_costs_no_record(tmp_path):
    """`cem eval` read a JSONL with a byte-order mark as one record short, and pooled records of two settings
    (a resumed run after a config change) without a word."""
    results = tmp_path / "r.jsonl"
    items = [rec("a.jpg", face(happiness=0.8, neutral=0.2), provenance={"settings": "aaa"}),
             rec("b.jpg", face(sadness=0.6, neutral=0.4), provenance={"settings": "bbb"})]
    results.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(i) + "\n" for i in items).encode())
    labels = write_csv(tmp_path / "l.csv", "image,neutral,happiness,sadness\na.jpg,1,3,0\nb.jpg,1,0,3\n")
    res, out = run_eval(results, labels)
    assert res.exit_code == 0 and out["emotion"]["n"] == 2 and out["skipped"] == 0
    assert "made with 2 different settings (aaa: 1 image(s), bbb: 1 image(s))" in res.stderr
    assert "the scores pool them" in res.stderr


def test_face_numbers_in_other_digits_and_values_under_an_unnamed_column_are_refused(tmp_path):
    """`face` "²" was a ValueError traceback ("²".isdigit() is true), "١" read as face 1; a value under a header
    cell with no name was left out of the scoring unseen."""
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=0.8, neutral=0.2)))
    for cell in ("\u00b2", "\u0661"):
        labels = write_csv(tmp_path / "l.csv", f"image,face,neutral,happiness\na.jpg,{cell},1,3\n")
        fails(results, labels, f"{labels}:2: column 'face': {cell!r} is not a face index (0, 1, ...)")
    labels = write_csv(tmp_path / "l.csv", "image,,neutral,happiness\na.jpg,7,1,3\n")
    fails(results, labels, f"{labels}:2: a value ('7') in column 2, which has no name in the header")


def test_a_number_written_with_an_underscore_is_refused(tmp_path):
    """Python's float() reads "1_0" as 10: the labels file was scored with it."""
    results = write_jsonl(tmp_path / "r.jsonl", rec("a.jpg", face(happiness=0.8, neutral=0.2)))
    labels = write_csv(tmp_path / "l.csv", "image,neutral,happiness\na.jpg,1_0,3\n")
    fails(results, labels, f"{labels}:2: column 'neutral': '1_0' is not a number")
