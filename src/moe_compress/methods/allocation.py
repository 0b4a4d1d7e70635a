"""Targets instead of thresholds: how many experts each MoE layer keeps, from a whole-model target.

A target is one of
- ``experts_fraction``: the fraction of the model's routed experts kept (nearest expert);
- ``experts``: the number of routed experts kept over all MoE layers (nearest expert);
- ``parameters``: a budget for the model's total parameter count (the largest choice within it).

The allocation rule decides each layer's share:
- ``uniform``: every layer keeps the same fraction of its experts (the same count where layers are
  alike, as ``keep`` does);
- ``global``: one ranking of all experts across layers, on a score made comparable between layers by
  dividing each layer's scores by their sum (a layer whose usage is spread evenly keeps more experts
  than one where a few experts take most tokens).

Either way a layer keeps at least as many experts as it routes each token to (its top-k), the floor a
target below the floors cannot go under; the report says where it did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.modelio import count_parameters


@dataclass(frozen=True)
class ExpertBudget:
    """The model's stored parameters as pruning sees them: ``fixed`` (everything but the routed experts)
    plus, per MoE layer, ``count`` experts of ``size`` each (expert matrices, biases, router row, choice bias)."""

    fixed: int
    count: dict[int, int]
    size: dict[int, int]
    floor: dict[int, int]

    def parameters(self, kept: dict[int, int]) -> int:
        return self.fixed + sum(kept[layer] * self.size[layer] for layer in kept)


def expert_budget(model, context=None) -> ExpertBudget:
    """The budget of ``model``'s MoE layers (those ``context`` works on, else all); a meta-device skeleton
    gives the same numbers as the loaded model."""
    adapter = adapter_for(model.config)
    blocks = adapter.moe_blocks(model) if context is None else context.moe_blocks(model)
    count, size, floor = {}, {}, {}
    for layer, block in blocks.items():
        count[layer] = adapter.block_num_experts(block)
        size[layer] = sum(tensor.numel() for tensor in adapter.per_expert_tensors(block).values()) // count[layer]
        floor[layer] = min(adapter.router_settings(block)["top_k"], count[layer])
    total = count_parameters(model)  # what compression.json reports: persistent buffers included
    return ExpertBudget(fixed=total - sum(count[layer] * size[layer] for layer in count), count=count, size=size,
                        floor=floor)


def _uniform(budget: ExpertBudget, fraction: float) -> dict[int, int]:
    return {layer: min(budget.count[layer], max(budget.floor[layer], int(round(fraction * budget.count[layer]))))
            for layer in budget.count}


def _global(budget: ExpertBudget, scores: dict[int, np.ndarray], total: int | None,
            parameters: int | None) -> dict[int, int]:
    """Keep the floors, then experts in order of their layer-normalised score, until ``total`` experts
    are kept or the next one would exceed ``parameters``."""
    kept = dict(budget.floor)
    candidates = []
    for layer, layer_scores in scores.items():
        normalised = np.asarray(layer_scores, dtype=np.float64)
        normalised = normalised / normalised.sum() if normalised.sum() > 0 else np.zeros_like(normalised)
        # the floor keeps each layer's best experts; the rest compete across layers
        for rank, value in enumerate(np.sort(normalised)[::-1][budget.floor[layer]:]):
            candidates.append((-value, layer, rank))
    for _, layer, _ in sorted(candidates):  # ties: lower layer first, then rank: deterministic
        if total is not None and sum(kept.values()) >= total:
            break
        if parameters is not None and budget.parameters(kept) + budget.size[layer] > parameters:
            break
        kept[layer] += 1
    return kept


def _wanted_experts(kind: str, value, budget: ExpertBudget) -> int:
    return int(round(value * sum(budget.count.values()))) if kind == "experts_fraction" else int(value)


def target_above_model(target: dict, budget: ExpertBudget) -> str | None:
    """Why ``target`` asks for more experts or parameters than a model of ``budget`` has (a pruned variant that
    would prune nothing), or None."""
    (kind, value), = target.items()
    if kind == "parameters":
        total = budget.parameters(budget.count)
        if value > total:
            return (f"{value:.0f} is more than the model's {total} parameters: the variant would prune nothing; "
                    f"set a budget below {total}")
        return None
    total = sum(budget.count.values())
    if _wanted_experts(kind, value, budget) > total:
        return (f"{value} is more than the model's {total} routed experts ({len(budget.count)} MoE layers): the "
                f"variant would prune nothing")
    return None


def target_below_floor(target: dict, budget: ExpertBudget) -> str | None:
    """Why ``target`` asks for less than a model of ``budget`` keeps with every MoE layer at its top-k floor
    (a layer keeps at least the experts it routes each token to), or None."""
    (kind, value), = target.items()
    if kind == "parameters":
        floor = budget.parameters(budget.floor)
        if value < floor:
            return (f"{value:.0f} is below what the model keeps with every MoE layer at its top-k floor "
                    f"({floor} parameters); raise the budget to at least {floor}")
        return None
    floor, wanted = sum(budget.floor.values()), _wanted_experts(kind, value, budget)
    if wanted < floor:
        asked = f"{value} ({wanted} experts)" if kind == "experts_fraction" else f"{value}"
        return (f"{asked} is fewer than the {floor} experts the {len(budget.count)} MoE layers keep at their top-k "
                f"floors; ask for at least {floor}")
    return None


def allocate(target: dict, allocation: str, scores: dict[int, np.ndarray], budget: ExpertBudget) -> tuple[
        dict[int, int], dict]:
    """(experts kept per layer, the report: target, allocation, what was achieved)."""
    (kind, value), = target.items()
    total_experts = sum(budget.count.values())
    wanted = None if kind == "parameters" else _wanted_experts(kind, value, budget)
    below_floor = target_below_floor(target, budget) if kind == "parameters" else None
    if below_floor:
        raise ModelError(f"target parameters={below_floor}")
    if allocation == "global":
        kept = _global(budget, scores, wanted, value if kind == "parameters" else None)
    elif wanted is not None:
        kept = _uniform(budget, wanted / total_experts)
    else:  # the largest uniform fraction within the parameter budget
        fractions = sorted({n / count for count in budget.count.values() for n in range(count + 1)}, reverse=True)
        kept = next((choice for choice in map(lambda f: _uniform(budget, f), fractions)
                     if budget.parameters(choice) <= value), dict(budget.floor))
    achieved = {"experts": sum(kept.values()), "experts_fraction": round(sum(kept.values()) / total_experts, 6),
                "parameters": budget.parameters(kept)}
    report = {"target": {kind: value}, "allocation": allocation, "achieved": achieved,
              "at_floor": sorted(layer for layer in kept if kept[layer] == budget.floor[layer])}
    if wanted is not None and achieved["experts"] != wanted:
        report["note"] = (f"{achieved['experts']} experts kept for a target of {wanted}: "
                          + ("the nearest uniform split" if allocation == "uniform" else "the top-k floors")
                          + " over the layers")
    return kept, report
