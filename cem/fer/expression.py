"""Expression distribution from a face crop (the project's FER+-trained CNN)."""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

CROP_SIZE = 48
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "expression"
# how much of a subject's own neutral-face offset is taken out of their expression distributions (0: none,
# 1: all). A baseline from one to three photos is itself a noisy estimate, so it is shrunk halfway; measured
# on tcce_dev for 0 to 1 in the model card ("Against the person's own neutral face").
SUBJECT_SHRINK = 0.5
# at most this offset (nats, per label) is measured against: the average neutral face is FER+'s 48 px one, so a
# sharp photo's resting face differs from it partly by domain, not only by the person's trait. Uncapped, a
# performer whose neutral photos read 20 % happy (an offset of 5.9 nats) had 4 of 5 posed smiles called
# neutral. Chosen leaving one tcce_dev performer out (3 for six of seven; model card).
SUBJECT_OFFSET_CAP = 3.0
_MODEL_FILES = ("config.json", "model.safetensors")


def model_id(path: str | Path | None = None) -> str | None:
    """Which expression weights a record was made with (``provenance.expression_model``): ``packaged@<hex>``
    for the weights in the package, ``<folder name>@<hex>`` for others, where ``<hex>`` is the first 12 hex
    digits of the SHA-256 of ``config.json`` and ``model.safetensors`` (the temperature and neutral reference
    live in the former). Weights retrained or recalibrated in place get another id, where the config and its
    settings digest stay the same. None when the files cannot be read (the record's error says why)."""
    folder = Path(path) if path else DEFAULT_WEIGHTS
    try:
        stats = tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in
                      (os.stat(folder / name) for name in _MODEL_FILES))
    except OSError:
        return None
    name = "packaged" if path is None else (folder.resolve().name or str(folder))
    return _model_id(str(folder.resolve()), stats, name)


