"""The expression CNN: a small residual network over 48x48 grayscale face crops.

Kept in its own module so that training (`cem.training`) and inference (`cem.fer.expression`) build
exactly the same network. Importing this module imports torch; the FER stage imports it lazily.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ExpressionNet(nn.Module):
    """VGG-style stem plus one residual block per scale (48 -> 24 -> 12 -> 6 -> global pool).

    ``width`` sets the channels of the first stage; later stages double it. Input: (N, 1, 48, 48)
    crops standardised per image (zero mean, unit variance). Output: logits over ``num_labels``.
    """

    def __init__(self, num_labels: int = 8, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(1, w),
            _conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w),
            _Residual(2 * w),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w),
            _Residual(4 * w),
            nn.MaxPool2d(2),
            _conv_bn_relu(4 * w, 8 * w),
            _Residual(8 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a Conv2d into the convolution (inference only; the
    outputs are the same up to float rounding, and the network runs faster)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        fuse_conv_bn(child)
    if isinstance(module, nn.Sequential):
        layers = list(module)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(layers[i], layers[i + 1])
                module[i + 1] = nn.Identity()
    return module
