"""Training of the expression CNN on FER+ crowd-vote distributions (``cem train-expression``).

Recipe (chosen to fit a 2-core CPU session; bf16 autocast uses AMX/AVX-512 where the CPU has it):

* data: FER+ ``train.npz`` (poor faces dropped, see :mod:`cem.datasets`); targets are the normalised
  vote distributions over the eight emotions, loss is the cross-entropy to them (= KL up to a constant);
* augmentation on the batch: horizontal flip, random rotation (±12°), scale (0.9–1.12) and shift
  (±8 %), gamma jitter, random erasing; optionally mixup (``--mixup P``: a share P of the faces is blended
  with another face of the batch, pixels and vote distributions alike, the own face weighing 0.5-1);
  every crop is then standardised per image as at inference;
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
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cem.datasets import FERPLUS_LABELS, FerPlus, load_ferplus
from cem.eval import distribution_metrics
from cem.fer.expression import CROP_SIZE, ExpressionModel, mirror_logits, standardize

MAX_THREADS = 1024  # as expression.threads (cem.config)


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
    device: str = "cpu"
    # "basic": flip, affine, gamma, erasing (the first model); "robust": adds what separates a user's photos
    # from FER2013's (resolution loss and sharpening, blur, noise, side lighting, stronger pose, occlusion)
    augment: str = "robust"
    # per-face loss weight = freq(plurality label) ** -class_balance, normalised to mean 1 (0 = off)
    class_balance: float = 0.0
    # distillation: the loss mixes the human votes with an ensemble of teachers (folders of trained models)
    teachers: tuple[str, ...] = ()
    distill_weight: float = 0.5
    # share of the faces mixed with another face of the batch (mixup; pixels and targets alike); 0 = off
    mixup: float = 0.0

    def __post_init__(self) -> None:
        """Every setting in its range (ValueError naming the option): ``epochs=-1`` trained nothing and still
        wrote a model."""
        import math

        for name, low in (("epochs", 1), ("batch_size", 1), ("width", 1), ("threads", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"--max-steps must be a whole number >= 1, got {self.max_steps!r}")
        if self.threads > MAX_THREADS:  # OpenMP crashes the process (a segfault) on 100,000
            raise ValueError(f"--threads must be at most {MAX_THREADS}, got {self.threads}")
        if self.seed > 2**32 - 1:  # numpy's seeds end there
            raise ValueError(f"--seed must be at most {2**32 - 1}, got {self.seed}")
        for name, lo, hi, open_low in (("lr", 0.0, math.inf, True), ("weight_decay", 0.0, math.inf, False),
                                       ("dropout", 0.0, 1.0, False), ("class_balance", 0.0, math.inf, False),
                                       ("distill_weight", 0.0, 1.0, False), ("mixup", 0.0, 1.0, False)):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < lo or v > hi or (open_low and v == lo):
                bound = f"> {lo:g}" if open_low else f">= {lo:g}"
                raise ValueError(f"--{name.replace('_', '-')} must be a number {bound}"
                                 + (f" and <= {hi:g}" if math.isfinite(hi) else "") + f", got {v!r}")
        if self.augment not in ("basic", "robust"):
            raise ValueError(f"--augment must be basic or robust, got {self.augment!r}")


def _rand(n: int, gen, device, *shape: int):
    import torch

    return torch.rand(n, *shape, generator=gen, device=device)


def _augment(x, gen, strength: str = "robust"):  # x: (N,1,48,48) float in [0,1], on the generator's device
    """Batch augmentation on the tensor's device; every random number comes from ``gen``."""
    import torch
    import torch.nn.functional as F

    n, dev, size = x.shape[0], x.device, x.shape[-1]
    robust = strength == "robust"
    flip = _rand(n, gen, dev) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    max_rot, scale_lo, scale_span, max_shift = (20, 0.85, 0.3, 0.1) if robust else (12, 0.9, 0.22, 0.08)
    angle = (_rand(n, gen, dev) * 2 - 1) * math.radians(max_rot)
    scale = scale_lo + _rand(n, gen, dev) * scale_span
    shift = (_rand(n, gen, dev, 2) * 2 - 1) * max_shift * 2  # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if robust:
        # resolution: FER2013 faces are soft 48 px web crops; users' faces are often sharper (downscaled from
        # high resolution) or smaller. Half the batch is degraded (down to 14-40 px and back) or sharpened.
        mode = _rand(n, gen, dev)
        low = int(14 + float(_rand(1, gen, dev)) * 26)
        small = F.interpolate(x, size=(low, low), mode="area")
        x = torch.where((mode < 0.3)[:, None, None, None],
                        F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False), x)
        kernel = torch.tensor([1.0, 2.0, 1.0], device=dev)
        kernel = (kernel[:, None] * kernel[None]) / 16
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel[None, None])
        amount = _rand(n, gen, dev)[:, None, None, None]
        sharpen = ((mode >= 0.3) & (mode < 0.5))[:, None, None, None]
        blur = ((mode >= 0.5) & (mode < 0.65))[:, None, None, None]
        x = torch.where(sharpen, (x + amount * 1.5 * (x - blurred)).clamp(0, 1), x)
        x = torch.where(blur, blurred, x)
        # side lighting: a multiplicative linear ramp in a random direction
        direction = _rand(n, gen, dev) * 2 * math.pi
        coords = torch.linspace(-1, 1, size, device=dev)
        ramp = torch.cos(direction)[:, None, None] * coords[None, None, :] + \
            torch.sin(direction)[:, None, None] * coords[None, :, None]
        depth = (_rand(n, gen, dev) * 0.5)[:, None, None] * (_rand(n, gen, dev) < 0.5)[:, None, None]
        x = (x * (1 + depth * ramp)[:, None]).clamp(0, 1)
        noise = (_rand(n, gen, dev) < 0.3)[:, None, None, None] * _rand(n, gen, dev)[:, None, None, None] * 0.05
        x = (x + noise * torch.randn(x.shape, generator=gen, device=dev)).clamp(0, 1)
    gamma = torch.exp((_rand(n, gen, dev, 1, 1, 1) * 2 - 1) * 0.4)
    x = x.clamp(1e-4, 1) ** gamma
    # random erasing (occlusion: hands, glasses, hair): one rectangle of 2-20 % of the area on half the crops
    area = (0.02 + _rand(n, gen, dev) * (0.23 if robust else 0.18)) * size * size
    aspect = torch.exp((_rand(n, gen, dev) * 2 - 1) * math.log(3))
    h = (area * aspect).sqrt().clamp(1, size - 1)
    w = (area / aspect).sqrt().clamp(1, size - 1)
    y0 = _rand(n, gen, dev) * (size - h)
    x0 = _rand(n, gen, dev) * (size - w)
    rows = torch.arange(size, device=dev).float()
    mask_r = (rows[None] >= y0[:, None]) & (rows[None] < (y0 + h)[:, None])
    mask_c = (rows[None] >= x0[:, None]) & (rows[None] < (x0 + w)[:, None])
    erase = (_rand(n, gen, dev) < 0.5)[:, None, None] & mask_r[:, :, None] & mask_c[:, None, :]
    fill = _rand(n, gen, dev, 1, 1)
    x = torch.where(erase[:, None], fill[:, None], x)
    return x


