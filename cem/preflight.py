"""Pre-flight check: can this config's reasoner run here, and if not, what exactly is missing?

``preflight(config, image=None)`` checks the expression model (weights and device), the packages, the GPU a
config asks for, the model weights (or the server), loads the model or reaches the server (``GET /models``
with a few seconds' timeout, then one tiny request), and, given an image, reasons over it once. The report's
``text`` fits one screen and says how to get each missing thing. ``cem check --config NAME`` prints it;
``cem annotate`` runs it before the first image for any reasoner but ``rules``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cem.config import Config

EXTRAS = {"transformers": "llm", "torch": "llm", "accelerate": "llm", "xgrammar": "llm", "bitsandbytes": "quant"}


@dataclass
class PreflightReport:
    """``ok`` when nothing is missing; ``problems`` one line each; ``text`` the whole report."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # the reasoner the check built (model loaded, server reached): a run reuses it instead of loading the model
    # a second time (minutes for a 7B model)
    reasoner: Any = field(default=None, repr=False)

    @property
    def text(self) -> str:
        # one cause can surface in two checks (a broken template: at model load and at the render check)
        problems = list(dict.fromkeys(self.problems))
        head = "cem check: ready" if self.ok else f"cem check: {len(problems)} problem(s)"
        return "\n".join([head, *(f"  - {p}" for p in problems), *(f"  {n}" for n in self.notes)])


def _missing_packages(names: list[str]) -> list[str]:
    out = []
    for name in names:
        if importlib.util.find_spec(name) is None:
            extra = EXTRAS.get(name, "llm")
            what = "grammar backend (constrained decoding) " if name == "xgrammar" else ""
            out.append(f"{what}package {name!r} is not installed: pip install 'cem[{extra}]'")
    return out


def _weights_problem(model: str, opts: dict[str, Any]) -> str | None:
    if model.startswith((".", "/", "~")) or Path(model).expanduser().is_dir():
        if not (Path(model).expanduser() / "config.json").is_file():
            return (f"model folder {model!r} has no config.json (save it with save_pretrained, or point "
                    "--model elsewhere)")
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(model, "config.json", revision=opts.get("revision"))
    if not isinstance(cached, str):
        return f"weights of {model!r} are not downloaded: hf download {model}"
    return None


def _check_transformers(config: Config, report: PreflightReport, image: Any) -> None:
    opts = dict(config.reasoner.options or {})
    needed = ["torch", "transformers", "xgrammar"] + (["bitsandbytes"] if opts.get("quantization") else [])
    report.problems += _missing_packages(needed)
    model = config.reasoner.model or ""
    if not model:
        report.problems.append("no model: set reasoner.model or pass --model ID_OR_PATH")
    elif (p := _weights_problem(model, opts)) is not None:
        report.problems.append(p)
    device = str(config.reasoner.device or "")
    wants_gpu = device.startswith("cuda") or opts.get("quantization") == "4bit"
    if wants_gpu and importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            why = "4-bit quantization" if opts.get("quantization") == "4bit" else f"device {device!r}"
            report.problems.append(f"no CUDA GPU, but this config asks for one ({why}); on a CPU use "
                                   "--reasoner rules or a CPU config (llava-onevision-0.5b, smolvlm)")
    if report.problems:
        return
    from cem.reasoning.transformers_backend import TransformersReasoner

    try:
        reasoner = TransformersReasoner(config)
    except Exception as e:  # reported as the problem it is; the check itself must not crash
        report.problems.append(f"the model does not load: {type(e).__name__}: {str(e).splitlines()[0]}")
        return
    report.notes.append(f"model {model} loaded ({type(reasoner.model).__name__}, processor "
                        f"{type(reasoner.processor).__name__})")
    report.reasoner = reasoner
    _run_one(config, reasoner, image, report)


