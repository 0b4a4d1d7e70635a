"""The architecture suite: every type in the adapter table, on a tiny random model built from that type's
own config class. Per type: the streamed router cache is the model's own routing; the table's scoring
rule, implemented here independently, reproduces the router; pruning nothing is the identity bit for bit;
pruning equals masking the removed experts in the original model; per-layer pruned, merged, low-rank and
routing-changed checkpoints round-trip; per-layer compression jobs save what one whole-model job saves,
for every step."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import (
    ALL_ARCHITECTURE_TYPES,
    all_tensors,
    assert_same_model,
    context_with_inputs,
    forward_pass_capture,
    logits,
    make_tokenizer,
    per_layer_checkpoint,
    tiny_model_of,
    validated_step,
    whole_model_checkpoint,
)
from moe_compress.architectures import REFUSED, _resolve, adapter_for, check_structure
from moe_compress.cache import CacheReader, build_cache, read_router_cache
from moe_compress.config import check_variants_against_model
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.expert_selection import prune_experts
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.stats import expert_frequency, expert_saliency, with_saliency
from moe_compress.streaming import LayerStream

pytestmark = pytest.mark.numeric

KEEP = [0, 2, 5, 7]  # two experts from each group of four: group-limited routing keeps its groups


# --- the scoring rules, written from the papers / modeling code, not from the library ----------------


def sparsemixer_eval(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer at inference (Liu et al. 2024, Phi-3.5-MoE): expert 1 is the argmax; its weight is
    the softmax over the experts within a relative distance 2·eps of the max. Expert 2 is the argmax of
    the rest; its weight is the softmax, over the rest, of the experts within 2·eps of that second max."""
    def near(threshold):
        return (threshold - scores) / scores.abs().clamp(min=threshold) <= 2 * jitter_eps

    first_score, first = scores.max(dim=-1, keepdim=True)
    weight_1 = torch.softmax(scores.masked_fill(~near(first_score), float("-inf")), -1).gather(-1, first)
    rest = scores.scatter(-1, first, float("-inf"))
    second_score, second = rest.max(dim=-1, keepdim=True)
    weight_2 = torch.softmax(rest.masked_fill(~near(second_score), float("-inf")), -1).gather(-1, second)
    return torch.cat([weight_1, weight_2], -1), torch.cat([first, second], -1)


