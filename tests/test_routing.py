"""Fewer active experts and their mitigations, REAP pruning, layer dropping and dtype: identities that
must hold bit for bit, fitted quantities that must not make things worse, and save/reload round trips."""

import pytest
import torch

from helpers import (
    ARCHITECTURE_TYPES,
    assert_same_model,
    context_with_inputs,
    logits,
    saved_tensor_count,
    tiny_model_of,
    validated_steps,
)
from moe_compress.architectures import adapter_for
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import apply_steps
from moe_compress.methods.routing import auto_beta
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.stats import expert_saliency

pytestmark = pytest.mark.numeric

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def full_context(model, tokens=192):
    context = context_with_inputs(model, tokens, device=model.device)
    context.calibration_ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    return context


def round_trip(model, tmp_path, tokenizer, dtype="float32"):
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["parameters"] == saved_tensor_count(tmp_path / "ckpt")
    reloaded = load_model(tmp_path / "ckpt", dtype=dtype, device=str(model.device))
    assert_same_model(reloaded, model, IDS)
    # remote-code checkpoints keep transformers' fused experts kernels (grouped_mm), not the eager loop
    assert reloaded.config._experts_implementation == model.config._experts_implementation
    return record


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_own_top_k_and_beta_zero_reproduce_the_base_logits_bitwise(tmp_path, model_type, tokenizer, device):
    model = tiny_model_of(model_type).to(device)
    expected = logits(model, IDS)
    top_k = adapter_for(model.config).top_k(model.config)
    reports = apply_steps(model, validated_steps({"method": "active_experts", "k": top_k},
                                       {"method": "dynamic_skip", "beta": 0}), full_context(model))
    assert torch.equal(logits(model, IDS), expected)  # the same weights, kernels and shapes: bit for bit
    assert all(error == 0 for error in reports[-1]["reconstruction_error"].values())
    assert all(active == top_k for active in reports[-1]["active_experts_mean"].values())
    assert round_trip(model, tmp_path, tokenizer)["loader"] == "remote_code"  # the skip router travels along


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_fewer_active_experts_with_each_mitigation_round_trip(tmp_path, model_type, tokenizer, device):
    model = tiny_model_of(model_type, top_k=3).to(device)
    reports = apply_steps(model, validated_steps({"method": "active_experts", "k": 2}, {"method": "renormalize"},
                                       {"method": "output_rescale"}),
                          full_context(model))
    assert all(active == 2 for active in reports[0]["active_experts_mean"].values())
    record = round_trip(model, tmp_path / "a", tokenizer)
    assert record["loader"] == "stock" and record["active_experts"] == 2  # plain config expresses all of it
    skipping = tiny_model_of(model_type, top_k=3).to(device)
    reports = apply_steps(skipping, validated_steps({"method": "dynamic_skip", "beta": "auto", "target_active": 2.0}),
                          full_context(skipping))
    for active in reports[0]["active_experts_mean"].values():
        assert 1.6 < active < 2.4  # fitted on the fit tokens, measured on held-out ones
    round_trip(skipping, tmp_path / "b", tokenizer)


def test_auto_beta_hits_the_target_on_its_own_tokens():
    weights = torch.softmax(torch.randn(1000, 4, generator=torch.Generator().manual_seed(0)) * 2, dim=-1)
    for target in (1.0, 1.5, 2.25, 3.0, 4.0):
        beta = auto_beta(weights, target)
        kept = (weights >= beta * weights.max(dim=-1, keepdim=True).values).sum(dim=-1).float().mean()
        assert float(kept) == pytest.approx(target, abs=2e-3)


