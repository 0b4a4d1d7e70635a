"""Layers the stock modeling code cannot express: routed experts stored in another form than the stock dense
tensors (low-rank factors, dictionary codes, constants standing in for experts), and routers that skip
low-weight experts per token. Written by moe-compress into the checkpoints that use them, and imported
by the library itself, so the in-memory model and the reloaded checkpoint run the same code.
Self-contained on purpose: it needs only torch.

Every such form of the experts is one ``StoredForm`` in ``STORED_FORMS`` (at the end of this file): whether
an experts module holds it, the config field that records it per layer, how it counts experts and
intermediate width, how its outputs are scaled and how the loader rebuilds it. The library and the
checkpoint's modeling file ask that table, so a new form is added there alone.

Dictionary-coded experts (``DictionaryExpertsMixin``, below) are a sparse special case of the shared-basis
low-rank layout and run through the same factored forward.

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
_DICTIONARY_CLASSES = {}
_SKIP_CLASSES = {}


def factor_names(name):
    return f"lowrank_{name}_left", f"lowrank_{name}_right"


def is_low_rank(experts):
    """Whether the experts are stored factored (low-rank factors or a dictionary code), not as the stock dense
    matrices: such experts keep their count but cannot be pruned, merged or factored again. Only low-rank
    experts have ``low_rank_specs``; dictionary-coded ones have ``dictionary_specs`` (``low_rank_specs`` None)."""
    return isinstance(experts, (LowRankExpertsMixin, DictionaryExpertsMixin))


def is_dictionary_coded(experts):
    return isinstance(experts, DictionaryExpertsMixin)


def dictionary_names(name):
    """The dictionary [hidden, atoms], the code values [E, n, sparsity] and their atom indices [E, n, sparsity]."""
    return f"dictionary_{name}_atoms", f"dictionary_{name}_values", f"dictionary_{name}_indices"


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


def _factored_forward(hidden_states, top_k_index, top_k_weights, num_groups, gate_up, down, biases, apply_gate):
    """The routed experts' weighted output [tokens, hidden] from factored matrices.

    ``gate_up`` and ``down``: (left [G or 1, out, r], right [G or 1, r, in]) in nn.Linear orientation, a
    leading 1 a factor shared by every expert; ``top_k_index`` [tokens, k] holds group ids 0..G-1, G for a
    skipped slot; ``biases``: (gate/up bias [G, out] or None, down bias [G, hidden] or None), by group id;
    ``apply_gate``: the stock experts' activation of the gate/up output."""
    num_tokens, top_k = top_k_index.shape
    if num_tokens == 0:
        return torch.zeros_like(hidden_states)
    (gate_up_left, gate_up_right), (down_left, down_right) = gate_up, down
    gate_up_bias, down_bias = biases
    inputs = hidden_states.to(gate_up_right.dtype)

    # sort the (token, slot) pairs by expert; a skipped slot (index num_groups) sorts behind every expert
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    token_of_pair = order // top_k
    bounds = torch.arange(1, num_groups + 1, device=expert_ids.device, dtype=expert_ids.dtype)
    groups = _ExpertGroups(torch.searchsorted(expert_ids, bounds, out_int32=True))
    # no product writes the rows of skipped slots (the kernel leaves them uninitialised): masked_fill,
    # not a product with their zero weight (which keeps a NaN), clears them before the slots are summed
    skipped = (expert_ids >= num_groups).unsqueeze(-1)
    expert_ids = expert_ids.clamp(max=num_groups - 1)  # in range for the bias gathers
    weights = top_k_weights.reshape(-1)[order].unsqueeze(-1).to(inputs.dtype)

    if gate_up_right.shape[0] == 1:  # shared input basis: project each token once, then form the pairs
        hidden = nn.functional.linear(inputs, gate_up_right[0])[token_of_pair]
    else:
        hidden = _grouped_linear(inputs[token_of_pair], gate_up_right, groups)
    hidden = _grouped_linear(hidden, gate_up_left.expand(num_groups, -1, -1), groups)
    if gate_up_bias is not None:
        hidden.add_(gate_up_bias[expert_ids])
    hidden = apply_gate(hidden)

    hidden = _grouped_linear(hidden, down_right.expand(num_groups, -1, -1), groups)
    hidden = hidden * weights  # weighted before the left factor (exact by linearity): r columns, not out
    if down_left.shape[0] != 1:
        hidden = _grouped_linear(hidden, down_left, groups)
    per_token = _sum_slots(hidden.masked_fill_(skipped, 0), token_of_pair, num_tokens)
    if down_left.shape[0] == 1:  # shared output basis: once per token, on the weighted sum of its slots
        per_token = nn.functional.linear(per_token, down_left[0])
    if down_bias is not None:  # each pair's bias, weighted like its output
        kept_weights = torch.where(top_k_index < num_groups, top_k_weights, 0)
        slot_bias = down_bias[top_k_index.clamp(max=num_groups - 1)]
        per_token = per_token + torch.bmm(kept_weights.unsqueeze(1).to(per_token.dtype),
                                          slot_bias.to(per_token.dtype)).squeeze(1)
    return per_token.to(hidden_states.dtype)


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
        gate_up, down = self.low_rank_matrices
        return _factored_forward(hidden_states, top_k_index, top_k_weights, self.num_experts,
                                 tuple(getattr(self, name) for name in factor_names(gate_up)),
                                 tuple(getattr(self, name) for name in factor_names(down)),
                                 (self._bias(gate_up), self._bias(down)), self._apply_gate)


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


