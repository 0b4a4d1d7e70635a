"""random_prune: a seeded, uniform random choice of experts per layer, the control for pruning criteria."""

import copy
import math

import numpy as np
import pytest
import torch

from helpers import logits, tiny_model_of
from moe_compress.architectures import adapter_for
from moe_compress.config import check_variants_against_model, validate_config
from moe_compress.errors import ConfigError
from moe_compress.methods import CompressionContext, apply_steps

IDS = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(5))


def random_prune(model, keep, seed=0, layers=None):
    context = CompressionContext.for_model(model, layers=layers)
    return apply_steps(model, [{"method": "random_prune", "keep": keep, "seed": seed}], context)[0]


def test_keeps_the_requested_number_of_experts_in_every_layer(device):
    model = tiny_model_of("qwen3_moe").to(device)  # MoE layers 0 and 2, 8 experts, top-2
    report = random_prune(model, keep=5)
    assert report["kept_per_layer"] == {"0": 5, "2": 5}
    adapter = adapter_for(model.config)
    for layer, block in adapter.moe_blocks(model).items():
        assert adapter.block_num_experts(block) == 5
        assert len(set(report["kept_original_ids"][str(layer)])) == 5
    logits(model, IDS)  # the pruned model runs


def test_the_seed_decides_the_choice():
    def kept(seed):
        return random_prune(tiny_model_of("qwen3_moe"), keep=4, seed=seed)["kept_original_ids"]

    assert kept(1) == kept(1)
    assert len({str(kept(seed)) for seed in range(6)}) > 1
    assert kept(1)["0"] != kept(1)["2"] or kept(2)["0"] != kept(2)["2"]  # each layer draws its own


def test_the_choice_is_uniform_over_experts():
    """Over many seeds, each of the 8 experts is kept in 4/8 of them (binomial: 5 standard deviations)."""
    base = tiny_model_of("qwen3_moe")
    seeds, keep, experts = 300, 4, 8
    counts = np.zeros(experts)
    for seed in range(seeds):
        counts[random_prune(copy.deepcopy(base), keep=keep, seed=seed)["kept_original_ids"]["0"]] += 1
    expected = seeds * keep / experts
    assert np.abs(counts - expected).max() < 5 * math.sqrt(seeds * 0.5 * 0.5)


def test_a_per_layer_job_keeps_what_the_whole_model_job_keeps():
    whole = random_prune(tiny_model_of("qwen3_moe"), keep=3, seed=7)
    alone = random_prune(tiny_model_of("qwen3_moe"), keep=3, seed=7, layers={2})
    assert alone["kept_original_ids"] == {"2": whole["kept_original_ids"]["2"]}


def test_keeping_every_expert_leaves_the_logits_bitwise_equal(device):
    model = tiny_model_of("qwen3_moe").to(device)
    before = logits(model, IDS)
    random_prune(model, keep=8)
    assert torch.equal(before, logits(model, IDS))  # the same weights, kernels and shapes


def test_keep_below_top_k_is_raised_to_it():
    report = random_prune(tiny_model_of("qwen3_moe"), keep=1)
    assert report["kept_per_layer"] == {"0": 2, "2": 2} and report["floored_to_top_k"] == [0, 2]


def test_the_config_fills_its_seed_and_refuses_more_experts_than_the_model_has():
    raw = {"model": {"path": "demo"}, "calibration": {},
           "variants": {"base": {"steps": []}, "rand": {"method": "random_prune", "keep": 12}}}
    config = validate_config(raw)
    assert config["variants"]["rand"]["steps"] == [{"method": "random_prune", "keep": 12, "seed": 0}]
    with pytest.raises(ConfigError, match=r"'variants.rand.steps\[0\].keep': 12 is more than the 8 experts"):
        check_variants_against_model(config["variants"], num_experts=8, top_k=2, num_layers=3)
    raw["variants"]["rand"] = {"method": "random_prune"}
    with pytest.raises(ConfigError, match="random_prune needs exactly one of keep or target; got none"):
        validate_config(raw)
