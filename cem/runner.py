"""The one runner: inputs -> batches through the pipeline -> JSONL (+ table) -> summary and exit status.

The CLI (``cem annotate``), notebooks (``Pipeline.annotate``) and engines call :func:`annotate`. It expands
inputs (files, folders, globs, CSV manifests, a context file), runs the FER stage serially or in worker
processes, reasons in batches of the reasoner's ``batch_size`` (an openai reasoner's batch covers its
``concurrency``), writes one record per input through :class:`cem.sinks.JsonlSink` (lock, resume, valid
JSON), regenerates the ``--csv`` table from the whole JSONL, and summarises.

Exit status (``RunSummary.exit_code``): 0 when the run finished, even if some inputs failed (each has an
error record); 2 for unusable arguments, configuration or output (raised as :class:`RunError` before any
record is written); 3 when the reasoner failed on every face, after writing the records, whose emotions
are then the expression model's alone.

Manifest columns other than ``image`` and ``context`` are carried into each record under ``meta`` (a
column named like a record field, e.g. ``track_id`` or ``faces``, can never overwrite it).

Subject baselines: a manifest column ``subject`` names the person in each photo; their AUs are then measured
against that person's own resting face (:meth:`cem.pipeline.Pipeline.baseline`), built from the photos whose
optional boolean column ``neutral`` is true, else from the median of all of that subject's photos (at least
``cem.fer.aus.MEDIAN_MIN_PHOTOS`` with a face; fewer are measured against the average face, with a note). With
neutral photos the expression distribution is measured against them as well (``ExpressionModel.relative_to``).
``provenance.baseline`` records which ("<subject>: neutral (n photos)" or "<subject>: median of n photos").
Such photos are measured in this process (not in worker processes).

Videos: each video's key moments are written as they are found; when the video is finished, one summary
record (``video``, ``video_summary: {frames, moments, complete: true}``) marks it done. ``--resume``
skips videos with a summary (or an error record), re-runs an interrupted one from the start without
writing again the moments and frame rows it already has, and never truncates the frame table.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cem.config import Config
from cem.io import (
    NEUTRAL_COLUMN,
    SUBJECT_COLUMN,
    InputError,
    InputItem,
    InputSet,
    collect_inputs,
    read_context_csv,
)
from cem.sinks import (
    ExistingOutput,
    JsonlSink,
    OutputError,
    OutputLock,
    holds_something,
    input_key,
    moment_key,
    safe_text,
    table_format,
)

PROGRESS_MIN_IMAGES = 5
# names of tables, not of JSON lines: refused as the records' output
_TABLE_NAME_REFUSAL = ("{out}: the output holds the run's JSON-lines records; name it .jsonl (the per-face table "
                       "is written beside it: --csv / csv=, or cem table afterwards; records as Parquet: the Ray "
                       "engine)")
TABLE_SUFFIXES = frozenset({".parquet", ".pq", ".csv", ".tsv", ".xlsx", ".xls", ".feather", ".arrow"})
_TRUE, _FALSE = frozenset({"1", "true", "yes", "y"}), frozenset({"", "0", "false", "no", "n"})


class RunError(RuntimeError):
    """A run that cannot start (unusable inputs, configuration or output); ``exit_code`` is 2."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunSummary:
    """What a run did. ``lines()`` is the summary printed on stderr."""

    output: Path
    images: int = 0  # records of images written by this run
    faces: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # images with an error, by problem
    reasoner_failed: Counter[str] = field(default_factory=Counter)  # faces whose reasoner failed, by cause
    skipped: int = 0  # inputs already in the output (--resume)
    rejected: int = 0  # lines of the output moved to OUT.rejected (--resume)
    duplicates: int = 0  # of those, second records of an input already recorded
    repaired: bool = False  # a half-written last record was completed or moved away
    videos: int = 0
    videos_only: bool = False  # the run's inputs were videos alone (no image line to give, done or skipped)
    moments: int = 0
    frames: int = 0
    notes: list[str] = field(default_factory=list)  # inputs that gave nothing, skipped duplicate rows, ...
    retried: int = 0  # error records removed to be done again (--retry-errors)
    elapsed_s: float = 0.0
    video_s: float = 0.0  # of elapsed_s, the time spent on videos (the image rate leaves it out)
    table: Path | None = None
    exit_code: int = 0
    planned: list[str] = field(default_factory=list)  # --dry-run: the inputs that would be processed

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    def lines(self) -> list[str]:
        out = [f"cem: {note}" for note in self.notes]
        if self.rejected:
            unreadable = self.rejected - self.duplicates
            what = ", ".join(p for p in (f"{unreadable} unreadable" if unreadable else "",
                                         f"{self.duplicates} a second record of an input already recorded"
                                         if self.duplicates else "") if p)
            out.append(f"cem: {self.rejected} line(s) of {self.output} ({what}) were moved to "
                       f"{self.output}.rejected")
        if self.skipped:
            out.append(f"cem: {self.skipped} input(s) already in {self.output} were skipped (--resume)")
        image_s = max(self.elapsed_s - self.video_s, 0.0)
        rate = self.images / max(image_s, 1e-9)
        if self.images or not (self.videos or self.videos_only):  # a run of videos alone has no image line
            out.append(f"cem: {self.images} images, {self.faces} faces, {self.n_errors} errors in "
                       f"{image_s:.1f} s ({rate:.1f} images/s) -> {self.output}")
        elif self.n_errors:
            out.append(f"cem: {self.n_errors} errors -> {self.output}")
        out += [f"  {n} x {kind}" for kind, n in self.errors.most_common()]
        if self.videos:
            out.append(f"cem: {self.videos} video(s), {self.frames} frames, {self.moments} key moments"
                       + ("" if self.images else f" -> {self.output}"))
        failed = sum(self.reasoner_failed.values())
        if failed:
            causes = ", ".join(f"{n} x {c}" for c, n in self.reasoner_failed.most_common())
            again = "; --resume --retry-errors does those photos again" if self.images else ""
            out.append(f"cem: the reasoner failed on {failed} of {self.faces + self.moments} faces ({causes}){again}")
        if self.exit_code == 3:
            out.append("cem: the reasoner failed on every face: the emotions in these records are the expression "
                       "model's alone (exit status 3)")
        if self.table:
            out.append(f"cem: table of every record in {self.output} -> {self.table}")
        return out


