"""Fewer active experts per token, and training-free mitigations fitted on cached calibration data.

- ``active_experts``: the router's top-k, per layer (a stock checkpoint when every layer agrees).
- ``renormalize``: the kept top-k weights sum to 1 (the router's own switch where it has one; routers
  that always renormalise are left as they are; kept weights after dynamic skipping are rescaled).
- ``dynamic_skip`` (NAEE): for ranks >= 2, skip an expert whose weight is below beta x the top-1
  weight; beta fixed, or ``auto``: per layer, the beta whose mean number of active experts on the
  calibration tokens is ``target_active``. As NAEE does, the kept weights are renormalised (scaled to
  the sum the full top-k had: NAEE's division by their sum where that is 1, as on Mixtral, and the
  router's own scale elsewhere); ``renormalize: false`` keeps the raw weights.
- ``output_rescale``: per layer, the scalar or per-channel scale s minimising ||f - (g + s * r)||^2 on
  the fit tokens, where f is the original block's output, r the current routed experts' output and g
  the rest of the block (shared experts); folded into the experts' output projection, so a stock
  checkpoint stays stock. s = 1 is kept where the fitted scale would raise the held-out error.
"""

from __future__ import annotations

import logging

import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.registry import EXPERT_SCALE, ROUTING, Method, Problem, exactly_one_of
from moe_compress.moe_block import block_output, relative_error, route
from moe_compress.remote_code.moe_compress_layers import convert_to_dynamic_skip, is_skip_router

log = logging.getLogger(__name__)


@torch.no_grad()
def top_k_errors(adapter, block, hidden: torch.Tensor) -> dict[int, float]:
    """{k: relative error of the block's output on ``hidden`` with top-k = k, against its current top-k}
    for every k from the current one down to 1."""
    router = adapter.router_of(block)
    current = router.top_k
    reference = block_output(block, hidden)
    errors = {current: 0.0}
    try:
        for k in range(current - 1, 0, -1):
            router.top_k = k
            errors[k] = relative_error(reference, block_output(block, hidden))
    finally:
        router.top_k = current
    return errors


def per_layer_top_k(model, target_mean: float, context) -> tuple[dict[int, int], dict]:
    """Each layer's k for a mean of ``target_mean`` over the MoE layers (nearest): starting from the current
    top-k, one expert at a time is taken from the layer whose block output (on the fit tokens) changes
    least by it."""
    context.require_inputs("active_experts with target_mean")
    adapter = adapter_for(model.config)
    errors = {layer: top_k_errors(adapter, block, context.split_inputs(layer)[0])
              for layer, block in context.moe_blocks(model).items()}
    ks = {layer: max(layer_errors) for layer, layer_errors in errors.items()}
    reductions = sum(ks.values()) - int(round(target_mean * len(ks)))
    for _ in range(max(reductions, 0)):
        candidates = [(errors[layer][k - 1] - errors[layer][k], layer) for layer, k in ks.items() if k > 1]
        if not candidates:
            break
        _, layer = min(candidates)  # ties: the lower layer
        ks[layer] -= 1
    report = {"target_mean": target_mean, "achieved_mean": round(sum(ks.values()) / len(ks), 6),
              "top_k_per_layer": {str(layer): k for layer, k in ks.items()},
              "error_by_top_k": {str(layer): {str(k): round(error, 6) for k, error in layer_errors.items()}
                                 for layer, layer_errors in errors.items()}}
    return ks, report


def active_experts(model, step: dict, context) -> dict:
    adapter = adapter_for(model.config)
    report = {"previous_top_k": {}}
    if "target_mean" in step:
        ks, chosen = per_layer_top_k(model, step["target_mean"], context)
        report.update(chosen)
    for layer, block in context.each_block(model):
        router = adapter.router_of(block)
        report["previous_top_k"][str(layer)] = router.top_k
        router.top_k = ks[layer] if "target_mean" in step else step["k"]
    return report


