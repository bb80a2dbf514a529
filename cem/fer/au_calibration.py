"""Builds ``cem/fer/data/au_calibration.json``: per-AU nuisance coefficients and presence thresholds.

How it was made (``python -m cem.fer.au_calibration``, seeded, needs ``../shared/data/ferplus``):

1. A seeded sample of FER+ *training* faces (``--neutral`` faces with a neutral majority, >= 6 of 10
   votes, and ``--other`` faces of any other label) is meshed as ``cem annotate --faces whole`` does.
2. Nuisance shares: for each AU with ``nuisance`` measurements (:data:`cem.fer.aus.AU_DEFINITIONS`), the
   raw AU score is regressed (least squares, with intercept) on the z-scores of those measurements over
   the training faces whose plurality label (ties excluded) is one of ``nuisance_fit_on``: faces on
   which the AU is not expected, so what the nuisance measurements explain there is the other AUs'
   movement (mouth opening and smiling lift the upper lip without AU10). The coefficients are removed
   from the AU's score everywhere.
2b. The nuisance shares of AU04 (cheek height) and AU09 (corner elevation, cheek height) are fitted on
   *sharp* faces (``AUDefinition.nuisance_on_sharp_faces``): the cheek raiser of a broad smile also
   pulls the brows down and lifts the nose wings, which 48-px meshes are too noisy to show (AU04's share
   fitted on FER+ is about 0.08, on sharp faces 0.3); without it AU04 fired on 42 % and AU09 on 40 % of
   posed smiles in tcce_dev. Fitted (least squares, with intercept) over faces on which neither AU is
   expected:
   the smiles among ``oasis_people``'s photos (no labels used: faces with an AU12 score of at least
   ``SMILE_AU12_SCORE`` neutral spreads, at least ``SHARP_IOD`` px between the eyes and less than 25
   degrees of yaw; 25 faces) and the neutral photos of ``tcce_dev`` (step 4).
3. Presence thresholds on small faces (``threshold``): per AU, the ``1 - fpr`` quantile of the final
   scores over the neutral-majority training faces (``--fpr``, default 0.07): each AU is present on about
   7 % of neutral FER+ faces, whose interocular distance is about 24 px.
4. Presence thresholds on sharp faces (``threshold_sharp``): FER+ has no sharp faces, and its 48-px
   thresholds are far too high for a sharp photo (AU04 fired on 10 % of posed anger in tcce_dev and on
   0 % of its neutral faces). The only sharp neutral faces in the project's data are the 21 neutral
   photos of ``tcce_dev`` (7 performers, about 105 px between the eyes), as the issue on evidence
   suggests: per AU, the highest score over them plus ``--sharp-margin`` (0.25 neutral spreads). The
   maximum rather than a quantile, because 21 faces of 7 people give no stable 93rd percentile and a
   performer's resting face moves all three of their photos together. :class:`cem.fer.aus.Calibration`
   interpolates between the two anchors in log interocular distance. ``benchmarks/au_validity.py``
   refits this anchor without each performer in turn (leave one performer out), so the tcce_dev figures
   it reports are for performers the thresholds never saw.

5. Presence thresholds against one's own neutral face (``threshold_own_neutral``, the sharp anchor for
   faces measured with a subject baseline of neutral photos): each neutral ``tcce_dev`` photo is measured
   against its performer's *other* neutral photos (as a manifest with ``subject`` and ``neutral`` columns
   does), and per AU the highest score over them plus ``--own-neutral-margin`` (0.5 neutral spreads) is the
   threshold. Against one's own resting face the scores at rest spread far less than against the average
   face, so the population's sharp thresholds were too strict (AU01 or AU02 on 6 % of posed surprise with own
   neutral photos). AUs with ``own_neutral_threshold=False`` (AU10) keep the sharp population threshold.
   The margin was chosen with the benchmark's leave-one-performer-out estimate (docs/action-units.md):
   0.25 let AU04 fire on 25 % of posed smiles, 0.5 on 12 %, with every presence target still met.

FER+ valid is not used; tcce_dev's neutral photos only through steps 2b, 4 and 5, oasis_people's photos
only through step 2b.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cem.fer.aus import AU_DEFINITIONS, CALIBRATION_PATH, Calibration, au_scores, measurement_z, raw_au_scores
from cem.fer.geometry import Reference, load_reference

DEFAULT_FPR = 0.07


def mesh_ferplus(split: str, indices: np.ndarray | None = None, cache: str | Path | None = None
                 ) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Meshes (``mesh_whole`` on the 48x48 crop, None where it fails) and votes of FER+ faces of ``split``
    (all, or ``indices``); ``cache``: an .npz that is read when it exists, else written."""
    import cv2

    from cem.datasets import load_ferplus

    if cache is not None and Path(cache).is_file():
        with np.load(cache) as d:
            return [m if ok else None for m, ok in zip(d["meshes"].astype(np.float64), d["ok"])], d["votes"]
    from cem.fer.detect import FaceMesher

    data = load_ferplus(split)
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    mesher = FaceMesher()
    meshes = [mesher.mesh_whole(cv2.cvtColor(data.pixels[i], cv2.COLOR_GRAY2RGB)) for i in idx]
    mesher.close()
    votes = data.votes[idx]
    if cache is not None:
        ok = np.array([m is not None for m in meshes])
        arr = np.stack([m if m is not None else np.zeros((478, 3)) for m in meshes]).astype(np.float32)
        np.savez(cache, meshes=arr, ok=ok, votes=votes, index=idx)
    return meshes, votes


