"""Configuration: shipped configs by name (API and CLI, as users type them), typed validation whose errors
name the file, the field and the problem, the backend registry and its typed options, label_map end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cem
from cem.config import BACKENDS, Config, ConfigError, FusionConfig, OpenAIOptions, TransformersOptions, shipped_configs
from cem.resources import configs_dir

SHIPPED = ["default", "llava-1.5-7b-4bit", "qwen2.5-vl-7b", "llava-onevision-0.5b", "smolvlm", "vllm"]
LLM_LOCAL = ["llava-1.5-7b-4bit", "qwen2.5-vl-7b", "llava-onevision-0.5b", "smolvlm"]


def test_every_shipped_config_is_listed():
    assert sorted(SHIPPED) == shipped_configs()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_by_name_suffix_and_path(name):
    by_name = Config.load(name)
    assert by_name.name == name  # each file names itself as users type it
    for spelling in (f"{name}.yaml", str(configs_dir() / f"{name}.yaml"), name.upper(), name.title() + ".yaml"):
        assert Config.load(spelling).to_dict() == by_name.to_dict()  # shipped names are taken in any case
    assert by_name.reasoner.backend in BACKENDS


def test_unknown_name_lists_shipped_and_suggests_closest():
    with pytest.raises(ConfigError) as e:
        Config.load("qwen2.5-vl")
    msg = str(e.value)
    assert "not found" in msg and "did you mean 'qwen2.5-vl-7b'" in msg
    assert all(n in msg for n in SHIPPED)
    with pytest.raises(ConfigError, match="did you mean 'qwen2.5-vl-7b'"):
        Config.load("Qwen2-VL")  # the hint ignores case as well
    with pytest.raises(ConfigError, match="no such file"):
        Config.load("configs/no-such-config.yaml")  # a path is a path: it is not looked up by name


def test_a_user_yaml_path_with_dots(tmp_path):
    p = tmp_path / "my.run.v2.yaml"
    p.write_text("name: mine\nfusion:\n  reasoner_weight: 0.3\n")
    assert Config.load(p).fusion.reasoner_weight == 0.3
    assert Config.load(str(p)).name == "mine"
    assert Config.load(str(tmp_path / "my.run.v2")).name == "mine"  # the suffix may be left off a path


def test_a_user_yaml_without_name_is_named_after_its_file_and_bare_off_reads_as_off(tmp_path):
    """PyYAML reads a bare `off` as false: for a setting that has an "off" choice that is what was meant
    (the README's own snippet); a file without `name:` is not recorded as the shipped default."""
    p = tmp_path / "group-shots.yaml"
    p.write_text("faces: {small_faces: off, max_faces: 4}\n")
    cfg = Config.load(p)
    assert cfg.faces.small_faces == "off" and cfg.faces.max_faces == 4 and cfg.name == "group-shots"
    assert Config.load("default", faces__small_faces=False).faces.small_faces == "off"
    with pytest.raises(ConfigError, match="small_faces"):
        Config.load("default", faces__small_faces=True)
    with pytest.raises(ConfigError, match="detector"):
        Config.load("default", faces__detector=False)  # no "off" choice: false is an error, not a guess
    # a name YAML reads as a boolean cannot be recovered (off? no? false?): the error says to quote it
    p.write_text("name: off\n")
    with pytest.raises(ConfigError, match=r"name: YAML reads this name as the boolean False; put it in quotes"):
        Config.load(p)
    p.write_text("name: 'off'\n")
    assert Config.load(p).name == "off"
    p.write_text("name: 2024\n")
    assert Config.load(p).name == "2024"  # a number is meant as text


@pytest.mark.parametrize("name", ["default", "vllm"])
def test_pipeline_from_config_by_name_builds(name):
    with cem.Pipeline.from_config(name) as p:
        assert p.config.name == name and p.reasoner.backend == Config.load(name).reasoner.backend


@pytest.mark.slow
@pytest.mark.parametrize("name", LLM_LOCAL)
def test_pipeline_from_config_llm_by_name_reaches_model_loading(name, monkeypatch):
    """The API as the README shows it: the config is found, its reasoner is built, and the model (not
    downloaded here) is what is missing, with how to get it."""
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    from cem.reasoning.llm import ModelUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = Config.load(name).reasoner.model
    with pytest.raises(ModelUnavailableError, match=f"{model}.*hf download {model}"):
        cem.Pipeline.from_config(name)


def _cem(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cem.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(cem.__file__).parents[1]), **(env or {})})


