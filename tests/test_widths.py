"""prune_heads, reduce_hidden and prune_expert_width on the tiny model of every architecture they apply to:
full settings change nothing, reduced settings reload from the saved checkpoint as the model in memory, and
the checkpoint stores exactly the model's parameters."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    ALL_ARCHITECTURE_TYPES,
    DENSE_TYPES,
    assert_same_model,
    context_with_inputs,
    make_tokenizer,
    saved_tensor_count,
    tiny_model_of,
    validated_step,
)
from moe_compress.architectures import adapter_for
from moe_compress.cache import build_cache, read_moe_inputs, read_router_cache
from moe_compress.config import ConfigError, check_variants_against_model, check_variants_against_model_class
from moe_compress.errors import ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.attention_heads import head_importance
from moe_compress.methods.common import head_counts
from moe_compress.methods.expert_width import linear_matrices, neuron_importance
from moe_compress.modelio import count_parameters, load_model, model_shape, save_checkpoint
from moe_compress.stats import expert_frequency

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
CALIBRATION = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
# prune_heads needs per-head blocks in the projections; phi3 fuses q, k and v in one
# OLMoE normalises the whole key projection with a norm sized hidden_size // heads * kv_heads (not head_dim),
# which no smaller config can describe: both steps are refused, naming that tensor
REFUSED = {"prune_heads": {"phi3": "qkv_proj", "olmoe": "k_norm"}, "reduce_hidden": {"olmoe": "k_norm"}}
DECODER_TYPES = ALL_ARCHITECTURE_TYPES + DENSE_TYPES


def calibrated_context(model) -> CompressionContext:
    if adapter_for(model.config).moe:
        context = context_with_inputs(model)
    else:
        context = CompressionContext.for_model(model)
    context.calibration_ids = CALIBRATION
    return context


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_varied_norms(model):
    """Norm weights away from 1 (random init leaves them at 1, which hides a wrongly cut norm)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def reload_checks(model, tmp_path):
    record = save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {})
    assert record["parameters"] == count_parameters(model) == saved_tensor_count(tmp_path / "ckpt")
    reloaded = load_model(tmp_path / "ckpt")
    assert_same_model(reloaded, model, IDS)
    return record


FULL = {
    "prune_heads": {"fraction": 1.0},
    "reduce_hidden": {"fraction": 1.0},
    "prune_expert_width": {"fraction": 1.0},
}