def sample_train(n_neutral: int, n_other: int, seed: int) -> np.ndarray:
    from cem.datasets import load_ferplus

    votes = load_ferplus("train").votes
    rng = np.random.default_rng(seed)
    neutral, other = np.flatnonzero(votes[:, 0] >= 6), np.flatnonzero(votes[:, 0] < 6)
    return np.sort(np.concatenate([rng.permutation(neutral)[:n_neutral], rng.permutation(other)[:n_other]]))


def fit_sharp_nuisance(meshes: list[np.ndarray], ref: Reference) -> dict[str, dict[str, float]]:
    """Step 2b: for each AU whose nuisance share is fitted on sharp faces, the least-squares coefficients
    (with intercept) of its raw score on the z-scores of its nuisance measurements over ``meshes``, sharp
    faces on which the AU is not expected."""
    if not meshes:
        raise ValueError("fitting the sharp-face nuisance shares needs at least one face mesh")
    z = np.array([measurement_z(m, ref) for m in meshes])
    index = {n: i for i, n in enumerate(ref.measure_names)}
    out: dict[str, dict[str, float]] = {}
    for d in AU_DEFINITIONS:
        if d.nuisance and d.nuisance_on_sharp_faces:
            raw = np.array([raw_au_scores(zz, ref)[d.code] for zz in z])
            x = np.column_stack([z[:, index[n]] for n in d.nuisance] + [np.ones(len(z))])
            coef, *_ = np.linalg.lstsq(x, raw, rcond=None)
            out[d.code] = {n: round(float(c), 6) for n, c in zip(d.nuisance, coef[:-1])}
    return out


