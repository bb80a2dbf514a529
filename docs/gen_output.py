"""Regenerate the generated blocks of docs/output.md from cem.contract (``python docs/gen_output.py``);
``--check`` exits 1 when the page is out of date (the test suite runs it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from cem.contract import (
    AU_NAMES,
    CUE_COLUMNS,
    FERPLUS_LABELS,
    ActionUnit,
    Cue,
    FaceEvidence,
    FaceResult,
    ImageResult,
    Pose,
    Provenance,
    Quality,
    face_rows,
    frame_columns,
    json_schema,
    order_columns,
)

PAGE = Path(__file__).with_name("output.md")
BLOCK = re.compile(r"(<!-- BEGIN generated: (\S+) -->\n)(.*?)(<!-- END generated -->)", re.S)


def _type(p: dict[str, Any]) -> str:
    if "$ref" in p:
        return p["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in p:
        return " or ".join(_type(x) for x in p["anyOf"])
    if "enum" in p:
        return " \\| ".join(f"`{v}`" for v in p["enum"])
    t = p.get("type", "any")
    if t == "array":
        if "prefixItems" in p:
            return f"[{', '.join(_type(x) for x in p['prefixItems'])}]"
        return f"list of {_type(p.get('items', {}))}"
    if t == "object":
        if "patternProperties" in p:
            (pat, sub), = p["patternProperties"].items()
            return f"object: `{pat}` → {_type(sub)}"
        if isinstance(p.get("additionalProperties"), dict):
            return f"object: name → {_type(p['additionalProperties'])}"
        return "object"
    rng = ""
    if "minimum" in p or "maximum" in p:
        rng = f" {p.get('minimum', '')}..{p.get('maximum', '')}"
    return f"{t}{rng}"


def fields_table(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = ["| field | type | always written |", "|---|---|---|"]
    for name, p in schema["properties"].items():
        rows.append(f"| `{name}` | {_type(p)} | {'yes' if name in required else 'only when set'} |")
    return "\n".join(rows) + "\n"


def _example_columns() -> list[str]:
    ev = FaceEvidence(0, (0.0, 0.0, 10.0, 10.0), 1.0, Pose(0, 0, 0), Quality(10, 0.0, False),
                      {k: ActionUnit(0.0, False) for k in AU_NAMES},
                      {k: 1 / len(FERPLUS_LABELS) for k in FERPLUS_LABELS})
    face = FaceResult(ev, {k: 1 / len(FERPLUS_LABELS) for k in FERPLUS_LABELS},
                      [Cue("x", "face", "neutral", 0.5)])
    # the timings of the default config, in the order the pipeline records them
    timings = ("load", "fer", "fer_faces", "fer_expression", "fer_geometry", "reason", "fuse", "total")
    # every field a default record's provenance carries (tests/test_docs.py compares with a real record)
    prov = Provenance("VERSION", "default", "rules", None, None, dict.fromkeys(timings, 1.0), faces="detect",
                      settings="0" * 12, expression_model="packaged@" + "0" * 12)
    rec = ImageResult("a.jpg", 10, 10, [face], prov, meta={"<manifest column>": "x"}).to_dict()
    return order_columns(face_rows(rec)[0])


def blocks() -> dict[str, str]:
    out = {}
    for kind in ("image", "moment", "video", "error", "frame"):
        out[f"{kind}-fields"] = fields_table(json_schema(kind))
    defs = json_schema("moment")["$defs"]
    for name in ("FaceRecord", "Pose", "Quality", "ActionUnit", "Cue", "Provenance"):
        out[f"{name}-fields"] = fields_table(defs[name])
    out["face-columns"] = ", ".join(f"`{c}`" for c in _example_columns()) + "\n"
    out["cue-columns"] = ", ".join(f"`{c}`" for c in CUE_COLUMNS) + "\n"
    out["frame-columns"] = ", ".join(f"`{c}`" for c in frame_columns(FERPLUS_LABELS, list(AU_NAMES))) + "\n"
    return out


def render(text: str) -> str:
    generated = blocks()

    def fill(m: re.Match[str]) -> str:
        if m.group(2) not in generated:
            raise KeyError(f"{PAGE}: unknown generated block {m.group(2)!r}")
        return m.group(1) + generated[m.group(2)] + m.group(4)

    return BLOCK.sub(fill, text)


def write_or_check(page: Path, new: str, argv: list[str], script: str) -> int:
    """Write ``new`` to ``page``; with ``--check`` in ``argv``, write nothing and return 1 when ``page`` differs
    (the docs generators' shared ending: this script and gen_cli.py)."""
    if "--check" in argv:
        if not page.is_file() or page.read_text(encoding="utf-8") != new:
            print(f"{page} is out of date: run python docs/{script}", file=sys.stderr)
            return 1
        return 0
    page.write_text(new, encoding="utf-8")
    return 0


def main(argv: list[str]) -> int:
    return write_or_check(PAGE, render(PAGE.read_text(encoding="utf-8")), argv, "gen_output.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
