"""Experts and neurons a step never removes or merges away: super experts and super neurons.

Super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"; their
code's ``_identify_super_experts``) are the few routed experts whose down-projection output carries the extreme
activation outliers that become the model's massive activations. Each expert's peak is the largest absolute
element of its (unweighted) output over the calibration tokens routed to it (``peak_output`` of the statistics
table); an expert is a super expert when its peak is above the 99.5th percentile of the peaks of every routed
expert of the model and above a tenth of the largest. Pruning the handful of them collapses the model although
frequency and REAP saliency may rank them low (they fire on a few tokens, e.g. the first of a sequence).

Super neurons are the intermediate dimensions of the routed experts with the same kind of outlier at
down-projection's input: a neuron's peak is the largest |activation| over the tokens routed to its expert
(``neuron_peaks.safetensors``), and the same rule runs over every neuron of the model.

A step's ``protect`` option:
- ``super_experts``: the papers' rule above;
- ``{super_experts: {count: N}}``: the N largest peaks of the model;
- ``{super_experts: {quantile: q, fraction_of_max: f}}``: the rule with other bounds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from moe_compress.errors import ModelError
from moe_compress.methods.registry import Problem

PROTECT_SUPER_EXPERTS = "super_experts"
PAPER_QUANTILE = 99.5
PAPER_FRACTION_OF_MAX = 0.1
PEAK_COLUMN = "peak_output"


def protection_rule(step: dict) -> dict | None:
    """The step's ``protect`` option as {"count": N} or {"quantile": q, "fraction_of_max": f}; None without one."""
    option = step.get("protect")
    if option is None:
        return None
    if option == PROTECT_SUPER_EXPERTS:
        return {"quantile": PAPER_QUANTILE, "fraction_of_max": PAPER_FRACTION_OF_MAX}
    rule = dict(option[PROTECT_SUPER_EXPERTS])
    if "count" in rule:
        return {"count": int(rule["count"])}
    return {"quantile": float(rule.get("quantile", PAPER_QUANTILE)),
            "fraction_of_max": float(rule.get("fraction_of_max", PAPER_FRACTION_OF_MAX))}


def outliers(peaks: np.ndarray, rule: dict) -> np.ndarray:
    """A bool per peak: whether it is one of the outliers ``rule`` names among all of ``peaks``."""
    peaks = np.asarray(peaks, dtype=np.float64)
    if len(peaks) == 0:
        return np.zeros(0, dtype=bool)
    if "count" in rule:
        chosen = np.zeros(len(peaks), dtype=bool)
        # highest first; ties by position so the choice is deterministic
        chosen[np.argsort(-peaks, kind="stable")[:rule["count"]]] = True
        return chosen & (peaks > 0)
    return (peaks > np.percentile(peaks, rule["quantile"])) & (peaks > rule["fraction_of_max"] * peaks.max())


def super_experts(stats: pd.DataFrame, rule: dict) -> pd.DataFrame:
    """The rows (layer, expert, peak_output) of the super experts ``rule`` finds among every routed expert of the
    statistics table (the original model's layers and expert ids), largest peak first."""
    if PEAK_COLUMN not in stats.columns:
        raise ModelError(f"protect: super_experts needs the {PEAK_COLUMN} column of the expert statistics table "
                         "(results/stats/expert_frequency.parquet from this version of the pipeline); rebuild "
                         "results/stats")
    table = stats[["layer", "expert", PEAK_COLUMN]].reset_index(drop=True)
    chosen = table[outliers(table[PEAK_COLUMN].to_numpy(), rule)]
    return chosen.sort_values(PEAK_COLUMN, ascending=False, kind="stable", ignore_index=True)