def fit(meshes: list[np.ndarray | None], votes: np.ndarray, ref: Reference, fpr: float = DEFAULT_FPR,
        sharp_nuisance: dict[str, dict[str, float]] | None = None) -> Calibration:
    """Nuisance coefficients and thresholds from meshes of FER+ training faces and their votes;
    ``sharp_nuisance`` (from :func:`fit_sharp_nuisance`): the coefficients of the AUs fitted on sharp
    faces (required when any AU declares ``nuisance_on_sharp_faces``)."""
    from cem.datasets import FERPLUS_LABELS
    from cem.eval import plurality

    ok = np.array([m is not None for m in meshes])
    z = np.array([measurement_z(m, ref) if m is not None else np.full(len(ref.measure_names), np.nan)
                  for m in meshes])
    label, not_tie = plurality(votes)
    neutral = ok & (votes[:, 0] >= 6)
    index = {n: i for i, n in enumerate(ref.measure_names)}
    raw = {d.code: np.array([raw_au_scores(zz, ref)[d.code] if o else np.nan for zz, o in zip(z, ok)])
           for d in AU_DEFINITIONS}
    nuisance: dict[str, dict[str, float]] = {}
    for d in AU_DEFINITIONS:
        if not d.nuisance:
            continue
        if d.nuisance_on_sharp_faces:
            if sharp_nuisance is None or d.code not in sharp_nuisance:
                raise ValueError(f"{d.code}'s nuisance share is fitted on sharp faces: pass sharp_nuisance")
            nuisance[d.code] = dict(sharp_nuisance[d.code])
            continue
        use = ok & not_tie & np.isin(label, [FERPLUS_LABELS.index(e) for e in d.nuisance_fit_on])
        x = np.column_stack([z[use][:, index[n]] for n in d.nuisance] + [np.ones(int(use.sum()))])
        coef, *_ = np.linalg.lstsq(x, raw[d.code][use], rcond=None)
        nuisance[d.code] = {n: round(float(c), 6) for n, c in zip(d.nuisance, coef[:-1])}
    partial = Calibration(nuisance=nuisance, threshold={d.code: 0.0 for d in AU_DEFINITIONS})
    final = np.array([list(au_scores(zz, ref, partial).values()) for zz in z[neutral]])
    codes = [d.code for d in AU_DEFINITIONS]
    threshold = {c: round(float(np.quantile(final[:, j], 1 - fpr)), 6) for j, c in enumerate(codes)}
    return Calibration(nuisance=nuisance, threshold=threshold, how=f"fpr {fpr} on {int(neutral.sum())} neutral "
                       f"FER+ train faces; nuisance fitted on {int(ok.sum())} meshed FER+ train faces")


DEFAULT_SHARP_MARGIN = 0.25
DEFAULT_OWN_NEUTRAL_MARGIN = 0.5


def mesh_tcce(root: Path, cache: str | Path | None = None) -> tuple[list[np.ndarray | None], list[str], list[str],
                                                                    list[str]]:
    """Meshes of the largest face of each ``tcce_dev`` photo (the detect path, as ``cem annotate``), with
    the photos' names, posed labels (``labels_single.csv``) and performer ids (the name's first two
    characters); ``root``: the shared data folder; ``cache``: an .npz read when it exists, else written."""
    import csv

    from PIL import Image

    rows = list(csv.DictReader(open(root / "tcce_dev" / "labels_single.csv", encoding="utf-8")))
    names = [Path(r["image"]).name for r in rows]
    labels = [r["label"] for r in rows]
    subjects = [n[:2] for n in names]
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as d:
            if list(d["names"]) == names:
                return ([m if ok else None for m, ok in zip(d["meshes"].astype(np.float64), d["ok"])], names, labels,
                        subjects)
    from cem.fer.detect import FaceDetector, FaceMesher

    det, mesher = FaceDetector("auto", 0.5), FaceMesher()
    meshes: list[np.ndarray | None] = []
    for r in rows:
        rgb = np.asarray(Image.open(root / "tcce_dev" / r["image"]).convert("RGB"))
        found = det.detect(rgb)
        best = max(found, key=lambda d: d.bbox[2] * d.bbox[3]) if found else None
        meshes.append(mesher.mesh_in_box(rgb, best.bbox, best.eyes) if best else None)
    det.close()
    mesher.close()
    if cache is not None:
        ok = np.array([m is not None for m in meshes])
        arr = np.stack([m if m is not None else np.zeros((478, 3)) for m in meshes]).astype(np.float32)
        np.savez(cache, meshes=arr, ok=ok, names=np.array(names))
    return meshes, names, labels, subjects


SMILE_AU12_SCORE = 4.0  # AU12 raw score (neutral spreads) from which an oasis_people face counts as a smile
SHARP_IOD = 40.0  # px between the outer eye corners from which a face counts as sharp


