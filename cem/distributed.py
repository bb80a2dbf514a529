"""Annotate on a Ray cluster (or a laptop's local Ray): :func:`annotate`, also ``cem annotate --engine ray``.

The same records as a local run (one per input image, same contract), computed by Ray Data actor pools
(:mod:`cem.engines.ray_engine`) and written by this driver as JSONL shards ``OUT/part-<run>-<n>.jsonl``, then
merged into ``OUT.jsonl`` (or ``OUT.parquet``). Records add ``provenance.node``: the Ray node id that ran the
FER stage for the image. Needs ``pip install 'cem[ray]'``; Ray is imported only when a run starts.

Example:
    ```python
    from cem.distributed import annotate

    summary = annotate(["photos/", "more/*.jpg"], "default", "runs/photos.jsonl", fer_actors=8)
    print(summary.text())

    import ray
    ds = ray.data.read_parquet("s3://bucket/frames.parquet")  # columns: path (str), caption (str)
    annotate(ds, "qwen2vl", "runs/frames.jsonl", image_column="path", context_column="caption",
             reason_actors=4, reason_gpus_per_actor=1)
    ```
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cem.config import Config
from cem.engines.ray_engine import StagePlan
from cem.io import ContextTable
from cem.sinks import input_key, iter_records
from cem.sinks import record_key as sink_key

Key = tuple[str, "str | None", "tuple[tuple[str, str], ...]"]  # image, context, the manifest's other columns
PART_GLOB = "part-*.jsonl"
# the shards this engine writes: part-<UTC time>-<pid>-<n>.jsonl; only those are read, merged or removed, so
# other files in the folder (a user's own part-00000.jsonl) are never taken for shards or deleted
PART_NAME = re.compile(r"part-\d{8}T\d{6}-\d+-\d{5}\.jsonl")


MAX_BLOCKS = 10_000
ACTOR_START_TIMEOUT_S = 900  # loading MediaPipe and the CNN takes seconds; a model on a GPU, minutes


def record_key(record: dict[str, Any]) -> Key:
    """The resume and dedupe key of a record: its image's name in its normal spelling (:func:`cem.io.path_key`;
    its exact bytes, base64, for a name that is not UTF-8), its context and its manifest columns (`meta`); the
    same key as the local runner's (:func:`cem.sinks.record_key`)."""
    image, context, meta = sink_key(record)
    return str(image), context, meta


class KeySet:
    """Keys of the records seen so far, for resume and dedupe.

    A record without a ``context`` field (written by a cem that did not record contexts) stands for its
    image under any context, as that cem's resume treated it.
    """

    def __init__(self) -> None:
        self.keys: set[Key] = set()
        self.images: set[str] = set()
        self.any_context: set[str] = set()

    def add(self, record: dict[str, Any]) -> bool:
        """Add a record's key; False when an equal key was already there (a duplicate)."""
        image, context, meta = record_key(record)
        if "context" not in record:
            dup = image in self.images
            self.any_context.add(image)
        else:
            dup = self.seen(image, context, meta)
            self.keys.add((image, context, meta))
        self.images.add(image)
        return not dup

    def seen(self, image: str, context: str | None, meta: tuple[tuple[str, str], ...] = ()) -> bool:
        return (image, context, meta) in self.keys or image in self.any_context

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class DistributedSummary:
    """What a distributed run did. ``skipped``: inputs already done (resume; None for a Dataset input)."""

    output: Path
    shards: Path
    images: int = 0
    faces: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    reasoner_failed_faces: int = 0
    skipped: int | None = 0
    records: int = 0
    duplicates_dropped: int = 0
    nodes: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # as the local runner's: patterns that matched nothing, ...

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def reasoner_failed_everywhere(self) -> bool:
        """True when the reasoner failed on every face (the CLI's exit status 3)."""
        return self.faces > 0 and self.reasoner_failed_faces == self.faces

    def text(self) -> str:
        lines = [f"cem: {note}" for note in self.notes]
        lines += [f"cem: {self.images} images, {self.faces} faces, {sum(self.errors.values())} errors in "
                 f"{self.elapsed_s:.1f} s ({self.images_per_s:.1f} images/s) on {len(self.nodes)} node(s)"
                 + (f"; {self.skipped} skipped (already done)" if self.skipped else "")]
        lines += [f"  {n} x {kind}" for kind, n in self.errors.most_common()]
        if self.reasoner_failed_faces:
            lines.append(f"  reasoner failed on {self.reasoner_failed_faces} of {self.faces} faces")
        for node, n in sorted(self.nodes.items()):
            lines.append(f"  node {node[:12]}: {n} images")
        dup = f", {self.duplicates_dropped} duplicate records dropped" if self.duplicates_dropped else ""
        lines.append(f"  -> {self.output} ({self.records} records{dup}); shards in {self.shards}/")
        return "\n".join(lines)