@pytest.fixture(scope="module")
def astronaut_jpg(tmp_path_factory):
    from PIL import Image
    from skimage import data

    p = tmp_path_factory.mktemp("img") / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(p)
    return p


@pytest.mark.parametrize("name", ["default", "default.yaml"])
def test_cli_annotate_with_rules_config_by_name(name, astronaut_jpg, tmp_path):
    out = tmp_path / "o.jsonl"
    r = _cem("annotate", str(astronaut_jpg), "-o", str(out), "--config", name)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["provenance"]["config"] == "default" and rec["faces"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LLM_LOCAL)
def test_cli_annotate_llm_config_by_name_reaches_model_loading(name, astronaut_jpg, tmp_path):
    """The config is found and accepted; the run stops at the model, which is not downloaded here."""
    r = _cem("annotate", str(astronaut_jpg), "-o", str(tmp_path / "o.jsonl"), "--config", name,
             env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "not found" not in r.stderr.replace("couldn't find", "")
    model = Config.load(name).reasoner.model
    assert model in r.stderr and f"hf download {model}" in r.stderr, r.stderr


def test_cli_vllm_config_by_name_is_accepted(astronaut_jpg, tmp_path):
    """With no server the run fails at the server (pre-flight or per face), never at the config's name."""
    out = tmp_path / "o.jsonl"
    r = _cem("annotate", str(astronaut_jpg), "-o", str(out), "--config", "vllm",
             env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},)
    assert "not found" not in r.stderr
    if r.returncode == 0 or out.exists():
        rec = json.loads(out.read_text().splitlines()[0])
        assert rec["provenance"]["config"] == "vllm"
        assert all(f.get("error", "").startswith("reasoner") or "reasoner" in f.get("error", "")
                   for f in rec["faces"])
    else:
        assert "127.0.0.1" in r.stderr or "server" in r.stderr


# ------------------------------------------------------------------------------------------ validation
def _yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, field, problem", [
    ("faces:\n  max_faces: 2.9\n", "faces.max_faces", "expected an integer, got 2.9"),
    ("faces:\n  max_faces: true\n", "faces.max_faces", "expected an integer, got True"),
    ("faces:\n  max_faces: 0\n", "faces.max_faces", "must be >= 1"),
    ("faces:\n  min_score: 1.5\n", "faces.min_score", "must be <= 1.0"),
    ("faces:\n  min_score: yes\n", "faces.min_score", "expected a number, got True"),
    ("faces:\n  mode: crop\n", "faces.mode", "expected one of 'detect', 'whole'"),
    ("fusion:\n  temperature: .nan\n", "fusion.temperature", "expected a finite number, got nan"),
    ("fusion:\n  temperature: .inf\n", "fusion.temperature", "expected a finite number, got inf"),
    ("fusion:\n  temperature: 0\n", "fusion.temperature", "must be > 0.0"),
    ("fusion:\n  temperature: '1.0'\n", "fusion.temperature", "expected a number, got '1.0'"),
    ("fusion:\n  reasoner_weight: -1\n", "fusion.reasoner_weight", "must be >= 0.0"),
    ("fusion:\n  fitted_on: 3\n", "fusion.fitted_on", "expected a string or null, got 3"),
    ("fusion:\n  label_map: {pride: 3}\n", "fusion.label_map.pride", "expected a string, got 3"),
    ("expression:\n  weights: [a]\n", "expression.weights", "expected a string or null"),
    ("reasoner:\n  model: 7\n", "reasoner.model", "expected a string or null, got 7"),
    ("reasoner:\n  backend: rulez\n", "reasoner.backend", "did you mean 'rules'"),
    ("reasoner:\n  options: {batch_size: 2}\n", "reasoner.options.batch_size", "not an option of the rules"),
    ("reasoner:\n  backend: transformers\n  options: {batch_size: 2.5}\n", "reasoner.options.batch_size",
     "expected an integer, got 2.5"),
    ("reasoner:\n  backend: transformers\n  options: {dtype: float64}\n", "reasoner.options.dtype",
     "expected one of 'auto', 'float32'"),
    ("reasoner:\n  backend: transformers\n  options: {likelihood_temperature: .nan}\n",
     "reasoner.options.likelihood_temperature", "finite"),
    ("reasoner:\n  backend: transformers\n  options: {do_sampel: true}\n", "reasoner.options.do_sampel",
     "did you mean 'do_sample'"),
    ("reasoner:\n  backend: openai\n  options: {concurrency: 0}\n", "reasoner.options.concurrency", "must be >= 1"),
    ("reasoner:\n  backend: openai\n  options: {deadline_s: .inf}\n", "reasoner.options.deadline_s", "finite"),
    ("reasoner:\n  backend: openai\n  options: {timeout_s: 5, deadline_s: 6}\n", "reasoner.options",
     "the same option"),
    ("reasoner:\n  backend: openai\n  options: {guided: 1}\n", "reasoner.options.guided", "expected true or false"),
    ("reasoner:\n  backend: openai\n  options: {exemplars: [{image: a.jpg}]}\n", "reasoner.options.exemplars[0]",
     "missing label"),
    ("expression:\n  threads: 100000\n", "expression.threads", "<= 1024"),
    ("fusion:\n  expression_weight: 0\n  reasoner_weight: 0\n", "fusion", "both 0"),
    ("expression:\n  device: CPU\n", "expression.device", "did you mean 'cpu'"),
    ("expression:\n  device: gpu\n", "expression.device", "did you mean 'cuda'"),
    ("labels: [happiness, happiness]\n", "labels", "duplicate"),
    ("labels: []\n", "labels", "non-empty list"),
    ("fusion:\n  label_map: {pride: happiness}\n", "fusion.label_map", "not among labels"),
    ("facez:\n  mode: whole\n", "facez", "did you mean 'faces'"),
    ("faces:\n  max_face: 3\n", "max_face", "did you mean 'max_faces'"),
])
def test_bad_value_names_file_field_and_problem(tmp_path, text, field, problem):
    p = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        Config.load(p)
    msg = str(e.value)
    assert str(p) in msg and field in msg and problem in msg, msg