def mesh_oasis_smiles(root: Path, cache: str | Path | None = None) -> list[np.ndarray]:
    """Meshes of the sharp, near-frontal smiling faces of ``oasis_people`` (step 2b of the module docs),
    every face of every photo through the detect path; ``cache``: an .npz of all faces' meshes."""
    from cem.fer.aus import interocular_px
    from cem.fer.geometry import frontalize, pose_from_rotation

    if cache is not None and Path(cache).is_file():
        with np.load(cache) as d:
            meshes = list(d["meshes"].astype(np.float64))
    else:
        from PIL import Image

        from cem.fer.detect import FaceDetector, FaceMesher

        det, mesher = FaceDetector("auto", 0.5), FaceMesher()
        meshes = []
        for path in sorted((root / "oasis_people" / "images").glob("*.jpg")):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            for face in det.detect(rgb):
                m = mesher.mesh_in_box(rgb, face.bbox, face.eyes)
                if m is not None:
                    meshes.append(m)
        det.close()
        mesher.close()
        if cache is not None:
            np.savez(cache, meshes=np.stack(meshes).astype(np.float32))
    ref = load_reference()
    out = []
    for m in meshes:
        front, rot = frontalize(m, ref)
        yaw = pose_from_rotation(rot)[1]
        if (interocular_px(m) >= SHARP_IOD and abs(yaw) < 25
                and raw_au_scores(measurement_z(m, ref, front), ref)["AU12"] >= SMILE_AU12_SCORE):
            out.append(m)
    return out


def calibrate(ferplus_meshes: list[np.ndarray | None], ferplus_votes: np.ndarray, sharp_neutral: list[np.ndarray],
              sharp_smiles: list[np.ndarray], ref: Reference, fpr: float = DEFAULT_FPR,
              margin: float = DEFAULT_SHARP_MARGIN, sharp_neutral_subjects: list[str] | None = None,
              own_neutral_margin: float = DEFAULT_OWN_NEUTRAL_MARGIN) -> Calibration:
    """All steps of the module docs: FER+ training faces (steps 1-3), sharp neutral faces (2b, 4) and
    sharp smiles (2b); with ``sharp_neutral_subjects`` (the person of each sharp neutral face) also step 5."""
    from cem.fer.aus import interocular_px

    cal = fit(ferplus_meshes, ferplus_votes, ref, fpr, fit_sharp_nuisance(sharp_neutral + sharp_smiles, ref))
    small_iod = float(np.median([interocular_px(m) for m, v in zip(ferplus_meshes, ferplus_votes)
                                 if m is not None and v[0] >= 6]))
    cal = fit_sharp(cal, sharp_neutral, ref, margin, small_iod)
    if sharp_neutral_subjects is not None:
        cal = fit_own_neutral(cal, sharp_neutral, sharp_neutral_subjects, ref, own_neutral_margin)
    return cal


def fit_own_neutral(cal: Calibration, neutral_meshes: list[np.ndarray], subjects: list[str], ref: Reference,
                    margin: float = DEFAULT_OWN_NEUTRAL_MARGIN) -> Calibration:
    """``cal`` with ``threshold_own_neutral`` (step 5 of the module docs): each neutral face measured against
    the same person's other neutral faces; per AU the highest score plus ``margin`` (AUs that keep the
    population threshold get ``cal``'s sharp one)."""
    from dataclasses import replace

    from cem.fer.aus import SubjectBaseline
    from cem.fer.geometry import frontalize

    if cal.threshold_sharp is None:
        raise ValueError("the own-neutral thresholds are fitted after the sharp-face thresholds (step 4)")
    scores = []
    for i, m in enumerate(neutral_meshes):
        others = [o for j, o in enumerate(neutral_meshes) if j != i and subjects[j] == subjects[i]]
        if not others:  # a person with one neutral photo has nothing to measure it against
            continue
        base = SubjectBaseline.from_meshes(others, ref, neutral=True)
        front, _ = frontalize(m, ref)
        scores.append(list(au_scores(measurement_z(m, ref, front, base), ref, cal).values()))
    if not scores:
        raise ValueError("fitting the own-neutral thresholds needs two or more neutral photos of one person")
    arr = np.array(scores)
    own = {d.code: (round(float(arr[:, j].max() + margin), 6) if d.own_neutral_threshold
                    else cal.threshold_sharp[d.code]) for j, d in enumerate(AU_DEFINITIONS)}
    return replace(cal, threshold_own_neutral=own)