def _mixup(x, target, weight, share: float, gen):
    """Blend a ``share`` of the batch with a random partner: ``lam * own + (1 - lam) * partner`` for the
    pixels, the target distributions and the loss weights, ``lam`` uniform in [0.5, 1] (the own face
    dominates, so a mixed crop still has one identity to localise). Soft targets make this natural here:
    the votes are already distributions."""
    import torch

    n, dev = x.shape[0], x.device
    partner = torch.randperm(n, generator=gen, device=dev)
    lam = 0.5 + 0.5 * _rand(n, gen, dev)
    lam = torch.where(_rand(n, gen, dev) < share, lam, torch.ones_like(lam))
    mix = lam[:, None, None, None]
    return (mix * x + (1 - mix) * x[partner], lam[:, None] * target + (1 - lam[:, None]) * target[partner],
            lam * weight + (1 - lam) * weight[partner])


def class_weights(p_human: np.ndarray, power: float) -> np.ndarray:
    """Per-face loss weights ``freq(plurality label) ** -power``, normalised to mean 1 (power 0: all ones).

    Inverse-square-root frequency (power 0.5) is the usual compromise: minority expressions (fear, disgust,
    contempt, anger) count more without letting 100-odd contempt faces dominate."""
    y = p_human.argmax(axis=1)
    freq = np.bincount(y, minlength=p_human.shape[1]).astype(np.float64) / len(y)
    w = np.maximum(freq, 1e-3)[y] ** -power
    return (w / w.mean()).astype(np.float32)