def problem_kind(record: dict[str, Any]) -> str:
    """The problem of an error record, without the input's name (which may itself contain ': ')."""
    error = str(record.get("error") or "")
    image = str(record.get("image") or "")
    if image and error.startswith(image + ": "):
        error = error[len(image) + 2:]
    return re.split(r" \(|: ", error, maxsplit=1)[0] or "error"


def _reasoner_cause(face: dict[str, Any]) -> str | None:
    from cem.pipeline import reasoner_failure_cause

    return reasoner_failure_cause(face.get("error"))


def preflight(config: Config) -> tuple[bool, Any]:
    """For a reasoner other than rules, the pre-flight check (model or server reachable) before any image;
    raises :class:`RunError` with its one-screen text when it fails. Returns (whether it ran, the reasoner it
    built, which the run uses rather than loading the model again); (False, None) when this installation has no
    pre-flight module (the caller then loads the model first, which fails with the same clarity)."""
    if config.reasoner.backend == "rules":
        return True, None  # needs nothing beyond the packaged FER models
    if importlib.util.find_spec("cem.preflight") is None:
        return False, None
    from cem.preflight import preflight as check

    report = check(config)
    if not report.ok:
        raise RunError(report.text)
    return True, report.reasoner



class BestEffortStream:
    """stderr for progress bars and notes, written on a best-effort basis: when stderr is closed or its
    reader has gone (``2>&1 | head``, a quit pager, a killed ``tee``), writing stops quietly and the run
    goes on; the records are what matters."""

    def __init__(self) -> None:
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                sys.stderr.write(text)
            except (OSError, ValueError, AttributeError):  # closed, broken pipe, or no stderr at all
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                self.broken = True

    def isatty(self) -> bool:
        try:
            return not self.broken and sys.stderr.isatty()
        except (OSError, ValueError, AttributeError):
            return False

