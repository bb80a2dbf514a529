"""What differs between the vision-language model families cem ships configs for, in one place per family.

Everything the transformers reasoner does is generic (chat template, processor, ``generate``, label
likelihoods) except what this module says about a family:

- ``model_types``: the ``config.model_type`` values that belong to the family;
- ``quant_skip``: modules kept unquantised under bitsandbytes (vision tower, projector, output head: their
  input widths are rarely multiples of 64, and quantising them costs accuracy for little memory);
- ``image_settings``: image-size caps applied on top of the model's own preprocessor settings, so a large
  photo does not turn into tens of thousands of image tokens (Qwen2.5-VL's ``max_pixels``; Idefics3's
  image splitting and tile size);
- ``image_first``: where the image goes in the user turn (every shipped family's template expects the
  image before the text);
- ``mrope``: multimodal rotary positions (Qwen2.5-VL), which scoring a continuation after a cached
  prefix must offset;
- ``label_prefix``: what separates ``"Face k:"`` from a label when labels are scored by likelihood (all
  shipped tokenizers fold the space into the label's first token, so the label's token ids are those of
  ``" <label>"`` after the stem);
- ``video_processor``: whether the standard processor carries a video processor. In transformers 5 those
  need torchvision; where torchvision is missing, :func:`load_processor` builds the family's own processor
  class without its video part (same image processor, tokenizer, chat template and special tokens), which
  is all cem uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any


@dataclass(frozen=True)
class Family:
    """A model family's own handling (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    processor_class: str
    example_model: str
    quant_skip: tuple[str, ...]
    video_processor: bool = False
    image_first: bool = True
    label_prefix: str = " "
    mrope: bool = False  # multimodal rotary positions: a continuation's positions add the prefix's offset
    image_settings: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llava", ("llava",), "LlavaProcessor", "llava-hf/llava-1.5-7b-hf",
           quant_skip=("vision_tower", "multi_modal_projector", "lm_head")),
    Family("llava_onevision", ("llava_onevision",), "LlavaOnevisionProcessor",
           "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
           quant_skip=("vision_tower", "multi_modal_projector", "image_newline", "lm_head"), video_processor=True),
    # Qwen2.5-VL's default max_pixels (12.8 M) gives up to 16k image tokens per photo; 1280 x 28 x 28 is the
    # cap Qwen's own model card suggests for a single GPU
    Family("qwen2_5_vl", ("qwen2_5_vl", "qwen2_vl"), "Qwen2_5_VLProcessor", "Qwen/Qwen2.5-VL-7B-Instruct",
           quant_skip=("visual", "lm_head"), video_processor=True, mrope=True,
           image_settings={"max_pixels": 1280 * 28 * 28}),
    # SmolVLM splits a photo into up to 4 x 4 tiles of 384 px plus a global view (81 tokens each); cem keeps
    # the model's splitting but caps the resized long side at 4 tiles' width
    Family("idefics3", ("idefics3", "smolvlm"), "Idefics3Processor", "HuggingFaceTB/SmolVLM-Instruct",
           quant_skip=("vision_model", "connector", "lm_head"),
           image_settings={"longest_edge": 4 * 384}),
)}


def family_of(model_type: str | None) -> Family | None:
    """The family a ``config.model_type`` belongs to, or None for a model cem has no special handling for."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None


def read_model_type(model_dir_or_id: str, **hub_kwargs: Any) -> str | None:
    """``model_type`` from the model's config.json (local folder or Hugging Face cache), or None."""
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(model_dir_or_id, **hub_kwargs).model_type)
    except (OSError, ValueError):
        return None


@cache
def image_only_processor_class(processor_class: str) -> type:
    """The family's processor class without its video processor: a subclass whose processor attributes are
    the image processor and the tokenizer. Everything else (token handling, chat template, image token
    expansion) is the family's own code."""
    import inspect

    import transformers

    base = getattr(transformers, processor_class)
    # ProcessorMixin.from_pretrained passes only the names __init__ declares (read from its code object),
    # so the subclass declares the base's parameters, less the video processor
    params = [p for name, p in inspect.signature(base.__init__).parameters.items()
              if name not in ("self", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD]
    names = [p.name for p in params]
    defaults = {p.name: p.default for p in params}
    src = (f"def __init__(self, {', '.join(f'{n}=_d[{n!r}]' for n in names)}, **kwargs):\n"
           # the base __init__ hands (image_processor, tokenizer, None) to ProcessorMixin, which pairs
           # positional arguments with this class's two attributes and so drops the missing video processor
           f"    _base.__init__(self, image_processor, tokenizer, None, "
           f"{', '.join(f'{n}={n}' for n in names if n not in ('image_processor', 'tokenizer'))}, **kwargs)\n")
    scope: dict[str, Any] = {"_d": defaults, "_base": base}
    exec(src, scope)  # noqa: S102 - code built from the base class's own parameter names
    return type(f"{processor_class}ImageOnly", (base,), {"__init__": scope["__init__"], "__module__": __name__})


def load_processor(model_id: str, family: Family | None, **hub_kwargs: Any) -> Any:
    """The model's processor: the standard one when it loads, else (a family with a video processor and no
    torchvision) the family's image-only processor from the same files."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_id, **hub_kwargs)
    except ImportError as e:
        if family is None or not family.video_processor or "torchvision" not in str(e).lower():
            raise
    cls: Any = image_only_processor_class(family.processor_class)
    return cls.from_pretrained(model_id, **hub_kwargs)


def apply_image_settings(processor: Any, family: Family | None, overrides: dict[str, Any] | None = None) -> None:
    """Cap the image processor's sizes with the family's settings (``overrides`` replace them): only ever
    lowers what the model's own preprocessor config allows."""
    if family is None:
        return
    settings = dict(family.image_settings) | {k: v for k, v in (overrides or {}).items() if v is not None}
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return
    if "max_pixels" in settings:
        cap = int(settings["max_pixels"])
        size = dict(getattr(ip, "size", None) or {})
        if "longest_edge" in size:
            size["longest_edge"] = min(int(size["longest_edge"]), cap)
            ip.size = size
        if getattr(ip, "max_pixels", None) is not None:
            ip.max_pixels = min(int(ip.max_pixels), cap)
    if "longest_edge" in settings and family.name == "idefics3":
        size = dict(getattr(ip, "size", None) or {})
        if "longest_edge" in size:
            size["longest_edge"] = min(int(size["longest_edge"]), int(settings["longest_edge"]))
            ip.size = size
    if "image_splitting" in settings and hasattr(ip, "do_image_splitting"):
        ip.do_image_splitting = bool(settings["image_splitting"])


def chat_content(family: Family | None, n_images: int, text: str) -> list[dict[str, Any]]:
    """The user turn's content parts: images where the family's template expects them, then the text."""
    images = [{"type": "image"} for _ in range(n_images)]
    part = [{"type": "text", "text": text}]
    return images + part if family is None or family.image_first else part + images