@pytest.mark.parametrize("granularity", ["channel", "scalar"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_output_rescale_never_increases_calibration_error(model_type, granularity, device):
    model = tiny_model_of(model_type, top_k=3).to(device)
    report = apply_steps(model, validated_steps({"method": "active_experts", "k": 1},
                                      {"method": "output_rescale", "granularity": granularity}),
                         full_context(model))
    reduced, rescaled = report
    for layer, facts in rescaled["layers"].items():
        assert facts["fit_error_after"] <= facts["fit_error_before"] + 1e-12
        assert rescaled["reconstruction_error"][layer] <= reduced["reconstruction_error"][layer] + 1e-6
        assert facts["heldout_error_after" if facts["applied"] else "heldout_error_before"] == pytest.approx(
            rescaled["reconstruction_error"][layer], rel=1e-4)


def test_reap_saliency_equals_a_brute_force_computation(device):
    model = tiny_model_of("qwen3_moe")
    adapter = adapter_for(model.config)
    inputs = {layer: torch.randn(50, 32, generator=torch.Generator().manual_seed(layer))
              for layer in adapter.moe_blocks(model)}
    table = expert_saliency(model.to(device), {layer: hidden.to(device) for layer, hidden in inputs.items()})
    for layer, block in adapter.moe_blocks(model.cpu()).items():  # the reference: on the CPU, token by token
        experts, router = adapter.experts_of(block), adapter.router_of(block)
        torch.set_grad_enabled(False)
        totals, counts = torch.zeros(8, dtype=torch.float64), torch.zeros(8)
        for x in inputs[layer].requires_grad_(False):  # token by token, expert by expert, from the raw weight tensors
            probs = torch.softmax(router.weight @ x, dim=-1)
            top = torch.topk(probs, 2)
            weights = top.values / top.values.sum()
            for weight, expert in zip(weights, top.indices):
                gate, up = (experts.gate_up_proj[expert] @ x).chunk(2)
                output = experts.down_proj[expert] @ (torch.nn.functional.silu(gate) * up)
                totals[expert] += float(weight) * float(output.norm())
                counts[expert] += 1
        expected = torch.where(counts > 0, totals / counts.clamp_min(1), torch.zeros_like(totals))
        torch.set_grad_enabled(True)
        ours = torch.tensor(table[table["layer"] == layer]["reap_saliency"].to_numpy())
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


def test_reap_prune_keeps_the_most_salient_experts_and_round_trips(tmp_path, tokenizer, device):
    model = tiny_model_of("mixtral").to(device)
    context = full_context(model)
    context.stats = expert_saliency(model, context.moe_inputs)
    report = apply_steps(model, validated_steps({"method": "reap_prune", "keep": 5}), context)[0]
    for layer, kept in report["kept_original_ids"].items():
        saliency = context.stats[context.stats["layer"] == int(layer)]["reap_saliency"]
        assert sorted(kept) == sorted(saliency.nlargest(5).index.map(lambda i: int(context.stats.loc[i, "expert"])))
    assert round_trip(model, tmp_path, tokenizer)["loader"] == "stock"


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_dropping_zero_layers_is_identity_and_dropping_layers_round_trips(tmp_path, model_type, tokenizer, device):
    model = tiny_model_of(model_type).to(device)
    expected = logits(model, IDS)
    apply_steps(model, validated_steps({"method": "drop_layers", "count": 0}), full_context(model))
    assert torch.equal(logits(model, IDS), expected)
    report = apply_steps(model, validated_steps({"method": "drop_layers", "count": 1}), full_context(model))[0]
    assert len(report["dropped_layers"]) == 1 and model.config.num_hidden_layers == 2
    assert len(report["similarity"]) == 3
    # generation indexes the KV cache by layer: it must run after the drop
    model.generate(IDS[:, :4].to(device), max_new_tokens=3, do_sample=False)
    assert round_trip(model, tmp_path, tokenizer)["loader"] == "stock"


def test_dropping_an_explicit_layer_keeps_the_layer_pattern():
    model = tiny_model_of("qwen3_moe")  # layer 1 is dense (mlp_only_layers=[1])
    apply_steps(model, validated_steps({"method": "drop_layers", "layers": [0]}), full_context(model))
    assert model.config.mlp_only_layers == [0] and model.config.num_hidden_layers == 2
    assert list(adapter_for(model.config).moe_blocks(model)) == [1]
    with pytest.raises(ModelError, match=r"step 0 \(drop_layers\).layers, MoE layer 1: \[5\] are not decoder layers"):
        apply_steps(model, validated_steps({"method": "drop_layers", "layers": [5]}), full_context(model))


def test_dtype_cast_is_the_last_step_and_round_trips(tmp_path, tokenizer, device):
    model = tiny_model_of("olmoe").to(device)
    reports = apply_steps(model, validated_steps({"method": "active_experts", "k": 2}, {"method": "dtype", "dtype": "bfloat16"}),
                          full_context(model))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(0 < error < 0.1 for error in reports[-1]["reconstruction_error"].values())
    round_trip(model, tmp_path, tokenizer, dtype="bfloat16")
    with pytest.raises(ConfigError, match="dtype must be the last step"):
        validated_steps({"method": "dtype", "dtype": "bfloat16"}, {"method": "renormalize"})
    with pytest.raises(ConfigError, match="target_active.*required with beta: auto"):
        validated_steps({"method": "dynamic_skip", "beta": "auto"})
