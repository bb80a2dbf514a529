"""The Ray Data pieces of ``cem annotate --engine ray``: actor pools for the FER and reasoning stages.

Rows flowing through the plan have an image column (a path, encoded image bytes or an RGB array), an
optional context column, an optional name column (how a non-path image is named in its record) and an
optional ``extra`` column (manifest columns as a JSON object). The plan ends in one column, ``record``: the
JSON text of the image's record, exactly as the local runner writes it (:func:`cem.sinks.result_record`;
manifest columns under ``meta``), with ``provenance.node`` (the Ray node id that ran the FER stage) set.

- FER stage: :class:`FERActor`, an actor pool (``map_batches`` with a callable class), so the MediaPipe and
  expression models load once per actor. With a cheap reasoner (``rules``) the actor also reasons and fuses
  (``fuse=True``): shipping pixels to a second pool would cost more than the reasoning.
- Reasoning stage: :class:`ReasonActor`, its own actor pool with its own resources (``num_gpus`` for a
  transformers model), fed pickled :class:`cem.pipeline.MeasuredImage` objects.

Failures: a bad image is an error record (never a lost row); an actor that dies is restarted by Ray and its
unfinished batch is run again (Ray Data's actor pools default to ``max_restarts=-1, max_task_retries=-1``),
so rows are neither lost nor repeated in the stream; the merge step dedupes by key in case a retried batch
was written twice.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cem.config import Config

if TYPE_CHECKING:
    import ray.data

    from cem.distributed import KeySet
    from cem.pipeline import MeasuredImage, Pipeline

# Test hook for fault-tolerance tests: when this variable names a file that exists, the first actor to
# rename it away (atomic, so exactly one) kills its own process while holding its second batch.
KILL_HOOK_ENV = "CEM_RAY_TEST_KILL_ONCE"


@dataclass
class StagePlan:
    """Sizes and resources of the two actor pools.

    ``reason_actors == 0`` reasons inside the FER actors (the right choice for the ``rules`` reasoner).
    ``reason_concurrency`` (openai backend) is the total number of requests in flight over all reasoning
    actors; each actor gets its share.
    """

    fer_actors: int = 1
    fer_cpus_per_actor: float = 1.0
    reason_actors: int = 0
    reason_cpus_per_actor: float = 1.0
    reason_gpus_per_actor: float = 0.0
    batch_size: int = 16
    faces: str | None = None

    def __post_init__(self) -> None:
        if self.fer_actors < 1:
            raise ValueError(f"fer_actors must be at least 1, got {self.fer_actors}")
        if self.reason_actors < 0:
            raise ValueError(f"reason_actors must be 0 (reason in the FER actors) or more, got {self.reason_actors}")
        if self.fer_cpus_per_actor <= 0 or self.reason_cpus_per_actor < 0 or self.reason_gpus_per_actor < 0:
            raise ValueError("CPUs per FER actor must be > 0; CPUs and GPUs per reasoning actor must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _new_pipeline(config: Config, torch_threads: int) -> Pipeline:
    os.environ.setdefault("GLOG_minloglevel", "2")  # this process is ours (an actor): MediaPipe info lines off
    import torch

    torch.set_num_threads(max(1, torch_threads))  # an actor gets N CPUs from Ray: N torch threads
    from cem.pipeline import Pipeline

    return Pipeline(config)


def _open_bytes(data: bytes, name: str, max_pixels: int) -> Any:
    """Encoded image bytes -> a loaded PIL image (EXIF and modes are handled by the pipeline's loader).

    Raises :class:`cem.io.ImageLoadError` naming the input, like a file path that cannot be read.
    """
    from PIL import Image, UnidentifiedImageError

    from cem.io import ImageLoadError

    if not data:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise ImageLoadError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        im.load()
        return im
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({e})") from None


def _text(value: Any) -> str | None:
    """A context cell: None, NaN and empty text mean no context."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value) or None


class _Columns:
    """Reads one batch's columns (numpy batch format) the same way in both actors."""

    def __init__(self, image: str, context: str | None, name: str | None, extra: str | None,
                 default_context: str | None) -> None:
        self.image, self.context, self.name, self.extra = image, context, name, extra
        self.default_context = default_context

    def rows(self, batch: dict[str, np.ndarray]) -> list[tuple[Any, str, str | None, dict[str, Any]]]:
        images = batch[self.image]
        n = len(images)
        contexts = batch[self.context] if self.context and self.context in batch else [None] * n
        names = batch[self.name] if self.name and self.name in batch else [None] * n
        extras = batch[self.extra] if self.extra and self.extra in batch else [None] * n
        out = []
        for img, ctx, nm, ex in zip(images, contexts, names, extras):
            name = str(nm) if nm is not None else str(img) if isinstance(img, str) else "<unnamed image>"
            out.append((img, name, _text(ctx) or self.default_context, json.loads(ex) if ex else {}))
        return out


def _measure(pipe: Pipeline, image: Any, name: str, faces: str | None) -> MeasuredImage:
    from cem.io import ImageLoadError
    from cem.pipeline import MeasuredImage

    if isinstance(image, str):
        return pipe.measure(image, faces)
    try:
        source = _open_bytes(bytes(image), name, pipe.config.image.max_pixels) \
            if isinstance(image, (bytes, bytearray, memoryview)) else np.asarray(image)
    except ImageLoadError as e:
        return MeasuredImage(name, None, [], {}, str(e))
    m = pipe.measure(source, faces)
    m.name = name  # the record names the row, not "<array ...>"
    return m


def _records(pipe: Pipeline, measured: list[MeasuredImage], contexts: list[str | None],
             extras: list[dict[str, Any]], nodes: list[str]) -> list[str]:
    """Reason, fuse, and render each image's record as JSON text (``nodes``: where each was measured),
    through the local runner's path (:func:`cem.sinks.result_record`: valid UTF-8, no NaN, contract-checked)."""
    from cem.sinks import dumps, result_record

    results = pipe.reason_many(measured, contexts)
    out = []
    for res, extra, node in zip(results, extras, nodes):
        res.meta = {str(k): v for k, v in extra.items()} or None  # manifest columns, under "meta"
        res.provenance.node = node
        out.append(dumps(result_record(res)))
    return out


class FERActor:
    """FER stage of the plan (and, with ``fuse=True``, reasoning and fusion too): one pipeline per actor."""

    def __init__(self, config: Config, columns: _Columns, faces: str | None, fuse: bool, threads: int) -> None:
        self.pipe = _new_pipeline(config, threads)
        self.columns, self.faces, self.fuse = columns, faces, fuse
        self.node = _node_id()
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = self.columns.rows(batch)
        measured = [_measure(self.pipe, img, name, self.faces) for img, name, _, _ in rows]
        contexts = [ctx for _, _, ctx, _ in rows]
        extras = [ex for _, _, _, ex in rows]
        if self.fuse:
            recs = _records(self.pipe, measured, contexts, extras, [self.node] * len(rows))
            out = {"record": np.array(recs, dtype=object)}
        else:
            out = {"measured": np.array([pickle.dumps(m, protocol=5) for m in measured], dtype=object),
                   "context": np.array(contexts, dtype=object),
                   "extra": np.array([json.dumps(e) for e in extras], dtype=object),
                   "node": np.array([self.node] * len(rows), dtype=object)}
        self.batches += 1
        _maybe_die(self.batches)
        return out


class ReasonActor:
    """Reasoning stage: turns pickled measured images into records (one reasoner per actor)."""

    def __init__(self, config: Config, threads: int) -> None:
        self.pipe = _new_pipeline(config, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        measured = [pickle.loads(b) for b in batch["measured"]]
        contexts = [_text(c) for c in batch["context"]]
        extras = [json.loads(e) for e in batch["extra"]]
        nodes = [str(n) for n in batch["node"]]
        return {"record": np.array(_records(self.pipe, measured, contexts, extras, nodes), dtype=object)}


def _maybe_die(batches_done: int) -> None:
    trigger = os.environ.get(KILL_HOOK_ENV)
    if not trigger or batches_done < 2:  # mid-run: after this actor has delivered one batch
        return
    try:
        os.rename(trigger, trigger + ".fired")
    except FileNotFoundError:
        return  # no trigger (or another actor took it)
    os.kill(os.getpid(), signal.SIGKILL)


def reasoner_share(config: Config, reason_actors: int) -> Config:
    """The config one reasoning actor gets: an openai ``concurrency`` is the total over all actors."""
    options = dict(config.reasoner.options or {})
    if config.reasoner.backend != "openai" or "concurrency" not in options or reason_actors < 2:
        return config
    share = copy.deepcopy(config)
    share.reasoner.options = options | {"concurrency": max(1, math.ceil(int(options["concurrency"]) / reason_actors))}
    return share


def build_plan(ds: ray.data.Dataset, config: Config, plan: StagePlan, *, image_column: str,
               context_column: str | None, name_column: str | None, extra_column: str | None,
               default_context: str | None = None) -> ray.data.Dataset:
    """``ds`` (one row per image) -> a dataset with one ``record`` column (JSON text), lazily."""
    from ray.data import ActorPoolStrategy

    def pool(size: int) -> ActorPoolStrategy:
        return ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2)

    columns = _Columns(image_column, context_column, name_column, extra_column, default_context)
    # Ray Data's actor pools restart a dead actor and rerun its batch by default (max_restarts and
    # max_task_retries -1); tests/test_ray.py kills an actor mid-run to hold that. Two batches in flight
    # per actor: one running, one queued; deeper queues only starve the other actors of CPU-bound work.
    fuse = plan.reason_actors == 0
    env = reasoner_env(config)
    out = ds.map_batches(FERActor, fn_constructor_kwargs={
        "config": config, "columns": columns, "faces": plan.faces, "fuse": fuse,
        "threads": max(1, int(plan.fer_cpus_per_actor))},
        batch_size=plan.batch_size, batch_format="numpy", compute=pool(plan.fer_actors),
        num_cpus=plan.fer_cpus_per_actor, runtime_env=env if fuse else None)
    if fuse:
        return out
    return out.map_batches(ReasonActor, fn_constructor_kwargs={
        "config": reasoner_share(config, plan.reason_actors), "threads": max(1, int(plan.reason_cpus_per_actor))},
        batch_size=plan.batch_size, batch_format="numpy", compute=pool(plan.reason_actors),
        num_cpus=plan.reason_cpus_per_actor, num_gpus=plan.reason_gpus_per_actor or None, runtime_env=env)


# the openai backend reads these from its environment; actors on other machines do not inherit the driver's
_REASONER_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY")


def reasoner_env(config: Config) -> dict[str, Any] | None:
    """Ray runtime_env giving the reasoning actors the driver's server settings (openai backend only)."""
    if config.reasoner.backend != "openai":
        return None
    env = {k: os.environ[k] for k in _REASONER_ENV if k in os.environ}
    return {"env_vars": env} if env else None


def image_column_is_paths(ds: ray.data.Dataset, column: str) -> bool:
    """Whether ``column`` of ``ds`` holds strings (paths); raises ValueError naming a missing column."""
    import pyarrow as pa

    schema = ds.schema()
    if schema is None or column not in schema.names:
        raise ValueError(f"the dataset has no image column {column!r} (columns: {schema.names if schema else []})")
    t = dict(zip(schema.names, schema.types))[column]
    return isinstance(t, pa.DataType) and (pa.types.is_string(t) or pa.types.is_large_string(t))


def check_columns(ds: ray.data.Dataset, names: Sequence[str]) -> None:
    schema = ds.schema()
    have = set(schema.names if schema else [])
    for n in names:
        if n not in have:
            raise ValueError(f"the dataset has no column {n!r} (columns: {sorted(have)})")


class NotDone:
    """Row filter for resume on a Dataset input: keeps rows whose (name, context) has no record yet."""

    def __init__(self, done: KeySet, name_column: str, context_column: str | None,
                 default_context: str | None) -> None:
        self.done, self.name, self.ctx, self.default = done, name_column, context_column, default_context

    def __call__(self, row: dict[str, Any]) -> bool:
        from cem.io import path_key

        ctx = (_text(row.get(self.ctx)) if self.ctx else None) or self.default
        return not self.done.seen(path_key(str(row[self.name])), ctx)  # as record keys spell names