def fit_sharp(cal: Calibration, sharp_neutral: list[np.ndarray], ref: Reference,
              margin: float = DEFAULT_SHARP_MARGIN, small_iod: float | None = None) -> Calibration:
    """``cal`` with its sharp-face anchor fitted on meshes of sharp neutral faces (step 4 of the module
    docs): per AU, the highest score over them plus ``margin``; ``iod_sharp`` is their median
    interocular distance, ``small_iod`` (default: unchanged) that of the small faces ``cal`` came from."""
    from dataclasses import replace

    from cem.fer.aus import interocular_px

    if not sharp_neutral:
        raise ValueError("fitting the sharp-face thresholds needs at least one sharp neutral face mesh")
    scores = np.array([list(au_scores(measurement_z(m, ref), ref, cal).values()) for m in sharp_neutral])
    codes = [d.code for d in AU_DEFINITIONS]
    sharp = {c: round(float(scores[:, j].max() + margin), 6) for j, c in enumerate(codes)}
    iod = float(np.median([interocular_px(m) for m in sharp_neutral]))
    return replace(cal, threshold_sharp=sharp, iod_sharp=round(iod, 2),
                   iod_small=cal.iod_small if small_iod is None else round(small_iod, 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fit the AU nuisance shares and presence thresholds on FER+ train.")
    p.add_argument("--neutral", type=int, default=1200, help="neutral-majority training faces to sample")
    p.add_argument("--other", type=int, default=800, help="other training faces to sample")
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sharp-margin", type=float, default=DEFAULT_SHARP_MARGIN,
                   help="added to the highest score of the sharp neutral faces (neutral spreads)")
    p.add_argument("--own-neutral-margin", type=float, default=DEFAULT_OWN_NEUTRAL_MARGIN,
                   help="added to the highest score of neutral photos against their person's other neutral photos")
    p.add_argument("--cache", help="mesh cache (.npz) for repeated runs")
    p.add_argument("--tcce-cache", help="mesh cache (.npz) of tcce_dev for repeated runs")
    p.add_argument("--oasis-cache", help="mesh cache (.npz) of oasis_people for repeated runs")
    p.add_argument("--out", type=Path, default=CALIBRATION_PATH)
    a = p.parse_args(argv)
    from cem.datasets import shared_data_dir

    ref = load_reference()
    root = shared_data_dir()
    if root is None or not (root / "tcce_dev").is_dir() or not (root / "oasis_people").is_dir():
        raise SystemExit("../shared/data (ferplus, tcce_dev, oasis_people) is needed: see the module docs")
    meshes, votes = mesh_ferplus("train", sample_train(a.neutral, a.other, a.seed), a.cache)
    tm, _, labels, subjects = mesh_tcce(root, a.tcce_cache)
    sharp_neutral = [m for m, lab in zip(tm, labels) if m is not None and lab == "neutral"]
    neutral_subjects = [s for m, lab, s in zip(tm, labels, subjects) if m is not None and lab == "neutral"]
    smiles = mesh_oasis_smiles(root, a.oasis_cache)
    cal = calibrate(meshes, votes, sharp_neutral, smiles, ref, a.fpr, a.sharp_margin, neutral_subjects,
                    a.own_neutral_margin)
    a.out.write_text(json.dumps({
        "how": "python -m cem.fer.au_calibration (see its docstring): " + cal.how + f"; AU04's nuisance on "
               f"{len(sharp_neutral)} neutral tcce_dev photos and {len(smiles)} oasis_people smiles; sharp-face "
               f"thresholds: highest score + {a.sharp_margin} over the {len(sharp_neutral)} neutral photos; "
               f"own-neutral thresholds: highest score + {a.own_neutral_margin} over them, each against its "
               f"performer's other neutral photos",
        "fpr": a.fpr, "seed": a.seed, "sampled": {"neutral": a.neutral, "other": a.other},
        "sharp_margin": a.sharp_margin, "own_neutral_margin": a.own_neutral_margin, "iod_small": cal.iod_small,
        "iod_sharp": cal.iod_sharp, "nuisance": cal.nuisance, "threshold": cal.threshold,
        "threshold_sharp": cal.threshold_sharp, "threshold_own_neutral": cal.threshold_own_neutral,
    }, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.out}: {cal.how}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
