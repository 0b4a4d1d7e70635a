"""Low-rank experts (``svd_experts``): each expert matrix W_e [out, in] becomes rank-r factors
L_e [out, r] @ R_e [r, in], r (out + in) parameters instead of out * in.

- ``rank``: r for every matrix (capped at the matrix's own rank), or ``energy``: per layer and
  matrix, the smallest r keeping that fraction of the layer's squared singular values (summed over
  its experts), so the rank adapts to how compressible each layer is.
- ``basis``: where the factors' bases come from.
  - ``per_expert`` (the default): each expert's own truncated SVD;
  - ``joint``: one basis per layer on the hidden-size side (the input basis of the gate/up projection,
    the output basis of the down projection), from a joint SVD of all experts' matrices; each expert
    keeps only its own coefficients in that basis (optimal given the basis: W_e R^T R or L L^T W_e).
    The experts of a layer read from and write to the same residual stream, so a shared hidden-side
    subspace is where sharing loses least;
  - ``most_used_expert`` (the low-rank study's "shared V"): the same shared hidden-side layout, the basis
    taken from one expert, the one the router selects most often in the layer (``selected`` in the
    original model's expert frequency table; ties to the lowest original id): the top-r right singular
    vectors of its gate/up matrix, the top-r left singular vectors of its down matrix. The energy rank
    is read from that expert's spectrum. The basis lives in the hidden space, so r is capped at the hidden
    size, not at the donor's rank: past its rank the basis is completed by its null space (arbitrary
    orthonormal directions), so r = hidden size reproduces every expert.
  ``share_basis`` is the older alias: true is ``joint``, false ``per_expert``.

Singular values are split evenly (sqrt) between the two factors, so neither factor's scale runs away
in low precision. The factored experts run as factors (moe_compress_layers.py), in memory and in the
saved checkpoint.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.common import energy_rank_of_squares, expert_matrices, stats_rows
from moe_compress.methods.registry import EXPERT_FACTORS, Method, Problem, exactly_one_of
from moe_compress.remote_code.moe_compress_layers import convert_to_low_rank, stored_form_of

log = logging.getLogger(__name__)


# The leading singular vectors of W are the leading eigenvectors of a Gram matrix: W W^T or W^T W (the smaller
# side) per expert, sum_e W_e^T W_e (shared input basis) or sum_e W_e W_e^T (shared output basis). Forming it is one
# batched matmul. Its r leading eigenvectors come from subspace iteration on r + oversampling columns (matmuls and
# a Cholesky QR pass every two steps, all batched) and one Rayleigh-Ritz step, rather than from a full SVD or
# eigendecomposition, which LAPACK and cuSOLVER run matrix by matrix (cuSOLVER's eigh is batched only up to 32 x 32)
# at O(n^3) each. Where r is a large part of the full rank, the full eigendecomposition of the Gram is used: exact,
# and no dearer there.
#
# Precision: float64 throughout, whatever the weights' dtype (bf16 included). The Gram squares the singular values,
# so float32 would resolve them only down to ~3e-4 of the largest (the square root of its rounding) and blur the
# tail the energy rank and the error are read from; float64 resolves them to ~1e-8. On H100/H200-class GPUs float64
# matmuls run at the float32 (non-TF32) rate and ignore a TF32 setting; on CPU they cost about twice float32's.
_OVERSAMPLING = 0.5  # extra columns as a fraction of r (at least _MIN_OVERSAMPLING): more converge in fewer steps
_MIN_OVERSAMPLING = 16
# From which k = r + oversampling, as a fraction of the Gram's size n, its full eigendecomposition takes over from
# 10-30 steps of ~2 n^2 k flops: on CPU, LAPACK's eigh is the cheaper from ~0.4 n (measured); cuSOLVER's runs matrix
# by matrix far below the GPU's matmul rate, so there the iteration is kept up to 0.7 n.
_FULL_EIGH_FROM = {"cpu": 0.4, "cuda": 0.7}
_TOLERANCE = 2e-4  # stop once two steps add less than this fraction of the energy to what the columns capture,
_REMAINING = 3e-4  # and the energy still to come (extrapolated) is below this fraction
_MAX_ITERATIONS = 30  # of two steps each
_SHIFT = 1e-12  # added to the trace-normalised Gram: keeps each step's block full rank (condition <= 1e12)


def _cholesky_qr(block: torch.Tensor, shifted: bool) -> tuple[torch.Tensor, bool]:
    """One Cholesky QR pass Y R^-1 on ``block`` [B, n, k], and whether every Cholesky succeeded. Shifted (Fukaya et
    al. 2020) it stays stable for condition numbers up to ~1e15 and leaves one of ~1e5 at most; plain, it is
    orthonormal to eps * condition^2."""
    rows, width = block.shape[-2:]
    eye = torch.eye(width, dtype=block.dtype, device=block.device)
    gram = block.mT @ block
    if shifted:
        shift = 11 * (rows * width + width * (width + 1)) * torch.finfo(block.dtype).eps
        gram = gram + (shift * gram.diagonal(dim1=-2, dim2=-1).sum(-1))[:, None, None] * eye
    factor, info = torch.linalg.cholesky_ex(gram)
    return block @ torch.linalg.solve_triangular(factor, eye, upper=False).mT, not bool(info.any())


def _orthonormalize(block: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns (to rounding) spanning ``block`` [B, n, k], n >= k: Cholesky QR passes, the first shifted,
    batched where Householder QR runs matrix by matrix on a GPU; Householder QR if a Cholesky fails (a block rank
    deficient beyond what the shift repairs)."""
    eye = torch.eye(block.shape[-1], dtype=block.dtype, device=block.device)
    for attempt in range(4):
        deviation = float((block.mT @ block - eye).abs().amax())
        if deviation < 1e-12:
            return block
        passed, ok = _cholesky_qr(block, shifted=attempt == 0 and deviation > 0.5)
        if not ok:
            break
        block = passed
    return torch.linalg.qr(block).Q


