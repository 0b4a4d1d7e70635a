"""What the workflow refuses while Snakemake parses it, before any job: each refusal is one line that names the
config key or file, the value, and what to do."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

from helpers import REPO, SNAKEMAKE, make_tokenizer, put_in_hub_cache, write_jsonl
from moe_compress.config import read_config_file, validate_config
from moe_compress.errors import ConfigError, ModelError
from moe_compress.modelio import check_model_dir
from moe_compress.plan import plan_workflow

# the demo: 8 experts per layer, top-2, 2 layers, a context of 64 tokens (its max_position_embeddings is
# demo_model.seq_len); every length below fits it
DEMO = {
    "model": {"path": "demo"},
    "demo_model": {"num_layers": 2, "num_experts": 8, "top_k": 2, "seq_len": 64},
    "calibration": {"seq_len": 64},
    "perplexity": {"seq_len": 64},
    "speed": {"prompt_tokens": 32, "decode_tokens": 32},
    "evaluation": {"tasks": []},
    "variants": {"base": {"steps": []}, "top1": {"method": "active_experts", "k": 1}},
}


def plan(raw: dict, **changes):
    """Plan a copy of ``raw`` with top-level ``changes`` as the submit host does; the environment it sets goes
    to a throwaway dict."""
    return plan_workflow({**copy.deepcopy(raw), **changes}, environ={})


def refusal(raw: dict, error=ConfigError, **changes) -> str:
    with pytest.raises(error) as caught:
        plan(raw, **changes)
    message = str(caught.value)
    assert "\n" not in message
    return message


def edit_config_json(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del config[key]
    (path / "config.json").write_text(json.dumps(config))


# ---- 1. integers are integers ------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, value, expected", [
    ("calibration", "num_samples", 32.0, "config key 'calibration.num_samples': 32.0 is not an integer"),
    ("calibration", "num_samples", True, "config key 'calibration.num_samples': True is not an integer"),
    ("perplexity", "seq_len", 64.0, "config key 'perplexity.seq_len': 64.0 is not an integer"),
    ("evaluation", "limit", 5.0, "config key 'evaluation.limit': 5.0 is not an integer or null"),
])
def test_a_float_where_an_integer_belongs_is_refused(section, key, value, expected):
    raw = copy.deepcopy(DEMO)
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert str(caught.value) == expected


def test_a_float_step_option_is_refused():
    raw = copy.deepcopy(DEMO)
    raw["variants"]["pruned"] = {"method": "reap_prune", "keep": 4.0}
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert str(caught.value) == "config key 'variants.pruned.steps[0].keep': 4.0 is not an integer"


def test_numbers_still_take_integers():
    raw = copy.deepcopy(DEMO)
    raw["variants"]["skip"] = {"method": "dynamic_skip", "beta": 0, "target_active": None}
    raw["compress"] = {"heldout_fraction": 0.5}
    assert validate_config(raw)["variants"]["skip"]["steps"][0]["beta"] == 0


# ---- 2. lengths within the model's context -----------------------------------------------------------------

@pytest.mark.parametrize("changes, key, value", [
    ({"calibration": {"seq_len": 65}}, "calibration.seq_len", "65"),
    ({"perplexity": {"seq_len": 128}}, "perplexity.seq_len", "128"),
])
def test_a_window_longer_than_the_demo_context_is_refused(changes, key, value):
    message = refusal(DEMO, **changes)
    assert message.startswith(f"config key '{key}': {value} is more than the model's context of 64 tokens")
    assert "demo_model.seq_len" in message and "at most 64" in message


def test_speed_prompt_and_decode_tokens_together_must_fit_the_context():
    message = refusal(DEMO, speed={"prompt_tokens": 48, "decode_tokens": 17})
    assert message.startswith("config keys 'speed.prompt_tokens' + 'speed.decode_tokens': 48 + 17 = 65 tokens is "
                              "more than the model's context of 64 tokens")
    assert plan(DEMO, speed={"prompt_tokens": 48, "decode_tokens": 16})  # exactly the context: fine


def test_a_local_model_context_comes_from_its_config_json(tiny_model_dir):
    edit_config_json(tiny_model_dir, max_position_embeddings=32)
    message = refusal(DEMO, model={"path": str(tiny_model_dir)})
    assert message.startswith("config key 'calibration.seq_len': 64 is more than the model's context of 32 tokens")
    assert f"max_position_embeddings in {tiny_model_dir / 'config.json'}" in message
    edit_config_json(tiny_model_dir, max_position_embeddings=None)  # a config.json that does not say: no check
    assert plan(DEMO, model={"path": str(tiny_model_dir)}, calibration={"seq_len": 100000, "num_samples": 1})


# ---- 3. the reference variant ------------------------------------------------------------------------------

def test_score_reference_defaults_to_base():
    assert plan(DEMO).config["score"]["reference"] == "base"


def test_without_a_base_variant_the_reference_must_be_named():
    raw = copy.deepcopy(DEMO)
    del raw["variants"]["base"]
    assert validate_config(raw)  # a config for one method's tests needs no reference; the workflow does
    message = refusal(raw)
    assert message.startswith("config key 'score.reference': there is no variant 'base' to compare against "
                              "(variants: top1)")
    assert "add `base: {steps: []}` under variants, or set score.reference" in message
    assert plan(raw, score={"reference": "top1"}).config["score"]["reference"] == "top1"


def test_a_reference_that_is_no_variant_is_refused():
    message = refusal(DEMO, score={"reference": "full"})
    assert message == "config key 'score.reference': 'full' is not a variant (variants: base, top1)"


def test_base_with_steps_is_refused_as_the_reference():
    raw = copy.deepcopy(DEMO)
    raw["variants"]["base"] = {"method": "active_experts", "k": 1}
    message = refusal(raw)
    assert message.startswith("config key 'variants.base': the reference variant has steps (active_experts), so every "
                              "ratio in the final table would be relative to a compressed model")
    # a variant with steps is the reference only when score.reference names it
    raw["variants"]["full"] = {"steps": []}
    assert plan(raw, score={"reference": "full"})
    assert plan(DEMO, score={"reference": "top1"})


def test_benchmarked_variants_must_include_the_reference():
    raw = copy.deepcopy(DEMO)
    raw["variants"]["full"] = {"steps": []}
    raw["score"] = {"reference": "full"}
    raw["evaluation"] = {"tasks": ["mmlu"], "variants": ["base", "top1"]}
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    assert str(caught.value) == ("config key 'evaluation.variants': must include the reference variant 'full' "
                                 "(score.reference: PerfNorm is relative to it)")


# ---- 4. a local model's files ------------------------------------------------------------------------------

def test_a_local_model_without_weights_is_refused_at_planning(tiny_model_dir):
    (tiny_model_dir / "model.safetensors").unlink()
    message = refusal(DEMO, ModelError, model={"path": str(tiny_model_dir)})
    assert message == (f"model path {tiny_model_dir}: no weights (no model.safetensors or "
                       f"model.safetensors.index.json); copy the model's safetensors files into it")


def test_a_sharded_model_missing_a_shard_is_refused_naming_it(tmp_path, tiny_model):
    path = tmp_path / "sharded"
    tiny_model.save_pretrained(path, max_shard_size="100KB")
    make_tokenizer().save_pretrained(path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    message = refusal(DEMO, ModelError, model={"path": str(path)})
    assert message.startswith(f"model path {path}: 1 of the {len(shards)} weight files that "
                              f"model.safetensors.index.json names are missing ({shards[-1].name})")


def test_a_local_model_without_tokenizer_files_is_refused_at_planning(tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_model_dir / name).unlink(missing_ok=True)
    message = refusal(DEMO, ModelError, model={"path": str(tiny_model_dir)})
    assert message.startswith(f"model path {tiny_model_dir}: no tokenizer files (it needs one of tokenizer.json, "
                              f"tokenizer.model, vocab.json + merges.txt, vocab.txt, *.tiktoken or tekken.json)")


def test_vocab_and_merges_are_a_usable_tokenizer(tiny_model_dir):
    (tiny_model_dir / "tokenizer.json").unlink()
    make_tokenizer().backend_tokenizer.model.save(str(tiny_model_dir))  # vocab.json + merges.txt
    assert check_model_dir(tiny_model_dir, weights=True, tokenizer=True) == tiny_model_dir
    (tiny_model_dir / "merges.txt").unlink()
    with pytest.raises(ModelError, match="no tokenizer files"):
        check_model_dir(tiny_model_dir, tokenizer=True)


def test_a_hub_model_is_planned_from_its_config_alone(offline_hub, tiny_model_dir):
    """Only config.json is on the submit host at planning: weights and tokenizer arrive with fetch_model, but
    the context is known."""
    edit_config_json(tiny_model_dir, max_position_embeddings=32)
    put_in_hub_cache(offline_hub, "tiny-org/config-only", {"config.json": tiny_model_dir / "config.json"})
    raw = {**copy.deepcopy(DEMO), "hf_home": str(offline_hub)}
    message = refusal(raw, model={"path": "tiny-org/config-only"})
    assert message.startswith("config key 'calibration.seq_len': 64 is more than the model's context of 32 tokens")
    assert plan(raw, model={"path": "tiny-org/config-only"}, calibration={"seq_len": 32}, perplexity={"seq_len": 32},
                speed={"prompt_tokens": 16, "decode_tokens": 16})


# ---- 5. YAML errors name the file, the line and the column -------------------------------------------------

def test_a_tab_in_a_config_file_is_named_with_its_line_and_column(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  path: demo\ncalibration:\n  num_samples: 32\n\tseq_len: 16\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert str(caught.value) == (f"{path}, line 5, column 1: not valid YAML: found character '\\t' that cannot start "
                                 f"any token; YAML indents with spaces only, replace the tab")


def test_a_yaml_syntax_error_in_a_config_file_is_one_line_at_planning(tmp_path):
    path = tmp_path / "override.yaml"
    path.write_text("model:\n  path: demo\ncalibration: {num_samples: 32\nvariants:\n  base: {steps: []}\n")
    with pytest.raises(ConfigError) as caught:
        plan_workflow(copy.deepcopy(DEMO), configfiles=[path], environ={})
    assert str(caught.value) == (f"{path}, line 4, column 9: not valid YAML: expected ',' or '}}', but got ':' "
                                 f"(while parsing a flow mapping that starts on line 3)")


@pytest.mark.slow  # a Snakemake run; needs the Snakefile to check config/config.yaml before `configfile:`
def test_a_syntax_error_in_the_default_config_file_is_named_by_the_workflow(tmp_path):
    """Without --configfile the run reads config/config.yaml of the directory it runs in (here tmp_path)."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("model:\n  path: demo\n\tdevice: cpu\n")
    result = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                             "--cores", "1", "-n"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert ("config/config.yaml, line 3, column 1: not valid YAML: found character '\\t' that cannot start any "
            "token") in result.stdout + result.stderr