class DictionaryExpertsMixin:
    """Mixed in front of a stock experts class: each expert matrix is coded over one dictionary per layer and
    matrix (methods/ksvd.py). Its hidden-size-side vectors, the rows of gate/up W_e [2I, H] and the columns
    of down W_e [H, I], n of them per expert, each in R^H, are sparse combinations of the dictionary's
    atoms D [H, atoms]: V_e ~ C_e D^T, C_e [n, atoms] with ``sparsity`` nonzeros per row, stored as their
    values and atom indices [E, n, sparsity] (the indices a buffer, int16 or int32).

    So gate/up W_e = C_e D^T is a low-rank product with the shared input basis D^T, and down W_e = D C_e^T
    one with the shared output basis D: the forward is the low-rank forward (x D once per token, D once per
    token on the weighted sum of its slots), with the per-expert factor C_e scattered dense from its codes
    for the experts the batch routes to, and only those (they are renumbered 0..hit-1 for it).
    ``dictionary_specs``: {matrix name: {"atoms", "sparsity", "index_dtype"}}."""

    dictionary_specs = None  # set per instance by convert_to_dictionary
    low_rank_specs = None  # not low-rank factors: the checkpoint's low-rank specs leave this layer out

    _bias = LowRankExpertsMixin._bias

    def dense_codes(self, name, experts):
        """The codes C_e [len(experts), n, atoms] of matrix ``name``, zero but for each row's ``sparsity`` entries."""
        atoms_name, values_name, indices_name = dictionary_names(name)
        values = getattr(self, values_name)[experts]
        indices = getattr(self, indices_name)[experts].long()
        codes = values.new_zeros(*values.shape[:-1], getattr(self, atoms_name).shape[1])
        return codes.scatter_add_(-1, indices, values)  # an atom listed twice in a row would add, as the code means

    def all_experts(self):
        return torch.arange(self.num_experts, device=getattr(self, dictionary_names(self.dictionary_matrices[0])[1]).device)

    def dense_matrix(self, name):
        """The dense [E, ...] tensor in the stock storage orientation (for inspection, not the forward)."""
        vectors = self.dense_codes(name, self.all_experts()) @ getattr(self, dictionary_names(name)[0]).mT  # [E, n, H]
        dense = vectors if name == self.dictionary_matrices[0] else vectors.mT  # nn.Linear orientation
        return dense.transpose(-1, -2) if getattr(self, "is_transposed", False) else dense

    def forward(self, hidden_states, top_k_index, top_k_weights):
        gate_up, down = self.dictionary_matrices
        routed = top_k_index[top_k_index < self.num_experts]
        hit = torch.unique(routed)  # sorted; the experts this batch runs, the only ones whose codes are expanded
        if hit.numel() == 0:
            return torch.zeros_like(hidden_states)
        group_of_expert = torch.full((self.num_experts + 1,), hit.numel(), dtype=top_k_index.dtype,
                                     device=top_k_index.device)  # a skipped slot stays behind every group
        group_of_expert[hit] = torch.arange(hit.numel(), dtype=top_k_index.dtype, device=top_k_index.device)
        gate_up_atoms, down_atoms = (getattr(self, dictionary_names(name)[0]) for name in (gate_up, down))
        gate_up_factors = (self.dense_codes(gate_up, hit), gate_up_atoms.mT.unsqueeze(0))  # C_e, shared D^T
        down_factors = (down_atoms.unsqueeze(0), self.dense_codes(down, hit).mT)  # shared D, C_e^T
        biases = tuple(None if bias is None else bias[hit] for bias in (self._bias(gate_up), self._bias(down)))
        return _factored_forward(hidden_states, group_of_expert[top_k_index], top_k_weights, hit.numel(),
                                 gate_up_factors, down_factors, biases, self._apply_gate)


