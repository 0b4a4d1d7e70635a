"""Faithful to the architectures and the papers: each quantity against an independent reference written
here in plain tensor code (from the raw weights, token by token where that is clearer), not through the
library's helpers.

- ranks follow the router's own choice score (DeepSeek-V3 returns its top-k unsorted);
- every change of an expert count keeps group-limited routing well defined (merging included);
- pruning floors at the layer's current top-k, whatever method chose the experts;
- ``mean_router_prob`` is each router's own probability;
- HC-SMoE's centroid (mean expert output over all tokens) beside the recipe's routed sum;
- NAEE's dynamic skipping renormalises the kept weights by default;
- REAP's saliency weights by the softmax over all experts, renormalised over the top-k only where the
  config says ``norm_topk_prob`` (REAP's ``main.py``), beside the applied weight.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from helpers import ARCHITECTURE_TYPES, make_tokenizer, synthetic_inputs, tiny_model_of, validated_steps
from moe_compress.architectures import adapter_for
from moe_compress.cache import build_cache, read_moe_inputs, read_router_cache
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.merging import expert_centroids
from moe_compress.modelio import save_checkpoint
from moe_compress.moe_block import block_output
from moe_compress.stats import expert_frequency, expert_saliency

pytestmark = pytest.mark.numeric


def deepseek(num_experts=16, top_k=4, groups=4, kept_groups=2):
    return tiny_model_of("deepseek_v3", num_experts=num_experts, top_k=top_k, n_group=groups, topk_group=kept_groups)


def deepseek_reference_choice(router, hidden: torch.Tensor) -> torch.Tensor:
    """[tokens, k] expert indices in rank order, token by token: sigmoid scores + correction bias choose;
    only the kept groups (ranked by the sum of their two best scores) compete; rank by that score."""
    weight, bias = router.weight.detach().double(), router.e_score_correction_bias.detach().double()
    groups, kept_groups, k = router.num_group, router.topk_group, router.top_k
    per_group = weight.shape[0] // groups
    choices = []
    for x in hidden.double():
        score = torch.sigmoid(weight @ x) + bias
        group_score = [sorted(score[g * per_group:(g + 1) * per_group].tolist(), reverse=True)[:2] for g in range(groups)]
        best_groups = sorted(range(groups), key=lambda g: -sum(group_score[g]))[:kept_groups]
        allowed = [e for e in range(weight.shape[0]) if e // per_group in best_groups]
        choices.append(sorted(allowed, key=lambda e: -float(score[e]))[:k])
    return torch.tensor(choices)


def test_deepseek_rank_columns_are_the_routers_ranks(tmp_path):
    model = deepseek()
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(5))
    build_cache(model, ids, 4, tmp_path / "cache")
    table = expert_frequency(read_router_cache(tmp_path / "cache"), adapter_for(model.config).scoring_for(model.config))
    adapter = adapter_for(model.config)
    inputs = read_moe_inputs(tmp_path / "cache")
    for layer, block in adapter.moe_blocks(model).items():
        hidden = inputs[layer]
        expected = deepseek_reference_choice(adapter.router_of(block), hidden)
        rows = table[table["layer"] == layer].set_index("expert")
        for rank in range(4):
            counts = torch.bincount(expected[:, rank], minlength=16).numpy()
            np.testing.assert_array_equal(rows[f"selected_rank_{rank + 1}"].to_numpy(), counts)
    # pruning by first choices keeps the most-chosen first choices
    context = CompressionContext.for_model(model, table)
    report = apply_steps(model, validated_steps({"method": "frequency_prune", "top_k": 1, "uniform": True, "keep": 6}), context)[0]
    for layer, kept in report["kept_original_ids"].items():
        first = table[table["layer"] == int(layer)].set_index("expert")["selected_rank_1"]
        assert first[kept].min() >= first.drop(kept).max(), layer


def test_merging_keeps_group_limited_routing_well_defined(tmp_path):
    model = deepseek()
    adapter = adapter_for(model.config)
    inputs = {layer: synthetic_inputs(200, 32, seed=layer) for layer in adapter.moe_blocks(model)}
    report = apply_steps(model, validated_steps({"method": "hc_merge", "merges_per_layer": 6}),
                         CompressionContext.for_model(model, moe_inputs=inputs, heldout_fraction=0.25))[0]
    assert all(len(clusters) == 10 for clusters in report["clusters"].values())
    hidden = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))  # 7 x 10 scores: no grouping fits
    for layer, block in adapter.moe_blocks(model).items():
        router = adapter.router_of(block)
        assert (router.num_group, router.topk_group) == (1, 1) and report["adaptations"][str(layer)]
        with torch.no_grad():
            _, _, indices = router(hidden)
            _, _, reversed_indices = router(hidden.flip(0))
        # a token's choice does not depend on its neighbours: the plain top-k of sigmoid + bias
        assert torch.equal(indices, reversed_indices.flip(0))
        expected = torch.topk(torch.sigmoid(hidden @ router.weight.T) + router.e_score_correction_bias, 4).indices
        assert torch.equal(indices.sort(dim=-1).values, expected.sort(dim=-1).values)
    save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert reloaded.config.n_group == 1 and reloaded.config.n_routed_experts == 10
    reloaded.generate(torch.randint(0, 300, (1, 5)), max_new_tokens=3, do_sample=False)


def test_merging_within_groups_keeps_the_groups():
    model = deepseek(num_experts=8, top_k=2, groups=2, kept_groups=1)
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[1]
    from moe_compress.methods.merging import merge_layer

    clusters = [[0, 1], [2], [3], [4, 5], [6], [7]]  # 3 merged experts in each group of 4
    counts = torch.ones(8, dtype=torch.long)
    step = validated_steps({"method": "hc_merge", "merges_per_layer": 2})[0]
    hidden = synthetic_inputs(100, 32)
    _, measured = merge_layer(adapter, block, clusters, counts, step, hidden[:80], hidden[80:])
    router = adapter.router_of(block)
    assert (router.num_group, router.topk_group) == (2, 1) and not measured.get("adaptations")


@pytest.mark.parametrize("method", ["frequency_prune", "reap_prune"])
def test_pruning_floors_at_the_layers_current_top_k(method, tmp_path):
    model = tiny_model_of("qwen3_moe", top_k=4)
    adapter = adapter_for(model.config)
    inputs = {layer: synthetic_inputs(120, 32, seed=layer) for layer in adapter.moe_blocks(model)}
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    build_cache(model, ids, 4, tmp_path / "cache")
    stats = expert_frequency(read_router_cache(tmp_path / "cache")).merge(expert_saliency(model, inputs))
    prune = {"method": method, "keep": 3, **({"uniform": True} if method == "frequency_prune" else {})}
    reports = apply_steps(model, validated_steps({"method": "active_experts", "k": 2}, prune),
                          CompressionContext.for_model(model, stats, moe_inputs=inputs))
    assert reports[1]["kept_per_layer"] == {"0": 3, "2": 3} and reports[1]["floored_to_top_k"] == []
    model = tiny_model_of("qwen3_moe", top_k=4)
    reports = apply_steps(model, validated_steps({"method": "active_experts", "k": 2}, {**prune, "keep": 1}),
                          CompressionContext.for_model(model, stats, moe_inputs=inputs))
    assert reports[1]["kept_per_layer"] == {"0": 2, "2": 2} and reports[1]["floored_to_top_k"] == [0, 2]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_mean_router_prob_is_each_routers_own_probability(tmp_path, model_type):
    model = tiny_model_of(model_type)
    adapter = adapter_for(model.config)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    build_cache(model, ids, 4, tmp_path / "cache")
    table = expert_frequency(read_router_cache(tmp_path / "cache"), adapter.scoring_for(model.config))
    inputs = read_moe_inputs(tmp_path / "cache")
    for layer, block in adapter.moe_blocks(model).items():
        router = adapter.router_of(block)
        hidden = inputs[layer].double()
        logits = hidden @ router.weight.detach().double().T
        if model_type == "deepseek_v3":  # independent sigmoid gates
            probs = torch.sigmoid(logits)
        elif model_type == "gpt_oss":  # softmax over the top-k logits only: zero elsewhere
            logits = logits + router.bias.detach().double()
            top = torch.topk(logits, 2)
            probs = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, dim=-1))
        else:
            probs = torch.softmax(logits, dim=-1)
        ours = table[table["layer"] == layer]["mean_router_prob"].to_numpy()
        np.testing.assert_allclose(ours, probs.mean(dim=0).numpy(), rtol=1e-5, atol=1e-7)


def reference_expert(experts, expert: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert from the raw fused tensors (gate and up halves of gate_up_proj)."""
    gate, up = (x @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[expert].T


@pytest.mark.parametrize("centroid", ["routed_sum", "mean_output", "router_logits"])
def test_centroid_definitions(centroid):
    model = tiny_model_of("qwen3_moe")
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[0]
    experts, router = adapter.experts_of(block), adapter.router_of(block)
    hidden = synthetic_inputs(60, 32)
    with torch.no_grad():
        ours, counts = expert_centroids(adapter, block, hidden, centroid)
        logits = hidden @ router.weight.T
        if centroid == "router_logits":  # HC-SMoE's router-logit similarity: each expert's logit column
            expected = logits.T
        elif centroid == "mean_output":  # HC-SMoE: every expert on every token, averaged, unweighted
            expected = torch.stack([reference_expert(experts, e, hidden).mean(dim=0) for e in range(8)])
        else:  # the recipe: sum over routed tokens of the renormalised gate x output
            top = torch.topk(torch.softmax(logits, dim=-1), 2)
            gates = top.values / top.values.sum(dim=-1, keepdim=True)
            expected = torch.zeros(8, 32)
            for t in range(len(hidden)):
                for gate, e in zip(gates[t], top.indices[t]):
                    expected[e] += gate * reference_expert(experts, int(e), hidden[t])
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=1e-5)
    assert counts.sum() == 60 * 2