# ---- data paths: a typo is named, never silently replaced by the outputs of the old path ----------------

@pytest.mark.parametrize("section, key, value", [
    ("calibration", "path", "data/c4/c4_en_train.00000-of-01024_first1000.jsonl.gzz"),
    ("perplexity", "wikitext2_path", "data/wikitext2/missing.txt.gz"),
    ("evaluation", "data_dir", "data/evaluation"),
])
def test_a_data_path_that_names_nothing_is_refused_at_planning(section, key, value):
    changes = {section: {**DEMO.get(section, {}), key: value}}
    if section == "evaluation":
        changes[section]["tasks"] = ["winogrande"]
    message = refusal(DEMO, **changes)
    assert message.startswith(f"config key '{section}.{key}': {value} is not a ")
    assert "relative path starts in the directory Snakemake runs in" in message


def test_a_corpus_smaller_than_its_held_out_part_is_refused_at_planning(tmp_path):
    corpus = write_jsonl(tmp_path / "five.jsonl", [f"document {index} " * 20 for index in range(5)] + ["  "])
    calibration = {**DEMO["calibration"], "path": str(corpus)}
    message = refusal(DEMO, calibration={**calibration, "heldout_docs": 5})
    assert message == (f"config key 'calibration.heldout_docs': 5 held-out documents leave none of the 5 non-empty "
                       f"documents of {corpus} (calibration.path) to calibrate on; hold out at most 4")
    # one document left: enough for one window (the source-size check bounds its tokens by its bytes)
    assert plan(DEMO, calibration={**calibration, "heldout_docs": 4, "num_samples": 1})


