"""Expression distribution from a face crop (the project's FER+-trained CNN)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CROP_SIZE = 48
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "expression"


def standardize(crops: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 grayscale crops -> float32, zero mean and unit variance per crop.

    Per-image standardisation removes global brightness and contrast, which differ far more between
    FER2013's web images and a user's photos than the expression does.
    """
    x = np.asarray(crops, dtype=np.float32) / 255.0
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(x.std(axis=(1, 2), keepdims=True, ddof=1), 1e-3)
    return (x - mean) / std


class ExpressionModel:
    """The FER+-trained expression CNN: aligned 48x48 grayscale crops -> calibrated label distribution.

    Load once and reuse (the FER stage holds one per stage). Logits are divided by the temperature fitted
    on FER+ valid. ``test_time_flip`` also runs the mirror image and averages the logits: it doubles the
    CNN's cost for almost no gain with the packaged model (FER+ valid accuracy 0.8587 with it, 0.8576
    without; tcce_dev 7-class 0.550 / 0.547; measured in the model card), whose config.json turns it off.
    """

    def __init__(self, model: Any, labels: list[str], temperature: float, device: str,
                 test_time_flip: bool = False) -> None:
        self.model = model
        self.labels = labels
        self.temperature = temperature
        self.device = device
        self.test_time_flip = test_time_flip

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
        return cls(net, list(cfg["labels"]), float(cfg.get("temperature", 1.0)), device, flip)

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """(N, 48, 48) uint8 grayscale crops -> (N, K) probabilities (rows sum to 1)."""
        import torch

        if len(crops) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float64)
        x = torch.from_numpy(standardize(crops))[:, None].to(self.device)
        with torch.inference_mode():
            if self.test_time_flip:
                both = self.model(torch.cat([x, x.flip(-1)]).contiguous(memory_format=torch.channels_last))
                logits = (both[: len(x)] + both[len(x):]).double().cpu().numpy() / 2
            else:
                logits = self.model(x.contiguous(memory_format=torch.channels_last)).double().cpu().numpy()
        z = logits / self.temperature
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)
