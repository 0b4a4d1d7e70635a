"""Low-rank experts: full rank reproduces every expert, the factored forward equals the dense forward
of the rebuilt weights (for every factor layout, with skipped slots, on the grouped_mm kernel and on its
fallback, in fp32 and bf16), parameter counts are the saved tensors', and checkpoints round-trip. The
most-used-expert basis is the layer's most selected expert's, reproduces that expert, and round-trips."""

import copy
import functools

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import (
    ARCHITECTURE_TYPES,
    all_tensors,
    assert_same_model,
    context_with_inputs,
    logits,
    make_tokenizer,
    per_layer_checkpoint,
    saved_tensor_count,
    tiny_model_of,
    validated_steps,
    whole_model_checkpoint,
)
from moe_compress.architectures import adapter_for
from moe_compress.cache import build_cache, read_router_cache
from moe_compress.config import validate_config
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.common import energy_rank
from moe_compress.methods.low_rank import basis_of, factorize, most_used_expert
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.moe_block import block_output
from moe_compress.remote_code import moe_compress_layers as layers
from moe_compress.remote_code.moe_compress_layers import convert_to_low_rank, factor_names, is_low_rank
from moe_compress.stats import expert_frequency
from moe_compress.streaming import LayerStream

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
    _, _, facts = factorize(matrices, rank=2, energy=None, shared=None)
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


# --- basis: most_used_expert --------------------------------------------------------------------------------

STATS_IDS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(5))


def routed_stats(model, tmp_path) -> pd.DataFrame:
    """The expert frequency table of ``model`` on STATS_IDS, through the router cache as the workflow builds it."""
    build_cache(model, STATS_IDS, 2, tmp_path / "cache")
    return expert_frequency(read_router_cache(tmp_path / "cache"))


def counted_most_used(model) -> dict[int, tuple[int, int]]:
    """Per MoE layer, (the expert the router's top-k picks most often on STATS_IDS, its count): counted from
    the routers' own outputs in a forward pass, not from the statistics table (argmax: ties to the lowest id)."""
    adapter = adapter_for(model.config)
    counts, handles = {}, []
    for layer, block in adapter.moe_blocks(model).items():
        num_experts = adapter.block_num_experts(block)

        def count(module, args, output, layer=layer, num_experts=num_experts):
            picked = torch.bincount(output[2].reshape(-1).cpu(), minlength=num_experts)
            counts[layer] = counts.get(layer, 0) + picked
        handles.append(adapter.router_of(block).register_forward_hook(count))
    logits(model, STATS_IDS)
    for handle in handles:
        handle.remove()
    return {layer: (int(torch.argmax(c)), int(c.max())) for layer, c in counts.items()}


def test_basis_options_and_the_share_basis_alias():
    assert basis_of(svd_step(rank=2)) == "per_expert"
    assert basis_of(svd_step(rank=2, share_basis=True)) == "joint" == basis_of(svd_step(rank=2, basis="joint"))
    assert basis_of(svd_step(rank=2, share_basis=False)) == "per_expert"
    assert basis_of(svd_step(rank=2, basis="joint", share_basis=True)) == "joint"  # both, agreeing
    assert basis_of(svd_step(rank=2, basis="most_used_expert")) == "most_used_expert"
    for basis, share_basis in [("most_used_expert", True), ("most_used_expert", False), ("joint", False),
                               ("per_expert", True)]:
        with pytest.raises(ConfigError, match=rf"steps\[0\]\.share_basis': share_basis: {str(share_basis).lower()} "
                                              rf"contradicts basis: {basis}"):
            svd_step(rank=2, basis=basis, share_basis=share_basis)
    with pytest.raises(ConfigError, match="'shared' is not one of"):
        svd_step(rank=2, basis="shared")


def test_the_most_used_expert_is_the_most_selected_of_the_experts_a_layer_holds_ties_to_the_lowest_id():
    selected = [3, 9, 4, 9, 1, 9]
    stats = pd.DataFrame({"layer": 0, "expert": range(6), "tokens": 20, "selected": selected,
                          "frequency": [count / 20 for count in selected]})
    context = CompressionContext(stats=stats, original_expert_ids={0: torch.arange(6)})
    assert most_used_expert(context, 0) == {"slot": 1, "original_id": 1, "selected": 9, "frequency": 0.45}
    context.original_expert_ids[0] = torch.tensor([2, 3, 4, 5])  # after a pruning: slot 1 holds expert 3
    assert most_used_expert(context, 0) == {"slot": 1, "original_id": 3, "selected": 9, "frequency": 0.45}
    context.original_expert_ids[0] = torch.tensor([0, 2, 4])
    assert most_used_expert(context, 0)["original_id"] == 2
    context.original_expert_ids[7] = torch.arange(6)
    with pytest.raises(ModelError, match="layer 7: no statistics for this MoE layer"):
        most_used_expert(context, 7)


def test_most_used_expert_needs_the_statistics():
    model = tiny_model_of("qwen3_moe")
    with pytest.raises(ModelError, match="basis: most_used_expert needs the expert statistics table"):
        apply_steps(model, [svd_step(rank=4, basis="most_used_expert")], CompressionContext.for_model(model))


