"""Every shipped model family, on a tiny random model of its own architecture (cem.testing.build_tiny):
its own config, model and processor classes, its real chat template and special tokens. Through cem's real
loading code (local_files_only) and the real CLI with the family's shipped config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

from conftest import full_sequence_label_probs  # noqa: E402

from cem.reasoning.families import FAMILIES, family_of  # noqa: E402
from cem.testing import ASSETS, TINY_FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the shipped config of each family, and the class names the real model repository declares
SHIPPED = {"llava": "llava-1.5-7b-4bit", "llava_onevision": "llava-onevision-0.5b", "qwen2_5_vl": "qwen2.5-vl-7b",
           "idefics3": "smolvlm"}
MODEL_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration"}
SMALL = {"local_files_only": True, "max_cues": 1, "max_text_chars": 12}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from cem.testing import build_tiny

    return {f: build_tiny(f, tmp_path_factory.mktemp(f"tiny_{f}")) for f in TINY_FAMILIES}


@pytest.fixture(scope="session")
def reasoners(tiny_dirs):
    """One reasoner per family, loaded once (cem's real loading code, local files only)."""
    from cem.config import Config
    from cem.reasoning.transformers_backend import TransformersReasoner

    out = {}
    for fam, d in tiny_dirs.items():
        cfg = Config.load("default", reasoner="transformers", model=str(d), reasoner__options=dict(SMALL))
        out[fam] = TransformersReasoner(cfg)
    return out


@pytest.fixture(scope="session")
def two_face_evidence(pipeline, two_faces):
    faces = pipeline.fer.measure(two_faces)
    assert len(faces) == 2
    return faces


def _job(reasoner, image, faces, context="at a launch"):
    from cem.reasoning.llm import Job

    job = Job(image, faces, context)
    job.prompt = reasoner.build_prompt(job)
    return job


def test_every_shipped_transformers_config_names_a_family_with_a_tiny_model():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("reasoner", {}).get("backend") == "transformers":
            assert path.stem in SHIPPED.values(), f"{path.stem}: no tiny model of its family is tested"
    assert set(SHIPPED) == set(FAMILIES) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_is_the_familys_own_architecture(family, reasoners):
    r = reasoners[family]
    assert type(r.model).__name__ == MODEL_CLASS[family]
    assert r.family is FAMILIES[family] and family_of(r.model.config.model_type) is FAMILIES[family]
    proc_cls = type(r.processor)
    assert FAMILIES[family].processor_class in [c.__name__ for c in proc_cls.__mro__]
    # the real chat template and every real special/added token, each a single token
    real = json.loads((ASSETS / family / "chat_template.json").read_text())["chat_template"]
    assert r.processor.chat_template == real
    spec = json.loads((ASSETS / family / "special_tokens.json").read_text())
    tok = r.processor.tokenizer
    for t in spec["added_tokens"]:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t, t
    assert tok.eos_token == spec["eos_token"] and tok.pad_token == spec["pad_token"]
    assert (ASSETS / family / "PROVENANCE.md").is_file()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prompt_goes_through_the_real_template_with_the_image_tokens(family, reasoners, two_faces, two_face_evidence):
    r = reasoners[family]
    job = _job(r, two_faces, two_face_evidence)
    inputs = r._inputs([job])
    text = r._chat_text(job.prompt.text, 1)
    marker = {"llava": "USER: <image>\n", "llava_onevision": "<|im_start|>user\n<image>\n",
              "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "idefics3": "<|im_start|>User:<image>"}
    assert marker[family] in text and "Face 2" in text
    image_id = r.model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) >= 1  # the processor expanded the image placeholder


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_constrained_decoding_gives_parseable_answers(family, reasoners, two_faces, two_face_evidence):
    from cem.reasoning.answer import parse_answer

    r = reasoners[family]
    text = r.generate([_job(r, two_faces, two_face_evidence)])[0]
    data = json.loads(text)  # random weights, and still valid JSON under the grammar
    assert [f["index"] for f in data["faces"]] == [1, 2]
    parsed, _ = parse_answer(text, r.labels, 2)
    assert set(parsed) <= {0, 1}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_likelihood_distribution_matches_full_sequence_scoring(family, reasoners, astronaut, pipeline):
    """The shared-prefix KV-cache shortcut gives each family the same label log-probabilities as scoring
    every full sequence (Qwen2.5-VL's multimodal rotary positions included)."""
    r = reasoners[family]
    faces = pipeline.fer.measure(astronaut)
    job = _job(r, astronaut, faces)
    fast = r.label_likelihoods(job)[0]
    assert abs(sum(fast.values()) - 1) < 1e-6 and all(v > 0 for v in fast.values())
    slow = full_sequence_label_probs(r, job)
    assert np.allclose(list(fast.values()), slow, atol=1e-4)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bitsandbytes_loading(family, mode, tiny_dirs, astronaut):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'cem[quant]')")
    from PIL import Image

    from cem.reasoning.families import chat_content
    from cem.reasoning.transformers_backend import load_model

    # every quantised layer (the language model's) has input widths 64 or 128, as 4-bit needs; the vision
    # tower and projector stay unquantised, as for the real models
    model, processor = load_model(str(tiny_dirs[family]), {"quantization": mode, "local_files_only": True}, "cpu")
    quantised = [n for n, m in model.named_modules() if "bit" in type(m).__name__]
    assert quantised and any(("Linear8bitLt" if mode == "8bit" else "Linear4bit") == type(m).__name__
                             for m in model.modules())
    assert not [n for n in quantised if any(s in n for s in FAMILIES[family].quant_skip)]
    text = processor.apply_chat_template([{"role": "user", "content": chat_content(FAMILIES[family], 1, "hi")}],
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.fromarray(astronaut)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 or out.shape[1] > inputs["input_ids"].shape[1]


def test_video_families_load_with_and_without_torchvision(tiny_dirs):
    from cem.reasoning.families import load_processor

    try:
        import torchvision  # noqa: F401
        has_tv = True
    except Exception:  # an installed torchvision that does not load against this torch counts as missing
        has_tv = False
    for fam in ("llava_onevision", "qwen2_5_vl"):
        p = load_processor(str(tiny_dirs[fam]), FAMILIES[fam], local_files_only=True)
        name = FAMILIES[fam].processor_class
        assert type(p).__name__ == (name if has_tv else f"{name}ImageOnly")
        assert p.chat_template and p.tokenizer.pad_token


@pytest.mark.slow
def test_sampling_uses_a_local_generator(reasoners, two_faces, two_face_evidence):
    import torch

    r = reasoners["llava"]
    job = _job(r, two_faces, two_face_evidence)
    r.do_sample, r.seed = True, 7
    try:
        r._generator = None
        state = torch.get_rng_state()
        a = r.generate([job])[0]
        assert torch.equal(state, torch.get_rng_state())  # the global RNG is neither reseeded nor used
        r._generator = None  # a fresh reasoner with the same seed draws the same sequence again
        a2 = r.generate([job])[0]
        assert a == a2 and json.loads(a)
    finally:
        r.do_sample, r.seed, r._generator = False, None, None


def _family_config(family: str, tmp_path: Path, **options) -> Path:
    """The family's shipped config with CPU settings (no GPU here): device cpu, float32, no quantisation.
    Everything else (template, distribution, batch size ...) is the shipped config's."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{SHIPPED[family]}.yaml").read_text())
    cfg["reasoner"]["device"] = "cpu"
    opts = cfg["reasoner"].setdefault("options", {})
    for k in ("quantization", "device_map"):
        opts.pop(k, None)
    opts.update({"dtype": "float32", **SMALL, **options})
    out = tmp_path / f"{SHIPPED[family]}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cli_annotate_with_each_familys_shipped_config(family, tiny_dirs, two_faces, tmp_path):
    """`cem annotate IMG -o out.jsonl --config <family config> --model TINY_DIR`: two faces, likelihood
    distributions, cues from constrained decoding."""
    from PIL import Image

    img = tmp_path / "two.png"
    Image.fromarray(two_faces).save(img)
    out = tmp_path / "o.jsonl"
    # the shipped config's settings, run on a CPU: passed as a YAML path (names with dots load by name on
    # the reasoning branch; the path works on every branch)
    cfg = _family_config(family, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "cem.cli", "annotate", str(img), "-o", str(out), "--config", str(cfg),
                        "--model", str(tiny_dirs[family]), "--context", "a launch"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert len(rec["faces"]) == 2 and rec["provenance"]["model"] == str(tiny_dirs[family])
    assert rec["provenance"]["reasoner"] == "transformers"
    for f in rec["faces"]:
        assert f.get("error") is None, f.get("error")
        assert abs(sum(f["emotion"].values()) - 1) < 1e-6


def test_preflight_loads_a_tiny_model_and_runs_one_image(tiny_dirs, tmp_path, two_faces):
    from PIL import Image

    from cem.config import Config
    from cem.preflight import preflight

    img = tmp_path / "two.png"
    Image.fromarray(two_faces).save(img)
    cfg = Config.load(str(_family_config("idefics3", tmp_path)), model=str(tiny_dirs["idefics3"]))
    report = preflight(cfg, image=str(img))
    assert report.ok, report.text
    assert "2 face(s) answered" in report.text


def test_preflight_says_what_is_missing(tmp_path, monkeypatch):
    from cem.config import Config
    from cem.preflight import preflight

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    report = preflight(Config.load(str(ROOT / "configs" / "llava-1.5-7b-4bit.yaml")))
    assert not report.ok
    assert "hf download llava-hf/llava-1.5-7b-hf" in report.text
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA GPU" in report.text
