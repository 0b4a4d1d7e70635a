"""Expert statistics from the router cache, vectorised over tokens.

``expert_frequency`` has one row per (layer, expert) with
- ``tokens``: calibration tokens seen by the layer;
- ``selected_rank_<r>``: how often the expert was the router's r-th choice (r = 1..top-k), so the
  count "selected within the top-k'" for any k' <= top-k is the sum of the first k' rank columns;
- ``selected``: selected within the model's top-k; ``frequency`` = selected / tokens;
- ``mean_weight_when_selected``: mean routing weight applied when selected;
- ``routing_mass``: total routing weight applied to the expert over all tokens;
- ``mean_router_prob``: mean softmax probability of the expert over all tokens (from the logits).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_compress.capture import LayerRouting


def rank_column(rank: int) -> str:
    return f"selected_rank_{rank}"


def layer_frequency(layer: int, routing: LayerRouting) -> pd.DataFrame:
    tokens, num_experts = routing.logits.shape
    top_k = routing.topk_indices.shape[1]
    # counts[r, e]: one bincount over (rank, expert) pairs, no loop over tokens
    flat = (np.arange(top_k)[None, :] * num_experts + routing.topk_indices).ravel()
    counts = np.bincount(flat, minlength=top_k * num_experts).reshape(top_k, num_experts)
    mass = np.bincount(routing.topk_indices.ravel(), weights=routing.topk_weights.ravel().astype(np.float64),
                       minlength=num_experts)
    logits = routing.logits.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    selected = counts.sum(axis=0)
    table = pd.DataFrame(
        {
            "layer": layer,
            "expert": np.arange(num_experts),
            "tokens": tokens,
            **{rank_column(rank + 1): counts[rank] for rank in range(top_k)},
            "selected": selected,
            "frequency": selected / tokens,
            "mean_weight_when_selected": np.divide(mass, selected, out=np.zeros(num_experts), where=selected > 0),
            "routing_mass": mass,
            "mean_router_prob": probs.mean(axis=0),
        }
    )
    return table


def expert_frequency(routing: dict[int, LayerRouting]) -> pd.DataFrame:
    return pd.concat([layer_frequency(layer, routing[layer]) for layer in sorted(routing)], ignore_index=True)


def selected_within_top(table: pd.DataFrame, k: int) -> pd.Series:
    """Per row, how often the expert was chosen within the router's first ``k`` ranks."""
    columns = [rank_column(rank) for rank in range(1, k + 1)]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        available = sum(c.startswith("selected_rank_") for c in table.columns)
        raise ValueError(f"top_k={k} exceeds the model's top-k ({available}) recorded in the statistics")
    return table[columns].sum(axis=1)