def renormalize(model, step: dict, context) -> dict:
    adapter = adapter_for(model.config)
    report = {"switched": [], "already_renormalized": []}
    for layer, block in context.each_block(model):
        router = adapter.router_of(block)
        if adapter.renormalize is False and not is_skip_router(router):
            raise ModelError(f"renormalize: {adapter.model_type}'s router has no renormalisation switch; put "
                             "renormalize after a dynamic_skip step, or use dynamic_skip with renormalize: true")
        if isinstance(adapter.renormalize, str) and not getattr(router, adapter.renormalize):
            setattr(router, adapter.renormalize, True)
            report["switched"].append(layer)
        else:
            report["already_renormalized"].append(layer)
        if is_skip_router(router):
            router.skip_renormalize = True
        context.renormalized.add(layer)
    return report


def auto_beta(weights: torch.Tensor, target_active: float) -> float:
    """The beta at which the mean number of experts with weight >= beta x top-1 is ``target_active``.

    ``weights`` [tokens, k]. Each token keeps its top-1 and every other expert whose ratio to the top-1
    is >= beta, so the mean kept count is 1 + (ratios >= beta).sum() / tokens: a quantile of the ratios."""
    tokens, k = weights.shape
    ratios = (weights / weights.max(dim=-1, keepdim=True).values.clamp_min(1e-20)).double()
    others = ratios.sort(dim=-1, descending=True).values[:, 1:].reshape(-1).sort(descending=True).values
    wanted = int(round((target_active - 1.0) * tokens))  # how many non-top-1 slots stay active
    if wanted >= len(others):
        return 0.0
    if wanted <= 0:  # only the top-1 (beta may not exceed 1: the top-1 itself must pass)
        return 1.0
    # halfway between the last kept and the first skipped ratio: robust to ties at the boundary
    return float((others[wanted - 1] + others[wanted]) / 2)


def dynamic_skip(model, step: dict, context) -> dict:
    adapter = adapter_for(model.config)
    beta = step["beta"]
    report = {"beta": {}}
    if beta == "auto":
        context.require_inputs("dynamic_skip with beta: auto")
    for layer, block in context.each_block(model):
        router = adapter.router_of(block)
        if beta == "auto":
            with torch.no_grad():
                weights, _ = route(adapter, block, context.split_inputs(layer)[0])
            layer_beta = auto_beta(weights.float(), step["target_active"])
        else:
            layer_beta = float(beta)
        renormalize_kept = step["renormalize"] or layer in context.renormalized
        convert_to_dynamic_skip(router, adapter.experts_of(block), layer_beta, renormalize_kept)
        report["beta"][str(layer)] = layer_beta
    return report