def test_a_config_file_that_sets_a_few_fields_keeps_the_defaults_of_the_rest(tmp_path):
    """A file with only `faces: {small_faces: "off"}` (as the README suggests) pooled with 0.5 / 1.0 instead of
    the default config's fitted fusion: two faces of forty changed their top emotion. Only what the file sets
    differs from the default config; every shipped config says its own fusion."""
    import dataclasses

    import yaml

    from cem.config import shipped_configs

    p = _yaml(tmp_path, 'faces: {small_faces: "off"}\n')
    mine, default = dataclasses.asdict(Config.load(p)), dataclasses.asdict(Config.load("default"))
    assert mine["faces"] == default["faces"] | {"small_faces": "off"}
    differ = {k for k in default if mine[k] != default[k]} - {"faces", "name", "source"}
    assert differ == {"fusion"} and mine["fusion"] == default["fusion"] | {"fitted_on": None}
    for name in shipped_configs():
        cfg = Config.load(name)
        assert "fusion" in yaml.safe_load(open(cfg.source, encoding="utf-8")), cfg.source
    # a model reasoner's own file without fusion pools as the shipped model configs do, not with the rules' fit
    p = _yaml(tmp_path, "reasoner:\n  backend: openai\n  model: m\n")
    fusion = Config.load(p).fusion
    assert (fusion.reasoner_weight, fusion.temperature) == (0.5, 1.0)
    assert (Config.load("vllm").fusion.reasoner_weight, Config.load("vllm").fusion.temperature) == (0.5, 1.0)


def test_overrides_are_checked_too():
    with pytest.raises(ConfigError, match=r"default.yaml \(override\): faces.max_faces: expected an integer"):
        Config.load("default", faces__max_faces=2.9)
    with pytest.raises(ConfigError, match="fusion.temperature: expected a finite number"):
        Config.load("default", fusion__temperature=math.nan)
    with pytest.raises(ConfigError, match="faces.mode"):
        Config.load("default", faces="crop")
    cfg = Config.load("default", fusion__temperature=2)  # an int is a valid float
    assert cfg.fusion.temperature == 2.0 and isinstance(cfg.fusion.temperature, float)


