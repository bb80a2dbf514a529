"""Run configuration: YAML files in ``configs/`` (shipped in the wheel), loaded by name or path.

``Config.load("default", reasoner="rules", faces="whole")`` applies overrides. Short override names:
``reasoner`` (reasoner.backend), ``model`` (reasoner.model), ``template`` (reasoner.template),
``faces`` (faces.mode), ``device`` (expression.device and reasoner.device); any field can also be set as
``section__field`` (e.g. ``fusion__reasoner_weight=0.5``). Unknown names are errors, never ignored.

A name is looked up as typed: ``qwen2.5-vl-7b`` is the shipped ``configs/qwen2.5-vl-7b.yaml`` (a dot in a
name is not a suffix); ``smolvlm.yaml`` and a path to any YAML file work too.

Typing. Every section is a dataclass whose annotations are checked, strictly, at construction and again
by :meth:`Config.validate` (after every load and override): an ``int`` field refuses ``2.9`` and ``True``;
a ``float`` field takes ints and floats but refuses booleans, strings, NaN and infinities; fields with a
``None`` default are ``X | None`` and check ``X``; ranges come from each field's metadata. Errors are
:class:`ConfigError` naming the file (or "override"), the field and the problem.

Why validated dataclasses and not pydantic: the registry and this module are imported by the CLI's
argument parsing, and importing pydantic costs about 0.3 s (``cem --help`` stays instant); the sections
keep their positional constructors (``FusionConfig(1.0, 0.5, 1.0)``) and ``dataclasses.asdict``; and the
coercion rules are ours (a YAML ``1`` is a valid float, a bool is never a number), with no lax mode to
switch off field by field.

Backends. :data:`BACKENDS` is the one registry of reasoner backends: name -> the reasoner class (imported
only when a reasoner is built) and its typed options class. ``reasoner.options`` is checked against the
backend's options class at load; the config then holds the normalised options (aliases resolved,
defaults filled, ``None`` left out) as a plain dict, which backends read through
``cem.reasoning.llm.options(config)``; :meth:`Config.backend_options` gives the typed object.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cem.contract import FERPLUS_LABELS
from cem.io import MAX_SIDE
from cem.resources import configs_dir

log = logging.getLogger(__name__)


FACE_MODES = ("detect", "whole")  # faces.mode, --faces and the faces= argument of the Python API


def check_faces_mode(faces: str | None) -> str | None:
    """``faces`` as given when it is None (the config's mode) or one of :data:`FACE_MODES`; anything else is a
    ValueError rather than a silent detect run."""
    if faces is not None and faces not in FACE_MODES:
        raise ValueError(f"faces must be 'detect' or 'whole' (or None for the config's), not {faces!r}")
    return faces


MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_VALUES = 100_000  # after YAML aliases are expanded: 700 bytes of nested aliases reach 10**9


class _RepeatedKey(ValueError):
    pass


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, so the first setting a user wrote was ignored without a word."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        merges = [k for k, _ in node.value if k.tag == "tag:yaml.org,2002:merge"]
        if len(merges) > 1:  # the first would be dropped as silently: several bases go in one list
            raise _RepeatedKey(f"line {merges[1].start_mark.line + 1}: the merge key '<<' is given again (first on "
                               f"line {merges[0].start_mark.line + 1}); merge several mappings with <<: [*a, *b]")
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then an override is allowed
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the loader itself says what is wrong with it
                continue
            if not repeated:
                seen[key] = key_node.start_mark.line + 1
            else:
                first = seen[key]
                raise _RepeatedKey(f"line {key_node.start_mark.line + 1}: the key {key!r} is given again (first on "
                                   f"line {first}); YAML would keep only the last one: give it once")
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def _expanded_size(data: Any, limit: int) -> int:
    """How many values ``data`` holds with every alias counted where it is used; stops counting past ``limit``."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 120, 120


def _shown(value: Any) -> str:
    """A value as an error message shows it: repr, shortened (YAML aliases can nest a small file into a
    structure whose full repr takes gigabytes)."""
    return _REPR.repr(value)


class ConfigError(ValueError):
    """A configuration that cannot be used (unknown key, bad value, missing file)."""


MAX_WAIT_S = 86400.0  # the longest wait a setting may ask for: one day


def _num(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A numeric field with its allowed range (checked by :func:`_check_section`)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


class _Checked:
    """Validates its own fields on construction (``where`` names the caller when the config has no file)."""

    def __post_init__(self) -> None:
        _check_section(self, type(self).__name__)


# ------------------------------------------------------------------------------------------ sections
@dataclass
class ImageConfig(_Checked):
    max_pixels: int = _num(50_000_000, ge=1)  # decompression-bomb guard
    max_side: int = _num(MAX_SIDE, ge=1, le=MAX_SIDE)  # longest side in pixels; at most cem.io.MAX_SIDE


@dataclass
class FacesConfig(_Checked):
    # whole: each image is one pre-cropped face; the expression CNN sees the eye-aligned crop detect mode makes
    # (a crop of the CNN's own 48 px goes in as it is; without a face mesh, the central square)
    mode: Literal["detect", "whole"] = "detect"
    # MediaPipe models, merged by NMS; auto: short-range, plus full-range unless the photo is a close-up
    detector: Literal["short", "full", "both", "auto"] = "auto"
    # small faces in large photos (short side >= 600 px), which the MediaPipe models cannot see: mtcnn
    # (the MTCNN cascade on the whole image, faces from about 24 px), pyramid (MediaPipe's full-range model
    # on a grid of tiles) or off; measured in docs/action-units.md, "Faces in group photos"
    small_faces: Literal["mtcnn", "pyramid", "off"] = "mtcnn"
    min_score: float = _num(0.5, ge=0.0, le=1.0)  # detections below this are not faces
    min_face_px: int = _num(32, ge=0)  # faces whose box is narrower (its short side) are kept but flagged too_small
    # a detection on which the face mesh finds no face is kept (flagged mesh_failed) only when MediaPipe's
    # detector is at least this sure; weaker ones are false positives (helmets, patterns, borders), and so
    # is every unmeshed face of the MTCNN small-face search
    min_score_unmeshed: float = _num(0.8, ge=0.0, le=1.0)
    # when no face is found, search again with this margin (fraction of the long side) added around the
    # image: faces filling a tightly cropped photo are otherwise missed; 0 turns it off
    pad_retry: float = _num(0.25, ge=0.0, le=2.0)
    # faces measured per image at most: the largest ones (provenance.faces_skipped counts the others)
    max_faces: int = _num(32, ge=1)


@dataclass
class ExpressionConfig(_Checked):
    weights: str | None = None  # folder with config.json + model.safetensors; None = packaged model
    device: str = "cpu"
    # torch intra-op threads for the expression CNN, set around its calls only (MediaPipe runs its own
    # threads; with torch's default of one thread per core the two fight on small machines: measured in
    # docs/action-units.md, "Threads"); 0 = leave torch's setting as it is. At most 1,024: OpenMP crashes the
    # process (out of memory, a segfault) on 100,000, and far fewer than that already exceed any machine's cores
    threads: int = _num(1, ge=0, le=1024)
    # average the logits of each crop and its mirror image (twice the CNN's cost); None: as the model's
    # config.json says (the packaged model: off, for no measurable gain; model card, "Test-time flip")
    test_time_flip: bool | None = None


@dataclass
class ReasonerConfig(_Checked):
    backend: str = "rules"  # a name in BACKENDS
    model: str | None = None
    template: str | None = None
    # backend-specific settings, checked against BACKENDS[backend].options and stored normalised
    options: dict[str, Any] = field(default_factory=dict)
    device: str | None = None


# the pooling weights of the shipped model-reasoner configs (not fitted: the model counts half as much as the
# expression model), and of a model reasoner's config file that sets no fusion section
MODEL_REASONER_FUSION: dict[str, float] = {"expression_weight": 1.0, "reasoner_weight": 0.5, "temperature": 1.0}


@dataclass
class FusionConfig(_Checked):
    """Log-linear pooling: log p ∝ (w_e log p_expression + w_r log p_reasoner) / temperature.

    The defaults are ``configs/default.yaml``'s, fitted for the rules reasoner, so that a config file that sets
    only a few fields (``faces: {small_faces: "off"}``) pools as the default does (it pooled with 0.5 and 1.0,
    and two faces of forty changed their top emotion). A config file for a model reasoner without a ``fusion``
    section pools with :data:`MODEL_REASONER_FUSION`, as the shipped model configs do."""

    expression_weight: float = _num(1.0, ge=0.0)
    reasoner_weight: float = _num(0.1, ge=0.0)
    temperature: float = _num(1.0145, gt=0.0)
    # 0..1: how much a label loses when the measured AUs contradict the face cues that support it
    contradicted_penalty: float = _num(0.5, ge=0.0, le=1.0)
    # labels beyond the expression model's, mapped to one of its labels for pooling (e.g. pride: happiness)
    label_map: dict[str, str] = field(default_factory=dict)
    fitted_on: str | None = None  # where the weights came from (data, split, command)


# ------------------------------------------------------------------------------------ backend options
@dataclass
class BackendOptions(_Checked):
    """Options every backend accepts (none); subclasses add theirs."""

    ALIASES: typing.ClassVar[dict[str, str]] = {}


@dataclass
class RulesOptions(BackendOptions):
    """The rules reasoner takes no options."""


@dataclass
class ExemplarOption(_Checked):
    """A few-shot example: an image file and its label (``reasoner.options.exemplars``)."""

    image: str
    label: str
    note: str = ""


@dataclass
class LLMOptions(BackendOptions):
    """Options shared by the LLM backends (prompt, answer bounds, batching)."""

    batch_size: int = _num(4, ge=1, le=1024)  # images per model call (their pixels are held until it is done)
    max_cues: int = _num(4, ge=0)  # cues per face in the constrained answer
    max_text_chars: int = _num(80, ge=1)  # characters per cue (the rationale gets twice that)
    exemplars: list[ExemplarOption] = field(default_factory=list)
    seed: int | None = None


@dataclass
class TransformersOptions(LLMOptions):
    """``transformers`` backend (see :mod:`cem.reasoning.transformers_backend`)."""

    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    device_map: str | dict[str, Any] | None = None
    quantization: Literal["4bit", "8bit"] | None = None
    quantization_skip: list[str] | None = None  # None: the backend's default (vision tower, projector, head)
    max_new_tokens: int = _num(384, ge=1)
    trust_remote_code: bool = False
    local_files_only: bool = False
    distribution: Literal["likelihood", "verbalized"] = "likelihood"
    likelihood_temperature: float = _num(1.0, gt=0.0)
    do_sample: bool = False


@dataclass
class OpenAIOptions(LLMOptions):
    """``openai`` backend (see :mod:`cem.reasoning.openai_backend`). ``timeout_s`` is an alias of
    ``deadline_s``; base_url and api_key fall back to ``$OPENAI_BASE_URL`` / ``$OPENAI_API_KEY``."""

    ALIASES: typing.ClassVar[dict[str, str]] = {"timeout_s": "deadline_s"}

    base_url: str | None = None
    # what ``--base-url`` sets: beats $OPENAI_BASE_URL, which beats ``base_url``
    base_url_override: str | None = None
    api_key: str | None = None
    concurrency: int = _num(4, ge=1, le=1024)  # requests in flight (each a thread)
    # waits are at most a day: beyond about 1e10 s every request died in OverflowError (time_t, sleep)
    deadline_s: float = _num(60.0, gt=0.0, le=MAX_WAIT_S)  # one whole request, every byte of the reply included
    connect_timeout_s: float = _num(5.0, gt=0.0, le=MAX_WAIT_S)
    retries: int = _num(2, ge=0, le=100)
    backoff_s: float = _num(1.0, ge=0.0, le=MAX_WAIT_S)
    retry_after_max_s: float = _num(30.0, ge=0.0, le=MAX_WAIT_S)  # a server's Retry-After is honoured up to this
    max_reply_bytes: int = _num(2_000_000, ge=1)
    max_cues: int = _num(24, ge=0)
    guided: bool = True  # send the answer's JSON schema as response_format
    distribution: Literal["verbalized", "likelihood"] = "verbalized"
    max_tokens: int | None = _num(None, ge=1)  # None: 256 + 512 per face (OpenAIReasoner.answer_tokens)
    temperature: float = _num(0.0, ge=0.0)


@dataclass(frozen=True)
class Backend:
    """A registered reasoner backend: where its class lives (imported on first use) and its options."""

    name: str
    reasoner: str  # "module:Class"
    options: type[BackendOptions]
    summary: str

    def load_class(self) -> Any:
        import importlib

        module, _, cls = self.reasoner.partition(":")
        return getattr(importlib.import_module(module), cls)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("rules", "cem.reasoning.rules:RulesReasoner", RulesOptions, "EMFACS AU prototypes, offline"),
    Backend("transformers", "cem.reasoning.transformers_backend:TransformersReasoner", TransformersOptions,
            "a local vision-language model"),
    Backend("openai", "cem.reasoning.openai_backend:OpenAIReasoner", OpenAIOptions,
            "an OpenAI-compatible server (vLLM, SGLang, Ollama)"),
)}


