"""The Ray engine (``cem annotate --engine ray``, :mod:`cem.distributed`) against the local runner.

A local Ray runtime (2 CPUs, no dashboard, temp dir under /tmp: Ray's unix sockets must fit in 107 bytes)
serves the module; the two-node test starts its own cluster with ``ray start`` and stops it by process id.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cem.distributed import merge, output_paths

N_GOOD = 14


def _cem(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cem.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _comparable(recs: list[dict]) -> dict[str, dict]:
    """Records by image (each is given once), each valid by the contract, without what legitimately differs
    between runs: timings and the Ray node."""
    from cem.contract import validate_record

    out = {}
    for rec in recs:
        validate_record(rec)
        rec = json.loads(json.dumps(rec))
        rec["provenance"].pop("timings_ms")
        rec["provenance"].pop("node", None)
        assert rec["image"] not in out, f"duplicate record for {rec['image']}"
        out[rec["image"]] = rec
    return out


@pytest.fixture(scope="module")
def image_set(tmp_path_factory, astronaut) -> Path:
    """A few dozen images: good single faces, two-face scenes, no face, corrupt, empty, missing; a manifest
    with contexts (some empty) and an extra column."""
    from skimage import data

    root = tmp_path_factory.mktemp("rayset")
    names: list[str] = []
    head = astronaut[20:300, 90:370]
    for i in range(N_GOOD):  # single faces at several scales, crops and mirrorings
        s = 0.45 + 0.07 * i
        img = Image.fromarray(head if i % 2 else np.ascontiguousarray(head[:, ::-1]))
        img = img.resize((int(280 * s), int(280 * s)))
        names.append(f"good{i:02d}.{'png' if i % 3 else 'jpg'}")
        img.save(root / names[-1])
    for i in range(3):  # two faces side by side
        pair = np.concatenate([head, np.ascontiguousarray(head[:, ::-1])], axis=1)
        names.append(f"two{i}.png")
        Image.fromarray(pair).resize((560 - 60 * i, 280 - 30 * i)).save(root / names[-1])
    for i, scene in enumerate([data.coffee(), data.rocket(), data.chelsea()]):
        names.append(f"noface{i}.png")
        Image.fromarray(scene).save(root / names[-1])
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    buf = root / "good00.jpg"
    (root / "truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size // 3])
    (root / "empty.png").write_bytes(b"")
    names += ["corrupt.jpg", "truncated.jpg", "empty.png", "missing.jpg"]
    contexts = ["at a funeral", "", "winning a prize", "after a long flight"]
    lines = ["image,context,participant"] + [f"{n},{contexts[i % 4]},P{i:02d}" for i, n in enumerate(names)]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def local_records(image_set, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    r = _cem("annotate", str(image_set / "manifest.csv"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    return _read(out)


def _auth() -> dict[str, str]:
    """Ray 2.5x clusters require a token; each test cluster gets its own, given to every process by
    environment (nothing is written to ~/.ray)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def ray_runtime(tmp_path_factory):
    """A local Ray for this module. ``trigger``: create this file to make one FER actor kill itself."""
    from cem.engines.ray_engine import KILL_HOOK_ENV

    temp = tempfile.mkdtemp(prefix="cemray", dir="/tmp")
    trigger = tmp_path_factory.mktemp("hook") / "kill-one-actor"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _auth().items():  # before Ray reads its configuration; the CLI subprocesses inherit them
            mp.setenv(k, v)
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, object_store_memory=200 * 2**20,
                 runtime_env={"env_vars": {KILL_HOOK_ENV: str(trigger)}}, log_to_driver=False)
        try:
            yield {"address": ray.get_runtime_context().gcs_address, "trigger": trigger}
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def test_output_paths_and_bad_format(tmp_path):
    assert output_paths(tmp_path / "r.jsonl") == (tmp_path / "r.jsonl", tmp_path / "r", "jsonl")
    assert output_paths(tmp_path / "r") == (tmp_path / "r.jsonl", tmp_path / "r", "jsonl")
    assert output_paths(tmp_path / "r.parquet") == (tmp_path / "r.parquet", tmp_path / "r", "parquet")
    with pytest.raises(ValueError, match="does not match"):
        output_paths(tmp_path / "r.jsonl", "parquet")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        output_paths(tmp_path / "f.jsonl")


