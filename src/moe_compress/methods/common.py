"""Helpers more than one method uses: reading the statistics table, the options every pruner with a
``target`` shares, the singular-value rank rule, and the attention shape of a config. A method imports them
from here, never from another method's module, so each method module stays its own."""

from __future__ import annotations

import numpy as np
import torch

from moe_compress.errors import ModelError
from moe_compress.methods.registry import Problem

QUERY_HEADS = "num_attention_heads"
KV_HEADS = "num_key_value_heads"


def stats_rows(stats, layer: int, column: str, original_ids: torch.Tensor) -> np.ndarray:
    """``column`` of the statistics table for the experts a layer holds now (``layer``: its index in the original
    model, ``CompressionContext.original_layer``; the experts by their original ids)."""
    rows = stats[stats["layer"] == layer].set_index("expert")
    if rows.empty:
        raise ModelError(f"layer {layer}: no statistics for this MoE layer in the expert frequency table")
    return rows.loc[original_ids.numpy(), column].to_numpy()


def column_scores(context, column: str, method: str, missing: str) -> dict:
    """{layer: ``column`` of the statistics table for the experts the layer holds now}, for every layer the step
    works on; a table without the column fails naming it, the method and ``missing`` (where it comes from)."""
    if context.stats is None or column not in context.stats.columns:
        raise ModelError(f"{method} needs the {column} column of the expert statistics table{missing}")
    return {layer: stats_rows(context.stats, context.original_layer(layer), column, original_ids)
            for layer, original_ids in context.original_expert_ids.items()}


def check_keep(step: dict, shape) -> Problem | None:
    """``keep`` may not exceed the experts a layer has."""
    if step.get("keep") is not None and step["keep"] > shape.num_experts:
        return Problem("keep", f"{step['keep']} is more than the {shape.num_experts} experts per layer")
    return None


def target_options(step: dict) -> Problem | None:
    """``allocation`` only says how a ``target`` is shared between layers."""
    if "allocation" in step and "target" not in step:
        return Problem("allocation", "only valid with target")
    return None


def target_whole_model(step: dict) -> str | None:
    if "target" in step:
        return f"{step['method']} with a target allocates experts over all MoE layers at once"
    return None


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values keep ``energy`` of the squared total.

    ``singular_values`` is [..., k]; leading dimensions (experts) are summed rank by rank."""
    return energy_rank_of_squares(singular_values.double() ** 2, energy)


def energy_rank_of_squares(squares: torch.Tensor, energy: float) -> int:
    """``energy_rank`` from the squared singular values [..., k] (Gram eigenvalues), largest first."""
    squared = squares.double().reshape(-1, squares.shape[-1]).sum(dim=0)
    cumulative = torch.cumsum(squared, dim=0) / squared.sum().clamp_min(1e-300)
    threshold = torch.tensor(energy, dtype=cumulative.dtype, device=cumulative.device)
    rank = int(torch.searchsorted(cumulative, threshold).item()) + 1
    return min(rank, squares.shape[-1])


def kept_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` capped at the number of singular values, or, without one, the ``energy`` rank."""
    return min(rank, singular_values.shape[-1]) if rank is not None else energy_rank(singular_values, energy)


def head_counts(config) -> tuple[int, int, int]:
    """(query heads, key-value heads, head_dim) of ``config``."""
    heads = int(getattr(config, QUERY_HEADS))
    kv_heads = int(getattr(config, KV_HEADS, None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, int(head_dim)


# --- the lines of `moe-compress inspect` (Method.inspect) ------------------------------------------------

def expert_tensors(adapter) -> str:
    """The per-expert tensors of an MoE block, each as `block.path`."""
    return ", ".join(f"`{adapter.block_path(owner, name)}`" for owner, name in adapter.per_expert_paths())


def expert_matrices(adapter) -> str:
    """The matrices of one expert (gate/up, down), each as `name`."""
    return ", ".join(f"`{matrix}`" for matrix in adapter.expert_matrices)


def inspect_expert_selection(adapter) -> str:
    """The ``inspect`` line of every method that keeps a subset of each layer's experts."""
    shared = f"; `{'`, `'.join(adapter.shared_modules)}` never touched" if adapter.shared_modules else ""
    return (f"select the kept experts in {expert_tensors(adapter)}{shared}; stock when every layer keeps as many, "
            "else remote code")
