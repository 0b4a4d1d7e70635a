"""Layers the stock modeling code cannot express: low-rank routed experts, and routers that skip
low-weight experts per token. Written by moe-compress into the checkpoints that use them, and imported
by the library itself, so the in-memory model and the reloaded checkpoint run the same code.
Self-contained on purpose: it needs only torch.

Low-rank experts

Each expert matrix W_e [out, in] (nn.Linear orientation, whatever the stock storage) is stored as
``lowrank_<name>_left`` [E or 1, out, r] and ``lowrank_<name>_right`` [E or 1, r, in]. A leading
dimension of 1 is a basis shared by all experts of the layer. The forward applies the factors
(x -> x R^T -> (x R^T) L^T), r (out + in) multiply-adds per token instead of out * in, the way the stock
grouped_mm experts run: the (token, slot) pairs are sorted by expert and every per-expert factor is one
grouped matmul over the sorted pairs (``torch.nn.functional.grouped_mm``, or one matmul per hit expert
where that kernel cannot take the shapes, dtype or device). A shared input basis projects each token
once before the pairs are formed; a shared output basis is applied once per token, after the weighted
sum over its slots (exact by linearity). Skipped slots (index == num_experts) sort behind every expert
and no product computes them.

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


def _kernel_strides_ok(tensor):
    """The layout ``grouped_mm`` accepts: one of the last two dimensions unit-strided, the other's stride a
    multiple of 16 bytes, data 16-byte aligned (the batch stride is not checked)."""
    alignment = 16 // tensor.element_size()
    rows, cols = tensor.shape[-2:]
    row_stride, col_stride = tensor.stride()[-2:]
    if tensor.data_ptr() % 16:
        return False
    if row_stride == 1 and col_stride >= max(1, rows):
        return col_stride % alignment == 0
    if col_stride == 1 and row_stride >= max(1, cols):
        return row_stride % alignment == 0
    return False


def _grouped_mm_usable(inputs, weight):
    """Whether ``grouped_mm(inputs [S, K], weight [G, K, N])`` takes these operands. Decided from shapes,
    strides, dtype and device, so the kernel never raises and the fallback is chosen up front."""
    if not hasattr(torch.nn.functional, "grouped_mm") or inputs.dtype != weight.dtype:
        return False
    if weight.device.type == "cuda":
        # CUDA runs bf16 on SM80+ as one kernel; other dtypes loop over the groups with a host sync per call
        if weight.dtype != torch.bfloat16 or torch.cuda.get_device_capability(weight.device) < (8, 0):
            return False
        if weight.stride(0) == 0:  # an expanded shared factor: keep the kernel to real per-group weights
            return False
    elif weight.device.type != "cpu":
        return False
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return _kernel_strides_ok(inputs) and _kernel_strides_ok(weight)


class _ExpertGroups:
    """The (token, slot) pairs sorted by expert: ``offsets`` [E] int32, the end row of each expert's block,
    for the kernel; the same ends on the host for the fallback, read at most once per forward."""

    def __init__(self, offsets):
        self.offsets = offsets
        self._spans = None

    def spans(self):
        if self._spans is None:
            ends = self.offsets.tolist()  # the one host sync, shared by every fallback product
            starts = [0] + ends[:-1]
            self._spans = [(expert, start, end) for expert, (start, end) in enumerate(zip(starts, ends))
                           if end > start]
        return self._spans


def _grouped_linear(inputs, weight, groups):
    """Each expert's block of rows of ``inputs`` [S, in] (pairs sorted by expert) times that expert's
    ``weight`` [E, out, in] transposed: [S, out]. Rows past the last expert's block are unspecified.
    A factor shared on the pairs' side comes expanded (batch stride 0), so it skips those rows too."""
    weight_t = weight.transpose(-1, -2)  # [E, in, out]: the unit-strided layout the kernel wants
    if _grouped_mm_usable(inputs, weight_t):
        return torch.nn.functional.grouped_mm(inputs, weight_t, offs=groups.offsets)
    pieces, filled = [], 0
    for expert, start, end in groups.spans():
        pieces.append(torch.mm(inputs[start:end], weight_t[expert]))
        filled = end
    pieces.append(inputs.new_zeros(inputs.shape[0] - filled, weight.shape[1]))
    return torch.cat(pieces)


def _sum_slots(pairs, token_of_pair, num_tokens):
    """Rows of ``pairs`` (sorted by expert) summed per token. index_add_ reads the pairs once and allocates
    only the per-token result, where putting the pairs back in token order first would fill a second
    pairs-sized tensor (on CUDA its atomics leave the order of the k additions open, as in the stock
    eager experts)."""
    return pairs.new_zeros(num_tokens, pairs.shape[-1]).index_add_(0, token_of_pair, pairs)