@pytest.mark.parametrize("renormalize", [True, False])
def test_dynamic_skip_renormalises_as_naee_by_default(renormalize):
    model = tiny_model_of("mixtral", top_k=3)
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[0]
    experts, router = adapter.experts_of(block), adapter.router_of(block)
    hidden = synthetic_inputs(40, 32)
    step = {"method": "dynamic_skip", "beta": 0.5} if renormalize else {"method": "dynamic_skip", "beta": 0.5,
                                                                        "renormalize": False}
    apply_steps(model, validated_steps(step), CompressionContext.for_model(model))
    with torch.no_grad():
        ours = block_output(block, hidden)
        expected = torch.zeros_like(hidden)
        for t, x in enumerate(hidden):  # Mixtral: softmax, top-k, renormalised; NAEE: skip, renormalise again
            top = torch.topk(torch.softmax(router.weight @ x, dim=-1), 3)
            weights = top.values / top.values.sum()
            keep = weights >= 0.5 * weights.max()
            kept = weights * keep
            if renormalize:
                kept = kept / kept.sum()
            for weight, e in zip(kept, top.indices):
                if weight > 0:
                    expected[t] += weight * reference_expert(experts, int(e), x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def reap_reference(model, hidden: torch.Tensor, layer: int, applied: bool) -> torch.Tensor:
    """REAP saliency, token by token: mean over the tokens routed to e of g_e(x) ||E_e(x)||. REAP's own
    g is the softmax over all experts, renormalised over the top-k only where the config has a true
    norm_topk_prob; ``applied``: the weight the block applies."""
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[layer]
    experts, router = adapter.experts_of(block), adapter.router_of(block)
    totals, counts = torch.zeros(8, dtype=torch.float64), torch.zeros(8)
    for x in hidden:
        probs = torch.softmax(router.weight @ x, dim=-1)
        top = torch.topk(probs, 2)
        renormalise = applied or getattr(model.config, "norm_topk_prob", False)
        weights = top.values / top.values.sum() if renormalise else top.values
        for weight, e in zip(weights, top.indices):
            totals[e] += float(weight) * float(reference_expert(experts, int(e), x).norm())
            counts[e] += 1
    return torch.where(counts > 0, totals / counts.clamp_min(1), torch.zeros_like(totals))


def test_reap_saliency_is_reaps_definition_and_the_applied_one_is_offered():
    model = tiny_model_of("mixtral")  # renormalises its top-k, but its config has no norm_topk_prob
    adapter = adapter_for(model.config)
    inputs = {layer: synthetic_inputs(50, 32, seed=layer) for layer in adapter.moe_blocks(model)}
    table = expert_saliency(model, inputs)
    with torch.no_grad():
        for layer in adapter.moe_blocks(model):
            rows = table[table["layer"] == layer]
            for column, applied in (("reap_saliency", False), ("reap_saliency_applied", True)):
                torch.testing.assert_close(torch.tensor(rows[column].to_numpy()),
                                           reap_reference(model, inputs[layer], layer, applied), rtol=1e-5, atol=1e-7)
            assert (rows["reap_saliency"] < rows["reap_saliency_applied"]).sum() > 0
    for weight, column in (("reap", "reap_saliency"), ("applied", "reap_saliency_applied")):
        pruned = tiny_model_of("mixtral")
        report = apply_steps(pruned, validated_steps({"method": "reap_prune", "keep": 4, "weight": weight}),
                             CompressionContext.for_model(pruned, table))[0]
        for layer, kept in report["kept_original_ids"].items():
            saliency = table[table["layer"] == int(layer)].set_index("expert")[column]
            assert sorted(kept) == sorted(saliency.nlargest(4).index.tolist())


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_every_expert_count_change_adapts_routing(model_type):
    """Prune then merge on every architecture: the router's settings stay consistent with its expert count."""
    model = tiny_model_of(model_type)
    adapter = adapter_for(model.config)
    inputs = {layer: synthetic_inputs(120, 32, seed=layer) for layer in adapter.moe_blocks(model)}
    apply_steps(model, validated_steps({"method": "hc_merge", "merges_per_layer": 3}),
                CompressionContext.for_model(model, moe_inputs=inputs, heldout_fraction=0.25))
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    for block in adapter.moe_blocks(model).values():
        with torch.no_grad():
            _, _, indices = adapter.router_of(block)(hidden)
        assert int(indices.max()) < 5
