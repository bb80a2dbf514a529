"""Run configuration: YAML files in ``configs/`` (shipped in the wheel), loaded by name or path.

``Config.load("default", reasoner="rules", faces="whole")`` applies overrides. Short override names:
``reasoner`` (reasoner.backend), ``model`` (reasoner.model), ``template`` (reasoner.template),
``faces`` (faces.mode), ``device`` (expression.device and reasoner.device); any field can also be set as
``section__field`` (e.g. ``fusion__reasoner_weight=0.5``). Unknown names are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cem.resources import configs_dir
from cem.schema import FERPLUS_LABELS


class ConfigError(ValueError):
    """A configuration that cannot be used (unknown key, bad value, missing file)."""


@dataclass
class ImageConfig:
    max_pixels: int = 50_000_000  # decompression-bomb guard


@dataclass
class FacesConfig:
    mode: str = "detect"  # detect | whole
    detector: str = "both"  # short | full | both (MediaPipe models, merged by NMS)
    min_score: float = 0.5  # detections below this are not faces
    min_face_px: int = 32  # smaller faces are kept but flagged too_small
    # a detection on which the face mesh finds no face is kept (flagged mesh_failed) only when the
    # detector is at least this sure; weaker ones are false positives (helmets, patterns, borders)
    min_score_unmeshed: float = 0.8
    # when no face is found, search again with this margin (fraction of the long side) added around the
    # image: faces filling a tightly cropped photo are otherwise missed; 0 turns it off
    pad_retry: float = 0.25
    max_faces: int = 32


@dataclass
class ExpressionConfig:
    weights: str | None = None  # folder with config.json + model.safetensors; None = packaged model
    device: str = "cpu"
    # torch intra-op threads for the expression CNN, set around its calls only (MediaPipe runs its own
    # threads; with torch's default of one thread per core the two fight on small machines: measured in
    # docs/action-units.md, "Threads"); 0 = leave torch's setting as it is
    threads: int = 1


@dataclass
class ReasonerConfig:
    backend: str = "rules"  # rules | transformers | openai
    model: str | None = None
    template: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific settings
    device: str | None = None


@dataclass
class FusionConfig:
    """Log-linear pooling: log p ∝ (w_e log p_expression + w_r log p_reasoner) / temperature."""

    expression_weight: float = 1.0
    reasoner_weight: float = 0.5
    temperature: float = 1.0
    # 0..1: how much a label loses when the measured AUs contradict the face cues that support it
    contradicted_penalty: float = 0.5
    # labels beyond the expression model's, mapped to one of its labels for pooling (e.g. pride: happiness)
    label_map: dict[str, str] = field(default_factory=dict)
    fitted_on: str | None = None  # where the weights came from (data, split, command)


@dataclass
class Config:
    name: str = "default"
    labels: list[str] = field(default_factory=lambda: list(FERPLUS_LABELS))
    image: ImageConfig = field(default_factory=ImageConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    source: str = "<defaults>"

    SHORTCUTS = {"reasoner": ("reasoner", "backend"), "model": ("reasoner", "model"),
                 "template": ("reasoner", "template"), "faces": ("faces", "mode")}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Config:
        cfg = cls(source=source)
        for key, value in (data or {}).items():
            if key in ("name", "labels"):
                setattr(cfg, key, value)
                continue
            section = getattr(cfg, key, None)
            if not dataclasses.is_dataclass(section) or not isinstance(value, dict):
                raise ConfigError(f"{source}: unknown configuration key {key!r}")
            for k, v in value.items():
                _set(section, k, v, f"{source}: {key}")
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, name_or_path: str | Path = "default", **overrides: Any) -> Config:
        p = Path(name_or_path)
        if not p.suffix:
            p = configs_dir() / f"{name_or_path}.yaml"
        if not p.is_file():
            known = ", ".join(sorted(q.stem for q in configs_dir().glob("*.yaml")))
            raise ConfigError(f"config {str(name_or_path)!r} not found (shipped configs: {known})")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
        cfg = cls.from_dict(data, source=str(p))
        cfg.apply(**overrides)
        return cfg

    def apply(self, **overrides: Any) -> Config:
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "device":
                self.expression.device = value
                self.reasoner.device = value
            elif key in self.SHORTCUTS:
                sec, f = self.SHORTCUTS[key]
                _set(getattr(self, sec), f, value, "override")
            elif "__" in key:
                sec, f = key.split("__", 1)
                section = getattr(self, sec, None)
                if not dataclasses.is_dataclass(section):
                    raise ConfigError(f"unknown configuration section {sec!r} in override {key!r}")
                _set(section, f, value, "override")
            else:
                raise ConfigError(f"unknown override {key!r}")
        self.validate()
        return self

    def validate(self) -> None:
        if self.faces.mode not in ("detect", "whole"):
            raise ConfigError(f"faces.mode must be 'detect' or 'whole', not {self.faces.mode!r}")
        if self.faces.detector not in ("short", "full", "both"):
            raise ConfigError(f"faces.detector must be short, full or both, not {self.faces.detector!r}")
        if self.reasoner.backend not in ("rules", "transformers", "openai"):
            raise ConfigError(f"reasoner.backend must be rules, transformers or openai, not {self.reasoner.backend!r}")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ConfigError("labels must be a non-empty list without duplicates")
        if self.fusion.temperature <= 0:
            raise ConfigError("fusion.temperature must be > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def _set(section: Any, key: str, value: Any, where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(section)}
    if key not in names:
        raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(names)})")
    current = getattr(section, key)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true/false, got {value!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            value = type(current)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{key}: expected a number, got {value!r}") from None
    setattr(section, key, value)