class LowRankExpertsMixin:
    """Mixed in front of a stock experts class; ``low_rank_specs`` maps each factored matrix name to
    ``{"rank": r, "shared": None | "left" | "right"}``."""

    low_rank_specs = {}

    def _factor(self, tensor, expert):
        return tensor[expert if tensor.shape[0] > 1 else 0]

    def _bias(self, name):
        return getattr(self, f"{name}_bias", None) if getattr(self, "has_bias", False) else None

    def low_rank_linear(self, name, inputs, expert):
        """One expert's matrix ``name`` applied to ``inputs`` (for inspection; the forward runs all experts at once)."""
        left_name, right_name = factor_names(name)
        projected = nn.functional.linear(inputs, self._factor(getattr(self, right_name), expert))
        outputs = nn.functional.linear(projected, self._factor(getattr(self, left_name), expert))
        bias = self._bias(name)
        return outputs if bias is None else outputs + bias[expert]

    def dense_matrix(self, name):
        """The dense [E, ...] tensor in the stock storage orientation (for inspection, not the forward)."""
        left_name, right_name = factor_names(name)
        left, right = getattr(self, left_name), getattr(self, right_name)
        dense = torch.matmul(left, right).expand(self.num_experts, -1, -1)
        return dense.transpose(-1, -2) if getattr(self, "is_transposed", False) else dense

    def forward(self, hidden_states, top_k_index, top_k_weights):
        num_tokens, top_k = top_k_index.shape
        if num_tokens == 0:
            return torch.zeros_like(hidden_states)
        gate_up, down = self.low_rank_matrices
        gate_up_left, gate_up_right = (getattr(self, name) for name in factor_names(gate_up))
        down_left, down_right = (getattr(self, name) for name in factor_names(down))
        inputs = hidden_states.to(gate_up_right.dtype)

        # sort the (token, slot) pairs by expert; a skipped slot (index num_experts) sorts behind every expert
        expert_ids, order = torch.sort(top_k_index.reshape(-1))
        token_of_pair = order // top_k
        bounds = torch.arange(1, self.num_experts + 1, device=expert_ids.device, dtype=expert_ids.dtype)
        groups = _ExpertGroups(torch.searchsorted(expert_ids, bounds, out_int32=True))
        # no product writes the rows of skipped slots (the kernel leaves them uninitialised): masked_fill,
        # not a product with their zero weight (which keeps a NaN), clears them before the slots are summed
        skipped = (expert_ids >= self.num_experts).unsqueeze(-1)
        expert_ids = expert_ids.clamp(max=self.num_experts - 1)  # in range for the bias gathers
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(inputs.dtype)

        if gate_up_right.shape[0] == 1:  # shared input basis: project each token once, then form the pairs
            hidden = nn.functional.linear(inputs, gate_up_right[0])[token_of_pair]
        else:
            hidden = _grouped_linear(inputs[token_of_pair], gate_up_right, groups)
        hidden = _grouped_linear(hidden, gate_up_left.expand(self.num_experts, -1, -1), groups)
        bias = self._bias(gate_up)
        if bias is not None:
            hidden.add_(bias[expert_ids])
        hidden = self._apply_gate(hidden)

        hidden = _grouped_linear(hidden, down_right.expand(self.num_experts, -1, -1), groups)
        hidden = hidden * weights  # weighted before the left factor (exact by linearity): r columns, not out
        if down_left.shape[0] != 1:
            hidden = _grouped_linear(hidden, down_left, groups)
        per_token = _sum_slots(hidden.masked_fill_(skipped, 0), token_of_pair, num_tokens)
        if down_left.shape[0] == 1:  # shared output basis: once per token, on the weighted sum of its slots
            per_token = nn.functional.linear(per_token, down_left[0])
        bias = self._bias(down)
        if bias is not None:  # each pair's bias, weighted like its output
            kept_weights = torch.where(top_k_index < self.num_experts, top_k_weights, 0)
            slot_bias = bias[top_k_index.clamp(max=self.num_experts - 1)]
            per_token = per_token + torch.bmm(kept_weights.unsqueeze(1).to(per_token.dtype),
                                              slot_bias.to(per_token.dtype)).squeeze(1)
        return per_token.to(hidden_states.dtype)


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

    def forward(self, hidden_states, *router_inputs):
        # router_inputs: what some blocks pass their router beside the hidden states (a choice bias)
        logits, weights, indices = super().forward(hidden_states, *router_inputs)
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
