"""Readers for the labelled data sets that cem trains and evaluates on (never shipped with the package).

FER+ (Barsoum et al., ICMI 2016) is read from ``../shared/data/ferplus/{train,valid}.npz`` or from
the folder named by the ``CEM_DATA_DIR`` environment variable. Each face has the votes of 10 raters
over ``neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF``.

Decision on poor faces: a face where fewer than half of the raters chose one of the eight emotions
(``unknown`` + ``NF`` > 5) is dropped from training and evaluation; the eight emotion votes of the
rest, normalised, are the human label distribution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cem.contract import FERPLUS_LABELS

__all__ = ["FERPLUS_LABELS", "FerPlus", "load_ferplus", "shared_data_dir"]
MIN_EMOTION_VOTES = 5


def shared_data_dir() -> Path | None:
    """The shared data folder: ``$CEM_DATA_DIR`` or ``../shared/data`` above the working directory or repo."""
    env = os.environ.get("CEM_DATA_DIR")
    here = Path(__file__).resolve()
    # an explicit CEM_DATA_DIR is the only place looked at; otherwise ../shared/data beside the checkout
    candidates = [Path(env)] if env else [Path.cwd().parent / "shared" / "data", here.parents[2] / "shared" / "data"]
    for c in candidates:
        if (c / "ferplus").is_dir():
            return c
    return None


@dataclass(frozen=True)
class FerPlus:
    """One FER+ split: ``pixels`` (N, 48, 48) uint8, ``votes`` (N, 8) emotion vote counts, ``names``."""

    pixels: np.ndarray
    votes: np.ndarray
    names: np.ndarray

    @property
    def distribution(self) -> np.ndarray:
        v = self.votes.astype(np.float64)
        return v / v.sum(axis=1, keepdims=True)

    def __len__(self) -> int:
        return len(self.pixels)


def load_ferplus(split: str, data_dir: str | Path | None = None) -> FerPlus:
    """Load ``train`` or ``valid`` with poor faces dropped (see module docs)."""
    root = Path(data_dir) if data_dir is not None else shared_data_dir()
    if root is None:
        raise FileNotFoundError("FER+ data not found: set CEM_DATA_DIR or place it in ../shared/data/ferplus")
    path = root / "ferplus" / f"{split}.npz" if (root / "ferplus").is_dir() else root / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such FER+ split")
    try:
        d = np.load(path)
    except (OSError, ValueError) as e:  # not an npz, or pickled data (never loaded)
        raise ValueError(f"{path}: not a FER+ split (.npz of pixels, votes, names): {e}") from None
    with d:
        missing = [k for k in ("pixels", "votes", "names") if k not in d.files]
        if missing:
            raise ValueError(f"{path}: not a FER+ split: no {', '.join(missing)} array (it has {', '.join(d.files)})")
        votes, pixels, names = d["votes"], d["pixels"], d["names"]
    if pixels.ndim != 3 or pixels.shape[1:] != (48, 48) or len(pixels) != len(votes) != len(names):
        raise ValueError(f"{path}: pixels must be (N, 48, 48) grey faces with one row of votes and a name each, got "
                         f"pixels {pixels.shape}, votes {votes.shape}, names {names.shape}")
    if votes.ndim != 2 or votes.shape[1] < 8:
        raise ValueError(f"{path}: votes must be (N, 10) counts (the 8 emotions first), got {votes.shape}")
    emotion = votes.astype(np.int64)[:, :8]
    keep = emotion.sum(axis=1) >= MIN_EMOTION_VOTES
    return FerPlus(pixels=pixels[keep], votes=emotion[keep], names=names[keep])