def test_merge_keeps_first_record_per_key_in_jsonl_and_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    a, b = tmp_path / "part-1.jsonl", tmp_path / "part-2.jsonl"
    rec = {"image": "x.png", "context": None, "width": 2, "height": 2, "faces": [], "error": None,
           "provenance": {"timings_ms": {"fer": 1.0}}}
    a.write_text(json.dumps(rec) + "\n" + json.dumps(rec | {"context": "c"}) + "\n" + '{"image": "half')
    b.write_text(json.dumps(rec | {"provenance": {"timings_ms": {"fer": 9.0}}}) + "\n")
    assert merge([a, b], tmp_path / "m.jsonl") == (2, 1)
    merged = _read(tmp_path / "m.jsonl")
    assert [(r["image"], r.get("context")) for r in merged] == [("x.png", None), ("x.png", "c")]
    assert merged[0]["provenance"]["timings_ms"]["fer"] == 1.0  # the first copy wins
    assert merge([a, b], tmp_path / "m.parquet", "parquet") == (2, 1)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [json.loads(r["record"]) for r in table] == merged
    assert [(r["image"], r["context"], r["n_faces"]) for r in table] == [("x.png", None, 0), ("x.png", "c", 0)]


def test_rerun_without_resume_replaces_old_output_and_a_bad_input_removes_nothing(tmp_path):
    from cem.distributed import annotate

    out, shards = tmp_path / "o.jsonl", tmp_path / "o"
    shards.mkdir()
    old = {"image": "old.png", "width": 1, "height": 1, "faces": [], "error": None, "provenance": {}}
    part = shards / "part-20261127T120000-4242-00001.jsonl"  # as an earlier run names its shards
    part.write_text(json.dumps(old) + "\n")
    mine = shards / "part-00000.jsonl"  # a user's own file in that folder: never read, never deleted
    mine.write_text("not cem's\n")
    out.write_text(json.dumps(old) + "\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,context\nx.png,\n")
    with pytest.raises(ValueError, match="'image'"):
        annotate([bad], "default", out, overwrite=True)
    assert part.exists() and _read(out) == [old]
    # nothing new to do (no inputs): with resume the old records stay; a forgotten resume is refused (it would
    # delete the shards of a stopped run); with overwrite, the output starts over
    summary = annotate([], "default", out, resume=True)
    assert summary.images == 0 and summary.records == 1 and _read(out) == [old]
    with pytest.raises(ValueError, match="already has records of an earlier run"):
        annotate([], "default", out)
    assert part.exists() and _read(out) == [old]
    out.unlink()  # a run stopped before merging: its records are in the shards alone
    with pytest.raises(ValueError, match="already has records of an earlier run"):
        annotate([], "default", out)
    assert part.exists()
    assert annotate([], "default", out, overwrite=True).records == 0
    assert _read(out) == [] and list(shards.iterdir()) == [mine] and mine.read_text() == "not cem's\n"


def test_the_ray_engine_reports_the_input_notes_of_the_local_runner(tmp_path):
    """A pattern that matches nothing and a repeated manifest row are said, as by the local runner (the Ray
    engine dropped them silently). Everything here is done already, so no Ray runtime starts."""
    from cem.distributed import annotate

    (tmp_path / "a.png").write_bytes(b"x")
    man = tmp_path / "m.csv"
    man.write_text("image\na.png\na.png\n")
    out = tmp_path / "o.jsonl"
    done = {"image": str(tmp_path / "a.png"), "width": 1, "height": 1, "faces": [], "error": None,
            "provenance": {}}
    out.write_text(json.dumps(done) + "\n")
    summary = annotate([man, str(tmp_path / "nothing-*.png")], "default", out, resume=True)
    assert summary.images == 0 and summary.skipped == 1
    text = summary.text()
    assert f"cem: {tmp_path / 'nothing-*.png'}: no file matches this pattern" in text
    assert f"{man}:3" in text and f"repeats {man}:2" in text