def test_sections_check_on_construction():
    assert FusionConfig(1.0, 0.5, 2).temperature == 2.0  # positional construction still works
    with pytest.raises(ConfigError, match="FusionConfig.temperature: expected a finite number"):
        FusionConfig(1.0, 0.5, math.inf)
    with pytest.raises(ConfigError, match="FusionConfig.reasoner_weight: expected a number, got True"):
        FusionConfig(1.0, True)


def test_a_config_edited_in_code_is_checked_when_used():
    cfg = Config.load("default")
    cfg.fusion.temperature = math.nan
    with pytest.raises(ConfigError, match="default.yaml: fusion.temperature: expected a finite number"):
        cem.Pipeline(cfg)


def test_options_are_typed_and_normalised():
    cfg = Config.load("vllm")
    opts = cfg.backend_options()
    assert isinstance(opts, OpenAIOptions) and opts.deadline_s == 120.0  # the file says timeout_s: 120
    plain = cfg.reasoner.options
    assert plain["deadline_s"] == 120.0 and "timeout_s" not in plain and plain["concurrency"] == 8
    from cem.reasoning.llm import options

    assert options(cfg) == plain and options(cfg) is not plain  # backends get a plain copy
    t = Config.load("smolvlm").backend_options()
    assert isinstance(t, TransformersOptions) and t.batch_size == 2 and t.quantization is None
    assert "quantization" not in Config.load("smolvlm").reasoner.options  # unset values are left out


def test_answer_bounds_defaults_match_the_grammar_defaults():
    from cem.reasoning.answer import MAX_CUES, MAX_TEXT

    t = TransformersOptions()
    assert (t.max_cues, t.max_text_chars) == (MAX_CUES, MAX_TEXT)


def test_switching_backend_by_override_drops_the_files_options():
    cfg = Config.load("vllm", reasoner="rules")
    assert cfg.reasoner.backend == "rules" and cfg.reasoner.options == {}
    cfg = Config.load("default", reasoner="openai", reasoner__options={"base_url": "http://x/v1"})
    assert cfg.reasoner.options["base_url"] == "http://x/v1"


def test_one_backend_registry():
    """Backend names are listed in one place: the CLI's choices and the error messages come from it."""
    import cem.cli
    from cem.reasoning import make_reasoner

    assert list(BACKENDS) == ["rules", "transformers", "openai"]
    opt = next(o for o in cem.cli.annotate.params if o.name == "reasoner")
    assert list(opt.type.choices) == list(BACKENDS)
    r = make_reasoner(Config.load("default"))
    assert type(r) is BACKENDS["rules"].load_class()
    src = "".join(p.read_text() for p in (Path(cem.__file__).parent).rglob("*.py") if p.name != "config.py")
    assert '"rules", "transformers", "openai"' not in src and "'rules', 'transformers', 'openai'" not in src


# ------------------------------------------------------------------------------------- label_map end to end
def test_label_map_reaches_the_record(astronaut):
    labels = ["neutral", "happiness", "surprise", "sadness", "anger", "pride", "awe"]
    cfg = Config.from_dict({"labels": labels, "fusion": {"label_map": {"pride": "happiness"}}}, source="<test>")
    with cem.Pipeline(cfg) as p:
        d = p.analyze(astronaut).to_dict()
    face = d["faces"][0]
    # written probabilities are rounded to 1e-5 each (cem.contract), so the sum is 1 within n * 5e-6
    assert list(face["emotion"]) == labels and abs(sum(face["emotion"].values()) - 1) <= len(labels) * 5e-6
    # the expression model lacks pride and awe: 0 in its distribution, no error
    assert face["expression"]["pride"] == 0 and face["expression"]["awe"] == 0 and "error" not in face
    # pride pools as happiness (the astronaut smiles), awe (unmapped) gets no expression mass
    assert face["emotion"]["pride"] > 0.1 and face["emotion"]["pride"] > 100 * face["emotion"]["awe"]
    assert face["top_emotion"] in ("happiness", "pride") and face["top_emotion"] in face["rationale"]


def test_image_max_side_is_typed_bounded_and_reaches_the_loader(tmp_path):
    from PIL import Image

    from cem.io import MAX_SIDE
    from cem.pipeline import Pipeline

    assert Config.load("default").image.max_side == MAX_SIDE
    with pytest.raises(ConfigError, match=rf"image.max_side: must be <= {MAX_SIDE}, got 70000"):
        Config.load("default", image__max_side=70000)
    with pytest.raises(ConfigError, match="image.max_side"):
        Config.load("default", image__max_side=0)
    Image.new("RGB", (300, 40)).save(tmp_path / "w.png")
    m = Pipeline(Config.load("default", image__max_side=200), load_fer=False).measure(tmp_path / "w.png")
    assert m.error is not None and "limit 200 px per side" in m.error


