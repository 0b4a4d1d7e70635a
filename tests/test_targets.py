"""Targets instead of thresholds: whole-model expert and parameter targets with uniform or global
allocation, a mean top-k chosen per layer, and sweeps that expand into variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import (
    ARCHITECTURE_TYPES,
    assert_same_model,
    context_with_inputs,
    logits,
    tiny_model_of,
    validated_step,
)
from moe_compress.architectures import adapter_for
from moe_compress.cache import build_cache, read_router_cache
from moe_compress.config import validate_config
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.allocation import ExpertBudget, allocate, expert_budget
from moe_compress.methods.routing import top_k_errors
from moe_compress.modelio import count_parameters, load_model, save_checkpoint
from moe_compress.stats import expert_frequency

pytestmark = pytest.mark.numeric


def kept_per_layer(model) -> dict[int, int]:
    adapter = adapter_for(model.config)
    return {layer: adapter.block_num_experts(block) for layer, block in adapter.moe_blocks(model).items()}


def parameter_count(model) -> int:
    return count_parameters(model)


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_expert_targets_are_met_on_every_architecture(model_type, allocation):
    model = tiny_model_of(model_type)
    layers = len(kept_per_layer(model))  # 8 experts each, top-2
    for target, expected in (({"experts_fraction": 0.75}, 6 * layers), ({"experts": 6 * layers - 1}, None)):
        pruned = tiny_model_of(model_type)
        step = validated_step("random_prune", target=target, allocation=allocation, seed=3)
        report = apply_steps(pruned, [step], CompressionContext.for_model(pruned))[0]
        kept = kept_per_layer(pruned)
        assert report["kept_per_layer"] == {str(layer): count for layer, count in kept.items()}
        assert report["achieved"]["experts"] == sum(kept.values())
        assert report["achieved"]["parameters"] == parameter_count(pruned)
        if expected is not None:  # divisible: met exactly either way
            assert sum(kept.values()) == expected
        elif allocation == "global":  # one ranking over all layers: met exactly
            assert sum(kept.values()) == 6 * layers - 1 and "note" not in report
        else:  # the same fraction per layer: the nearest, and the report says so
            assert sum(kept.values()) == 6 * layers
            assert report["note"].startswith(f"{6 * layers} experts kept for a target of {6 * layers - 1}")


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_parameter_budget_is_kept_within_to_the_expert(model_type, allocation):
    model = tiny_model_of(model_type)
    budget = expert_budget(model, CompressionContext.for_model(model))
    size = next(iter(budget.size.values()))
    # a budget between two expert counts: the largest choice within it
    limit = budget.parameters({layer: 5 for layer in budget.count}) + size // 2
    step = validated_step("random_prune", target={"parameters": limit}, allocation=allocation)
    report = apply_steps(model, [step], CompressionContext.for_model(model))[0]
    achieved = parameter_count(model)
    assert achieved == report["achieved"]["parameters"] <= limit
    assert achieved + size > limit  # one more expert would not fit
    with pytest.raises(ModelError, match="below what the model keeps with every MoE layer at its top-k floor"):
        allocate({"parameters": 10}, allocation, {layer: np.ones(8) for layer in budget.count}, budget)


def test_global_allocation_never_takes_a_layer_below_its_top_k():
    # layer 0: one expert takes everything; a global ranking would keep only that one, the floor keeps 2
    budget = ExpertBudget(fixed=0, count={0: 8, 1: 8}, size={0: 10, 1: 10}, floor={0: 2, 1: 2})
    scores = {0: np.array([100.0, 0, 0, 0, 0, 0, 0, 0]), 1: np.ones(8)}
    uniform, _ = allocate({"experts": 8}, "uniform", scores, budget)
    kept, report = allocate({"experts": sum(uniform.values())}, "global", scores, budget)
    assert uniform == {0: 4, 1: 4}
    assert kept == {0: 2, 1: 6} and report["at_floor"] == [0] and report["achieved"]["experts"] == 8
    kept, report = allocate({"experts": 3}, "global", scores, budget)  # below the floors: the floors win
    assert kept == {0: 2, 1: 2} and report["note"].startswith("4 experts kept for a target of 3")


def test_global_allocation_compares_layers_by_their_normalised_score():
    budget = ExpertBudget(fixed=0, count={0: 4, 1: 4}, size={0: 1, 1: 1}, floor={0: 1, 1: 1})
    # layer 1's scores are ten times layer 0's but the same shape: normalised, the layers are alike
    scores = {0: np.array([4.0, 3, 2, 1]), 1: np.array([40.0, 30, 20, 10])}
    kept, _ = allocate({"experts": 6}, "global", scores, budget)
    assert kept == {0: 3, 1: 3}
    scores = {0: np.array([4.0, 3, 2, 1]), 1: np.array([10.0, 1, 1, 1])}  # layer 1 concentrated
    kept, _ = allocate({"experts": 6}, "global", scores, budget)
    assert kept == {0: 4, 1: 2}


def test_frequency_and_reap_keep_the_most_used_experts_for_a_target(tmp_path):
    model = tiny_model_of("qwen3_moe")
    ids = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    build_cache(model, ids, 4, tmp_path / "cache")
    stats = expert_frequency(read_router_cache(tmp_path / "cache"))
    step = validated_step("frequency_prune", target={"experts_fraction": 0.5}, allocation="global")
    report = apply_steps(model, [step], CompressionContext.for_model(model, stats))[0]
    assert report["achieved"]["experts"] == 8 and report["allocation"] == "global"
    usage = stats.assign(share=stats["selected"] / stats.groupby("layer")["selected"].transform("sum"))
    kept = {(int(layer), expert) for layer, experts in report["kept_original_ids"].items() for expert in experts}
    dropped = usage[[(row.layer, row.expert) not in kept for row in usage.itertuples()]]
    floors_only = {int(layer) for layer in report["at_floor"]}
    competing = usage[[(row.layer, row.expert) in kept and row.layer not in floors_only for row in usage.itertuples()]]
    assert competing["share"].min() >= dropped["share"].max()  # every kept competitor beats every dropped one


def test_merging_to_a_target(tmp_path, tokenizer):
    model = tiny_model_of("qwen3_moe")
    step = validated_step("hc_merge", target={"experts_fraction": 0.75}, allocation="global", merge="frequency")
    report = apply_steps(model, [step], context_with_inputs(model))[0]
    assert sum(kept_per_layer(model).values()) == report["achieved"]["experts"] == 12
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert_same_model(load_model(tmp_path / "ckpt"), model, torch.randint(0, 300, (2, 8)))


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_a_mean_top_k_takes_experts_where_the_output_changes_least(tmp_path, model_type, tokenizer):
    model = tiny_model_of(model_type)
    context = context_with_inputs(model)
    adapter = adapter_for(model.config)
    layers = sorted(adapter.moe_blocks(model))
    errors = {layer: top_k_errors(adapter, block, context.split_inputs(layer)[0])
              for layer, block in adapter.moe_blocks(model).items()}
    report = apply_steps(model, [validated_step("active_experts", target_mean=1.5)], context)[0]
    ks = {int(layer): k for layer, k in report["top_k_per_layer"].items()}
    assert sorted(ks) == layers and set(ks.values()) <= {1, 2}
    assert sum(ks.values()) == round(1.5 * len(layers))
    assert report["achieved_mean"] == pytest.approx(sum(ks.values()) / len(layers), abs=1e-6)
    cost = {layer: errors[layer][1] for layer in layers}  # the error of going from 2 to 1 expert
    assert max(cost[layer] for layer in layers if ks[layer] == 1) <= min(cost[layer] for layer in layers
                                                                          if ks[layer] == 2)
    assert {layer: adapter.router_of(block).top_k for layer, block in adapter.moe_blocks(model).items()} == ks
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["loader"] == ("remote_code" if len(set(ks.values())) > 1 else "stock")
    assert_same_model(load_model(tmp_path / "ckpt"), model, torch.randint(0, 300, (2, 8)))


def test_a_mean_top_k_at_the_current_top_k_changes_nothing():
    model = tiny_model_of("qwen3_moe")
    ids = torch.randint(0, 300, (2, 8))
    before = logits(model, ids)
    apply_steps(model, [validated_step("active_experts", target_mean=2)], context_with_inputs(model))
    assert torch.equal(before, logits(model, ids))


def config_with(variants: dict, **sections) -> dict:
    return validate_config({"model": {"path": "demo"}, "calibration": {}, "variants": variants, **sections})


def test_a_sweep_expands_into_named_variants_in_order():
    config = config_with({
        "base": {"steps": []},
        "reap": {"method": "reap_prune", "target": {"experts_fraction": [0.9, 0.5]}, "allocation": ["uniform", "global"]},
        "freq": {"method": "frequency_prune", "min_fraction": [0.01, 0.02]},
        "two": {"steps": [{"method": "active_experts", "k": [2, 1]}, {"method": "dynamic_skip", "beta": [0.1, 0.2]}]},
        "drop": {"method": "drop_layers", "layers": [1]},  # a list-valued option is not a sweep
    }, evaluation={"variants": ["base", "freq"]})
    assert list(config["variants"]) == [
        "base", "reap-experts_fraction0.9-uniform", "reap-experts_fraction0.9-global",
        "reap-experts_fraction0.5-uniform", "reap-experts_fraction0.5-global", "freq-min_fraction0.01",
        "freq-min_fraction0.02", "two-k2-beta0.1", "two-k2-beta0.2", "two-k1-beta0.1", "two-k1-beta0.2", "drop"]
    assert config["variants"]["reap-experts_fraction0.5-global"]["steps"][0]["target"] == {"experts_fraction": 0.5}
    # a line runs along the first numeric option; the other values name it
    assert config["variants"]["two-k1-beta0.2"]["sweep"] == "two-beta0.2" and "sweep" not in config["variants"]["drop"]
    assert config["variants"]["reap-experts_fraction0.5-global"]["sweep"] == "reap-global"
    assert config["variants"]["freq-min_fraction0.02"]["sweep"] == "freq"
    assert config["evaluation"]["variants"] == ["base", "freq-min_fraction0.01", "freq-min_fraction0.02"]
    assert config == config_with({  # deterministic
        "base": {"steps": []},
        "reap": {"method": "reap_prune", "target": {"experts_fraction": [0.9, 0.5]}, "allocation": ["uniform", "global"]},
        "freq": {"method": "frequency_prune", "min_fraction": [0.01, 0.02]},
        "two": {"steps": [{"method": "active_experts", "k": [2, 1]}, {"method": "dynamic_skip", "beta": [0.1, 0.2]}]},
        "drop": {"method": "drop_layers", "layers": [1]},
    }, evaluation={"variants": ["base", "freq"]})


def test_bad_sweeps_and_targets_name_the_key():
    with pytest.raises(ConfigError, match=r"'variants.freq.steps\[0\].min_fraction': an empty list"):
        config_with({"base": {"steps": []}, "freq": {"method": "frequency_prune", "min_fraction": []}})
    with pytest.raises(ConfigError, match=r"'variants.freq-min_fraction1.5.steps\[0\].min_fraction': 1.5 is greater"):
        config_with({"base": {"steps": []}, "freq": {"method": "frequency_prune", "min_fraction": [0.5, 1.5]}})
    with pytest.raises(ConfigError, match="'variants.freq': a value is listed twice"):
        config_with({"base": {"steps": []}, "freq": {"method": "frequency_prune", "min_fraction": [0.5, 0.5]}})
    with pytest.raises(ConfigError, match="variant 'freq-min_fraction0.5' is also written as a variant"):
        config_with({"base": {"steps": []}, "freq-min_fraction0.5": {"steps": []},
                     "freq": {"method": "frequency_prune", "min_fraction": [0.5]}})
    with pytest.raises(ConfigError, match=r"'variants.t.steps\[0\].allocation': only valid with target"):
        config_with({"base": {"steps": []}, "t": {"method": "random_prune", "keep": 4, "allocation": "global"}})
    with pytest.raises(ConfigError, match=r"'variants.t.steps\[0\].target.experts_fraction': 0 is less than or equal"):
        config_with({"base": {"steps": []}, "t": {"method": "random_prune", "target": {"experts_fraction": 0}}})
