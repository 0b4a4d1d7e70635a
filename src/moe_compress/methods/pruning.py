"""Expert pruning: drop experts, their router rows going with them, so the router renormalises over
the survivors exactly as the architecture does."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.allocation import allocate, expert_budget
from moe_compress.methods.common import (
    check_keep,
    inspect_expert_selection,
    stats_rows,
    target_options,
    target_whole_model,
)
from moe_compress.methods.protection import protected_counts, protected_experts
from moe_compress.methods.registry import EXPERT_COUNT, Method, Problem, exactly_one_of, reads_statistics
from moe_compress.stats import selected_within_top

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


# --- frequency_prune ---------------------------------------------------------------------------

# the score's name in the pruning plan: calibration tokens whose router top-k (the step's top_k, else
# the layer's own) includes the expert
FREQUENCY_SCORE = "frequency"


def frequency_prune(model, step: dict, context) -> dict:
    """Keep experts selected within the router's top-``top_k`` at least ``min_count`` times (or for a
    ``min_fraction`` of tokens); with ``uniform``, keep the same number of most-used experts per layer
    (``keep``, or the rounded mean of what the threshold keeps)."""
    if context.stats is None:
        raise ModelError("frequency_prune needs the expert statistics table")
    # without top_k, each layer's selections within its own top-k (which may differ per layer)
    selected = (context.stats["selected"] if step.get("top_k") is None
                else selected_within_top(context.stats, step["top_k"]))
    stats = context.stats.assign(selected_within=selected)
    usage, thresholds_kept = {}, {}
    for layer, original_ids in context.original_expert_ids.items():
        counts = stats_rows(stats, context.original_layer(layer), "selected_within", original_ids)
        tokens = int(stats.loc[stats["layer"] == context.original_layer(layer), "tokens"].iloc[0])
        min_count = step["min_count"] if "min_count" in step else int(np.ceil(step.get("min_fraction", 0) * tokens))
        usage[layer] = counts
        thresholds_kept[layer] = int((counts >= min_count).sum())
    if "target" in step:
        return prune_to_target(model, usage, step, context, FREQUENCY_SCORE)
    if step.get("uniform"):
        per_layer = step.get("keep") or int(round(np.mean(list(thresholds_kept.values()))))
        thresholds_kept = dict.fromkeys(thresholds_kept, per_layer)
    return prune_to_highest(model, usage, thresholds_kept, context, FREQUENCY_SCORE, step)


def _frequency_options(step: dict) -> Problem | None:
    if "keep" in step and not step.get("uniform"):
        return Problem("keep", "only valid with uniform: true")
    if "target" in step and step.get("uniform"):
        return Problem("uniform", "a target shares the experts by its allocation (uniform or global) instead")
    thresholds = [key for key in ("min_count", "min_fraction", "keep", "target") if key in step]
    if len(thresholds) != 1:
        return Problem(None, f"frequency_prune needs exactly one of min_count, min_fraction, target or (with "
                             f"uniform: true) keep; got {thresholds or 'none'}")
    return target_options(step)


def _frequency_shape(step: dict, shape) -> Problem | None:
    if step.get("top_k") is not None and step["top_k"] > shape.fewest_routed:
        fewest = ("experts each token is routed to" if not shape.top_k_per_layer
                  else "experts each token is routed to in the layers with the smallest top-k")
        return Problem("top_k", f"{step['top_k']} is more than the {shape.fewest_routed} {fewest}")
    return check_keep(step, shape)


def _frequency_whole_model(step: dict) -> str | None:
    if step.get("uniform") and not step.get("keep"):
        return "frequency_prune with uniform and no keep sets one count from the mean over all layers"
    return target_whole_model(step)


# --- reap_prune --------------------------------------------------------------------------------

# REAP's own weight (softmax over all experts, renormalised over the top-k where the config says
# norm_topk_prob), or the weight the block applies
REAP_COLUMNS = {"reap": "reap_saliency", "applied": "reap_saliency_applied"}


def reap_prune(model, step: dict, context) -> dict:
    """REAP: keep the ``keep`` most salient experts per layer, or those holding at least ``min_fraction``
    of the layer's total saliency (saliency = mean over routed tokens of weight x ||expert output||)."""
    column = REAP_COLUMNS[step["weight"]]
    if context.stats is None or column not in context.stats.columns:
        raise ModelError(f"reap_prune needs the {column} column of the expert statistics table "
                         "(results/stats/expert_frequency.parquet from this version of the pipeline)")
    saliency, counts = {}, {}
    for layer, original_ids in context.original_expert_ids.items():
        saliency[layer] = stats_rows(context.stats, context.original_layer(layer), column, original_ids)
        if "target" not in step:
            counts[layer] = (step["keep"] if "keep" in step
                             else int((saliency[layer] >= step["min_fraction"] * saliency[layer].sum()).sum()))
    if "target" in step:
        return prune_to_target(model, saliency, step, context, column)
    return prune_to_highest(model, saliency, counts, context, column, step)


def _reap_options(step: dict) -> Problem | None:
    return exactly_one_of(step, "keep", "min_fraction", "target") or target_options(step)


METHODS = (
    Method("frequency_prune", frequency_prune, frozenset({EXPERT_COUNT}), check_options=_frequency_options,
           check_shape=_frequency_shape, whole_model=_frequency_whole_model, reads_statistics=reads_statistics,
           inspect=inspect_expert_selection),
    Method("reap_prune", reap_prune, frozenset({EXPERT_COUNT}), check_options=_reap_options, check_shape=check_keep,
           whole_model=target_whole_model, reads_statistics=reads_statistics, inspect=inspect_expert_selection),
)
