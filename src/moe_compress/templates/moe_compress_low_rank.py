"""Low-rank routed experts. Written by moe-compress into checkpoints whose expert matrices are stored
as rank-r factors, and imported by the library itself, so the in-memory model and the reloaded
checkpoint run the same code. Self-contained on purpose: it needs only torch.

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