def backend(name: str) -> Backend:
    """The registered backend ``name``, or a :class:`ConfigError` listing the known ones."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown reasoner backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def check_label_overlap(labels: list[str], model_labels: list[str], where: str) -> None:
    """A ConfigError when no configured label is one of the expression model's: every face's expression
    distribution would be empty (``fusion.label_map`` can only map to configured labels)."""
    if not any(lab in model_labels for lab in labels):
        raise ConfigError(f"{where}: labels: none of {labels} is a label of the expression model "
                          f"({', '.join(model_labels)}), so no face would have an expression distribution; keep "
                          f"its label names (happiness, not happy), and a label of your own can take the share of "
                          f"one of them through fusion.label_map (labels: [happiness, pride, ...], fusion: "
                          f"{{label_map: {{pride: happiness}}}})")


def parse_options(backend_name: str, raw: dict[str, Any] | None, where: str = "reasoner.options") -> BackendOptions:
    """``reasoner.options`` checked against the backend's typed options (aliases resolved)."""
    cls = backend(backend_name).options
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    data: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        name = cls.ALIASES.get(k, k)
        if name in data:
            raise ConfigError(f"{where}: {k!r} and {name!r} are the same option; give one")
        data[name] = v
    known = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in known:
            hint = _closest(k, sorted(known | set(cls.ALIASES)))
            raise ConfigError(f"{where}.{k}: not an option of the {backend_name} reasoner"
                              + (f" (did you mean {hint!r}?)" if hint else "")
                              + f"; its options: {', '.join(sorted(known)) or 'none'}")
    if "exemplars" in data and isinstance(data["exemplars"], list):
        ex = []
        for i, e in enumerate(data["exemplars"]):
            if not isinstance(e, dict):
                raise ConfigError(f"{where}.exemplars[{i}]: expected a mapping with image and label")
            missing = {"image", "label"} - set(e)
            if missing:
                raise ConfigError(f"{where}.exemplars[{i}]: missing {', '.join(sorted(missing))}")
            ex.append(_build(ExemplarOption, e, f"{where}.exemplars[{i}]"))
        data["exemplars"] = ex
    return _build(cls, data, where)