def dictionary_class(stock_class, matrix_names):
    """The dictionary-coded subclass of ``stock_class`` (one per stock class and matrix names).

    The stock name of each matrix reads as the rebuilt dense tensor, and the low-rank factor names read as
    the factors these codes are (see ``DictionaryExpertsMixin``), so code written for low-rank experts reads
    them alike: the dictionary sides, ``lowrank_<gate_up>_right`` = D^T [1, atoms, H] and ``lowrank_<down>_left``
    = D [1, H, atoms], are views of the dictionary (scaling the latter's rows in place, as the adapter scales
    expert outputs, scales every expert's output); the code sides [E, ...] are rebuilt on each read (for
    inspection, like the dense matrices)."""
    key = (stock_class, tuple(matrix_names))
    if key not in _DICTIONARY_CLASSES:
        gate_up, down = matrix_names
        attributes = {name: property(lambda self, name=name: self.dense_matrix(name)) for name in matrix_names}
        attributes.update({
            factor_names(gate_up)[0]: property(lambda self: self.dense_codes(gate_up, self.all_experts())),
            factor_names(gate_up)[1]: property(lambda self: getattr(self, dictionary_names(gate_up)[0]).mT.unsqueeze(0)),
            factor_names(down)[0]: property(lambda self: getattr(self, dictionary_names(down)[0]).unsqueeze(0)),
            factor_names(down)[1]: property(lambda self: self.dense_codes(down, self.all_experts()).mT),
        })
        _DICTIONARY_CLASSES[key] = type(f"Dictionary{stock_class.__name__}", (DictionaryExpertsMixin, stock_class),
                                        {**attributes, "dictionary_matrices": tuple(matrix_names)})
    return _DICTIONARY_CLASSES[key]


def convert_to_dictionary(experts, tensors, specs, matrix_names):
    """Turn a stock experts module into its dictionary-coded form in place.

    ``tensors``: {matrix name: (atoms [H, atoms], values [E, n, sparsity], indices [E, n, sparsity])};
    ``specs``: {matrix name: {"atoms", "sparsity", "index_dtype"}}; ``matrix_names``: (gate/up projection,
    down projection), in that order."""
    names = list(matrix_names)
    for name in names:
        if name in experts._parameters:
            del experts._parameters[name]
        atoms_name, values_name, indices_name = dictionary_names(name)
        atoms, values, indices = tensors[name]
        setattr(experts, atoms_name, nn.Parameter(atoms, requires_grad=False))
        setattr(experts, values_name, nn.Parameter(values, requires_grad=False))
        experts.register_buffer(indices_name, indices)  # integers: a buffer, saved with the weights
    experts.__class__ = dictionary_class(type(experts), names)
    experts.dictionary_specs = {name: dict(specs[name]) for name in names}
    return experts


