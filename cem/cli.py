"""The ``cem`` command line. Heavy modules (torch, mediapipe) load inside commands, so ``--help`` is instant."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from cem import __version__
from cem.config import BACKENDS, FACE_MODES  # the backend registry (light: no pydantic, no models)

if TYPE_CHECKING:
    from cem.io import ContextTable


def _say(message: str) -> None:
    """A note on stderr, best effort: a closed stderr or a reader that went away (``| head``) must not stop
    a run whose records are being written."""
    try:
        click.echo(message, err=True)
    except (OSError, ValueError):
        pass


def _fail(message: str) -> NoReturn:
    _say(f"cem: error: {message}")  # exit 2 even when stderr cannot take the message
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cem")
def main() -> None:
    """cem: faces, action units and context-embedded emotion distributions for photos."""
    # MediaPipe's C++ logging prints info lines to stderr; in the CLI (not on import) keep only errors
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        os.fstat(2)
    except OSError:  # stderr closed (2>&-): fd 2 would be reused by the next file opened, and native code's
        fd = os.open(os.devnull, os.O_WRONLY)  # log lines would land in it
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)


def _load_config(config_name: str, base_url: str | None = None, **overrides: object):
    """The run's configuration; an unusable one ends the run with exit status 2. ``--base-url`` beats
    $OPENAI_BASE_URL, which beats the config's ``reasoner.options.base_url``."""
    from cem.config import Config, ConfigError

    try:
        config = Config.load(config_name, **overrides)
    except ConfigError as e:
        _fail(str(e))
    if base_url:
        if config.reasoner.backend != "openai":
            _fail(f"--base-url applies to the openai reasoner, but config {config.name!r} uses "
                  f"{config.reasoner.backend!r}")
        config.reasoner.options = {**(config.reasoner.options or {}), "base_url_override": base_url}
    return config


def _ray_options(command):
    """``--engine ray`` and its options: the run goes to :func:`cem.distributed.annotate` (Ray Data)."""
    options = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this machine (--workers); ray: Ray Data actor pools (pip install 'cem[ray]')."),
        click.option("--address", default=None, help="Ray: cluster to join (auto, ray://HOST:10001); "
                     "default: a running Ray, else a local one."),
        click.option("--fer-actors", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Ray: FER actors (1 CPU each by default)."),
        click.option("--reason-actors", type=click.IntRange(min=0), default=None,
                     help="Ray: reasoning actors (0: reason in the FER actors; default 0 for rules, else 1)."),
        click.option("--reason-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Ray: GPUs per reasoning actor (transformers reasoner)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _annotate_ray(config, inputs: tuple[str, ...], output: Path, contexts: ContextTable | None,
                  context: str | None, resume: bool, overwrite: bool, limit: int | None, refused: dict[str, object],
                  opts: dict[str, Any]) -> None:
    """``cem annotate --engine ray``: shards in OUTPUT's folder of the same name, merged into OUTPUT."""
    import importlib.util

    for flag, value in refused.items():
        if value:
            _fail(f"{flag} is not available with --engine ray")
    if importlib.util.find_spec("ray") is None:
        _fail("--engine ray needs Ray: pip install 'cem[ray]'")
    from cem.distributed import annotate as ray_annotate

    try:
        summary = ray_annotate(list(inputs), config, output, contexts=contexts, context=context, resume=resume,
                               overwrite=overwrite, limit=limit, address=opts["address"], fer_actors=opts["fer_actors"],
                               reason_actors=opts["reason_actors"], reason_gpus_per_actor=opts["reason_gpus"])
    except (ValueError, OSError) as e:
        _fail(str(e))
    click.echo(summary.text(), err=True)
    if summary.reasoner_failed_everywhere:
        sys.exit(3)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="JSONL file: one record per input image.")
@click.option("--config", "config_name", default="default", show_default=True, help="Config name or YAML path.")
@click.option("--reasoner", type=click.Choice(list(BACKENDS)), default=None,
              help="Reasoning backend (default: the config's).")
