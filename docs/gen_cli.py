"""Regenerate docs/cli.md, the command-line reference, from the commands' own ``--help`` (``python
docs/gen_cli.py``); ``--check`` exits 1 when the page is out of date (the test suite runs it), so an option is
never documented only by its help text, or described in the docs but missing from the CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cem.cli import main as cli

PAGE = Path(__file__).with_name("cli.md")
WIDTH = 110  # the help text's width on the page (fixed: the page must not depend on the terminal)

HEAD = """# Command-line reference

Generated from each command's `--help` by `python docs/gen_cli.py` (the test suite checks that it is
current). The README shows the commands at work; `docs/output.md` describes what they write.
"""


def _commands(group: click.Group, prefix: list[str]) -> list[tuple[list[str], click.Command]]:
    out = []
    for name in sorted(group.commands):
        cmd = group.commands[name]
        path = [*prefix, name]
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out.extend(_commands(cmd, path))
    return out


def _help(path: list[str], cmd: click.Command) -> str:
    ctx = click.Context(cli, info_name="cem", terminal_width=WIDTH, max_content_width=WIDTH)
    if path:
        ctx = click.Context(cmd, info_name=" ".join(path), parent=ctx, terminal_width=WIDTH,
                            max_content_width=WIDTH)
    return cmd.get_help(ctx)


def render() -> str:
    parts = [HEAD, "## cem\n", "```text\n" + _help([], cli) + "\n```\n"]
    for path, cmd in _commands(cli, []):
        parts.append(f"## cem {' '.join(path)}\n")
        text = _help(path, cmd)
        if path == ["train-expression"]:  # its options are parsed by argparse (cem.training), not by click
            from cem.training import argument_parser

            os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps to the terminal's width
            text = argument_parser().format_help().rstrip()
        parts.append("```text\n" + text + "\n```\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).parent))  # run as a script from anywhere: its sibling generator
    from gen_output import write_or_check

    return write_or_check(PAGE, render(), argv, "gen_cli.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