def _check_openai(config: Config, report: PreflightReport, image: Any) -> None:
    from cem.reasoning.llm import ReasonerFailure
    from cem.reasoning.openai_backend import OpenAIReasoner

    try:
        reasoner = OpenAIReasoner(config)
    except ValueError as e:
        report.problems.append(str(e))
        return
    where = f"{reasoner.base_url} (from {reasoner.base_url_source})"
    try:
        names = reasoner.check_server(timeout_s=3.0)
    except ReasonerFailure as e:
        if e.cause in ("http-404", "http-405"):  # a gateway without /models: the chat request below decides
            names = []
            report.notes.append(f"{where} has no /models listing (HTTP {e.cause[5:]}); the model name is not "
                                "checked against it")
        elif e.cause.startswith("http-3"):  # answered, but elsewhere: the base URL is wrong
            report.problems.append(f"{e.detail} (from {reasoner.base_url_source})")
            return
        else:
            said = e.detail if reasoner.base_url in e.detail else f"{where}: {e.detail}"  # not the address twice
            report.problems.append(f"server unreachable: {said}. Start one (e.g. `vllm serve "
                                   f"{reasoner.model_id} --port 8000`) or point --base-url / $OPENAI_BASE_URL at it")
            return
    if names and reasoner.model_id not in names:
        report.problems.append(f"the server at {where} does not serve {reasoner.model_id!r} (it lists: "
                               f"{', '.join(names[:5])}); pass --model with one of those")
        return
    try:
        reasoner.check_chat()
    except ReasonerFailure as e:
        report.problems.append(f"the server at {where} failed a one-token request: {e}")
        return
    report.notes.append(f"server {where} answers for {reasoner.model_id}")
    report.reasoner = reasoner
    _run_one(config, reasoner, image, report)


def _run_one(config: Config, reasoner: Any, image: Any, report: PreflightReport) -> None:
    """Reason once over ``image`` (when given) with its measured faces."""
    if image is None:
        return
    from cem.fer.stage import FERStage
    from cem.io import load_image
    from cem.reasoning.llm import Job

    rgb = load_image(image, config.image.max_pixels)
    stage = FERStage(config)
    try:
        faces = stage.measure(rgb)
    finally:
        stage.close()
    if not faces:
        report.notes.append("no face in the check image: the reasoner was loaded but not run")
        return
    answers = reasoner.reason_batch([Job(rgb, faces, None)])[0]
    errors = sorted({a.error for a in answers if a.error})
    if errors:
        report.problems.append(f"one image through the reasoner failed: {errors[0]}")
    else:
        report.notes.append(f"one image through the reasoner: {len(answers)} face(s) answered")


def _check_template(config: Config, report: PreflightReport) -> None:
    """Render the configured prompt template once, as a model reasoner will, for two made-up faces (one
    measured, one small without a mesh) with and without a context: a template error (an undefined
    variable, a filter that fails on a missing context, few_shot without exemplars) shows here, not on
    every face of the run."""
    from cem.contract import ActionUnit, FaceEvidence, Pose, Quality
    from cem.prompting import render_prompt
    from cem.reasoning.llm import exemplars_from

    labels = list(config.labels)
    expression = {lab: 1.0 / len(labels) for lab in labels}
    faces = [FaceEvidence(index=0, bbox=(10, 20, 100, 100), detection_score=0.9, pose=Pose(-3.0, 4.0, 1.0),
                          quality=Quality(100, 0.1, False), aus={"AU12": ActionUnit(2.0, True)},
                          expression=expression, position="left"),
             FaceEvidence(index=1, bbox=(300, 20, 30, 30), detection_score=0.7, pose=None,
                          quality=Quality(30, 0.8, False, too_small=True, mesh_failed=True), aus={},
                          expression=expression, position="right")]
    name = config.reasoner.template or "context"
    try:
        exemplars = exemplars_from(config)
        for context in (None, "a test context"):
            render_prompt(name, faces, labels, context, None, exemplars)
    except Exception as e:  # reported, not raised: the check lists every problem it finds
        report.problems.append(f"prompt template {name!r} cannot be rendered: {type(e).__name__}: {e}")


def _check_expression(config: Config, report: PreflightReport) -> None:
    """The FER stage's expression model loads with the config's weights and device (a missing folder, a
    device torch does not know or does not see): ``cem check`` said ready for configs that annotate refused."""
    from cem.fer.expression import ExpressionModel

    e = config.expression
    try:
        ExpressionModel.from_pretrained(e.weights, e.device, e.test_time_flip)
    except Exception as err:  # FileNotFoundError, torch's RuntimeError for a device, a bad config.json: all reported
        report.problems.append(f"expression model ({e.weights or 'packaged'}, device {e.device!r}): "
                               f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")


def preflight(config: Config, image: Any = None) -> PreflightReport:
    """Check that ``config``'s reasoner can run here (see the module docstring)."""
    report = PreflightReport(ok=True)
    _check_expression(config, report)
    backend = config.reasoner.backend
    if backend != "rules":
        _check_template(config, report)
    if backend == "transformers":
        _check_transformers(config, report, image)
    elif backend == "openai":
        _check_openai(config, report, image)
    else:
        report.notes.append(f"reasoner {backend!r} needs no model or server")
    report.ok = not report.problems
    return report