@click.option("--model", default=None, help="Model id or local path for the reasoner.")
@click.option("--base-url", default=None,
              help="openai reasoner: the server's URL (beats $OPENAI_BASE_URL, which beats the config).")
@click.option("--faces", type=click.Choice(list(FACE_MODES)), default=None,
              help="detect: find faces; whole: each image is one pre-cropped face.")
@click.option("--context", default=None, help="Text context given to the reasoner for every image.")
@click.option("--context-file", type=click.Path(dir_okay=False), default=None,
              help="CSV with columns image,context; image is a path as given or a file name (a file name that "
                   "several inputs share is refused: give their paths).")
@click.option("--resume", is_flag=True, help="Skip inputs already in OUTPUT and append the rest.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it already holds records (without it, or "
              "--resume, such a run is refused).")
@click.option("--retry-errors", is_flag=True,
              help="With --resume: do again the inputs whose record in OUTPUT is an error (a timeout, a missing or "
                   "unreadable file) or has a face on which the reasoner failed (a server down or slow, an invalid "
                   "answer), replacing those records.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None,
              help="After the run, the per-face table of every record in OUTPUT (.csv or .parquet).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="FER processes (each runs the expression CNN on expression.threads torch threads, default 1); "
                   "reasoning stays batched in this process.")
@click.option("--landmarks", is_flag=True, help="Write each face's 478-point mesh into the image records.")
@click.option("--image-timeout", "image_timeout_s", type=click.FloatRange(min=1), default=None,
              help="With --workers: seconds an image may take before it becomes a timeout error record "
                   "(default 600); after 10 s the records finished behind it no longer wait for it.")
@click.option("--frames", "frames_path", type=click.Path(path_type=Path), default=None,
              help="Videos: per-frame table (one row per face per processed frame); .csv or .parquet.")
@click.option("--every", type=click.IntRange(min=1), default=None, help="Videos: process every Nth frame.")
@click.option("--fps", type=click.FloatRange(min=0.01), default=None,
              help="Videos: sample at this frame rate (the first frame of each 1/FPS interval).")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="Process at most this many images (videos named as inputs are not counted).")
