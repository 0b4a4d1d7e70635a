"""Expert statistics from the router cache, vectorised over tokens.

``expert_frequency`` has one row per (layer, expert) with
- ``tokens``: calibration tokens seen by the layer;
- ``selected_rank_<r>``: how often the expert was the router's r-th choice (r = 1..top-k), so the
  count "selected within the top-k'" for any k' <= top-k is the sum of the first k' rank columns;
- ``selected``: selected within the model's top-k; ``frequency`` = selected / tokens;
- ``mean_weight_when_selected``: mean routing weight applied when selected;
- ``routing_mass``: total routing weight applied to the expert over all tokens;
- ``mean_router_prob``: mean softmax probability of the expert over all tokens (from the logits);
- ``reap_saliency`` (REAP): mean over the tokens routed to the expert of routing weight x the L2
  norm of the expert's output, from the cached MoE-block inputs (each expert runs only on its tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moe_compress.capture import LayerRouting
from moe_compress.errors import ModelError


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


@torch.no_grad()
def layer_saliency(adapter, block, hidden: torch.Tensor) -> np.ndarray:
    """REAP saliency of every expert of ``block`` on ``hidden`` [tokens, hidden] (0 if never routed to)."""
    from moe_compress.methods.merging import route, run_expert

    weights, indices = route(adapter, block, hidden)
    num_experts = adapter.block_num_experts(block)
    saliency = torch.zeros(num_experts, dtype=torch.float64, device=hidden.device)
    for expert in range(num_experts):  # a loop over experts; each expert's tokens are one batch
        token_idx, rank = torch.where(indices == expert)
        if len(token_idx):
            norms = run_expert(adapter, block, hidden[token_idx], expert).double().norm(dim=-1)
            saliency[expert] = (weights[token_idx, rank].double() * norms).mean()
    return saliency.cpu().numpy()


def expert_saliency(model, moe_inputs: dict[int, torch.Tensor]) -> pd.DataFrame:
    """One row per (layer, expert): ``reap_saliency`` on the cached MoE-block inputs."""
    from moe_compress.architectures import adapter_for

    adapter = adapter_for(model.config)
    frames = [pd.DataFrame({"layer": layer, "expert": np.arange(adapter.block_num_experts(block)),
                            "reap_saliency": layer_saliency(adapter, block, moe_inputs[layer])})
              for layer, block in adapter.moe_blocks(model).items() if layer in moe_inputs]
    return pd.concat(frames, ignore_index=True)


def streamed_expert_saliency(stream, inputs_dir: str | Path) -> pd.DataFrame:
    """``expert_saliency`` with one decoder layer (``stream``: a streaming.LayerStream) and that layer's
    cached inputs in memory at a time."""
    from moe_compress.capture import moe_input_files, read_moe_input

    frames = []
    for layer, path in moe_input_files(inputs_dir).items():
        module = stream.load_layer(layer)
        if not stream.adapter.is_moe_layer(module):
            raise ModelError(f"layer {layer} has cached MoE inputs but is not an MoE layer of {stream.tensors.model_dir}")
        block = getattr(module, stream.adapter.moe_block)
        hidden = read_moe_input(path, stream.device).to(next(block.parameters()).dtype)
        frames.append(pd.DataFrame({"layer": layer, "expert": np.arange(stream.adapter.block_num_experts(block)),
                                    "reap_saliency": layer_saliency(stream.adapter, block, hidden)}))
        stream.free_layer(layer)
    return pd.concat(frames, ignore_index=True)


def with_saliency(frequency: pd.DataFrame, saliency: pd.DataFrame) -> pd.DataFrame:
    """The frequency table with the saliency column beside it (same rows, same order)."""
    table = frequency.merge(saliency, on=["layer", "expert"], how="left", validate="one_to_one")
    if table["reap_saliency"].isna().any():
        missing = table.loc[table["reap_saliency"].isna(), "layer"].unique().tolist()
        raise ValueError(f"no cached MoE-block inputs for layers {missing}; rebuild results/cache")
    return table