def test_a_local_file_named_like_a_shipped_config(tmp_path, monkeypatch, caplog):
    """`--config default.yaml` is the shipped config even when the folder has a default.yaml (documented);
    cem says so, and `./default.yaml` loads the local one, recorded under its path, not as "default"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default.yaml").write_text("faces: {max_faces: 3}\n")
    with caplog.at_level("WARNING", logger="cem.config"):
        shipped = Config.load("default.yaml")
    assert shipped.faces.max_faces == 32 and "pass ./default.yaml for it" in caplog.text
    local = Config.load("./default.yaml")
    assert local.faces.max_faces == 3 and local.name == "default.yaml"


def test_settings_the_rules_reasoner_would_not_use_are_errors_and_a_label_map_must_reach_a_label(tmp_path):
    """A prompt template or a model device given to the rules reasoner was recorded and silently unused; a
    label mapped to a label that does not exist got 5e-7."""
    # the problem is the override's, and the message says so (it blamed the shipped file)
    with pytest.raises(ConfigError, match=r"default.yaml with template='no_such_template': reasoner.template "
                                          r"'no_such_template': the rules reasoner uses no"):
        Config.load("default", template="no_such_template")
    with pytest.raises(ConfigError, match=r"reasoner.device 'cuda:7'"):
        Config.load("default", reasoner__device="cuda:7")
    assert Config.load("default", device="cpu").expression.device == "cpu"  # the shortcut: the CNN's device
    switched = Config.load("qwen2.5-vl-7b", reasoner="rules")  # the file's prompt and device were its model's
    assert switched.reasoner.template is None and switched.reasoner.device is None
    mapped = tmp_path / "pride.yaml"
    mapped.write_text("labels: [neutral, happiness, pride]\nfusion: {label_map: {pride: banana}}\n")
    with pytest.raises(ConfigError, match=r"fusion.label_map: \{'pride': 'banana'\} map to labels that are not"):
        Config.load(mapped)
    mapped.write_text("labels: [neutral, happiness, pride]\nfusion: {label_map: {pride: happiness}}\n")
    assert Config.load(mapped).fusion.label_map == {"pride": "happiness"}


def test_a_config_file_that_is_not_utf8_yaml_or_expands_without_end_is_a_clear_error(tmp_path):
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_text("name: mine\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=r"utf16.yaml: not UTF-8 text .*save it as UTF-8 YAML"):
        Config.load(utf16)
    bom = tmp_path / "bom.yaml"
    bom.write_text("name: mine\n", encoding="utf-8-sig")
    assert Config.load(bom).name == "mine"
    lines = ["x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"  # 700 bytes that expand to 10**9 values (it took minutes and GBs)
    bomb.write_text("name: bomb\nreasoner:\n  options:\n    device_map:\n" + "".join(f"      {x}\n" for x in lines))
    with pytest.raises(ConfigError, match=r"expands to more than 100000 values"):
        Config.load(bomb)
    long_value = tmp_path / "long.yaml"
    long_value.write_text("name: [" + ", ".join(["x"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as e:
        Config.load(long_value)
    assert len(str(e.value)) < 600  # the value is shown shortened


def test_a_key_given_twice_is_an_error_and_names_differ_only_in_case_and_suffix(tmp_path):
    """PyYAML keeps the last of two equal keys silently (the first setting was ignored); `default.YAML` was
    refused where `DEFAULT` was taken; a Config object can be passed to from_config."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: mine\nfaces:\n  min_score: 0.5\n  min_score: 0.9\n")
    with pytest.raises(ConfigError, match=r"line 4: the key 'min_score' is given again \(first on line 3\)"):
        Config.load(dup)
    dup.write_text("name: mine\nfaces: {min_score: 0.5, min_score: 0.9}\n")
    with pytest.raises(ConfigError, match="given again"):
        Config.load(dup)
    merged = tmp_path / "merge.yaml"  # a YAML merge key and an override of one of its keys is not a repeat
    merged.write_text("name: mine\nfaces: {<<: {min_score: 0.5, max_faces: 4}, max_faces: 6}\n")
    loaded = Config.load(merged)
    assert loaded.faces.min_score == 0.5 and loaded.faces.max_faces == 6
    merged.write_text("name: mine\nfusion: {<<: {temperature: 2}, <<: {temperature: 3}}\n")
    with pytest.raises(ConfigError, match=r"the merge key '<<' is given again"):
        Config.load(merged)
    for typed in ("default.YAML", "Default.yaml", "DEFAULT", "default.yml", "Default.YML"):
        assert Config.load(typed).name == "default", typed


