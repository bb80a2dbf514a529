"""``--workers N``: the pipeline in N worker processes, results in input order.

Each worker builds its own :class:`~cem.pipeline.Pipeline` once (models are not shared across processes)
and limits torch to one intra-op thread, so N workers use about N cores. Processes are started with
``spawn``: MediaPipe and torch are not fork-safe once loaded. Output is identical to a serial run: the same
records in the same order (``imap`` keeps order); only ``provenance.timings_ms`` differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cem.config import Config

_PIPELINE: Any = None


def _init(config: Config) -> None:
    global _PIPELINE
    import os

    os.environ.setdefault("GLOG_minloglevel", "2")
    import torch

    torch.set_num_threads(1)  # this process is ours: one thread per worker, N workers ~ N cores
    from cem.pipeline import Pipeline

    _PIPELINE = Pipeline(config)


def _work(job: tuple[str, str | None]) -> dict[str, Any]:
    path, context = job
    return _PIPELINE.analyze(path, context).to_dict()


def analyze_parallel(config: Config, jobs: list[tuple[str, str | None]], workers: int) -> Iterator[dict[str, Any]]:
    """Yield one record dict per (path, context) job, in order."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(config,)) as pool:
        yield from pool.imap(_work, jobs, chunksize=1)
