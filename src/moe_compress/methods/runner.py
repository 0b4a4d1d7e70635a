"""Apply a variant's steps to a model, measuring each step's effect on the MoE blocks."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError, check_finite
from moe_compress.methods.context import CompressionContext
from moe_compress.methods.registry import ModelShape, method, variant_problems
from moe_compress.moe_block import block_output, relative_error

log = logging.getLogger(__name__)


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


@torch.no_grad()
def _measure(model, context: CompressionContext) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Per MoE layer still in the model: the block's output on held-out cached tokens, and the mean
    number of experts that get a non-zero weight per token (what dynamic skipping reduces), read from
    the router's output during that same forward pass."""
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
    check_variant(steps)
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
        check_layer_shapes(model, index, step, context)
        with step_errors(where, context):
            report = {"step": index, **step, **method(step["method"]).apply(model, step, context)}
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


def check_variant(steps: list[dict]) -> None:
    """The order and option rules the config check applies, for steps that did not come through it."""
    for index, problem in variant_problems(steps):
        option = f".{problem.option}" if problem.option else ""
        raise ModelError(f"step {index} ({steps[index]['method']}){option}: {problem.message}")


def check_layer_shapes(model, index: int, step: dict, context: CompressionContext) -> None:
    """The step's shape check against each MoE layer as the earlier steps left it (the config check saw
    only the original model)."""
    adapter = adapter_for(model.config)
    num_layers = len(adapter.decoder_layers(model))
    for layer, block in context.moe_blocks(model).items():
        shape = ModelShape(num_experts=adapter.block_num_experts(block),
                           top_k=adapter.router_settings(block)["top_k"], num_layers=num_layers,
                           fixed_top_k=adapter.fixed_top_k)
        problem = method(step["method"]).check_shape(step, shape)
        if problem:
            option = f".{problem.option}" if problem.option else ""
            raise ModelError(f"step {index} ({step['method']}){option}, MoE layer {layer}: {problem.message}")


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
