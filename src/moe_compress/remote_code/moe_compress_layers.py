"""Layers the stock modeling code cannot express: low-rank routed experts, and routers that skip
low-weight experts per token. Written by moe-compress into the checkpoints that use them, and imported
by the library itself, so the in-memory model and the reloaded checkpoint run the same code.
Self-contained on purpose: it needs only torch.

Low-rank experts

Each expert matrix W_e [out, in] (nn.Linear orientation, whatever the stock storage) is stored as
``lowrank_<name>_left`` [E or 1, out, r] and ``lowrank_<name>_right`` [E or 1, r, in]. A leading
dimension of 1 is a basis shared by all experts of the layer. The forward applies the factors
(x -> x R^T -> (x R^T) L^T), r (out + in) multiply-adds per token instead of out * in.

The stock experts module keeps everything else (biases, activation, its ``_apply_gate``); only its
class is swapped for a subclass whose forward runs the factors. The stock name of each matrix stays
readable as a property that rebuilds the dense tensor, for code that inspects it (it costs the dense
memory, so the forward never uses it).
"""

import torch
from torch import nn

_LOW_RANK_CLASSES = {}
_SKIP_CLASSES = {}


def factor_names(name):
    return f"lowrank_{name}_left", f"lowrank_{name}_right"


def is_low_rank(experts):
    return isinstance(experts, LowRankExpertsMixin)


class LowRankExpertsMixin:
    """Mixed in front of a stock experts class; ``low_rank_specs`` maps each factored matrix name to
    ``{"rank": r, "shared": None | "left" | "right"}``."""

    low_rank_specs = {}

    def _factor(self, tensor, expert):
        return tensor[expert if tensor.shape[0] > 1 else 0]

    def low_rank_linear(self, name, inputs, expert):
        left_name, right_name = factor_names(name)
        projected = nn.functional.linear(inputs, self._factor(getattr(self, right_name), expert))
        outputs = nn.functional.linear(projected, self._factor(getattr(self, left_name), expert))
        bias = getattr(self, f"{name}_bias", None) if getattr(self, "has_bias", False) else None
        return outputs if bias is None else outputs + bias[expert]

    def dense_matrix(self, name):
        """The dense [E, ...] tensor in the stock storage orientation (for inspection, not the forward)."""
        left_name, right_name = factor_names(name)
        left, right = getattr(self, left_name), getattr(self, right_name)
        dense = torch.matmul(left, right).expand(self.num_experts, -1, -1)
        return dense.transpose(-1, -2) if getattr(self, "is_transposed", False) else dense

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # one extra class: an index equal to num_experts marks a slot that runs no expert
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        gate_up, down = self.low_rank_matrices
        for expert_idx in expert_hit:  # a loop over experts; each expert's tokens form one batch
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            hidden = self.low_rank_linear(gate_up, hidden_states[token_idx], expert_idx)
            hidden = self.low_rank_linear(down, self._apply_gate(hidden), expert_idx)
            hidden = hidden * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, hidden.to(final_hidden_states.dtype))
        return final_hidden_states


def low_rank_class(stock_class, matrix_names):
    """The low-rank subclass of ``stock_class`` (one per stock class and matrix names)."""
    key = (stock_class, tuple(matrix_names))
    if key not in _LOW_RANK_CLASSES:
        properties = {name: property(lambda self, name=name: self.dense_matrix(name)) for name in matrix_names}
        _LOW_RANK_CLASSES[key] = type(f"LowRank{stock_class.__name__}", (LowRankExpertsMixin, stock_class),
                                      {**properties, "low_rank_matrices": tuple(matrix_names)})
    return _LOW_RANK_CLASSES[key]


