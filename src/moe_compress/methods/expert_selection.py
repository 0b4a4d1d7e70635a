"""Which experts each MoE layer keeps, and removing the others: what every expert pruner shares (frequency,
REAP, EASY-EP, random) and what MoNE shares before it substitutes instead of removing. Scores in, kept slots
out; the step's ``target``/``allocation`` (methods/allocation.py) and ``protect`` (methods/protection.py)
apply here, once for all of them. The experts go with their router rows, so the router renormalises over the
survivors exactly as the architecture does."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.allocation import allocate, expert_budget
from moe_compress.methods.protection import protected_counts, protected_experts

log = logging.getLogger(__name__)


def prune_experts(model, keep_per_layer: dict[int, torch.Tensor], context) -> dict:
    """Keep, in each listed MoE layer, the experts at the given current slot indices (sorted).
    Returns, per layer, what else the architecture had to adapt (e.g. expert groups)."""
    adapter = adapter_for(model.config)
    adaptations = {}
    for layer, block in context.each_block(model, only=keep_per_layer):
        # slot indices are bookkeeping, kept on the CPU beside original_expert_ids; select_experts moves
        # them to the device of each tensor it selects from
        keep = torch.as_tensor(keep_per_layer[layer], dtype=torch.long, device="cpu").sort().values
        top_k = adapter.router_settings(block)["top_k"]  # the layer's own top-k, which may differ per layer
        if len(keep) < top_k:
            raise ModelError(f"layer {layer}: cannot keep {len(keep)} experts, fewer than the {top_k} active per token")
        changed = adapter.select_experts(block, keep)
        if changed:
            log.warning("layer %d: %s", layer, changed)
            adaptations[str(layer)] = changed
        context.original_expert_ids[layer] = context.original_expert_ids[layer][keep]
    return adaptations


def rank_slots(scores: np.ndarray) -> np.ndarray:
    """Every slot, highest score first, ties broken by slot index so the order is deterministic."""
    return np.argsort(-scores, kind="stable")


def keep_highest(scores: np.ndarray, n: int, top_k: int,
                 protected: np.ndarray | None = None) -> tuple[torch.Tensor, bool]:
    """The slots (sorted) of the ``n`` highest ``scores``, ``n`` raised to the layer's current ``top_k``
    (a layer keeps at least as many experts as it routes each token to). ``protected`` (a bool per slot): slots
    kept whatever their score, ahead of the ranking, ``n`` raised to their number if needed. Returns (slots,
    whether n was raised)."""
    order = rank_slots(scores)
    floor = top_k
    if protected is not None and protected.any():
        order = np.concatenate([order[protected[order]], order[~protected[order]]])
        floor = max(top_k, int(protected.sum()))
    raised = n < floor
    return torch.from_numpy(np.sort(order[:min(max(n, floor), len(scores))])), raised


def choose_kept(model, scores: dict[int, np.ndarray], step: dict, context, score: str,
                counts: dict[int, int] | None = None) -> tuple[dict[int, torch.Tensor], dict]:
    """Which experts each layer keeps: per layer the ``counts[layer]`` highest ``scores[layer]`` (one score per
    current slot, named ``score``), or with the step's whole-model ``target`` the counts its ``allocation`` gives;
    the experts the step's ``protect`` names are kept first whatever their score (methods/protection.py).
    Returns ({layer: kept slots, sorted}, the report: how many each layer keeps, the layers raised to their top-k
    or to their protected experts, the protected experts, and the ranking (every expert the step ranked, by
    original id, highest score first, with its score): what the checkpoint's pruning_plan.json is written
    from). Nothing is changed: the caller removes, merges or substitutes the others."""
    adapter = adapter_for(model.config)
    blocks = context.moe_blocks(model)
    protected, protection = protected_experts(step, context)
    report = {}
    if counts is None:
        budget = expert_budget(model, context)
        # a layer keeps at least its protected experts, as it keeps at least its top-k
        floors = {layer: max(floor, protected_counts(protected).get(layer, 0)) for layer, floor in budget.floor.items()}
        counts, allocation = allocate(step["target"], step.get("allocation", "uniform"), scores,
                                      replace(budget, floor=floors))
        report.update(allocation)
    keep_per_layer, floored, ranking = {}, [], {}
    for layer, layer_scores in scores.items():
        order = rank_slots(layer_scores)
        ranking[str(layer)] = {"ids": context.original_expert_ids[layer][torch.from_numpy(order)].tolist(),
                               "scores": np.asarray(layer_scores)[order].tolist()}
        top_k = adapter.router_settings(blocks[layer])["top_k"]  # the layer's own, which may differ per layer
        keep_per_layer[layer], raised = keep_highest(layer_scores, counts[layer], top_k, protected.get(layer))
        if raised:
            floored.append(layer)
    if floored:
        log.warning("layers %s would have kept fewer experts than they route each token to or than they protect; "
                    "raised to that number", floored)
    report.update({
        "kept_per_layer": {str(layer): len(keep) for layer, keep in keep_per_layer.items()},
        "floored_to_top_k": floored,
        "score": score,
        "ranking": ranking,
    })
    if protection is not None:
        report["protected"] = protection
    return keep_per_layer, report


def prune_to_highest(model, scores: dict[int, np.ndarray], counts: dict[int, int] | None, context,
                     score: str, step: dict | None = None) -> dict:
    """Keep, per layer, the ``counts[layer]`` experts with the highest ``scores[layer]`` (or, with
    ``counts`` None, the counts of the step's target; see ``choose_kept``), remove the others and describe it:
    ``choose_kept``'s report plus what the architecture adapted and the kept experts' original ids."""
    keep_per_layer, report = choose_kept(model, scores, step or {}, context, score, counts)
    adaptations = prune_experts(model, keep_per_layer, context)
    return {
        "adaptations": adaptations,
        **report,
        "kept_original_ids": {str(layer): context.original_expert_ids[layer].tolist() for layer in keep_per_layer},
    }


def prune_to_target(model, scores: dict[int, np.ndarray], step: dict, context, score: str) -> dict:
    """Keep the highest ``scores`` in the counts that meet the step's whole-model ``target``
    (``allocation``: uniform or global, see methods/allocation.py)."""
    return prune_to_highest(model, scores, None, context, score, step)


def score_counts(step: dict, scores: dict[int, np.ndarray]) -> dict[int, int] | None:
    """Experts each layer keeps by the step's per-layer option: ``keep``, or those holding at least
    ``min_fraction`` of the layer's total score; None for a whole-model ``target`` (its allocation decides)."""
    if "target" in step:
        return None
    if "keep" in step:
        return dict.fromkeys(scores, step["keep"])
    return {layer: int((layer_scores >= step["min_fraction"] * layer_scores.sum()).sum())
            for layer, layer_scores in scores.items()}


def prune_by_scores(model, scores: dict[int, np.ndarray], step: dict, context, score: str) -> dict:
    """Keep the highest ``scores`` by the step's ``keep``, ``min_fraction`` or ``target`` (the options every
    saliency pruner takes) and remove the others."""
    return prune_to_highest(model, scores, score_counts(step, scores), context, score, step)