def reduced(method: str, model) -> dict:
    if method == "prune_heads":
        return {"keep": 2}  # 4 query heads over 2 key-value heads: one per group
    if method == "reduce_hidden":
        return {"keep": 24}
    return {"keep": 8}


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_prune_heads_full_is_identity_and_reduced_reloads(model_type, tmp_path):
    model = with_varied_norms(tiny_model_of(model_type))
    if model_type in REFUSED["prune_heads"]:
        with pytest.raises(ModelError, match=rf"{model_type}: .*{REFUSED['prune_heads'][model_type]}.* does not apply"):
            apply_steps(model, [validated_step("prune_heads", **FULL["prune_heads"])], calibrated_context(model))
        return
    before = logits(model)
    apply_steps(model, [validated_step("prune_heads", **FULL["prune_heads"])], calibrated_context(model))
    assert torch.equal(logits(model), before)
    heads, kv_heads, _ = head_counts(model.config)
    # one query head per key-value group, or (multi-head attention: groups of one) half the heads
    keep, gqa = (kv_heads, "within_groups") if kv_heads < heads else (heads // 2, "whole_groups")
    apply_steps(model, [validated_step("prune_heads", keep=keep, gqa=gqa)], calibrated_context(model))
    assert model.config.num_attention_heads == keep
    assert model.config.num_key_value_heads == (kv_heads if gqa == "within_groups" else keep)
    assert count_parameters(model) < count_parameters(tiny_model_of(model_type))
    assert reload_checks(model, tmp_path)["loader"] == "stock"


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_reduce_hidden_full_is_identity_and_reduced_reloads(model_type, tmp_path):
    model = with_varied_norms(tiny_model_of(model_type))
    if model_type in REFUSED["reduce_hidden"]:
        with pytest.raises(ModelError, match=rf"{model_type}: .*{REFUSED['reduce_hidden'][model_type]}.* does not apply"):
            apply_steps(model, [validated_step("reduce_hidden", **FULL["reduce_hidden"])], calibrated_context(model))
        return
    before = logits(model)
    apply_steps(model, [validated_step("reduce_hidden", **FULL["reduce_hidden"])], calibrated_context(model))
    assert torch.equal(logits(model), before)
    apply_steps(model, [validated_step("reduce_hidden", keep=24)], calibrated_context(model))
    assert model.config.hidden_size == 24
    assert reload_checks(model, tmp_path)["loader"] == "stock"


@pytest.mark.parametrize("model_type", ALL_ARCHITECTURE_TYPES)
def test_prune_expert_width_full_is_identity_and_reduced_reloads(model_type, tmp_path):
    model = tiny_model_of(model_type)
    before = logits(model)
    apply_steps(model, [validated_step("prune_expert_width", **FULL["prune_expert_width"])], calibrated_context(model))
    assert torch.equal(logits(model), before)
    apply_steps(model, [validated_step("prune_expert_width", keep=8)], calibrated_context(model))
    adapter = adapter_for(model.config)
    assert {adapter.block_expert_width(block) for block in adapter.moe_blocks(model).values()} == {8}
    reload_checks(model, tmp_path)


# --- what each step keeps -----------------------------------------------------------------------------

def test_head_importance_is_the_mean_norm_of_each_heads_output_contribution():
    model = tiny_model_of("llama")
    attention = model.model.layers[1].self_attn
    seen = []
    handle = attention.o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    handle.remove()
    outputs = torch.cat(seen).reshape(-1, 4, 8).double()  # [tokens, heads, head_dim]
    weight = attention.o_proj.weight.double()
    expected = torch.stack([(outputs[:, head] @ weight[:, head * 8:(head + 1) * 8].T).norm(dim=-1).mean()
                            for head in range(4)])
    measured = head_importance(model, {1: "model.layers.1.self_attn.o_proj"}, 4, CALIBRATION)[1]
    torch.testing.assert_close(measured, expected, rtol=1e-9, atol=0)


def silence_heads(model, heads):
    """Zero the output-projection columns of ``heads`` in every layer: those heads contribute nothing."""
    with torch.no_grad():
        for layer in model.model.layers:
            for head in heads:
                layer.self_attn.o_proj.weight[:, head * 8:(head + 1) * 8] = 0


def test_pruning_silent_heads_is_lossless_and_keeps_the_kv_heads():
    model = tiny_model_of("llama")  # 4 query heads over 2 key-value heads
    silence_heads(model, [0, 3])  # one per group
    before = logits(model)
    report = apply_steps(model, [validated_step("prune_heads", keep=2)], calibrated_context(model))[0]
    assert {tuple(layer["kept_heads"]) for layer in report["layers"].values()} == {(1, 2)}
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # both key-value heads kept
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)  # fp32, other shapes


def test_whole_groups_drop_the_weaker_group_with_its_kv_head():
    model = tiny_model_of("llama")
    silence_heads(model, [0, 1])  # group 0 says nothing
    before = logits(model)
    report = apply_steps(model, [validated_step("prune_heads", keep=2, gqa="whole_groups")],
                         calibrated_context(model))[0]
    assert {tuple(layer["kept_heads"]) for layer in report["layers"].values()} == {(2, 3)}
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def silence_channels(model, channels):
    """Zero ``channels`` of the residual stream: the embedding columns and every row written into them."""
    adapter = adapter_for(model.config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "mlp.down_proj.weight", "shared_expert.down_proj.weight")):
                parameter[channels] = 0
        for block in adapter.moe_blocks(model).values():
            adapter.experts_of(block).down_proj[:, channels] = 0


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_removing_silent_channels_is_lossless(model_type):
    """Channels that hold nothing are the ones removed, and the norms' correction for the smaller width
    (sqrt(H / H') here, where the removed channels held no energy) keeps every output as it was."""
    model = with_varied_norms(tiny_model_of(model_type))
    with torch.no_grad():  # activations of a trained model's size, next to which the norms' epsilon is negligible
        model.model.embed_tokens.weight.mul_(20)
    silent = list(range(3, 32, 4))  # 8 channels
    silence_channels(model, silent)
    before = logits(model)
    report = apply_steps(model, [validated_step("reduce_hidden", keep=24)], calibrated_context(model))[0]
    assert report["removed_channels"] == silent
    assert set(report["norm_scale"].values()) == {round((32 / 24) ** 0.5, 6)}
    # fp32 rounding over other shapes, plus the norms' epsilon, now added to a mean over fewer channels
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-5)


