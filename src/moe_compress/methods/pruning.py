"""``frequency_prune`` and ``reap_prune``: drop the experts the router uses least, or whose REAP saliency is
lowest (the choice and the removal: methods/expert_selection.py)."""

from __future__ import annotations

import numpy as np

from moe_compress.errors import ModelError
from moe_compress.methods.common import (
    check_keep,
    column_scores,
    inspect_expert_selection,
    stats_rows,
    target_options,
    target_whole_model,
)
from moe_compress.methods.expert_selection import prune_by_scores, prune_to_highest, prune_to_target
from moe_compress.methods.registry import EXPERT_COUNT, Method, Problem, exactly_one_of, reads_statistics
from moe_compress.stats import selected_within_top

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
    saliency = column_scores(context, column, "reap_prune",
                             " (results/stats/expert_frequency.parquet from this version of the pipeline)")
    return prune_by_scores(model, saliency, step, context, column)


def _reap_options(step: dict) -> Problem | None:
    return exactly_one_of(step, "keep", "min_fraction", "target") or target_options(step)


METHODS = (
    Method("frequency_prune", frequency_prune, frozenset({EXPERT_COUNT}), check_options=_frequency_options,
           check_shape=_frequency_shape, whole_model=_frequency_whole_model, reads_statistics=reads_statistics,
           inspect=inspect_expert_selection),
    Method("reap_prune", reap_prune, frozenset({EXPERT_COUNT}), check_options=_reap_options, check_shape=check_keep,
           whole_model=target_whole_model, reads_statistics=reads_statistics, inspect=inspect_expert_selection),
)
