"""Where the shipped prompts and configs live: inside the wheel (``cem/prompts``, ``cem/configs``) or, in a
source checkout, at the top level of the repository."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for candidate in (_PKG / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cem: the {name}/ folder is missing from the installation")


def configs_dir() -> Path:
    return _find("configs")


def prompts_dir() -> Path:
    return _find("prompts")
