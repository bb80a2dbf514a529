"""Video: the FER stage on every sampled frame with face tracking, smoothing, per-person baselines, and
context reasoning on key moments only.

Streaming: frames are decoded one at a time with OpenCV and never written to disk; what is kept per track
is bounded (a short history for timeline summaries, at most ``BASELINE_MAX`` neutral samples), so memory
does not grow with the length of the video.

**Tracking.** Detection runs on the first frame, every ``detect_every`` frames and whenever a track was
not re-found; in between, each live track's face is re-meshed in its last box (cheaper than detection).
Detections are matched to tracks by IoU (Hungarian assignment, IoU >= 0.3); a detection that matches no
live track is compared with tracks lost less than ``max_gap_s`` ago by position and size (centre distance
under 1.5 face widths, size ratio within 2/3..3/2) and re-acquired under the same ``track_id``; otherwise it
starts a new track. No identity recognition is involved.

**Smoothing.** AU intensities and the expression distribution of a track are smoothed with an exponential
moving average whose weight follows the time between processed frames: ``a = 1 - exp(-dt / tau)``,
``tau = smooth_tau_s`` (0.15 s), so the filter behaves the same at any sampling rate.

**Baselines.** A frame where the track's smoothed expression gives neutral >= 0.6 is a neutral sample;
once ``baseline_min`` (15) samples exist, the track's baseline per AU is their median, and each frame also
reports ``AUxx_rel = max(0, AUxx - baseline)`` (the subject-specific calibration OpenFace does).

**Key moments.** A track's frame is a key moment when ``key_interval_s`` (2 s) passed since its last key
moment, or when the change score, the Jensen-Shannon divergence (bits) between its smoothed expression
now and at its last key moment, exceeds ``change_threshold`` (0.2). Only key moments go to the reasoner,
with a summary of the track's AU and expression timeline since the last key moment in the prompt.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cem.contract import FRAME_INPUT_COLUMNS, ActionUnit, FaceEvidence, frame_row
from cem.eval import js_divergence
from cem.io import os_reason
from cem.sinks import safe_text

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm"})
BASELINE_MAX = 300
# frame rates a video header may plausibly give (time-lapse to high-speed cameras); outside them, or missing,
# the rate is unknown and ASSUMED_FPS is used for frame times (a header of 1e-6 fps made every frame a new track)
PLAUSIBLE_FPS = (0.01, 10_000.0)
ASSUMED_FPS = 30.0


class VideoError(ValueError):
    """A video that cannot be opened or decoded."""


def sampling_label(every: int | None, fps: float | None) -> str:
    """How a run chose a video's frames, as its records say it (``frame_sampling``): ``"every frame"``,
    ``"every 2 frames"`` or ``"7 fps"``. ``--resume`` compares it, so that an interrupted video is not
    continued at another sampling (its key moments would mix two)."""
    if every is not None and int(every) > 1:
        return f"every {int(every)} frames"
    if fps is not None:
        return f"{float(fps):g} fps"
    return "every frame"


def check_sampling(every: Any, fps: Any, names: tuple[str, str] = ("every", "fps")) -> None:
    """The frames a video run samples: ``every`` a whole number >= 1, ``fps`` a finite number > 0, not both
    (ValueError naming them as ``names``, the Python arguments or the CLI's options). Unchecked, every=0 or
    fps=-1 processed every frame, and so did both at once."""
    if every is not None and fps is not None:
        raise ValueError(f"{names[0]} and {names[1]} both choose the frames of a video: give one of them")
    # numbers.Integral / Real: numpy's numbers (a DataFrame's values) are whole numbers and numbers too
    if every is not None and (isinstance(every, (bool, np.bool_)) or not isinstance(every, numbers.Integral)
                              or every < 1):
        raise ValueError(f"{names[0]} must be a whole number >= 1 (process every Nth frame), got {every!r}")
    if fps is not None and (isinstance(fps, (bool, np.bool_)) or not isinstance(fps, numbers.Real)
                            or not math.isfinite(fps) or fps <= 0):
        raise ValueError(f"{names[1]} must be a number > 0 (frames per second to sample), got {fps!r}")


def is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass
class VideoOptions:
    every: int | None = None  # process every Nth frame
    fps: float | None = None  # or sample at this rate (frames per second)
    detect_every: int = 10
    max_gap_s: float = 2.0
    smooth_tau_s: float = 0.15
    baseline_min: int = 15
    key_interval_s: float = 2.0
    change_threshold: float = 0.2
    reason: bool = True

    def check(self) -> None:
        """ValueError naming the first setting that cannot work (before any frame is decoded: a zero time
        constant or baseline size used to fail in the middle of a video)."""
        check_sampling(self.every, self.fps)
        for name, minimum in (("detect_every", 1), ("baseline_min", 1)):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < minimum:
                raise ValueError(f"VideoOptions.{name} must be a whole number >= {minimum}, got {v!r}")
        if self.baseline_min > BASELINE_MAX:  # the neutral samples kept: the baseline would never form
            raise ValueError(f"VideoOptions.baseline_min must be at most {BASELINE_MAX} (the neutral samples a track "
                             f"keeps), got {self.baseline_min!r}")
        for name, positive in (("smooth_tau_s", True), ("max_gap_s", False), ("key_interval_s", False),
                               ("change_threshold", False)):
            v = getattr(self, name)
            if (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                    or v < 0 or (positive and v == 0)):
                raise ValueError(f"VideoOptions.{name} must be a number {'>' if positive else '>='} 0, got {v!r}")


@contextmanager
def opencv_path(path: str | os.PathLike | bytes) -> Iterator[str]:
    """A name under which OpenCV can open ``path``. OpenCV takes file names as UTF-8 text and crashes the
    process (a segmentation fault, not an exception) on a name that is not valid UTF-8, which POSIX file systems
    allow (Python carries such bytes as surrogates); such a file is opened through a symbolic link with a plain
    name in a temporary folder."""
    # absolute: FFmpeg reads a relative name such as "concat:a.mp4" as a protocol, not as a file
    name = os.path.abspath(os.fsdecode(os.fspath(path)))
    if safe_text(name) != name:  # not UTF-8 (safe_text escapes it)
        import tempfile

        base = tempfile.gettempdir()
        if safe_text(base) != base:  # the link's own path must be one OpenCV can take
            base = next((d for d in ("/tmp", "/var/tmp", os.getcwd()) if safe_text(d) == d and os.path.isdir(d)),
                        base)
        with tempfile.TemporaryDirectory(prefix="cem-video-", dir=base) as tmp:
            link = os.path.join(tmp, "video" + Path(name).suffix.encode("ascii", "replace").decode())
            try:
                os.symlink(os.path.abspath(os.fsencode(name)), os.fsencode(link))
            except OSError as e:
                raise VideoError(f"{safe_text(name)}: its file name is not valid UTF-8, which OpenCV cannot "
                                 f"open, and no link to it could be made ({e.strerror or e}); rename the "
                                 f"file") from None
            yield link
        return
    yield name


def frame_count(path: str | os.PathLike) -> int | None:
    """Frames the container says the video has (for progress bars; None when it does not say or cannot be
    opened)."""
    import cv2

    if not os.path.isfile(path):  # a FIFO named x.mp4 would block OpenCV (and the run) for good
        return None
    try:
        with opencv_path(path) as name:
            cap = cv2.VideoCapture(name)
            try:
                n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            finally:
                cap.release()
    except VideoError:
        return None
    return n if n > 0 else None


@dataclass
class DecodeStats:
    """How much of a video was read; :func:`iter_frames` fills it in as it decodes."""

    declared: int | None = None  # frames the container's header declares (None when it does not say)
    decoded: int = 0  # frames decoded, sampled or not

    @property
    def cut_short(self) -> bool:
        """Decoding stopped before the frames the header declares: a cut or damaged file. A shortfall of one
        frame, or of 0.1 % in long videos, is allowed: some containers only estimate their frame count from
        the duration (2 of 24 frames lost went unreported with a 2-frame, 1 % allowance)."""
        return self.declared is not None and self.decoded < self.declared - max(1.0, 0.001 * self.declared)


def iter_frames(path: str | os.PathLike, every: int | None = None, fps: float | None = None,
                stats: DecodeStats | None = None, max_pixels: int | None = None,
                max_side: int | None = None) -> Iterator[tuple[int, float, Any]]:
    """(frame index, time in s, RGB frame) for the sampled frames, decoded one at a time; ``stats`` (optional)
    is filled in with the frames declared and decoded. ``max_pixels``/``max_side``: the image limits
    (``image.max_pixels``, ``image.max_side``), applied to the frame size before any frame is decoded."""
    from cem.io import url_problem

    path = os.fsdecode(os.fspath(path))
    if (problem := url_problem(path)) is not None:
        raise VideoError(problem)
    if not Path(path).exists():
        raise VideoError(f"{safe_text(path)}: file not found")
    if not Path(path).is_file():
        raise VideoError(f"{safe_text(path)}: not a regular file (a folder, FIFO or device)")
    with opencv_path(path) as name:
        yield from _decode(name, safe_text(path), every, fps, stats, max_pixels, max_side)


def _upright(cap: Any) -> Any:
    """The rotation (a cv2.ROTATE_* flag, or None) that shows ``cap``'s frames upright, as players show them:
    phones store portrait video sideways with a rotation in the container's display matrix. OpenCV's own
    auto-rotation is off in some builds (and on in others), so it is turned off and applied here, one way
    everywhere; the angle is the clockwise one OpenCV reports (CAP_PROP_ORIENTATION_META)."""
    import cv2

    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
    try:
        angle = int(round(float(cap.get(cv2.CAP_PROP_ORIENTATION_META) or 0.0))) % 360
    except (TypeError, ValueError, OverflowError):  # NaN or a broken header: no rotation said
        return None
    return {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}.get(angle)


def _rgb(bgr: Any, rotation: Any) -> Any:
    import cv2

    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb if rotation is None else cv2.rotate(rgb, rotation)


def _decode(name: str, path: str, every: int | None, fps: float | None, stats: DecodeStats | None,
            max_pixels: int | None, max_side: int | None) -> Iterator[tuple[int, float, Any]]:
    """:func:`iter_frames` on the file OpenCV opens as ``name``; ``path`` is the name messages give."""
    import cv2

    cap = cv2.VideoCapture(name)
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open this video")
    rotation = _upright(cap)
    if max_pixels is not None or max_side is not None:
        from cem.io import MAX_SIDE, ImageLoadError, check_geometry

        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        if width > 0 and height > 0:  # a container that does not say is checked frame by frame by OpenCV
            try:
                check_geometry(f"{path}: frames", width, height, max_pixels or width * height, max_side or MAX_SIDE)
            except ImageLoadError as e:
                cap.release()
                raise VideoError(str(e)) from None
    if stats is not None:
        declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        stats.declared, stats.decoded = (declared if declared > 0 else None), 0
    native = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not PLAUSIBLE_FPS[0] <= native <= PLAUSIBLE_FPS[1]:  # 0, NaN, or a broken header (1e-6, 2**31): unknown
        log.warning("%s: the file says %s frames per second; %s are assumed", path, native, ASSUMED_FPS)
        native = ASSUMED_FPS
    i = 0
    try:
        while True:
            ok = cap.grab()
            if not ok:
                break
            if _sampled(i, native, every, fps):
                ok, bgr = cap.retrieve()
                if not ok:
                    break
                yield i, i / native, _rgb(bgr, rotation)
            i += 1
            if stats is not None:
                stats.decoded = i
    finally:
        cap.release()
    if i == 0:
        raise VideoError(f"{path}: no frame could be decoded")


def frame_at(path: str, frame: int, max_pixels: int) -> np.ndarray:
    """Frame ``frame`` of the video at ``path`` as RGB (a key moment's picture in the report); VideoError when the
    file does not have it, or its frames are over the image limits."""
    import cv2

    from cem.io import ImageLoadError, check_geometry

    with opencv_path(path) as name:
        cap = cv2.VideoCapture(name)
        try:
            width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
            if width > 0 and height > 0:
                try:
                    check_geometry(f"{safe_text(path)}: frames", width, height, max_pixels)
                except ImageLoadError as e:
                    raise VideoError(str(e)) from None
            rotation = _upright(cap)
            cap.set(cv2.CAP_PROP_POS_FRAMES, frame)
            ok, bgr = cap.read()
        finally:
            cap.release()
    if not ok:
        raise VideoError(f"{safe_text(path)}: frame {frame} cannot be read")
    return _rgb(bgr, rotation)


def _sampled(i: int, native: float, every: int | None, fps: float | None) -> bool:
    """Whether frame ``i`` of a video at ``native`` frames per second is processed: every ``every``-th frame,
    or at ``fps`` the first frame of each 1/fps interval (so the rate is ``fps`` on average, ``--fps 7`` of a
    30 fps clip 7 frames a second; a rounded frame step gave 7.5), or every frame."""
    if every:
        return i % int(every) == 0
    if fps and fps < native:
        # the interval a frame falls in, computed in whole frames' worth of 1/fps to avoid float drift
        return i == 0 or math.floor(i * fps / native + 1e-9) > math.floor((i - 1) * fps / native + 1e-9)
    return True


@dataclass
class Track:
    track_id: int
    bbox: tuple[float, float, float, float]
    score: float
    last_seen: float
    last_frame: int
    mesh_extent: float | None = None  # the scale of the face's mesh where ``bbox`` was measured
    au: dict[str, float] = field(default_factory=dict)  # smoothed intensities
    expression: np.ndarray | None = None  # smoothed distribution
    neutral_samples: deque = field(default_factory=lambda: deque(maxlen=BASELINE_MAX))
    history: deque = field(default_factory=lambda: deque(maxlen=600))  # (t, au dict, expression)
    last_key_t: float | None = None
    last_key_expr: np.ndarray | None = None

    def baseline(self, minimum: int) -> dict[str, float] | None:
        if len(self.neutral_samples) < minimum:
            return None
        keys = self.neutral_samples[0].keys()
        return {k: float(np.median([s[k] for s in self.neutral_samples])) for k in keys}


@dataclass
class TrackedFace:
    track_id: int
    evidence: FaceEvidence  # smoothed AUs and expression
    raw: FaceEvidence  # as measured on this frame
    au_relative: dict[str, float] | None
    change: float
    key: bool
    key_reason: str | None
    t_start: float


@dataclass
class VideoFrame:
    frame: int
    time: float
    width: int
    height: int
    faces: list[TrackedFace]
    rgb: Any = None
    moments: list[dict[str, Any]] = field(default_factory=list)  # records of key moments on this frame


class FaceTracker:
    """Keeps face identities across frames (see the module docs for the matching rules)."""

    def __init__(self, opts: VideoOptions) -> None:
        self.opts = opts
        self.tracks: dict[int, Track] = {}
        self._next = 0

    def live(self, t: float, frame_gap_s: float) -> list[Track]:
        return [tr for tr in self.tracks.values() if t - tr.last_seen <= frame_gap_s + 1e-9]

    def assign(self, boxes: list[tuple[float, float, float, float]], scores: list[float], t: float,
               frame: int) -> list[int]:
        """Track ids for the boxes of one frame (new ids for new faces)."""
        from scipy.optimize import linear_sum_assignment

        from cem.fer.detect import box_iou

        ids = [-1] * len(boxes)
        candidates = [tr for tr in self.tracks.values() if t - tr.last_seen <= self.opts.max_gap_s]
        if boxes and candidates:
            cost = np.array([[1 - box_iou(b, tr.bbox) for tr in candidates] for b in boxes])
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols):
                if cost[r, c] <= 0.7:
                    ids[r] = candidates[c].track_id
        used = {i for i in ids if i >= 0}
        for k, b in enumerate(boxes):
            if ids[k] >= 0:
                continue
            best, best_d = None, None
            for tr in candidates:
                if tr.track_id in used:
                    continue
                size_ratio = b[2] / max(tr.bbox[2], 1e-6)
                d = math.hypot(b[0] + b[2] / 2 - tr.bbox[0] - tr.bbox[2] / 2,
                               b[1] + b[3] / 2 - tr.bbox[1] - tr.bbox[3] / 2) / max(tr.bbox[2], 1e-6)
                if 2 / 3 <= size_ratio <= 1.5 and d < 1.5 and (best_d is None or d < best_d):
                    best, best_d = tr, d
            if best is not None:
                ids[k] = best.track_id
                used.add(best.track_id)
            else:
                ids[k] = self._next
                self.tracks[self._next] = Track(self._next, b, scores[k], t, frame)
                self._next += 1
        for k, tid in enumerate(ids):
            tr = self.tracks[tid]
            tr.bbox, tr.score, tr.last_seen, tr.last_frame = boxes[k], scores[k], t, frame
        # forget tracks gone for longer than the re-identification window
        for tid in [tid for tid, tr in self.tracks.items() if t - tr.last_seen > self.opts.max_gap_s]:
            del self.tracks[tid]
        return ids


def _timeline_summary(tr: Track, since: float, labels: list[str]) -> str | None:
    pts = [h for h in tr.history if h[0] >= since]
    if len(pts) < 2:
        return None
    (t0, au0, e0), (t1, au1, e1) = pts[0], pts[-1]
    dt = t1 - t0
    changes = sorted(((abs(au1[k] - au0[k]), k) for k in au1 if k in au0), reverse=True)
    parts = []
    for delta, k in changes[:3]:
        if delta >= 0.5:
            verb = "rose" if au1[k] > au0[k] else "fell"
            parts.append(f"{k} {verb} from {au0[k]:.1f} to {au1[k]:.1f} over {dt:.1f} s")
    top0, top1 = labels[int(np.argmax(e0))], labels[int(np.argmax(e1))]
    if top0 != top1:
        parts.append(f"expression changed from {top0} to {top1}")
    return "; ".join(parts) or f"little change over {dt:.1f} s"


def track_video(stage: Any, path: str, labels: list[str], opts: VideoOptions,
                stats: DecodeStats | None = None) -> Iterator[VideoFrame]:
    """Run the FER stage over a video with tracking, smoothing, baselines and key-moment flags (``stats``: see
    :func:`iter_frames`)."""
    from cem.fer.stage import mesh_extent

    tracker = FaceTracker(opts)
    last_t: float | None = None
    processed = 0
    limits = getattr(getattr(stage, "config", None), "image", None)  # the image limits hold for frames too
    for frame_idx, t, rgb in iter_frames(path, opts.every, opts.fps, stats,
                                         getattr(limits, "max_pixels", None), getattr(limits, "max_side", None)):
        h, w = rgb.shape[:2]
        dt = 0.0 if last_t is None else t - last_t
        live = tracker.live(t, max(dt, 1e-3) * 1.5)
        if processed % max(1, opts.detect_every) == 0 or not live:
            evidence = stage.measure(rgb, "detect")
        else:
            evidence = stage.measure(rgb, "detect", boxes=[(tr.bbox, tr.score) for tr in live],
                                     box_extents=[tr.mesh_extent for tr in live])
            if len(evidence) < len(live):  # a tracked face was lost: look again with the detector
                evidence = stage.measure(rgb, "detect")
        ids = tracker.assign([e.bbox for e in evidence], [e.detection_score for e in evidence], t, frame_idx)
        faces = []
        for ev, tid in zip(evidence, ids):
            tr = tracker.tracks[tid]
            tr.mesh_extent = None if ev.landmarks is None else mesh_extent(ev.landmarks)
            a = 1.0 if tr.expression is None else 1.0 - math.exp(-max(dt, 0.0) / opts.smooth_tau_s)
            raw_expr = np.array([ev.expression[k] for k in labels])
            tr.expression = raw_expr if tr.expression is None else (1 - a) * tr.expression + a * raw_expr
            for k, au in ev.aus.items():
                tr.au[k] = au.intensity if k not in tr.au else (1 - a) * tr.au[k] + a * au.intensity
            smooth_aus = {k: ActionUnit(tr.au[k], tr.au[k] >= 1.0) for k in ev.aus}
            if tr.expression[labels.index("neutral")] >= 0.6 if "neutral" in labels else False:
                if ev.aus:
                    tr.neutral_samples.append({k: v.intensity for k, v in smooth_aus.items()})
            base = tr.baseline(opts.baseline_min)
            rel = {k: max(0.0, v.intensity - base.get(k, 0.0)) for k, v in smooth_aus.items()} if base else None
            tr.history.append((t, {k: v.intensity for k, v in smooth_aus.items()}, tr.expression.copy()))
            change = 0.0 if tr.last_key_expr is None else js_divergence(tr.expression[None], tr.last_key_expr[None])
            key_reason = None
            if tr.last_key_t is None:
                key_reason = "first appearance"
            elif change > opts.change_threshold:
                key_reason = f"expression change (JS {change:.2f} bits)"
            elif t - tr.last_key_t >= opts.key_interval_s - 1e-9:  # frame times are i / fps: 260/30 - 200/30 < 2
                key_reason = "interval"
            t_start = tr.last_key_t if tr.last_key_t is not None else t
            smoothed = FaceEvidence(
                index=ev.index, bbox=ev.bbox, detection_score=ev.detection_score, pose=ev.pose,
                quality=ev.quality, aus=smooth_aus, expression=dict(zip(labels, (tr.expression /
                                                                                 tr.expression.sum()).tolist())),
                landmarks=ev.landmarks, position=ev.position,
                timeline=_timeline_summary(tr, t_start, labels) if key_reason else None)
            if key_reason:
                tr.last_key_t, tr.last_key_expr = t, tr.expression.copy()
            faces.append(TrackedFace(tid, smoothed, ev, rel, change, key_reason is not None, key_reason, t_start))
        yield VideoFrame(frame_idx, t, w, h, faces, rgb)
        last_t = t
        processed += 1


def frame_rows(vf: VideoFrame, labels: list[str], au_codes: list[str], video: str = "", *,
               context: str | None = None, meta: dict[str, Any] | None = None,
               meta_columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The frame-table rows of one processed frame (:func:`cem.contract.frame_row` for each tracked face)."""
    return [frame_row(video, vf.time, vf.frame, f.track_id, f.evidence, f.key, f.au_relative, labels, au_codes,
                      context=context, meta=meta, meta_columns=meta_columns or ())
            for f in vf.faces]


def _names(columns: list[str]) -> str:
    """Column names for a message, quoted where a name holds a comma or a quote (a manifest's header may)."""
    return ", ".join(repr(c) if any(ch in c for ch in ",'\"") else c for c in columns)


def _check_table_columns(path: Path, found: list[str], columns: list[str]) -> None:
    """A frame table to resume into has this run's columns (VideoError naming what differs otherwise)."""
    if list(found) == columns:
        return
    missing = [c for c in columns if c not in found]
    extra = [c for c in found if c not in columns]
    why = "; ".join(part for part in (f"this run also writes {_names(missing)}" if missing else "",
                                      f"the table also has {_names(extra)}" if extra else "") if part)
    raise VideoError(f"{path}: its columns differ from this run's ({why or 'another order'}: a table of "
                     f"another cem version or of a manifest with other columns); cannot resume into it: "
                     f"give --frames a new file")


def _scan_csv_table(path: Path, columns: list[str], key: Any = None) -> tuple[set[tuple[str, ...]], int, int]:
    """A CSV frame table that a resumed run will append to: (the ``key`` of each complete row, the byte offset
    just after the last complete row, the file size). Only the end of the file may be cut (a run stopped while
    writing a row, or the header, maybe inside a character); a row of the wrong length before that (also a stray
    quote that swallows the rows after it), or bytes that are not UTF-8, are damage that appending would bury
    (an older cem appended after a cut row): VideoError saying what to do."""
    import csv
    import io

    pos, last = 0, b""
    what = safe_text(os.fspath(path))

    def lines(fh: Any) -> Iterator[str]:
        nonlocal pos, last
        for raw in fh:
            pos, last = pos + len(raw), raw
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                if not raw.endswith(b"\n"):  # the last line, cut inside a character: a cut row
                    yield raw.decode("utf-8", "replace")
                    continue
                raise VideoError(f"{what}: bytes that are not UTF-8 text near byte {pos - len(raw)}: not a table "
                                 f"cem wrote, or a damaged one; move it away and resume (the records in the JSONL "
                                 f"are kept)") from None

    def damaged(where: int, cells: int | None, n: int) -> VideoError:
        said = f"has {cells} cells, not {n}" if cells is not None else "does not parse"
        return VideoError(f"{what}: the row starting at byte {where} {said}: the table is damaged (an older cem "
                          f"resumed after a cut row without mending it, or it was edited); move it away and resume "
                          f"(the records in the JSONL are kept)")

    def rows_after_first_line(start: int) -> bool:
        """Whether complete rows follow the first line of the bad row at ``start`` (a stray quote read them
        into one cell): then it is damage, not a row cut at the end of the file."""
        with open(path, "rb") as tail:
            tail.seek(start)
            rest = tail.read().split(b"\n", 1)
        if len(rest) < 2:
            return False
        text = rest[1].decode("utf-8", "replace")
        return any(len(r) == len(columns) for r in csv.reader(io.StringIO(text)) if r)

    keys: set[tuple[str, ...]] = set()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        reader = csv.reader(lines(fh))
        header = next(reader, [])
        if not last.endswith(b"\n"):
            buf = io.StringIO()
            csv.writer(buf).writerow(columns)
            if buf.getvalue().startswith(last.decode("utf-8", "replace")):
                return keys, 0, size  # cut inside the header cem was writing: no row was written yet
        _check_table_columns(path, header, columns)
        good_end = pos
        while True:
            start = pos
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:  # a quoted cell running to the end of the file (or past the field size limit)
                if rows_after_first_line(start):
                    raise damaged(start, None, len(header)) from None
                break
            complete = last.endswith(b"\n")
            if not row and complete:  # a blank line
                good_end = pos
                continue
            if not complete or len(row) != len(header):
                if pos >= size and not rows_after_first_line(start):
                    break  # the last row, cut: removed and written again
                raise damaged(start, len(row), len(header))
            if key is not None:
                keys.add(key(dict(zip(header, row))))
            good_end = pos
    return keys, good_end, size


class FrameTableWriter:
    """Per-frame table: CSV (streamed) or Parquet (``.parquet``; written in row groups, needs pyarrow).

    ``resume=True`` keeps the rows already in the table and skips rows of the same input (video, context and
    ``meta.*`` columns), frame and track when an interrupted video is processed again: the table is never
    wiped by ``--resume``.
    A CSV is appended to; a Parquet file (which cannot be appended to) is rewritten with its old rows
    first, into a temporary file that replaces it only when complete.
    """

    def __init__(self, path: str | Path, columns: list[str], resume: bool = False) -> None:
        self.path, self.columns = Path(path), columns
        self.parquet = self.path.suffix.lower() == ".parquet"
        self._buf: list[dict[str, Any]] = []
        self._pq_writer: Any = None
        self._existing: set[tuple[str, ...]] = set()
        self._target = self.path
        self._write_failed = False
        # the columns that say which input a row is of; with the frame and the track they identify a row
        self._input_columns = [c for c in columns if c in FRAME_INPUT_COLUMNS or c.startswith("meta.")]
        resuming = resume and self.path.is_file() and self.path.stat().st_size > 0
        if self.parquet:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise VideoError("--frames *.parquet needs pyarrow (pip install pyarrow); or use .csv") from None
            if resuming:
                try:
                    old = pq.read_table(self.path)
                except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) for a file cut while writing
                    raise VideoError(f"not a readable Parquet table ({type(e).__name__}: {e}); "
                                     f"a run killed while writing it leaves it cut: move it away and resume (the "
                                     f"records in the JSONL are kept), or use a .csv table, which resumes "
                                     f"after a kill") from None
                _check_table_columns(self.path, old.column_names, columns)
                rows = old.to_pylist()
                self._existing = {self._key(r) for r in rows}
                self.path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                self._buf.extend(rows)
        else:
            import csv

            if resuming:
                self._existing = self._complete_rows(columns)
                resuming = self.path.stat().st_size > 0  # a cut header was removed: the table starts again
            self._fh = open(self.path, "a" if resuming else "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._w = csv.DictWriter(self._fh, fieldnames=columns)
            if not resuming:
                self._w.writeheader()

    def _complete_rows(self, columns: list[str]) -> set[tuple[str, ...]]:
        """Keys of the rows of the CSV table being resumed. A last row cut by a run that stopped while writing
        it (killed, disk full) is removed from the file, so that the rows appended after it start on a line of
        their own, and is not counted: its frame is written again. A header cut before its end leaves a table
        without rows: it is started again. Damage before the last row is a VideoError (see
        :func:`_scan_csv_table`)."""
        keys, good_end, size = _scan_csv_table(self.path, columns, self._key)
        if good_end < size:
            with open(self.path, "r+b") as cut:
                cut.truncate(good_end)
            log.warning("%s: its last %s was cut (a run stopped while writing it); it is removed and written "
                        "again", safe_text(os.fspath(self._target)), "row" if good_end else "line (the header)")
        return keys

    @staticmethod
    def check_resume(path: str | Path, columns: list[str]) -> None:
        """Before anything is written: a table at ``path`` that ``--resume`` would append to has ``columns``
        (VideoError otherwise; the run stops before its JSONL output is opened)."""
        path = Path(path)
        if not (path.is_file() and path.stat().st_size > 0):
            return
        if path.suffix.lower() == ".parquet":
            try:
                import pyarrow.parquet as pq

                found = list(pq.read_schema(path).names)
            except Exception:  # not installed, or a cut file: opening the writer says which, as it always did
                return
            _check_table_columns(path, found, columns)
        else:
            _scan_csv_table(path, columns)  # damage that --resume cannot mend stops the run before any image

    def _input_key(self, row: dict[str, Any]) -> tuple[str, ...]:
        # a CSV reads an empty cell as "", Parquet as None: both are "no value"
        return tuple("" if row.get(c) is None else str(row.get(c)) for c in self._input_columns)

    def _key(self, row: dict[str, Any]) -> tuple[str, ...]:
        return (*self._input_key(row), str(row.get("frame")), str(row.get("track_id")))

    def has_rows_of(self, row: dict[str, Any]) -> bool:
        """Whether the table already held rows of the input that ``row`` names (its ``video``, ``context`` and
        ``meta.*`` cells) when this run opened it (resume)."""
        prefix = self._input_key(row)
        return any(key[:len(prefix)] == prefix for key in self._existing)

    def _cannot_write(self, e: OSError) -> OSError:
        """A full disk or a lost mount, said as the JSONL output says it: which file, and what is kept."""
        return OSError(e.errno, f"{safe_text(os.fspath(self._target))}: cannot write the frame table "
                                f"({os_reason(e)}); the rows written before are kept: make room and run again with "
                                f"--resume")

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self._existing:
            rows = [r for r in rows if self._key(r) not in self._existing]
        try:
            if not self.parquet:
                for r in rows:
                    self._w.writerow({k: ("" if v is None else v) for k, v in r.items()})
                return
            self._buf.extend(rows)
            if len(self._buf) >= 2000:
                self._flush()
        except OSError as e:
            self._write_failed = True
            raise self._cannot_write(e) from None

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buf:
            return
        table = pa.Table.from_pylist(self._buf, schema=self._schema())
        if self._pq_writer is None:
            self._pq_writer = pq.ParquetWriter(str(self.path), table.schema)
        self._pq_writer.write_table(table)
        self._buf = []

    def _schema(self) -> Any:
        import pyarrow as pa

        types = {"video": pa.string(), "context": pa.string(), "frame": pa.int64(), "track_id": pa.int64(),
                 "key_moment": pa.bool_()}
        return pa.schema([(c, pa.string() if c.startswith("meta.") else types.get(c, pa.float64()))
                          for c in self.columns])

    def close(self) -> None:
        try:
            self._close()
        except OSError as e:
            if not self._write_failed:  # else it would hide the message that names the file
                raise self._cannot_write(e) from None

    def _close(self) -> None:
        if self.parquet:
            self._flush()
            if self._pq_writer is None:  # no face in the whole video: still write the (empty) table
                import pyarrow.parquet as pq

                pq.write_table(self._schema().empty_table(), str(self.path))
            else:
                self._pq_writer.close()
            if self.path != self._target:
                os.replace(self.path, self._target)
        else:
            self._fh.close()