def empty_dictionary(experts, specs, num_experts, matrix_names):
    """Uninitialised dictionary tensors of the shapes ``specs`` describe, for a checkpoint about to load them."""
    tensors = {}
    names = list(matrix_names)
    for name in names:
        spec = specs[name]
        stock = getattr(experts, name)
        if getattr(experts, "is_transposed", False):  # stored [E, in, out]
            in_features, out_features = stock.shape[1:]
        else:
            out_features, in_features = stock.shape[1:]
        # the first matrix reads the hidden state (rows in R^H), the second writes it (columns in R^H)
        hidden, count = (in_features, out_features) if name == names[0] else (out_features, in_features)
        code_shape = (num_experts, count, spec["sparsity"])
        tensors[name] = (torch.empty(hidden, spec["atoms"], dtype=stock.dtype, device=stock.device),
                         torch.empty(code_shape, dtype=stock.dtype, device=stock.device),
                         torch.empty(code_shape, dtype=getattr(torch, spec["index_dtype"]), device=stock.device))
    return tensors


def dictionary_specs_of(experts):
    """The dictionary specs of dictionary-coded experts, None for any others."""
    return experts.dictionary_specs if is_dictionary_coded(experts) else None


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
    slots, its experts (unless in a stored form, whose forward already skips them) leave those slots out."""
    _swap_class(router, DynamicSkipRouterMixin, "DynamicSkip")
    if stored_form_of(experts) is None:
        _swap_class(experts, SkipAwareExpertsMixin, "SkipAware")
    router.skip_beta = float(beta)
    router.skip_renormalize = bool(renormalize)


class NoviceExpertsMixin:
    """Mixed in front of a stock experts class: MoNE (Mixture of Novices and Experts). Some of the router's
    experts are novices: a slot routed to novice j adds its routing weight times the constant c_j [hidden]
    and runs no expert. The router keeps every row and weight; this module holds only the kept experts' dense
    tensors (``num_experts`` of them: the count the stock forward reads) and ``novice_constants``
    [novices, hidden], in router-slot order.

    ``novice_slot_map`` [router experts + 1] (an integer buffer, saved with the weights; ``novice_specs``
    says the same): per router slot, its dense expert (0..kept-1) or kept + its novice index; the last
    entry, for the skipped-slot index (= router experts), points past both."""

    novice_specs = None  # {"num_experts": the router's experts, "novices": [router slots]}, set per instance

    def forward(self, hidden_states, top_k_index, top_k_weights):
        constants = self.novice_constants
        num_novices = constants.shape[0]
        num_dense = self.novice_slot_map.numel() - 1 - num_novices
        slots = self.novice_slot_map[top_k_index]
        dense = slots < num_dense
        if bool(dense.all()):
            output = super().forward(hidden_states, slots, top_k_weights)
        else:
            # the dense (token, slot) pairs as a one-slot batch, so the stock kernels never see a novice's index
            output = torch.zeros_like(hidden_states)
            token_idx, slot = torch.where(dense)
            if token_idx.numel():
                packed = super().forward(hidden_states[token_idx], slots[token_idx, slot, None],
                                         top_k_weights[token_idx, slot, None])
                output.index_add_(0, token_idx, packed.to(output.dtype))
        # each token's novice weights, one column per novice (dense and skipped slots fall in a dropped column),
        # so the constants are one matmul: [tokens, novices] x [novices, hidden]
        is_novice = (slots >= num_dense) & (slots < num_dense + num_novices)
        column = torch.where(is_novice, slots - num_dense, num_novices)
        novice_weights = top_k_weights.new_zeros(top_k_index.shape[0], num_novices + 1)
        novice_weights.scatter_add_(1, column, top_k_weights)
        return output + (novice_weights[:, :num_novices].to(constants.dtype) @ constants).to(output.dtype)


_NOVICE_CLASSES = {}


def novice_class(stock_class):
    """The MoNE subclass of ``stock_class`` (one per stock class)."""
    if stock_class not in _NOVICE_CLASSES:
        _NOVICE_CLASSES[stock_class] = type(f"Novice{stock_class.__name__}", (NoviceExpertsMixin, stock_class), {})
    return _NOVICE_CLASSES[stock_class]


def _replace_tensor(module, name, value):
    """Swap a tensor, keeping its kind: parameters stay parameters, buffers stay buffers."""
    if name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, nn.Parameter(value, requires_grad=False))


def _install_novices(experts, num_experts, novices, constants, count_attrs):
    novices = sorted(int(slot) for slot in novices)
    kept = [slot for slot in range(num_experts) if slot not in set(novices)]
    slot_map = torch.empty(num_experts + 1, dtype=torch.long)
    slot_map[kept] = torch.arange(len(kept))
    slot_map[novices] = torch.arange(len(kept), len(kept) + len(novices))
    slot_map[num_experts] = len(kept) + len(novices)  # a skipped slot: neither a dense expert nor a novice
    experts.novice_constants = nn.Parameter(constants, requires_grad=False)
    experts.register_buffer("novice_slot_map", slot_map.to(constants.device))  # integers: saved, not a weight
    experts.__class__ = novice_class(type(experts))
    experts.novice_specs = {"num_experts": int(num_experts), "novices": novices}
    for attr in count_attrs:  # the stock forward counts the dense experts only
        if hasattr(experts, attr):
            setattr(experts, attr, len(kept))
    return experts


def convert_to_novices(experts, kept, constants, expert_tensors, count_attrs=("num_experts",)):
    """Turn a stock experts module into its MoNE form in place: the router slots ``kept`` (sorted) keep their
    dense tensors, every other slot becomes a novice returning its row of ``constants`` [novices, hidden]
    (novices in slot order). ``expert_tensors``: {name: expert dimension} of the module's per-expert tensors;
    ``count_attrs``: its attributes holding the expert count."""
    kept = sorted(int(slot) for slot in kept)
    num_experts = None
    for name, dim in expert_tensors.items():
        old = getattr(experts, name)
        num_experts = old.shape[dim]
        index = torch.as_tensor(kept, dtype=torch.long, device=old.device)
        _replace_tensor(experts, name, old.data.index_select(dim, index))
    novices = [slot for slot in range(num_experts) if slot not in set(kept)]
    return _install_novices(experts, num_experts, novices, constants, count_attrs)


def _dense_width(experts, down_name):
    down = getattr(experts, down_name, None)
    if not isinstance(down, torch.Tensor):
        return None
    return int(down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2])


def _scale_dense_outputs(experts, down_name, scale):
    weight = getattr(experts, down_name)
    if getattr(experts, "is_transposed", False):  # stored [E, in, out]
        weight.mul_(scale.to(weight.dtype)[None, None, :])
    else:  # stored [E, out, in]
        weight.mul_(scale.to(weight.dtype)[None, :, None])


def _experts_tensor_dims(layout):
    """{name: expert dimension} of the experts module's own per-expert tensors, from the checkpoint layout."""
    prefix = layout["experts"] + "."
    return {path[len(prefix):]: dim for path, dim in layout["per_expert_tensors"]
            if path.startswith(prefix) and "." not in path[len(prefix):]}


