"""``prune_heads``: keep the ``keep`` most important query heads of every attention layer (any decoder).

A head's importance is the mean norm, over the calibration tokens, of its contribution to the
attention output: ||W_o[:, head] a_head|| (a_head: the head's attention output, the slice of the
output projection's input that belongs to it), computed from the head's Gram matrix W_o,h^T W_o,h
without forming the contributions.

Grouped-query attention keeps its groups consistent in one of two ways (``gqa``):
- ``within_groups`` (default): every key-value head keeps ``keep / kv_heads`` of its query heads, the
  most important ones of its group. The key-value heads (and the KV cache) stay whole; only the query
  and output projections shrink.
- ``whole_groups``: whole key-value groups go, ranked by the summed importance of their query heads;
  the key and value projections and the KV cache shrink with them.

The same number of heads is kept in every layer, so the checkpoint stays stock (the config's head
counts are rewritten, ``head_dim`` pinned). Which tensor dimensions hold heads is read from the model
class itself (``resize.follow_map``), so no architecture lists its projections.
"""

from __future__ import annotations

import logging

import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.common import KV_HEADS, QUERY_HEADS, head_counts
from moe_compress.methods.context import calibration_forward
from moe_compress.methods.registry import ATTENTION_HEADS, Method, Problem, exactly_one_of
from moe_compress.methods.resize import Axis, adopt_config, cut_tensors, follow_map, layer_of

log = logging.getLogger(__name__)



def kept_count(step: dict, heads: int) -> int:
    return step["keep"] if step.get("keep") is not None else max(1, round(step["fraction"] * heads))


def _plan(step: dict, heads: int, kv_heads: int) -> tuple[int, int] | Problem:
    """(query heads kept, key-value heads kept), or why that cannot be."""
    keep = kept_count(step, heads)
    option = "keep" if step.get("keep") is not None else "fraction"
    if keep > heads:
        return Problem(option, f"keeps {keep} query heads; the model has {heads}")
    group = heads // kv_heads
    if step["gqa"] == "within_groups":
        if keep % kv_heads:
            return Problem(option, f"{keep} query heads cannot be spread evenly over the {kv_heads} key-value heads "
                                   f"(gqa: within_groups); use a multiple of {kv_heads}")
        return keep, kv_heads
    if keep % group:
        return Problem(option, f"{keep} query heads are not whole key-value groups of {group} (gqa: whole_groups); "
                               f"use a multiple of {group}")
    return keep, keep // group


def _check_shape(step: dict, shape) -> Problem | None:
    if shape.num_attention_heads is None:
        return None
    plan = _plan(step, shape.num_attention_heads, shape.num_key_value_heads or shape.num_attention_heads)
    return plan if isinstance(plan, Problem) else None


def _probes(heads: int, kv_heads: int, keep: int, keep_kv: int) -> list[dict[str, int]]:
    """Two smaller settings of the head counts, the step's own and another valid one."""
    if keep_kv == kv_heads:  # within groups: query heads only, in multiples of the key-value heads
        other = kv_heads if keep != kv_heads else 2 * kv_heads
        return [{QUERY_HEADS: keep, KV_HEADS: kv_heads}, {QUERY_HEADS: other, KV_HEADS: kv_heads}]
    group = heads // kv_heads
    other = 1 if keep_kv != 1 else 2
    return [{QUERY_HEADS: keep, KV_HEADS: keep_kv}, {QUERY_HEADS: other * group, KV_HEADS: other}]


def _output_projections(follows: dict, layers_path: str) -> dict[int, str]:
    """Per decoder layer, the module whose weight reads the heads (its input dimension follows the query
    heads): the attention's output projection."""
    found = {}
    for name, dims in follows.items():
        layer = layer_of(name, layers_path)
        if layer is None or not name.endswith(".weight") or 1 not in dims or 0 in dims:
            continue
        readings = dims[1][1] if dims[1][0] == "ambiguous" else [dims[1]]
        if any(field == QUERY_HEADS for field, _ in readings):
            found[layer] = name.removesuffix(".weight")
    return found


