"""Prompt size in tokens of a LLaMA-style tokenizer, per face and per prompt.

Tokenizer: the 32k SentencePiece BPE (byte fallback) of Mistral-7B v0.1, the same algorithm and vocabulary
size as LLaMA-1/2's. It ships in the ``mistral-common`` wheel as ``mistral_common/data/tokenizer.model.v1``:
``pip download --no-deps mistral-common`` and unzip that file (installing mistral-common beside
transformers 5 changes how transformers loads tokenizers, so the benchmark only reads the file).
Images: the astronaut (one face) and a composed two-face image; templates: context and
face_only. Reports the evidence line of each face and the whole rendered prompt (text only; the image
tokens depend on the model). Run: ``python benchmarks/prompt_tokens.py --tokenizer tokenizer.model.v1``.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import resources

import numpy as np


def llama_style_tokenizer(path: str | None):
    import sentencepiece as spm

    if path is None:
        path = str(resources.files("mistral_common") / "data" / "tokenizer.model.v1")
    return spm.SentencePieceProcessor(model_file=path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="path to tokenizer.model.v1 (SentencePiece)")
    a = ap.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")
    import cv2
    from skimage import data

    import cem
    from cem.prompting import evidence_line, render_prompt

    try:
        sp = llama_style_tokenizer(a.tokenizer)
    except (ImportError, FileNotFoundError, ModuleNotFoundError, OSError) as e:
        print(f"skipped: needs sentencepiece and tokenizer.model.v1 ({e})", file=sys.stderr)
        return 0
    pipe = cem.Pipeline.from_config("default")
    a = data.astronaut()
    two = np.full((300, 700, 3), 190, np.uint8)
    face = cv2.resize(np.ascontiguousarray(a[30:270, 110:350]), (220, 220))
    two[40:260, 20:240], two[40:260, 420:640] = face, face[:, ::-1]
    res = {}
    for name, img in (("astronaut", a), ("two_faces", two)):
        ev = pipe.fer.measure(img)
        lines = [evidence_line(f) for f in ev]
        res[name] = {
            "faces": len(ev),
            "evidence_tokens_per_face": [len(sp.encode(s)) for s in lines],
            "prompt_tokens": {t: len(sp.encode(render_prompt(t, ev, pipe.config.labels, "at a rocket launch").text))
                              for t in ("context", "face_only")},
        }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
