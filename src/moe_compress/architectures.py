"""The adapter table: everything that differs between decoder architectures, one entry per ``model_type``:
the MoE decoders, and the dense decoders the decoder-wide steps (layer dropping, head pruning, hidden-size
reduction, dtype) and the evaluation apply to.

No other module names a model type. Methods ask an adapter where the decoder layers, MoE blocks,
routers and fused expert tensors are, and which config fields hold the expert count, top-k and expert
width (one value for all layers, or a list with one entry per decoder layer: ``top_k(config, layer)``).

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
from moe_compress.remote_code.moe_compress_layers import is_skip_router, stored_form_of


@dataclass(frozen=True)
class MoEArchitecture:
    model_type: str
    moe: bool = True  # False: a dense decoder (no routed experts); only decoder-wide steps apply
    layers: str = "model.layers"  # dotted path from the CausalLM to the decoder layer list
    moe_block: str = "mlp"  # attribute of a decoder layer holding the MoE block
    # attribute of a decoder layer whose input is the residual stream the MoE block's output is added to
    # (EASY-EP's h): the norm before the MoE block; the block itself where nothing normalises its input
    residual_input: str = "post_attention_layernorm"
    router: str = "gate"  # attribute of the MoE block: returns (logits, top-k weights, top-k indices)
    experts: str = "experts"  # attribute of the MoE block: the fused routed experts
    expert_tensors: tuple[str, ...] = ("gate_up_proj", "down_proj")  # dim 0 = expert
    # the expert weight matrices, (input projection feeding the gate, output projection), as named in
    # every architecture; biases, where present, are f"{name}_bias"
    expert_matrices: tuple[str, str] = ("gate_up_proj", "down_proj")
    # per-expert tensors of the router (dotted below it, e.g. "wg.weight" for a linear inside it) and of
    # the block itself (e.g. a choice bias the block passes to its router)
    router_tensors: tuple[str, ...] = ("weight",)
    block_tensors: tuple[str, ...] = ()
    # (path from the block, dim) for a per-expert tensor whose expert dimension is not dim 0
    expert_dims: tuple[tuple[str, int], ...] = ()
    # block attributes the block passes to its router after the hidden states (None where absent), and
    # whether the router wants them as [1, tokens, hidden]
    router_inputs: tuple[str, ...] = ()
    router_input_batched: bool = False
    # attributes (on the experts module and on the router) that cache the expert count / top-k
    expert_count_attrs: tuple[str, ...] = ("num_experts",)
    top_k_attrs: tuple[str, ...] = ("top_k",)
    config_num_experts: str = "num_experts"
    config_top_k: str = "num_experts_per_tok"
    # router attribute -> config field, for routing settings a method may change per layer; a value
    # shared by all layers is written to config.json, per-layer values go through the remote-code loader
    router_config_fields: tuple[tuple[str, str], ...] = (("top_k", "num_experts_per_tok"),)
    # how the router turns logits into the top-k weights (see SCORING_RULES); a (config field, {value:
    # rule}) pair where the config chooses
    scoring: str = "softmax_topk"
    scoring_by_config: tuple[str, tuple[tuple[str, str], ...]] | None = None
    renormalize: str | bool = "norm_topk_prob"  # a router attribute (and config field), or a constant
    scaling: str | None = None  # router attribute multiplying the top-k weights (routed scaling)
    fixed_top_k: int | None = None  # the router's top-k cannot change (phimoe's sparsemixer picks 2)
    # attributes of the MoE block that are never pruned or merged (shared experts and their gates)
    shared_modules: tuple[str, ...] = ()
    # router attributes holding expert groups (DeepSeek-V3: group-limited routing)
    group_attrs: tuple[str, str] | None = None  # (number of groups, groups kept per token)
    # how a group is scored: "top2_sum" of its choice scores (DeepSeek-V3) or its "max" (DeepSeek-V2)
    group_score: str = "top2_sum"
    # the tensor (path from the block) added to the scores to choose experts, not to weigh them
    choice_bias: str | None = None
    # config fields that describe decoder layers by index, rewritten when layers are dropped (a list with
    # one entry per layer is rewritten for any architecture): (field, kind), the field dotted into a dict
    # where nested; kinds: "dense_indices" (the dense layers' indices), "indices_1based" (layer numbers
    # from 1), "prefix" (the dense layers are the first n), "first_moe" / "last_moe" (the first / last MoE
    # layer's index), "sparse_step" (set to 1 once the dense layers are listed by index)
    layer_config_fields: tuple[tuple[str, str], ...] = ()
    # the config field holding the routed experts' intermediate width, and how gate_up_proj stacks the
    # gate and up rows of one neuron: "halves" ([gate; up]) or "interleaved" (gate, up, gate, up, ...)
    config_expert_width: str = "moe_intermediate_size"
    gate_up_layout: str = "halves"
    # config fields that state the routed experts' width, or the top-k, for other readers (the release's own
    # code, inference engines) beside the field the stock class reads; rewritten with it, so they agree
    config_width_mirrors: tuple[str, ...] = ()
    config_top_k_mirrors: tuple[str, ...] = ()
    # the config field holding the number of shared experts (None where the config states no count)
    config_shared_experts: str | None = None
    # for the generated table of docs/architectures.md
    examples: str = ""
    notes: str = ""

    # --- navigation -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_decoder_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(model.get_submodule(parent), name, layers)

    def is_moe_layer(self, layer: nn.Module) -> bool:
        if not self.moe:
            return False
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

    # --- config fields, per decoder layer ------------------------------------------------------
    # A field may hold one value for all layers or a list with one entry per decoder layer (Hunyuan-A13B's
    # moe_topk, moe_intermediate_size, num_shared_expert). Every reader asks for a layer's value here.

    @staticmethod
    def is_per_layer(config, field: str | None) -> bool:
        """Whether config ``field`` is a list with one entry per decoder layer."""
        return field is not None and isinstance(getattr(config, field, None), (list, tuple))

    def layer_value(self, config, field: str, layer: int | None = None):
        """Config ``field`` for decoder layer ``layer``: its entry where the field is per layer, else the value.
        ``layer`` None: the value every layer shares (a per-layer field whose entries differ is refused)."""
        value = getattr(config, field)
        if not isinstance(value, (list, tuple)):
            return value
        if layer is not None:
            return value[layer]
        if len(set(value)) > 1:
            raise ModelError(f"{config.model_type}: config field {field!r} differs between layers ({list(value)}); "
                             "its value is asked for per layer")
        return value[0]

    def num_experts(self, config, layer: int | None = None) -> int:
        return int(self.layer_value(config, self.config_num_experts, layer)) if self.moe else 0

    def top_k(self, config, layer: int | None = None) -> int:
        return int(self.layer_value(config, self.config_top_k, layer)) if self.moe else 0

    def expert_width(self, config, layer: int | None = None) -> int | None:
        return int(self.layer_value(config, self.config_expert_width, layer)) if self.moe else None

    def shared_experts(self, config, layer: int | None = None) -> int | None:
        """Shared experts beside the routed ones, where the config states their number."""
        field = self.config_shared_experts
        if not self.moe or field is None or getattr(config, field, None) is None:
            return None
        return int(self.layer_value(config, field, layer))

    def per_layer_values(self, config, field: str) -> list:
        """Config ``field``'s value for every decoder layer."""
        return [self.layer_value(config, field, layer) for layer in range(config.num_hidden_layers)]

    def top_k_per_layer(self, config) -> dict[int, int]:
        """{decoder layer: top-k} for every decoder layer (the config alone cannot tell which layers are MoE
        layers, so a dense layer's entry is included)."""
        return {layer: self.top_k(config, layer) for layer in range(config.num_hidden_layers)}

    def write_layer_values(self, config, field: str, values: dict[int, object]) -> None:
        """Set config ``field`` to ``values`` ({decoder layer: value}) in the field's own form: a per-layer list
        stays a list with one entry per decoder layer (layers not in ``values`` keep theirs); a single value
        becomes the value the layers share, or where they differ the largest (the per-layer values then go
        through the remote-code loader)."""
        if not values:
            return
        if self.is_per_layer(config, field):
            entries = list(getattr(config, field))
            for layer, value in values.items():
                entries[layer] = value
            setattr(config, field, entries)
        else:
            setattr(config, field, max(values.values()))

    def expresses_per_layer(self, config, field: str, values: dict[int, object]) -> bool:
        """Whether the stock config can state ``values`` ({decoder layer: value}) in ``field``: one value for all,
        or a field the stock class reads per layer (a list)."""
        return len(set(values.values())) <= 1 or self.is_per_layer(config, field)

    def scoring_for(self, config) -> str:
        if self.scoring_by_config is None:
            return self.scoring
        field, rules = self.scoring_by_config
        return dict(rules)[getattr(config, field)]

    def call_router(self, block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, top-k weights, top-k indices) of the block's router on ``hidden`` [tokens, hidden],
        called the way the block calls it."""
        extra = [_resolve(block, name, default=None) for name in self.router_inputs]
        return self.router_of(block)(hidden.unsqueeze(0) if self.router_input_batched else hidden, *extra)

    # --- the per-expert tensors, each seen with its expert dimension first --------------------------
    def per_expert_paths(self) -> list[tuple[str, str]]:
        """(owner, name) of every per-expert tensor: owner "experts", "router" or "block"."""
        return ([("experts", name) for name in self.expert_tensors] + [("router", name) for name in self.router_tensors]
                + [("block", name) for name in self.block_tensors])

    def block_path(self, owner: str, name: str) -> str:
        """The tensor's dotted path from the MoE block."""
        return {"experts": f"{self.experts}.{name}", "router": f"{self.router}.{name}", "block": name}[owner]

    def expert_dim(self, owner: str, name: str) -> int:
        return dict(self.expert_dims).get(self.block_path(owner, name), 0)

    def per_expert_tensors(self, block: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
        """{(owner, name): tensor data with the expert dimension first} for the block."""
        return {(owner, name): _resolve(block, self.block_path(owner, name)).data.movedim(
                    self.expert_dim(owner, name), 0)
                for owner, name in self.per_expert_paths()}

    def stored_layout(self, owner: str, name: str, expert_first: torch.Tensor) -> torch.Tensor:
        """An expert-first tensor in the layout the module stores it in."""
        return expert_first.movedim(0, self.expert_dim(owner, name))

    def block_expert_width(self, block: nn.Module) -> int | None:
        """The intermediate width of the block's routed experts (the down projection's input size)."""
        experts = self.experts_of(block)
        form = stored_form_of(experts)
        if form is not None:
            return form.intermediate_width(experts, self.expert_matrices)
        down = getattr(experts, self.expert_matrices[1], None)
        if not isinstance(down, torch.Tensor):
            return None
        return int(down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2])

    def block_num_experts(self, block: nn.Module) -> int:
        """The experts the block's router chooses from."""
        experts = self.experts_of(block)
        form = stored_form_of(experts)
        if form is not None:  # its tensors need not have one row per expert (a shared factor, kept experts only)
            return form.expert_count(experts)
        return int(getattr(experts, self.expert_tensors[0]).shape[0])

    # --- structural edits ---------------------------------------------------------------------

    def select_experts(self, block: nn.Module, keep: torch.Tensor) -> dict:
        """Keep only experts ``keep`` (sorted indices) in ``block``: experts, router rows and every other
        per-expert tensor together.

        Returns what else had to change (e.g. expert groups that could not be preserved)."""
        return self.install_expert_tensors(block, {
            key: _select_rows(tensor, keep) for key, tensor in self.per_expert_tensors(block).items()},
            members=[[int(slot)] for slot in keep])

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
        if num_groups is None or num_groups == 1:
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

    def rank_order(self, block: nn.Module, logits: torch.Tensor, weights: torch.Tensor,
                   indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights, indices) [tokens, k] with the router's first choice first. Kernels may return
        the top-k in any order (DeepSeek-V3's topk(sorted=False)); the rank is the router's own choice
        score: the routing weight, or where a correction bias chooses the experts (but does not weigh
        them) the score plus that bias. Skipped slots (index = expert count) go last."""
        num_experts = logits.shape[-1]
        bias = None if self.choice_bias is None else _resolve(block, self.choice_bias, default=None)
        if bias is not None:
            scores = logits.float().sigmoid() if self.scoring.startswith("sigmoid") else logits.float().softmax(-1)
            choice = scores + bias.float().reshape(-1)
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
        folded into the output projection (its rows, or what its stored form holds instead, and its bias)."""
        experts = self.experts_of(block)
        name = self.expert_matrices[1]
        scale = scale.reshape(-1)
        form = stored_form_of(experts)
        with torch.no_grad():
            if form is not None:
                form.scale_outputs(experts, self.expert_matrices, scale)
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
        self._refuse_stored_form(block)
        old_count = self.block_num_experts(block)
        for (owner, name), value in tensors.items():
            parent, _, leaf = self.block_path(owner, name).rpartition(".")
            replace_tensor(block.get_submodule(parent), leaf, self.stored_layout(owner, name, value))
        new_count = len(next(iter(tensors.values())))
        if members is not None and len(members) != new_count:
            raise ModelError(f"{len(members)} expert groupings for {new_count} new experts")
        self.set_expert_count(block, new_count)
        return {} if members is None else self._adapt_groups(self.router_of(block), members, old_count)

    def block_stored_form(self, block: nn.Module) -> dict | None:
        """{form name: its specs} where the block's experts are in a stored form (moe_compress_layers.STORED_FORMS),
        None where they are the stock dense tensors."""
        experts = self.experts_of(block)
        form = stored_form_of(experts)
        return None if form is None else {form.name: form.specs(experts)}

    def _refuse_stored_form(self, block: nn.Module) -> None:
        form = stored_form_of(self.experts_of(block))
        if form is not None:
            raise ModelError(f"the experts of this layer are already {form.what}; put expert pruning and merging steps "
                             f"before {form.made_by} in the variant")

    def layout(self) -> dict:
        """The fields the checkpoint's remote-code loader needs (written into config.json)."""
        return {
            "layers": self.layers,
            "moe_block": self.moe_block,
            "router": self.router,
            "experts": self.experts,
            # every per-expert tensor: [path from the block, expert dimension]
            "per_expert_tensors": [[self.block_path(owner, name), self.expert_dim(owner, name)]
                                   for owner, name in self.per_expert_paths()],
            "expert_matrices": list(self.expert_matrices),
            "expert_count_attrs": list(self.expert_count_attrs),
            "router_attrs": [attr for attr, _ in self.routing_fields()],
        }


_MISSING = object()


def _resolve(root: nn.Module, dotted: str, default=_MISSING):
    """The attribute at a dotted path below ``root`` (``default`` where a part is missing)."""
    value = root
    for part in dotted.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ModelError(f"{type(root).__name__} has no {dotted!r}")
            return default
    return value


def replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a per-expert tensor, keeping its kind: parameters stay parameters, buffers stay buffers."""
    if name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, nn.Parameter(value, requires_grad=False))


def _select_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows ``keep`` of ``tensor`` (dim 0), the index moved to the tensor's device (index_select needs both on one)."""
    return tensor.index_select(0, keep.to(tensor.device)).clone()



SCORING_RULES = {
    "softmax_topk": "softmax over all experts, top-k (renormalised where the router says so)",
    "topk_softmax": "top-k logits, softmax over those k",
    "sigmoid_topk": "sigmoid scores (+ a correction bias to choose), top-k, optionally within expert groups",
    "sparsemixer": "SparseMixer: two experts, each weighted by a masked softmax of its rank",
}

# the DeepSeek-V3 router pattern: sigmoid scores, e_score_correction_bias (a buffer) for the choice only,
# group-limited choice, renormalisation switch, routed_scaling_factor; shared experts beside the routed
_SIGMOID_GROUPED = dict(
    router_tensors=("weight", "e_score_correction_bias"),
    config_num_experts="n_routed_experts",
    router_config_fields=(("top_k", "num_experts_per_tok"), ("num_group", "n_group"), ("topk_group", "topk_group")),
    scoring="sigmoid_topk",
    scaling="routed_scaling_factor",
    shared_modules=("shared_experts",),
    group_attrs=("num_group", "topk_group"),
    choice_bias="gate.e_score_correction_bias",
    layer_config_fields=(("first_k_dense_replace", "prefix"),),
    config_shared_experts="n_shared_experts",
)
# Qwen's routed experts + one shared expert scaled by a sigmoid gate
_QWEN_DENSE = (("mlp_only_layers", "dense_indices"), ("decoder_sparse_step", "sparse_step"))
_QWEN_SHARED = dict(shared_modules=("shared_expert", "shared_expert_gate"), layer_config_fields=_QWEN_DENSE)
_DEEPSEEK_STEPS = "dense first layers (`first_k_dense_replace`), shared experts"

ARCHITECTURES: dict[str, MoEArchitecture] = {
    arch.model_type: arch
    for arch in (
        MoEArchitecture(model_type="qwen3_moe", layer_config_fields=_QWEN_DENSE, examples="Qwen3-30B-A3B, Qwen3-235B-A22B",
                        notes="dense layers by `mlp_only_layers` / `decoder_sparse_step`"),
        # Trap: the config field is `num_experts`; Qwen2MoeConfig(num_local_experts=...) is silently ignored
        MoEArchitecture(model_type="qwen2_moe", **_QWEN_SHARED, renormalize="norm_topk_prob",
                        examples="Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
                        notes="a shared expert with a sigmoid gate; no top-k renormalisation by default"),
        MoEArchitecture(model_type="qwen3_next", **_QWEN_SHARED, examples="Qwen3-Next-80B-A3B",
                        notes="hybrid: Gated DeltaNet (linear attention) layers beside attention; shared expert"),
        MoEArchitecture(model_type="qwen3_5_moe_text", **{**_QWEN_SHARED, "layer_config_fields": ()},
                        renormalize=True,
                        examples="Qwen3.5 MoE (text model)",
                        notes="hybrid Gated DeltaNet layers; shared expert; always renormalised"),
        MoEArchitecture(model_type="mixtral", config_expert_width="intermediate_size", config_num_experts="num_local_experts", renormalize=True,
                        examples="Mixtral-8x7B, Mixtral-8x22B", notes="softmax top-2, renormalised"),
        MoEArchitecture(model_type="olmoe", config_expert_width="intermediate_size", examples="OLMoE-1B-7B", notes="64 experts, top-8, no renormalisation"),
        # post-norm layers: post_attention_layernorm normalises the attention output, the MoE block reads the stream
        MoEArchitecture(model_type="flex_olmo", config_expert_width="intermediate_size", residual_input="mlp",
                        examples="FlexOlmo-7x7B",
                        notes="OLMoE routing over independently trained experts"),
        MoEArchitecture(model_type="deepseek_v3", **_SIGMOID_GROUPED, examples="DeepSeek-V3/R1, Moonlight",
                        notes=f"sigmoid + correction bias, expert groups, routed scaling, {_DEEPSEEK_STEPS}"),
        MoEArchitecture(model_type="deepseek_v32", **_SIGMOID_GROUPED, examples="DeepSeek-V3.2",
                        notes=f"DeepSeek-V3 routing with sparse-attention indexers; {_DEEPSEEK_STEPS}"),
        MoEArchitecture(model_type="kimi_linear", **{**_SIGMOID_GROUPED, "config_num_experts": "num_experts",
                                                     "config_top_k": "num_experts_per_token",
                                                     "config_shared_experts": "num_shared_experts",
                                                     "layer_config_fields": (
                                                         ("first_k_dense_replace", "prefix"),
                                                         ("linear_attn_config.kda_layers", "indices_1based"),
                                                         ("linear_attn_config.full_attn_layers", "indices_1based"))},
                        examples="Kimi-Linear-48B-A3B",
                        notes="hybrid: KDA linear-attention layers beside MLA; DeepSeek-V3 routing"),
        MoEArchitecture(model_type="glm4_moe", **_SIGMOID_GROUPED, examples="GLM-4.5, GLM-4.6, GLM-4.5-Air",
                        notes=f"DeepSeek-V3 routing; {_DEEPSEEK_STEPS}"),
        MoEArchitecture(model_type="glm4_moe_lite", **_SIGMOID_GROUPED, examples="GLM-4.7-Flash",
                        notes="DeepSeek-V3 routing with MLA attention; dense layers by `mlp_layer_types`"),
        MoEArchitecture(model_type="solar_open", **_SIGMOID_GROUPED, examples="Solar-Open-100B",
                        notes="DeepSeek-V3 routing; shared expert"),
        MoEArchitecture(model_type="exaone_moe", **{**_SIGMOID_GROUPED, "config_num_experts": "num_experts",
                                                    "config_shared_experts": "num_shared_experts"},
                        examples="K-EXAONE-236B-A23B",
                        notes="DeepSeek-V3 routing; sliding-window layers; dense layers by `mlp_layer_types`"),
        MoEArchitecture(model_type="dots1", **_SIGMOID_GROUPED, examples="dots.llm1",
                        notes=f"DeepSeek-V3 routing; {_DEEPSEEK_STEPS}"),
        # softmax scores, greedy or group-limited (group = its best expert) choice, scaled, never renormalised
        MoEArchitecture(model_type="deepseek_v2", config_num_experts="n_routed_experts", renormalize=False,
                        router_config_fields=(("top_k", "num_experts_per_tok"), ("num_group", "n_group"),
                                              ("topk_group", "topk_group")),
                        scaling="routed_scaling_factor", shared_modules=("shared_experts",),
                        group_attrs=("num_group", "topk_group"), group_score="max",
                        layer_config_fields=(("first_k_dense_replace", "prefix"),),
                        config_shared_experts="n_shared_experts",
                        examples="DeepSeek-V2, DeepSeek-V2-Lite, DeepSeek-Coder-V2",
                        notes=f"softmax, greedy or group-limited (`topk_method`), routed scaling; {_DEEPSEEK_STEPS}"),
        # sigmoid + a correction bias the block holds and passes to the router; always renormalised
        MoEArchitecture(model_type="minimax_m2", config_expert_width="intermediate_size", config_num_experts="num_local_experts", scoring="sigmoid_topk",
                        renormalize=True, block_tensors=("e_score_correction_bias",),
                        router_inputs=("e_score_correction_bias",), choice_bias="e_score_correction_bias",
                        examples="MiniMax-M2", notes="sigmoid + a correction bias held by the block"),
        MoEArchitecture(model_type="afmoe", router="router", router_tensors=("gate.weight",), scoring="sigmoid_topk",
                        renormalize=True, scaling="route_scale", block_tensors=("expert_bias",),
                        router_inputs=("expert_bias",), router_input_batched=True, choice_bias="expert_bias",
                        layer_config_fields=(("num_dense_layers", "prefix"),),
                        # its post_attention_layernorm normalises the attention output, pre_mlp_layernorm the stream
                        residual_input="pre_mlp_layernorm",
                        shared_modules=("shared_experts",), config_shared_experts="num_shared_experts",
                        examples="Trinity (Arcee AFMoE)",
                        notes="sigmoid + an expert bias held by the block; dense first layers; shared experts"),
        MoEArchitecture(model_type="lfm2_moe", moe_block="feed_forward", residual_input="ffn_norm", scoring="sigmoid_topk",
                        scaling="routed_scaling_factor", block_tensors=("expert_bias",),
                        router_inputs=("expert_bias",), choice_bias="expert_bias", examples="LFM2-8B-A1B",
                        layer_config_fields=(("num_dense_layers", "prefix"),),
                        notes="hybrid: short-convolution layers beside attention; sigmoid + expert bias; "
                              "dense first layers"),
        # softmax + a [1, E] correction bias in the router's moe_statics for the choice; renormalised
        MoEArchitecture(model_type="ernie4_5_moe", config_num_experts="moe_num_experts", config_top_k="moe_k",
                        router_tensors=("weight", "moe_statics.e_score_correction_bias"),
                        expert_dims=(("gate.moe_statics.e_score_correction_bias", 1),), renormalize=True,
                        choice_bias="gate.moe_statics.e_score_correction_bias", shared_modules=("shared_experts",),
                        config_shared_experts="moe_num_shared_experts",
                        layer_config_fields=(("moe_layer_start_index", "first_moe"),
                                             ("moe_layer_end_index", "last_moe")),
                        examples="ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B",
                        notes="softmax + correction bias for the choice; dense layers before `moe_layer_start_index`"),
        MoEArchitecture(model_type="phimoe", config_expert_width="intermediate_size", router="router", config_num_experts="num_local_experts",
                        scoring="sparsemixer", renormalize=False, fixed_top_k=2,
                        examples="Phi-3.5-MoE", notes="SparseMixer routing: always two experts"),
        MoEArchitecture(model_type="granitemoe", config_expert_width="intermediate_size", moe_block="block_sparse_moe", router="router",
                        config_num_experts="num_local_experts", scoring="topk_softmax", renormalize=True,
                        examples="Granite-3.0-1B-A400M, Granite-3.0-3B-A800M", notes="top-k logits, then softmax"),
        # the stock class sizes routed experts and the shared MLP by intermediate_size and reads moe_topk per
        # layer where it is a list; the release's moe_intermediate_size list states the experts' width too
        MoEArchitecture(model_type="hunyuan_v1_moe", config_expert_width="intermediate_size",
                        config_width_mirrors=("moe_intermediate_size",), router_tensors=("wg.weight",),
                        config_top_k="moe_topk", renormalize=True, shared_modules=("shared_mlp",),
                        config_shared_experts="num_shared_expert", examples="Hunyuan-A13B",
                        notes="router weight in a float32 linear `wg`; a shared MLP; top-k, expert width and shared "
                              "experts per layer (`moe_topk` lists)"),
        MoEArchitecture(model_type="cohere2_moe", config_expert_width="intermediate_size", scoring_by_config=("expert_selection_fn", (
                            ("softmax", "topk_softmax"), ("sigmoid", "sigmoid_topk"))),
                        shared_modules=("shared_experts",), config_shared_experts="num_shared_experts",
                        # attention and MoE run in parallel on the layer's input: its stream is the nearest to h
                        residual_input="input_layernorm",
                        examples="Command A MoE",
                        notes="`expert_selection_fn` picks softmax or sigmoid; shared experts summed or averaged"),
        # router has a bias, top-k of logits then softmax; experts store gate_up_proj transposed
        # [E, H, 2I] with gate/up interleaved, plus per-expert biases. Dim 0 is still the expert.
        MoEArchitecture(
            model_type="gpt_oss",
            config_expert_width="intermediate_size",
            gate_up_layout="interleaved",
            config_top_k_mirrors=("experts_per_token",),  # the release's own name for the top-k
            router="router",
            router_tensors=("weight", "bias"),
            expert_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
            config_num_experts="num_local_experts",
            scoring="topk_softmax",
            renormalize=True,
            examples="gpt-oss-20b, gpt-oss-120b",
            notes="router bias; experts stored transposed with interleaved gate/up and biases; attention sinks",
        ),
    )
}

# dense decoders: no routed experts. The steps for any decoder (drop_layers, prune_heads, reduce_hidden, dtype)
# and the evaluation apply; an MoE step is refused when the config is read.
DENSE_DECODERS: dict[str, str] = {
    "llama": "Llama 2/3, TinyLlama",
    "mistral": "Mistral-7B",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3 dense (0.6B-32B)",
    "exaone4": "EXAONE 4.0",
    "olmo2": "OLMo 2",
    "granite": "Granite 3.x dense",
    "phi3": "Phi-3, Phi-4 (fused q/k/v: prune_heads is refused)",
}
ARCHITECTURES.update({model_type: MoEArchitecture(model_type=model_type, moe=False, examples=examples,
                                                  notes="dense decoder: decoder-wide steps only")
                      for model_type, examples in DENSE_DECODERS.items()})

# model types with routed experts that the table cannot describe, and why (one line each)
REFUSED: dict[str, str] = {
    "llama4_text": "its experts run densely on inputs already scaled by the routing score (no (hidden, indices, "
                   "weights) call) and its router returns (scores, logits); the experts are stored [E, H, 2I]",
    "llama4": "a vision-language wrapper; its text model (llama4_text) is refused too: experts run densely on "
              "score-scaled inputs",
    "longcat_flash": "'zero' experts (indices >= E pass the input through) share the router rows with the routed "
                     "experts, and each decoder layer holds two attention and two dense MLP blocks",
    "deepseek_v4": "its first layers are hash-routed from input_ids (a token's experts are fixed by its id, so the "
                   "block cannot be replayed from cached hidden states), and layers mix through hyper-connections",
    "gemma4_text": "router and experts sit on the decoder layer beside a dense MLP, with their own norms and "
                   "per-expert scales; there is no MoE block module to call on cached inputs",
    "qwen3_5_moe": "a vision-language checkpoint; its text model (qwen3_5_moe_text) is supported: save "
                   "model.language_model with its text config as a text checkpoint first",
    "gemma4": "a multimodal wrapper; its text model (gemma4_text) keeps router and experts on the decoder layer",
    "dbrx": "experts are separate w1/v1/w2 tensors flattened to [E*I, H] (no expert dimension) and the router "
            "returns logits only",
    "jetmoe": "experts are input_linear/output_linear with a separate top-k gate, plus mixture-of-attention "
              "experts in every attention layer",
    "mistral4": "transformers registers Mistral4Config for no causal-LM auto class (it loads inside Mistral 3's "
                "multimodal model), so a checkpoint cannot be loaded as a text model",
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def adapter_for(config_or_type) -> MoEArchitecture:
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    if model_type in REFUSED:
        raise ModelError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    try:
        adapter = ARCHITECTURES[model_type]
    except KeyError:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported types: {', '.join(supported_model_types())}"
        ) from None
    if not isinstance(config_or_type, str):
        check_config(adapter, config_or_type)
    return adapter


def check_config(adapter: MoEArchitecture, config) -> None:
    """Refuse, in one line naming the field, a config the adapter cannot describe. Top-k, expert widths and
    shared-expert counts may be per layer (a list with one entry per decoder layer); the expert count may not
    (the stock classes build one expert count for all layers)."""
    if not adapter.moe:
        return
    for field in (adapter.config_num_experts, adapter.config_top_k):
        if getattr(config, field, None) is None:
            raise ModelError(f"{config.model_type}: config field {field!r} is missing")
    if adapter.is_per_layer(config, adapter.config_num_experts):
        raise ModelError(f"{config.model_type}: config field {adapter.config_num_experts!r} is per layer "
                         f"({list(getattr(config, adapter.config_num_experts))}); one expert count for all layers "
                         "is supported")
    layers = getattr(config, "num_hidden_layers", None)
    num_experts = adapter.num_experts(config)
    smallest = {adapter.config_top_k: 1, adapter.config_expert_width: 1, adapter.config_shared_experts: 0,
                **dict.fromkeys(adapter.config_width_mirrors, 1), **dict.fromkeys(adapter.config_top_k_mirrors, 1)}
    for field, minimum in smallest.items():
        if not adapter.is_per_layer(config, field):
            continue
        values = list(getattr(config, field))
        if len(values) != layers:
            raise ModelError(f"{config.model_type}: config field {field!r} has {len(values)} entries for "
                             f"{layers} decoder layers (num_hidden_layers)")
        wrong = [value for value in values if isinstance(value, bool) or not isinstance(value, int) or value < minimum]
        if wrong:
            raise ModelError(f"{config.model_type}: config field {field!r} holds {wrong[0]!r}; each layer's entry "
                             f"must be an integer of at least {minimum}")
    too_many = {layer: k for layer, k in adapter.top_k_per_layer(config).items() if k > num_experts}
    if too_many:
        layer, k = next(iter(too_many.items()))
        raise ModelError(f"{config.model_type}: config field {adapter.config_top_k!r} routes each token to {k} "
                         f"experts in layer {layer}, more than its {num_experts} experts")
    if adapter.scoring_by_config is not None:
        field, rules = adapter.scoring_by_config
        if getattr(config, field, None) not in dict(rules):
            raise ModelError(f"{config.model_type}: config field {field!r} is {getattr(config, field, None)!r}; "
                             f"supported: {sorted(dict(rules))}")


def check_structure(model: nn.Module) -> MoEArchitecture:
    """The model's adapter, after checking that its MoE blocks look the way the table says: the router,
    the experts and every per-expert tensor are where the table puts them, each with one entry per
    expert. Raises one line naming the layer and what is unusual."""
    adapter = adapter_for(model.config)
    if not adapter.moe:
        return adapter
    blocks = adapter.moe_blocks(model)
    if not blocks:
        raise ModelError(f"{model.config.model_type}: no decoder layer has {adapter.moe_block}.{adapter.router} and "
                         f"{adapter.moe_block}.{adapter.experts}; the layout differs from the adapter table")
    for layer, block in blocks.items():
        count = adapter.block_num_experts(block)
        for owner, name in adapter.per_expert_paths():
            path = adapter.block_path(owner, name)
            tensor = _resolve(block, path, default=None)
            if not isinstance(tensor, torch.Tensor):
                raise ModelError(f"layer {layer}: {adapter.moe_block}.{path} is missing; the layout differs "
                                 "from the adapter table")
            dim = adapter.expert_dim(owner, name)
            if tensor.ndim <= dim or tensor.shape[dim] != count:
                raise ModelError(f"layer {layer}: {adapter.moe_block}.{path} has shape {tuple(tensor.shape)}, not "
                                 f"{count} experts in dimension {dim}")
    return adapter