@torch.no_grad()
def head_importance(model, projections: dict[int, str], heads: int, input_ids: torch.Tensor,
                    batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Per layer, [heads]: the mean over tokens of ||W_o,h a_h|| for every query head h."""
    device = next(model.parameters()).device
    totals = {layer: torch.zeros(heads, dtype=torch.float64, device=device) for layer in projections}
    grams = {}
    for layer, name in projections.items():
        weight = model.get_submodule(name).weight.double()  # [hidden, heads * head_dim]
        per_head = weight.reshape(weight.shape[0], heads, -1).permute(1, 0, 2)  # [heads, hidden, head_dim]
        grams[layer] = per_head.mT @ per_head  # [heads, head_dim, head_dim]

    def accumulate(layer):
        def hook(module, args):
            outputs = args[0].double().reshape(-1, heads, grams[layer].shape[-1])  # [tokens, heads, head_dim]
            squared = torch.einsum("thd,hde,the->th", outputs, grams[layer], outputs)
            totals[layer] += squared.clamp_min(0).sqrt().sum(dim=0)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(accumulate(layer))
               for layer, name in projections.items()]
    try:
        count = calibration_forward(model, input_ids, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (total / max(count, 1)).cpu() for layer, total in totals.items()}


def choose_heads(importance: torch.Tensor, kv_heads: int, keep: int, keep_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept query heads, kept key-value heads), sorted, from one layer's head importance [heads]."""
    heads = importance.numel()
    group = heads // kv_heads
    by_group = importance.reshape(kv_heads, group)
    if keep_kv == kv_heads:  # the best keep / kv_heads heads of every group
        best = torch.argsort(by_group, dim=1, descending=True, stable=True)[:, :keep // kv_heads]
        query = (best.sort(dim=1).values + torch.arange(kv_heads)[:, None] * group).reshape(-1)
        return query, torch.arange(kv_heads)
    groups = torch.argsort(by_group.sum(dim=1), descending=True, stable=True)[:keep_kv].sort().values
    return (groups[:, None] * group + torch.arange(group)).reshape(-1), groups


def _follows(config, keep: int, keep_kv: int) -> tuple[dict, dict, dict[int, str]]:
    """(pinned config fields, the dimensions that follow the head counts, each layer's output projection)."""
    heads, kv_heads, head_dim = head_counts(config)
    fixed = {"head_dim": head_dim}
    axes = [Axis(QUERY_HEADS, heads), Axis(KV_HEADS, kv_heads)]
    follows = follow_map(config, fixed, axes, _probes(heads, kv_heads, keep, keep_kv))
    projections = _output_projections(follows, adapter_for(config).layers)
    if not projections:
        raise ModelError(f"prune_heads: no weight of {config.model_type} reads the query heads as its input; the "
                         "step does not apply to this model")
    return fixed, follows, projections


def _check_model(step: dict, config) -> Problem | None:
    plan = _plan(step, *head_counts(config)[:2])
    if isinstance(plan, Problem):
        return plan
    try:
        _follows(config, *plan)
    except ModelError as err:
        return Problem(None, str(err))
    return None


def prune_heads(model, step: dict, context) -> dict:
    config = model.config
    adapter = adapter_for(config)
    heads, kv_heads, _ = head_counts(config)
    plan = _plan(step, heads, kv_heads)
    if isinstance(plan, Problem):
        raise ModelError(f"prune_heads.{plan.option}: {plan.message}")
    keep, keep_kv = plan
    report = {"query_heads": {"from": heads, "to": keep}, "kv_heads": {"from": kv_heads, "to": keep_kv}}
    fixed, follows, projections = _follows(config, keep, keep_kv)
    if context.calibration_ids is None:
        raise ModelError("prune_heads needs the calibration tokens")
    importance = head_importance(model, projections, heads, context.calibration_ids)
    kept = {layer: choose_heads(scores, kv_heads, keep, keep_kv) for layer, scores in importance.items()}

    def units_for(name: str, field: str) -> torch.Tensor:
        layer = layer_of(name, adapter.layers)
        if layer not in kept:
            raise ModelError(f"prune_heads: {name} holds heads, but its layer has no attention output projection "
                             f"this step measured")
        return kept[layer][0 if field == QUERY_HEADS else 1]

    cut_tensors(model, follows, units_for)
    adopt_config(model, fixed, {QUERY_HEADS: keep, KV_HEADS: keep_kv}, follows)
    log.info("kept %d of %d query heads (%d of %d key-value heads) per layer", keep, heads, keep_kv, kv_heads)
    return {**report, "layers": {str(layer): {"kept_heads": query.tolist(),
                                              "importance": [round(float(value), 6) for value in importance[layer]]}
                                 for layer, (query, _) in kept.items()}}


METHODS = (
    Method("prune_heads", prune_heads, frozenset({ATTENTION_HEADS}), any_decoder=True,
           check_options=lambda step: exactly_one_of(step, "keep", "fraction"), check_shape=_check_shape,
           check_model=_check_model,
           whole_model=lambda step: "prune_heads measures heads with full forward passes and rewrites the config",
           inspect=lambda adapter: "the same query heads per layer (GQA groups kept consistent); stock, where the "
                                   "projections hold whole heads (checked on a skeleton when the config is read)"),
)
