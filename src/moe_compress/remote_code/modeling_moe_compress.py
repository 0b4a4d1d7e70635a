"""Written by moe-compress into a checkpoint that the stock config cannot express: MoE layers that differ
from each other (expert count, expert width, routing settings such as top-k), routers that skip low-weight experts,
or experts in a stored form of moe_compress_layers.STORED_FORMS (low-rank factors, dictionary codes, constants).

This class builds the stock model, then reallocates each listed MoE block for its own expert count,
sets its router's per-layer settings (and dynamic skipping), and gives the layers whose experts are in a stored
form their tensors, before the weights are loaded. It is self-contained on purpose: loading the checkpoint needs
only transformers (and moe_compress_layers.py beside this file), not moe-compress.
Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

import torch
from __BASE_MODULE__ import __BASE_CLASS__ as _StockForCausalLM
from torch import nn

from .moe_compress_layers import STORED_FORMS, convert_to_dynamic_skip


def _get_path(root, dotted):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _reallocate(block, path, expert_dim, num_experts):
    """Give the per-expert tensor at ``path`` (below the MoE block) room for ``num_experts`` experts."""
    owner_path, _, name = path.rpartition(".")
    module = _get_path(block, owner_path) if owner_path else block
    old = getattr(module, name)
    shape = list(old.shape)
    shape[expert_dim] = num_experts
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if name in module._buffers:
        module._buffers[name] = new
    else:
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _resize_width(experts, matrix_names, width):
    """Give the experts' gate/up and down projections (and the gate/up bias) room for ``width`` neurons."""
    transposed = getattr(experts, "is_transposed", False)
    gate_up, down = matrix_names
    # (tensor, dimension holding the neurons, elements per neuron), in the stock storage orientation
    for name, dim, per_neuron in ((gate_up, 2 if transposed else 1, 2), (down, 1 if transposed else 2, 1),
                                  (f"{gate_up}_bias", 1, 2)):
        old = getattr(experts, name, None)
        if not isinstance(old, torch.Tensor):
            continue
        shape = list(old.shape)
        shape[dim] = per_neuron * width
        setattr(experts, name, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                            requires_grad=old.requires_grad))


class MoeCompressForCausalLM(_StockForCausalLM):
    @classmethod
    def _can_set_experts_implementation(cls):
        # transformers reads this module's source to decide whether the experts may use its fused
        # kernels (grouped_mm); the experts are the stock ones, so the stock class's answer holds
        return _StockForCausalLM._can_set_experts_implementation()

    def __init__(self, config):
        super().__init__(config)
        layout = config.moe_compress_layout
        layers = _get_path(self, layout["layers"])
        # widths first: the expert-count and low-rank shapes below start from the resized tensors
        for layer_index, width in getattr(config, "moe_compress_expert_width", {}).items():
            block = getattr(layers[int(layer_index)], layout["moe_block"])
            _resize_width(getattr(block, layout["experts"]), layout["expert_matrices"], width)
        for layer_index, num_experts in getattr(config, "moe_compress_experts_per_layer", {}).items():
            block = getattr(layers[int(layer_index)], layout["moe_block"])
            for path, expert_dim in layout["per_expert_tensors"]:
                _reallocate(block, path, expert_dim, num_experts)
            for module_name in (layout["experts"], layout["router"]):
                module = getattr(block, module_name)
                for attr in layout["expert_count_attrs"]:
                    if hasattr(module, attr):
                        setattr(module, attr, num_experts)
            router = getattr(block, layout["router"])
            for attr, value in config.moe_compress_router_settings.get(layer_index, {}).items():
                setattr(router, attr, value)
        # the experts' stored forms (low-rank factors, dictionary codes, novice constants, ...), each from its
        # own config field, before dynamic skipping, which leaves experts in a stored form as they are
        for form in STORED_FORMS:
            for layer_index, specs in getattr(config, form.config_field, {}).items():
                experts = getattr(getattr(layers[int(layer_index)], layout["moe_block"]), layout["experts"])
                form.rebuild(experts, specs, layout)
        for layer_index, skip in getattr(config, "moe_compress_dynamic_skip", {}).items():
            block = getattr(layers[int(layer_index)], layout["moe_block"])
            convert_to_dynamic_skip(getattr(block, layout["router"]), getattr(block, layout["experts"]),
                                    skip["beta"], skip["renormalize"])