def reference_routing(model, block, logits: torch.Tensor, keep: list[int] | None = None):
    """(top-k weights, indices) of the table's scoring rule on router ``logits`` [tokens, experts] of
    the original block; with ``keep``, every other expert is masked in the score the router ranks by."""
    adapter = adapter_for(model.config)
    router = adapter.router_of(block)
    scoring = adapter.scoring_for(model.config)
    logits = logits.double()
    masked = torch.zeros(logits.shape[-1], dtype=torch.bool)
    if keep is not None:
        masked[:] = True
        masked[keep] = False
    if scoring == "sparsemixer":
        return sparsemixer_eval(logits.masked_fill(masked, float("-inf")), router.router_jitter_noise)
    if scoring == "topk_softmax":
        values, indices = logits.masked_fill(masked, float("-inf")).topk(router.top_k, dim=-1)
        return values.softmax(-1), indices
    if scoring == "softmax_topk":  # removed experts leave the softmax
        scores = logits.masked_fill(masked, float("-inf")).softmax(-1)
    else:  # sigmoid_topk: each expert's weight is its own; removed experts can no longer be chosen
        scores = logits.sigmoid()
    bias = None if adapter.choice_bias is None else _resolve(block, adapter.choice_bias, default=None)
    choice = scores + (0 if bias is None else bias.double().reshape(-1))
    choice = choice.masked_fill(masked, float("-inf"))
    groups = getattr(router, adapter.group_attrs[0], None) if adapter.group_attrs else None
    if groups and groups > 1 and getattr(router, "topk_method", "group_limited_greedy") == "group_limited_greedy":
        grouped = choice.view(len(choice), groups, -1)
        group_score = (grouped.max(-1).values if adapter.group_score == "max"
                       else grouped.topk(2, dim=-1).values.sum(-1))
        kept = group_score.topk(getattr(router, adapter.group_attrs[1]), dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, kept, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    indices = choice.topk(router.top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    renormalize = adapter.renormalize if isinstance(adapter.renormalize, bool) else getattr(router, adapter.renormalize)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    if adapter.scaling is not None:
        weights = weights * getattr(router, adapter.scaling)
    return weights, indices


def by_expert(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k slots sorted by expert id: routings that agree compare equal whatever their slot order."""
    order = indices.argsort(dim=-1)
    return weights.double().gather(1, order), indices.long().gather(1, order)


def assert_same_routing(ours, theirs):
    (weights, indices), (ref_weights, ref_indices) = by_expert(*ours), by_expert(*theirs)
    assert torch.equal(indices, ref_indices)
    # routers compute in float32 (some add an epsilon to the sum): float32 tolerances on O(1) weights
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-5)


# --- the suite -------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A tiny model of the type saved as a checkpoint, its streamed calibration cache (layer by layer
    from the checkpoint, hybrid layers included) and its statistics (frequency and REAP saliency)."""
    def save(model_type):
        model_dir, cache_dir = tmp_path / "model", tmp_path / "cache"
        model = tiny_model_of(model_type)
        model.save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
        ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
        build_cache(LayerStream(model_dir), ids, 2, cache_dir)
        scoring = adapter_for(model.config).scoring_for(model.config)
        stats = with_saliency(expert_frequency(read_router_cache(cache_dir), scoring),
                              expert_saliency(LayerStream(model_dir), CacheReader(cache_dir).moe_inputs()))
        # the model as read back from the checkpoint, like the stream: both see the tensors at the
        # same alignment, so the cache can be compared with its forward pass bit for bit on any CPU
        return load_model(model_dir), ids, model_dir, cache_dir, stats
    return save


@pytest.mark.parametrize("model_type", ALL_ARCHITECTURE_TYPES)
def test_the_cache_is_the_models_routing_and_the_tables_rule_reproduces_it(saved, model_type):
    model, ids, _, cache_dir, _ = saved(model_type)
    adapter = check_structure(model)
    routing = read_router_cache(cache_dir)
    captured = forward_pass_capture(model, ids, 2)
    assert sorted(routing) == sorted(captured) == sorted(adapter.moe_blocks(model))
    for layer, block in adapter.moe_blocks(model).items():
        cached_logits = torch.tensor(routing[layer].logits)
        assert torch.equal(cached_logits, captured[layer][0]), layer
        with torch.no_grad():
            model_routing = adapter.call_router(block, captured[layer][1])[1:]
        cached = (torch.tensor(routing[layer].topk_weights), torch.tensor(routing[layer].topk_indices))
        assert_same_routing(cached, model_routing)
        assert_same_routing(cached, reference_routing(model, block, cached_logits))


@pytest.mark.parametrize("model_type", ALL_ARCHITECTURE_TYPES)
def test_pruning_nothing_is_identity_and_pruning_is_masking(saved, model_type):
    model, ids, _, _, stats = saved(model_type)
    adapter = adapter_for(model.config)
    layers = sorted(adapter.moe_blocks(model))
    before = logits(model, ids)
    apply_steps(model, [{"method": "frequency_prune", "min_count": 0}], CompressionContext.for_model(model, stats))
    assert torch.equal(before, logits(model, ids))  # the same weights, kernels and shapes: bit for bit

    pruned = tiny_model_of(model_type)
    prune_experts(pruned, {layer: torch.tensor(KEEP) for layer in layers}, CompressionContext.for_model(pruned))
    hidden = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    handles = []
    for layer, block in adapter.moe_blocks(model).items():
        with torch.no_grad():
            original_logits = adapter.call_router(block, hidden)[0]
            weights, indices = adapter.call_router(adapter.moe_blocks(pruned)[layer], hidden)[1:]
        assert_same_routing((weights, torch.tensor(KEEP)[indices.long()]),
                            reference_routing(model, block, original_logits, KEEP))

        def masked_routing(module, args, output, block=block):
            weights, indices = reference_routing(model, block, output[0], KEEP)
            return output[0], weights.to(output[1].dtype), indices
        handles.append(adapter.router_of(block).register_forward_hook(masked_routing))
    masked_logits = logits(model, ids)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits(pruned, ids), masked_logits)


def whole_model_steps(adapter) -> list[dict]:
    """Every step that is not a per-expert edit, each as the table allows it on this type."""
    steps = [validated_step("random_prune", keep=6, seed=1)]
    if adapter.fixed_top_k is None:
        steps.append(validated_step("active_experts", k=1))
    steps += [validated_step("dynamic_skip", beta=0.5), validated_step("renormalize"),
              validated_step("drop_layers", layers=[2]), validated_step("dtype", dtype="bfloat16")]
    return steps


@pytest.mark.parametrize("model_type", ALL_ARCHITECTURE_TYPES)
def test_compressed_checkpoints_reload_as_the_model_in_memory(tmp_path, model_type):
    tokenizer = make_tokenizer()
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    model = tiny_model_of(model_type)
    layers = sorted(adapter_for(model.config).moe_blocks(model))
    prune_experts(model, {layer: torch.arange(3 + i) for i, layer in enumerate(layers)},
                  CompressionContext.for_model(model))
    assert save_checkpoint(model, tokenizer, tmp_path / "per_layer", {})["loader"] == "remote_code"
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "per_layer", trust_remote_code=True).eval(),
                      model, ids)
    # stock checkpoints must say everything in config.json: the expert count, and the routing settings a
    # step changed (top-k; groups that pruning could not keep) under the config fields the model reads
    model = tiny_model_of(model_type)
    prune_experts(model, {layer: torch.arange(4) for layer in layers}, CompressionContext.for_model(model))
    if adapter_for(model.config).fixed_top_k is None:
        apply_steps(model, [validated_step("active_experts", k=1)], CompressionContext.for_model(model))
    assert save_checkpoint(model, tokenizer, tmp_path / "stock", {})["loader"] == "stock"
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval(), model, ids)
    for name, steps, loader in (
            ("merged", [validated_step("hc_merge", merges_per_layer=2, merge="frequency")], None),
            ("low_rank", [validated_step("svd_experts", rank=4)], "remote_code"),
            # per-layer widths, then codes over a dictionary: the loader resizes before it codes
            ("width_dictionary", [validated_step("prune_expert_width", keep=8, allocation="global"),
                                  validated_step("ksvd_experts", atoms=8, sparsity=2, iterations=2)], "remote_code"),
            ("whole_model_steps", whole_model_steps(adapter_for(model.config)), "remote_code")):
        compressed = tiny_model_of(model_type)
        apply_steps(compressed, steps, context_with_inputs(compressed))
        record = save_checkpoint(compressed, tokenizer, tmp_path / name, {})
        assert loader is None or record["loader"] == loader, name
        assert_same_model(load_model(tmp_path / name, dtype=str(next(compressed.parameters()).dtype)[6:]),
                          compressed, ids)