def output_paths(out: str | os.PathLike, output_format: str | None = None) -> tuple[Path, Path, str]:
    """(merged file, shard folder, format).

    ``runs/x.jsonl`` -> shards in ``runs/x/``; ``runs/x`` -> shards in ``runs/x/``, merged into ``runs/x.jsonl``.
    """
    out = Path(out)
    suffix = out.suffix.lower().lstrip(".")
    fmt = output_format or ("parquet" if suffix == "parquet" else "jsonl")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"output_format must be 'jsonl' or 'parquet', got {fmt!r}")
    if suffix in ("jsonl", "parquet"):
        if suffix != fmt:
            raise ValueError(f"{out}: the suffix .{suffix} does not match output_format {fmt!r}")
        merged, shards = out, out.with_suffix("")
    else:
        merged, shards = out.with_name(f"{out.name}.{fmt}"), out
    if shards.exists() and not shards.is_dir():
        raise ValueError(f"{shards}: the shard folder for {merged} exists and is not a folder")
    return merged, shards, fmt


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a shard or merged file, as written; a half-written last line (a crash) is skipped."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["record"]):
            for text in batch.column(0).to_pylist():
                yield json.loads(text)
        return
    yield from iter_records(path)


def _parts(shards: Path) -> list[Path]:
    return sorted(p for p in shards.glob(PART_GLOB) if PART_NAME.fullmatch(p.name)) if shards.is_dir() else []


def _sources(merged: Path, shards: Path, resume: bool) -> list[Path]:
    parts = _parts(shards)
    return ([merged] if resume and merged.is_file() else []) + parts


def _error_kind(error: str) -> str:
    """'path: corrupt or truncated image (detail)' -> 'corrupt or truncated image'."""
    return error.split(": ", 1)[-1].split(" (")[0]