def test_pipeline_from_config_takes_a_loaded_config(monkeypatch):
    import cem.pipeline

    built = []
    monkeypatch.setattr(cem.pipeline.Pipeline, "__init__", lambda self, cfg, **kw: built.append(cfg))
    cfg = Config.load("default")
    cfg.faces.max_faces = 3
    cem.Pipeline.from_config(cfg, faces="whole")
    assert built[0].faces.max_faces == 3 and built[0].faces.mode == "whole"
    assert cfg.faces.mode == "detect"  # the caller's config is left as it was
    with pytest.raises(TypeError, match="takes a config name, a YAML path or a Config, not NoneType"):
        cem.Pipeline.from_config(None)


@pytest.mark.parametrize("labels, why", [
    (["NEUTRAL", "HAPPINESS"], "did you mean 'neutral'"),
    (["neutral", 'say "hi"'], "quotes"),
    (["neutral", "a\\b"], "backslashes"),
    (["positive", "negative"], "none of ['positive', 'negative'] is a label of the expression model"),
])
def test_labels_the_models_cannot_use_are_refused_at_load(labels, why, tmp_path):
    from cem.config import Config, ConfigError

    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"name": "mine", "labels": labels}))  # JSON is YAML
    with pytest.raises(ConfigError, match=re.escape(why)):
        Config.load(str(path))


def test_own_labels_mapped_to_the_models_load(tmp_path):
    from cem.config import Config

    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"name": "mine", "labels": ["pride", "happiness", "neutral"],
                                "fusion": {"label_map": {"pride": "happiness"}}}))
    assert Config.load(str(path)).labels == ["pride", "happiness", "neutral"]


@pytest.mark.parametrize("text, words", [
    ("fusion: {label_map: " + "[" * 5000 + "]" * 5000 + "}\n", "nests deeper than Python can read"),
    ("faces: {max_faces: " + "9" * 5000 + "}\n", "holds a number of more than 4,300 digits"),
    ("faces: {yes: 1}\n", "faces (YAML reads an unquoted yes/no/on/off as true/false): unknown key True"),
    ("faces: {1: 2}\n", "faces: unknown key 1; known: mode"),
    ("reasoner: {backend: openai, options: {deadline_s: 1.0e+10}}\n", "deadline_s: must be <= 86400.0"),
    ("reasoner: {backend: openai, options: {backoff_s: 1.0e+12}}\n", "backoff_s: must be <= 86400.0"),
    ("reasoner: {backend: openai, options: {deadline_s: 1e3}}\n",
     "expected a number, got '1e3' (YAML reads 1e3 as text: write it with a dot and a sign"),
], ids=["deep", "5000-digits", "yes-key", "int-key", "deadline-1e10", "backoff-1e12", "1e3"])
def test_config_files_that_crashed_the_loader_are_named_errors(tmp_path, text, words):
    """Deep nesting (RecursionError), a 5,000-digit number (ValueError), keys YAML reads as true or 1
    (TypeError), and waits beyond what time and sleep take (OverflowError in every request) were tracebacks."""
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        Config.load(p)
    assert words in str(e.value) and "x.yaml" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "cem", "check", "--config", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr


def test_config_paths_as_shells_leave_them(tmp_path, monkeypatch):
    """`--config=~/x.yaml` (no shell expands a ~ after =) and `--config <(...)` (a pipe, /dev/fd/N) were
    "no such file"; a folder is said to be one."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "mine.yaml").write_text("name: mine\nfaces: {max_faces: 3}\n")
    monkeypatch.setenv("HOME", str(home))
    assert Config.load("~/mine.yaml").faces.max_faces == 3
    r = subprocess.run(["bash", "-c", f"{sys.executable} -m cem check --config <(cat {home / 'mine.yaml'})"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        Config.load(tmp_path / "folder.yaml")
