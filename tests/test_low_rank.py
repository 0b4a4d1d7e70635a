"""Low-rank experts: full rank reproduces every expert, the factored forward equals the dense forward
of the rebuilt weights, parameter counts are the saved tensors', and checkpoints round-trip."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import (
    ARCHITECTURE_TYPES,
    assert_same_model,
    context_with_inputs,
    logits,
    saved_tensor_count,
    tiny_model_of,
)
from moe_compress.architectures import adapter_for
from moe_compress.config import validate_config
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.low_rank import energy_rank, factorize
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.moe_block import block_output
from moe_compress.remote_code.moe_compress_layers import is_low_rank

pytestmark = pytest.mark.numeric


def svd_step(**options):
    raw = {"model": {"path": "demo"}, "calibration": {}, "variants": {"v": {"method": "svd_experts", **options}}}
    return validate_config(raw)["variants"]["v"]["steps"][0]


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shared", [None, "left", "right"])
def test_full_rank_factors_reproduce_every_expert(shared):
    matrices = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = 12 if shared != "right" else 20  # the basis spans the whole output / input space
    left, right, facts = factorize(matrices, rank=full, energy=None, shared=shared)
    torch.testing.assert_close(left @ right, matrices)
    assert facts["weight_error"] < 1e-12 and facts["energy_kept"] == pytest.approx(1.0)
    assert left.shape[0] == (1 if shared == "left" else 5) and right.shape[0] == (1 if shared == "right" else 5)


def test_truncated_svd_is_the_best_rank_r_approximation_and_energy_picks_the_rank():
    generator = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(3, 16, 16, generator=generator, dtype=torch.float64)).Q
    singular = torch.tensor([8.0, 4.0, 2.0, 1.0] + [1e-3] * 12, dtype=torch.float64)
    matrices = u * singular  # singular values known by construction
    left, right, facts = factorize(matrices, rank=2, energy=None, shared=None)
    # Eckart-Young: the error of the best rank-2 approximation is the norm of the dropped singular values
    expected = singular[2:].norm() / singular.norm()
    assert facts["weight_error"] == pytest.approx(float(expected), rel=1e-9)
    # squared: 64, 16, 4, 1 of ~85: rank 3 keeps 98.8%, rank 4 ~100%; summed over experts alike
    assert energy_rank(singular.expand(3, -1), 0.98) == 3 and energy_rank(singular.expand(3, -1), 0.99) == 4
    assert energy_rank(singular, 0.5) == 1


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
@pytest.mark.parametrize("share_basis", [False, True])
def test_full_rank_svd_experts_keep_the_model_and_checkpoint_round_trips(tmp_path, model_type, share_basis, tokenizer,
                                                                        device):
    model = tiny_model_of(model_type).to(device)
    expected = logits(model, IDS)
    full_rank = max(model.config.hidden_size, 2 * 64)  # capped at each matrix's own rank
    apply_steps(model, [svd_step(rank=full_rank, share_basis=share_basis)], CompressionContext.for_model(model))
    adapter = adapter_for(model.config)
    assert all(is_low_rank(adapter.experts_of(block)) for block in adapter.moe_blocks(model).values())
    torch.testing.assert_close(logits(model, IDS), expected, rtol=1e-4, atol=1e-4)
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["loader"] == "remote_code" and record["parameters"] == saved_tensor_count(tmp_path / "ckpt")
    assert_same_model(load_model(tmp_path / "ckpt", device=str(device)), model, IDS)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("share_basis", [False, True])
def test_low_rank_experts_shrink_the_checkpoint(tmp_path, model_type, share_basis, tokenizer, device):
    model = tiny_model_of(model_type).to(device)
    before = sum(p.numel() for p in model.parameters())
    report = apply_steps(model, [svd_step(rank=4, share_basis=share_basis)], context_with_inputs(model, device=device))[0]
    layer = next(iter(report["layers"].values()))
    assert layer["gate_up_proj"]["rank"] == 4 and layer["gate_up_proj"]["parameters_after"] < layer["gate_up_proj"]["parameters_before"]
    assert all(0 < error < 1.5 for error in report["reconstruction_error"].values())
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["parameters"] < before and record["parameters"] == saved_tensor_count(tmp_path / "ckpt")
    assert record["low_rank_per_layer"]["0"]["down_proj"] == {"rank": 4, "shared": "left" if share_basis else None}
    # the checkpoint loads with transformers alone (its own modeling files), and agrees with memory
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).to(device).eval()
    assert_same_model(reloaded, model, IDS)


def test_factored_forward_equals_the_dense_forward_of_the_rebuilt_weights():
    model = tiny_model_of("gpt_oss")  # transposed, interleaved gate/up with biases: the hardest layout
    adapter = adapter_for(model.config)
    apply_steps(model, [svd_step(rank=3)], CompressionContext.for_model(model))
    block = adapter.moe_blocks(model)[0]
    experts = adapter.experts_of(block)
    hidden = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    dense = tiny_model_of("gpt_oss")
    dense_block = adapter.moe_blocks(dense)[0]
    with torch.no_grad():
        dense_block.load_state_dict({k: v for k, v in block.state_dict().items() if "lowrank" not in k}, strict=False)
        for name in adapter.expert_matrices:  # the property rebuilds the dense tensor in stock orientation
            getattr(adapter.experts_of(dense_block), name).copy_(getattr(experts, name))
        torch.testing.assert_close(block_output(block, hidden), block_output(dense_block, hidden), rtol=1e-5, atol=1e-6)


def test_energy_rank_adapts_per_layer_and_later_expert_edits_are_refused():
    model = tiny_model_of("qwen3_moe")
    report = apply_steps(model, [svd_step(energy=0.5)], CompressionContext.for_model(model))[0]
    for layer in report["layers"].values():
        assert layer["down_proj"]["energy_kept"] >= 0.5 and layer["down_proj"]["rank"] < 16
    adapter = adapter_for(model.config)
    with pytest.raises(ModelError, match="before svd_experts"):
        adapter.select_experts(adapter.moe_blocks(model)[0], torch.arange(4))
    with pytest.raises(ConfigError, match="svd_experts needs exactly one of rank or energy"):
        svd_step(rank=2, energy=0.9)
    raw = {"model": {"path": "demo"}, "calibration": {}, "variants": {"v": {"steps": [
        {"method": "svd_experts", "rank": 2}, {"method": "frequency_prune", "min_count": 1}]}}}
    with pytest.raises(ConfigError, match=r"variants.v.steps\[1\].method': frequency_prune cannot follow the low-rank step steps\[0\]"):
        validate_config(raw)