class StoredForm:
    """One form of a layer's routed experts other than the stock dense tensors.

    ``name`` keys it in compression.json (``<name>_per_layer``); ``config_field`` holds its specs per MoE layer
    in config.json, what the checkpoint's loader rebuilds it from; ``what`` says what it is and ``made_by``
    which steps make it (in messages); ``served``: whether the vLLM plugin serves it (the plugin imports nothing
    of this package: its UNSERVED_LAYOUTS says why not, by this config field). Every form runs skipped slots
    (index == router experts) itself and has no dense experts to prune, merge or factor."""

    name = config_field = what = made_by = ""
    served = False

    def holds(self, experts):
        raise NotImplementedError

    def specs(self, experts):
        """What ``config_field`` records for one layer (JSON)."""
        raise NotImplementedError

    def rebuild(self, experts, specs, layout):
        """Give a stock experts module of the checkpoint's config this form, uninitialised, before the weights load."""
        raise NotImplementedError

    def expert_count(self, experts):
        """The experts the router chooses from."""
        return int(experts.num_experts)

    def intermediate_width(self, experts, matrix_names):
        raise NotImplementedError

    def scale_outputs(self, experts, matrix_names, scale):
        """Multiply every expert's output by ``scale`` [hidden] (biases are the caller's: they stay dense)."""
        raise NotImplementedError


