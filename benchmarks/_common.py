"""Shared by the benchmark scripts: print a result as JSON and optionally save it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, json_path: str | None = None) -> int:
    """Print ``result`` as indented JSON, write it to ``json_path`` too when given; return exit status 0."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    return 0
