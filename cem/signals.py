"""Signal handlers installed for the length of a block, and put back afterwards.

Used by the CLI (SIGTERM stops a run as Ctrl-C does) and by the worker pool (SIGCONT, a run continued after
Ctrl-Z, gives the images in progress their time limit anew). Handlers can only be set in the main thread;
elsewhere (``cli.main`` or a pool called from a thread) the block runs without one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Handler = Callable[[int, Any], None]


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
        handler(num, frame)
        if callable(previous):
            previous(num, frame)

    signal.signal(signum, both if chain else handler)
    try:
        yield True
    finally:
        # None: a handler not set from Python (it cannot be put back as it was); the default is the nearest
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