def _closest(name: str, candidates: list[str]) -> str | None:
    hits = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return hits[0] if hits else None


# -------------------------------------------------------------------------------------------- config
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

    SHORTCUTS: typing.ClassVar[dict[str, tuple[str, str]]] = {
        "reasoner": ("reasoner", "backend"), "model": ("reasoner", "model"),
        "template": ("reasoner", "template"), "faces": ("faces", "mode")}
    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("image", "faces", "expression", "reasoner", "fusion")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Config:
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
        cfg = cls(source=source)
        for key, value in (data or {}).items():
            if key in ("name", "labels"):
                setattr(cfg, key, value)
                continue
            if key not in cls.SECTIONS:
                hint = _closest(str(key), ["name", "labels", *cls.SECTIONS])
                raise ConfigError(f"{source}: unknown configuration key {key!r}"
                                  + (f" (did you mean {hint!r}?)" if hint else ""))
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
            section = getattr(cfg, key)
            for k, v in value.items():
                _set(section, k, v, f"{source}: {key}")
        if "fusion" not in (data or {}) and cfg.reasoner.backend != "rules":
            # the default weights were fitted for the rules reasoner; a model reasoner's config that says none
            # pools as the shipped model configs do
            for k, v in MODEL_REASONER_FUSION.items():
                setattr(cfg.fusion, k, v)
        cfg.validate()
        return cfg

    @classmethod
    def resolve(cls, name_or_path: str | Path) -> Path:
        """The YAML file of a shipped config name (as typed, dots allowed, ``.yaml`` or ``.yml`` optional, any
        case) or a path."""
        shipped = configs_dir()
        text = str(name_or_path)
        if text.startswith("~"):  # `--config=~/x.yaml`: the shell leaves a ~ after = as it is
            text = os.path.expanduser(text)
            name_or_path = text
        if text.startswith(("/dev/fd/", "/proc/self/fd/")) and os.path.exists(text):
            return Path(text)  # `--config <(...)`: a pipe from the shell's process substitution, read once
        candidates = [Path(name_or_path)]
        if "/" not in text and "\\" not in text:
            candidates = [shipped / f"{text}.yaml", shipped / text, Path(name_or_path)]
        elif not text.endswith((".yaml", ".yml")):
            candidates.append(Path(f"{text}.yaml"))
        for p in candidates:
            if p.is_file():
                local = Path(name_or_path)
                if p.parent == shipped and local.is_file() and local.resolve() != p.resolve():
                    log.warning("config %r is the shipped one (%s); the file %s in this folder is not used: pass "
                                "./%s for it", text, p, local, text)
                return p
        known = sorted(q.stem for q in shipped.glob("*.yaml"))
        lowered = text.lower()
        stem = text[:-5] if lowered.endswith(".yaml") else text[:-4] if lowered.endswith(".yml") else text
        if "/" not in text and "\\" not in text:
            # shipped names are lower case: a name that differs only in case ("Default", "SmolVLM") is
            # unambiguous, so it is taken rather than refused
            same = [k for k in known if k.lower() == stem.lower()]
            if len(same) == 1:
                return shipped / f"{same[0]}.yaml"
        short = Path(stem).name.lower()
        # a model family typed as a name ("qwen", "llava"): the shipped configs that start with it
        starting = [k for k in known if short and k.startswith(short)]
        hint = " or ".join(repr(k) for k in starting) if starting else (
            repr(h) if (h := _closest(short, known)) else None)
        where = "no such file" if ("/" in text or "\\" in text) else "not a shipped config name nor a YAML file"
        if Path(text).exists() and not Path(text).is_file():
            where = "not a regular file (a folder, FIFO or device)"
        raise ConfigError(f"config {text!r} not found: {where}"
                          + (f"; did you mean {hint}?" if hint else "") + f" (shipped: {', '.join(known)})")

    @classmethod
    def load(cls, name_or_path: str | Path = "default", **overrides: Any) -> Config:
        import yaml  # here, not at import: the CLI reads the registry before it parses arguments

        p = cls.resolve(name_or_path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read it ({e.strerror or e})") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {len(raw)} bytes; a config is at most {MAX_CONFIG_BYTES} bytes of YAML (is it "
                              f"the right file?)")
        try:
            text = raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is accepted
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 YAML") from None
        try:
            data = _load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
        except _RepeatedKey as e:
            raise ConfigError(f"{p}: {e}") from None
        except RecursionError:
            raise ConfigError(f"{p}: its YAML nests deeper than Python can read; a config is two levels deep") from None
        except ValueError as e:  # an integer beyond Python's 4,300 digits, as YAML builds it
            what = "a number of more than 4,300 digits" if "digits" in str(e) else f"a value it cannot read ({e})"
            raise ConfigError(f"{p}: its YAML holds {what}") from None
        if _expanded_size(data, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
            raise ConfigError(f"{p}: its YAML expands to more than {MAX_CONFIG_VALUES} values (aliases that repeat "
                              f"aliases?); a config is a few dozen settings")
        if isinstance(data, dict) and "name" not in data:
            # a user's file without `name:` is named after the file, so its records (provenance.config) are not
            # mistaken for the shipped default's
            # (a local default.yaml is named by its path: its stem is a shipped config's name)
            shipped = configs_dir()
            clash = p.resolve().parent != shipped.resolve() and (shipped / f"{p.stem}.yaml").is_file()
            data = {"name": str(p) if clash else p.stem, **data}
        cfg = cls.from_dict(data, source=str(p))
        cfg.apply(**overrides)
        return cfg

    def digest(self, resolved: dict[str, Any] | None = None) -> str:
        """12 hex digits of the SHA-256 of every setting (sections and labels; not the name or the file), as
        records carry it in ``provenance.settings``: two runs with one digest used the same settings.
        ``resolved``: settings as the run resolved them where the config is not the last word (the openai
        server: ``--base-url`` > ``$OPENAI_BASE_URL`` > the config's ``base_url``), in place of the config's."""
        import hashlib
        import json

        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "source")}
        if resolved:
            options = {k: v for k, v in data["reasoner"]["options"].items()
                       if k not in ("base_url", "base_url_override")}
            data["reasoner"] = {**data["reasoner"], "options": {**options, **resolved}}
        text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    def apply(self, **overrides: Any) -> Config:
        where = f"{self.source} (override)"
        # a backend chosen here replaces the file's: its options were written for the file's backend, so
        # they are dropped (reasoner__options, applied after, gives the new backend's)
        backend_keys = ("reasoner", "reasoner__backend")
        ordered = sorted(overrides.items(), key=lambda kv: kv[0] not in backend_keys)
        for key, value in ordered:
            if value is None:
                continue
            if key in backend_keys and value != self.reasoner.backend:
                self.reasoner.options = {}
                if value == "rules":  # the file's model, prompt and device were for its model reasoner
                    self.reasoner.model = self.reasoner.template = self.reasoner.device = None
            if key == "device":  # the expression CNN's, and the reasoner's where it runs a model
                _set(self.expression, "device", value, f"{where}: expression")
                if self.reasoner.backend != "rules":
                    _set(self.reasoner, "device", value, f"{where}: reasoner")
            elif key in self.SHORTCUTS:
                sec, f = self.SHORTCUTS[key]
                _set(getattr(self, sec), f, value, f"{where}: {sec}")
            elif "__" in key:
                sec, f = key.split("__", 1)
                if sec not in self.SECTIONS:
                    raise ConfigError(f"unknown configuration section {sec!r} in override {key!r} "
                                      f"(sections: {', '.join(self.SECTIONS)})")
                _set(getattr(self, sec), f, value, f"{where}: {sec}")
            else:
                raise ConfigError(f"unknown override {key!r}")
        given = [k for k, v in overrides.items() if v is not None]
        # a problem the overrides made is theirs, not the file's: "default.yaml with model=...: ..."
        self.validate(f"{self.source} with {', '.join(f'{k}={_shown(overrides[k])}' for k in given)}" if given
                      else None)
        return self

    def validate(self, where: str | None = None) -> None:
        """Check every field (types, ranges, finite numbers, the backend and its options); normalise
        ``reasoner.options``. Errors name the file (or ``where``: the file and the overrides applied to it),
        the field and the problem."""
        src = where or self.source
        if isinstance(self.name, bool):  # YAML 1.1 reads a bare off, on, no, yes, false, true as a boolean
            raise ConfigError(f"{src}: name: YAML reads this name as the boolean {self.name}; put it in quotes "
                              f"(for example name: \"off\")")
        if isinstance(self.name, (int, float)) and math.isfinite(self.name):
            self.name = str(self.name)  # name: 2024 or 1.5 is meant as text
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{src}: name: expected a non-empty string, got {_shown(self.name)}")
        if (not isinstance(self.labels, (list, tuple)) or not self.labels
                or not all(isinstance(x, str) and x for x in self.labels)):
            raise ConfigError(f"{src}: labels: expected a non-empty list of label names, got {_shown(self.labels)}")
        self.labels = list(self.labels)
        for lab in self.labels:
            # models' answers are read in lower case, and labels go into prompts, grammars and JSON keys
            if lab != lab.lower() or lab != lab.strip() or len(lab) > 40 or any(
                    ch in '"\\' or not ch.isprintable() for ch in lab):
                raise ConfigError(f"{src}: labels: {lab!r} is not a label name: labels are lower case, at most 40 "
                                  f"characters, without quotes, backslashes or control characters"
                                  + (f" (did you mean {lab.strip().lower()!r}?)" if lab.strip().lower() != lab else ""))
        if len(set(self.labels)) != len(self.labels):
            dup = sorted({x for x in self.labels if self.labels.count(x) > 1})
            raise ConfigError(f"{src}: labels: duplicate label(s) {dup}")
        for sec in self.SECTIONS:
            _check_section(getattr(self, sec), f"{src}: {sec}")
        dev = self.expression.device
        if isinstance(dev, str) and not re.fullmatch(r"(cpu|mps|(cuda|xpu)(:\d+)?)", dev):
            typed = dev.strip().lower()
            likely = {"gpu": "cuda", "cuda0": "cuda:0", "auto": "cpu or cuda"}.get(typed, typed)
            raise ConfigError(f"{src}: expression.device: {dev!r} is not a device torch knows (cpu, cuda, cuda:N, mps)"
                              + (f"; did you mean {likely!r}?" if likely != dev else ""))
        if self.fusion.expression_weight == 0 and self.fusion.reasoner_weight == 0:
            raise ConfigError(f"{src}: fusion: expression_weight and reasoner_weight are both 0, so every emotion "
                              f"would be equally likely whatever the face; give one of them a weight")
        b = self.reasoner.backend
        if b not in BACKENDS:
            hint = _closest(b, list(BACKENDS))
            raise ConfigError(f"{src}: reasoner.backend: unknown backend {b!r}"
                              + (f" (did you mean {hint!r}?)" if hint else "") + f"; known: {', '.join(BACKENDS)}")
        # a model, prompt or device given to the rules reasoner would be recorded, and silently unused
        for unused, what in (("model", "no model"), ("template", "no prompt and no model"),
                             ("device", "no prompt and no model")):
            value = getattr(self.reasoner, unused)
            if b == "rules" and value is not None:
                raise ConfigError(f"{src}: reasoner.{unused} {_shown(value)}: the rules reasoner uses {what}; give a "
                                  f"config of a model reasoner (cem models lists them) or --reasoner transformers")
        opts = parse_options(b, self.reasoner.options, f"{src}: reasoner.options")
        self.reasoner.options = _options_dict(opts)
        bad = {k: v for k, v in self.fusion.label_map.items() if k not in self.labels}
        if bad:
            raise ConfigError(f"{src}: fusion.label_map: {sorted(bad)} are not among labels {self.labels}")
        # a label takes the share of the label it is mapped to: one that is not among the labels has none
        # (pride: banana gave pride 5e-7, silently)
        nowhere = {k: v for k, v in self.fusion.label_map.items() if v not in self.labels}
        if nowhere:
            raise ConfigError(f"{src}: fusion.label_map: {_shown(nowhere)} map to labels that are not among labels "
                              f"{self.labels}")
        if self.expression.weights is None:  # the packaged model's labels are known here; other weights: FERStage
            check_label_overlap(self.labels, list(FERPLUS_LABELS), src)

    def backend_options(self) -> BackendOptions:
        """The typed options of the configured backend."""
        return parse_options(self.reasoner.backend, self.reasoner.options, f"{self.source}: reasoner.options")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: dataclasses.asdict(getattr(self, f.name)) if f.name in self.SECTIONS else getattr(self, f.name)
             for f in dataclasses.fields(self)}
        d.pop("source")
        return d