@torch.no_grad()
def routed_and_rest(adapter, block, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(routed experts' output, the rest of the block's output) for ``hidden`` [tokens, hidden]."""
    captured = {}
    handle = adapter.experts_of(block).register_forward_hook(lambda module, args, output: captured.update(out=output))
    try:
        total = block_output(block, hidden)
    finally:
        handle.remove()
    routed = captured["out"].reshape(hidden.shape)
    return routed, total - routed


def least_squares_scale(target: torch.Tensor, routed: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """argmin_s ||target - s * routed||^2, s a scalar or one value per hidden channel."""
    target, routed = target.double(), routed.double()
    dims = (0,) if per_channel else (0, 1)
    numerator, denominator = (target * routed).sum(dim=dims), (routed * routed).sum(dim=dims)
    scale = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.ones_like(denominator))
    return scale.reshape(-1)


def output_rescale(model, step: dict, context) -> dict:
    context.require_inputs("output_rescale")
    adapter = adapter_for(model.config)
    per_channel = step["granularity"] == "channel"
    report = {"layers": {}}
    for layer, block in context.each_block(model):
        fit, heldout = context.split_inputs(layer)
        target_fit, target_heldout = context.split_reference(layer)
        routed, rest = routed_and_rest(adapter, block, fit)
        scale = least_squares_scale(target_fit - rest, routed, per_channel).to(routed.dtype)
        heldout_routed, heldout_rest = routed_and_rest(adapter, block, heldout)
        # the scale acts linearly on the routed output, so its effect is measured without touching weights
        fit_before, fit_after = (relative_error(target_fit, s * routed + rest) for s in (1.0, scale))
        heldout_before, heldout_after = (relative_error(target_heldout, s * heldout_routed + heldout_rest)
                                         for s in (1.0, scale))
        kept = heldout_after <= heldout_before
        if kept:
            adapter.scale_expert_outputs(block, scale)
        report["layers"][str(layer)] = {
            "scale_mean": float(scale.mean()), "scale_min": float(scale.min()), "scale_max": float(scale.max()),
            "fit_error_before": fit_before, "fit_error_after": fit_after,
            "heldout_error_before": heldout_before, "heldout_error_after": heldout_after, "applied": kept}
        log.info("layer %d: scale mean %.4f, held-out error %.4f -> %.4f%s", layer, float(scale.mean()),
                 heldout_before, heldout_after, "" if kept else " (not applied)")
    return report


def _active_options(step: dict) -> Problem | None:
    return exactly_one_of(step, "k", "target_mean")


def _active_whole_model(step: dict) -> str | None:
    if "target_mean" in step:
        return "active_experts with target_mean chooses each layer's k against the other layers"
    return None


def _active_shape(step: dict, shape) -> Problem | None:
    option = "k" if "k" in step else "target_mean"
    if shape.fixed_top_k is not None and step[option] != shape.fixed_top_k:
        return Problem(option, f"this router always picks {shape.fixed_top_k} experts (SparseMixer); its top-k "
                               "cannot change (dynamic_skip can still lower the active experts)")
    if option == "target_mean":
        # each layer's k only goes down from its own top-k, so the mean cannot exceed theirs
        if step["target_mean"] > shape.mean_top_k:
            routed = (f"{shape.top_k} experts each token is routed to" if not shape.top_k_per_layer
                      else f"{shape.mean_top_k:g} experts each token is routed to on average over the layers")
            return Problem("target_mean", f"{step['target_mean']} is more than the {routed}")
        return None
    if step["k"] > shape.num_experts:
        return Problem("k", f"{step['k']} is more than the {shape.num_experts} experts per layer")
    return None


def _skip_options(step: dict) -> Problem | None:
    if step["beta"] == "auto" and step.get("target_active") is None:
        return Problem("target_active", "required with beta: auto")
    return None


def _skip_shape(step: dict, shape) -> Problem | None:
    # every layer aims at target_active, so it may not exceed the smallest top-k of any layer
    if step.get("target_active") is not None and step["target_active"] > shape.fewest_routed:
        where = "" if not shape.top_k_per_layer else " in the layers with the smallest top-k"
        return Problem("target_active", f"{step['target_active']} is more than the {shape.fewest_routed} experts each "
                                        f"token is routed to{where}")
    return None


def _inspect_active(adapter) -> str:
    if adapter.fixed_top_k is not None:
        return f"refused: the router always picks {adapter.fixed_top_k} experts"
    return f"sets `{adapter.router}.top_k` (config `{adapter.config_top_k}`); stock when every layer agrees"


def _inspect_renormalize(adapter) -> str:
    if adapter.renormalize is True:
        return "nothing to do: the router always renormalises"
    if adapter.renormalize is False:
        return "only after dynamic_skip (the router has no renormalisation switch)"
    return f"sets `{adapter.router}.{adapter.renormalize}`; stock"


def _inspect_skip(adapter) -> str:
    return "skip low-weight experts per token; remote code"


def _inspect_rescale(adapter) -> str:
    return f"scale `{adapter.expert_matrices[1]}` per layer; stock"


METHODS = (
    Method("active_experts", active_experts, frozenset({ROUTING}), check_options=_active_options,
           check_shape=_active_shape, whole_model=_active_whole_model, inspect=_inspect_active),
    Method("renormalize", renormalize, frozenset({ROUTING}), inspect=_inspect_renormalize),
    Method("dynamic_skip", dynamic_skip, frozenset({ROUTING}), check_options=_skip_options, check_shape=_skip_shape,
           inspect=_inspect_skip),
    Method("output_rescale", output_rescale, frozenset({EXPERT_SCALE}), inspect=_inspect_rescale),
)