class Runner:
    """One run's state; :func:`annotate` is the entry point."""

    def __init__(self, config: Config, pipeline: Any = None, *, workers: int = 1, faces: str | None = None,
                 landmarks: bool = False, progress: bool = True, image_timeout_s: float | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.config, self.pipeline = config, pipeline
        self.workers, self.faces, self.landmarks, self.progress = workers, faces, landmarks, progress
        self.image_timeout_s = image_timeout_s
        self.echo = echo or (lambda s: print(s, file=sys.stderr))
        self._own_pipeline = pipeline is None
        self.reasoner: Any = None  # the pre-flight's, with its model loaded: the pipeline built here takes it
        self.subjects: dict[str, list[InputItem]] = {}  # subject -> their photos (all inputs of the run)
        # subject -> (baseline, its provenance.baseline text); (None, why) where none could be built
        self._baselines: dict[str, tuple[Any, str]] = {}
        self.notes: list[str] = []  # for the run summary (subjects without a usable baseline)
        # photos measured (without a baseline) to build their subject's median baseline, until their turn
        self._premeasured: dict[str, Any] = {}

    def plan_subjects(self, items: list[InputItem]) -> None:
        """Group the photos by the manifest's ``subject`` column (a bad ``neutral`` cell is that photo's error)."""
        for it in items:
            subject = (it.extra.get(SUBJECT_COLUMN) or "").strip()
            if not subject or it.error is not None:
                continue
            flag = (it.extra.get(NEUTRAL_COLUMN) or "").strip().lower()
            if flag not in _TRUE | _FALSE:
                it.error = (f"{it.path}: column {NEUTRAL_COLUMN!r} must be true or false (1/0, yes/no), "
                            f"got {it.extra[NEUTRAL_COLUMN]!r}")
                continue
            self.subjects.setdefault(subject, []).append(it)

    @staticmethod
    def _subject(it: InputItem) -> str | None:
        return (it.extra.get(SUBJECT_COLUMN) or "").strip() or None

    def _baseline(self, subject: str) -> tuple[Any, str]:
        """(baseline, its provenance.baseline text) of a subject, built once from their photos (each loaded and
        measured in turn). A photo that cannot be loaded, or shows no face, does not count (it gets its own
        error record as an input); when no photo can be used the subject's photos are measured against the
        average face, as without a subject column, and ``(None, why)`` says so in their records."""
        if subject not in self._baselines:
            from cem.fer.aus import TooFewPhotosError

            rows = self.subjects.get(subject, [])
            photos = list({it.path: it for it in rows}.values())  # each file once
            # a photo is neutral when any of its rows says so (the row order decided it)
            flagged = {it.path for it in rows if (it.extra.get(NEUTRAL_COLUMN) or "").strip().lower() in _TRUE}
            neutral = [it for it in photos if it.path in flagged]
            use = neutral or photos
            unreadable: list[str] = []
            try:
                if neutral:
                    base = self.pipeline.baseline([it.path for it in use], self.faces, neutral=True,
                                                  unreadable=unreadable)
                else:  # the median of all their photos: each is measured once, here, and kept for its own record
                    measured = {it.path: self.pipeline.measure(it.path, self.faces, keep_pixels=False) for it in use}
                    unreadable = [m.error for m in measured.values() if m.error is not None]
                    if not self.pipeline.needs_pixels:  # a reasoner that reads pixels needs the photo again anyway
                        self._premeasured.update(measured)
                    base = self.pipeline.median_baseline(list(measured.values()))
            except TooFewPhotosError as e:  # a median that would be mostly the photo measured itself
                self._baselines[subject] = (None, f"{subject}: none ({e}); measured against the average face")
                self.notes.append(f"subject {subject!r}: no baseline: {e}; their photos are measured against "
                                  f"the average face")
            except ValueError as e:
                kind = "neutral photo" if neutral else "photo"
                why = "; ".join(unreadable) or str(e)
                self._baselines[subject] = (None, f"{subject}: none (no usable {kind}: {why}); measured against "
                                                  f"the average face")
                self.notes.append(f"subject {subject!r}: no baseline could be built (no {kind} of theirs shows a "
                                  f"usable face); their photos are measured against the average face")
            else:
                self._baselines[subject] = (base, base.describe(subject, len(use)))
        return self._baselines[subject]

    def baseline_changes(self, existing: Any) -> list[str]:
        """Notes for subjects whose baseline in this run differs from the one their photos done in an earlier run
        (resume) were measured against: a photo added, fixed or retried since (--retry-errors) changes it."""
        notes = []
        for subject, (_, text) in self._baselines.items():
            done = [it for it in self.subjects.get(subject, [])
                    if input_key(it.path, it.context, it.extra) in existing.keys]
            if done and text not in existing.baselines:
                notes.append(f"subject {subject!r}: {len(done)} photo(s) done in an earlier run were measured against "
                             f"another baseline than this run's ({text}); their records are kept as they are (each "
                             f"says which in provenance.baseline); to measure all against one, run the subject's "
                             f"photos into a new output")
        return notes

    def build(self, need_fer: bool) -> Any:
        if self.pipeline is None:
            from cem.pipeline import Pipeline

            try:
                self.pipeline = Pipeline(self.config, load_fer=need_fer, reasoner=self.reasoner)
            except Exception as e:  # a model or configuration that cannot be used: one message, exit 2
                from cem.signals import is_interrupt

                if is_interrupt(e):  # Ctrl-C while the models loaded (MediaPipe's start-up calls back into Python)
                    raise KeyboardInterrupt from None
                raise RunError(f"{type(e).__name__}: {e}") from None
        return self.pipeline

    def close(self) -> None:
        if self._own_pipeline and self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    # ---- images -------------------------------------------------------------------------------------
    def _measured(self, items: list[InputItem]) -> Iterator[tuple[InputItem, Any]]:
        """(item, MeasuredImage) once per item: from worker processes or this one; an item that already carries
        an error (found while expanding the inputs) is not loaded at all. In input order, except that with
        workers the images finished behind a slow one come first (:mod:`cem.parallel`); an item measured here
        (an error, a subject's photo) then comes right before the next pooled item that follows it."""
        from cem.parallel import DEFAULT_IMAGE_TIMEOUT_S, WorkerPool, WorkerStartError
        from cem.pipeline import MeasuredImage

        keep = self.pipeline.needs_pixels
        pooled = [pos for pos, it in enumerate(items) if it.error is None and self._subject(it) is None]
        # one image runs here, unless a time limit was asked for: only a worker process can be stopped
        if self.workers > 1 and (len(pooled) > 1 or (pooled and self.image_timeout_s is not None)):
            pool = WorkerPool(self.config, self.workers, self.faces, keep,
                              self.image_timeout_s or DEFAULT_IMAGE_TIMEOUT_S)
            source: Iterator[tuple[int, Any]] = pool.measure([items[pos].path for pos in pooled])
        else:
            source = ((i, self.pipeline.measure(items[pos].path, self.faces, keep_pixels=keep))
                      for i, pos in enumerate(pooled))
        here = iter(pos for pos, it in enumerate(items) if it.error is not None or self._subject(it) is not None)
        pending_here = next(here, None)

        def measured_here(until: int) -> Iterator[tuple[InputItem, Any]]:
            nonlocal pending_here
            while pending_here is not None and pending_here < until:
                it = items[pending_here]
                subject = self._subject(it)
                if it.error is not None:
                    yield it, MeasuredImage(it.path, None, [], {}, it.error)
                else:
                    assert subject is not None
                    base, name = self._baseline(subject)
                    pre = self._premeasured.pop(it.path, None)
                    yield it, (self.pipeline.against(pre, base, name) if pre is not None else
                               self.pipeline.measure(it.path, self.faces, keep_pixels=keep, baseline=base,
                                                     baseline_name=name))
                pending_here = next(here, None)

        try:
            for i, m in source:
                yield from measured_here(pooled[i])
                yield items[pooled[i]], m
            yield from measured_here(len(items))
        except WorkerStartError as e:
            raise RunError(f"a worker could not start: {e}") from None

    def run_images(self, items: list[InputItem], sink: JsonlSink, summary: RunSummary) -> None:
        pipe = self.pipeline
        bar = None
        if self.progress and len(items) > PROGRESS_MIN_IMAGES:
            from tqdm import tqdm

            bar = tqdm(total=len(items), unit="img", file=BestEffortStream(), dynamic_ncols=True)
        size = pipe.batch_size
        chunk: list[tuple[InputItem, Any]] = []

        def flush() -> None:
            results = list(pipe.reason_many([m for _, m in chunk], [it.context for it, _ in chunk]))
            for result in results:
                # off the batch before it is written: a Ctrl-C (or SIGTERM) while the batch is written then
                # flushes only what is left (it wrote the whole batch again: up to 31 duplicate records); one
                # stopped between here and the write is not written at all, and --resume does it
                it, _ = chunk.pop(0)
                result.meta = dict(it.extra) or None
                self._count(sink.write_result(result, landmarks=self.landmarks), summary)
                if bar is not None:
                    bar.update(1)
            chunk.clear()

        try:
            for it, m in self._measured(items):
                chunk.append((it, m))
                if len(chunk) >= size:
                    flush()
            if chunk:
                flush()
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: images measured and waiting for their reasoning batch are written when that
            # costs nothing (the rules reasoner), not lost; a model reasoner's batch would make the stop wait
            if chunk and self.config.reasoner.backend == "rules":
                flush()
            raise
        finally:
            if bar is not None:
                bar.close()

    @staticmethod
    def _count(rec: dict[str, Any], summary: RunSummary) -> None:
        summary.images += 1
        summary.faces += len(rec["faces"])
        if rec.get("error"):
            summary.errors[problem_kind(rec)] += 1
        for face in rec["faces"]:
            cause = _reasoner_cause(face)
            if cause:
                summary.reasoner_failed[cause] += 1

    # ---- videos -------------------------------------------------------------------------------------
    def run_videos(self, items: list[InputItem], sink: JsonlSink, summary: RunSummary, frames: Path | None,
                   every: int | None, fps: float | None, resume: bool) -> None:
        from cem.video import FrameTableWriter, VideoError

        table = None
        meta_columns, columns = self.frame_table_columns(items)
        if frames is not None:
            try:
                table = FrameTableWriter(frames, columns, resume=resume)
            except (VideoError, OSError) as e:
                raise RunError(f"--frames {frames}: {e}") from None
        try:
            for it in items:
                if input_key(it.path, it.context, it.extra) in sink.existing.videos_done:
                    summary.skipped += 1
                    first_row = {"video": safe_text(it.path), "context": it.context,
                                 **{f"meta.{k}": v for k, v in it.extra.items()}}
                    if table is not None and not table.has_rows_of(first_row):
                        self.echo(f"cem: note: {safe_text(it.path)} was finished in an earlier run (--resume), so "
                                  f"its frames are not in {frames}; run it without --resume into a new output "
                                  f"for its frame table")
                    continue
                self._run_video(it, sink, summary, table, every, fps, meta_columns)
        finally:
            if table is not None:
                table.close()

    def frame_table_columns(self, videos: list[InputItem]) -> tuple[list[str], list[str]]:
        """(the manifest columns of the frame table, all its columns). The manifest columns tell the rows of one
        video under two manifest rows apart (two raters, two conditions)."""
        from cem.contract import AU_NAMES, frame_columns

        meta_columns = list(dict.fromkeys(k for it in videos for k in it.extra))
        return meta_columns, frame_columns(self.config.labels, list(AU_NAMES), meta_columns)

    def _run_video(self, it: InputItem, sink: JsonlSink, summary: RunSummary, table: Any, every: int | None,
                   fps: float | None, meta_columns: list[str]) -> None:
        from cem.contract import AU_NAMES, error_record, video_summary_record
        from cem.video import DecodeStats, VideoError, frame_count, frame_rows, sampling_label

        pipe = self.pipeline
        labels, aus = self.config.labels, list(AU_NAMES)
        shown = safe_text(it.path)
        start, n_frames, n_moments = time.perf_counter(), 0, 0
        size: tuple[int | None, int | None] = (None, None)
        meta = dict(it.extra) or None
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=frame_count(it.path), unit="frame", file=BestEffortStream(), dynamic_ncols=True,
                       desc=Path(shown).name)
        summary.videos += 1
        stats = DecodeStats()
        try:
            for vf in pipe.analyze_video(it.path, it.context, every=every, fps=fps, meta=meta, stats=stats,
                                         landmarks=self.landmarks):
                n_frames += 1
                size = (vf.width, vf.height)
                if bar is not None:
                    bar.n = vf.frame + 1  # frames decoded so far, sampled or not
                    if n_frames % 10 == 0:
                        bar.refresh()
                if table is not None:
                    table.write(frame_rows(vf, labels, aus, shown, context=it.context, meta=it.extra,
                                           meta_columns=meta_columns))
                for rec in vf.moments:
                    n_moments += 1
                    key = moment_key(shown, it.context, rec["frame"], rec["track_id"], it.extra)
                    if key in sink.existing.moments:  # written before an interruption
                        continue
                    written = sink.write(rec)
                    summary.moments += 1
                    for face in written["faces"]:
                        cause = _reasoner_cause(face)
                        if cause:
                            summary.reasoner_failed[cause] += 1
        except VideoError as e:
            rec = sink.write(error_record(it.path, str(e), pipe.provenance(), it.context, meta, video=it.path))
            summary.errors[problem_kind(rec)] += 1
            self.echo(f"cem: {safe_text(str(e))}")
            return
        finally:
            if bar is not None:
                bar.n = max(bar.n, stats.decoded)  # the frames after the last sampled one were decoded too
                bar.close()
        summary.frames += n_frames
        sink.write(video_summary_record(it.path, frames=n_frames, moments=n_moments, provenance=pipe.provenance(),
                                        width=size[0], height=size[1], context=it.context, meta=meta,
                                        complete=not stats.cut_short, frames_decoded=stats.decoded,
                                        frames_declared=stats.declared, frame_sampling=sampling_label(every, fps)))
        el = time.perf_counter() - start
        summary.video_s += el
        self.echo(f"cem: {shown}: {n_frames} frames in {el:.1f} s ({n_frames / max(el, 1e-9):.1f} frames/s), "
                  f"{n_moments} key moments")
        if stats.cut_short:
            note = (f"{shown}: the file ended after {stats.decoded} of the {stats.declared} frames it declares (cut "
                    f"or damaged); the frames before were processed and its summary record says complete: false")
            summary.notes.append(note)