def test_openai_reasoning_actors_share_the_concurrency_and_get_the_server_settings(monkeypatch):
    from cem.config import Config
    from cem.engines.ray_engine import reasoner_env, reasoner_share

    cfg = Config.load("vllm")
    assert cfg.reasoner.options["concurrency"] == 8
    share = reasoner_share(cfg, 3)
    assert share.reasoner.options["concurrency"] == 3 and cfg.reasoner.options["concurrency"] == 8
    assert reasoner_share(cfg, 1) is cfg and reasoner_share(Config.load("default"), 4).reasoner.backend == "rules"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://pool:8000/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert reasoner_env(cfg) == {"env_vars": {"OPENAI_BASE_URL": "http://pool:8000/v1"}}
    assert reasoner_env(Config.load("default")) is None


def test_help_does_not_import_ray():
    code = "import sys, cem, cem.cli, cem.distributed; print('ray' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    r = _cem("annotate", "--help")
    assert r.returncode == 0 and "--engine" in r.stdout and "--fer-actors" in r.stdout


def test_cli_ray_engine_gives_the_local_records(image_set, local_records, ray_runtime, tmp_path):
    out = tmp_path / "ray.jsonl"
    r = _cem("annotate", str(image_set / "manifest.csv"), "-o", str(out), "--engine", "ray",
             "--address", ray_runtime["address"], "--fer-actors", "2")
    assert r.returncode == 0, r.stderr
    recs = _read(out)
    assert len(recs) == len(local_records) == N_GOOD + 3 + 3 + 4
    ray_by_key, local_by_key = _comparable(recs), _comparable(local_records)
    assert ray_by_key == local_by_key
    manifest = {Path(line.split(",")[0]).name: line.split(",")[1] or None
                for line in (image_set / "manifest.csv").read_text().splitlines()[1:]}
    assert all(rec["context"] == manifest[Path(rec["image"]).name] for rec in recs)
    assert all(rec["provenance"]["node"] for rec in recs)
    by_name = {Path(rec["image"]).name: rec for rec in recs}
    assert len(by_name["two0.png"]["faces"]) == 2 and by_name["noface0.png"]["faces"] == []
    assert by_name["corrupt.jpg"]["error"] and by_name["missing.jpg"]["error"].endswith("file not found")
    assert sorted(p.name for p in (tmp_path / "ray").iterdir())[0].startswith("part-")
    assert "24 images" in r.stderr and "errors" in r.stderr  # the final summary


def test_actor_killed_mid_run_loses_and_duplicates_nothing(image_set, local_records, ray_runtime, tmp_path):
    """Two-stage plan (FER pool, then a reasoning pool); one FER actor SIGKILLs itself holding a batch."""
    from cem.distributed import annotate

    trigger = ray_runtime["trigger"]
    trigger.write_text("")
    summary = annotate(image_set / "manifest.csv", "default", tmp_path / "k.jsonl", fer_actors=2,
                       fer_cpus_per_actor=0.5, reason_actors=1, reason_cpus_per_actor=0.5, batch_size=2)
    assert not trigger.exists() and Path(f"{trigger}.fired").exists()  # an actor did die
    recs = _read(tmp_path / "k.jsonl")
    assert _comparable(recs) == _comparable(local_records)  # none lost, none twice, same content
    assert summary.images == summary.records == len(local_records)


def test_resume_skips_done_inputs_even_from_a_local_run(image_set, local_records, ray_runtime, tmp_path):
    """A merged file from the local runner counts as done; only the missing images are annotated."""
    from cem.distributed import annotate

    out = tmp_path / "r.jsonl"
    kept = local_records[5:]
    out.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    summary = annotate([image_set / "manifest.csv"], "default", out, resume=True, batch_size=4)
    assert summary.skipped == len(kept) and summary.images == 5
    recs = _read(out)
    assert _comparable(recs) == _comparable(local_records)
    assert recs[: len(kept)] == kept  # records already there are kept as they were