# ---- sweeps and variant names -------------------------------------------------------------------------------

def test_a_sweep_over_methods_is_refused_naming_the_key():
    message = refusal(DEMO, variants={"base": {"steps": []},
                                      "pick": {"method": ["reap_prune", "frequency_prune"], "keep": 4}})
    assert message.startswith("config key 'variants.pick.steps[0].method': ['reap_prune', 'frequency_prune'] is not "
                              "one method")


def test_a_list_of_targets_names_each_variant_by_its_target():
    variants = plan(DEMO, variants={"base": {"steps": []}, "t": {
        "method": "reap_prune", "target": [{"experts": 12}, {"experts_fraction": 0.5}]}}).variants
    assert list(variants) == ["base", "t-experts12", "t-experts_fraction0.5"]
    assert variants["t-experts_fraction0.5"][0]["target"] == {"experts_fraction": 0.5}


def test_a_variant_name_too_long_for_a_file_name_is_refused_before_any_job():
    # .<variant>.checksums.json must fit the 255 bytes of a file name: 239 for the variant itself
    longest = "v" * 239
    assert longest in plan(DEMO, variants={"base": {"steps": []}, longest: {"method": "active_experts", "k": 1}}).variants
    message = refusal(DEMO, variants={"base": {"steps": []}, "v" * 240: {"method": "active_experts", "k": 1}})
    assert message.startswith(f"config key 'variants.{'v' * 60}...': the name is 240 bytes")
    assert "use a name of at most 239" in message
    # a sweep's variants are longer than the name written: the sweep is named
    message = refusal(DEMO, variants={"base": {"steps": []}, "s" * 237: {"method": "active_experts", "k": [1, 2]}})
    assert message.startswith(f"config key 'variants.{'s' * 60}...': the sweep's variant {'s' * 60}...")


