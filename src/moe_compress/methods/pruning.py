"""Expert pruning: drop experts, their router rows going with them, so the router renormalises over
the survivors exactly as the architecture does."""

from __future__ import annotations

import logging

import numpy as np
import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ConfigError, ModelError
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


def prune_and_report(model, keep_per_layer: dict[int, torch.Tensor], floored: list[int], context) -> dict:
    """Prune to ``keep_per_layer`` and describe it (``floored``: layers raised to their top-k)."""
    if floored:
        log.warning("layers %s kept fewer experts than they route each token to; raised to that number", floored)
    adaptations = prune_experts(model, keep_per_layer, context)
    return {
        "adaptations": adaptations,
        "kept_per_layer": {str(layer): len(keep) for layer, keep in keep_per_layer.items()},
        "kept_original_ids": {str(layer): context.original_expert_ids[layer].tolist() for layer in keep_per_layer},
        "floored_to_top_k": floored,
    }


def frequency_prune(model, step: dict, context) -> dict:
    """Keep experts selected within the router's top-``top_k`` at least ``min_count`` times (or for a
    ``min_fraction`` of tokens); with ``uniform``, keep the same number of most-used experts per layer
    (``keep``, or the rounded mean of what the threshold keeps)."""
    if context.stats is None:
        raise ModelError("frequency_prune needs the expert statistics table")
    adapter = adapter_for(model.config)
    model_top_k = adapter.top_k(model.config)
    top_k = step.get("top_k", model_top_k)
    if top_k > model_top_k:
        raise ConfigError(f"frequency_prune.top_k={top_k} exceeds the model's top-k ({model_top_k})")
    stats = context.stats.assign(selected_within=selected_within_top(context.stats, top_k))
    usage, thresholds_kept = {}, {}
    for layer, original_ids in context.original_expert_ids.items():
        rows = stats[stats["layer"] == layer].set_index("expert")
        if rows.empty:
            raise ModelError(f"layer {layer}: no statistics for this MoE layer in the expert frequency table")
        counts = rows.loc[original_ids.numpy(), "selected_within"].to_numpy()
        tokens = int(rows["tokens"].iloc[0])
        min_count = step["min_count"] if "min_count" in step else int(np.ceil(step.get("min_fraction", 0) * tokens))
        usage[layer] = counts
        thresholds_kept[layer] = int((counts >= min_count).sum())
    floored = []
    keep_per_layer = {}
    if step.get("uniform"):
        per_layer = step.get("keep") or int(round(np.mean(list(thresholds_kept.values()))))
    for layer, counts in usage.items():
        n = per_layer if step.get("uniform") else thresholds_kept[layer]
        if n < model_top_k:
            floored.append(layer)
            n = model_top_k
        n = min(n, len(counts))
        # most-used first; the stable sort breaks ties by expert index, so the choice is deterministic
        order = np.argsort(-counts, kind="stable")
        keep_per_layer[layer] = torch.from_numpy(np.sort(order[:n]))
    return prune_and_report(model, keep_per_layer, floored, context)


def reap_prune(model, step: dict, context) -> dict:
    """REAP: keep the ``keep`` most salient experts per layer, or those holding at least ``min_fraction``
    of the layer's total saliency (saliency = mean over routed tokens of weight x ||expert output||)."""
    if context.stats is None or "reap_saliency" not in context.stats.columns:
        raise ModelError("reap_prune needs the reap_saliency column of the expert statistics table "
                         "(results/stats/expert_frequency.parquet from this version of the pipeline)")
    adapter = adapter_for(model.config)
    blocks = context.moe_blocks(model)
    keep_per_layer, floored = {}, []
    for layer, original_ids in context.original_expert_ids.items():
        rows = context.stats[context.stats["layer"] == layer].set_index("expert")
        if rows.empty:
            raise ModelError(f"layer {layer}: no statistics for this MoE layer in the expert frequency table")
        saliency = rows.loc[original_ids.numpy(), "reap_saliency"].to_numpy()
        if "keep" in step:
            n = step["keep"]
        else:
            n = int((saliency >= step["min_fraction"] * saliency.sum()).sum())
        top_k = adapter.router_settings(blocks[layer])["top_k"]
        if n < top_k:
            floored.append(layer)
            n = top_k
        order = np.argsort(-saliency, kind="stable")  # most salient first; ties by expert index
        keep_per_layer[layer] = torch.from_numpy(np.sort(order[:min(n, len(saliency))]))
    return prune_and_report(model, keep_per_layer, floored, context)