def test_dataset_of_bytes_with_named_columns(image_set, local_records, ray_runtime, tmp_path):
    import ray.data

    from cem.distributed import annotate

    names = ["good01.png", "two1.png", "corrupt.jpg", "noface2.png"]
    ds = ray.data.from_items([{"blob": (image_set / n).read_bytes(), "name": str(image_set / n),
                               "caption": "at a party" if i % 2 else None} for i, n in enumerate(names)])
    summary = annotate(ds, "default", tmp_path / "d.parquet", image_column="blob", name_column="name",
                       context_column="caption", context="in an office")
    import pyarrow.parquet as pq

    recs = [json.loads(r) for r in pq.read_table(tmp_path / "d.parquet").column("record").to_pylist()]
    assert summary.images == 4 and {r["context"] for r in recs} == {"at a party", "in an office"}
    local = _comparable(local_records)
    for rec in _comparable(recs).values():
        want = local[rec["image"]]
        if rec["error"]:  # the same problem, named after the row (no file was opened)
            assert want["error"] and rec["error"].split(": ", 1)[1] == want["error"].split(": ", 1)[1]
        else:
            want = {k: v for k, v in want.items() if k not in ("meta", "context")}  # the manifest's
            assert {k: v for k, v in rec.items() if k != "context"} == want
    with pytest.raises(ValueError, match="no column 'path'"):
        annotate(ds, "default", tmp_path / "e.jsonl", image_column="blob")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(marker: str) -> None:
    """Stop the Ray processes whose command line names ``marker`` (this cluster's temp dir), and their
    children (workers, renamed ray::...), by process id: never every Ray on the machine."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_two_node_cluster_uses_both_nodes(image_set, local_records, tmp_path):
    """`ray start --head` plus a second `ray start --address` (one CPU each): records name both nodes."""
    pytest.importorskip("ray")
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="cem2n", dir="/tmp")
    port = _free_port()
    env = os.environ | _auth()
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    try:
        head = subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--temp-dir", temp,
                               "--include-dashboard", "false", *common], capture_output=True, text=True,
                              timeout=180, env=env)
        assert head.returncode == 0, head.stderr
        worker = subprocess.run([ray_bin, "start", "--address", f"127.0.0.1:{port}", *common],
                                capture_output=True, text=True, timeout=180, env=env)
        assert worker.returncode == 0, worker.stderr
        out = tmp_path / "two.jsonl"
        r = _cem("annotate", str(image_set / "manifest.csv"), "-o", str(out), "--engine", "ray",
                 "--address", f"127.0.0.1:{port}", "--fer-actors", "2", env=env)
        assert r.returncode == 0, r.stderr
        recs = _read(out)
        assert len({rec["provenance"]["node"] for rec in recs}) == 2
        assert _comparable(recs) == _comparable(local_records)
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_inputs_without_context_have_none_not_the_text_nan(image_set, ray_runtime, tmp_path):
    """A folder run (no context anywhere): every record's context is null, as the local engine writes it, and a
    resume finds them all done (a context column of nulls reached the actors as the text "nan")."""
    from cem.distributed import annotate

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(image_set.glob("good*.png"))[:3]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "f.jsonl"
    annotate([folder], "default", out, batch_size=2)
    recs = _read(out)
    assert len(recs) == 3 and [r["context"] for r in recs] == [None, None, None]
    again = annotate([folder], "default", out, resume=True, batch_size=2)
    assert again.skipped == 3 and again.images == 0 and len(_read(out)) == 3


def test_a_ray_run_is_refused_while_a_local_run_writes_the_output(tmp_path):
    from cem.distributed import annotate
    from cem.sinks import OutputLock

    out = tmp_path / "o.jsonl"
    lock = OutputLock(out)  # as a local run holds it
    try:
        with pytest.raises(ValueError, match="being written by another cem run"):
            annotate([], "default", out, overwrite=True)
    finally:
        lock.release()
    assert annotate([], "default", out).records == 0  # free again