def _options_dict(opts: BackendOptions) -> dict[str, Any]:
    """Normalised plain options: every field with its value or default, ``None`` left out."""
    return {k: v for k, v in dataclasses.asdict(opts).items() if v is not None}


def shipped_configs() -> list[str]:
    """Names of the configs shipped in ``configs/``."""
    return sorted(q.stem for q in configs_dir().glob("*.yaml"))


# ------------------------------------------------------------------------------------------ checking
def _set(section: Any, key: str, value: Any, where: str) -> None:
    names = [f.name for f in dataclasses.fields(section)]
    if key not in names:
        # a key YAML reads as another type (`yes:` is true, `1:` a number) is no field name either
        hint = _closest(key, names) if isinstance(key, str) else None
        if isinstance(key, bool):
            where += " (YAML reads an unquoted yes/no/on/off as true/false)"
        raise ConfigError(f"{where}: unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                          + f"; known: {', '.join(names)}")
    hints = typing.get_type_hints(type(section))
    f = next(f for f in dataclasses.fields(section) if f.name == key)
    setattr(section, key, _coerce(value, hints[key], f"{where}.{key}", f.metadata))


def _check_section(section: Any, where: str) -> None:
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        setattr(section, f.name, _coerce(getattr(section, f.name), hints[f.name], f"{where}.{f.name}", f.metadata))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping, every field checked (``where`` names it in errors)."""
    obj: Any = object.__new__(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"{where}: missing {f.name}")
        object.__setattr__(obj, f.name, _coerce(value, hints[f.name], f"{where}.{f.name}", f.metadata))
    return obj


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, meta: Any = None) -> Any:
    """``value`` as type ``tp`` (strictly: no bool as number, no float as int, no string as number), in
    the range of ``meta``; else a :class:`ConfigError` naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, meta)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # X | None: X's own message, naming null as allowed when it is a type problem
            msg = str(errors[0])
            head = f"{where}: expected "
            if msg.startswith(head) and type(None) in args:
                raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {_shown(value)}")
            raise errors[0]
        raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {_shown(value)}")
    if tp is Any:
        return value
    if origin is Literal:
        if value is False and "off" in typing.get_args(tp):
            return "off"  # YAML 1.1 (PyYAML) reads a bare `off` (and no, false) as false: the setting's "off"
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {_shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")
        return _in_range(int(value), where, meta)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
                # YAML 1.1 reads an exponent number without a dot or a sign after e as text
                hint = f" (YAML reads {value.strip()} as text: write it with a dot and a sign, e.g. 1.0e+3, or in full)"
            raise ConfigError(f"{where}: expected a number, got {_shown(value)}{hint}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {_shown(value)}")
        return _in_range(float(value), where, meta)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_shown(value)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_shown(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{where} key {k!r}"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            _check_section(value, where)
            return value
        if isinstance(value, dict):
            return _build(tp, value, where)
        raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
    raise TypeError(f"{where}: no check for type {tp!r}")  # a programming error in this module


def _in_range(value: float, where: str, meta: Any) -> Any:
    if not meta:
        return value
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if ge is not None and value < ge:
        raise ConfigError(f"{where}: must be >= {ge}, got {_shown(value)}")
    if gt is not None and value <= gt:
        raise ConfigError(f"{where}: must be > {gt}, got {_shown(value)}")
    if le is not None and value > le:
        raise ConfigError(f"{where}: must be <= {le}, got {_shown(value)}")
    return value
