"""Faces in group photos: recall and false positives by face size on composed 1200x800 scenes.

Protocol (seeded; needs ../shared/data): each scene is a real photo from oasis_people, upscaled to
1200x800 and blurred (sigma 6) so that its own people are not detectable (a background on which the
detector still finds a face is skipped), with six faces pasted on it in a jittered 3x2 grid. Faces are
taken from tcce_dev (colour, 256x341) and FER+ valid (48x48 grey, so the small sizes only) and from
single-face oasis_people photos; each is cut out around its detected box (2x the box) and blended in
with a soft elliptical mask, its box scaled to a width drawn from 40-200 px. About one face in six is
turned (a perspective warp) and one in eight is pushed partly (about 30 %) out of the frame.
A detection is a true positive when its IoU with an unmatched pasted face's box is >= 0.3 (greedy, by
score); other detections are false positives. Reported: recall per face-width bin, false positives per
scene, ms per scene; for each ``--detectors`` setting of ``faces.detector`` (default ``auto,both``), with
and without its image pyramid. Run: ``nice -n 10 python benchmarks/group_scenes.py [--scenes 40]
[--detectors auto,both] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import emit

BINS = [(40, 50), (50, 60), (60, 80), (80, 110), (110, 150), (150, 201)]
W, H = 1200, 800


def _face_sources(root: Path, detector) -> list[tuple[np.ndarray, tuple[float, float, float, float], str]]:
    """(rgb image, face box, source) for single faces of tcce_dev, FER+ valid and oasis_people."""
    import cv2
    from PIL import Image

    from cem.datasets import load_ferplus

    out = []
    for p in sorted((root / "tcce_dev" / "images").glob("*.jpg"))[::3]:
        rgb = np.asarray(Image.open(p).convert("RGB"))
        dets = detector.detect(rgb)
        if len(dets) == 1:
            out.append((rgb, dets[0].bbox, "tcce_dev"))
    for p in sorted((root / "oasis_people" / "images").glob("*.jpg")):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        dets = detector.detect(rgb)
        if len(dets) == 1 and dets[0].bbox[2] >= 60 and dets[0].score > 0.8:
            out.append((rgb, dets[0].bbox, "oasis_people"))
    fer = load_ferplus("valid")
    for i in range(0, len(fer), 40):
        rgb = cv2.cvtColor(cv2.resize(fer.pixels[i], (96, 96), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2RGB)
        padded = cv2.copyMakeBorder(rgb, 48, 48, 48, 48, cv2.BORDER_REPLICATE)
        dets = detector.detect(padded)
        if len(dets) == 1:
            out.append((padded, dets[0].bbox, "ferplus"))
    return out


def _backgrounds(root: Path, detector) -> list[np.ndarray]:
    import cv2
    from PIL import Image

    out = []
    for p in sorted((root / "oasis_people" / "images").glob("*.jpg")):
        rgb = cv2.resize(np.asarray(Image.open(p).convert("RGB")), (W, H), interpolation=cv2.INTER_CUBIC)
        bg = cv2.GaussianBlur(rgb, (0, 0), 6)
        if not detector.detect(bg):
            out.append(bg)
    return out


def _turn(img: np.ndarray, k: float) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0, h * k / 2], [w * (1 - k / 3), 0], [w * (1 - k / 3), h], [0, h * (1 - k / 2)]])
    if k < 0:  # turned the other way
        dst = np.float32([[w * -k / 3, 0], [w, h * -k / 2], [w, h * (1 + k / 2)], [w * -k / 3, h]])
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REPLICATE)


def compose(rng: np.random.Generator, backgrounds: list[np.ndarray], faces: list) -> tuple[np.ndarray, list]:
    """One scene and its ground-truth boxes [(x, y, w, h, source, plain|turned|cut)]."""
    import cv2

    scene = backgrounds[rng.integers(len(backgrounds))].copy()
    truth = []
    cells = [(c, r) for r in range(2) for c in range(3)]
    for c, r in cells:
        img, (bx, by, bw, bh), src = faces[rng.integers(len(faces))]
        if src == "ferplus":  # 48 px originals: only the small sizes are plausible
            width = float(rng.uniform(40, 90))
        else:
            width = float(np.exp(rng.uniform(np.log(40), np.log(200))))
        s = width / bw
        side = 2.0 * max(bw, bh)
        x0, y0 = int(round(bx + bw / 2 - side / 2)), int(round(by + bh / 2 - side / 2))
        pad = int(side)
        big = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        patch = big[y0 + pad: y0 + pad + int(side), x0 + pad: x0 + pad + int(side)]
        variant = "plain"
        if rng.random() < 1 / 6:
            patch = _turn(patch, float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.45)))
            variant = "turned"
        ps = max(8, int(round(side * s)))
        patch = cv2.resize(patch, (ps, ps), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        cx = (c + 0.5) * W / 3 + rng.uniform(-0.12, 0.12) * W / 3
        cy = (r + 0.5) * H / 2 + rng.uniform(-0.12, 0.12) * H / 2
        if rng.random() < 1 / 8:  # about 30 % of the face out of the frame
            variant = "cut"
            if c != 1:
                cx = 0.2 * width if c == 0 else W - 0.2 * width
            else:
                cy = 0.2 * width if r == 0 else H - 0.2 * width
        px, py = int(round(cx - ps / 2)), int(round(cy - ps / 2))
        yy, xx = np.mgrid[0:ps, 0:ps]
        mask = np.clip(1.6 - 1.6 * np.hypot((xx - ps / 2) / (0.42 * ps), (yy - ps / 2) / (0.48 * ps)), 0, 1)[..., None]
        sx0, sy0, sx1, sy1 = max(0, px), max(0, py), min(W, px + ps), min(H, py + ps)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        region = scene[sy0:sy1, sx0:sx1].astype(np.float64)
        pp = patch[sy0 - py: sy1 - py, sx0 - px: sx1 - px].astype(np.float64)
        mm = mask[sy0 - py: sy1 - py, sx0 - px: sx1 - px]
        scene[sy0:sy1, sx0:sx1] = (mm * pp + (1 - mm) * region).round().astype(np.uint8)
        # the pasted face's box: the source box, scaled and moved with the patch
        fx = px + (bx - x0) * ps / side
        fy = py + (by - y0) * ps / side
        truth.append((fx, fy, bw * ps / side, bh * ps / side, src, variant))
    return scene, truth


def score(dets: list[tuple[tuple[float, ...], float]], truth: list) -> tuple[list[bool], int]:
    from cem.fer.detect import box_iou

    matched = [False] * len(truth)
    fp = 0
    for box, _ in sorted(dets, key=lambda d: -d[1]):
        best, bi = 0.0, -1
        for i, t in enumerate(truth):
            if not matched[i]:
                iou = box_iou(box, t[:4])
                if iou > best:
                    best, bi = iou, i
        if best >= 0.3:
            matched[bi] = True
        else:
            fp += 1
    return matched, fp


def run(stage, scenes: list) -> dict:
    widths, hits, sources, variants, fps, ms = [], [], [], [], 0, []
    for img, truth in scenes:
        t = time.perf_counter()
        faces = stage.measure(img)
        ms.append((time.perf_counter() - t) * 1000)
        matched, fp = score([(f.bbox, f.detection_score) for f in faces], truth)
        fps += fp
        widths += [t[2] for t in truth]
        sources += [t[4] for t in truth]
        variants += [t[5] for t in truth]
        hits += matched
    w, h = np.array(widths), np.array(hits)
    by_bin = {}
    for lo, hi in BINS:
        sel = (w >= lo) & (w < hi)
        by_bin[f"{lo}-{hi - 1}px"] = {"faces": int(sel.sum()), "found": int(h[sel].sum()),
                                      "recall": round(float(h[sel].mean()), 3) if sel.any() else None}
    src = np.array(sources)
    by_source = {s: round(float(h[(src == s) & (w >= 45)].mean()), 3) for s in sorted(set(sources))}
    var = np.array(variants)
    by_variant = {v: round(float(h[(var == v) & (w >= 45)].mean()), 3) for v in sorted(set(variants))}
    return {"recall_all": round(float(h.mean()), 3), "recall_from_45px": round(float(h[w >= 45].mean()), 3),
            "recall_from_45px_by_source": by_source, "recall_from_45px_by_variant": by_variant,
            "false_positives": fps, "false_positives_per_scene": round(fps / len(scenes), 3),
            "median_ms_per_scene": round(float(np.median(ms)), 1), "by_width": by_bin}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--detectors", default="auto",
                    help="faces.detector settings to compare (the first also builds the scenes)")
    ap.add_argument("--small-faces", default="mtcnn,pyramid,off", help="faces.small_faces settings to compare")
    ap.add_argument("--save-scenes", help="write the composed scenes (JPEG) to this folder to look at them")
    a = ap.parse_args(argv)
    from cem.config import Config
    from cem.datasets import shared_data_dir
    from cem.fer.detect import FaceDetector
    from cem.fer.stage import FERStage

    root = shared_data_dir()
    if root is None or not (root / "tcce_dev").is_dir():
        print("skipped: ../shared/data (tcce_dev, oasis_people, ferplus) not found", file=sys.stderr)
        return 0
    detectors = a.detectors.split(",")
    cfg = Config.load("default", faces__detector=detectors[0])
    plain = FaceDetector(cfg.faces.detector, cfg.faces.min_score, pad_retry=cfg.faces.pad_retry, small_faces="off")
    faces = _face_sources(root, plain)
    backgrounds = _backgrounds(root, plain)
    rng = np.random.default_rng(a.seed)
    scenes = [compose(rng, backgrounds, faces) for _ in range(a.scenes)]
    if a.save_scenes:
        from PIL import Image

        Path(a.save_scenes).mkdir(parents=True, exist_ok=True)
        for i, (img, _) in enumerate(scenes):
            Image.fromarray(img).save(Path(a.save_scenes) / f"scene_{i:03d}.jpg", quality=90)
    res: dict = {"scenes": len(scenes), "faces": sum(len(t) for _, t in scenes),
                 "face_sources": {s: sum(1 for f in faces if f[2] == s)
                                  for s in ("tcce_dev", "oasis_people", "ferplus")},
                 "backgrounds": len(backgrounds)}
    for name in detectors:
        for small in a.small_faces.split(","):
            stage = FERStage(Config.load("default", faces__detector=name, faces__small_faces=small))
            key = f"fer_stage[detector={name},small_faces={small}]"
            res[key] = run(stage, scenes)
            print(key, res[key]["recall_from_45px"], res[key]["false_positives"], file=sys.stderr, flush=True)
            stage.close()
    return emit(res, a.json)


if __name__ == "__main__":
    sys.exit(main())