def _leading_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors [B, n, rank] of positive semi-definite ``gram`` [B, n, n], largest first."""
    batch, size, _ = gram.shape
    width = min(size, rank + max(_MIN_OVERSAMPLING, int(_OVERSAMPLING * rank)))
    if width >= _FULL_EIGH_FROM.get(gram.device.type, _FULL_EIGH_FROM["cuda"]) * size:
        return torch.linalg.eigh(gram).eigenvectors.flip(-1)[..., :rank]
    # trace-normalised, so the tolerance and the shift are fractions of each expert's energy; the shift moves every
    # eigenvalue alike (same eigenvectors), and only directions holding < 1e-12 of the energy can tie
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    gram = gram / trace[:, None, None]
    generator = torch.Generator(device=gram.device).manual_seed(0)  # fixed: the same factors every run
    basis = _orthonormalize(torch.randn(batch, size, width, generator=generator, dtype=gram.dtype,
                                        device=gram.device))
    captured = gain = None
    for iteration in range(_MAX_ITERATIONS + 1):
        product = gram @ basis
        now = (basis * product).sum(dim=(-2, -1))  # trace(Q^T G Q): the energy the columns capture
        if captured is not None:
            # what is still to come, were the gains to shrink geometrically as they did last time: the slow
            # convergence of flat spectra (small gains, but many still to come) keeps iterating
            previous, gain = gain, (now - captured).clamp_min(0)
            rate = torch.full_like(gain, 0.95) if previous is None else (gain / previous).nan_to_num(0.0).clamp(0, 0.95)
            if bool(((gain <= _TOLERANCE) & (gain * rate / (1 - rate) <= _REMAINING)).all()):
                break
        if iteration == _MAX_ITERATIONS:
            break
        captured = now
        # two steps, (G + shift)^2 Q, per orthonormalisation: the span is what matters between steps, and one plain
        # Cholesky QR pass keeps it to rounding wherever its Cholesky succeeds (condition up to ~1e7: flat spectra,
        # which take the most steps, stay far below; steep ones fall back to the shifted pass, and lose at most
        # directions holding < 1e-8 of the energy)
        block = product + _SHIFT * basis
        block = gram @ block + _SHIFT * block
        basis, ok = _cholesky_qr(block, shifted=False)
        if not ok:
            basis, ok = _cholesky_qr(block, shifted=True)
            if ok:
                basis, ok = _cholesky_qr(basis, shifted=False)
            if not ok:
                basis = _orthonormalize(block)
    exact = _orthonormalize(basis)
    if exact is not basis:
        basis, product = exact, gram @ exact
    # Rayleigh-Ritz: the best rank-r subspace within the iterated one
    projected = basis.mT @ product
    vectors = torch.linalg.eigh((projected + projected.mT) / 2).eigenvectors
    return basis @ vectors.flip(-1)[..., :rank]


def _relative_error(weights: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """||W - L R||_F / ||W||_F over all experts, forming L R a few experts at a time."""
    experts, rows, cols = weights.shape
    step = max(1, (1 << 24) // (rows * cols))
    squared = weights.new_zeros(())
    for start in range(0, experts, step):
        part = slice(start, start + step)
        approximation = (left if left.shape[0] == 1 else left[part]) @ (right if right.shape[0] == 1 else right[part])
        squared += (weights[part] - approximation).square().sum()
    return float(squared.sqrt() / weights.norm().clamp_min(1e-300))


def factorize(matrices: torch.Tensor, rank: int | None, energy: float | None,
              shared: str | None, donor: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Factor [experts, out, in] matrices; return (left [E or 1, out, r], right [E or 1, r, in], facts).

    ``shared``: None (each expert its own SVD), "right" (one input basis) or "left" (one output basis).
    The truncated SVD (Eckart-Young optimal), computed on the device of ``matrices`` from a Gram matrix (above).
    ``donor``: with a shared side, the expert whose own singular vectors on that side are the basis (instead
    of the joint SVD of all experts); r may then reach the whole side (the donor's null space completes it)."""
    experts, rows, cols = matrices.shape
    weights = matrices.double()
    if shared is None:  # the Gram of the smaller side, per expert
        by_rows = rows <= cols
        gram = weights @ weights.mT if by_rows else weights.mT @ weights
        count = min(rows, cols)
    elif donor is not None and shared in ("right", "left"):  # W_d = U S V^T: V (right) or U (left) of one expert
        one = weights[donor]
        gram = (one.mT @ one if shared == "right" else one @ one.mT).unsqueeze(0)
        count = gram.shape[-1]  # every eigenvector of the Gram, the null space's too: a basis of the whole side
    elif shared == "right":  # [W_1; ...; W_E] = U S V^T: V spans the inputs every expert reads
        stacked = weights.reshape(experts * rows, cols)
        gram = (stacked.mT @ stacked).unsqueeze(0)
        count = min(experts * rows, cols)
    elif shared == "left":  # [W_1 | ... | W_E] = U S V^T: U spans the outputs every expert writes
        stacked = weights.transpose(0, 1).reshape(rows, experts * cols)
        gram = (stacked @ stacked.mT).unsqueeze(0)
        count = min(rows, experts * cols)
    else:
        raise ValueError(f"shared must be None, 'left' or 'right', not {shared!r}")
    if rank is not None:
        r = min(rank, count)
    else:  # the energy rank needs the whole spectrum: the Gram's eigenvalues, without its eigenvectors
        squares = torch.linalg.eigvalsh(gram).flip(-1)[..., :count].clamp_min(0)
        r = energy_rank_of_squares(squares, energy)
    basis = _leading_eigenvectors(gram, r)
    del gram
    if shared is None and by_rows:  # W ~ U U^T W; U^T W = S V^T up to the rotation within tied values
        coefficients = basis.mT @ weights
        root = coefficients.norm(dim=-1).sqrt()  # sqrt of the singular values, split evenly between the factors
        left = basis * root[:, None, :]
        right = coefficients / torch.where(root > 0, root, 1)[:, :, None]
    elif shared is None:  # W ~ W V V^T; W V = U S
        coefficients = weights @ basis
        root = coefficients.norm(dim=-2).sqrt()
        left = coefficients / torch.where(root > 0, root, 1)[:, None, :]
        right = root[:, :, None] * basis.mT
    elif shared == "right":  # each expert's coefficients in the basis: W_e V (optimal given the basis)
        right = basis.mT
        left = coefficients = weights @ basis
    else:
        left = basis
        right = coefficients = basis.mT @ weights
    total = weights.square().sum()
    facts = {
        "rank": r,
        "energy_kept": float(coefficients.square().sum() / total.clamp_min(1e-300)),
        "weight_error": _relative_error(weights, left, right),
        "parameters_before": experts * rows * cols,
        "parameters_after": left.numel() + right.numel(),
    }
    if donor is not None:  # how much of its own matrix the donor keeps (all of it once r reaches its rank)
        facts["donor_energy_kept"] = float(coefficients[donor].square().sum()
                                           / weights[donor].square().sum().clamp_min(1e-300))
    return left.to(matrices.dtype).contiguous(), right.to(matrices.dtype).contiguous(), facts


