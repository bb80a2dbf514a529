"""Prompts: Jinja2 templates in ``prompts/`` rendered with FER evidence and user context.

Templates render in Jinja2's sandboxed environment with ``StrictUndefined`` (a missing variable is an
error, not an empty string). User text is passed as a *value*: Jinja never evaluates values as template
code, so ``{{ 7*7 }}`` in a context stays those characters. It is delimited by markers that the template
declares to be data, and any marker inside the user text is defanged, so the context cannot close its
own block; text that a tokenizer would read as a special token (``</s>``, ``<|im_end|>``, ``<image>``,
``[INST]``) is written with lookalike brackets, so it cannot end the user's turn or add an image slot.
``provenance.template`` is ``<name>@<first 12 hex of the template file's SHA-256>``.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from cem.contract import MAX_CONTEXT_CHARS, FaceEvidence
from cem.fer.aus import AU_NAMES
from cem.resources import prompts_dir

DEFAULT_TEMPLATE = "context"
_MARKERS = ("<<<CONTEXT", "CONTEXT>>>")
# what tokenizers write special tokens as: <s>, </s>, <image>, <|im_start|>, <|eot_id|>, <row_1_col_1>, ...
_SPECIAL_ANGLE = re.compile(r"<(/?\|?/?[A-Za-z_][\w.:-]{0,48}\|?)>")  # also Phi-4's <|/tool|>
_SPECIAL_SQUARE = re.compile(r"\[(/?[A-Za-z][A-Za-z0-9_]{1,30})\]")  # [INST], [IMG_BREAK], [gMASK], [control_8]
_SPECIAL_FULLWIDTH = re.compile(r"<(\uff5c[^<>\uff5c]{1,60}\uff5c)>")  # DeepSeek's <｜begin▁of▁sentence｜>
# the control tokens of the shipped families' and common chat formats that a template may not write: the
# tokenizer would read them as an image slot or a turn boundary ("Found 2 <image> tokens and 1 images")
_CONTROL_ANGLE = frozenset({"s", "/s", "image", "video", "fake_token_around_image", "global-img", "end_of_utterance",
                            "start_of_turn", "end_of_turn", "start_of_image", "end_of_image", "image_soft_token",
                            "bos", "eos", "pad", "unk"})
_CONTROL_SQUARE = frozenset({"INST", "/INST", "IMG", "IMG_BREAK", "IMG_END", "SYSTEM_PROMPT", "/SYSTEM_PROMPT",
                             "gMASK", "sop"})


class PromptTemplateError(Exception):
    """A template whose rendered text cannot be sent as it is (it writes a model's control token)."""


def _control_tokens(text: str) -> list[str]:
    """The chat or image control tokens written in ``text`` (``<image>``, ``<|im_end|>``, ``[INST]``, ...)."""
    found = [m.group(0) for m in _SPECIAL_ANGLE.finditer(text) if "|" in m.group(1) or m.group(1) in _CONTROL_ANGLE]
    found += [m.group(0) for m in _SPECIAL_SQUARE.finditer(text) if m.group(1) in _CONTROL_SQUARE]
    found += [m.group(0) for m in _SPECIAL_FULLWIDTH.finditer(text)]
    return list(dict.fromkeys(found))


@dataclass
class Exemplar:
    """A labelled example image for the few-shot template."""

    image: Any  # path or RGB array
    label: str
    note: str = ""


@dataclass
class Prompt:
    """What the model receives: the text (with the chat template applied later) and images in order."""

    text: str
    images: list[Any] = field(default_factory=list)
    template_id: str = ""


def _template_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".j2" and p.is_file():
        return p
    q = prompts_dir() / f"{name}.j2"
    if not q.is_file():
        known = ", ".join(sorted(x.stem for x in prompts_dir().glob("*.j2")))
        raise FileNotFoundError(f"prompt template {name!r} not found (shipped: {known})")
    return q


def _load(path: str) -> tuple[Any, str]:
    """The compiled template and its digest; an edited file (new mtime or size) is read again, so a
    running notebook sees the template as it is on disk."""
    st = Path(path).stat()
    return _compile(path, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=32)
def _compile(path: str, mtime_ns: int, size: int) -> tuple[Any, str]:
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    from cem.config import ConfigError

    env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
    try:
        source = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt template {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
    try:
        return env.from_string(source), digest
    except TemplateSyntaxError as e:  # a configuration error: the run cannot make any prompt
        raise ConfigError(f"prompt template {path}, line {e.lineno}: {e.message}") from None


def template_id(name: str) -> str:
    path = _template_path(name)
    return f"{path.stem}@{_load(str(path))[1]}"


def inert_text(text: str) -> str:
    """``text`` without control and format characters (a NUL, an escape, a right-to-left override, a lone
    surrogate), but with newlines and tabs; spaces of other widths (no-break, em, ideographic) become plain
    spaces and line or paragraph separators newlines, so no two words run together; the zero-width
    (non-)joiners that some scripts need are kept. For user contexts and for a model's own text alike."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch in "\n\t\u200c\u200d":
            out.append(ch)
        else:
            kind = unicodedata.category(ch)
            if kind == "Zs":
                out.append(" ")
            elif kind in ("Zl", "Zp"):
                out.append("\n")
    return "".join(out)


def sanitize_context(text: str | None) -> str | None:
    """User context as inert data: markers defanged, control characters dropped; longer than
    :data:`cem.contract.MAX_CONTEXT_CHARS` is a ValueError (the pipeline and the input readers refuse such
    contexts before any prompt is made, so nothing is cut short unseen)."""
    if text is None or not str(text).strip():
        return None
    s = inert_text(str(text))
    for m in _MARKERS:
        s = s.replace(m, m.replace("CONTEXT", "C0NTEXT"))
    s = s.replace("<<<", "‹‹‹").replace(">>>", "›››")
    # chat and special tokens (<|im_end|>, </s>, <image>, <end_of_turn>, [INST], ...) would be parsed as the
    # real tokens by the model's tokenizer (here or on a vLLM server): written with lookalike brackets, the
    # context can neither end its turn nor add an image slot
    s = _SPECIAL_ANGLE.sub(lambda m: "‹" + m.group(1) + "›", s)
    s = _SPECIAL_SQUARE.sub(lambda m: "⟦" + m.group(1) + "⟧", s)
    s = _SPECIAL_FULLWIDTH.sub(lambda m: "‹" + m.group(1) + "›", s)
    if len(s) > MAX_CONTEXT_CHARS:
        raise ValueError(f"a context of {len(s)} characters, more than the limit of {MAX_CONTEXT_CHARS}")
    return s.strip()


def evidence_line(face: FaceEvidence, top_k: int = 3) -> str:
    """One compact line per face: position, quality flags, pose, present AUs, leading expression labels."""
    flags = []
    q = face.quality
    for name, on in (("small", q.too_small), ("blurred", q.blur > 0.7), ("turned", q.extreme_pose),
                     ("cut off", q.cut_by_frame), ("no mesh", q.mesh_failed)):
        if on:
            flags.append(name)
    parts = [f"Face {face.index + 1} ({face.position})"]
    parts.append("quality: " + (", ".join(flags) if flags else "ok"))
    if face.pose is not None:
        parts.append(f"pose yaw {face.pose.yaw:.0f} pitch {face.pose.pitch:.0f} roll {face.pose.roll:.0f}")
    present = sorted(((k, a.intensity) for k, a in face.aus.items() if a.present), key=lambda x: -x[1])
    if face.aus:
        parts.append("AUs: " + (", ".join(f"{k} {AU_NAMES.get(k, '')} {v:.1f}" for k, v in present) or "none"))
    top = sorted(face.expression.items(), key=lambda kv: -kv[1])[:top_k]
    parts.append("expression model: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    if face.timeline:
        parts.append(f"over time: {face.timeline}")
    return "; ".join(parts)


def schema_hint(labels: list[str], n_faces: int) -> str:
    example = {"faces": [{"index": 1, "distribution": {lab: 0.0 for lab in labels},
                          "cues": [{"cue": "...", "source": "face|scene|body|text", "au": "AU12 or null",
                                    "supports": labels[0], "weight": 0.5}],
                          "rationale": "one sentence"}]}
    return json.dumps(example, separators=(",", ":")) + f" (one entry per face; index = the face number, 1..{n_faces})"


def render_prompt(template: str | None, faces: list[FaceEvidence], labels: list[str], context: str | None = None,
                  image: Any = None, exemplars: list[Exemplar] | None = None) -> Prompt:
    """Render a template; images are the exemplars' (few-shot) followed by the photo."""
    name = template or DEFAULT_TEMPLATE
    path = _template_path(name)
    tpl, digest = _load(str(path))
    exemplars = exemplars or []
    if "few_shot" in path.stem and not exemplars:
        raise ValueError("the few_shot template needs exemplars (reasoner.options.exemplars in the config)")
    text = tpl.render(
        faces=[{"index": f.index, "line": evidence_line(f)} for f in faces],
        labels=list(labels), context=sanitize_context(context), schema_hint=schema_hint(labels, max(1, len(faces))),
        exemplars=[{"label": e.label, "note": e.note} for e in exemplars],
    )
    tokens = _control_tokens(text)  # the context's are defanged already: these are the template's (or exemplars')
    if tokens:
        raise PromptTemplateError(
            f"the template {name!r} writes {', '.join(repr(t) for t in tokens[:3])}, which the model's tokenizer "
            f"reads as its own control token (an image slot or a turn boundary); cem places the image and the turns "
            f"itself: leave it out of the template")
    images = [e.image for e in exemplars] + ([image] if image is not None else [])
    return Prompt(text=text.strip() + "\n", images=images, template_id=f"{path.stem}@{digest}")
