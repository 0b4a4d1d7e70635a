"""Low-rank experts: full rank reproduces every expert, the factored forward equals the dense forward
of the rebuilt weights (for every factor layout, with skipped slots, on the grouped_mm kernel and on its
fallback, in fp32 and bf16), parameter counts are the saved tensors', and checkpoints round-trip."""

import copy
import functools

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
from moe_compress.remote_code import moe_compress_layers as layers
from moe_compress.remote_code.moe_compress_layers import convert_to_low_rank, factor_names, is_low_rank

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


# --- the grouped forward against an independent dense reference ------------------------------------------

TOKENS, TOP_K = 24, 4


@functools.cache
def stock_experts(model_type):
    """The stock routed experts of a tiny ``model_type`` layer (copied by each test), and its adapter."""
    model = tiny_model_of(model_type)
    adapter = adapter_for(model.config)
    return adapter.experts_of(adapter.moe_blocks(model)[0]), adapter


def low_rank_experts(model_type, rank, shared, dtype, seed=0):
    """The routed experts of a tiny ``model_type`` layer with random rank-``rank`` factors (``shared``: the
    shared side of (gate_up, down), as the spec names it) and, where the architecture has them, biases
    large enough that a lost or doubled bias shows."""
    stock, adapter = stock_experts(model_type)
    experts = copy.deepcopy(stock)
    generator = torch.Generator().manual_seed(seed)
    factors, specs = {}, {}
    for name, side in zip(adapter.expert_matrices, shared):
        shape = getattr(experts, name).shape
        out_features, in_features = (shape[2], shape[1]) if getattr(experts, "is_transposed", False) else shape[1:]
        left_count, right_count = (1 if side == which else experts.num_experts for which in ("left", "right"))
        left = torch.randn(left_count, out_features, rank, generator=generator) * rank ** -0.5
        right = torch.randn(right_count, rank, in_features, generator=generator) * in_features ** -0.5
        factors[name] = (left.to(dtype), right.to(dtype))
        specs[name] = {"rank": rank, "shared": side}
        bias = getattr(experts, f"{name}_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=generator))
    experts.to(dtype)
    convert_to_low_rank(experts, factors, specs, adapter.expert_matrices)
    return experts, adapter.expert_matrices


def routing(num_experts, dtype, seed=0):
    """Top-k routing of TOKENS tokens with skipped slots (index num_experts, weight 0, as the skip router
    marks them): some tokens lose a slot, one loses all."""
    generator = torch.Generator().manual_seed(seed)
    weights, index = torch.rand(TOKENS, num_experts, generator=generator).softmax(-1).topk(TOP_K, dim=-1)
    skipped = torch.rand(TOKENS, TOP_K, generator=generator) < 0.3
    skipped[:, 0] = False
    skipped[5] = True
    index = torch.where(skipped, num_experts, index)
    weights = torch.where(skipped, 0.0, weights).to(dtype)
    return index, weights


def inputs(experts, matrices, dtype):
    hidden_size = getattr(experts, factor_names(matrices[0])[1]).shape[-1]
    return torch.randn(TOKENS, hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)


def dense_reference(experts, matrices, hidden, index, weights):
    """The block output from the rebuilt dense matrices L_e R_e, one token and slot at a time, in float64;
    the gate is the architecture's own."""
    with torch.no_grad():
        return _dense_reference(experts, matrices, hidden, index, weights)


def _dense_reference(experts, matrices, hidden, index, weights):
    gate_up, down = matrices
    dense = {name: (getattr(experts, factor_names(name)[0]).double() @ getattr(experts, factor_names(name)[1]).double())
             .expand(experts.num_experts, -1, -1) for name in matrices}
    bias = {name: getattr(experts, f"{name}_bias", None) for name in matrices}
    output = torch.zeros(hidden.shape, dtype=torch.float64)
    for token in range(hidden.shape[0]):
        x = hidden[token].double()
        for slot in range(index.shape[1]):
            expert = int(index[token, slot])
            if expert == experts.num_experts:
                continue
            y = dense[gate_up][expert] @ x
            if bias[gate_up] is not None:
                y = y + bias[gate_up][expert].double()
            y = dense[down][expert] @ experts._apply_gate(y)
            if bias[down] is not None:
                y = y + bias[down][expert].double()
            output[token] += float(weights[token, slot]) * y
    return output


# the shared side of (gate_up, down): per-expert factors, the shared bases svd_experts makes (one input
# basis for gate_up, one output basis for down), and the opposite sides, which the forward also accepts
SHARINGS = [(None, None), ("right", "left"), ("left", "right")]
# qwen3_moe: no biases; gpt_oss: transposed storage, interleaved gate/up with a clamped gate, biases
MODELS = ["qwen3_moe", "gpt_oss"]


@pytest.fixture
def poisoned_tail(monkeypatch):
    """grouped_mm leaves the rows past the last group (the skipped slots) unwritten: fill them with NaN, so
    a forward that lets them reach the output fails whatever the allocator happened to leave there."""
    grouped_mm = torch.nn.functional.grouped_mm

    def poisoned(mat_a, mat_b, *, offs, **kwargs):
        out = grouped_mm(mat_a, mat_b, offs=offs, **kwargs)
        out[int(offs[-1]):] = float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", poisoned)


def grouped_and_reference(model_type, rank, shared, dtype):
    """The low-rank forward and the float64 dense loop on the same experts and routing."""
    experts, matrices = low_rank_experts(model_type, rank, shared, dtype)
    index, weights = routing(experts.num_experts, dtype)
    hidden = inputs(experts, matrices, dtype)
    with torch.no_grad():
        output = experts(hidden, index, weights)
    assert output.dtype == dtype and torch.all(output[5] == 0)  # every slot of token 5 skipped
    return output, dense_reference(experts, matrices, hidden, index, weights)


def relative_error_of(output, reference):
    return float((output.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("shared", SHARINGS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("rank", [8, 5], ids=["aligned_rank", "odd_rank"])
@pytest.mark.parametrize("kernel", [True, False], ids=["grouped_mm", "no_grouped_mm"])
def test_grouped_forward_matches_a_dense_loop_fp32(model_type, shared, rank, kernel, monkeypatch, poisoned_tail):
    if not kernel:  # a torch without the kernel: every product takes the per-expert fallback
        monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    output, reference = grouped_and_reference(model_type, rank, shared, torch.float32)
    # fp32 rounds each of about 6 intermediate results (two factor products per matrix, gate, weighting,
    # slot sum) to 2^-24 ~ 6e-8 relative, in sums of at most 128 terms: a few 1e-7 of the output scale;
    # 2e-6 bounds that, and a wrong expert, factor, bias, weight or a bf16 intermediate is far above it
    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=2e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("shared", SHARINGS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("rank", [8, 5], ids=["aligned_rank", "odd_rank"])
def test_grouped_forward_matches_a_dense_loop_bf16(model_type, shared, rank, poisoned_tail):
    # the reference runs on the very bf16 values upcast, so only the forward's own roundings differ: bf16
    # keeps 8 bits (unit roundoff 2^-9 ~ 2e-3) and about 6 intermediate results are rounded to it, a few
    # 2^-9 in norm; 2e-2 (10 units) bounds that, and a wrong expert, factor or bias is of order 1
    output, reference = grouped_and_reference(model_type, rank, shared, torch.bfloat16)
    assert relative_error_of(output, reference) < 2e-2


@pytest.mark.parametrize("shared", SHARINGS, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_aligned_ranks_run_every_factor_on_the_pairs_as_one_grouped_mm(shared, dtype, monkeypatch):
    """The fast path cannot silently regress to the fallback: with aligned shapes each factor applied to the
    pairs is exactly one grouped_mm call, and the per-expert fallback (the host read of the group ends)
    never runs."""
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm

    def spy(mat_a, mat_b, **kwargs):
        calls.append(tuple(mat_b.shape))
        return grouped_mm(mat_a, mat_b, **kwargs)

    def no_fallback(self):
        raise AssertionError("the per-expert fallback ran although grouped_mm accepts these shapes")

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", spy)
    monkeypatch.setattr(layers._ExpertGroups, "spans", no_fallback)
    experts, matrices = low_rank_experts("qwen3_moe", 8, shared, dtype)
    index, weights = routing(experts.num_experts, dtype)
    with torch.no_grad():
        experts(inputs(experts, matrices, dtype), index, weights)
    # a shared input basis of gate_up and a shared output basis of down act per token (plain matmuls); every
    # other factor acts on the sorted pairs, a shared one expanded over the experts
    per_pair = 4 - (shared[0] == "right") - (shared[1] == "left")
    assert len(calls) == per_pair and all(shape[0] == experts.num_experts for shape in calls)


def test_odd_rank_falls_back_once_per_forward_and_keeps_the_kernel_where_it_can(monkeypatch):
    """An odd rank puts the left factors (rank-strided) on the per-expert fallback, with one read of the
    group ends for the whole forward; the right factors (hidden- and width-strided) stay on the kernel."""
    experts, matrices = low_rank_experts("qwen3_moe", 5, (None, None), torch.float32)
    index, weights = routing(experts.num_experts, torch.float32)
    hidden = inputs(experts, matrices, torch.float32)
    reads, calls = [], []
    tolist, grouped_mm = torch.Tensor.tolist, torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    monkeypatch.setattr(torch.nn.functional, "grouped_mm",
                        lambda mat_a, mat_b, **kwargs: calls.append(1) or grouped_mm(mat_a, mat_b, **kwargs))
    with torch.no_grad():
        experts(hidden, index, weights)
    assert len(calls) == 2 and len(reads) == 1
