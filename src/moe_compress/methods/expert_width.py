"""``prune_expert_width``: keep the most important intermediate neurons of every routed expert (the
width cut NVIDIA's Minitron applies to Qwen3-30B-A3B's experts).

Importance of neuron j of expert e, on the cached MoE inputs (the fit part) routed as the router
routes them: the routing-weighted mean of |h_ej(x)| over the tokens, h_e = the expert's gated
activation (its own ``_apply_gate`` on the gate/up projection), times ||down_e[:, j]||, the size of what
the neuron writes back. An expert no calibration token reaches is judged by its weights alone
(||gate_j|| ||up_j|| ||down_j||), which orders its own neurons but is on another scale than a routed expert's
activations: it is left out of the global ranking below. Every expert keeps its own best neurons; all experts of a layer keep the same
number (the fused tensors hold one width per layer).

- ``allocation: uniform``: ``keep`` (or ``fraction``) neurons in every MoE layer. Where the config's
  expert-width field sizes nothing but the routed experts, it is rewritten and the checkpoint is stock;
  where it also sizes shared experts or dense layers, the checkpoint records the width per layer and
  loads through its remote-code module.
- ``allocation: global``: the same total over the MoE layers, divided by one ranking: a layer's r-th
  neuron slot is worth the summed importance of its routed experts' r-th best neurons (the experts some
  calibration token reaches), and the best slots over all layers are kept (at least one per layer).
  Per-layer widths: remote code.
"""

from __future__ import annotations

import logging

import torch

from moe_compress.architectures import adapter_for, replace_tensor
from moe_compress.errors import ModelError
from moe_compress.methods.common import expert_matrices
from moe_compress.methods.protection import protected_neurons
from moe_compress.methods.registry import (
    ALIGNMENT,
    EXPERT_WIDTH,
    Method,
    Problem,
    aligned_count,
    alignment_problem,
    exactly_one_of,
)
from moe_compress.methods.resize import skeleton
from moe_compress.moe_block import expert_activation
from moe_compress.remote_code.moe_compress_layers import stored_form_of

log = logging.getLogger(__name__)


def _check_shape(step: dict, shape) -> Problem | None:
    return None if shape.expert_width is None else alignment_problem(step, shape.expert_width, "neurons per expert")


def linear_matrices(adapter, experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate/up [E, 2I, H], down [E, H, I]) in nn.Linear orientation, whatever the storage."""
    gate_up, down = (getattr(experts, name).data for name in adapter.expert_matrices)
    if getattr(experts, "is_transposed", False):
        return gate_up.transpose(-1, -2), down.transpose(-1, -2)
    return gate_up, down


def block_width(adapter, block) -> int:
    """The intermediate width of a block's routed experts."""
    return int(linear_matrices(adapter, adapter.experts_of(block))[1].shape[-1])


def gate_up_rows(adapter, neurons: torch.Tensor, width: int) -> torch.Tensor:
    """The gate/up rows [..., 2k] of neurons [..., k] (sorted), in the layout the experts store them."""
    if adapter.gate_up_layout == "interleaved":
        return torch.stack([2 * neurons, 2 * neurons + 1], dim=-1).flatten(-2)
    return torch.cat([neurons, neurons + width], dim=-1)


@torch.no_grad()
def neuron_importance(adapter, block, hidden: torch.Tensor) -> torch.Tensor:
    """[E, I]: routing-weighted mean |activation| x down-projection column norm (see the module doc)."""
    experts = adapter.experts_of(block)
    gate_up, down = linear_matrices(adapter, experts)
    _, weights, indices = adapter.call_router(block, hidden)
    weights, indices = weights.reshape(len(hidden), -1), indices.reshape(len(hidden), -1)
    num_experts, width = down.shape[0], down.shape[-1]
    activation = torch.zeros(num_experts, width, dtype=torch.float64, device=hidden.device)
    for expert in range(num_experts):  # one batched product per expert over its routed tokens
        tokens, slots = torch.where(indices == expert)
        if len(tokens) == 0:
            continue
        gated = expert_activation(adapter, block, hidden[tokens], expert).double().abs()
        activation[expert] = (weights[tokens, slots].double()[:, None] * gated).sum(dim=0)
    # an expert no calibration token reaches has no activations to go by: its weights' own sizes instead
    # (what each neuron's gate/up rows read times what its down column writes)
    unrouted = activation.sum(dim=1) == 0
    rows = gate_up.double().norm(dim=-1)  # [E, 2I]
    if adapter.gate_up_layout == "interleaved":
        by_weights = rows[:, 0::2] * rows[:, 1::2]
    else:
        by_weights = rows[:, :width] * rows[:, width:]
    activation[unrouted] = by_weights[unrouted]
    return activation / len(hidden) * down.double().norm(dim=1)