def _check_resumed_videos(videos: list[InputItem], existing: ExistingOutput, every: int | None, fps: float | None,
                          out: str | os.PathLike) -> None:
    """Refuse to resume a video that an earlier run left unfinished at another frame sampling (its key moments
    would mix two samplings: smoothing, baselines and intervals all depend on it). Finished videos are skipped
    whatever the sampling, and records of a cem that did not write ``frame_sampling`` are not compared."""
    from cem.video import sampling_label

    now = sampling_label(every, fps)
    for it in videos:
        key = input_key(it.path, it.context, it.extra)
        if key in existing.videos_done:
            continue
        before = existing.moment_sampling.get(key, set()) - {now}
        if before:
            raise RunError(f"--resume: {safe_text(it.path)} was begun in {safe_text(os.fspath(out))} sampling "
                           f"{' and '.join(sorted(before))}, and this run samples {now}; resume with the same "
                           f"--every/--fps, or write a new output")


def _note_other_names(runner: Runner, todo: list[InputItem], existing: ExistingOutput,
                      out: str | os.PathLike) -> None:
    """Say when inputs about to be annotated look like files the output holds under another name (an absolute
    and a relative path, a link): names are compared as written (:func:`cem.io.path_key`), since a record's
    relative name means the folder its run started in, so they are annotated again."""
    from cem.io import same_file
    from cem.sinks import meta_key

    held = {(same_file(k[0]), k[1], k[2]) for k in existing.keys if isinstance(k[0], str) and "://" not in k[0]}
    other = sum(1 for it in todo if (same_file(it.path), it.context, meta_key(it.extra)) in held)
    if other:
        runner.echo(f"cem: note: {other} input(s) seem to be files that {safe_text(os.fspath(out))} holds under "
                    f"another name (an absolute or a relative path, a link; resolved from this folder); names are "
                    f"compared as written, so they are annotated again: name them as before to skip them")