STEP_LISTS = {
    # same count everywhere: a stock checkpoint
    "reap": [validated_step("reap_prune", keep=5)],
    # per-layer counts, remote code; then a fitted mitigation
    "threshold_rescale": [validated_step("frequency_prune", top_k=2, min_fraction=0.2),
                          validated_step("output_rescale")],
    "merge_lowrank": [validated_step("hc_merge", merges_per_layer=2, merge="learned", learn_steps=20),
                      validated_step("svd_experts", rank=3)],
    "skip": [validated_step("dynamic_skip", beta="auto", target_active=1.5), validated_step("renormalize")],
}


@pytest.mark.parametrize("model_type", ALL_ARCHITECTURE_TYPES)
@pytest.mark.parametrize("steps_name", STEP_LISTS)
def test_per_layer_jobs_save_what_one_job_saves(tmp_path, saved, model_type, steps_name):
    _, _, model_dir, cache_dir, stats = saved(model_type)
    steps = STEP_LISTS[steps_name]
    whole = whole_model_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "whole")
    layered = per_layer_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "parts", tmp_path / "layered")
    assert layered == whole
    ours, theirs = all_tensors(tmp_path / "layered"), all_tensors(tmp_path / "whole")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert (json.loads((tmp_path / "layered/config.json").read_text())
            == json.loads((tmp_path / "whole/config.json").read_text()))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_types_say_why_in_one_line(model_type):
    with pytest.raises(ModelError, match=f"model_type '{model_type}' is not supported: ") as error:
        adapter_for(model_type)
    assert "\n" not in str(error.value)


def test_a_layout_that_differs_from_the_table_is_refused_naming_the_layer():
    model = tiny_model_of("minimax_m2")
    block = adapter_for(model.config).moe_blocks(model)[1]
    block.e_score_correction_bias = torch.zeros(5)
    with pytest.raises(ModelError, match=r"layer 1: mlp.e_score_correction_bias has shape \(5,\), not 8 experts"):
        check_structure(model)
    model = tiny_model_of("hunyuan_v1_moe")
    model.config.moe_topk = [2, 2]  # a per-layer list one entry short of the decoder layers
    with pytest.raises(ModelError, match="hunyuan_v1_moe: config field 'moe_topk' has 2 entries for 3 decoder layers"):
        check_structure(model)


def test_routing_steps_a_router_cannot_take_are_refused_early():
    # SparseMixer always picks two: refused when the config is checked and again when the step runs
    with pytest.raises(ConfigError, match=r"variants.fewer.steps\[0\].k': this router always picks 2 experts"):
        check_variants_against_model({"fewer": {"steps": [validated_step("active_experts", k=1)]}},
                                     num_experts=8, top_k=2, num_layers=3, fixed_top_k=2)
    model = tiny_model_of("phimoe")
    with pytest.raises(ModelError, match=r"active_experts\)\.k, MoE layer 0: this router always picks 2"):
        apply_steps(model, [validated_step("active_experts", k=1)], CompressionContext.for_model(model))
    # DeepSeek-V2's router never renormalises and has no switch for it
    model = tiny_model_of("deepseek_v2")
    with pytest.raises(ModelError, match="deepseek_v2's router has no renormalisation switch"):
        apply_steps(model, [validated_step("renormalize")], CompressionContext.for_model(model))