# ---- whole-model targets against the model's experts and parameters ------------------------------------------

@pytest.mark.parametrize("target, expected", [
    ({"experts": 1000}, "1000 is more than the model's 16 routed experts (2 MoE layers): the variant would prune "
                        "nothing"),
    ({"experts": 3}, "3 is fewer than the 4 experts the 2 MoE layers keep at their top-k floors; ask for at least 4"),
    ({"experts_fraction": 0.2}, "0.2 (3 experts) is fewer than the 4 experts"),
], ids=["above", "below", "fraction_below"])
def test_an_experts_target_the_demo_cannot_meet_is_refused(target, expected):
    (kind, _), = target.items()
    message = refusal(DEMO, variants={"base": {"steps": []}, "t": {"method": "reap_prune", "target": target}})
    assert message.startswith(f"config key 'variants.t.steps[0].target.{kind}': {expected}")
    # after a step that lowers the top-k the floor is the new one's: the job keeps what it can
    assert plan(DEMO, variants={"base": {"steps": []}, "t": {"steps": [
        {"method": "active_experts", "k": 1}, {"method": "reap_prune", "target": {"experts": 3}}]}})


def test_a_parameter_budget_is_checked_against_the_model_at_planning(tiny_model_dir, tiny_model):
    # the reference, from the module tree: each MoE layer's experts are gate_up_proj, down_proj and a router row
    blocks = [layer.mlp for layer in tiny_model.model.layers if hasattr(layer.mlp, "experts")]
    per_expert = [(block.experts.gate_up_proj.numel() + block.experts.down_proj.numel() + block.gate.weight.numel())
                  // block.experts.num_experts for block in blocks]
    total = sum(parameter.numel() for parameter in tiny_model.parameters())
    top_k = tiny_model.config.num_experts_per_tok
    floor = total - sum((block.experts.num_experts - top_k) * size for block, size in zip(blocks, per_expert))
    local = {**DEMO, "model": {"path": str(tiny_model_dir)}, "demo_model": {}}

    def budget(value, steps=()):
        return {"base": {"steps": []}, "t": {"steps": [*steps, {"method": "frequency_prune",
                                                                "target": {"parameters": value}}]}}

    assert refusal(local, variants=budget(floor - 1)) == (
        f"config key 'variants.t.steps[0].target.parameters': {floor - 1} is below what the model keeps with every "
        f"MoE layer at its top-k floor ({floor} parameters); raise the budget to at least {floor}")
    assert refusal(local, variants=budget(total + 1)).startswith(
        f"config key 'variants.t.steps[0].target.parameters': {total + 1} is more than the model's {total} parameters")
    assert plan(local, variants=budget(floor)) and plan(local, variants=budget(total))
    # an earlier step removes parameters: the floor is then known only in the job
    assert plan(local, variants=budget(floor - 1, steps=[{"method": "active_experts", "k": 1}]))
