"""The ``cem`` command line. Heavy modules (torch, mediapipe) load inside commands, so ``--help`` is instant."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import click

from cem import __version__

PROGRESS_MIN_IMAGES = 5


def _fail(message: str) -> None:
    click.echo(f"cem: error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cem")
def main() -> None:
    """cem: faces, action units and context-embedded emotion distributions for photos."""
    # MediaPipe's C++ logging prints info lines to stderr; in the CLI (not on import) keep only errors
    os.environ.setdefault("GLOG_minloglevel", "2")


def _build_pipeline(config):
    """The pipeline for a run; a model or configuration that cannot be used ends the run with one clear
    message and exit status 2, before any output is written."""
    from cem.pipeline import Pipeline

    try:
        return Pipeline(config)
    except Exception as e:
        _fail(f"{type(e).__name__}: {e}")


def _repair_jsonl(path: Path) -> set[str]:
    """Images already in ``path``; a half-written last line (crash) is cut off so appends stay valid."""
    done: set[str] = set()
    if not path.exists():
        return done
    data = path.read_bytes()
    good_end = 0
    pos = 0
    for line in data.splitlines(keepends=True):
        pos += len(line)
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if line.strip():
                break
            continue
        if not line.endswith(b"\n"):
            break
        done.add(rec.get("image"))
        good_end = pos
    if good_end < len(data):
        click.echo(f"cem: repairing {path}: dropping an incomplete last record", err=True)
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return done


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


def _annotate_ray(config, inputs: tuple[str, ...], output: Path, contexts: dict[str, str], context: str | None,
                  resume: bool, limit: int | None, refused: dict[str, object], opts: dict[str, object]) -> None:
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
                               limit=limit, address=opts["address"], fer_actors=opts["fer_actors"],
                               reason_actors=opts["reason_actors"], reason_gpus_per_actor=opts["reason_gpus"])
    except (ValueError, OSError) as e:
        _fail(str(e))
    click.echo(summary.text(), err=True)
    if summary.reasoner_failed_everywhere:
        sys.exit(3)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL file: one record per input image.")
@click.option("--config", "config_name", default="default", show_default=True, help="Config name or YAML path.")
@click.option("--reasoner", type=click.Choice(["rules", "transformers", "openai"]), default=None,
              help="Reasoning backend (default: the config's).")
@click.option("--model", default=None, help="Model id or local path for the reasoner.")
@click.option("--faces", type=click.Choice(["detect", "whole"]), default=None,
              help="detect: find faces; whole: each image is one pre-cropped face.")
@click.option("--context", default=None, help="Text context given to the reasoner for every image.")
@click.option("--context-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV with columns image,context.")
@click.option("--resume", is_flag=True, help="Skip images already in OUTPUT and append the rest.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write one row per face to this CSV (stable columns, ready for pandas or R).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes running the pipeline in parallel (output order and content unchanged).")
@click.option("--frames", "frames_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Videos: per-frame table (one row per face per processed frame); .csv or .parquet.")
@click.option("--every", type=click.IntRange(min=1), default=None, help="Videos: process every Nth frame.")
@click.option("--fps", type=click.FloatRange(min=0.01), default=None, help="Videos: sample at this frame rate.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Process at most this many images.")
@click.option("--dry-run", is_flag=True, help="List the images that would be processed, and stop.")
@_ray_options
def annotate(inputs: tuple[str, ...], output: Path, config_name: str, reasoner: str | None, model: str | None,
             faces: str | None, context: str | None, context_file: str | None, resume: bool,
             csv_path: Path | None, workers: int, frames_path: Path | None, every: int | None, fps: float | None,
             limit: int | None, dry_run: bool, **engine: object) -> None:
    """Annotate images into OUTPUT, one JSON record per image.

    INPUTS are files, folders (searched recursively for images), globs, and CSV manifests (a .csv with
    an 'image' column, optional 'context', and extra columns that are carried into the output).
    Videos (mp4, avi, mov, mkv) named as inputs are tracked frame by frame; OUTPUT gets one record per
    key moment and --frames the per-frame table.
    """
    from cem.config import Config, ConfigError
    from cem.io import CsvFaceWriter, JsonlWriter, collect_inputs, read_context_csv

    try:
        config = Config.load(config_name, reasoner=reasoner, model=model, faces=faces)
    except ConfigError as e:
        _fail(str(e))
    contexts: dict[str, str] = {}
    try:
        if context_file:
            contexts = read_context_csv(context_file)
        items = collect_inputs(inputs)
    except (ValueError, OSError) as e:
        _fail(str(e))
    if engine["engine"] == "ray":
        return _annotate_ray(config, inputs, output, contexts, context, resume, limit, {
            "--csv": csv_path, "--workers > 1": workers > 1, "--frames": frames_path, "--dry-run": dry_run}, engine)
    from cem.video import is_video

    videos = [it for it in items if is_video(it.path)]
    items = [it for it in items if not is_video(it.path)]
    if videos and not dry_run:
        _annotate_videos(config, videos, output, frames_path, every, fps, context, resume)
        if not items:
            return
    elif frames_path and not dry_run:
        _fail("--frames applies to video inputs, and none was given")
    done = _repair_jsonl(output) if resume else set()
    todo = [it for it in items if it.path not in done]
    if limit is not None:
        todo = todo[:limit]
    if dry_run:
        for it in todo:
            click.echo(it.path)
        click.echo(f"{len(todo)} images to process ({len(items) - len(todo)} skipped)", err=True)
        return
    if not todo:
        click.echo(f"cem: nothing to do ({len(items)} inputs, all already in {output})", err=True)
        return
    for it in todo:  # precedence: manifest context, then --context-file, then --context
        it.context = it.context or contexts.get(it.path) or contexts.get(Path(it.path).name) or context

    if workers > 1 and config.reasoner.backend != "rules":
        _fail("--workers > 1 runs whole pipelines per process; with an LLM reasoner use one process "
              "(or an openai server, which batches itself)")
    pipeline = None
    if workers == 1:

        pipeline = _build_pipeline(config)
        records = (pipeline.analyze(it.path, it.context).to_dict() for it in todo)
    else:
        from cem.parallel import analyze_parallel

        records = analyze_parallel(config, [(it.path, it.context) for it in todo], workers)

    from cem.fer.aus import AU_NAMES

    extra_cols = list(dict.fromkeys(k for it in todo for k in it.extra))
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_faces, errors = 0, Counter()
    bar = None
    if len(todo) > PROGRESS_MIN_IMAGES:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True)
    csv_writer = CsvFaceWriter(csv_path, config.labels, list(AU_NAMES), extra_cols, append=resume) \
        if csv_path else None
    with JsonlWriter(output, append=resume or bool(videos)) as writer:
        for it, rec in zip(todo, records):
            rec.update(it.extra)
            writer.write(rec)
            if csv_writer:
                csv_writer.write(rec)
            n_faces += len(rec["faces"])
            if rec["error"]:
                errors[rec["error"].split(": ", 1)[-1].split(" (")[0]] += 1
            if bar is not None:
                bar.update(1)
    if csv_writer:
        csv_writer.close()
    if bar is not None:
        bar.close()
    if pipeline is not None:
        pipeline.close()
    elapsed = time.perf_counter() - start
    click.echo(f"cem: {len(todo)} images, {n_faces} faces, {sum(errors.values())} errors in {elapsed:.1f} s "
               f"({len(todo) / max(elapsed, 1e-9):.1f} images/s) -> {output}", err=True)
    for kind, n in errors.most_common():
        click.echo(f"  {n} x {kind}", err=True)


def _annotate_videos(config, videos, output: Path, frames_path: Path | None, every: int | None,
                     fps: float | None, context: str | None, resume: bool) -> None:
    """Videos: stream frames through tracking; key moments -> OUTPUT, every frame -> --frames."""
    from cem.fer.aus import AU_NAMES
    from cem.io import JsonlWriter
    from cem.video import FrameTableWriter, VideoError, frame_columns, frame_count, frame_rows

    pipeline = _build_pipeline(config)
    done = _repair_jsonl(output) if resume else set()
    table = FrameTableWriter(frames_path, frame_columns(config.labels, list(AU_NAMES))) if frames_path else None
    output.parent.mkdir(parents=True, exist_ok=True)
    with JsonlWriter(output, append=resume) as writer:
        for it in videos:
            if it.path in done:
                continue
            start, n_frames, n_moments = time.perf_counter(), 0, 0
            from tqdm import tqdm

            bar = tqdm(total=frame_count(it.path), unit="frame", file=sys.stderr, dynamic_ncols=True,
                       desc=Path(it.path).name)
            try:
                for vf in pipeline.analyze_video(it.path, it.context or context, every=every, fps=fps):
                    n_frames += 1
                    bar.n = vf.frame + 1  # frames decoded so far, sampled or not
                    if n_frames % 10 == 0:
                        bar.refresh()
                    if table:
                        table.write(frame_rows(vf, config.labels, list(AU_NAMES), it.path))
                    for rec in vf.moments:
                        rec.update(it.extra)
                        writer.write(rec)
                        n_moments += 1
            except VideoError as e:
                writer.write({"image": it.path, "width": None, "height": None, "faces": [], "error": str(e),
                              "provenance": pipeline._provenance({}).to_dict()})
                click.echo(f"cem: {e}", err=True)
                continue
            finally:
                bar.close()
            el = time.perf_counter() - start
            click.echo(f"cem: {it.path}: {n_frames} frames in {el:.1f} s ({n_frames / max(el, 1e-9):.1f} frames/s), "
                       f"{n_moments} key moments", err=True)
    if table:
        table.close()
    pipeline.close()


@main.command("train-expression", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_expression(args: tuple[str, ...]) -> None:
    """Train the expression CNN on FER+ (options: see `cem train-expression --help`)."""
    from cem.training import main as train_main

    sys.exit(train_main(list(args)))


def _reasoner_availability(cfg) -> str:
    backend, model = cfg.reasoner.backend, cfg.reasoner.model
    if backend == "rules":
        return "ready (offline)"
    if backend == "openai":
        url = (cfg.reasoner.options or {}).get("base_url") or os.environ.get("OPENAI_BASE_URL") or "?"
        return f"server {url}, model {model} (not contacted)"
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
def schema_cmd() -> None:
    """Print the JSON Schema of one output record."""
    from cem.schema import RECORD_JSON_SCHEMA

    click.echo(json.dumps(RECORD_JSON_SCHEMA, indent=2))


@main.command("eval")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV: image,label or image,<one column per label> (counts or proportions).")
@click.option("--config", "config_name", default="default", show_default=True, help="Config giving the label set.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--plots", type=click.Path(file_okay=False), default=None, help="Write reliability and confusion PNGs.")
def eval_cmd(results: str, labels_csv: str, config_name: str, as_json: bool, plots: str | None) -> None:
    """Score RESULTS (a cem JSONL) against human labels: expression and emotion side by side."""
    from cem.config import Config, ConfigError
    from cem.eval import evaluate_records, read_labels_csv, write_plots
    from cem.io import read_jsonl

    try:
        labels = Config.load(config_name).labels
        human = read_labels_csv(labels_csv, labels)
        records = list(read_jsonl(results))
        res = evaluate_records(records, human, labels)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    if plots:
        res["plots"] = write_plots(records, human, labels, plots)
    if as_json:
        click.echo(json.dumps({k: res[k] for k in ("expression", "emotion")} | {
            "missing": len(res["missing"]), "labels": labels, "confusion": res["confusion"]}, indent=2))
        return
    keys = ["n", "n_scored", "accuracy", "macro_f1", "kl", "js", "nll", "brier", "ece"]
    click.echo(f"{'metric':<10}{'expression':>12}{'emotion':>12}")
    for k in keys:
        a, b = res["expression"][k], res["emotion"][k]
        fmt = (lambda v: f"{v:12d}") if isinstance(a, int) else (lambda v: f"{v:12.4f}")
        click.echo(f"{k:<10}{fmt(a)}{fmt(b)}")
    n_ties = res["expression"]["n"] - res["expression"]["n_scored"]
    click.echo(f"ties excluded from accuracy/F1/NLL/Brier/ECE: {n_ties}; labelled images without a face or "
               f"record: {len(res['missing'])}")
    if plots:
        click.echo("plots: " + ", ".join(res["plots"]))


@main.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--title", default=None, help="Page title.")
def report(results: str, output: str, title: str | None) -> None:
    """Write a self-contained HTML report of RESULTS (a cem JSONL)."""
    from cem.report import write_report

    counts = write_report(results, output, title)
    click.echo(f"cem: report of {counts['images']} images, {counts['faces']} faces -> {output}", err=True)


@main.group()
def prompt() -> None:
    """Prompt templates: render what the model receives."""


@prompt.command("render")
@click.argument("image")
@click.option("--template", default=None, help="Template name in prompts/ or a .j2 path (default: the config's).")
@click.option("--context", default=None, help="Context text.")
@click.option("--config", "config_name", default="default", show_default=True)
@click.option("--model", default=None, help="Apply this model's chat template too (transformers reasoner).")
@click.option("--faces", type=click.Choice(["detect", "whole"]), default=None)
def prompt_render(image: str, template: str | None, context: str | None, config_name: str, model: str | None,
                  faces: str | None) -> None:
    """Print exactly the prompt text the reasoner sends for IMAGE (and which images go with it)."""
    from cem.config import Config, ConfigError
    from cem.io import ImageLoadError, load_image

    try:
        config = Config.load(config_name, template=template, faces=faces)
    except ConfigError as e:
        _fail(str(e))
    from cem.fer.stage import FERStage
    from cem.prompting import render_prompt, template_id
    from cem.reasoning.llm import exemplars_from

    try:
        rgb = load_image(image, config.image.max_pixels)
    except ImageLoadError as e:
        _fail(str(e))
    stage = FERStage(config)
    try:
        evidence = stage.measure(rgb)
        name = config.reasoner.template or "context"
        p = render_prompt(name, evidence, config.labels, context, rgb, exemplars_from(config))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    text = p.text
    if model:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(model)
        content = [{"type": "image"} for _ in p.images] + [{"type": "text", "text": p.text}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    click.echo(text, nl=not text.endswith("\n"))
    click.echo(f"[template {template_id(name)}; {len(p.images)} image(s): "
               f"{len(p.images) - 1} exemplar(s) then the photo; {len(evidence)} face(s)]", err=True)


if __name__ == "__main__":
    main()
