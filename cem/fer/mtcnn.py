"""MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks"): the small-face detector of cem's FER stage.

MediaPipe's detectors squeeze the whole image into 128 or 192 px, so faces under about a tenth of a group
photo's width are lost (``docs/action-units.md``, "Faces in group photos"). MTCNN slides a 12 px proposal
network over an image pyramid that starts at the smallest face asked for, then refines the proposals with two
further networks (24 and 48 px). It runs on torch, which cem already needs for the expression CNN.

Weights: ``cem/models/mtcnn/mtcnn.safetensors`` (2 MB), converted unchanged from the ``pnet.pt``, ``rnet.pt``
and ``onet.pt`` files of the facenet-pytorch 2.6.0 wheel (MIT licence, Tim Esler), which ported them from
davidsandberg/facenet (MIT), which converted the original authors' Caffe models (K. Zhang, MIT); see
``cem/models/mtcnn/README.md``. The network layout and layer names follow those files; the cascade below
is cem's own and pads crops at the image border with zeros as the original does, so a face cut by the
frame keeps its proportions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "mtcnn" / "mtcnn.safetensors"
# the pyramid's scale step (the authors' value) and the proposal network's cell
SCALE_FACTOR = 0.709
_CELL, _STRIDE = 12, 2


def _networks() -> tuple[Any, Any, Any]:
    """The three networks (P, R, O), built lazily so that importing this module does not import torch."""
    from torch import nn

    class PNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
            self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
            self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
            self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
            return self.conv4_2(x), self.conv4_1(x).softmax(1)

    class RNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
            self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.prelu3(self.conv3(x))
            # the dense layers were ported from a (width, height, channel) layout
            x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
            return self.dense5_2(x), self.dense5_1(x).softmax(1)

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x))
            x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(1)

    return PNet(), RNet(), ONet()


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, over_min: bool = False) -> np.ndarray:
    """Indices kept by greedy NMS of (N, 4) x1, y1, x2, y2 boxes, best score first; ``over_min``: overlap
    measured against the smaller box (the cascade's last step, which drops boxes nested in a face)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = iw * ih
        denom = np.minimum(area[i], area[rest]) if over_min else area[i] + area[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-9) <= iou]
    return np.array(keep, dtype=np.int64)


# Caps on the proposals that go on to NMS and to the second and third networks, best score first. A photo
# has a few hundred (at most 334 on the 40 group scenes of 1200x800); a wall of face-like texture had 9,700,
# and greedy NMS and the later stages grow with their number (12 s for one 1600 px image without the caps).
MAX_PROPOSALS_PER_LEVEL = 2000
MAX_PROPOSALS = 1000


