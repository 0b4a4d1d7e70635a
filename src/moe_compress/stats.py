"""Expert statistics from the router cache, vectorised over tokens.

``expert_frequency`` has one row per (layer, expert) with
- ``tokens``: calibration tokens seen by the layer;
- ``top_k``: the experts the layer routes each token to (layers may differ: a per-layer top-k);
- ``selected_rank_<r>``: how often the expert was the router's r-th choice (r = 1..top-k), so the
  count "selected within the top-k'" for any k' <= top-k is the sum of the first k' rank columns (0 for
  ranks beyond the layer's own top-k);
- ``selected``: selected within the model's top-k; ``frequency`` = selected / tokens;
- ``mean_weight_when_selected``: mean routing weight applied when selected;
- ``routing_mass``: total routing weight applied to the expert over all tokens;
- ``mean_router_prob``: mean over all tokens of the router's own probability for the expert: the
  softmax of the logits (softmax-then-top-k routers), the sigmoid gate (DeepSeek-V3's sigmoid routers,
  independent per expert), or the weight applied, zero outside the top-k (gpt-oss: softmax over the
  top-k logits only);
- ``reap_saliency`` (REAP, Lasby et al. 2025, as its code computes it): mean over the tokens routed to
  the expert of g(x) x the L2 norm of the expert's output, g the softmax over all experts' logits,
  renormalised over the token's top-k only where the config has a true ``norm_topk_prob``. So on Mixtral,
  whose router renormalises but whose config has no such field, g is the raw softmax; on sigmoid routers
  (DeepSeek-V3), for which REAP's code has no definition of its own, the same softmax of the logits
  weighs the tokens the router actually chose;
- ``reap_saliency_applied``: the same with g the weight the block applies (where the two differ, it is
  the expert's contribution as the model computes it). From the cached MoE-block inputs; each expert
  runs only on its tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from moe_compress.cache import LayerRouting
from moe_compress.errors import DataError
from moe_compress.moe_block import run_expert
from moe_compress.streaming import decoder_layers_of


def rank_column(rank: int) -> str:
    return f"selected_rank_{rank}"


def router_probabilities(routing: LayerRouting, scoring: str) -> np.ndarray:
    """[tokens, experts] the router's own probability of each expert (see ``mean_router_prob``)."""
    logits = routing.logits.astype(np.float64)
    if scoring == "sigmoid_topk":
        return 1.0 / (1.0 + np.exp(-logits))
    if scoring == "topk_softmax":
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, routing.topk_indices, routing.topk_weights.astype(np.float64), axis=1)
        return probs
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def layer_frequency(layer: int, routing: LayerRouting, scoring: str = "softmax_topk") -> pd.DataFrame:
    tokens, num_experts = routing.logits.shape
    top_k = routing.topk_indices.shape[1]
    # counts[r, e]: one bincount over (rank, expert) pairs, no loop over tokens
    flat = (np.arange(top_k)[None, :] * num_experts + routing.topk_indices).ravel()
    counts = np.bincount(flat, minlength=top_k * num_experts).reshape(top_k, num_experts)
    mass = np.bincount(routing.topk_indices.ravel(), weights=routing.topk_weights.ravel().astype(np.float64),
                       minlength=num_experts)
    probs = router_probabilities(routing, scoring)
    selected = counts.sum(axis=0)
    table = pd.DataFrame(
        {
            "layer": layer,
            "expert": np.arange(num_experts),
            "tokens": tokens,
            "top_k": top_k,
            **{rank_column(rank + 1): counts[rank] for rank in range(top_k)},
            "selected": selected,
            "frequency": selected / tokens,
            "mean_weight_when_selected": np.divide(mass, selected, out=np.zeros(num_experts), where=selected > 0),
            "routing_mass": mass,
            "mean_router_prob": probs.mean(axis=0),
        }
    )
    return table


def expert_frequency(routing: dict[int, LayerRouting], scoring: str = "softmax_topk") -> pd.DataFrame:
    """The frequency table; ``scoring``: the architecture's (``MoEArchitecture.scoring``), for
    ``mean_router_prob``."""
    table = pd.concat([layer_frequency(layer, routing[layer], scoring) for layer in sorted(routing)],
                      ignore_index=True)
    # a layer with a smaller top-k never chose an expert at the higher ranks: 0, not missing
    ranks = [column for column in table.columns if column.startswith("selected_rank_")]
    table[ranks] = table[ranks].fillna(0).astype(np.int64)
    order = ["layer", "expert", "tokens", "top_k", *sorted(ranks, key=lambda c: int(c.rsplit("_", 1)[1]))]
    return table[order + [column for column in table.columns if column not in order]]


