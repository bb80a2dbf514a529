"""Training of the expression CNN on FER+ crowd-vote distributions (``cem train-expression``).

Recipe (chosen to fit a 2-core CPU session; bf16 autocast uses AMX/AVX-512 where the CPU has it):

* data: FER+ ``train.npz`` (poor faces dropped, see :mod:`cem.datasets`); targets are the normalised
  vote distributions over the eight emotions, loss is the cross-entropy to them (= KL up to a constant);
* augmentation on the batch: horizontal flip, random rotation (±12°), scale (0.9–1.12) and shift
  (±8 %), gamma jitter, random erasing; every crop is then standardised per image as at inference;
* SGD with Nesterov momentum, cosine learning rate with a one-epoch warm-up, weight decay 5e-4;
* evaluation with test-time horizontal flips (logits averaged), as at inference;
* after the last epoch a temperature is fitted on ``valid.npz`` by standard temperature scaling (Guo et al.
  2017): it minimises the NLL of the plurality label (ties excluded), which calibrates the top-1
  confidence. (Minimising KL to the vote distributions instead gives T near 1, a lower KL and a top-1
  ECE near 0.12; the README reports the trade-off.) ``--calibrate-only`` refits it on a finished run.

A checkpoint is written after every epoch and the run resumes from it, so a stopped session loses at
most one epoch. The shipped weights are the final epoch (no selection on valid), saved as safetensors
with a ``config.json`` that records labels, preprocessing, temperature, seed and valid metrics.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cem.datasets import FERPLUS_LABELS, FerPlus, load_ferplus
from cem.eval import distribution_metrics
from cem.fer.expression import CROP_SIZE, standardize


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    width: int = 32
    dropout: float = 0.3
    seed: int = 0
    threads: int = 2
    bf16: bool = True
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke tests)


def _augment(x, gen):  # x: (N,1,48,48) float in [0,1]
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(12)
    scale = 0.9 + torch.rand(n, generator=gen) * 0.22
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.08 * 2  # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.4)
    x = x.clamp(1e-4, 1) ** gamma
    # random erasing: one rectangle of 2-20 % of the area on half the crops
    size = x.shape[-1]
    area = (0.02 + torch.rand(n, generator=gen) * 0.18) * size * size
    aspect = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log(3))
    h = (area * aspect).sqrt().clamp(1, size - 1)
    w = (area / aspect).sqrt().clamp(1, size - 1)
    y0 = torch.rand(n, generator=gen) * (size - h)
    x0 = torch.rand(n, generator=gen) * (size - w)
    rows = torch.arange(size).float()
    mask_r = (rows[None] >= y0[:, None]) & (rows[None] < (y0 + h)[:, None])
    mask_c = (rows[None] >= x0[:, None]) & (rows[None] < (x0 + w)[:, None])
    erase = (torch.rand(n, generator=gen) < 0.5)[:, None, None] & mask_r[:, :, None] & mask_c[:, None, :]
    fill = torch.rand(n, 1, 1, generator=gen)
    x = torch.where(erase[:, None], fill[:, None], x)
    return x


def _standardize_torch(x):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x - mean) / std


def predict_logits(model, pixels: np.ndarray, batch_size: int = 512, bf16: bool = False) -> np.ndarray:
    """Flip-averaged logits for (N, 48, 48) uint8 crops, preprocessed exactly as at inference."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(pixels), batch_size):
            x = torch.from_numpy(standardize(pixels[i : i + batch_size]))[:, None]
            logits = (model(x).float() + model(x.flip(-1)).float()) / 2
            out.append(logits.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(FERPLUS_LABELS)), np.float32)


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def plurality_targets(p_human: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(one-hot plurality targets, mask of non-tied rows) for temperature scaling on the plurality label."""
    from cem.eval import plurality

    y, keep = plurality(p_human)
    return np.eye(p_human.shape[1])[y], keep


def fit_temperature(logits: np.ndarray, p_human: np.ndarray) -> float:
    """Temperature minimising the mean cross-entropy to the target rows (golden-section on log T).

    With one-hot plurality targets this is standard temperature scaling; with vote distributions it
    minimises KL(human || model)."""

    def loss(log_t: float) -> float:
        p = np.clip(softmax(logits, math.exp(log_t)), 1e-12, None)
        return float(-(p_human * np.log(p)).sum(axis=1).mean())

    lo, hi = math.log(0.25), math.log(8.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    return float(math.exp((lo + hi) / 2))


def train_expression(
    train: FerPlus, valid: FerPlus, out_dir: str | Path, cfg: TrainConfig, log=print
) -> dict:
    """Train, checkpointing to ``out_dir/checkpoint.pt``; write ``model.safetensors`` + ``config.json``."""
    import torch
    from safetensors.torch import save_file

    from cem.fer.expression_net import ExpressionNet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)

    x_all = torch.from_numpy(train.pixels.astype(np.float32) / 255.0)[:, None]
    y_all = torch.from_numpy(train.distribution.astype(np.float32))
    model = ExpressionNet(len(FERPLUS_LABELS), cfg.width, cfg.dropout).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = max(1, len(x_all) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < steps_per_epoch:
            return cfg.lr * (step + 1) / steps_per_epoch
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - steps_per_epoch) / max(1, total - steps_per_epoch)))

    ckpt_path = out / "checkpoint.pt"
    start_epoch, history = 0, []
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")

    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x_all), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = _standardize_torch(_augment(x_all[idx], gen)).contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            loss = -(y_all[idx] * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        metrics = distribution_metrics(valid.distribution, softmax(predict_logits(model, valid.pixels)))
        history.append({"epoch": epoch + 1, "train_loss": running / (i + 1), "seconds": time.time() - t0, **metrics})
        log(json.dumps(history[-1]))
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "epoch": epoch + 1,
             "history": history},
            ckpt_path.with_suffix(".tmp"),
        )
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break

    logits = predict_logits(model, valid.pixels)
    targets, keep = plurality_targets(valid.distribution)
    temperature = fit_temperature(logits[keep], targets[keep])
    valid_metrics = distribution_metrics(valid.distribution, softmax(logits, temperature))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {
        "architecture": "ExpressionNet",
        "labels": list(FERPLUS_LABELS),
        "width": cfg.width,
        "dropout": cfg.dropout,
        "input": {"size": CROP_SIZE, "channels": 1, "normalisation": "per-image zero mean, unit variance"},
        "test_time_flip": True,
        "temperature": temperature,
        "calibration": "temperature scaling on the plurality label of FER+ valid (ties excluded)",
        "train": asdict(cfg),
        "valid_metrics": valid_metrics,
        "history": history,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    log(f"temperature {temperature:.3f}; valid {json.dumps(valid_metrics)}")
    return config


def calibrate(out_dir: str | Path, valid: FerPlus) -> dict:
    """Refit the temperature of a trained model folder on ``valid`` and update its config.json."""
    from safetensors.torch import load_file

    from cem.fer.expression_net import ExpressionNet

    out = Path(out_dir)
    config = json.loads((out / "config.json").read_text())
    model = ExpressionNet(len(config["labels"]), int(config["width"]), float(config.get("dropout", 0.0)))
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    logits = predict_logits(model, valid.pixels)
    targets, keep = plurality_targets(valid.distribution)
    t = fit_temperature(logits[keep], targets[keep])
    config.update(temperature=t, valid_metrics=distribution_metrics(valid.distribution, softmax(logits, t)),
                  calibration="temperature scaling on the plurality label of FER+ valid (ties excluded)")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder with ferplus/{train,valid}.npz")
    p.add_argument("--out", required=True, help="output folder for weights, config and checkpoint")
    for f in ("epochs", "batch_size", "width", "seed", "threads", "max_steps"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(TrainConfig, f))
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--calibrate-only", action="store_true",
                   help="refit the temperature of the finished run in --out on valid, and rewrite its config")
    a = p.parse_args(argv)
    if a.calibrate_only:
        calibrate(a.out, load_ferplus("valid", a.data_dir))
        return 0
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, width=a.width, seed=a.seed, threads=a.threads,
                      max_steps=a.max_steps, lr=a.lr)
    train_expression(load_ferplus("train", a.data_dir), load_ferplus("valid", a.data_dir), a.out, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