def read_model_config(folder: Path) -> dict[str, Any]:
    """A trained folder's config.json, or ValueError naming it when it is no expression model's config (a list,
    no labels or width): it failed deep inside with a TypeError."""
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("labels"), list) or not isinstance(cfg.get("width"), int):
        raise ValueError(f"{path}: not an expression model's config (an object with labels and width)")
    return cfg


def load_model_folder(folder: str | Path, device: str = "cpu"):
    """An :class:`ExpressionNet` with weights and its config from a trained folder (for teachers and evaluation)."""
    from safetensors.torch import load_file

    from cem.fer.expression_net import ExpressionNet

    cfg = read_model_config(Path(folder))
    net = ExpressionNet(len(cfg["labels"]), int(cfg["width"]), float(cfg.get("dropout", 0.0)))
    net.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return net.to(device).eval(), cfg


def _standardize_torch(x):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x - mean) / std


def predict_logits(model, pixels: np.ndarray, batch_size: int = 512, bf16: bool = False,
                   flip: bool = True) -> np.ndarray:
    """Logits for (N, 48, 48) uint8 crops, preprocessed exactly as at inference; ``flip``: averaged with
    those of the mirror images (training's evaluation protocol).

    ``model`` may be one network or a list (an ensemble: logits averaged)."""
    import torch

    models = model if isinstance(model, (list, tuple)) else [model]
    device = next(models[0].parameters()).device
    for m in models:
        m.eval()
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(pixels), batch_size):
            x = torch.from_numpy(standardize(pixels[i : i + batch_size]))[:, None].to(device)
            logits = sum(mirror_logits(m, x, flip).float() for m in models) / len(models)
            out.append(logits.float().cpu().numpy())
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
    train: FerPlus, valid: FerPlus | None, out_dir: str | Path, cfg: TrainConfig, log=print
) -> dict:
    """Train, checkpointing to ``out_dir/checkpoint.pt``; write ``model.safetensors`` + ``config.json``.

    With ``valid`` None (a training machine without the validation split) no temperature is fitted (1.0);
    run ``--calibrate-only`` afterwards where valid is."""
    import torch
    from safetensors.torch import save_file

    from cem.fer.expression_net import ExpressionNet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    perm_gen = torch.Generator().manual_seed(cfg.seed)

    x_all = torch.from_numpy(train.pixels.astype(np.float32) / 255.0)[:, None].to(device)
    y_all = torch.from_numpy(train.distribution.astype(np.float32)).to(device)
    w_all = torch.from_numpy(class_weights(train.distribution, cfg.class_balance)).to(device)
    teachers = [load_model_folder(t, str(device))[0] for t in cfg.teachers]
    model = ExpressionNet(len(FERPLUS_LABELS), cfg.width, cfg.dropout).to(device).to(
        memory_format=torch.channels_last)
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
    check_resumable(out, cfg)
    if not ckpt_path.exists():  # what a resumed run must match (check_resumable)
        (out / "train_settings.json").write_text(json.dumps(_settings(cfg), indent=1))
    if ckpt_path.exists():
        # tensors and plain containers only: a checkpoint is never a way to run code
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location=device)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
        except Exception as e:
            raise ValueError(f"{ckpt_path}: not a checkpoint this run can resume ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); remove it (and train_settings.json) to "
                             f"start a new run") from None
        gen.set_state(ckpt["gen"].cpu() if device.type == "cpu" else ckpt["gen"].cpu())
        perm_gen.set_state(ckpt["perm_gen"].cpu())
        if "torch_rng" in ckpt:  # dropout draws from torch's global generator: without it a resumed run differed
            torch.set_rng_state(ckpt["torch_rng"].cpu())
        start_epoch, history = int(ckpt["epoch"]), json.loads(ckpt["history"])
        step = int(ckpt.get("step", start_epoch * steps_per_epoch))
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")
    else:
        step = 0

    if cfg.max_steps is not None and step >= cfg.max_steps:  # run again, it trained further each time
        log(f"the checkpoint already holds {step} steps (--max-steps {cfg.max_steps}): nothing to train")
        start_epoch = cfg.epochs
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x_all), generator=perm_gen).to(device)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, target, weight = _augment(x_all[idx], gen, cfg.augment), y_all[idx], w_all[idx]
            if cfg.mixup > 0:
                x, target, weight = _mixup(x, target, weight, cfg.mixup, gen)
            x = _standardize_torch(x).contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            if teachers:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    t_logits = sum(t(x).float() for t in teachers) / len(teachers)
                target = (1 - cfg.distill_weight) * target + cfg.distill_weight * torch.softmax(t_logits, 1)
            per_face = -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)
            loss = (per_face * weight).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        entry: dict = {"epoch": epoch + 1, "train_loss": running / (i + 1), "seconds": time.time() - t0}
        if valid is not None:
            entry.update(distribution_metrics(valid.distribution, softmax(predict_logits(model, valid.pixels))))
        history.append(entry)
        log(json.dumps(history[-1]))
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
             "perm_gen": perm_gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
             "epoch": epoch + 1, "history": json.dumps(history)},
            ckpt_path.with_suffix(".tmp"),
        )
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break

    temperature, valid_metrics = 1.0, None
    if valid is not None:
        logits = predict_logits(model, valid.pixels)
        targets, keep = plurality_targets(valid.distribution)
        temperature = fit_temperature(logits[keep], targets[keep])
        valid_metrics = distribution_metrics(valid.distribution, softmax(logits, temperature))
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {
        "architecture": "ExpressionNet",
        "labels": list(FERPLUS_LABELS),
        "width": cfg.width,
        "dropout": cfg.dropout,
        "input": {"size": CROP_SIZE, "channels": 1, "normalisation": "per-image zero mean, unit variance"},
        "test_time_flip": True,
        "temperature": temperature,
        "calibration": "temperature scaling on the plurality label of FER+ valid (ties excluded)"
        if valid is not None else "none yet (run --calibrate-only)",
        "train": {**asdict(cfg), "teachers": [Path(t).name for t in cfg.teachers]},
        "valid_metrics": valid_metrics,
        "history": history,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    log(f"temperature {temperature:.3f}; valid {json.dumps(valid_metrics)}")
    return config


def neutral_reference(model: ExpressionModel, valid: FerPlus) -> dict:
    """The model's output on the average neutral face: mean log-probabilities over the FER+ valid faces whose
    plurality vote is neutral, computed exactly as at inference (``model``: its temperature and test-time
    flip). ``ExpressionModel.relative_to`` compares a person's own neutral photos with it."""
    from cem.eval import plurality
    from cem.fer.expression import mean_log_probs

    y, keep = plurality(valid.distribution)
    neutral = keep & (y == model.labels.index("neutral"))
    logp = mean_log_probs(model.predict(valid.pixels[neutral]))
    return {"log_probs": [round(float(v), 6) for v in logp], "faces": int(neutral.sum()),
            "source": "mean log-probability over the FER+ valid faces whose plurality vote is neutral (ties "
                      "excluded), at the model's temperature and test-time flip setting"}


def calibrate(out_dir: str | Path, valid: FerPlus) -> dict:
    """Refit the temperature of a trained model folder on ``valid`` (on logits computed as inference computes
    them: with the mirror pass only where its config.json sets ``test_time_flip``), add the neutral
    reference at that temperature, and update its config.json."""
    from cem.fer.expression import ExpressionModel

    out = Path(out_dir)
    config = read_model_config(out)
    model = ExpressionModel.from_pretrained(out)
    logits = predict_logits(model.model, valid.pixels, flip=model.test_time_flip)
    targets, keep = plurality_targets(valid.distribution)
    t = fit_temperature(logits[keep], targets[keep])
    model.temperature = t
    config.update(temperature=t, valid_metrics=distribution_metrics(valid.distribution, softmax(logits, t)),
                  calibration="temperature scaling on the plurality label of FER+ valid (ties excluded)",
                  neutral_reference=neutral_reference(model, valid))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


def argument_parser() -> Any:
    """The ``cem train-expression`` options (an ``argparse.ArgumentParser``; docs/gen_cli.py prints its help)."""
    import argparse

    p = argparse.ArgumentParser(prog="cem train-expression", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder with ferplus/{train,valid}.npz (default: ../shared/data)")
    p.add_argument("--out", required=True,
                   help="output folder for weights, config and checkpoint; a run there with the same settings "
                        "resumes its checkpoint, and a folder holding a trained model without one is refused")
    for f in ("epochs", "batch_size", "width", "seed", "threads", "max_steps"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(TrainConfig, f))
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--device", default=TrainConfig.device, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--augment", choices=["basic", "robust"], default=TrainConfig.augment)
    p.add_argument("--class-balance", type=float, default=TrainConfig.class_balance,
                   help="loss weight per face = freq(plurality label) ** -X (0 = off, 0.5 = inverse sqrt)")
    p.add_argument("--teacher", action="append", default=[], help="trained model folder to distil from (repeat)")
    p.add_argument("--distill-weight", type=float, default=TrainConfig.distill_weight)
    p.add_argument("--mixup", type=float, default=TrainConfig.mixup,
                   help="share of the faces blended with another face of the batch (0 = off)")
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument("--calibrate-only", action="store_true",
                   help="refit the temperature (and the neutral reference) of the finished run in --out on valid, "
                        "and rewrite its config")
    return p


def main(argv: list[str] | None = None) -> int:
    """``cem train-expression``: train (or recalibrate) the expression CNN; exit 2 with a clear message when the
    data or an option is unusable."""
    import sys

    a = argument_parser().parse_args(argv)
    try:
        out = Path(a.out)
        if out.exists() and not out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
            raise ValueError(f"--out {a.out}: a file is in the way (the model folder's path must be folders)")
        if a.calibrate_only:
            calibrate(a.out, load_ferplus("valid", a.data_dir))
            return 0
        cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, width=a.width, seed=a.seed, threads=a.threads,
                          max_steps=a.max_steps, lr=a.lr, device=a.device, augment=a.augment,
                          class_balance=a.class_balance, teachers=tuple(a.teacher),
                          distill_weight=a.distill_weight, mixup=a.mixup, bf16=not a.no_bf16)
        check_device(cfg.device)
        for t in cfg.teachers:
            missing = [n for n in ("config.json", "model.safetensors") if not (Path(t) / n).is_file()]
            if missing:
                raise ValueError(f"--teacher {t}: not a trained model folder (no {' or '.join(missing)})")
            try:
                load_model_folder(t)
            except Exception as e:  # a broken folder: its own message, not a traceback from inside torch
                raise ValueError(f"--teacher {t}: cannot be loaded ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        check_resumable(Path(a.out), cfg)
        train, valid = load_ferplus("train", a.data_dir), load_ferplus("valid", a.data_dir)
        train_expression(train, valid, a.out, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"cem train-expression: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, a full disk: said, not a traceback
        print(f"cem train-expression: {e.filename or a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def check_device(device: str) -> None:
    """A ValueError unless torch can train on ``device`` here (a CUDA device on a CPU build of torch, a
    misspelt name), rather than a linker message or a silent run on the CPU."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: not a device torch knows ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}"
                             f"{', a CPU build' if torch.version.cuda is None else ''}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: torch sees no MPS device here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: cem trains on cpu, cuda or mps")


# the settings a checkpoint must share with the run that resumes it (device and threads may change)
RESUME_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "width", "dropout", "seed", "augment",
                   "class_balance", "teachers", "distill_weight", "mixup")


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k in RESUME_SETTINGS}
    out["teachers"] = [os.path.realpath(t) for t in cfg.teachers]  # ./t, t/ and /abs/t are one teacher
    return out


def check_resumable(out: Path, cfg: TrainConfig) -> None:
    """A ValueError when ``out`` holds the checkpoint of a run with other settings: resuming it would
    continue that run under the new name, or fail on a shape mismatch deep in torch."""
    ckpt, saved = out / "checkpoint.pt", out / "train_settings.json"
    if not ckpt.exists():
        # a trained model without its checkpoint (removed to save space, a copy of the packaged weights):
        # a new run there would overwrite it at its end, and it cannot be resumed
        made = [n for n in ("model.safetensors", "config.json") if (out / n).exists()]
        if made:
            raise ValueError(f"--out {out} holds a trained model ({' and '.join(made)}) and no checkpoint to "
                             f"resume; give another --out, or remove the folder to train again there")
        return
    if not saved.is_file():  # it resumed under any settings of the checkpoint's shape
        raise ValueError(f"--out {out} holds a checkpoint without the train_settings.json that says how it was "
                         f"made; remove checkpoint.pt to start a new run there, or give another --out")
    try:
        before = json.loads(saved.read_text())
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{saved}: cannot be read ({e}); it records the settings of the checkpoint beside it: "
                         f"remove both to start a new run in --out {out}") from None
    now = _settings(cfg)
    differ = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in RESUME_SETTINGS if before.get(k) != now[k]]
    if differ:
        raise ValueError(f"--out {out} holds the checkpoint of a run with other settings ({'; '.join(differ)}); "
                         f"give the same settings to resume it, or another --out to start a new run")


if __name__ == "__main__":
    raise SystemExit(main())
