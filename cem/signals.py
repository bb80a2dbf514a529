"""Signal handlers installed for the length of a block, and put back afterwards.

Used by the CLI (SIGTERM stops a run as Ctrl-C does) and by the worker pool (SIGCONT, a run continued after
Ctrl-Z, gives the images in progress their time limit anew). Handlers can only be set in the main thread;
elsewhere (``cli.main`` or a pool called from a thread) the block runs without one.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Handler = Callable[[int, Any], None] | signal.Handlers  # a function, or signal.SIG_IGN / SIG_DFL


@contextmanager
def handling(signum: int | None, handler: Handler, chain: bool = False) -> Iterator[bool]:
    """Run the block with ``handler`` for signal ``signum``; yields whether it was installed (not where there
    is no such signal, ``signum`` None, or outside the main thread). ``chain``: the previous handler, when it
    is a Python function, is called after ``handler`` (for a signal another part of the program watches too).
    The previous handler is put back when the block ends, however it ends."""
    if signum is None or threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.getsignal(signum)

    def both(num: int, frame: Any) -> None:
        if callable(handler):
            handler(num, frame)
        if callable(previous):
            previous(num, frame)

    signal.signal(signum, both if chain else handler)
    try:
        yield True
    finally:
        # None: a handler not set from Python (it cannot be put back as it was); the default is the nearest
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


# set by the CLI's stop handlers (Ctrl-C, SIGTERM, SIGHUP) before they raise KeyboardInterrupt; cleared when
# the CLI's run ends (clear_stop)
_stop_requested = threading.Event()
# how pybind11 (MediaPipe) reports a Python exception raised inside a callback from native code
_NATIVE_CALLBACK = re.compile(r"^Error calling function .{0,200}: KeyboardInterrupt\b", re.S)


def request_stop() -> None:
    """Note that the user asked the run to stop (see :func:`is_interrupt`)."""
    _stop_requested.set()


def clear_stop() -> None:
    """Forget :func:`request_stop` (the run it stopped is over)."""
    _stop_requested.clear()


def is_interrupt(e: BaseException) -> bool:
    """Whether ``e`` is the user's Ctrl-C (or a stop signal) in disguise. A KeyboardInterrupt raised while native
    code (MediaPipe) was calling back into Python comes out of it as another error ("Error calling function
    `<lambda>`: KeyboardInterrupt"): caught as one image's failure, it became an error record and the run went
    on, or, while the models loaded, exit 2. Code that turns exceptions into per-image errors asks this first.
    Only that wrapper's own words count (a file named KeyboardInterrupt.jpg in a message is no interrupt), or
    a stop the CLI's handlers noted."""
    if _stop_requested.is_set() or isinstance(e, KeyboardInterrupt):
        return True
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt) or (
                isinstance(cur, (RuntimeError, ValueError)) and _NATIVE_CALLBACK.match(str(cur)[:400])):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False
