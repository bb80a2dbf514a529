"""Builds ``cem/fer/data/reference.json``, the neutral reference of the geometric FER stage.

How it was made (``python -m cem.fer.reference``, seeded, needs ``../shared/data/ferplus``):

1. FER+ training faces with a neutral majority (at least 6 of 10 raters chose *neutral*), up to
   ``--max-faces``, each upscaled to 192 px, padded, and meshed with MediaPipe 0.10.21 (``mesh_whole``).
2. Generalised Procrustes analysis (similarity, 3-D) of the meshes on all 478 points gives a mean
   shape; it is made exactly mirror-symmetric (the left/right landmark pairing is found by nearest
   neighbour of the mirrored shape) and scaled so the outer eye corners are 1 apart. That is the
   canonical face: pose 0 is the average pose of neutral FER+ faces.
3. Every neutral mesh is frontalised against it and the AU base measurements of :mod:`cem.fer.aus` are
   taken; their median and robust spread (1.4826 x MAD) are the neutral reference of the AU z-scores.
4. The mean eye centres of the meshes in the original 48x48 crop frame define how the FER stage frames
   the aligned crop for the expression model, so that inference sees faces framed as in training.

The file holds only these averages (a few kB), no image data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cem.datasets import load_ferplus
from cem.fer.aus import MEASUREMENT_NAMES, base_measurements
from cem.fer.geometry import REFERENCE_PATH, Reference, eye_centers, frontalize, umeyama


def _mirror_pairs(shape: np.ndarray) -> np.ndarray:
    mirrored = shape * np.array([-1.0, 1.0, 1.0])
    d = np.linalg.norm(shape[None, :, :] - mirrored[:, None, :], axis=2)
    return d.argmin(axis=1)


def _symmetrize(shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = shape - shape.mean(axis=0)
    # orient: outer eye corners (33 subject-right, 263 subject-left) along +x
    for _ in range(3):
        axis = s[263] - s[33]
        axis /= np.linalg.norm(axis)
        up = s[10] - s[152]
        up -= axis * (up @ axis)
        up /= np.linalg.norm(up)
        rot = np.stack([axis, -up, np.cross(axis, -up)])  # rows: new x, y (down), z
        s = s @ rot.T
        mid = (s[[33, 263, 133, 362, 10, 152, 1, 168]] * np.array([1, 0, 0])).mean(axis=0)
        s = s - mid
        perm = _mirror_pairs(s)
        mirrored = (s * np.array([-1.0, 1.0, 1.0]))[perm]
        sc, r, t = umeyama(mirrored, s)
        s = (s + (sc * mirrored @ r.T + t)) / 2
    perm = _mirror_pairs(s)
    s = (s + (s * np.array([-1.0, 1.0, 1.0]))[perm]) / 2
    return s / np.linalg.norm(s[263] - s[33]), perm


def build(max_faces: int = 4000, seed: int = 0, out: Path = REFERENCE_PATH) -> Reference:
    import cv2

    from cem.fer.detect import FaceMesher

    data = load_ferplus("train")
    neutral = np.flatnonzero(data.votes[:, 0] >= 6)
    rng = np.random.default_rng(seed)
    pick = rng.permutation(neutral)[:max_faces]
    mesher = FaceMesher()
    meshes = []
    for i in pick:
        m = mesher.mesh_whole(cv2.cvtColor(data.pixels[i], cv2.COLOR_GRAY2RGB))
        if m is not None:
            meshes.append(m)
    mesher.close()
    meshes_arr = np.stack(meshes)
    print(f"meshed {len(meshes_arr)} of {len(pick)} neutral faces")

    mean = meshes_arr[0] - meshes_arr[0].mean(axis=0)
    for _ in range(5):
        aligned = []
        for m in meshes_arr:
            s, r, t = umeyama(m, mean)
            aligned.append(s * m @ r.T + t)
        mean = np.mean(aligned, axis=0)
        mean = (mean - mean.mean(axis=0)) / np.linalg.norm(mean[263] - mean[33])
    canonical, perm = _symmetrize(mean)

    crop_eyes = np.mean([np.stack(eye_centers(m)) for m in meshes_arr], axis=0)
    tmp = Reference(canonical, perm, crop_eyes, np.zeros(len(MEASUREMENT_NAMES)),
                    np.ones(len(MEASUREMENT_NAMES)), MEASUREMENT_NAMES)
    values = np.array([[base_measurements(frontalize(m, tmp)[0])[n] for n in MEASUREMENT_NAMES]
                       for m in meshes_arr])
    center = np.median(values, axis=0)
    scale = 1.4826 * np.median(np.abs(values - center), axis=0)
    scale = np.maximum(scale, 1e-4)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "how": "python -m cem.fer.reference (see its docstring): averages over meshes of neutral-majority FER+ "
               "training faces; no image data",
        "faces_used": len(meshes_arr),
        "canonical": np.round(canonical, 6).tolist(), "mirror": perm.astype(int).tolist(),
        "crop_eyes": np.round(crop_eyes, 6).tolist(), "measure_names": list(MEASUREMENT_NAMES),
        "measure_center": np.round(center, 8).tolist(), "measure_scale": np.round(scale, 8).tolist(),
    }, separators=(",", ":")), encoding="utf-8")
    print(f"wrote {out}; crop eyes {crop_eyes.round(2).tolist()}")
    return Reference(canonical, perm, crop_eyes, center, scale, MEASUREMENT_NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rebuild the FER stage's neutral reference from FER+ train.")
    p.add_argument("--max-faces", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REFERENCE_PATH)
    a = p.parse_args(argv)
    build(a.max_faces, a.seed, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