def test_neuron_importance_against_a_per_token_reference():
    model = tiny_model_of("qwen3_moe")
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[0]
    experts = adapter.experts_of(block)
    hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(2))
    _, weights, indices = adapter.call_router(block, hidden)
    expected = torch.zeros(8, 16, dtype=torch.float64)
    for token in range(40):
        for slot in range(indices.shape[1]):
            expert = int(indices[token, slot])
            gate, up = (experts.gate_up_proj[expert] @ hidden[token]).double().chunk(2)
            activation = torch.nn.functional.silu(gate) * up
            expected[expert] += float(weights[token, slot]) * activation.abs()
    expected = expected / 40 * experts.down_proj.double().norm(dim=1)
    torch.testing.assert_close(neuron_importance(adapter, block, hidden), expected, rtol=1e-6, atol=1e-9)


def silence_neurons(model, neurons):
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for block in adapter.moe_blocks(model).values():
            adapter.experts_of(block).down_proj[:, :, neurons] = 0


def test_cutting_silent_neurons_is_lossless_and_stock():
    model = tiny_model_of("qwen3_moe")  # 16 neurons per expert
    silent = list(range(1, 16, 2))
    silence_neurons(model, silent)
    before = logits(model)
    apply_steps(model, [validated_step("prune_expert_width", keep=8)], calibrated_context(model))
    adapter = adapter_for(model.config)
    for block in adapter.moe_blocks(model).values():
        gate_up, down = linear_matrices(adapter, adapter.experts_of(block))
        assert down.shape[-1] == 8 and gate_up.shape[1] == 16
        assert down.abs().sum(dim=1).gt(0).all()  # only the silent neurons went
    assert model.config.moe_intermediate_size == 8  # the config field sizes only the routed experts
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_a_width_the_config_cannot_state_goes_through_remote_code(tmp_path):
    model = tiny_model_of("deepseek_v3")  # moe_intermediate_size also sizes the shared experts
    apply_steps(model, [validated_step("prune_expert_width", keep=8)], calibrated_context(model))
    assert model.config.moe_intermediate_size == 16
    record = reload_checks(model, tmp_path)
    assert record["loader"] == "remote_code" and set(record["expert_width_per_layer"].values()) == {8}


def test_global_allocation_gives_the_louder_layer_more_neurons(tmp_path):
    model = tiny_model_of("mixtral")  # 64 neurons per expert, three MoE layers
    with torch.no_grad():
        model.model.layers[2].mlp.experts.down_proj.mul_(10)
    apply_steps(model, [validated_step("prune_expert_width", keep=32, allocation="global")],
                calibrated_context(model))
    adapter = adapter_for(model.config)
    widths = {layer: adapter.block_expert_width(block) for layer, block in adapter.moe_blocks(model).items()}
    assert sum(widths.values()) == 3 * 32 and widths[2] > 32
    assert all(width % 8 == 0 for width in widths.values())
    assert reload_checks(model, tmp_path)["loader"] == "remote_code"


def test_the_steps_compose_and_reload(tmp_path):
    model = tiny_model_of("qwen3_moe")
    steps = [validated_step("prune_heads", keep=2), validated_step("reduce_hidden", keep=24),
             validated_step("prune_expert_width", keep=8), validated_step("frequency_prune", top_k=2, keep=6,
                                                                          uniform=True),
             validated_step("svd_experts", rank=4)]
    build_cache(model, CALIBRATION, 4, tmp_path / "cache")
    context = CompressionContext.for_model(model, stats=expert_frequency(read_router_cache(tmp_path / "cache")),
                                           moe_inputs=read_moe_inputs(tmp_path / "cache"), heldout_fraction=0.25,
                                           calibration_ids=CALIBRATION)
    reports = apply_steps(model, steps, context)
    assert all(report["reconstruction_error"] for report in reports)
    record = reload_checks(model, tmp_path)
    assert record["loader"] == "remote_code"  # low-rank experts


