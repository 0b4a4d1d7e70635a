"""The workflow planner (what rules/common.smk runs at every parse): cheap eagerly, the model only when asked."""

import copy

import pytest

from helpers import REPO, make_tokenizer, tiny_model_of
from moe_compress.config import HUB_CALIBRATION_CORPUS, read_config_file
from moe_compress.errors import ConfigError, ModelError
from moe_compress.hub import OFFLINE_ENVIRONMENT
from moe_compress.methods import whole_model_reason
from moe_compress.plan import DEMO_MODEL_DIR, plan_workflow

# the demo: 16 experts per layer, top-4, 4 layers
DEMO = {
    "model": {"path": "demo"},
    "demo_model": {"num_layers": 4, "num_experts": 16, "top_k": 4},
    "calibration": {},
    "evaluation": {"tasks": []},
    "variants": {
        "base": {"steps": []},
        "p": {"method": "frequency_prune", "min_count": 3},
        "drop": {"method": "drop_layers", "count": 1},  # whole-model steps
        "cast": {"method": "dtype", "dtype": "bfloat16"},
        "top2": {"method": "active_experts", "k": 2},
    },
}
LAZY = ("model_config_dir", "model_shape", "moe_layers")


def plan(raw, remote_job=False, **changes):
    """Plan a copy of ``raw`` with top-level ``changes``; the environment it sets goes to a throwaway dict."""
    return plan_workflow({**copy.deepcopy(raw), **changes}, remote_job=remote_job, environ={})


def computed(planned) -> set[str]:
    return {name for name in LAZY if name in planned.__dict__}


def test_demo_config_plans_every_variant_in_one_compress_job_by_default():
    planned = plan(DEMO)
    assert list(planned.variants) == ["base", "p", "drop", "cast", "top2"]
    assert planned.variants["p"] == [{"method": "frequency_prune", "min_count": 3, "uniform": False}]
    assert planned.whole_model_variants == list(planned.variants) and planned.layerwise_variants == []
    assert planned.model_dir == DEMO_MODEL_DIR
    assert planned.calibration_corpus == planned.config["calibration"]["path"]
    assert planned.seeds == {"calibration": 0, "demo_model": 0}
    assert planned.eval_variants == list(planned.variants)  # none listed: all
    assert planned.config["calibration"]["num_samples"] == 64  # defaults filled


def test_per_layer_jobs_split_off_only_variants_that_work_layer_by_layer():
    planned = plan(DEMO, compress={"per_layer_jobs": True})
    assert planned.layerwise_variants == ["base", "p", "top2"]
    assert planned.whole_model_variants == ["drop", "cast"]


def test_the_repository_config_plans_a_partition_of_its_variants():
    raw = read_config_file(REPO / "config" / "config.yaml")
    raw["compress"]["per_layer_jobs"] = True
    planned = plan(raw)
    # the config's variants in order, each sweep expanded where it stands
    written = [name if name in raw["variants"] else name.split("-")[0] for name in planned.variants]
    assert len(written) > len(raw["variants"]) and list(dict.fromkeys(written)) == list(raw["variants"])
    assert sorted(planned.layerwise_variants + planned.whole_model_variants) == sorted(planned.variants)
    assert "base" in planned.layerwise_variants
    for name in planned.whole_model_variants:
        assert any(whole_model_reason(step) for step in planned.variants[name]), name
    assert sorted(planned.eval_variants) == sorted(raw["evaluation"]["variants"])  # in the variants' order
    assert computed(planned) == {"model_config_dir", "model_shape"}  # the shape check, not the layers


def test_planning_leaves_the_config_it_was_given_untouched():
    raw = copy.deepcopy(DEMO)
    plan_workflow(raw, environ={})
    assert raw == DEMO


def test_moe_layers_are_computed_only_when_asked():
    planned = plan(DEMO, compress={"per_layer_jobs": True})
    assert "moe_layers" not in planned.__dict__
    assert planned.moe_layers == [0, 1, 2, 3]
    assert "moe_layers" in planned.__dict__  # once


def test_a_local_model_is_not_read_in_a_remote_job_until_asked(tmp_path):
    (tmp_path / "not_a_model").mkdir()  # exists, but has no config.json
    raw = {**copy.deepcopy(DEMO), "model": {"path": str(tmp_path / "not_a_model")}}
    planned = plan(raw, remote_job=True)
    assert computed(planned) == set()
    assert planned.model_dir == str(tmp_path / "not_a_model")
    assert planned.seeds["demo_model"] is None
    with pytest.raises(ModelError, match="no config.json"):
        planned.moe_layers
    with pytest.raises(ModelError, match="no config.json"):  # on the submit host: at planning time
        plan(raw)


