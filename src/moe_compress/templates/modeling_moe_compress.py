"""Written by moe-compress into a checkpoint whose MoE layers keep different numbers of experts.

The stock architecture allocates the same expert count in every layer; this class builds the stock
model, then reallocates each listed MoE block for its own count (from ``config.moe_compress_experts_per_layer``)
before the weights are loaded. It is self-contained on purpose: loading the checkpoint needs only
transformers, not moe-compress. Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

import torch
from torch import nn
from __BASE_MODULE__ import __BASE_CLASS__ as _StockForCausalLM


def _get_path(root, dotted):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


class MoeCompressForCausalLM(_StockForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        layout = config.moe_compress_layout
        layers = _get_path(self, layout["layers"])
        for layer_index, num_experts in config.moe_compress_experts_per_layer.items():
            block = getattr(layers[int(layer_index)], layout["moe_block"])
            for module_name, tensor_names in (
                (layout["experts"], layout["expert_tensors"]),
                (layout["router"], layout["router_tensors"]),
            ):
                module = getattr(block, module_name)
                for name in tensor_names:
                    old = getattr(module, name)
                    shape = (num_experts, *old.shape[1:])
                    setattr(module, name, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device)))
                for attr in layout["expert_count_attrs"]:
                    if hasattr(module, attr):
                        setattr(module, attr, num_experts)
