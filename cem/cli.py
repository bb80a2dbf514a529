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
@click.option("--limit", type=int, default=None, help="Process at most this many images.")
@click.option("--dry-run", is_flag=True, help="List the images that would be processed, and stop.")
def annotate(inputs: tuple[str, ...], output: Path, config_name: str, reasoner: str | None, model: str | None,
             faces: str | None, context: str | None, context_file: str | None, resume: bool,
             limit: int | None, dry_run: bool) -> None:
    """Annotate images (files, folders, globs) into OUTPUT, one JSON record per image."""
    from cem.config import Config, ConfigError
    from cem.io import JsonlWriter, expand_inputs, read_context_csv

    try:
        config = Config.load(config_name, reasoner=reasoner, model=model, faces=faces)
    except ConfigError as e:
        _fail(str(e))
    contexts: dict[str, str] = {}
    if context_file:
        try:
            contexts = read_context_csv(context_file)
        except (ValueError, OSError) as e:
            _fail(str(e))
    paths = expand_inputs(inputs)
    done = _repair_jsonl(output) if resume else set()
    todo = [p for p in paths if p not in done]
    if limit is not None:
        todo = todo[:limit]
    if dry_run:
        for p in todo:
            click.echo(p)
        click.echo(f"{len(todo)} images to process ({len(paths) - len(todo)} skipped)", err=True)
        return
    if not todo:
        click.echo(f"cem: nothing to do ({len(paths)} inputs, all already in {output})", err=True)
        return

    from cem.pipeline import Pipeline

    try:
        pipeline = Pipeline(config)
    except Exception as e:  # configuration that cannot be used: a clear message and a non-zero exit
        _fail(f"{type(e).__name__}: {e}")
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_faces, errors = 0, Counter()
    bar = None
    if len(todo) > PROGRESS_MIN_IMAGES:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", file=sys.stderr, dynamic_ncols=True)
    with JsonlWriter(output, append=resume) as writer:
        for path in todo:
            ctx = contexts.get(path) or contexts.get(Path(path).name) or context
            result = pipeline.analyze(path, ctx)
            writer.write(result.to_dict())
            n_faces += len(result.faces)
            if result.error:
                errors[result.error.split(": ", 1)[-1].split(" (")[0]] += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    pipeline.close()
    elapsed = time.perf_counter() - start
    click.echo(f"cem: {len(todo)} images, {n_faces} faces, {sum(errors.values())} errors in {elapsed:.1f} s "
               f"({len(todo) / max(elapsed, 1e-9):.1f} images/s) -> {output}", err=True)
    for kind, n in errors.most_common():
        click.echo(f"  {n} x {kind}", err=True)


@main.command("train-expression", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_expression(args: tuple[str, ...]) -> None:
    """Train the expression CNN on FER+ (options: see `cem train-expression --help`)."""
    from cem.training import main as train_main

    sys.exit(train_main(list(args)))


@main.command()
def models() -> None:
    """List shipped configs and whether what each needs is available locally now."""
    from cem.config import Config
    from cem.fer.expression import DEFAULT_WEIGHTS
    from cem.resources import configs_dir

    for path in sorted(configs_dir().glob("*.yaml")):
        cfg = Config.load(path)
        weights = Path(cfg.expression.weights) if cfg.expression.weights else DEFAULT_WEIGHTS
        ok = (weights / "model.safetensors").is_file()
        backend = cfg.reasoner.backend
        note = "offline, ready" if backend == "rules" and ok else f"{backend} {cfg.reasoner.model or ''}".strip()
        click.echo(f"{path.stem:<20} {backend:<13} {'available' if ok else 'missing weights'}  {note}")


@main.command("schema")
def schema_cmd() -> None:
    """Print the JSON Schema of one output record."""
    from cem.schema import RECORD_JSON_SCHEMA

    click.echo(json.dumps(RECORD_JSON_SCHEMA, indent=2))


if __name__ == "__main__":
    main()
