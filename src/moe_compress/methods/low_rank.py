"""Low-rank experts (``svd_experts``): each expert matrix W_e [out, in] becomes rank-r factors
L_e [out, r] @ R_e [r, in], r (out + in) parameters instead of out * in.

- ``rank``: r for every matrix (capped at the matrix's own rank), or ``energy``: per layer and
  matrix, the smallest r keeping that fraction of the layer's squared singular values (summed over
  its experts), so the rank adapts to how compressible each layer is.
- ``share_basis``: one basis per layer on the hidden-size side (the input basis of the gate/up
  projection, the output basis of the down projection), from a joint SVD of all experts' matrices;
  each expert keeps only its own coefficients in that basis (optimal given the basis: W_e R^T R or
  L L^T W_e). The experts of a layer read from and write to the same residual stream, so a shared
  hidden-side subspace is where sharing loses least.

Singular values are split evenly (sqrt) between the two factors, so neither factor's scale runs away
in low precision. The factored experts run as factors (moe_compress_layers.py), in memory and in the
saved checkpoint.
"""

from __future__ import annotations

import logging

import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.registry import EXPERT_FACTORS, Method, exactly_one_of
from moe_compress.remote_code.moe_compress_layers import convert_to_low_rank, is_low_rank

log = logging.getLogger(__name__)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values keep ``energy`` of the squared total.

    ``singular_values`` is [..., k]; leading dimensions (experts) are summed rank by rank."""
    squared = (singular_values.double() ** 2).reshape(-1, singular_values.shape[-1]).sum(dim=0)
    cumulative = torch.cumsum(squared, dim=0) / squared.sum().clamp_min(1e-300)
    rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype, device=cumulative.device)).item()) + 1
    return min(rank, singular_values.shape[-1])


def kept_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` capped at the number of singular values, or, without one, the ``energy`` rank."""
    return min(rank, singular_values.shape[-1]) if rank is not None else energy_rank(singular_values, energy)


def factorize(matrices: torch.Tensor, rank: int | None, energy: float | None,
              shared: str | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Factor [experts, out, in] matrices; return (left [E or 1, out, r], right [E or 1, r, in], facts).

    ``shared``: None (each expert its own SVD), "right" (one input basis) or "left" (one output basis)."""
    experts, rows, cols = matrices.shape
    weights = matrices.double()
    if shared is None:
        u, s, vh = torch.linalg.svd(weights, full_matrices=False)
        r = kept_rank(s, rank, energy)
        root = s[:, :r].sqrt()
        left, right = u[:, :, :r] * root[:, None, :], root[:, :, None] * vh[:, :r]
    elif shared == "right":  # [W_1; ...; W_E] = U S V^T: V spans the inputs every expert reads
        _, s, vh = torch.linalg.svd(weights.reshape(experts * rows, cols), full_matrices=False)
        r = kept_rank(s, rank, energy)
        right = vh[:r].unsqueeze(0)
        left = weights @ right.transpose(-1, -2)
    elif shared == "left":  # [W_1 | ... | W_E] = U S V^T: U spans the outputs every expert writes
        u, s, _ = torch.linalg.svd(weights.permute(1, 0, 2).reshape(rows, experts * cols), full_matrices=False)
        r = kept_rank(s, rank, energy)
        left = u[:, :r].unsqueeze(0)
        right = left.transpose(-1, -2) @ weights
    else:
        raise ValueError(f"shared must be None, 'left' or 'right', not {shared!r}")
    approximation = left @ right
    facts = {
        "rank": r,
        "energy_kept": float((s[..., :r] ** 2).sum() / (s**2).sum().clamp_min(1e-300)),
        "weight_error": float((approximation - weights).norm() / weights.norm().clamp_min(1e-300)),
        "parameters_before": experts * rows * cols,
        "parameters_after": left.numel() + right.numel(),
    }
    return left.to(matrices.dtype).contiguous(), right.to(matrices.dtype).contiguous(), facts


def svd_experts(model, step: dict, context) -> dict:
    adapter = adapter_for(model.config)
    rank, energy = step.get("rank"), step.get("energy")
    report = {"layers": {}}
    for layer, block in context.each_block(model):
        experts = adapter.experts_of(block)
        if is_low_rank(experts):
            raise ModelError(f"svd_experts: layer {layer} is already low-rank (a checkpoint this pipeline factored)")
        transposed = getattr(experts, "is_transposed", False)
        factors, specs, layer_report = {}, {}, {}
        # the hidden-size side: the input of the first projection, the output of the second
        for name, hidden_side in zip(adapter.expert_matrices, ("right", "left")):
            stored = getattr(experts, name).data
            matrices = stored.transpose(-1, -2) if transposed else stored  # nn.Linear orientation [E, out, in]
            shared = hidden_side if step["share_basis"] else None
            left, right, facts = factorize(matrices, rank, energy, shared)
            factors[name] = (left, right)
            specs[name] = {"rank": facts["rank"], "shared": shared}
            layer_report[name] = {**facts, "shared": shared}
            if facts["parameters_after"] >= facts["parameters_before"]:
                log.warning("layer %d %s: rank %d stores %d parameters, not fewer than the dense %d", layer, name,
                            facts["rank"], facts["parameters_after"], facts["parameters_before"])
        convert_to_low_rank(experts, factors, specs, adapter.expert_matrices)
        report["layers"][str(layer)] = layer_report
        log.info("layer %d: %s", layer, {name: (r["rank"], round(r["weight_error"], 4))
                                         for name, r in layer_report.items()})
    return report


METHODS = (Method("svd_experts", svd_experts, frozenset({EXPERT_FACTORS}),
                  check_options=lambda step: exactly_one_of(step, "rank", "energy")),)