class LowRankForm(StoredForm):
    name, config_field = "low_rank", "moe_compress_low_rank"
    what, made_by = "factored", "svd_experts and ksvd_experts"

    def holds(self, experts):
        return isinstance(experts, LowRankExpertsMixin)

    def specs(self, experts):
        return experts.low_rank_specs

    def rebuild(self, experts, specs, layout):
        convert_to_low_rank(experts, empty_factors(experts, specs, experts.num_experts), specs, layout["expert_matrices"])

    def intermediate_width(self, experts, matrix_names):
        return int(getattr(experts, factor_names(matrix_names[1])[1]).shape[-1])  # right factor [E or 1, r, in]

    def scale_outputs(self, experts, matrix_names, scale):
        left = getattr(experts, factor_names(matrix_names[1])[0])  # [E or 1, out, r]: its output rows
        left.mul_(scale.to(left.dtype)[None, :, None])


class DictionaryForm(StoredForm):
    name, config_field = "dictionary", "moe_compress_dictionary"
    what, made_by = "factored", "svd_experts and ksvd_experts"

    def holds(self, experts):
        return isinstance(experts, DictionaryExpertsMixin)

    def specs(self, experts):
        return experts.dictionary_specs

    def rebuild(self, experts, specs, layout):
        tensors = empty_dictionary(experts, specs, experts.num_experts, layout["expert_matrices"])
        convert_to_dictionary(experts, tensors, specs, layout["expert_matrices"])

    def intermediate_width(self, experts, matrix_names):
        return int(getattr(experts, dictionary_names(matrix_names[1])[1]).shape[1])  # one code row per neuron

    def scale_outputs(self, experts, matrix_names, scale):
        atoms = getattr(experts, dictionary_names(matrix_names[1])[0])  # [H, atoms]: every expert's output basis
        atoms.mul_(scale.to(atoms.dtype)[:, None])


class NoviceForm(StoredForm):
    name, config_field = "novice", "moe_compress_novice"
    what, made_by = "partly replaced by constants (MoNE novices)", "mone_prune"

    def holds(self, experts):
        return isinstance(experts, NoviceExpertsMixin)

    def specs(self, experts):
        return {"num_experts": experts.novice_specs["num_experts"], "novices": list(experts.novice_specs["novices"])}

    def rebuild(self, experts, specs, layout):
        num_experts, novices = int(specs["num_experts"]), specs["novices"]
        kept = num_experts - len(novices)
        for name, dim in _experts_tensor_dims(layout).items():
            old = getattr(experts, name, None)
            if isinstance(old, torch.Tensor):
                shape = list(old.shape)
                shape[dim] = kept
                _replace_tensor(experts, name, torch.empty(shape, dtype=old.dtype, device=old.device))
        down = getattr(experts, layout["expert_matrices"][1])
        hidden = down.shape[2] if getattr(experts, "is_transposed", False) else down.shape[1]
        constants = torch.empty(len(novices), hidden, dtype=down.dtype, device=down.device)
        _install_novices(experts, num_experts, novices, constants, layout["expert_count_attrs"])

    def expert_count(self, experts):
        return int(experts.novice_specs["num_experts"])

    def intermediate_width(self, experts, matrix_names):
        return _dense_width(experts, matrix_names[1])

    def scale_outputs(self, experts, matrix_names, scale):
        _scale_dense_outputs(experts, matrix_names[1], scale)
        experts.novice_constants.mul_(scale.to(experts.novice_constants.dtype)[None, :])


STORED_FORMS = (LowRankForm(), DictionaryForm(), NoviceForm())


def stored_form_of(experts):
    """The ``StoredForm`` an experts module holds, None for the stock dense tensors."""
    for form in STORED_FORMS:
        if form.holds(experts):
            return form
    return None