class _ShardWriter:
    """JSONL shards of at most ``size`` records, flushed per batch so a crash loses at most one batch."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.run = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
        self.seq, self.count = 0, 0
        self._fh: IO[str] | None = None

    def write(self, lines: Iterable[str]) -> None:
        for line in lines:
            if self._fh is None or self.count >= self.size:
                self.close()
                self.seq += 1
                self._fh = open(self.folder / f"part-{self.run}-{self.seq:05d}.jsonl", "w", encoding="utf-8")
                self.count = 0
            self._fh.write(line + "\n")
            self.count += 1
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def merge(sources: list[Path], merged: Path, output_format: str = "jsonl") -> tuple[int, int]:
    """Write the records of ``sources`` (in order) to ``merged``, keeping the first record of each key.

    Retried batches and resumed runs can leave the same image twice; the first copy wins, so the result
    does not depend on timing. Written to a temporary file and renamed: a crash leaves the old file intact.
    Returns (records written, duplicates dropped).
    """
    tmp = merged.with_name(merged.name + ".tmp")
    seen = KeySet()
    kept, dropped = 0, 0

    def unique() -> Iterator[dict[str, Any]]:
        nonlocal kept, dropped
        for src in sources:
            for rec in _read_records(src):
                if not seen.add(rec):
                    dropped += 1
                    continue
                kept += 1
                yield rec

    if output_format == "jsonl":
        from cem.sinks import dumps

        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in unique():
                fh.write(dumps(rec) + "\n")
    else:
        _write_parquet(unique(), tmp)
    os.replace(tmp, merged)
    return kept, dropped


def _write_parquet(records: Iterator[dict[str, Any]], path: Path, rows_per_group: int = 10_000) -> None:
    """One row per record: ``image``, ``context``, ``width``, ``height``, ``n_faces``, ``error`` for filtering,
    and ``record``, the full JSON record (lossless; per-face tables come from ``cem table``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("image", pa.string()), ("context", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("n_faces", pa.int64()), ("error", pa.string()),
                        ("record", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        rows: list[dict[str, Any]] = []

        def flush() -> None:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            rows.clear()

        for rec in records:
            rows.append({"image": rec["image"], "context": rec.get("context"), "width": rec.get("width"),
                         "height": rec.get("height"), "n_faces": len(rec.get("faces") or []),
                         "error": rec.get("error"), "record": json.dumps(rec, ensure_ascii=False)})
            if len(rows) >= rows_per_group:
                flush()
        flush()


def _is_ray_dataset(obj: Any) -> bool:
    mod = sys.modules.get("ray.data")
    return mod is not None and isinstance(obj, mod.Dataset)


def annotate(dataset_or_paths: Any, config: Config | str | os.PathLike = "default",
             out: str | os.PathLike = "cem-out.jsonl", *, image_column: str = "image",
             context_column: str | None = "context", name_column: str | None = None, context: str | None = None,
             contexts: ContextTable | Mapping[str, str] | None = None,
             fer_actors: int = 1, fer_cpus_per_actor: float = 1.0, reason_actors: int | None = None,
             reason_cpus_per_actor: float = 1.0, reason_gpus_per_actor: float = 0.0, batch_size: int = 16,
             resume: bool = False, address: str | None = None, output_format: str | None = None,
             shard_size: int = 10_000, limit: int | None = None, overwrite: bool = False) -> DistributedSummary:
    """Annotate images on Ray Data; returns a :class:`DistributedSummary` (``.text()`` prints it).

    Args:
        dataset_or_paths: files, folders, globs and CSV manifests (as ``cem annotate`` takes them), or a
            ``ray.data.Dataset`` with one row per image: ``image_column`` holds a path, encoded image bytes
            or an RGB array; ``context_column`` the context (optional column); ``name_column`` how a
            non-path image is named in its record (default: a ``path`` column, as ``read_binary_files(...,
            include_paths=True)`` gives).
        config: a :class:`~cem.config.Config`, or a config name or YAML path.
        out: ``X.jsonl`` or ``X.parquet`` (merged output; shards in ``X/``), or ``X`` (shards in ``X/``,
            merged into ``X.jsonl``).
        context: the context of rows that have none.
        contexts: for path inputs, contexts by image path (as given, or file name), as ``--context-file``
            gives them; precedence: a manifest's context, then ``contexts``, then ``context``.
        fer_actors, fer_cpus_per_actor: size and CPUs of the FER actor pool (torch threads = CPUs).
        reason_actors: a separate reasoning pool of this size; 0 reasons in the FER actors. Default: 0 for
            the ``rules`` reasoner, 1 otherwise.
        reason_cpus_per_actor, reason_gpus_per_actor: resources of each reasoning actor.
        batch_size: images per actor call (and per reasoning batch).
        resume: skip inputs whose records exist (key: image as named in the record, and context) in the
            shards or the merged output.
        overwrite: replace earlier records (the merged output and old shards of ``out``); without it, or
            ``resume``, a run where such records exist is refused (a forgotten ``--resume`` must not delete
            a stopped run's shards). The merged output is locked for the run, as the local runner's is.
        address: the cluster (``auto``, ``ray://host:10001``); default: the running Ray, else a local one.
        output_format: ``jsonl`` or ``parquet`` (default: from the suffix of ``out``).
        shard_size: records per shard file.
        limit: process at most this many (new) inputs.
    """
    cfg = config if isinstance(config, Config) else Config.load(os.fspath(config))
    merged, shards, fmt = output_paths(out, output_format)
    if reason_actors is None:
        reason_actors = 0 if cfg.reasoner.backend == "rules" else 1
    plan = StagePlan(fer_actors=fer_actors, fer_cpus_per_actor=fer_cpus_per_actor, reason_actors=reason_actors,
                     reason_cpus_per_actor=reason_cpus_per_actor, reason_gpus_per_actor=reason_gpus_per_actor,
                     batch_size=batch_size)
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if resume and overwrite:
        raise ValueError("resume continues the output and overwrite replaces it: give one of them")
    from cem.sinks import OutputError, OutputLock, holds_something

    try:
        merged.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(merged)  # one writer, local or Ray
    except (OutputError, OSError) as e:
        raise ValueError(str(e)) from None
    try:
        earlier = [p for p in [merged, *(_parts(shards) if shards.is_dir() else [])] if holds_something(p)]
        if earlier and not resume and not overwrite:
            raise ValueError(f"{merged} already has records of an earlier run ({len(earlier)} file(s), e.g. "
                             f"{earlier[0]}); --resume continues it (skips what is done), --overwrite replaces it, "
                             f"or write to another output")
        return _annotate_locked(dataset_or_paths, cfg, merged, shards, fmt, plan, resume, contexts, context, limit,
                                shard_size, address, image_column, context_column, name_column)
    finally:
        lock.release()


def _annotate_locked(dataset_or_paths: Any, cfg: Config, merged: Path, shards: Path, fmt: str, plan: StagePlan,
                     resume: bool, contexts: Any, context: str | None, limit: int | None, shard_size: int,
                     address: str | None, image_column: str, context_column: str | None,
                     name_column: str | None) -> DistributedSummary:
    """:func:`annotate` once its output is checked and locked."""
    done = KeySet()
    for src in _sources(merged, shards, resume) if resume else []:
        for rec in _read_records(src):
            done.add(rec)

    summary = DistributedSummary(merged, shards)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if not _is_ray_dataset(dataset_or_paths):  # inputs are checked before anything is removed
        rows, summary.skipped, summary.notes = _path_rows(dataset_or_paths, done, contexts, context, limit)
    shards.mkdir(parents=True, exist_ok=True)
    if not resume:
        for old in _parts(shards):
            old.unlink()
    if rows or _is_ray_dataset(dataset_or_paths):
        _run(dataset_or_paths, rows, cfg, plan, summary, done, shard_size=shard_size, address=address,
             image_column=image_column, context_column=context_column, name_column=name_column, context=context,
             limit=limit)
    # without resume the merged file is replaced by this run's records; with it, earlier records come first
    summary.records, summary.duplicates_dropped = merge(_sources(merged, shards, resume), merged, fmt)
    summary.elapsed_s = time.perf_counter() - t0
    return summary


def _run(source: Any, rows: list[dict[str, Any]], cfg: Config, plan: StagePlan, summary: DistributedSummary,
         done: KeySet, *, shard_size: int, address: str | None, image_column: str, context_column: str | None,
         name_column: str | None, context: str | None, limit: int | None) -> None:
    """Start (or join) Ray, run the plan, and write its records to shards as they arrive."""
    import ray

    from cem.engines.ray_engine import NotDone, build_plan, check_columns, image_column_is_paths

    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    data_context = ray.data.DataContext.get_current()
    saved_wait = data_context.wait_for_min_actors_s
    # start work once every actor has loaded its models (fair shares, and a clear error instead of a
    # hang when the cluster cannot hold the pools); datasets created below capture this setting
    data_context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    # rows are tiny (paths) and the work is CPU-bound: spread batches over all actors, not by locality
    # (Ray 2.60 deprecates the option and manages locality itself; 2.50-2.59, also supported, still read it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        saved_locality = data_context.execution_options.actor_locality_enabled
        data_context.execution_options.actor_locality_enabled = False
    try:
        extra_column: str | None = None
        if rows:
            # a small job still gives every actor a few batches (Ray Data bundles blocks up to batch_size)
            size = max(1, min(plan.batch_size, math.ceil(len(rows) / (4 * plan.fer_actors))))
            plan = dataclasses.replace(plan, batch_size=size)
            blocks = min(math.ceil(len(rows) / size), MAX_BLOCKS)
            ds = ray.data.from_items(rows, override_num_blocks=blocks)
            image_column, context_column, name_column, extra_column = "image", "context", None, "extra"
        else:
            ds = source
            if not image_column_is_paths(ds, image_column):
                name_column = name_column or "path"
                check_columns(ds, [name_column])
            if context_column and context_column not in ds.schema().names:
                if context_column != "context":  # named explicitly: it must be there
                    raise ValueError(f"the dataset has no context column {context_column!r}")
                context_column = None
            summary.skipped = None
            if done:
                ds = ds.filter(NotDone(done, name_column or image_column, context_column, context))
            if limit is not None:
                ds = ds.limit(limit)
        records = build_plan(ds, cfg, plan, image_column=image_column, context_column=context_column,
                             name_column=name_column, extra_column=extra_column, default_context=context)
        writer = _ShardWriter(summary.shards, shard_size)
        try:
            for batch in records.iter_batches(batch_size=None, batch_format="numpy"):
                texts = [str(t) for t in batch["record"]]
                writer.write(texts)
                for text in texts:
                    _tally(summary, json.loads(text))
        finally:
            writer.close()
    finally:
        data_context.wait_for_min_actors_s = saved_wait
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            data_context.execution_options.actor_locality_enabled = saved_locality
        if started:
            ray.shutdown()


def _tally(summary: DistributedSummary, rec: dict[str, Any]) -> None:
    summary.images += 1
    summary.nodes[rec["provenance"].get("node", "?")] += 1
    if rec.get("error"):
        summary.errors[_error_kind(rec["error"])] += 1
    for face in rec.get("faces") or []:
        summary.faces += 1
        if (face.get("error") or "").startswith("reasoner failed"):
            summary.reasoner_failed_faces += 1


def _path_rows(inputs: Any, done: KeySet, contexts: ContextTable | Mapping[str, str] | None, context: str | None,
               limit: int | None) -> tuple[list[dict[str, Any]], int, list[str]]:
    """Files, folders, globs and manifests, expanded as the local runner does (:func:`cem.io.collect_inputs`:
    a manifest's context, else ``contexts``, else ``context``) -> (rows to do, skipped, the notes the local
    runner prints: patterns that matched nothing, repeated manifest rows, ...)."""
    from cem.io import collect_inputs
    from cem.video import is_video

    found = collect_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs), contexts, context)
    if found.nothing_found and (found.items or found.notes):  # inputs were named, and none exists
        raise ValueError(found.problem())
    videos = [it.path for it in found.items if is_video(it.path)]
    if videos:
        raise ValueError(f"{videos[0]}: a video; the Ray engine annotates images (use the local engine for videos)")
    subject = next((it for it in found.items if (it.extra.get("subject") or "").strip()), None)
    if subject is not None:  # measured against the average face here would silently differ from a local run
        raise ValueError(f"{subject.row or subject.path}: a 'subject' column (subject baselines) needs the local "
                         f"engine; the Ray engine measures against the average face")
    rows: list[dict[str, Any]] = []
    for it in found.items:
        image, context, meta = input_key(it.path, it.context, it.extra)
        if not done.seen(str(image), context, meta):
            # "" for no context, never None: a column of strings and nulls reaches the actors' numpy batches
            # as the text "nan" (it was recorded as the context)
            rows.append({"image": it.path, "context": it.context or "",
                         "extra": json.dumps(it.extra) if it.extra else ""})
    return (rows[:limit] if limit is not None else rows), len(found.items) - len(rows), found.notes + found.duplicates