@lru_cache(maxsize=16)
def _model_id(folder: str, stats: tuple[tuple[int, int, int], ...], name: str) -> str | None:
    # keyed by the files' size, mtime and inode: hashed once per process, again only when they change
    digest = hashlib.sha256()
    try:
        for file in _MODEL_FILES:
            with open(Path(folder) / file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    return f"{name}@{digest.hexdigest()[:12]}"


def standardize(crops: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 grayscale crops -> float32, zero mean and unit variance per crop.

    Per-image standardisation removes global brightness and contrast, which differ far more between
    FER2013's web images and a user's photos than the expression does.
    """
    x = np.asarray(crops, dtype=np.float32) / 255.0
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(x.std(axis=(1, 2), keepdims=True, ddof=1), 1e-3)
    return (x - mean) / std


def mirror_logits(net: Any, x: Any, flip: bool, channels_last: bool = False) -> Any:
    """Logits of a (N, 1, 48, 48) tensor of standardised crops; ``flip``: averaged with those of the mirror
    images (one forward pass over both). The one implementation of the test-time flip, for inference
    (:meth:`ExpressionModel.predict`) and for training's evaluation (:func:`cem.training.predict_logits`).
    ``channels_last``: the batch in the memory format of a network converted to it (oneDNN's fast kernels)."""
    import torch

    batch = torch.cat([x, x.flip(-1)]) if flip else x
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    out = net(batch)
    return (out[: len(x)] + out[len(x):]) / 2 if flip else out


def mean_log_probs(probs: np.ndarray | list[list[float]]) -> np.ndarray:
    """(N, K) distributions -> (K,) mean log-probability: the form in which a person's neutral photos and the
    average neutral face (``neutral_reference``) are compared by :meth:`ExpressionModel.relative_to`."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)).mean(axis=0)


class ExpressionModel:
    """The FER+-trained expression CNN: aligned 48x48 grayscale crops -> calibrated label distribution.

    Load once and reuse (the FER stage holds one per stage). Logits are divided by the temperature fitted
    on FER+ valid. ``test_time_flip`` also runs the mirror image and averages the logits: it doubles the
    CNN's cost for almost no gain with the packaged model (FER+ valid accuracy 0.8587 with it, 0.8576
    without; tcce_dev 7-class 0.550 / 0.547; measured in the model card), whose config.json turns it off.
    """

    def __init__(self, model: Any, labels: list[str], temperature: float, device: str,
                 test_time_flip: bool = False, neutral_reference: np.ndarray | None = None) -> None:
        self.model = model
        self.labels = labels
        self.temperature = temperature
        self.device = device
        self.test_time_flip = test_time_flip
        # mean log-probabilities the model gives the average neutral face (config.json "neutral_reference"):
        # what a subject's own neutral photos are compared with in relative_to
        self.neutral_reference = neutral_reference

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu",
                        test_time_flip: bool | None = None) -> ExpressionModel:
        """Load ``config.json`` + ``model.safetensors`` from a folder (default: the weights in the package).
        ``test_time_flip``: None follows the folder's ``config.json`` (``test_time_flip``, default off)."""
        import torch
        from safetensors.torch import load_file

        from cem.fer.expression_net import ExpressionNet, fuse_conv_bn

        folder = Path(path) if path else DEFAULT_WEIGHTS
        cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{folder}: expected config.json and model.safetensors of an expression model")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"expression.device={device!r} but torch sees no CUDA device")
        cfg = json.loads(cfg_path.read_text())
        net = ExpressionNet(len(cfg["labels"]), int(cfg["width"]), float(cfg.get("dropout", 0.0)))
        net.load_state_dict(load_file(str(w_path)))
        # inference only: batch norms folded into the convolutions, channels-last memory so oneDNN picks
        # its fastest CPU kernels (the same outputs up to float rounding, in about two thirds of the time)
        net = fuse_conv_bn(net.eval()).to(device).to(memory_format=torch.channels_last)
        flip = bool(cfg.get("test_time_flip", False)) if test_time_flip is None else test_time_flip
        ref = cfg.get("neutral_reference", {}).get("log_probs")
        return cls(net, list(cfg["labels"]), float(cfg.get("temperature", 1.0)), device, flip,
                   None if ref is None else np.asarray(ref, dtype=np.float64))

    def relative_to(self, probs: np.ndarray, subject_neutral: np.ndarray,
                    shrink: float = SUBJECT_SHRINK) -> np.ndarray:
        """Expression distributions (N, K) of one person measured against that person's own neutral face.

        ``subject_neutral``: :func:`mean_log_probs` of their neutral photo(s), in this model's label order.
        What their resting face shows beyond the average neutral face (``neutral_reference``: a low brow read
        as anger, a mouth read as sadness) is a trait of the face, not an expression: ``shrink`` of that
        offset is divided out, ``p' ∝ p * exp(-shrink * clip(subject_neutral - neutral_reference))``, the offset
        clipped to ±``SUBJECT_OFFSET_CAP`` nats per label. Rows stay distributions; a model folder without a
        neutral reference is an error."""
        if self.neutral_reference is None:
            raise ValueError("this expression model's config.json has no neutral_reference, so expressions cannot "
                             "be measured against a person's own neutral face (python -m cem.training "
                             "--calibrate-only adds it)")
        offset = np.clip(np.asarray(subject_neutral, dtype=np.float64) - self.neutral_reference,
                         -SUBJECT_OFFSET_CAP, SUBJECT_OFFSET_CAP)
        logp = np.log(np.clip(probs, 1e-12, None)) - shrink * offset
        logp -= logp.max(axis=1, keepdims=True)
        p = np.exp(logp)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """(N, 48, 48) uint8 grayscale crops -> (N, K) probabilities (rows sum to 1)."""
        import torch

        if len(crops) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float64)
        x = torch.from_numpy(standardize(crops))[:, None].to(self.device)
        with torch.inference_mode():
            logits = mirror_logits(self.model, x, self.test_time_flip, channels_last=True).double().cpu().numpy()
        z = logits / self.temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)