def test_a_local_model_gives_its_shape_and_moe_layers(tiny_model_dir):
    # the tiny Qwen3-MoE: 8 experts, top-2, 3 layers, layer 1 dense; hidden 32, 4 query / 2 key-value heads
    raw = {**copy.deepcopy(DEMO), "model": {"path": str(tiny_model_dir)}, "compress": {"per_layer_jobs": True}}
    del raw["variants"]["top2"]
    planned = plan(raw)
    assert planned.model_shape == {"num_experts": 8, "top_k": 2, "num_layers": 3, "fixed_top_k": None,
                                   "model_type": "qwen3_moe", "moe": True, "hidden_size": 32,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "expert_width": 16}
    assert "moe_layers" not in planned.__dict__
    assert planned.moe_layers == [0, 2]


def test_a_hub_model_is_not_fetched_in_a_remote_job():
    planned = plan(DEMO, remote_job=True, model={"path": "tiny-org/not-cached"})
    assert planned.model_dir == "results/models/hub/tiny-org--not-cached"
    assert computed(planned) == set()


def test_a_variant_beyond_the_demo_model_is_refused_at_planning_naming_the_key():
    raw = copy.deepcopy(DEMO)
    raw["variants"]["top20"] = {"method": "active_experts", "k": 20}
    with pytest.raises(ConfigError, match=r"config key 'variants\.top20\.steps\[0\]\.k'.*16"):
        plan(raw)


def test_a_remote_job_skips_the_shape_check():
    raw = copy.deepcopy(DEMO)
    raw["variants"]["top20"] = {"method": "active_experts", "k": 20}
    planned = plan(raw, remote_job=True)  # the submit host checked before submitting
    assert "top20" in planned.variants and computed(planned) == set()


def test_a_bad_config_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"calibration\.num_samples"):
        plan(DEMO, calibration={"num_samples": "many"})
    with pytest.raises(ConfigError, match=r"config key 'model\.path': '/nowhere/model' is neither"):
        plan(DEMO, model={"path": "/nowhere/model"})


def test_config_files_are_read_again_strictly(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {path: demo}\nvariants:\n  base: {steps: []}\n  base: {steps: []}\n")
    with pytest.raises(ConfigError, match=r"key 'base' is written twice"):
        plan_workflow(copy.deepcopy(DEMO), configfiles=[path], environ={})
    # a path that is no file (Snakemake already reported it, or it is not one) is skipped
    assert plan_workflow(copy.deepcopy(DEMO), configfiles=[tmp_path / "absent.yaml"], environ={})


def test_hub_environment_is_set_in_remote_jobs_too(tmp_path):
    offline = set(OFFLINE_ENVIRONMENT.items())
    hub = {**copy.deepcopy(DEMO), "calibration": {"source": "hub"}, "hf_home": str(tmp_path / "hf")}
    for raw, remote_job, is_offline in [(DEMO, False, True), (DEMO, True, True), (hub, False, False), (hub, True, True)]:
        environ = {}
        planned = plan_workflow(copy.deepcopy(raw), remote_job=remote_job, environ=environ)
        assert "HF_HOME" in environ
        assert (offline <= set(environ.items())) == is_offline, (raw["calibration"], remote_job)
    assert planned.calibration_corpus == HUB_CALIBRATION_CORPUS
    assert environ["HF_HOME"] == str(tmp_path / "hf")


def test_a_dense_model_plans_no_per_layer_jobs(tmp_path):
    """compress.per_layer_jobs splits a variant by MoE layer; a dense decoder has none, so every variant is one
    whole-model job."""
    model_dir = tmp_path / "llama"
    tiny_model_of("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    raw = {**copy.deepcopy(DEMO), "model": {"path": str(model_dir)}, "compress": {"per_layer_jobs": True},
           "variants": {"base": {"steps": []}, "heads": {"method": "prune_heads", "keep": 2}}}
    del raw["demo_model"]
    planned = plan(raw)
    assert not planned.is_moe
    assert planned.layerwise_variants == [] and planned.whole_model_variants == ["base", "heads"]