@pytest.mark.parametrize("shared", ["right", "left"])
def test_a_donor_basis_reproduces_the_donor_and_at_full_size_every_expert(shared):
    generator = torch.Generator().manual_seed(4)
    matrices = torch.randn(5, 12, 20, generator=generator, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(12, 3, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(20, 3, generator=generator, dtype=torch.float64)).Q
    matrices[2] = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.mT  # rank 3, known spectrum
    left, right, facts = factorize(matrices, rank=3, energy=None, shared=shared, donor=2)
    torch.testing.assert_close((left @ right)[2], matrices[2])  # one factor shared, the other per expert
    assert facts["donor_energy_kept"] == pytest.approx(1.0) and facts["weight_error"] > 0.5  # the others lose
    assert left.shape[0] == (1 if shared == "left" else 5) and right.shape[0] == (1 if shared == "right" else 5)
    # the donor's squared singular values 9, 4, 1 of 14: 93% at rank 2, all at rank 3
    assert factorize(matrices, rank=None, energy=0.9, shared=shared, donor=2)[2]["rank"] == 2
    assert factorize(matrices, rank=None, energy=0.95, shared=shared, donor=2)[2]["rank"] == 3
    # the basis spans the whole hidden side at its full size, past the donor's rank (its null space completes it)
    full = 20 if shared == "right" else 12
    left, right, facts = factorize(matrices, rank=full + 5, energy=None, shared=shared, donor=2)
    assert facts["rank"] == full and facts["weight_error"] < 1e-12
    torch.testing.assert_close(left @ right, matrices)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_most_used_expert_basis_at_full_rank_keeps_the_model(tmp_path, model_type, device):
    model = tiny_model_of(model_type).to(device)
    stats = routed_stats(model, tmp_path)
    most_used = counted_most_used(model)
    expected = logits(model, IDS)
    hidden = model.config.hidden_size  # the basis lives in the hidden space: r = H spans it
    report = apply_steps(model, [svd_step(rank=hidden, basis="most_used_expert")],
                         CompressionContext.for_model(model, stats))[0]
    tokens = STATS_IDS.numel()
    assert report["basis_experts"] == {str(layer): {"original_id": expert, "selected": count, "frequency": count / tokens}
                                       for layer, (expert, count) in most_used.items()}
    for layer, matrices in report["layers"].items():
        for facts in matrices.values():
            assert facts["rank"] == hidden and facts["basis"] == "most_used_expert" and facts["weight_error"] < 1e-6
            assert facts["basis_expert"] == most_used[int(layer)][0]
    torch.testing.assert_close(logits(model, IDS), expected, rtol=1e-4, atol=1e-4)


def test_most_used_expert_basis_reproduces_its_donor_and_the_checkpoint_round_trips(tmp_path, tokenizer, device):
    # qwen3_moe: gate_up [32, 32] (rank 32), down [32, 16] (rank 16): rank 16 keeps the donor's down exactly
    model = tiny_model_of("qwen3_moe").to(device)
    adapter = adapter_for(model.config)
    stats = routed_stats(model, tmp_path)
    dense = {layer: {name: getattr(adapter.experts_of(block), name).detach().clone() for name in adapter.expert_matrices}
             for layer, block in adapter.moe_blocks(model).items()}
    report = apply_steps(model, [svd_step(rank=16, basis="most_used_expert")],
                         CompressionContext.for_model(model, stats))[0]
    for layer, block in adapter.moe_blocks(model).items():
        donor = report["basis_experts"][str(layer)]["original_id"]  # no pruning: slot = original id
        facts = report["layers"][str(layer)]
        assert facts["down_proj"]["donor_energy_kept"] == pytest.approx(1.0)
        assert facts["gate_up_proj"]["donor_energy_kept"] < 1 and facts["gate_up_proj"]["rank"] == 16
        rebuilt = adapter.experts_of(block).down_proj  # the property rebuilds the dense tensor
        torch.testing.assert_close(rebuilt[donor], dense[layer]["down_proj"][donor])
        assert not torch.allclose(rebuilt, dense[layer]["down_proj"], atol=1e-3)  # the other experts lose
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["parameters"] == saved_tensor_count(tmp_path / "ckpt")
    assert record["low_rank_per_layer"]["0"] == {"gate_up_proj": {"rank": 16, "shared": "right"},
                                                 "down_proj": {"rank": 16, "shared": "left"}}
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as handle:
        for layer, matrices in report["layers"].items():
            for name, facts in matrices.items():
                saved = sum(handle.get_tensor(f"model.layers.{layer}.mlp.experts.{factor}").numel()
                            for factor in factor_names(name))
                assert saved == facts["parameters_after"]
    assert_same_model(load_model(tmp_path / "ckpt", device=str(device)), model, IDS)


def test_most_used_expert_per_layer_jobs_save_what_the_whole_model_job_saves(tmp_path):
    """A per-layer job sees the statistics of its own layer only: it must pick the same donor."""
    model_dir = tmp_path / "model"
    tiny_model_of("qwen3_moe").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    build_cache(LayerStream(model_dir), STATS_IDS, 4, tmp_path / "cache")
    stats = expert_frequency(read_router_cache(tmp_path / "cache"))
    steps = validated_steps({"method": "svd_experts", "rank": 6, "basis": "most_used_expert"})
    whole = whole_model_checkpoint(model_dir, tmp_path / "cache", stats, steps, tmp_path / "whole")
    layered = per_layer_checkpoint(model_dir, tmp_path / "cache", stats, steps, tmp_path / "parts", tmp_path / "layered")
    ours, theirs = all_tensors(tmp_path / "layered"), all_tensors(tmp_path / "whole")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert layered == whole
    donors = whole["step_reports"][0]["basis_experts"]
    for layer, donor in donors.items():
        rows = stats[stats["layer"] == int(layer)]
        assert donor["original_id"] == int(rows.sort_values(["selected", "expert"], ascending=[False, True])["expert"].iloc[0])
    table = pd.read_csv(tmp_path / "whole" / "low_rank.csv")
    assert (table["basis"] == "most_used_expert").all()
    assert sorted(set(zip(table["layer"], table["basis_expert"]))) == sorted(
        (int(layer), donor["original_id"]) for layer, donor in donors.items())