def basis_of(step: dict) -> str:
    """The step's ``basis``, its alias ``share_basis`` resolved (neither given: per_expert)."""
    if step.get("basis") is not None:
        return step["basis"]
    return "joint" if step.get("share_basis") else "per_expert"


def most_used_expert(context, layer: int) -> dict:
    """The expert of ``layer`` the router selects most often in the original model (``selected`` in the
    statistics table; ties to the lowest original id): its current slot, original id, count and frequency."""
    if context.stats is None:
        raise ModelError("svd_experts with basis: most_used_expert needs the expert statistics table "
                         "(results/stats/expert_frequency.parquet): it picks each layer's most selected expert")
    original_ids = context.original_expert_ids[layer]
    selected = stats_rows(context.stats, context.original_layer(layer), "selected", original_ids)
    frequency = stats_rows(context.stats, context.original_layer(layer), "frequency", original_ids)
    slot = int(np.lexsort((original_ids.numpy(), -selected))[0])  # most selected first, then lowest id
    return {"slot": slot, "original_id": int(original_ids[slot]), "selected": int(selected[slot]),
            "frequency": float(frequency[slot])}


def svd_experts(model, step: dict, context) -> dict:
    adapter = adapter_for(model.config)
    rank, energy = step.get("rank"), step.get("energy")
    basis = basis_of(step)
    report = {"layers": {}}
    if basis == "most_used_expert":
        report["basis_experts"] = {}
    for layer, block in context.each_block(model):
        experts = adapter.experts_of(block)
        if stored_form_of(experts) is not None:
            raise ModelError(f"svd_experts: the experts of layer {layer} are already {stored_form_of(experts).what} "
                             f"({stored_form_of(experts).made_by}); factor dense experts")
        transposed = getattr(experts, "is_transposed", False)
        donor = most_used_expert(context, layer) if basis == "most_used_expert" else None
        factors, specs, layer_report = {}, {}, {}
        # the hidden-size side: the input of the first projection, the output of the second
        for name, hidden_side in zip(adapter.expert_matrices, ("right", "left")):
            stored = getattr(experts, name).data
            matrices = stored.transpose(-1, -2) if transposed else stored  # nn.Linear orientation [E, out, in]
            shared = None if basis == "per_expert" else hidden_side
            left, right, facts = factorize(matrices, rank, energy, shared, None if donor is None else donor["slot"])
            factors[name] = (left, right)
            specs[name] = {"rank": facts["rank"], "shared": shared}
            layer_report[name] = {**facts, "shared": shared, "basis": basis}
            if donor is not None:
                layer_report[name].update(basis_expert=donor["original_id"], basis_expert_frequency=donor["frequency"])
            if facts["parameters_after"] >= facts["parameters_before"]:
                log.warning("layer %d %s: rank %d stores %d parameters, not fewer than the dense %d", layer, name,
                            facts["rank"], facts["parameters_after"], facts["parameters_before"])
        convert_to_low_rank(experts, factors, specs, adapter.expert_matrices)
        report["layers"][str(layer)] = layer_report
        if donor is not None:
            report["basis_experts"][str(layer)] = {key: donor[key] for key in ("original_id", "selected", "frequency")}
            log.info("layer %d: basis from expert %d (selected %d times, frequency %.4f)", layer,
                     donor["original_id"], donor["selected"], donor["frequency"])
        log.info("layer %d: %s", layer, {name: (r["rank"], round(r["weight_error"], 4))
                                         for name, r in layer_report.items()})
    return report


def _svd_options(step: dict) -> Problem | None:
    """One of rank or energy; ``share_basis`` (the alias) only where it says what ``basis`` says."""
    problem = exactly_one_of(step, "rank", "energy")
    if problem:
        return problem
    basis, share_basis = step.get("basis"), step.get("share_basis")
    if basis is not None and share_basis is not None and basis != ("joint" if share_basis else "per_expert"):
        return Problem("share_basis", f"share_basis: {str(share_basis).lower()} contradicts basis: {basis} "
                                      f"(share_basis is the older name of basis: true is joint, false per_expert); "
                                      f"give basis alone")
    return None


def _inspect(adapter) -> str:
    return f"factor {expert_matrices(adapter)} (per expert, or on a shared basis); remote code"


METHODS = (Method("svd_experts", svd_experts, frozenset({EXPERT_FACTORS}), check_options=_svd_options,
                  reads_statistics=lambda step: basis_of(step) == "most_used_expert", inspect=_inspect),)