def selected_within_top(table: pd.DataFrame, k: int) -> pd.Series:
    """Per row, how often the expert was chosen within the router's first ``k`` ranks; ``k`` may not exceed
    the top-k of any layer in the table (the ranks beyond a layer's own top-k were never recorded)."""
    available = sum(c.startswith("selected_rank_") for c in table.columns)
    layer_top_k = table.groupby("layer")["top_k"].first() if "top_k" in table.columns else None
    if layer_top_k is not None and (layer_top_k < k).any():
        layer = int(layer_top_k.index[layer_top_k < k][0])
        raise DataError(f"top_k={k} is more than layer {layer}'s top-k ({int(layer_top_k[layer])}) recorded in the "
                        "statistics")
    if k > available:
        raise DataError(f"top_k={k} is more than the model's top-k ({available}) recorded in the statistics")
    return table[[rank_column(rank) for rank in range(1, k + 1)]].sum(axis=1)


@torch.no_grad()
def layer_saliency(adapter, block, hidden: torch.Tensor, reap_renormalize: bool) -> dict[str, np.ndarray]:
    """{"reap_saliency", "reap_saliency_applied"} of every expert of ``block`` on ``hidden`` [tokens,
    hidden] (0 if never routed to); ``reap_renormalize``: REAP's renormalisation (``reap_renormalizes``)."""
    logits, weights, indices = adapter.call_router(block, hidden)
    reap_weights = torch.softmax(logits.double(), dim=-1).gather(1, indices)
    if reap_renormalize:
        reap_weights = reap_weights / reap_weights.sum(dim=-1, keepdim=True)
    num_experts = adapter.block_num_experts(block)
    saliency = torch.zeros(2, num_experts, dtype=torch.float64, device=hidden.device)
    for expert in range(num_experts):  # a loop over experts; each expert's tokens are one batch
        token_idx, rank = torch.where(indices == expert)
        if len(token_idx):
            norms = run_expert(adapter, block, hidden[token_idx], expert).double().norm(dim=-1)
            saliency[0, expert] = (reap_weights[token_idx, rank] * norms).mean()
            saliency[1, expert] = (weights[token_idx, rank].double() * norms).mean()
    reap, applied = saliency.cpu().numpy()
    return {"reap_saliency": reap, "reap_saliency_applied": applied}


def expert_saliency(model_or_layers, moe_inputs: Mapping[int, torch.Tensor]) -> pd.DataFrame:
    """One row per (layer, expert): the REAP saliency columns on the cached MoE-block inputs.

    ``model_or_layers``: a model in memory or ``DecoderLayers`` (a ``LayerStream`` loads each decoder
    layer when its turn comes); ``moe_inputs``: {layer: [tokens, hidden]}, e.g. ``CacheReader.moe_inputs``,
    which reads each layer's inputs when it is looked up. One layer and its inputs at a time."""
    layers = decoder_layers_of(model_or_layers)
    adapter, config = layers.adapter, layers.model.config
    frames = []
    for layer in sorted(moe_inputs):
        block = layers.moe_block(layer)
        hidden = moe_inputs[layer].to(layers.device, next(block.parameters()).dtype)
        frames.append(pd.DataFrame({"layer": layer, "expert": np.arange(adapter.block_num_experts(block)),
                                    **layer_saliency(adapter, block, hidden, adapter.reap_renormalizes(config))}))
        layers.free_layer(layer)
    return pd.concat(frames, ignore_index=True)


def with_saliency(frequency: pd.DataFrame, saliency: pd.DataFrame) -> pd.DataFrame:
    """The frequency table with the saliency column beside it (same rows, same order)."""
    table = frequency.merge(saliency, on=["layer", "expert"], how="left", validate="one_to_one")
    if table["reap_saliency"].isna().any():
        missing = table.loc[table["reap_saliency"].isna(), "layer"].unique().tolist()
        raise DataError(f"no cached MoE-block inputs for layers {missing}; rebuild results/cache")
    return table