def convert_to_low_rank(experts, factors, specs, matrix_names):
    """Turn a stock experts module into its low-rank form in place.

    ``factors``: {matrix name: (left, right)}, in nn.Linear orientation; ``specs``: {matrix name:
    {"rank", "shared"}}; ``matrix_names``: (gate/up projection, down projection), in that order."""
    names = list(matrix_names)
    for name in names:
        if name in experts._parameters:
            del experts._parameters[name]
        left_name, right_name = factor_names(name)
        left, right = factors[name]
        setattr(experts, left_name, nn.Parameter(left, requires_grad=False))
        setattr(experts, right_name, nn.Parameter(right, requires_grad=False))
    experts.__class__ = low_rank_class(type(experts), names)
    experts.low_rank_specs = {name: dict(specs[name]) for name in names}
    return experts


def empty_factors(experts, specs, num_experts):
    """Uninitialised factors of the shapes ``specs`` describe, for a checkpoint about to load its weights."""
    factors = {}
    for name, spec in specs.items():
        stock = getattr(experts, name)
        if getattr(experts, "is_transposed", False):  # stored [E, in, out]
            in_features, out_features = stock.shape[1:]
        else:
            out_features, in_features = stock.shape[1:]
        rank = spec["rank"]
        left_count = 1 if spec["shared"] == "left" else num_experts
        right_count = 1 if spec["shared"] == "right" else num_experts
        factors[name] = (torch.empty(left_count, out_features, rank, dtype=stock.dtype, device=stock.device),
                         torch.empty(right_count, rank, in_features, dtype=stock.dtype, device=stock.device))
    return factors


class DynamicSkipRouterMixin:
    """Dynamic expert skipping (NAEE): after the stock routing, an expert whose weight is below
    ``skip_beta`` x the token's top-1 weight is dropped for that token (the top-1 expert never is).
    A dropped slot gets weight 0 and index num_experts, which the skip-aware experts below never run.
    With ``skip_renormalize`` the kept weights are rescaled to the sum of the full top-k weights.
    beta = 0 changes nothing, bit for bit."""

    skip_beta = 0.0
    skip_renormalize = False

    def forward(self, hidden_states):
        logits, weights, indices = super().forward(hidden_states)
        keep = weights >= self.skip_beta * weights.max(dim=-1, keepdim=True).values
        kept = torch.where(keep, weights, torch.zeros_like(weights))
        if self.skip_renormalize:
            kept = kept * (weights.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True))
        return logits, kept, torch.where(keep, indices, torch.full_like(indices, self.num_experts))


class SkipAwareExpertsMixin:
    """Experts that accept top-k slots marked skipped (index == num_experts). The kept (token, slot)
    pairs are packed into a one-slot batch for the stock experts code, so a skipped expert costs no
    compute whatever kernel the stock code dispatches to (eager loop, grouped_mm, ...), and no stock
    kernel ever sees an out-of-range index. Without skipped slots the stock forward runs unchanged."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        skipped = top_k_index >= self.num_experts
        if not bool(skipped.any()):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        token_idx, slot = torch.where(~skipped)
        packed = super().forward(hidden_states[token_idx], top_k_index[token_idx, slot, None],
                                 top_k_weights[token_idx, slot, None])
        return torch.zeros_like(hidden_states).index_add_(0, token_idx, packed.to(hidden_states.dtype))


def is_skip_router(router):
    return isinstance(router, DynamicSkipRouterMixin)


def _swap_class(module, mixin, prefix):
    if not isinstance(module, mixin):
        stock_class = type(module)
        if (mixin, stock_class) not in _SKIP_CLASSES:
            _SKIP_CLASSES[mixin, stock_class] = type(f"{prefix}{stock_class.__name__}", (mixin, stock_class), {})
        module.__class__ = _SKIP_CLASSES[mixin, stock_class]


def convert_to_dynamic_skip(router, experts, beta, renormalize):
    """Give a MoE block dynamic skipping in place (or update its settings): its router marks skipped
    slots, its experts (unless low-rank, whose forward already skips them) leave those slots out."""
    _swap_class(router, DynamicSkipRouterMixin, "DynamicSkip")
    if not is_low_rank(experts):
        _swap_class(experts, SkipAwareExpertsMixin, "SkipAware")
    router.skip_beta = float(beta)
    router.skip_renormalize = bool(renormalize)
