"""``--workers N``: the FER stage in N worker processes; reasoning stays in the calling process.

Each worker builds its own FER stage once and sets torch's process-wide intra-op threads to ``cores // N``
(set in the worker, when it starts: nothing is set at import), so N workers share the machine instead of each
taking every core; the FER stage's own CNN and MTCNN calls run on ``expression.threads`` (default 1, see
:mod:`cem.fer.threads`). Workers return :class:`~cem.pipeline.MeasuredImage` objects; the caller reasons over them in
batches, so a reasoner's ``batch_size`` and an openai server's ``concurrency`` apply with workers too.

The pool is crash- and hang-aware: each worker has one image at a time, so when a worker dies (OpenCV
aborting on a pathological image, the out-of-memory killer) or passes the per-image time limit, that
image gets an error record naming the input and what happened, the worker is replaced, and the run goes
on. Processes are started with ``spawn``: MediaPipe and torch are not fork-safe once loaded.

Results come back in input order, identical to a serial run except for ``provenance.timings_ms``, with one
exception that keeps finished work from waiting on a slow image: when the oldest unfinished image has run for
:data:`HOLD_BACK_S` seconds, or :data:`MAX_HELD` results wait behind it, the finished ones are released as
they come (the slow image's result follows when it finishes or times out). Without it, an image that hangs
until its time limit (600 s by default) would hold every finished record in memory and out of the output
file, where an interrupted run would lose them.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from cem.config import Config
from cem.signals import handling

DEFAULT_IMAGE_TIMEOUT_S = 600.0
HOLD_BACK_S = 10.0  # an image running this long no longer holds back the results finished after it
MAX_HELD = 64  # nor do more than this many finished results wait for it (bounds memory with pixels kept)


class WorkerStartError(RuntimeError):
    """A worker could not build its pipeline (the same problem would stop a serial run at start)."""


def cpu_count() -> int:
    """Cores this process may use (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    return max(1, cpu_count() // max(1, workers))


def _worker_main(conn: Any, config: Config, threads: int, faces: str | None, keep_pixels: bool) -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")  # this process only: MediaPipe's info lines
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        import torch

        torch.set_num_threads(threads)
        from cem.pipeline import Pipeline

        pipeline = Pipeline(config)
    except Exception as e:
        conn.send(("start-error", f"{type(e).__name__}: {e}"))
        return
    try:
        conn.send(("ready", None))
        while True:
            job = conn.recv()
            if job is None:
                break
            idx, path = job
            conn.send(("done", (idx, pipeline.measure(path, faces, keep_pixels=keep_pixels))))
    except (EOFError, OSError):  # the parent has gone (stopped, killed): nothing to report to, nobody to tell
        pass
    finally:
        pipeline.close()


@dataclass
class _Worker:
    proc: Any
    conn: Any
    job: tuple[int, str] | None = None
    started: float = 0.0
    ready: bool = False


class WorkerPool:
    """N FER worker processes; :meth:`measure` yields ``(index, MeasuredImage)`` once per path, in input order
    except behind a slow image (see the module's docs)."""

    def __init__(self, config: Config, workers: int, faces: str | None = None, keep_pixels: bool = True,
                 image_timeout_s: float = DEFAULT_IMAGE_TIMEOUT_S) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.config, self.n, self.faces, self.keep_pixels = config, workers, faces, keep_pixels
        self.timeout = image_timeout_s
        self.threads = threads_per_worker(workers)
        self.workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, daemon=True,
                                args=(child, self.config, self.threads, self.faces, self.keep_pixels))
        # started with Ctrl-C ignored (kept across exec): the worker ignores it from its first import on, not
        # only once _worker_main runs (a Ctrl-C while it started printed its 30-line traceback in the middle
        # of the parent's "interrupted" message); the parent handles Ctrl-C for both
        with handling(signal.SIGINT, signal.SIG_IGN):
            proc.start()
        child.close()
        return _Worker(proc, parent)

    def _stop(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
        w.conn.close()

    def measure(self, paths: Iterable[str]) -> Iterator[Any]:
        from multiprocessing.connection import wait

        from cem.pipeline import MeasuredImage

        pending: deque[tuple[int, str]] = deque(enumerate(paths))
        total = len(pending)
        done: dict[int, Any] = {}
        released: set[int] = set()  # yielded ahead of a slow image
        next_out = 0
        self.workers = [self._spawn() for _ in range(min(self.n, max(1, total)))]
        continued: list[int] = []
        # SIGCONT (a stopped run continued: ``fg`` after Ctrl-Z) is noted while the pool runs; another handler
        # of the program still gets it
        with handling(getattr(signal, "SIGCONT", None), lambda num, frame: continued.append(num), chain=True), \
                closing(self):
            while next_out < total:
                for w in self.workers:
                    if w.ready and w.job is None and pending:
                        w.job, w.started = pending.popleft(), time.monotonic()
                        try:
                            w.conn.send(w.job)
                        except OSError:
                            pass  # the worker died: its sentinel is ready, and the job is reported below
                busy = [w for w in self.workers if w.job is not None]
                wait_s = min((w.started + self.timeout - time.monotonic() for w in busy), default=5.0)
                left = self._hold_back_left(next_out, busy) if done else None
                if left is not None:  # results wait behind the oldest image: look again when it passes HOLD_BACK_S
                    wait_s = min(wait_s, left)
                ready = wait([w.conn for w in self.workers] + [w.proc.sentinel for w in self.workers],
                             timeout=max(0.0, wait_s))
                if continued:
                    # the run was stopped (Ctrl-Z stops the workers with it) and continued: the time it stood
                    # still was no image's, so the images in progress start their time limit again
                    continued.clear()
                    for w in self.workers:
                        if w.job is not None:
                            w.started = time.monotonic()
                for i, w in enumerate(list(self.workers)):
                    failure = None
                    if w.conn in ready:
                        try:
                            kind, payload = w.conn.recv()
                        except (EOFError, OSError):
                            kind, payload = "dead", None
                        if kind == "start-error":
                            raise WorkerStartError(payload)
                        if kind == "ready":
                            w.ready = True
                        elif kind == "done":
                            done[payload[0]] = payload[1]
                            w.job = None
                        else:
                            failure = "dead"
                    elif w.proc.sentinel in ready:
                        failure = "dead"
                    elif w.job is not None and time.monotonic() - w.started > self.timeout:
                        failure = "timeout"
                    if failure is None:
                        continue
                    self._stop(w)
                    if w.job is not None:
                        idx, path = w.job
                        done[idx] = MeasuredImage(path, None, [], {}, f"{path}: {_describe_failure(failure, w, self)}")
                    elif not w.ready:
                        raise WorkerStartError(
                            f"a worker process died while starting ({_exit_text(w.proc.exitcode)}); from a "
                            f"script, start the run under 'if __name__ == \"__main__\":' (workers are spawned "
                            f"processes that import the script, and its top level would start the run again)")
                    self.workers[i] = self._spawn()
                while next_out in done or next_out in released:
                    if next_out in done:
                        yield next_out, done.pop(next_out)
                    else:
                        released.discard(next_out)
                    next_out += 1
                left = self._hold_back_left(next_out, self.workers) if done else None
                if done and (len(done) >= MAX_HELD or (left is not None and left <= 0)):
                    for idx in sorted(done):  # a slow image: what is finished is not kept waiting for it
                        yield idx, done.pop(idx)
                        released.add(idx)

    @staticmethod
    def _hold_back_left(idx: int, busy: list[_Worker]) -> float | None:
        """Seconds until image ``idx`` has run :data:`HOLD_BACK_S` (negative once it has); None when no worker
        has it."""
        for w in busy:
            if w.job is not None and w.job[0] == idx:
                return w.started + HOLD_BACK_S - time.monotonic()
        return None

    def close(self) -> None:
        for w in self.workers:
            if w.proc.is_alive() and w.job is None and w.ready:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
                w.proc.join(timeout=5)
            self._stop(w)
        self.workers = []


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _describe_failure(kind: str, w: _Worker, pool: WorkerPool) -> str:
    if kind == "timeout":
        return f"analysis timed out after {pool.timeout:g} s (the worker was stopped)"
    return f"the worker process crashed while analysing this image ({_exit_text(w.proc.exitcode)})"
