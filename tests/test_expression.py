"""The packaged expression model: loads offline, reads the astronaut's smile, is mirror- and batch-stable,
and its training command runs (one tiny step on synthetic faces)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from cem.datasets import FERPLUS_LABELS, FerPlus
from cem.fer.expression import DEFAULT_WEIGHTS, ExpressionModel


@pytest.fixture(scope="module")
def model():
    return ExpressionModel.from_pretrained()


def test_weights_load_without_network(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the expression model tried to open a network connection")

    import safetensors.torch  # noqa: F401  (imported first: ssl must load with the real socket class)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    m = ExpressionModel.from_pretrained()
    assert m.labels == list(FERPLUS_LABELS)
    assert (DEFAULT_WEIGHTS / "model.safetensors").stat().st_size < 20 * 1024 * 1024
    cfg = json.loads((DEFAULT_WEIGHTS / "config.json").read_text())
    assert cfg["temperature"] > 0 and cfg["labels"] == list(FERPLUS_LABELS)


def test_astronaut_expression_is_happiness(pipeline, astronaut):
    expr = pipeline.analyze(astronaut).faces[0].evidence.expression
    assert max(expr, key=expr.get) == "happiness"
    assert abs(sum(expr.values()) - 1) < 1e-6


def test_mirrored_input_gives_nearly_the_same_distribution(pipeline, astronaut):
    a = pipeline.analyze(astronaut).faces[0].evidence.expression
    b = pipeline.analyze(np.ascontiguousarray(astronaut[:, ::-1])).faces[0].evidence.expression
    assert max(abs(a[k] - b[k]) for k in a) < 0.1


def test_test_time_flip_averages_the_crop_and_its_mirror_logits(model):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (3, 48, 48), dtype=np.uint8)
    mirrored = crops[:, :, ::-1].copy()
    assert not model.test_time_flip  # one pass by default: the flip doubles the cost for no measured gain
    single, single_mirror = model.predict(crops), model.predict(mirrored)
    assert not np.allclose(single, single_mirror, atol=1e-3)
    flipped = ExpressionModel(model.model, model.labels, model.temperature, model.device, test_time_flip=True)
    both = flipped.predict(crops)
    assert np.allclose(both, flipped.predict(mirrored), atol=1e-5)  # exact mirror invariance
    # the flip averages logits: log-probabilities (up to a per-row constant) are the mean of the two passes
    mean_log = (np.log(single) + np.log(single_mirror)) / 2
    expected = np.exp(mean_log - mean_log.max(axis=1, keepdims=True))
    assert np.allclose(both, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)


def test_batch_equals_one_by_one(model):
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 255, (5, 48, 48), dtype=np.uint8)
    batch = model.predict(crops)
    single = np.concatenate([model.predict(crops[i : i + 1]) for i in range(5)])
    assert np.allclose(batch, single, atol=1e-5)
    assert np.allclose(batch.sum(axis=1), 1)


def test_cuda_request_without_cuda_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA"):
        ExpressionModel.from_pretrained(device="cuda")


def test_training_command_runs_one_tiny_step(tmp_path):
    from cem.training import TrainConfig, train_expression

    rng = np.random.default_rng(0)
    n = 24
    votes = rng.multinomial(10, [0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03], size=n)
    data = FerPlus(pixels=rng.integers(0, 255, (n, 48, 48), dtype=np.uint8), votes=votes,
                   names=np.array([f"{i}.png" for i in range(n)]))
    cfg = TrainConfig(epochs=1, batch_size=8, width=4, max_steps=1, threads=1, bf16=False)
    out = train_expression(data, data, tmp_path, cfg, log=lambda *_: None)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoint.pt").is_file()
    assert out["temperature"] > 0 and len(out["history"]) == 1
    m = ExpressionModel.from_pretrained(tmp_path)
    assert m.predict(data.pixels[:2]).shape == (2, 8)
    # the checkpoint resumes only the run it belongs to: other settings are refused, not continued or crashed on
    from cem.training import check_resumable

    with pytest.raises(ValueError, match="other settings \\(width 4 -> 8\\)"):
        check_resumable(tmp_path, TrainConfig(epochs=1, batch_size=8, width=8, max_steps=1, threads=1, bf16=False))
    check_resumable(tmp_path, TrainConfig(epochs=1, batch_size=8, width=4, max_steps=1, threads=2, bf16=False))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt: not a checkpoint this run can resume"):
        train_expression(data, data, tmp_path, cfg, log=lambda *_: None)
    (tmp_path / "train_settings.json").unlink()  # a checkpoint that does not say how it was made is not resumed
    with pytest.raises(ValueError, match="holds a checkpoint without the train_settings.json"):
        check_resumable(tmp_path, cfg)
    # a trained model whose checkpoint was removed is not trained over (its weights would be replaced)
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match=r"holds a trained model \(model.safetensors and config.json\) and no "
                                         r"checkpoint"):
        check_resumable(tmp_path, cfg)
    from cem.fer.expression import DEFAULT_WEIGHTS

    with pytest.raises(ValueError, match="holds a trained model"):  # the packaged weights, above all
        check_resumable(DEFAULT_WEIGHTS, cfg)


@pytest.mark.parametrize("args, words", [
    (["--epochs", "-1"], "--epochs must be a whole number >= 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--lr", "0"], "--lr must be a number > 0"),
    (["--lr", "nan"], "--lr must be a number > 0"),
    (["--mixup", "1.5"], "--mixup must be a number >= 0 and <= 1"),
    (["--max-steps", "0"], "--max-steps must be a whole number >= 1"),
    (["--device", "cuda:99"] if __import__("torch").cuda.is_available() else ["--device", "cuda"],
     "--device cuda"),
    (["--device", "tpu"], "--device tpu"),
    (["--teacher", "/nonexistent/teacher"], "--teacher /nonexistent/teacher: not a trained model folder"),
    (["--threads", "100000"], "--threads must be at most 1024"),  # OpenMP segfaulted on it
    (["--seed", str(2**40)], "--seed must be at most 4294967295"),
])
def test_training_options_out_of_range_exit_2_before_anything_is_written(tmp_path, capsys, args, words):
    """``--epochs -1`` trained nothing and still wrote a model (exit 0); every number is checked first."""
    from cem.training import main

    out = tmp_path / "run"
    assert main(["--out", str(out), "--data-dir", str(tmp_path / "no-data"), *args]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def _tiny_ferplus(n: int = 48) -> FerPlus:
    rng = np.random.default_rng(0)
    votes = rng.multinomial(10, [0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03], size=n)
    return FerPlus(pixels=rng.integers(0, 255, (n, 48, 48), dtype=np.uint8), votes=votes,
                   names=np.array([f"{i}.png" for i in range(n)]))


def test_a_resumed_training_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """Resuming reset torch's global generator (dropout's), so the weights differed from an uninterrupted run; and
    running the same --max-steps command again trained further each time."""
    from safetensors.numpy import load_file

    from cem.training import TrainConfig, train_expression

    data = _tiny_ferplus()
    quiet = dict(log=lambda *_: None)
    cfg = TrainConfig(epochs=3, batch_size=16, width=4, threads=1, bf16=False, dropout=0.5)
    train_expression(data, None, tmp_path / "whole", cfg, **quiet)
    first = TrainConfig(epochs=3, batch_size=16, width=4, threads=1, bf16=False, dropout=0.5, max_steps=3)
    train_expression(data, None, tmp_path / "resumed", first, **quiet)  # one epoch, as if killed there
    train_expression(data, None, tmp_path / "resumed", cfg, **quiet)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "resumed"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    short = TrainConfig(epochs=3, batch_size=16, width=4, threads=1, bf16=False, max_steps=2)
    train_expression(data, None, tmp_path / "short", short, **quiet)
    once = (tmp_path / "short" / "model.safetensors").read_bytes()
    train_expression(data, None, tmp_path / "short", short, **quiet)
    assert (tmp_path / "short" / "model.safetensors").read_bytes() == once


def test_training_data_and_folders_that_cannot_be_used_exit_2(tmp_path, capsys):
    """A split without votes, 32 px faces, --out through a file and a config.json that is a list were
    tracebacks (exit 1), or, for 32 px faces, a model labelled 48 px."""
    from cem.training import main

    d = tmp_path / "data"
    d.mkdir()
    np.savez(d / "train.npz", pixels=np.zeros((4, 48, 48), np.uint8), names=np.array(["a"] * 4))
    np.savez(d / "valid.npz", pixels=np.zeros((4, 32, 32), np.uint8), votes=np.ones((4, 10), np.int8),
             names=np.array(["a"] * 4))
    assert main(["--out", str(tmp_path / "run"), "--data-dir", str(d)]) == 2
    assert "train.npz: not a FER+ split: no votes array" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "run"), "--data-dir", str(d), "--calibrate-only"]) == 2
    assert "pixels must be (N, 48, 48)" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["--out", str(tmp_path / "afile" / "sub"), "--data-dir", str(d)]) == 2
    assert "a file is in the way" in capsys.readouterr().err
    (tmp_path / "listcfg").mkdir()
    (tmp_path / "listcfg" / "config.json").write_text("[1, 2]")
    from cem.training import load_model_folder

    with pytest.raises(ValueError, match="config.json: not an expression model's config"):
        load_model_folder(tmp_path / "listcfg")


def test_calibrate_fits_the_temperature_on_the_logits_inference_uses(tmp_path, monkeypatch):
    """``--calibrate-only``: the temperature is fitted on one-pass logits where the folder's config turns the
    mirror pass off (as inference then computes them), and the neutral reference is the loaded model's mean
    log-probability at that temperature over the neutral-plurality faces."""
    import json

    from cem import training
    from cem.eval import plurality
    from cem.fer.expression import mean_log_probs
    from cem.training import calibrate, fit_temperature, plurality_targets, predict_logits

    # faces lit from the left are voted mostly neutral, from the right mostly happy: the mirror image swaps
    # the two, so one-pass and mirror-averaged logits (and their temperatures) differ
    rng = np.random.default_rng(1)
    n = 64
    left = np.arange(n) % 2 == 0
    ramp = np.linspace(40, 220, 48)
    pixels = np.where(left[:, None, None], ramp[::-1], ramp) + rng.normal(0, 20, (n, 48, 48))
    votes = np.zeros((n, 8), np.int64)
    votes[left, 0], votes[left, 1], votes[~left, 0], votes[~left, 1] = 8, 2, 2, 8
    data = FerPlus(pixels=np.clip(pixels, 0, 255).astype(np.uint8), votes=votes,
                   names=np.array([f"{i}.png" for i in range(n)]))
    # trained without augmentation (whose random flips would teach it the mirror symmetry) to tell them apart
    monkeypatch.setattr(training, "_augment", lambda x, gen, strength="robust": x)
    training.train_expression(data, None, tmp_path, training.TrainConfig(
        epochs=6, batch_size=16, width=4, threads=1, bf16=False), log=lambda *_: None)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "test_time_flip": False}))
    net = ExpressionModel.from_pretrained(tmp_path).model
    flipped = predict_logits(net, data.pixels, flip=True)
    out = calibrate(tmp_path, data)
    m = ExpressionModel.from_pretrained(tmp_path)
    one_pass = predict_logits(m.model, data.pixels, flip=False)
    targets, keep = plurality_targets(data.distribution)
    assert out["temperature"] == pytest.approx(fit_temperature(one_pass[keep], targets[keep]))
    assert abs(out["temperature"] - fit_temperature(flipped[keep], targets[keep])) > 0.05 * out["temperature"]
    assert m.temperature == out["temperature"] and not m.test_time_flip
    y, untied = plurality(data.distribution)
    neutral = untied & (y == 0)
    assert neutral.sum() > 5
    np.testing.assert_allclose(m.neutral_reference, mean_log_probs(m.predict(data.pixels[neutral])), atol=1e-5)


def test_fitted_temperature_recovers_a_known_one():
    from cem.training import fit_temperature, softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 8))
    p_true = softmax(logits, 2.0)
    assert fit_temperature(logits, p_true) == pytest.approx(2.0, rel=0.02)


def test_relative_to_divides_out_the_subjects_neutral_offset():
    """ExpressionModel.relative_to: a subject whose neutral face looks like the average neutral face is left
    alone; an offset (a resting face read as sad) is divided out by the shrink; rows stay distributions;
    a model without a neutral reference says how to get one."""
    from cem.fer.expression import ExpressionModel

    ref = np.log(np.array([0.7, 0.1, 0.1, 0.1]))
    model = ExpressionModel(None, ["neutral", "happiness", "sadness", "anger"], 1.0, "cpu", neutral_reference=ref)
    p = np.array([[0.4, 0.1, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(model.relative_to(p, ref), p)
    np.testing.assert_allclose(model.relative_to(p, ref + 3.0), p)  # a constant shift is no offset
    sad_face = ref + np.array([0.0, 0.0, np.log(4.0), 0.0])  # their resting face: 4x the average sadness
    full = model.relative_to(p, sad_face, shrink=1.0)
    expect = p * np.array([1, 1, 0.25, 1])
    np.testing.assert_allclose(full, expect / expect.sum(axis=1, keepdims=True))
    half = model.relative_to(p, sad_face, shrink=0.5)
    assert full[0, 2] < half[0, 2] < p[0, 2] and np.allclose(half.sum(axis=1), 1)
    np.testing.assert_allclose(model.relative_to(p, sad_face, shrink=0.0), p)
    # an offset beyond SUBJECT_OFFSET_CAP nats counts as the cap: a resting face read 20 % happy against an
    # average of 0.04 % (a sharp photo against FER+'s 48 px faces) turned 4 of 5 posed smiles neutral
    from cem.fer.expression import SUBJECT_OFFSET_CAP

    happy_face = ref + np.array([0.0, 6.2, 0.0, 0.0])
    smile = np.array([[0.15, 0.8, 0.03, 0.02]])
    capped = model.relative_to(smile, happy_face, shrink=0.5)
    expect = smile * np.array([1, np.exp(-0.5 * SUBJECT_OFFSET_CAP), 1, 1])
    np.testing.assert_allclose(capped, expect / expect.sum())
    assert capped[0].argmax() == 1  # still a smile
    bare = ExpressionModel(None, model.labels, 1.0, "cpu")
    with pytest.raises(ValueError, match="neutral_reference"):
        bare.relative_to(p, sad_face)