@click.option("--dry-run", is_flag=True, help="List the images that would be processed, and stop.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_ray_options
def annotate(inputs: tuple[str, ...], output: Path, config_name: str, reasoner: str | None, model: str | None,
             base_url: str | None, faces: str | None, context: str | None, context_file: str | None, resume: bool,
             overwrite: bool, retry_errors: bool, csv_path: Path | None, workers: int, landmarks: bool,
             image_timeout_s: float | None, frames_path: Path | None,
             every: int | None, fps: float | None, limit: int | None, dry_run: bool, no_progress: bool,
             **engine: object) -> None:
    """Annotate images into OUTPUT, one JSON record per image.

    INPUTS are files, folders (searched recursively for images), globs, and CSV manifests (a .csv with
    an 'image' column, optional 'context', and extra columns that are carried into each record's 'meta';
    a 'subject' column, with an optional boolean 'neutral', measures AUs against each subject's own baseline).
    Videos (mp4, avi, mov, mkv, m4v, webm) named as inputs are tracked frame by frame; OUTPUT gets one record per
    key moment and --frames the per-frame table.

    Exit status: 0 when the run finished (inputs that failed have error records); 2 for unusable
    arguments, configuration or output; 3 when the reasoner failed on every face (the records then hold
    the expression model's emotions alone).
    """
    from cem.runner import RunError
    from cem.runner import annotate as run
    from cem.sinks import safe_text

    config = _load_config(config_name, base_url, reasoner=reasoner, model=model, faces=faces)
    if engine["engine"] != "ray":  # a user who meant to join a cluster must not get a silent local run
        given = [flag for flag, value, default in (("--address", engine["address"], None),
                                                   ("--fer-actors", engine["fer_actors"], 1),
                                                   ("--reason-actors", engine["reason_actors"], None),
                                                   ("--reason-gpus", engine["reason_gpus"], 0.0))
                 if value != default]
        if given:
            _fail(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --engine ray; add --engine ray "
                  f"or leave {'it' if len(given) == 1 else 'them'} out")
    import signal

    stopped_by: list[int] = []

    from contextlib import ExitStack

    from cem.signals import clear_stop, handling, is_interrupt, request_stop

    def terminated(signum: int, frame: object) -> None:  # kill, systemd stop, logout: as Ctrl-C, said the same way
        stopped_by.append(signum)
        request_stop()
        raise KeyboardInterrupt

    def interrupted(signum: int, frame: object) -> None:  # Ctrl-C, noted (see is_interrupt) as well as raised
        request_stop()
        raise KeyboardInterrupt

    def stopped() -> NoReturn:
        how = f"stopped ({signal.Signals(stopped_by[0]).name})" if stopped_by else "interrupted"
        _say(f"cem: {how}; every record written to {output} is kept: run again with --resume")
        sys.exit(128 + stopped_by[0] if stopped_by else 130)

    # SIGHUP (a closed terminal, a dropped ssh session) too, so the batch in hand is written; not under nohup,
    # which asks for the run to go on
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is not None and signal.getsignal(hangup) == signal.SIG_IGN:
        hangup = None
    with ExitStack() as stack:
        stack.callback(clear_stop)  # the stop noted by the handlers belongs to this run only
        stack.enter_context(handling(signal.SIGTERM, terminated))
        stack.enter_context(handling(hangup, terminated))
        if signal.getsignal(signal.SIGINT) == signal.default_int_handler:  # not where Ctrl-C is ignored
            stack.enter_context(handling(signal.SIGINT, interrupted))
        try:
            if engine["engine"] == "ray":
                from cem.io import read_context_csv

                contexts = read_context_csv(context_file) if context_file else None
                return _annotate_ray(config, inputs, output, contexts, context, resume, overwrite, limit, {
                    "--csv": csv_path, "--workers > 1": workers > 1, "--frames": frames_path, "--dry-run": dry_run,
                    "--landmarks": landmarks, "--image-timeout": image_timeout_s, "--retry-errors": retry_errors},
                    engine)
            summary = run(config, inputs, output, resume=resume, workers=workers, csv=csv_path, context=context,
                          context_file=context_file, landmarks=landmarks, progress=not no_progress, limit=limit,
                          dry_run=dry_run, frames=frames_path, every=every, fps=fps, image_timeout_s=image_timeout_s,
                          retry_errors=retry_errors, overwrite=overwrite, echo=_say)
        except KeyboardInterrupt:
            stopped()
        except (RunError, ValueError, OSError, RuntimeError) as e:
            if is_interrupt(e):  # a Ctrl-C (or stop signal) raised inside native code comes out as another error
                stopped()
            if not isinstance(e, (RunError, ValueError, OSError)):  # (RunError is a RuntimeError)
                raise
            _fail(safe_text(str(e)))  # RunError; a context file that cannot be read (the runner reports its own)
    if dry_run:
        for path in summary.planned:
            click.echo(path)
        click.echo(f"{len(summary.planned)} inputs to process ({summary.skipped} already done)", err=True)
        return
    for line in summary.lines():
        _say(safe_text(line))
    sys.exit(summary.exit_code)


@main.command()
@click.option("--config", "config_name", default="default", show_default=True, help="Config name or YAML path.")
@click.option("--model", default=None, help="Model id or local path for the reasoner.")
@click.option("--base-url", default=None, help="openai reasoner: the server's URL.")
def check(config_name: str, model: str | None, base_url: str | None) -> None:
    """Pre-flight: load the expression model and the reasoner's model (or reach its server with one tiny
    request), and say what is missing (exit 0 or 2)."""
    import importlib.util

    config = _load_config(config_name, base_url, model=model)
    if importlib.util.find_spec("cem.preflight") is None:
        _fail("cem check: this installation has no pre-flight module (cem.preflight); nothing was checked")
    from cem.preflight import preflight

    report = preflight(config)
    click.echo(report.text)
    sys.exit(0 if report.ok else 2)


# --help goes to the trainer's own parser, which lists the real options (click's would show only ARGS)
@main.command("train-expression", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_expression(args: tuple[str, ...]) -> None:
    """Train the expression CNN on FER+ (options: cem train-expression --help)."""
    from cem.training import main as train_main

    sys.exit(train_main(list(args)))


def _reasoner_availability(cfg) -> str:
    backend, model = cfg.reasoner.backend, cfg.reasoner.model
    if backend == "rules":
        return "ready (offline)"
    if backend == "openai":
        from cem.reasoning.openai_backend import resolve_base_url

        url, source = resolve_base_url(cfg.reasoner.options or {})  # as a run picks it
        return f"server {url or '?'}{f' (from {source})' if source else ''}, model {model} (not contacted)"
    if model and Path(model).is_dir():
        return f"local folder {model}"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "needs pip install 'cem[llm]'"
    hit = try_to_load_from_cache(model, "config.json")
    return f"{model}: in the local cache" if isinstance(hit, str) else f"{model}: not downloaded (hf download {model})"


@main.command()
def models() -> None:
    """List shipped configs and whether what each needs is available locally now."""
    from cem.config import Config
    from cem.fer.expression import DEFAULT_WEIGHTS
    from cem.resources import configs_dir

    for path in sorted(configs_dir().glob("*.yaml")):
        cfg = Config.load(path)
        weights = Path(cfg.expression.weights) if cfg.expression.weights else DEFAULT_WEIGHTS
        fer = "FER weights ok" if (weights / "model.safetensors").is_file() else "FER weights MISSING"
        click.echo(f"{path.stem:<21} {cfg.reasoner.backend:<13} {fer}; reasoner: {_reasoner_availability(cfg)}")


@main.command("schema")
@click.option("--kind", type=click.Choice(["image", "moment", "video", "error", "frame"]), default="image",
              show_default=True,
              help="image: one record per image; moment: one per video key moment; video: a finished video's "
                   "summary; error: an input that could not be read; frame: one row of the video frame table.")
def schema_cmd(kind: str) -> None:
    """Print the JSON Schema of one output record (generated from cem.contract)."""
    from cem.contract import json_schema

    click.echo(json.dumps(json_schema(kind), indent=2))


@main.command("table")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Table to write: .csv or .parquet (one row per face; see docs/output.md).")
def table_cmd(results: str, output: str) -> None:
    """Write the per-face table of RESULTS (a cem JSONL): the same JSONL always gives the same bytes."""
    from cem.results import write_table

    if os.path.exists(output) and os.path.samefile(results, output):
        _fail(f"the table {output} would overwrite the results it is made from; give another file")
    try:
        summary = write_table(results, output)
    except (ValueError, OSError) as e:
        _fail(str(e))
    if summary.skipped_lines:
        lines = ", ".join(map(str, summary.skipped_lines[:20])) + (", ..." if len(summary.skipped_lines) > 20 else "")
        click.echo(f"cem: {results}: skipped {len(summary.skipped_lines)} line(s) that are not valid records "
                   f"(line {lines}); first: {summary.skipped_reasons[0]}", err=True)
    if summary.mixed_settings:
        click.echo(f"cem: note: {summary.mixed_settings}", err=True)
    click.echo(f"cem: {summary.describe()} -> {output}", err=True)


@main.command("eval")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV: image,label or image,<one column per label> (counts or proportions); optional 'face' "
                   "column (index of the face to score; default: the largest face).")
@click.option("--config", "config_name", default="default", show_default=True, help="Config giving the label set.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--plots", type=click.Path(file_okay=False), default=None, help="Write reliability and confusion PNGs.")
def eval_cmd(results: str, labels_csv: str, config_name: str, as_json: bool, plots: str | None) -> None:
    """Score RESULTS (a cem JSONL) against human labels: expression and emotion side by side.

    Label rows match records by path (as given, relative to the labels file or the current directory),
    by base name only when that is unambiguous. Bad label cells, duplicate rows and ambiguous names are
    errors (exit status 2); results lines that are not usable records are skipped and listed."""
    from cem.config import Config, ConfigError
    from cem.eval import EvalError, evaluate_file, write_plots

    try:
        labels = Config.load(config_name).labels
        res, matched = evaluate_file(results, labels_csv, labels)
    except (ConfigError, EvalError) as e:
        _fail(str(e))
    if res["mixed_settings"]:
        click.echo(f"cem: note: {res['mixed_settings']}; the scores pool them", err=True)
    if res["labels_without_column"]:
        click.echo(f"cem: note: {labels_csv} has no column for {', '.join(res['labels_without_column'])}: scored as "
                   f"not offered to the raters (left out of both sides)", err=True)
    for p in res["problems"][:20]:
        click.echo(f"cem: {p}", err=True)
    if len(res["problems"]) > 20:
        click.echo(f"cem: ... and {len(res['problems']) - 20} more skipped lines (all in --json output)", err=True)
    if plots:
        try:
            res["plots"] = write_plots(matched, plots)
        except OSError as e:
            _fail(f"{plots}: cannot write plots ({e.strerror or e})")
    if as_json:
        click.echo(json.dumps({k: res[k] for k in ("expression", "emotion", "labels", "labels_without_column",
                                                   "confusion", "multi_face", "matched_by_name")} | {
            "missing": len(res["missing"]), "missing_images": res["missing"], "skipped": len(res["problems"]),
            "problems": res["problems"]} | ({"plots": res["plots"]} if plots else {}), indent=2))
        return
    keys = ["n", "n_scored", "accuracy", "macro_f1", "kl", "js", "nll", "brier", "ece"]
    click.echo(f"{'metric':<10}{'expression':>12}{'emotion':>12}")
    for k in keys:
        a, b = res["expression"][k], res["emotion"][k]
        fmt = lambda v: f"{'n/a':>12}" if v is None else f"{v:12d}" if isinstance(v, int) else f"{v:12.4f}"
        click.echo(f"{k:<10}{fmt(a)}{fmt(b)}")
    n_ties = res["expression"]["n"] - res["expression"]["n_scored"]
    click.echo(f"ties excluded from accuracy/F1/NLL/Brier/ECE: {n_ties}; labelled images without a face or "
               f"record: {len(res['missing'])}")
    click.echo(f"images with several faces, scored by the largest: {res['multi_face']}; matched by base name only: "
               f"{res['matched_by_name']}; results lines skipped: {len(res['problems'])}")
    if plots:
        click.echo("plots: " + ", ".join(res["plots"]))


@main.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--title", default=None, help="Page title.")
def report(results: str, output: str, title: str | None) -> None:
    """Write a self-contained HTML report of RESULTS (a cem JSONL).

    Lines that are not usable records are skipped, each named on stderr and counted in the page; a file
    with no usable record at all is an error (exit status 2)."""
    from cem.report import ReportError, write_report

    if os.path.exists(output) and os.path.samefile(results, output):
        _fail(f"the report {output} would overwrite the results it is made from; give another file")
    try:
        done = write_report(results, output, title)
    except ReportError as e:
        _fail(str(e))
    shown = 20
    for p in done.problems[:shown]:
        click.echo(f"cem: {p}", err=True)
    if len(done.problems) > shown:
        click.echo(f"cem: ... and {len(done.problems) - shown} more skipped lines (listed in the report)", err=True)
    skipped = f", {len(done.problems)} lines skipped" if done.problems else ""
    nan = f", {done.non_finite} records with NaN/Infinity shown as n/a" if done.non_finite else ""
    parts = [f"{done.images} images"]
    parts += [f"{done.moments} key moments"] if done.moments else []
    parts += [f"{done.videos} videos"] if done.videos else []
    click.echo(f"cem: report of {', '.join(parts)}, {done.faces} faces{skipped}{nan} -> {output}", err=True)


@main.group()
def prompt() -> None:
    """Prompt templates: render what the model receives."""


@prompt.command("render")
@click.argument("image")
@click.option("--template", default=None, help="Template name in prompts/ or a .j2 path (default: the config's).")
@click.option("--context", default=None, help="Context text.")
@click.option("--config", "config_name", default="default", show_default=True)
@click.option("--model", default=None, help="Apply this model's chat template too (transformers reasoner).")
@click.option("--faces", type=click.Choice(list(FACE_MODES)), default=None)
def prompt_render(image: str, template: str | None, context: str | None, config_name: str, model: str | None,
                  faces: str | None) -> None:
    """Print exactly the prompt text the reasoner sends for IMAGE (and which images go with it)."""
    from cem.config import Config, ConfigError
    from cem.io import ImageLoadError, load_image

    try:
        # the template is rendered as given, not set on the config: the default (rules) config refuses a
        # template, since its reasoner sends no prompt, yet rendering one is what a user tries first
        config = Config.load(config_name, faces=faces)
    except ConfigError as e:
        _fail(str(e))
    import jinja2

    from cem.fer.stage import FERStage
    from cem.prompting import PromptTemplateError, render_prompt, template_id
    from cem.reasoning.llm import exemplars_from

    try:
        rgb = load_image(image, config.image.max_pixels)
    except ImageLoadError as e:
        _fail(str(e))
    stage = FERStage(config)
    try:
        evidence = stage.measure(rgb)
        name = template or config.reasoner.template or "context"
        p = render_prompt(name, evidence, config.labels, context, rgb, exemplars_from(config))
    except (ValueError, FileNotFoundError, PromptTemplateError) as e:
        _fail(str(e))
    except (jinja2.TemplateError, ArithmeticError, TypeError, LookupError, AttributeError, RecursionError) as e:
        # a template that fails as it renders (an undefined name, {{ 1/0 }}, {{ "a" + 1 }}, a macro calling itself)
        _fail(f"prompt template {name!r} failed: {type(e).__name__}: {str(e)[:200]}")
    text = p.text
    if model:
        try:
            from transformers import AutoProcessor
        except ImportError as e:
            _fail(f"--model renders the model's chat template and needs transformers: pip install 'cem[llm]' ({e})")
        from cem.reasoning.transformers_backend import hub_unreachable, missing_model_folder

        where = ("download it once with `hf download " + model + "` or point --model at a local folder saved with "
                 "save_pretrained")
        if missing_model_folder(model):
            _fail(f"--model {model}: no such folder; point --model at a folder saved with save_pretrained, or at "
                  f"a Hugging Face model id")
        unreachable = hub_unreachable(model)
        if unreachable:
            _fail(f"--model {model}: not in the Hugging Face cache and {unreachable}; {where}")
        try:
            proc = AutoProcessor.from_pretrained(model)
        except (OSError, ValueError) as e:  # not found, not a repo id, offline without a cached copy
            _fail(f"--model {model}: its processor cannot be loaded ({str(e).splitlines()[0][:300]}); {where}")
        content = [{"type": "image"} for _ in p.images] + [{"type": "text", "text": p.text}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    click.echo(text, nl=not text.endswith("\n"))
    click.echo(f"[template {template_id(name)}; {len(p.images)} image(s): "
               f"{len(p.images) - 1} exemplar(s) then the photo; {len(evidence)} face(s)]", err=True)


if __name__ == "__main__":
    main()
