"""Operations on one MoE block that every stage shares: route tokens, run one expert, run the block,
compare outputs. Everything goes through the architecture's own modules (``MoEArchitecture``), so the
statistics, the methods and the runner see exactly what the model computes."""

from __future__ import annotations

import torch


def route(adapter, block, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k indices) of the block's current router on ``hidden`` [tokens, hidden]."""
    _, weights, indices = adapter.call_router(block, hidden)
    return weights, indices


def run_expert(adapter, block, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s output on every row of ``hidden``, through the architecture's own experts code."""
    indices = torch.full((hidden.shape[0], 1), expert, dtype=torch.long, device=hidden.device)
    weights = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    return adapter.experts_of(block)(hidden, indices, weights)


def expert_activation(adapter, block, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """[tokens, intermediate]: expert ``expert``'s gated activation on every row of ``hidden`` (what its down
    projection reads): the gate/up projection, its bias where the experts have one, then the experts' own
    ``_apply_gate``. For dense fused experts, stored [E, 2I, H] or transposed [E, H, 2I]."""
    experts = adapter.experts_of(block)
    gate_up = getattr(experts, adapter.expert_matrices[0])[expert]
    if not getattr(experts, "is_transposed", False):
        gate_up = gate_up.T  # [H, 2I]
    projected = hidden.to(gate_up.dtype) @ gate_up
    bias = getattr(experts, f"{adapter.expert_matrices[0]}_bias", None)
    if isinstance(bias, torch.Tensor):
        projected = projected + bias[expert]
    return experts._apply_gate(projected)


def selection_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How often each expert appears in the top-k ``indices`` [tokens, k]."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts)


def _as_tokens(output, hidden: torch.Tensor) -> torch.Tensor:
    output = output[0] if isinstance(output, tuple) else output  # some blocks also return router scores
    return output.reshape(hidden.shape)


def block_output(block, hidden: torch.Tensor) -> torch.Tensor:
    """The MoE block's output for ``hidden`` [tokens, hidden]."""
    return _as_tokens(block(hidden.unsqueeze(0)), hidden)


def block_output_with(block, hidden: torch.Tensor, overrides: dict[str, torch.Tensor]) -> torch.Tensor:
    """``block_output`` with some of the block's tensors replaced (``torch.func.functional_call``), so a
    gradient can flow into the replacements."""
    return _as_tokens(torch.func.functional_call(block, overrides, (hidden.unsqueeze(0),)), hidden)


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """||reference - approximation|| / ||reference||."""
    return float((reference - approximation).float().norm() / reference.float().norm().clamp_min(1e-20))