def protected_experts(step: dict, context) -> tuple[dict[int, np.ndarray], list[dict] | None]:
    """({layer: a bool per current expert slot, True where the step protects it}, the protected experts as the
    report lists them) for the layers ``context`` works on; ({}, None) for a step without ``protect``."""
    rule = protection_rule(step)
    if rule is None:
        return {}, None
    if context.stats is None:
        raise ModelError(f"{step['method']} with protect needs the expert statistics table")
    chosen = super_experts(context.stats, rule)
    masks = {}
    for layer, original_ids in context.original_expert_ids.items():
        ids = chosen.loc[chosen["layer"] == context.original_layer(layer), "expert"].to_numpy()
        masks[layer] = np.isin(original_ids.numpy(), ids)
    # how far out each one is: a model without massive activations still has a largest peak
    median = float(context.stats[PEAK_COLUMN].median())
    report = [{"layer": int(row.layer), "expert": int(row.expert), PEAK_COLUMN: float(getattr(row, PEAK_COLUMN)),
               "times_median": round(float(getattr(row, PEAK_COLUMN)) / median, 3) if median > 0 else None}
              for row in chosen.itertuples()]
    return masks, report


def protected_counts(masks: dict[int, np.ndarray]) -> dict[int, int]:
    return {layer: int(mask.sum()) for layer, mask in masks.items()}


def super_neurons(neuron_peaks: dict[int, torch.Tensor], rule: dict) -> dict[int, torch.Tensor]:
    """{layer: bool [experts, intermediate]}: the neurons ``rule`` finds among every routed expert's neurons of the
    model (``neuron_peaks``: {layer: [experts, intermediate]} peaks of the original model)."""
    layers = sorted(neuron_peaks)
    flat = np.concatenate([neuron_peaks[layer].double().reshape(-1).numpy() for layer in layers])
    chosen = torch.from_numpy(outliers(flat, rule))
    masks, start = {}, 0
    for layer in layers:
        size = neuron_peaks[layer].numel()
        masks[layer] = chosen[start:start + size].reshape(neuron_peaks[layer].shape)
        start += size
    return masks


def protected_neurons(step: dict, context, widths: dict[int, int]) -> tuple[dict[int, torch.Tensor], list[dict] | None]:
    """({layer: bool [current experts, intermediate], True where the step protects the neuron}, the protected
    neurons as the report lists them) for the layers ``context`` works on (``widths``: each layer's current expert
    width); ({}, None) for a step without ``protect``. The peaks are the original model's, so the experts must
    still have their original width."""
    rule = protection_rule(step)
    if rule is None:
        return {}, None
    if context.neuron_peaks is None:
        raise ModelError(f"{step['method']} with protect needs the neuron peaks of the statistics "
                         "(results/stats/neuron_peaks.safetensors from this version of the pipeline)")
    chosen = super_neurons(context.neuron_peaks, rule)
    median = float(torch.cat([peaks.reshape(-1) for peaks in context.neuron_peaks.values()]).median())
    masks, report = {}, []
    for layer, original_ids in context.original_expert_ids.items():
        original_layer = context.original_layer(layer)
        if original_layer not in chosen:
            raise ModelError(f"layer {layer}: no neuron peaks for this MoE layer; rebuild results/stats")
        layer_mask = chosen[original_layer]
        if layer_mask.shape[1] != widths[layer]:
            raise ModelError(f"layer {layer}: the experts are {widths[layer]} neurons wide, the neuron peaks were "
                             f"measured at {layer_mask.shape[1]}; a protected width cut must come before any other "
                             "width cut of the variant")
        masks[layer] = layer_mask[original_ids]
        peaks = context.neuron_peaks[original_layer]
        for expert, neuron in torch.nonzero(layer_mask).tolist():
            peak = float(peaks[expert, neuron])
            report.append({"layer": original_layer, "expert": expert, "neuron": neuron, "peak": peak,
                           "times_median": round(peak / median, 3) if median > 0 else None})
    return masks, sorted(report, key=lambda row: -row["peak"])


def needs_neuron_peaks(steps: list[dict]) -> bool:
    """Whether a step protects neurons (a width cut with ``protect``): the one reader of the neuron peaks."""
    return any(step["method"] == "prune_expert_width" and "protect" in step for step in steps)


def protect_problem(step: dict) -> Problem | None:
    """What is wrong with the step's ``protect`` that the schema does not say: a count beside a threshold."""
    option = step.get("protect")
    if isinstance(option, dict) and "count" in option[PROTECT_SUPER_EXPERTS] and len(option[PROTECT_SUPER_EXPERTS]) > 1:
        return Problem("protect", "super_experts takes a count or a threshold (quantile, fraction_of_max), not both")
    return None
