"""torch's intra-op thread count, set around the FER stage's own torch calls only (the expression CNN and the
MTCNN small-face search) and restored at once. Nothing is set at import or through environment variables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at ``n`` (0: unchanged), then restore it.

    torch's setting is process-wide, so it is changed only around the FER stage's own inference and put
    back at once: a reasoner that runs torch on the CPU in the same process keeps its own setting. Not
    for use while another Python thread runs torch at the same moment.
    """
    if n <= 0:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    if previous == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
