"""``reduce_hidden``: shrink the residual stream to the ``keep`` channels with the most calibration energy
(any decoder), through the embeddings, every norm, attention, the MLPs, the routers and the experts.

Channel energy: the mean squared activation of each channel at the input of every norm over the
residual stream (each sublayer's input and the final norm's), each norm's energies normalised to sum 1
so every point of the stream counts alike, then summed. The channels with the least energy go.

A norm over the residual stream divides by the RMS over the channels it sees; without the removed
channels that RMS is larger (they held some energy) and the width it averages over is smaller, so each
norm's scale is corrected by sqrt((kept energy / H') / (all energy / H)) measured at its own input. The
correction applies to norms whose output is ``x * weight`` or ``x * (1 + weight)`` (read off the module
itself); another kind is left as it is and named in the report.

The cut is blunt (the recipe's own table shows it costs more than the other steps at the same size):
every matrix reading the stream loses the removed channels' inputs outright. Which dimensions follow
the hidden size is read from the model class (``resize.follow_map``); the checkpoint stays stock.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moe_compress.errors import ModelError
from moe_compress.methods.common import head_counts
from moe_compress.methods.context import calibration_forward
from moe_compress.methods.registry import (
    ALIGNMENT,
    HIDDEN_SIZE,
    Method,
    Problem,
    aligned_count,
    alignment_problem,
    exactly_one_of,
)
from moe_compress.methods.resize import Axis, adopt_config, cut_tensors, follow_map

log = logging.getLogger(__name__)


def _check_shape(step: dict, shape) -> Problem | None:
    return None if shape.hidden_size is None else alignment_problem(step, shape.hidden_size, "channels")


def _follows(config, keep: int):
    """The dimensions that follow the hidden size (``head_dim`` pinned: many configs derive it from it)."""
    hidden = int(config.hidden_size)
    fixed = {"head_dim": head_counts(config)[2]} if hasattr(config, "num_attention_heads") else {}
    other = keep + ALIGNMENT if keep + ALIGNMENT < hidden else keep - 1
    return fixed, follow_map(config, fixed, [Axis("hidden_size", hidden)],
                             [{"hidden_size": keep}, {"hidden_size": max(1, other)}])


def _check_model(step: dict, config) -> Problem | None:
    try:
        _follows(config, aligned_count(step, int(config.hidden_size)))
    except ModelError as err:
        return Problem(None, str(err))
    return None


def _stream_norms(model, follows: dict) -> dict[str, nn.Module]:
    """The norms over the residual stream: modules named *Norm whose weight follows the hidden size."""
    norms = {}
    for name, dims in follows.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "weight" and list(dims) == [0] and "norm" in type(module).__name__.lower():
            norms[module_name] = module
    return norms


@torch.no_grad()
def stream_energy(model, norms: dict[str, nn.Module], input_ids: torch.Tensor,
                  batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per norm, the summed squared activation of every channel at its input [hidden] (float64)."""
    sums = {}

    def accumulate(name):
        def hook(module, args):
            squared = args[0].double().square().reshape(-1, args[0].shape[-1]).sum(dim=0)
            sums[name] = sums[name] + squared if name in sums else squared
        return hook

    handles = [module.register_forward_pre_hook(accumulate(name)) for name, module in norms.items()]
    try:
        calibration_forward(model, input_ids, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(norms) - set(sums))
    if missing:
        raise ModelError(f"reduce_hidden: the norm {missing[0]} never ran on the calibration tokens")
    return {name: value.cpu() for name, value in sums.items()}


@torch.no_grad()
def _gain_form(module: nn.Module, hidden: int) -> str | None:
    """How ``module`` applies its weight: "plain" (x * w), "offset" (x * (1 + w)), or None (neither)."""
    weight = module.weight
    probe = torch.where(torch.arange(hidden, device=weight.device) % 2 == 0, 1.0, -1.0).to(weight.dtype)[None]
    gain = ((module(probe) - module(-probe)) / (2 * probe))[0].double()  # unit RMS, zero mean: the gain alone
    tolerance = 1e-2 * float(weight.double().abs().max().clamp_min(1))
    if torch.allclose(gain, weight.double(), atol=tolerance):
        return "plain"
    if torch.allclose(gain, 1 + weight.double(), atol=tolerance):
        return "offset"
    return None


def reduce_hidden(model, step: dict, context) -> dict:
    config = model.config
    hidden = int(config.hidden_size)
    problem = alignment_problem(step, hidden, "channels")
    if problem:
        raise ModelError(f"reduce_hidden.{problem.option}: {problem.message}")
    keep = aligned_count(step, hidden)
    report = {"hidden_size": {"from": hidden, "to": keep}}
    if context.calibration_ids is None:
        raise ModelError("reduce_hidden needs the calibration tokens")
    fixed, follows = _follows(config, keep)
    norms = _stream_norms(model, follows)
    if not norms:
        raise ModelError(f"reduce_hidden: no norm of {config.model_type} runs over the hidden size")
    energy = stream_energy(model, norms, context.calibration_ids)
    share = sum(value / value.sum().clamp_min(1e-300) for value in energy.values())
    channels = torch.argsort(share, descending=True, stable=True)[:keep].sort().values

    forms = {name: _gain_form(module, hidden) for name, module in norms.items()}
    cut_tensors(model, follows, lambda name, field: channels)
    adopt_config(model, fixed, {"hidden_size": keep}, follows)
    corrections, uncorrected = {}, []
    with torch.no_grad():
        for name, module in norms.items():
            total = energy[name]
            scale = float(((total[channels].sum() / keep) / (total.sum() / hidden).clamp_min(1e-300)).sqrt())
            if scale == 1.0:  # nothing removed
                pass
            elif forms[name] == "plain":
                module.weight.mul_(scale)
            elif forms[name] == "offset":
                module.weight.copy_((1 + module.weight.double()) * scale - 1)
            else:
                uncorrected.append(name)
                continue
            corrections[name] = round(scale, 6)
    # what later steps measure runs on the kept channels
    context.moe_inputs = {layer: value.index_select(-1, channels.to(value.device))
                          for layer, value in context.moe_inputs.items()}
    context.reference_outputs = {layer: value.index_select(-1, channels.to(value.device))
                                 for layer, value in context.reference_outputs.items()}
    kept_share = float(share[channels].sum() / share.sum())
    log.info("kept %d of %d channels (%.4f of the normalised energy)", keep, hidden, kept_share)
    return {**report, "energy_kept": round(kept_share, 6), "removed_channels": sorted(
        set(range(hidden)) - set(channels.tolist())), "norm_scale": corrections, "norms_not_rescaled": uncorrected}


METHODS = (
    Method("reduce_hidden", reduce_hidden, frozenset({HIDDEN_SIZE}), any_decoder=True,
           check_options=lambda step: exactly_one_of(step, "keep", "fraction"), check_shape=_check_shape,
           check_model=_check_model, whole_model=lambda step: "reduce_hidden cuts the embeddings and every layer",
           inspect=lambda adapter: "the lowest-energy residual channels, everywhere; stock, where every tensor that "
                                   "follows the hidden size can be cut (checked on a skeleton)"),
)