def _most_confident(boxes: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` rows of ``boxes`` (column 4 = score) with the highest scores (all of them if fewer)."""
    if len(boxes) <= n:
        return boxes
    return boxes[np.argpartition(-boxes[:, 4], n - 1)[:n]]


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares on their long side, same centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + (w - side) / 2
    out[:, 1] = boxes[:, 1] + (h - side) / 2
    out[:, 2], out[:, 3] = out[:, 0] + side, out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    out = boxes.copy()
    out[:, :4] = boxes[:, :4] + reg * np.stack([w, h, w, h], axis=1)
    return out


def _crops(rgb: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 3) float32 crops of the boxes, zero outside the image."""
    import cv2

    h, w = rgb.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(np.round(boxes[:, :4]).astype(np.int64).tolist()):
        bw, bh = max(1, x2 - x1), max(1, y2 - y1)
        if x1 >= 0 and y1 >= 0 and x1 + bw <= w and y1 + bh <= h:
            patch = rgb[y1: y1 + bh, x1: x1 + bw]  # inside the image: a view, no copy
        else:
            patch = np.zeros((bh, bw, 3), np.uint8)
            sx0, sy0, sx1, sy1 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
            if sx1 > sx0 and sy1 > sy0:
                patch[sy0 - y1: sy1 - y1, sx0 - x1: sx1 - x1] = rgb[sy0:sy1, sx0:sx1]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA if bw > size else cv2.INTER_LINEAR)
    return out


def _normalise(x: np.ndarray):
    """(N, H, W, 3) pixels -> the networks' input: scaled to [-1, 1], NCHW in channels-last memory (the
    pixels' own layout; torch's CPU max-pooling is about 3x faster on it)."""
    import torch

    return torch.from_numpy((x - 127.5) * 0.0078125).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)


class MTCNN:
    """Faces in an RGB image: ``detect`` returns (boxes (N, 4) x1 y1 x2 y2, scores (N,), landmarks (N, 5, 2)),
    the landmarks being the eye on the image's left, the other eye, the nose tip and the mouth's left and
    right corners (image left first). Models load once, on construction.

    ``border``: each pyramid level is padded with this many black pixels (the networks' own fill for pixels
    outside the image), so the 12 px proposal window reaches a third of a face past the frame and faces cut
    by the image edge are proposed too (on the group scenes: cut faces 0.68 -> 0.74 and 0.67 -> 0.80, no
    more false positives; 0 is the original cascade)."""

    def __init__(self, min_face: float = 24.0, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 border: int = 4, weights: str | Path = WEIGHTS) -> None:
        import torch
        from safetensors.torch import load_file

        if min_face < _CELL:
            raise ValueError(f"MTCNN min_face must be at least {_CELL} px, not {min_face}")
        self.min_face = float(min_face)
        self.thresholds = thresholds
        self.border = int(border)
        state = load_file(str(weights))
        self.pnet, self.rnet, self.onet = _networks()
        for prefix, net in (("pnet.", self.pnet), ("rnet.", self.rnet), ("onet.", self.onet)):
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            net.eval().to(memory_format=torch.channels_last)
        self._torch = torch

    def _proposals(self, rgb: np.ndarray) -> np.ndarray:
        """Stage 1: (N, 9) x1, y1, x2, y2, score, regression over the image pyramid."""
        import cv2

        h, w = rgb.shape[:2]
        scale = _CELL / self.min_face
        found = []
        while min(h, w) * scale >= _CELL:
            sh, sw = int(h * scale + 1), int(w * scale + 1)
            level = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
            pad = self.border
            if pad:
                level = cv2.copyMakeBorder(level, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            reg, prob = self.pnet(_normalise(level[None].astype(np.float32)))
            prob, reg = prob[0, 1].numpy(), reg[0].numpy()
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if len(ys):
                x0, y0 = _STRIDE * xs - pad, _STRIDE * ys - pad
                boxes = np.stack([np.floor((x0 + 1) / scale), np.floor((y0 + 1) / scale),
                                  np.floor((x0 + _CELL) / scale), np.floor((y0 + _CELL) / scale),
                                  prob[ys, xs], *reg[:, ys, xs]], axis=1)
                boxes = _most_confident(boxes, MAX_PROPOSALS_PER_LEVEL)
                found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
            scale *= SCALE_FACTOR
        if not found:
            return np.zeros((0, 9))
        boxes = np.concatenate(found)
        return _most_confident(boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)], MAX_PROPOSALS)

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        empty = (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
        with self._torch.inference_mode():
            boxes = self._proposals(rgb)
            if not len(boxes):
                return empty
            boxes = _square(_regress(boxes[:, :5], boxes[:, 5:9]))
            reg, prob = self.rnet(_normalise(_crops(rgb, boxes, 24)))
            score = prob[:, 1].numpy()
            ok = score > self.thresholds[1]
            boxes, reg, score = boxes[ok], reg.numpy()[ok], score[ok]
            if not len(boxes):
                return empty
            keep = nms(boxes[:, :4], score, 0.7)
            boxes = _square(_regress(boxes[keep, :4], reg[keep]))
            reg, marks, prob = self.onet(_normalise(_crops(rgb, boxes, 48)))
            score = prob[:, 1].numpy()
            ok = score > self.thresholds[2]
            boxes, reg, marks, score = boxes[ok], reg.numpy()[ok], marks.numpy()[ok], score[ok]
            if not len(boxes):
                return empty
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            points = np.stack([boxes[:, None, 0] + w[:, None] * marks[:, :5],
                               boxes[:, None, 1] + h[:, None] * marks[:, 5:]], axis=2)
            boxes = _regress(boxes[:, :4], reg)
            keep = nms(boxes, score, 0.7, over_min=True)
            return boxes[keep], score[keep], points[keep]
