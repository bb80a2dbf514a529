"""Docs that cannot rot: the API reference builds from the docstrings (mkdocs + mkdocstrings), strictly, and the
README's output record is what cem writes for its example."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_api_reference_builds(tmp_path):
    pytest.importorskip("mkdocstrings")
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip("mkdocs not installed")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "analyze_many" in api and "from_config" in api and "fit_fusion" in api


def test_the_readme_output_record_is_what_cem_writes_for_the_example(pipeline):
    """The README's record of examples/astronaut.jpg (its "..." entries aside) matches what the pipeline gives
    now: the same fields, every number within rounding, the same rationale and cues. It had drifted."""
    import json
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Output record.*?```json\n(.*?)```", readme, re.S)
    assert block, "the README's output record block"
    shown = json.loads(block.group(1))
    actual = pipeline.analyze(str(ROOT / "examples" / "astronaut.jpg")).to_dict()
    assert set(shown) == set(actual) and set(shown["provenance"]) == set(actual["provenance"])
    assert set(shown["provenance"]["timings_ms"]) == set(actual["provenance"]["timings_ms"])
    (face,), (real,) = shown["faces"], actual["faces"]
    assert set(face) == set(real)
    assert face["bbox"] == pytest.approx(real["bbox"], abs=1.0)
    assert face["detection_score"] == pytest.approx(real["detection_score"], abs=0.01)
    assert face["pose"] == pytest.approx(real["pose"], abs=0.5) and face["quality"] == pytest.approx(real["quality"],
                                                                                                      abs=0.01)
    assert face["aus"]["AU12"]["intensity"] == pytest.approx(real["aus"]["AU12"]["intensity"], abs=0.05)
    for dist in ("expression", "emotion"):
        shown_values = {k: v for k, v in face[dist].items() if k != "..."}
        assert shown_values == pytest.approx({k: real[dist][k] for k in shown_values}, abs=0.01)
    assert face["top_emotion"] == real["top_emotion"] and face["rationale"] == real["rationale"]
    assert face["cues"][0] in real["cues"]
    assert {k: v for k, v in shown["provenance"].items() if k != "timings_ms"} == {
        k: v for k, v in actual["provenance"].items() if k != "timings_ms"}


def test_the_documented_face_columns_are_those_of_a_real_record(pipeline):
    """docs/output.md's column list is generated from a hand-built record; it had lost two columns that every
    real record has (provenance_faces, provenance_settings)."""
    import re

    from cem.contract import face_rows, order_columns

    page = (ROOT / "docs" / "output.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- BEGIN generated: face-columns -->\n(.*?)<!-- END generated -->", page, re.S)
    documented = [c for c in re.findall(r"`([^`]+)`", block.group(1)) if not c.startswith("meta.")]
    record = pipeline.analyze(str(ROOT / "examples" / "astronaut.jpg")).to_dict()
    assert documented == order_columns(face_rows(record)[0])


def test_the_modules_the_docs_name_are_reached_from_a_plain_import_cem():
    """`import cem` then `cem.contract.json_schema()` (docs/output.md) raised AttributeError in a fresh
    interpreter: only the top-level names were loaded on demand."""
    import subprocess
    import sys

    code = ("import sys, cem; cem.contract.json_schema('image'); cem.fuse.fit_fusion; cem.results.read_cues; "
            "cem.config.Config; assert 'ray' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_cli_reference_names_every_option_and_only_real_ones():
    """docs/cli.md (python docs/gen_cli.py) is the command-line reference: about 20 options were documented only
    by --help. Compared by option names, so a click or Python version that wraps help text differently does not
    fail it; regenerate the page when this fails."""
    import re

    import click

    from cem.cli import main as cli
    from cem.training import argument_parser

    def options(group: click.Group) -> set[str]:
        found: set[str] = set()
        for cmd in group.commands.values():
            found |= {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
            if isinstance(cmd, click.Group):
                found |= options(cmd)
        return found

    real = options(cli) | {o for a in argument_parser()._actions for o in a.option_strings if o.startswith("--")}
    real |= {"--help", "--version"}
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", page))
    assert real - documented == set(), "options missing from docs/cli.md: run python docs/gen_cli.py"
    assert documented - real == set(), "docs/cli.md names options the CLI does not have"
