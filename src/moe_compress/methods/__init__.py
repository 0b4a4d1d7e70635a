"""Compression methods. Each is a function ``apply(model, step, context) -> dict`` (a per-step report)
registered by method name; a variant applies its steps in order. Methods edit the in-memory model and
know nothing of Snakemake or file paths."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError, check_finite

log = logging.getLogger(__name__)


@dataclass
class CompressionContext:
    """What steps may read besides the model.

    - ``stats``: the expert frequency table of the original model;
    - ``original_expert_ids``: which original expert each current expert slot holds, per layer, so a
      later step can still look up the statistics of an earlier step's survivors;
    - ``moe_inputs``: cached MoE-block inputs per layer [tokens, hidden]; the last
      ``heldout_fraction`` of the tokens (whole calibration samples) are held out from fitting and
      measure reconstruction error;
    - ``reference_outputs``: the original (unmodified) MoE blocks' outputs on those inputs, filled by
      ``apply_steps`` before the first step: the target of fitted mitigations and of every error;
    - ``calibration_ids``: the calibration token windows [samples, seq_len], for whole-model measurements;
    - ``renormalized``: layers a ``renormalize`` step has switched to renormalised top-k weights;
    - ``layers``: the MoE layers the steps work on (None: all). A per-layer job sets one layer: the
      model's other layers may stay on the meta device, unread;
    - ``current_layer``: the layer a step is working on (set by ``each_block``), so an error raised
      inside a step can name it.

    Device placement: cached inputs and reference outputs live on the device of the layer they feed;
    ``original_expert_ids`` are bookkeeping that index the statistics table, so they stay on the CPU.
    """

    stats: pd.DataFrame | None = None
    original_expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    moe_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    heldout_fraction: float = 0.1
    reference_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    calibration_ids: torch.Tensor | None = None
    renormalized: set[int] = field(default_factory=set)
    layers: set[int] | None = None
    current_layer: int | None = None

    @classmethod
    def for_model(cls, model, stats: pd.DataFrame | None = None, moe_inputs: dict[int, torch.Tensor] | None = None,
                  heldout_fraction: float = 0.1, calibration_ids: torch.Tensor | None = None,
                  layers: set[int] | None = None) -> "CompressionContext":
        context = cls(stats=stats, moe_inputs=moe_inputs or {}, heldout_fraction=heldout_fraction,
                      calibration_ids=calibration_ids, layers=layers)
        adapter = adapter_for(model.config)
        context.original_expert_ids = {index: torch.arange(adapter.block_num_experts(block), device="cpu")
                                       for index, block in context.moe_blocks(model).items()}
        return context

    def moe_blocks(self, model) -> dict[int, torch.nn.Module]:
        """The MoE blocks the steps work on, by decoder-layer index."""
        blocks = adapter_for(model.config).moe_blocks(model)
        if self.layers is None:
            return blocks
        missing = self.layers - set(blocks)
        if missing:
            raise ModelError(f"layers {sorted(missing)} are not MoE layers of this model (MoE layers: {sorted(blocks)})")
        return {index: block for index, block in blocks.items() if index in self.layers}

    def each_block(self, model, only=None):
        """``moe_blocks(model).items()`` (restricted to the layers in ``only``, if given), noting each
        layer in ``current_layer`` while the caller works on it."""
        blocks = self.moe_blocks(model)
        for layer in (blocks if only is None else only):
            if layer not in blocks:
                raise ModelError(f"layer {layer} is not an MoE layer this step works on (MoE layers: {sorted(blocks)})")
            self.current_layer = layer
            yield layer, blocks[layer]
        self.current_layer = None

    def heldout_count(self, layer: int) -> int:
        return max(1, int(round(len(self.moe_inputs[layer]) * self.heldout_fraction)))

    def split_inputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit tokens, held-out tokens) of one layer's cached inputs."""
        hidden, heldout = self.moe_inputs[layer], self.heldout_count(layer)
        return hidden[:-heldout], hidden[-heldout:]

    def split_reference(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit, held-out) original block outputs, aligned with ``split_inputs``."""
        reference, heldout = self.reference_outputs[layer], self.heldout_count(layer)
        return reference[:-heldout], reference[-heldout:]

    def require_inputs(self, method: str) -> None:
        if not self.moe_inputs:
            raise ModelError(f"{method} needs the cached MoE-block inputs (results/cache/moe_inputs)")


# Steps that need the whole model: drop_layers measures layer similarity with full forward passes and
# renumbers the layers; dtype also casts the embeddings and the head.
WHOLE_MODEL_METHODS = ("drop_layers", "dtype")


def whole_model_reason(step: dict) -> str | None:
    """Why ``step`` cannot run one MoE layer at a time (None: it can, each layer on its own)."""
    if step["method"] in WHOLE_MODEL_METHODS:
        return f"{step['method']} works on the whole model"
    if step["method"] == "frequency_prune" and step.get("uniform") and not step.get("keep"):
        return "frequency_prune with uniform and no keep sets one count from the mean over all layers"
    return None


def merge_layer_reports(reports_per_layer: list[list[dict]]) -> list[dict]:
    """One variant's step reports from its per-layer jobs, combined into what one job over all layers
    reports: per-layer dicts are united, per-layer lists concatenated, everything else is the same in
    every job (the step's own settings)."""
    if not reports_per_layer:
        return []
    merged = []
    for step_reports in zip(*reports_per_layer, strict=True):
        combined = {}
        for key in step_reports[0]:
            values = [report[key] for report in step_reports]
            if all(isinstance(value, dict) for value in values):
                combined[key] = {k: v for value in values for k, v in value.items()}
            elif all(isinstance(value, list) for value in values):
                combined[key] = [item for value in values for item in value]
            elif all(value == values[0] for value in values):
                combined[key] = values[0]
            else:
                raise ModelError(f"step {step_reports[0]['step']}: per-layer reports disagree on {key!r}: {values}")
        merged.append(combined)
    return merged


def _registry():
    from moe_compress.methods import decoder, low_rank, merging, pruning, routing

    return {"frequency_prune": pruning.frequency_prune, "reap_prune": pruning.reap_prune,
            "hc_merge": merging.hc_merge, "svd_experts": low_rank.svd_experts,
            "active_experts": routing.active_experts, "renormalize": routing.renormalize,
            "dynamic_skip": routing.dynamic_skip, "output_rescale": routing.output_rescale,
            "drop_layers": decoder.drop_layers, "dtype": decoder.cast_dtype}


@torch.no_grad()
def _measure(model, context: CompressionContext) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Per MoE layer still in the model: the block's output on held-out cached tokens, and the mean
    number of experts that get a non-zero weight per token (what dynamic skipping reduces), read from
    the router's output during that same forward pass."""
    from moe_compress.methods.merging import block_output

    adapter = adapter_for(model.config)
    outputs, active = {}, {}
    for layer, block in context.each_block(model):
        if layer not in context.moe_inputs:
            continue
        routing = {}
        handle = adapter.router_of(block).register_forward_hook(
            lambda module, args, output: routing.update(weights=output[1], indices=output[2]))
        try:
            outputs[layer] = block_output(block, context.split_inputs(layer)[1])
        finally:
            handle.remove()
        weights, indices = routing["weights"], routing["indices"]
        active[layer] = float(((indices < adapter.block_num_experts(block)) & (weights != 0)).sum(dim=-1).float().mean())
    return outputs, active


def apply_steps(model, steps: list[dict], context: CompressionContext) -> list[dict]:
    """Apply ``steps`` in order to ``model`` (in place); return one report per step.

    With cached inputs, every step's report carries, per MoE layer, the relative reconstruction error
    ||f - f'|| / ||f|| of the block on held-out calibration tokens (f: the original block) and the mean
    number of experts active per token.

    Every step runs on the device the model's weights are on; an error inside a step is reported with
    the step and the layer it was working on, and a tensor a step leaves on another device, or with a
    NaN or inf, is named with its layer and step."""
    from moe_compress.methods.merging import block_output, relative_error

    registry = _registry()
    device = weights_device(model, context)
    check_inputs_placed(context, device)
    if context.moe_inputs and not context.reference_outputs:
        with torch.no_grad():
            # fit and held-out parts separately, exactly as they are measured later (same batch shapes,
            # so an unchanged block reproduces its reference bit for bit)
            context.reference_outputs = {layer: torch.cat([block_output(block, part)
                                                           for part in context.split_inputs(layer)])
                                         for layer, block in context.moe_blocks(model).items()
                                         if layer in context.moe_inputs}
    reports = []
    for index, step in enumerate(steps):
        log.info("step %d: %s", index, step)
        where = f"step {index} ({step['method']})"
        with step_errors(where, context):
            report = {"step": index, **step, **registry[step["method"]](model, step, context)}
        for layer, block in context.moe_blocks(model).items():  # e.g. a merge or a fit that diverged
            for name, tensor in block.state_dict().items():
                if tensor.device != device:
                    raise ModelError(f"{name} of MoE layer {layer} is on {tensor.device} after {where}, but the "
                                     f"model's weights are on {device}")
                if tensor.is_floating_point():
                    check_finite(tensor, f"{name} of MoE layer {layer} after {where}")
        if context.reference_outputs:
            with step_errors(f"measuring {where}", context):
                current, active = _measure(model, context)
            # keyed by the layer's current index (drop_layers re-keys the context's per-layer data)
            report["reconstruction_error"] = {str(layer): relative_error(context.split_reference(layer)[1], output)
                                              for layer, output in current.items()}
            report["active_experts_mean"] = {str(layer): value for layer, value in active.items()}
        reports.append(report)
    return reports


def weights_device(model, context: CompressionContext) -> torch.device:
    """The device of the weights the steps work on: the MoE blocks' (a per-layer job leaves the model's
    other layers on meta), else the model's."""
    blocks = context.moe_blocks(model)
    module = next(iter(blocks.values())) if blocks else model
    return next(module.parameters()).device


def check_inputs_placed(context: CompressionContext, device: torch.device) -> None:
    """The cached inputs must sit where the weights are: a mismatch would surface deep inside a step."""
    for layer, hidden in context.moe_inputs.items():
        if hidden.device != device:
            raise ModelError(f"the cached MoE inputs of layer {layer} are on {hidden.device}, but the model's weights "
                             f"are on {device}; read them with read_moe_inputs(..., device=model.device)")


@contextmanager
def step_errors(where: str, context: CompressionContext):
    """Re-raise torch's errors (device mismatches, out of memory, shape errors) naming the step and the
    layer it was working on; our own errors already say what is wrong."""
    context.current_layer = None
    try:
        yield
    except RuntimeError as err:
        layer = "" if context.current_layer is None else f", MoE layer {context.current_layer}"
        raise ModelError(f"{where}{layer} failed: {err}") from err