def cut_block_width(adapter, block, neurons: torch.Tensor) -> None:
    """Keep neurons [E, k] (sorted per expert) of every routed expert of ``block``."""
    experts = adapter.experts_of(block)
    transposed = getattr(experts, "is_transposed", False)
    gate_up_name, down_name = adapter.expert_matrices
    gate_up, down = linear_matrices(adapter, experts)
    width = down.shape[-1]
    rows = gate_up_rows(adapter, neurons, width).to(gate_up.device)  # [E, 2k]
    new_gate_up = gate_up.gather(1, rows[:, :, None].expand(-1, -1, gate_up.shape[-1]))
    new_down = down.gather(2, neurons.to(down.device)[:, None, :].expand(-1, down.shape[1], -1))
    if transposed:
        new_gate_up, new_down = new_gate_up.transpose(-1, -2), new_down.transpose(-1, -2)
    replace_tensor(experts, gate_up_name, new_gate_up.contiguous())
    replace_tensor(experts, down_name, new_down.contiguous())
    bias = getattr(experts, f"{gate_up_name}_bias", None)
    if isinstance(bias, torch.Tensor):
        replace_tensor(experts, f"{gate_up_name}_bias", bias.data.gather(1, rows.to(bias.device)).contiguous())
    for attr, value in list(vars(experts).items()):  # the width the module noted when it was built
        if "intermediate" in attr and value == width:
            setattr(experts, attr, neurons.shape[1])


def width_field_is_private(model) -> bool:
    """Whether the config's expert-width field sizes only the routed experts' matrices (so a uniform cut can
    rewrite it and stay stock): a skeleton with the field changed differs in nothing else."""
    return width_field_is_private_in(model.config)


def width_field_is_private_in(config) -> bool:
    """``width_field_is_private`` from the config alone (two weightless skeletons)."""
    adapter = adapter_for(config)
    field = adapter.config_expert_width
    value = getattr(config, field)  # one width, or one per decoder layer
    wider = [width + 1 for width in value] if adapter.is_per_layer(config, field) else int(value) + 1
    changed = type(config).from_dict({**config.to_dict(), field: wider})
    before, after = skeleton(config).state_dict(), skeleton(changed).state_dict()
    expert_paths = {f"{adapter.moe_block}.{adapter.experts}.{name}" for name in adapter.expert_tensors}
    for name, tensor in before.items():
        if tensor.shape != after[name].shape and not any(name.endswith(path) for path in expert_paths):
            return False
    return True


@torch.no_grad()
def routed_experts(adapter, block, hidden: torch.Tensor) -> torch.Tensor:
    """[E] bool: the experts the router sends at least one of ``hidden``'s tokens to."""
    _, _, indices = adapter.call_router(block, hidden)
    num_experts = adapter.block_num_experts(block)
    counts = torch.bincount(indices.flatten()[indices.flatten() < num_experts], minlength=num_experts)
    return (counts > 0).cpu()


