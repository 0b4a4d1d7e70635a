"""The adapter table: everything that differs between MoE architectures, one entry per ``model_type``.

No other module names a model type. Methods ask an adapter where the decoder layers, MoE blocks,
routers and fused expert tensors are, and which config fields hold the expert count and top-k.

In transformers 5.x the routed experts of a block are one module with fused tensors whose first
dimension is the expert index (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), and the router
returns ``(logits, top-k weights, top-k indices)``. Pruning an expert is therefore an index-select on
dimension 0 of every per-expert tensor, plus the same select on the router's per-expert rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_compress.errors import ModelError


@dataclass(frozen=True)
class MoEArchitecture:
    model_type: str
    layers: str = "model.layers"  # dotted path from the CausalLM to the decoder layer list
    moe_block: str = "mlp"  # attribute of a decoder layer holding the MoE block
    router: str = "gate"  # attribute of the MoE block: returns (logits, top-k weights, top-k indices)
    experts: str = "experts"  # attribute of the MoE block: the fused routed experts
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")  # dim 0 = expert
    router_tensors: tuple[str, ...] = ("weight",)  # dim 0 = expert
    # attributes (on the experts module and on the router) that cache the expert count / top-k
    expert_count_attrs: tuple[str, ...] = ("num_experts",)
    top_k_attrs: tuple[str, ...] = ("top_k",)
    config_num_experts: str = "num_experts"
    config_top_k: str = "num_experts_per_tok"
    # modules of the MoE block that are never pruned or merged (shared experts)
    shared_modules: tuple[str, ...] = field(default_factory=tuple)

    # --- navigation -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get_path(model, self.layers)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        block = getattr(layer, self.moe_block, None)
        return block is not None and hasattr(block, self.experts) and hasattr(block, self.router)

    def moe_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        """MoE blocks by decoder-layer index; dense layers are skipped."""
        return {
            index: getattr(layer, self.moe_block)
            for index, layer in enumerate(self.decoder_layers(model))
            if self.is_moe_layer(layer)
        }

    def router_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router)

    def experts_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.config_num_experts))

    def top_k(self, config) -> int:
        return int(getattr(config, self.config_top_k))

    def block_num_experts(self, block: nn.Module) -> int:
        return int(getattr(self.experts_of(block), self.expert_tensors[0]).shape[0])

    # --- structural edits ---------------------------------------------------------------------
    def select_experts(self, block: nn.Module, keep: torch.Tensor) -> None:
        """Keep only experts ``keep`` (sorted indices) in ``block``: experts and router rows together."""
        experts, router = self.experts_of(block), self.router_of(block)
        for module, names in ((experts, self.expert_tensors), (router, self.router_tensors)):
            for name in names:
                tensor = getattr(module, name)
                setattr(module, name, nn.Parameter(tensor.data.index_select(0, keep).clone(), requires_grad=False))
        self._set_count(block, len(keep))

    def resize_empty(self, block: nn.Module, num_experts: int) -> None:
        """Reallocate the block for ``num_experts`` experts (uninitialised): used before loading weights."""
        experts, router = self.experts_of(block), self.router_of(block)
        for module, names in ((experts, self.expert_tensors), (router, self.router_tensors)):
            for name in names:
                tensor = getattr(module, name)
                shape = (num_experts, *tensor.shape[1:])
                setattr(module, name, nn.Parameter(torch.empty(shape, dtype=tensor.dtype, device=tensor.device)))
        self._set_count(block, num_experts)

    def _set_count(self, block: nn.Module, num_experts: int) -> None:
        for module in (self.experts_of(block), self.router_of(block)):
            for attr in self.expert_count_attrs:
                if hasattr(module, attr):
                    setattr(module, attr, num_experts)

    def layout(self) -> dict:
        """The fields the checkpoint's remote-code loader needs (written into config.json)."""
        return {
            "layers": self.layers,
            "moe_block": self.moe_block,
            "router": self.router,
            "experts": self.experts,
            "expert_tensors": list(self.expert_tensors),
            "router_tensors": list(self.router_tensors),
            "expert_count_attrs": list(self.expert_count_attrs),
        }


def _get_path(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


ARCHITECTURES: dict[str, MoEArchitecture] = {
    arch.model_type: arch
    for arch in (
        MoEArchitecture(model_type="qwen3_moe"),
    )
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def adapter_for(config_or_type) -> MoEArchitecture:
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported types: {', '.join(supported_model_types())}"
        ) from None