# --- parse time ---------------------------------------------------------------------------------------

def saved_tiny(model_type, tmp_path):
    model = tiny_model_of(model_type)
    model.save_pretrained(tmp_path / model_type)
    return tmp_path / model_type


def test_a_dense_decoder_refuses_moe_steps_by_name(tmp_path):
    shape = model_shape(saved_tiny("llama", tmp_path))
    assert shape["moe"] is False and shape["num_experts"] == 0
    check_variants_against_model({"v": {"steps": [validated_step("drop_layers", count=1),
                                                  validated_step("prune_heads", keep=2),
                                                  validated_step("reduce_hidden", keep=24)]}}, **shape)
    with pytest.raises(ConfigError, match=r"variants.v.steps\[0\].method': frequency_prune needs MoE layers; llama "
                                          r"is a dense decoder \(steps for any decoder: drop_layers, dtype, "
                                          r"prune_heads, reduce_hidden\)"):
        check_variants_against_model({"v": {"steps": [validated_step("frequency_prune", top_k=2, keep=4, uniform=True)]}},
                                     **shape)


@pytest.mark.parametrize(("step", "message"), [
    ({"method": "prune_heads", "keep": 3},
     r"steps\[0\].keep': 3 query heads cannot be spread evenly over the 2 key-value heads"),
    ({"method": "prune_heads", "keep": 2, "gqa": "whole_groups"}, r"2 query heads are not whole key-value groups of 4"),
    ({"method": "prune_heads", "keep": 12}, r"keeps 12 query heads; the model has 8"),
    ({"method": "reduce_hidden", "keep": 20}, r"keeps 20 channels, not a multiple of 8 .* use 16"),
    ({"method": "reduce_hidden", "keep": 40}, r"keeps 40 channels; the model has 32"),
    ({"method": "prune_expert_width", "keep": 12}, r"keeps 12 neurons per expert, not a multiple of 8"),
])
def test_shape_problems_are_refused_at_parse_time(step, message):
    shape = {"num_experts": 8, "top_k": 2, "num_layers": 3, "hidden_size": 32, "num_attention_heads": 8,
             "num_key_value_heads": 2, "expert_width": 16, "model_type": "qwen3_moe"}
    with pytest.raises(ConfigError, match=message):
        check_variants_against_model({"v": {"steps": [validated_step(**step)]}}, **shape)


def test_a_model_class_that_cannot_be_cut_is_refused_at_parse_time(tmp_path):
    model_dir = saved_tiny("olmoe", tmp_path)
    with pytest.raises(ConfigError, match=r"variants.v.steps\[0\]': olmoe: model.layers.0.self_attn.k_norm.weight"):
        check_variants_against_model_class({"v": {"steps": [validated_step("reduce_hidden", keep=24)]}}, model_dir)


def test_an_expert_no_token_reaches_does_not_sway_the_global_allocation():
    """An unrouted expert is scored by its weights (another scale than routed activations): it orders its own
    neurons, but the global ranking of the layers' neuron slots counts routed experts only."""
    from moe_compress.methods.expert_width import _global_widths
    from moe_compress.methods.registry import ALIGNMENT

    width = 4 * ALIGNMENT
    quiet = torch.ones(3, width)
    quiet[2] = 1000.0  # expert 2 of layer 0: never routed, huge weight-based scores
    loud = torch.full((3, width), 2.0)
    routed = {0: torch.tensor([True, True, False]), 1: torch.tensor([True, True, True])}
    widths = _global_widths({0: quiet, 1: loud}, 4 * ALIGNMENT, routed)
    assert widths == {0: ALIGNMENT, 1: 3 * ALIGNMENT}
    # counted as if routed, it would have taken the slots from the layer the calibration tokens use more
    everyone = {0: torch.ones(3, dtype=torch.bool), 1: torch.ones(3, dtype=torch.bool)}
    assert _global_widths({0: quiet, 1: loud}, 4 * ALIGNMENT, everyone) == {0: 3 * ALIGNMENT, 1: ALIGNMENT}