def _global_widths(importance: dict[int, torch.Tensor], total: int,
                   routed: dict[int, torch.Tensor], floors: dict[int, int] | None = None) -> dict[int, int]:
    """Per-layer widths summing to ``total`` (both in multiples of ALIGNMENT): the best blocks of ALIGNMENT
    neuron slots over all layers, a slot worth the layer's summed importance of its routed experts' r-th best
    neurons (``routed``: [E] bool per layer; an unrouted expert's weight-based scores are not comparable),
    at least one block per layer, and at least ``floors[layer]`` neurons (a multiple of ALIGNMENT) where given."""
    layers = sorted(importance)
    floors = floors or {}
    block_scores = []
    for layer in layers:
        slots = importance[layer][routed[layer]].sort(dim=1, descending=True).values.sum(dim=0)
        block_scores.append(slots[:len(slots) // ALIGNMENT * ALIGNMENT].reshape(-1, ALIGNMENT).sum(dim=1))
    widths = {layer: max(ALIGNMENT, floors.get(layer, 0)) for layer in layers}
    first = [widths[layer] // ALIGNMENT for layer in layers]  # blocks each layer keeps before the ranking
    rest = torch.cat([scores[skip:] for scores, skip in zip(block_scores, first)])
    owner = torch.cat([torch.full((len(scores) - skip,), position)
                       for position, (scores, skip) in enumerate(zip(block_scores, first))])
    chosen = torch.argsort(rest, descending=True, stable=True)[:max(0, total // ALIGNMENT - sum(first))]
    for position in owner[chosen].tolist():
        widths[layers[position]] += ALIGNMENT
    return widths


def prune_expert_width(model, step: dict, context) -> dict:
    adapter = adapter_for(model.config)
    context.require_inputs("prune_expert_width")
    blocks = dict(context.moe_blocks(model))
    for layer, block in blocks.items():
        if stored_form_of(adapter.experts_of(block)) is not None:
            raise ModelError(f"prune_expert_width: layer {layer} holds experts "
                             f"{stored_form_of(adapter.experts_of(block)).what}; put the width cut first")
    widths_before = {layer: block_width(adapter, block) for layer, block in blocks.items()}
    importance, routed = {}, {}
    for layer, block in context.each_block(model):
        fit_inputs = context.split_inputs(layer)[0]
        importance[layer] = neuron_importance(adapter, block, fit_inputs).cpu()
        routed[layer] = routed_experts(adapter, block, fit_inputs)
    for layer, width in widths_before.items():
        problem = alignment_problem(step, width, "neurons per expert")
        if problem:
            raise ModelError(f"prune_expert_width.{problem.option}, MoE layer {layer}: {problem.message}")
    protected, protection = protected_neurons(step, context, widths_before)
    # each expert keeps its protected neurons first: a layer is at least as wide as its most protected expert
    floors = {layer: -(-int(mask.sum(dim=1).max()) // ALIGNMENT) * ALIGNMENT for layer, mask in protected.items()}
    if step["allocation"] == "uniform":
        targets = {layer: aligned_count(step, width) for layer, width in widths_before.items()}
        narrow = {layer: floor for layer, floor in floors.items() if targets[layer] < floor}
        if narrow:
            layer, floor = next(iter(narrow.items()))
            raise ModelError(f"prune_expert_width: MoE layer {layer} keeps {targets[layer]} neurons per expert, but "
                             f"one of its experts has more protected neurons; keep at least {floor}")
    else:
        total = sum(aligned_count(step, width) for width in widths_before.values())
        targets = _global_widths(importance, total, routed, floors)
    report = {"layers": {}}
    if protection is not None:
        report["protected_neurons"] = protection
    for layer, block in context.each_block(model):
        keep = targets[layer]
        if keep > widths_before[layer]:
            raise ModelError(f"prune_expert_width: keeps {keep} neurons; the experts of layer {layer} have "
                             f"{widths_before[layer]}")
        ranked = importance[layer]
        if layer in protected:  # each expert's protected neurons first, whatever their importance
            ranked = ranked.masked_fill(protected[layer], float("inf"))
        neurons = torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :keep].sort(dim=1).values
        if keep < widths_before[layer]:
            cut_block_width(adapter, block, neurons)
        kept_share = importance[layer].gather(1, neurons).sum() / importance[layer].sum().clamp_min(1e-300)
        report["layers"][str(layer)] = {"width": {"from": widths_before[layer], "to": keep},
                                        "importance_kept": round(float(kept_share), 6)}
    widths = set(targets.values())
    stock = len(widths) == 1 and context.layers is None and width_field_is_private(model)
    if stock:  # in the field's own form: a per-layer list stays a list
        adapter.write_layer_values(model.config, adapter.config_expert_width, targets)
    report["config_field"] = adapter.config_expert_width if stock else None
    log.info("expert widths: %s", targets)
    return report


def _inspect(adapter) -> str:
    return (f"cut neurons of {expert_matrices(adapter)} ({adapter.gate_up_layout} gate/up rows); stock where "
            f"`{adapter.config_expert_width}` sizes only the routed experts and every layer keeps as many, else "
            "remote code")


METHODS = (
    Method("prune_expert_width", prune_expert_width, frozenset({EXPERT_WIDTH}),
           check_options=lambda step: exactly_one_of(step, "keep", "fraction"), check_shape=_check_shape,
           whole_model=lambda step: "prune_expert_width rewrites the config's expert width", inspect=_inspect),
)
