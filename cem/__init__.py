"""cem: context-embedded emotion analysis of faces in photos.

``import cem`` is cheap: the pipeline and its models load only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from cem.config import Config
    from cem.contract import FaceResult, ImageResult
    from cem.pipeline import Pipeline
    from cem.results import read_results

__all__ = ["Pipeline", "Config", "ImageResult", "FaceResult", "read_results", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from cem.pipeline import Pipeline

        return Pipeline
    if name == "Config":
        from cem.config import Config

        return Config
    if name in ("ImageResult", "FaceResult"):
        from cem import contract

        return getattr(contract, name)
    if name == "read_results":
        from cem.results import read_results

        return read_results
    if name in _SUBMODULES:  # `import cem` then `cem.contract.json_schema()`, as the docs write it
        import importlib

        return importlib.import_module(f"cem.{name}")
    raise AttributeError(f"module 'cem' has no attribute {name!r}")


# the modules reachable as attributes of ``cem`` (imported on first use, like the names above)
_SUBMODULES = frozenset({"config", "contract", "schema", "results", "io", "fuse", "eval", "video", "runner",
                         "pipeline", "prompting", "reasoning", "training", "datasets", "sinks", "preflight",
                         "report", "engines", "fer", "distributed", "resources", "testing", "parallel", "signals"})