def _input_list(inputs: Any) -> list[str | os.PathLike]:
    """``inputs`` as a list: one path (a str or PathLike: a file, folder, glob or manifest) is one input; a str
    was iterated character by character ("photos/" annotated the whole file system from "/")."""
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs]
    if isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be a path or a list of paths (files, folders, globs, CSV manifests), not "
                        f"{type(inputs).__name__}")
    items = list(inputs)
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"inputs must be paths (str or os.PathLike), not {type(item).__name__} ({item!r:.80})")
    return items


def _expand(inputs: Iterable[str | os.PathLike], contexts: Mapping[str, str] | None, context: str | None,
            context_file: str | os.PathLike | None) -> InputSet:
    try:
        table = read_context_csv(context_file) if context_file else contexts
        return collect_inputs(inputs, table, context)
    except InputError as e:
        raise RunError(str(e)) from None


def annotate(pipeline_or_config: Any, inputs: str | os.PathLike | Iterable[str | os.PathLike],
             out: str | os.PathLike, *,
             resume: bool = False, workers: int = 1, csv: str | os.PathLike | None = None,
             contexts: Mapping[str, str] | None = None, context: str | None = None,
             context_file: str | os.PathLike | None = None, landmarks: bool = False, progress: bool = True,
             faces: str | None = None, limit: int | None = None, dry_run: bool = False,
             frames: str | os.PathLike | None = None, every: int | None = None, fps: float | None = None,
             engine: str = "local", image_timeout_s: float | None = None, retry_errors: bool = False,
             overwrite: bool = False, echo: Callable[[str], None] | None = None) -> RunSummary:
    """Annotate ``inputs`` into the JSONL file ``out``; returns a :class:`RunSummary` (its ``exit_code``
    is 0 or 3). Raises :class:`RunError` (exit status 2) before writing anything when the inputs, the
    configuration or the output cannot be used.

    ``pipeline_or_config``: a built :class:`~cem.pipeline.Pipeline` (notebooks) or a
    :class:`~cem.config.Config` (the CLI: models then load only when there is work). ``inputs``: one path
    or a list of them: files, folders (recursive), globs, CSV manifests (``image``, optional ``context``,
    extra columns -> ``meta``).
    ``contexts``/``context_file``: contexts by image path or file name; ``context``: for every other image.
    ``resume``: skip inputs already in ``out`` (by image, context and manifest columns), append the rest;
    ``overwrite``: replace an ``out`` that holds records (without it, or ``resume``, such a run is refused);
    ``retry_errors`` (with ``resume``): the inputs of this run whose record in ``out`` is an error (a timeout, a
    file that was missing or unreadable, a worker that crashed) or has a face on which the reasoner failed (its
    server down or slow, an invalid answer) are done again, and those records removed.
    ``workers``: FER processes (each with ``cores // workers`` torch threads); reasoning stays in this process, batched.
    ``csv``: afterwards, the per-face table of every record in ``out`` (.csv or .parquet). ``landmarks``:
    the 478-point mesh in each face. ``image_timeout_s``: with workers, an image taking longer becomes an
    error record. ``frames``/``every``/``fps``: video options. ``echo``: where messages go (stderr).
    """

    inputs = _input_list(inputs)
    if image_timeout_s is not None and workers < 2:
        raise RunError("--image-timeout applies to --workers 2 or more: an image's time limit needs a worker "
                       "process that can be stopped; add --workers 2")
    if engine != "local":
        raise RunError(f"engine {engine!r} is not available in this installation (available: local)")
    if isinstance(pipeline_or_config, Config):
        config, pipeline = pipeline_or_config, None
    else:
        config, pipeline = pipeline_or_config.config, pipeline_or_config
    if os.fspath(out) == "-":  # as many tools spell standard output: it made a file named "-"
        raise RunError("-o -: cem writes its records to a file (locked while it runs, and --resume continues it), "
                       "not to standard output; give a file name (and `cat` it)")
    out = Path(out)
    if _named_as_table(out) and not out.exists():  # (an existing file may be an input: checked with them)
        raise RunError(_TABLE_NAME_REFUSAL.format(out=safe_text(os.fspath(out))))
    if resume and overwrite:
        raise RunError("--resume continues OUTPUT and --overwrite replaces it: give one of them")
    if retry_errors and not resume:
        raise RunError("--retry-errors applies to --resume (a new run does every input anyway): add --resume")
    if csv is not None and frames is not None and _same_file(csv, frames):
        raise RunError(f"--csv {csv} and --frames {frames} are the same file (the face table would replace the "
                       f"frame table); give two files")
    # each streamed output is locked through OUT.lock beside it, removed at the end: no output may be one of them
    locks = {os.path.realpath(p) + ".lock": flag for flag, p in (("the output", out), ("--frames", frames))
             if p is not None}
    for flag, path in (("-o", out), ("--csv", csv), ("--frames", frames)):
        if path is not None and os.path.realpath(path) in locks:
            raise RunError(f"{flag} {safe_text(os.fspath(path))} is the lock file of {locks[os.path.realpath(path)]} "
                           f"(removed when the run ends); give another file")
    for flag, other in (("--csv", csv), ("--frames", frames)):
        if other is None:
            continue
        if _same_file(other, out):
            raise RunError(f"{flag} {other} is the JSONL output itself; give another file")
        try:  # checked now, not after every image was annotated
            table_format(other)
        except ValueError as e:
            raise RunError(f"{flag} {e}") from None
    runner = Runner(config, pipeline, workers=workers, faces=faces, landmarks=landmarks, progress=progress,
                    image_timeout_s=image_timeout_s, echo=echo)
    try:
        return _run(runner, inputs, out, resume=resume, csv=csv, contexts=contexts, context=context,
                    context_file=context_file, limit=limit, dry_run=dry_run, frames=frames, every=every, fps=fps,
                    retry_errors=retry_errors, overwrite=overwrite)
    finally:
        runner.close()


