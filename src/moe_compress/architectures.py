"""The adapter table: everything that differs between MoE architectures, one entry per ``model_type``.

No other module names a model type. Methods ask an adapter where the decoder layers, MoE blocks,
routers and fused expert tensors are, and which config fields hold the expert count and top-k.

In transformers 5.x the routed experts of a block are one module with fused tensors whose first
dimension is the expert index (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), and the router
returns ``(logits, top-k weights, top-k indices)``. Pruning an expert is therefore an index-select on
dimension 0 of every per-expert tensor, plus the same select on the router's per-expert rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_compress.errors import ModelError
from moe_compress.remote_code.moe_compress_layers import is_low_rank, is_skip_router


@dataclass(frozen=True)
class MoEArchitecture:
    model_type: str
    layers: str = "model.layers"  # dotted path from the CausalLM to the decoder layer list
    moe_block: str = "mlp"  # attribute of a decoder layer holding the MoE block
    router: str = "gate"  # attribute of the MoE block: returns (logits, top-k weights, top-k indices)
    experts: str = "experts"  # attribute of the MoE block: the fused routed experts
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")  # dim 0 = expert
    # the expert weight matrices, (input projection feeding the gate, output projection), as named in
    # every architecture; biases, where present, are f"{name}_bias"
    expert_matrices: tuple[str, str] = ("gate_up_proj", "down_proj")
    router_tensors: tuple[str, ...] = ("weight",)  # dim 0 = expert
    # attributes (on the experts module and on the router) that cache the expert count / top-k
    expert_count_attrs: tuple[str, ...] = ("num_experts",)
    top_k_attrs: tuple[str, ...] = ("top_k",)
    config_num_experts: str = "num_experts"
    config_top_k: str = "num_experts_per_tok"
    # router attribute -> config field, for routing settings a method may change per layer; a value
    # shared by all layers is written to config.json, per-layer values go through the remote-code loader
    router_config_fields: tuple[tuple[str, str], ...] = (("top_k", "num_experts_per_tok"),)
    # how the router turns logits into the top-k weights (documentation, and for methods that re-route):
    # "softmax_topk": softmax over all experts, top-k, renormalised if `renormalize` says so;
    # "topk_softmax": top-k logits, then softmax over those k (always sums to 1);
    # "sigmoid_grouped": sigmoid scores + correction bias for choice, group-limited, scaled.
    scoring: str = "softmax_topk"
    renormalize: str | bool = "norm_topk_prob"  # a config field name, or a constant
    # attributes of the MoE block that are never pruned or merged (shared experts and their gates)
    shared_modules: tuple[str, ...] = ()
    # router attributes holding expert groups (DeepSeek-V3: group-limited routing)
    group_attrs: tuple[str, str] | None = None  # (number of groups, groups kept per token)
    # sigmoid_grouped: the router buffer added to the scores to choose experts (not to weigh them)
    choice_bias: str | None = None

    # --- navigation -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_decoder_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(model.get_submodule(parent), name, layers)

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
        experts = self.experts_of(block)
        if is_low_rank(experts):  # shared factors have no expert dimension; the stock count is kept
            return int(experts.num_experts)
        return int(getattr(experts, self.expert_tensors[0]).shape[0])

    # --- structural edits ---------------------------------------------------------------------

    def select_experts(self, block: nn.Module, keep: torch.Tensor) -> dict:
        """Keep only experts ``keep`` (sorted indices) in ``block``: experts and router rows together.

        Returns what else had to change (e.g. expert groups that could not be preserved)."""
        experts, router = self.experts_of(block), self.router_of(block)
        return self.install_expert_tensors(block, {
            (owner, name): _select_rows(getattr(module, name).data, keep)
            for owner, module, names in (("experts", experts, self.expert_tensors), ("router", router, self.router_tensors))
            for name in names}, members=[[int(slot)] for slot in keep])

    def _adapt_groups(self, router: nn.Module, members: list[list[int]], old_count: int) -> dict:
        """Group-limited routing assigns contiguous expert ranges to groups (group = slot // group size).
        The groups survive a change of the experts exactly when every new expert stands for experts of
        one group, the new experts keep the group order, and every group keeps the same number of them
        (at least 2: groups are scored by their top-2); otherwise routing falls back to one group (plain
        top-k over all experts), the only grouping that is defined for any expert count."""
        if self.group_attrs is None:
            return {}
        groups_attr, kept_groups_attr = self.group_attrs
        num_groups = getattr(router, groups_attr)
        if num_groups == 1:
            return {}
        group_size = old_count // num_groups
        groups = [sorted({slot // group_size for slot in member}) for member in members]
        per_group = [sum(group == [g] for group in groups) for g in range(num_groups)]
        single = [group[0] for group in groups if len(group) == 1]
        if (len(single) == len(groups) and single == sorted(single) and len(set(per_group)) == 1
                and per_group[0] >= 2):
            return {}
        setattr(router, groups_attr, 1)
        setattr(router, kept_groups_attr, 1)
        spanning = sum(len(group) > 1 for group in groups)
        return {"expert_groups": f"{num_groups} groups could not be kept (experts per group: {per_group}"
                                 + (f", {spanning} spanning groups" if spanning else "")
                                 + "); routing is plain top-k over all experts"}

    def rank_order(self, router: nn.Module, logits: torch.Tensor, weights: torch.Tensor,
                   indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights, indices) [tokens, k] with the router's first choice first. Kernels may return
        the top-k in any order (DeepSeek-V3's topk(sorted=False)); the rank is the router's own choice
        score: the routing weight, or for sigmoid_grouped the sigmoid score plus the correction bias,
        which chooses the experts but does not weigh them. Skipped slots (index = expert count) go last."""
        num_experts = logits.shape[-1]
        if self.choice_bias is not None:
            choice = logits.float().sigmoid() + getattr(router, self.choice_bias).float()
            score = choice.gather(1, indices.clamp(max=num_experts - 1))
        else:
            score = weights.float()
        score = score.masked_fill(indices >= num_experts, float("-inf"))
        order = torch.argsort(score, dim=-1, descending=True, stable=True)
        return weights.gather(1, order), indices.gather(1, order)

    def reap_renormalizes(self, config) -> bool:
        """Whether REAP's saliency renormalises the softmax weights over the top-k: REAP's code does so
        where the config has a true ``norm_topk_prob`` (not for Mixtral, whose router does renormalise)."""
        return bool(getattr(config, "norm_topk_prob", False))

    def routing_fields(self) -> tuple[tuple[str, str], ...]:
        """(router attribute, config field) of every per-layer routing setting a method may change:
        the router_config_fields, plus the renormalisation switch where the architecture has one."""
        if isinstance(self.renormalize, str):
            return (*self.router_config_fields, (self.renormalize, self.renormalize))
        return self.router_config_fields

    def router_settings(self, block: nn.Module) -> dict[str, int]:
        router = self.router_of(block)
        return {attr: getattr(router, attr) for attr, _ in self.routing_fields()}

    def set_router_settings(self, block: nn.Module, settings: dict[str, int]) -> None:
        router = self.router_of(block)
        for attr, value in settings.items():
            setattr(router, attr, value)

    def block_dynamic_skip(self, block: nn.Module) -> dict | None:
        router = self.router_of(block)
        return {"beta": router.skip_beta, "renormalize": router.skip_renormalize} if is_skip_router(router) else None

    def scale_expert_outputs(self, block: nn.Module, scale: torch.Tensor) -> None:
        """Multiply every routed expert's output by ``scale`` (a scalar or one value per hidden channel),
        folded into the output projection (its rows, its low-rank left factor, and its bias)."""
        experts = self.experts_of(block)
        name = self.expert_matrices[1]
        scale = scale.reshape(-1)
        with torch.no_grad():
            if is_low_rank(experts):  # left factor [E or 1, out, r]: scale its output rows
                left = getattr(experts, f"lowrank_{name}_left")
                left.mul_(scale.to(left.dtype)[None, :, None])
            elif getattr(experts, "is_transposed", False):  # stored [E, in, out]
                weight = getattr(experts, name)
                weight.mul_(scale.to(weight.dtype)[None, None, :])
            else:  # stored [E, out, in]
                weight = getattr(experts, name)
                weight.mul_(scale.to(weight.dtype)[None, :, None])
            bias = getattr(experts, f"{name}_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.mul_(scale.to(bias.dtype)[None, :])

    def set_expert_count(self, block: nn.Module, num_experts: int) -> None:
        for module in (self.experts_of(block), self.router_of(block)):
            for attr in self.expert_count_attrs:
                if hasattr(module, attr):
                    setattr(module, attr, num_experts)

    def install_expert_tensors(self, block: nn.Module, tensors: dict[tuple[str, str], torch.Tensor],
                               members: list[list[int]] | None = None) -> dict:
        """Replace per-expert tensors, {("experts" | "router", name): value with dim 0 = expert}, and set
        the block's expert count to their new first dimension. The one place an expert count changes, so
        the routing settings that depend on it (expert groups) are adapted here.

        ``members``: for each new expert, the current experts it stands for (one each when pruning, a
        cluster when merging); None when the tensors put back the block's own experts. Returns what else
        had to change."""
        self._refuse_low_rank(block)
        old_count = self.block_num_experts(block)
        modules = {"experts": self.experts_of(block), "router": self.router_of(block)}
        for (owner, name), value in tensors.items():
            replace_tensor(modules[owner], name, value)
        new_count = len(next(iter(tensors.values())))
        if members is not None and len(members) != new_count:
            raise ModelError(f"{len(members)} expert groupings for {new_count} new experts")
        self.set_expert_count(block, new_count)
        return {} if members is None else self._adapt_groups(modules["router"], members, old_count)

    def block_low_rank_specs(self, block: nn.Module) -> dict | None:
        experts = self.experts_of(block)
        return experts.low_rank_specs if is_low_rank(experts) else None

    def _refuse_low_rank(self, block: nn.Module) -> None:
        if is_low_rank(self.experts_of(block)):
            raise ModelError("the experts of this layer are already low-rank factors; put expert pruning and "
                             "merging steps before svd_experts in the variant")

    def layout(self) -> dict:
        """The fields the checkpoint's remote-code loader needs (written into config.json)."""
        return {
            "layers": self.layers,
            "moe_block": self.moe_block,
            "router": self.router,
            "experts": self.experts,
            "expert_tensors": list(self.expert_tensors),
            "expert_matrices": list(self.expert_matrices),
            "router_tensors": list(self.router_tensors),
            "expert_count_attrs": list(self.expert_count_attrs),
            "router_attrs": [attr for attr, _ in self.routing_fields()],
        }


def replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a per-expert tensor, keeping its kind: parameters stay parameters, buffers stay buffers."""
    if name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, nn.Parameter(value, requires_grad=False))


def _select_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows ``keep`` of ``tensor`` (dim 0), the index moved to the tensor's device (index_select needs both on one)."""
    return tensor.index_select(0, keep.to(tensor.device)).clone()



ARCHITECTURES: dict[str, MoEArchitecture] = {
    arch.model_type: arch
    for arch in (
        # dense layers: mlp_only_layers / decoder_sparse_step (found by is_moe_layer, not by config)
        MoEArchitecture(model_type="qwen3_moe"),
        # Qwen1.5-MoE: a sigmoid-gated shared expert beside the routed ones. Trap: the config field is
        # `num_experts`; Qwen2MoeConfig(num_local_experts=...) is silently ignored.
        MoEArchitecture(model_type="qwen2_moe", shared_modules=("shared_expert", "shared_expert_gate")),
        MoEArchitecture(model_type="mixtral", config_num_experts="num_local_experts", renormalize=True),
        MoEArchitecture(model_type="olmoe"),
        # sigmoid scores, e_score_correction_bias (a buffer) for the choice only, group-limited routing,
        # routed_scaling_factor; first_k_dense_replace dense layers; shared experts
        MoEArchitecture(
            model_type="deepseek_v3",
            router_tensors=("weight", "e_score_correction_bias"),
            config_num_experts="n_routed_experts",
            router_config_fields=(("top_k", "num_experts_per_tok"), ("num_group", "n_group"),
                                  ("topk_group", "topk_group")),
            scoring="sigmoid_grouped",
            shared_modules=("shared_experts",),
            group_attrs=("num_group", "topk_group"),
            choice_bias="e_score_correction_bias",
        ),
        # router has a bias, top-k of logits then softmax; experts store gate_up_proj transposed
        # [E, H, 2I] with gate/up interleaved, plus per-expert biases. Dim 0 is still the expert.
        MoEArchitecture(
            model_type="gpt_oss",
            router="router",
            router_tensors=("weight", "bias"),
            expert_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
            config_num_experts="num_local_experts",
            scoring="topk_softmax",
            renormalize=True,
        ),
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