def _named_as_table(out: Path) -> bool:
    """Whether ``out`` is named as a table (``x.parquet``, ``x.csv.gz``), not as the run's JSON lines."""
    suffixes = [x.lower() for x in out.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in TABLE_SUFFIXES


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: hard or symbolic links and relative spellings of it, or, where one
    does not exist yet, one real path (a link to the output's folder: abspath alone let a table overwrite the
    records)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _refuse_outputs_that_are_inputs(sources: list[str], outputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Writing an output over one of the run's own inputs (an image, a manifest, the context file) would
    destroy it before it is read: refused before anything is opened for writing."""
    for what, target in outputs.items():
        if target is None or not os.path.exists(target):
            continue
        for src in sources:
            if _same_file(src, target):
                raise RunError(f"{what} {safe_text(os.fspath(target))} is also an input of this run "
                               f"({safe_text(src)}); writing it would destroy that input: give another file")


def _run(runner: Runner, inputs: Iterable[str | os.PathLike], out: Path, *, resume: bool,
         csv: str | os.PathLike | None, contexts: Mapping[str, str] | None, context: str | None,
         context_file: str | os.PathLike | None, limit: int | None, dry_run: bool,
         frames: str | os.PathLike | None, every: int | None, fps: float | None,
         retry_errors: bool = False, overwrite: bool = False) -> RunSummary:
    from cem.video import check_sampling, is_video

    config, workers = runner.config, runner.workers
    given = runner.pipeline is not None
    # an unusable model or server stops the run before anything else; a pipeline given has its model loaded
    # already (checking it again would load a second copy)
    if not dry_run and not (given and config.reasoner.backend == "transformers"):
        checked, reasoner = preflight(config)
        if not given:
            runner.reasoner = reasoner  # the pipeline built for this run takes it: the model loads once
        if not checked:
            runner.build(need_fer=workers == 1)
    found = _expand(inputs, contexts, context, context_file)
    if found.nothing_found:
        raise RunError(found.problem())
    _refuse_outputs_that_are_inputs(
        [os.fspath(p) for p in inputs if os.path.isfile(p)] + [it.path for it in found.items]
        + ([os.fspath(context_file)] if context_file is not None else []),
        {"the output": out, "--csv": csv, "--frames": frames})
    if _named_as_table(out):
        # the records are JSON lines: under a table's name a user's pandas.read_parquet fails on them later
        # (checked after the inputs: `-o manifest.csv` is told it is an input, which says more)
        raise RunError(_TABLE_NAME_REFUSAL.format(out=safe_text(os.fspath(out))))
    if csv is not None and not resume and not overwrite and not dry_run and holds_something(Path(csv)):
        # a file that is not this output's table (a user's keep.csv) must not be replaced unseen
        raise RunError(f"--csv {csv} already exists; --overwrite replaces it (the table is rebuilt from the JSONL "
                       f"output), or give another file")
    summary = RunSummary(out, notes=found.notes + found.duplicates)
    videos = [it for it in found.items if it.error is None and is_video(it.path)]
    if any((it.extra.get(SUBJECT_COLUMN) or "").strip() for it in videos):
        summary.notes.append("a video's 'subject' column is carried under meta only: subject baselines are built "
                             "from photos; in a video each tracked face is measured against its own neutral frames")
    images = [it for it in found.items if not (it.error is None and is_video(it.path))]
    summary.videos_only = bool(videos) and not images
    if frames is not None and not videos:
        raise RunError("--frames applies to video inputs, and none was given (videos in folders are not searched "
                       "for: name them)")
    from cem.parallel import cpu_count

    cores = cpu_count()  # the cores this process may use (taskset, a container's limit), not the machine's
    if workers > cores and not dry_run:
        runner.echo(f"cem: note: --workers {workers} on {cores} CPU core(s): each worker holds its own models (a few "
                    f"hundred MB) and they share the cores, so more workers than cores is slower, not faster")
    if (every is not None or fps is not None) and not videos:
        raise RunError(f"{'--every' if every is not None else '--fps'} applies to video inputs, and none was given")
    try:
        check_sampling(every, fps, ("--every", "--fps"))
    except ValueError as e:
        raise RunError(str(e)) from None
    if videos and (runner.faces or runner.config.faces.mode) == "whole":
        raise RunError("--faces whole does not apply to videos (their faces are detected and tracked); run the "
                       "videos without it")
    # the error records of this run's inputs are done again (--retry-errors); others' stay as they are
    retry = {input_key(it.path, it.context, it.extra) for it in found.items} if retry_errors else frozenset()
    if dry_run:
        from cem.sinks import scan

        if not resume and not overwrite and holds_something(out):
            runner.echo(f"cem: note: {safe_text(os.fspath(out))} already holds records: the run would be refused "
                        f"without --resume (continue it) or --overwrite (replace it)")

        done = scan(out, retry)[0] if resume and out.is_file() else None
        todo = [it for it in images if done is None or input_key(it.path, it.context, it.extra) not in done.keys]
        summary.skipped = len(images) - len(todo)
        summary.planned = [safe_text(it.path) for it in (todo[:limit] if limit is not None else todo) + videos]
        return summary

    frames_lock = None
    if frames is not None and videos:
        # the frame table is streamed as the output is: a second run writing it at the same time would interleave
        # its rows with this run's (or, as a new run, truncate it under this one)
        try:
            frames_lock = OutputLock(Path(frames))
        except OutputError as e:
            raise RunError(f"--frames {e}") from None
    try:  # checked under the lock: a table another run is writing is that run's, whatever it holds now
        if frames is not None and videos and not resume and not overwrite and holds_something(Path(frames)):
            raise RunError(f"--frames {frames} already holds an earlier run's frame table (it cannot be rebuilt "
                           f"from the records); --resume continues it, --overwrite replaces it, or give another file")
        if frames is not None and videos and resume:  # a table that cannot be resumed into stops the run now
            from cem.video import FrameTableWriter, VideoError

            try:
                FrameTableWriter.check_resume(Path(frames), runner.frame_table_columns(videos)[1])
            except VideoError as e:
                raise RunError(f"--frames {frames}: {e}") from None
        try:
            sink = JsonlSink(out, resume=resume, retry=retry, overwrite=overwrite)
        except OutputError as e:
            raise RunError(str(e)) from None
    except BaseException:  # the run ends before its sink is open: the frame table is no longer ours
        if frames_lock is not None:
            frames_lock.release()
        raise
    if resume and videos:  # before anything is said to be done: the run may stop here
        try:
            _check_resumed_videos(videos, sink.existing, every, fps, out)
        except RunError:
            sink.close()
            if frames_lock is not None:
                frames_lock.release()
            raise
    summary.retried = sink.existing.retried
    if sink.existing.retried:  # said now, not in the summary: a run stopped half-way must have said it too
        runner.echo(f"cem: note: --retry-errors: {sink.existing.retried} record(s) with an error are removed from "
                    f"{safe_text(os.fspath(out))} and their inputs done again (a run stopped before the end leaves "
                    f"those not yet done without a record: --resume again)")
    if not resume and holds_something(out):
        runner.echo(f"cem: note: {safe_text(os.fspath(out))} held an earlier run's records and is replaced "
                    f"(--overwrite)")
    try:
        runner.build(need_fer=workers == 1 or bool(videos))
        if sink.existing.made_with:
            from cem.sinks import MADE_WITH, settings_differ

            made = {**runner.pipeline.provenance().to_dict(), "faces": runner.faces or config.faces.mode}
            differ = settings_differ(sink.existing.made_with, tuple(made.get(k) for k in MADE_WITH))
            if differ:  # the records are kept as they are; each says how it was made
                runner.echo(f"cem: note: {safe_text(os.fspath(out))}: {differ}; they are kept as they are and their "
                            f"inputs are not redone (provenance says how each record was made; a new output "
                            f"redoes all)")
        t0 = time.perf_counter()  # the rate counts images, not model loading
        try:
            sink.open()
        except OutputError as e:
            raise RunError(str(e)) from None
        summary.rejected, summary.repaired = len(sink.existing.rejected), sink.existing.repaired_tail
        summary.duplicates = sink.existing.duplicates
        runner.plan_subjects(images)  # every photo of a subject counts for its baseline, done or not
        todo = [it for it in images if input_key(it.path, it.context, it.extra) not in sink.existing.keys]
        summary.skipped = len(images) - len(todo)
        if resume and todo:
            done_without_meta = {k[:2] for k in sink.existing.keys}
            again = sum(1 for it in todo if input_key(it.path, it.context)[:2] in done_without_meta)
            if again:
                runner.echo(f"cem: note: {again} input(s) have records in {safe_text(os.fspath(out))} with other "
                            f"manifest columns (meta); the input is keyed by its image, context and columns, so "
                            f"they are annotated again and both records kept")
            done_images = {k[0] for k in sink.existing.keys}
            other_context = sum(1 for it in todo if input_key(it.path, it.context)[:2] not in done_without_meta
                                and input_key(it.path, it.context)[0] in done_images)
            _note_other_names(runner, todo, sink.existing, out)
            if other_context:
                runner.echo(f"cem: note: {other_context} input(s) have records in {safe_text(os.fspath(out))} "
                            f"under another context; the input is keyed by its image and context, so they are "
                            f"annotated again and both records kept (for a new context alone, write another "
                            f"output)")
        if limit is not None:
            todo = todo[:limit]
        uses_context = getattr(runner.pipeline.reasoner, "uses_context", config.reasoner.backend != "rules")
        if not uses_context and any(it.context for it in todo + videos):
            runner.echo(f"cem: note: the {config.reasoner.backend} reasoner does not use context; contexts are "
                        f"recorded but do not change the emotions")
            runner.pipeline._context_warned = True  # said once here; the pipeline's own warning would repeat it
        if todo:
            runner.run_images(todo, sink, summary)
            summary.notes.extend(runner.notes)
            summary.notes.extend(runner.baseline_changes(sink.existing))
        if videos:
            runner.run_videos(videos, sink, summary, Path(frames) if frames is not None else None, every, fps,
                              resume)
    finally:
        sink.close()
        if frames_lock is not None:
            frames_lock.release()
    if csv is not None:
        from cem.results import write_table  # the one table writer (also `cem table`): every record of `out`

        try:
            written = write_table(out, csv)
            if written.mixed_settings:  # the table pools them: said, as read_results warns
                runner.echo(f"cem: note: {written.mixed_settings}")
        except (OSError, ImportError, ValueError) as e:
            raise RunError(f"--csv {csv}: cannot write the table ({type(e).__name__}: {e})") from None
        summary.table = Path(csv)
    summary.elapsed_s = time.perf_counter() - t0
    if summary.reasoner_failed and sum(summary.reasoner_failed.values()) == summary.faces + summary.moments:
        summary.exit_code = 3
    return summary
