"""Dictionary-coded experts (``ksvd_experts``): each layer's expert matrices coded sparsely over one learned
dictionary per layer and matrix, by K-SVD (Aharon, Elad & Bruckstein 2006) in its approximate form (AK-SVD,
Rubinstein, Zibulevsky & Elad 2008).

What the dictionary spans: the hidden-size side of each matrix. In nn.Linear orientation (out x in), gate/up
W_e [2I, H] reads the hidden state, so each of its 2I rows is a vector in R^H; down W_e [H, I] writes it, so
each of its I columns is. All E n such vectors of a layer's matrix (n = 2I or I per expert) are coded over
one dictionary D [H, atoms] of unit-norm columns: v ~ D c, c with ``sparsity`` nonzeros. The experts of a
layer read and write the same residual stream, so the hidden side is where sharing loses least (svd_experts'
joint basis, made sparse: atoms = sparsity = H is that basis at full rank).

Stored per layer and matrix: D [H, atoms], and per expert and vector ``sparsity`` code values and their atom
indices ([E, n, sparsity] each; the indices int16 where the atoms fit, else int32, a buffer). Parameters: the
dictionary and the values, H atoms + E n sparsity against E n H dense; the indices are reported in bytes.
The experts run from that representation (moe_compress_layers.DictionaryExpertsMixin), in memory and from the
saved checkpoint.

The algorithm, on the signals Y [N = E n, H], in float64 on the weights' device:
- initial dictionary: the leading eigenvectors of Y^T Y (the leading left singular vectors of the signal
  matrix), as many as R^H holds; atoms beyond H are signals drawn at random with ``seed``, normalised (the
  seed matters only then). So atoms >= H starts from a complete orthonormal basis, and sparsity = H with
  atoms = H reproduces every expert (to rounding);
- sparse coding, Batch-OMP (Rubinstein et al. 2008), all signals at once (in chunks that bound memory): per
  greedy step the atom most correlated with each residual joins its support, and the coefficients are the
  least-squares fit on the support, from the dictionary's Gram matrix (a batched Cholesky solve of the
  [signals, t, t] support systems); the correlations are updated from the Gram as well, so no residual is
  formed while coding. A loop over the ``sparsity`` steps, none over signals;
- dictionary update, atom by atom (K-SVD's sweep is sequential: each atom sees the residual the earlier
  ones left). E_k: the residual of the signals that use atom k plus atom k's own contribution. The
  approximate K-SVD step d_k = E_k^T x_k / ||E_k^T x_k||, then x_k = E_k d_k, is one power iteration towards
  the rank-1 SVD that exact K-SVD takes; each half minimises ||E_k - x d^T|| exactly (over unit d given x,
  then over x given d), so no atom's update raises the error. An atom no signal uses is replaced by the
  residual of the worst-coded signal (normalised);
- monotone iterations: OMP is greedy and may code a signal worse than its previous code did under the
  updated dictionary, so each signal keeps the better of the two codes. The relative error therefore never
  rises from one iteration to the next (``weight_error_per_iteration``); the iterations stop early once one
  lowers it by no more than ``tolerance`` of itself.

Cost per iteration, N signals, K atoms, s nonzeros: coding ~ N s K (correlation updates) + N s^4 / 12
(support Choleskys) multiply-adds, the update ~ 4 N s H; float64 (on H100/H200 at the float32 rate). Memory:
the signals and their residual (twice the matrix in float64) plus chunks of 256 MiB.
"""

from __future__ import annotations

import logging

import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.common import expert_matrices
from moe_compress.methods.registry import EXPERT_FACTORS, Method, Problem
from moe_compress.remote_code.moe_compress_layers import convert_to_dictionary, stored_form_of

log = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 25  # float64 elements (256 MiB) of the largest per-chunk block: [signals, s, atoms or H]
# added to the diagonal of the support's Gram (unit diagonal): keeps it positive definite where a step adds an
# atom dependent on the support (once a signal's residual is zero, any atom ties); moves coefficients ~1e-12
_RIDGE = 1e-12
_EXACT = 1e-11  # a relative error at float64 rounding (and the ridge): the codes reproduce the signals


def initial_dictionary(signals: torch.Tensor, atoms: int, seed: int) -> torch.Tensor:
    """[H, atoms], unit columns: the leading eigenvectors of the signals' Gram, then signals drawn with ``seed``."""
    hidden = signals.shape[1]
    eigenvectors = torch.linalg.eigh(signals.mT @ signals).eigenvectors.flip(-1)  # leading first, orthonormal
    dictionary = eigenvectors[:, :min(atoms, hidden)]
    extra = atoms - dictionary.shape[1]
    if extra == 0:
        return dictionary.contiguous()
    norms = signals.norm(dim=1)
    candidates = torch.nonzero(norms > 0).squeeze(1)
    if len(candidates) < extra:
        raise ModelError(f"ksvd_experts: {atoms} atoms need {extra} nonzero vectors beyond the hidden size {hidden} "
                         f"to start from, but the matrix has {len(candidates)}; use fewer atoms")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = torch.randperm(len(candidates), generator=generator, device="cpu")[:extra].to(candidates.device)
    picked = candidates[drawn]
    return torch.cat([dictionary, (signals[picked] / norms[picked, None]).mT], dim=1).contiguous()


def batch_omp(signals: torch.Tensor, dictionary: torch.Tensor, sparsity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit of every signal (rows of [N, H]) over ``dictionary`` [H, K] (unit columns):
    (atom indices [N, sparsity] int64, in the order chosen; coefficients [N, sparsity])."""
    count = signals.shape[0]
    atoms = dictionary.shape[1]
    gram = dictionary.mT @ dictionary  # [K, K]: everything a step needs besides the signals' projections
    if sparsity >= atoms:  # every atom in every code: one least-squares fit on the whole dictionary, no search
        ridge = _RIDGE * torch.eye(atoms, dtype=gram.dtype, device=gram.device)
        values = torch.linalg.solve(gram + ridge, dictionary.mT @ signals.mT).mT
        return torch.arange(atoms, device=signals.device).expand(count, atoms).contiguous(), values.contiguous()
    chunk = max(1, _CHUNK_ELEMENTS // (sparsity * atoms))
    all_indices, all_values = [], []
    for start in range(0, count, chunk):
        projections = signals[start:start + chunk] @ dictionary  # D^T y, [n, K]
        rows = projections.shape[0]
        correlations = projections  # D^T (y - D_S c): the residual's correlation with every atom
        support = torch.empty(rows, 0, dtype=torch.long, device=projections.device)
        support_rows = projections.new_empty(rows, sparsity, atoms)  # the Gram's rows of each support's atoms
        # the Cholesky factor of each support's Gram D_S^T D_S, grown by a row per step (Cholesky-OMP): one
        # triangular solve per step instead of a factorisation
        factor = projections.new_zeros(rows, sparsity, sparsity)
        for step in range(sparsity):
            scores = correlations.abs().scatter(1, support, -1.0)  # an atom joins a support once
            chosen = scores.argmax(dim=1)
            support_rows[:, step] = gram[chosen]
            if step == 0:
                factor[:, 0, 0] = (gram.diagonal()[chosen] + _RIDGE).sqrt()
            else:  # [L 0; w^T d]: L w = G_S,new, d^2 = G_new,new - w^T w
                overlap = support_rows[:, step].gather(1, support)  # [n, t]
                w = torch.linalg.solve_triangular(factor[:, :step, :step], overlap.unsqueeze(-1),
                                                  upper=False).squeeze(-1)
                factor[:, step, :step] = w
                factor[:, step, step] = (gram.diagonal()[chosen] + _RIDGE - w.square().sum(dim=1)).clamp_min(
                    _RIDGE).sqrt()
            support = torch.cat([support, chosen.unsqueeze(1)], dim=1)
            width = step + 1
            lower = factor[:, :width, :width]  # G_S c = D_S^T y by two triangular solves (L L^T c = b)
            half = torch.linalg.solve_triangular(lower, projections.gather(1, support).unsqueeze(-1), upper=False)
            values = torch.linalg.solve_triangular(lower.mT, half, upper=True).squeeze(-1)
            if width < sparsity:  # D^T y - D^T D_S c, from the Gram's rows of the support
                correlations = projections - torch.einsum("nt,ntk->nk", values, support_rows[:, :width])
        all_indices.append(support)
        all_values.append(values)
    return torch.cat(all_indices), torch.cat(all_values)


def reconstruct(indices: torch.Tensor, values: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """The coded signals [N, H]: each row's values times its atoms, summed (a chunk of rows at a time)."""
    count, sparsity = indices.shape
    atoms_by_row = dictionary.mT  # [K, H]
    chunk = max(1, _CHUNK_ELEMENTS // (sparsity * dictionary.shape[0]))
    return torch.cat([torch.einsum("ns,nsh->nh", values[start:start + chunk], atoms_by_row[indices[start:start + chunk]])
                      for start in range(0, count, chunk)])


def update_dictionary(dictionary: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                      residual: torch.Tensor) -> None:
    """One approximate K-SVD sweep over the atoms, in place: each used atom and its coefficients by one power
    step on the error it leaves, the residual kept current; each unused atom replaced by the residual of the
    worst-coded signal not yet taken."""
    sparsity = indices.shape[1]
    flat_values = values.view(-1)
    order = torch.argsort(indices.reshape(-1), stable=True)  # the (signal, slot) positions of each atom, together
    counts = torch.bincount(indices.reshape(-1), minlength=dictionary.shape[1]).tolist()  # one host read
    worst_first = torch.argsort(residual.square().sum(dim=1), descending=True, stable=True)
    replaced, start = 0, 0
    for atom, used in enumerate(counts):
        atom_now = dictionary[:, atom]
        if used == 0:
            if replaced == len(worst_first):  # more unused atoms than signals: the rest stay as they are
                continue
            signal = worst_first[replaced]
            replaced += 1
            norm = residual[signal].norm()
            dictionary[:, atom] = torch.where(norm > 0, residual[signal] / norm.clamp_min(1e-300), atom_now)
            continue
        positions = order[start:start + used]
        start += used
        rows = positions // sparsity  # each signal uses an atom at most once
        coefficients = flat_values[positions]
        errors = residual[rows] + coefficients[:, None] * atom_now  # [m, H]: without atom k's contribution
        direction = errors.mT @ coefficients
        norm = direction.norm()
        atom_new = torch.where(norm > 0, direction / norm.clamp_min(1e-300), atom_now)  # no host sync
        coefficients_new = errors @ atom_new
        residual[rows] = errors - coefficients_new[:, None] * atom_new
        dictionary[:, atom] = atom_new
        flat_values[positions] = coefficients_new


def learn_dictionary(signals: torch.Tensor, atoms: int, sparsity: int, iterations: int, seed: int,
                     tolerance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """K-SVD on the rows of ``signals`` [N, H] (float64): (dictionary [H, atoms], indices [N, sparsity] int64,
    values [N, sparsity], the relative error ||Y - X D^T|| / ||Y|| after the first coding and each iteration)."""
    total = signals.norm().clamp_min(1e-300)
    dictionary = initial_dictionary(signals, atoms, seed)
    indices, values = batch_omp(signals, dictionary, sparsity)
    residual = signals - reconstruct(indices, values, dictionary)
    errors = [float(residual.norm() / total)]
    for _ in range(iterations):
        if errors[-1] <= _EXACT:
            break
        update_dictionary(dictionary, indices, values, residual)
        new_indices, new_values = batch_omp(signals, dictionary, sparsity)
        new_residual = signals - reconstruct(new_indices, new_values, dictionary)
        # each signal keeps the better code: the greedy coding may do worse than the code it replaces
        better = (new_residual.square().sum(dim=1) < residual.square().sum(dim=1)).unsqueeze(1)
        indices = torch.where(better, new_indices, indices)
        values = torch.where(better, new_values, values)
        residual = torch.where(better, new_residual, residual)
        errors.append(float(residual.norm() / total))
        if errors[-2] - errors[-1] <= tolerance * errors[-2]:
            break
    return dictionary, indices, values, errors


def code_matrices(matrices: torch.Tensor, hidden_side: str, atoms: int, sparsity: int, iterations: int, seed: int,
                  tolerance: float) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict, dict]:
    """Code one layer's [E, out, in] matrices (nn.Linear orientation) over a learned dictionary of their
    ``hidden_side`` ("input": rows in R^in; "output": columns in R^out). Returns ((atoms [H, K], values
    [E, n, s], indices [E, n, s]) in storage dtypes, the spec, the facts)."""
    vectors = matrices if hidden_side == "input" else matrices.mT  # [E, n, H]: each expert's hidden-side vectors
    experts, count, hidden = vectors.shape
    kept = min(sparsity, atoms, hidden)  # past H nonzeros a code gains nothing: H independent atoms span R^H
    if kept < sparsity:
        log.warning("ksvd_experts: sparsity %d capped at %d (atoms %d, hidden size %d)", sparsity, kept, atoms, hidden)
    signals = vectors.reshape(experts * count, hidden).double()
    dictionary, indices, values, errors = learn_dictionary(signals, atoms, kept, iterations, seed, tolerance)
    final = float((signals - reconstruct(indices, values, dictionary)).norm() / signals.norm().clamp_min(1e-300))
    index_dtype = "int16" if atoms <= torch.iinfo(torch.int16).max + 1 else "int32"
    stored_indices = indices.reshape(experts, count, kept).to(getattr(torch, index_dtype))
    tensors = (dictionary.to(matrices.dtype).contiguous(),
               values.reshape(experts, count, kept).to(matrices.dtype).contiguous(), stored_indices.contiguous())
    facts = {
        "hidden_side": hidden_side,
        "atoms": atoms,
        "sparsity": kept,
        "iterations": len(errors) - 1,
        "weight_error": final,
        "weight_error_per_iteration": errors,
        "parameters_before": experts * count * hidden,
        "parameters_after": tensors[0].numel() + tensors[1].numel(),
        "index_dtype": index_dtype,
        "index_bytes": stored_indices.numel() * stored_indices.element_size(),
    }
    return tensors, {"atoms": atoms, "sparsity": kept, "index_dtype": index_dtype}, facts


def ksvd_experts(model, step: dict, context) -> dict:
    adapter = adapter_for(model.config)
    report = {"layers": {}}
    for layer, block in context.each_block(model):
        experts = adapter.experts_of(block)
        if stored_form_of(experts) is not None:
            raise ModelError(f"ksvd_experts: the experts of layer {layer} are already {stored_form_of(experts).what} "
                             f"({stored_form_of(experts).made_by}); code dense experts")
        transposed = getattr(experts, "is_transposed", False)
        tensors, specs, layer_report = {}, {}, {}
        # the hidden-size side: the input of the first projection, the output of the second
        for name, hidden_side in zip(adapter.expert_matrices, ("input", "output")):
            stored = getattr(experts, name).data
            matrices = stored.transpose(-1, -2) if transposed else stored  # nn.Linear orientation [E, out, in]
            tensors[name], specs[name], layer_report[name] = code_matrices(
                matrices, hidden_side, step["atoms"], step["sparsity"], step["iterations"], step["seed"],
                step["tolerance"])
            facts = layer_report[name]
            if facts["parameters_after"] >= facts["parameters_before"]:
                log.warning("layer %d %s: %d atoms, sparsity %d store %d parameters, not fewer than the dense %d",
                            layer, name, facts["atoms"], facts["sparsity"], facts["parameters_after"],
                            facts["parameters_before"])
        convert_to_dictionary(experts, tensors, specs, adapter.expert_matrices)
        report["layers"][str(layer)] = layer_report
        log.info("layer %d: %s", layer, {name: (r["atoms"], r["sparsity"], r["iterations"], round(r["weight_error"], 4))
                                         for name, r in layer_report.items()})
    return report


def _ksvd_options(step: dict) -> Problem | None:
    if step["sparsity"] > step["atoms"]:
        return Problem("sparsity", f"{step['sparsity']} nonzeros per code need at least as many atoms (atoms: "
                                   f"{step['atoms']})")
    return None


def _inspect(adapter) -> str:
    return f"factor {expert_matrices(adapter)} (over a learned dictionary); remote code"


METHODS = (Method("ksvd_experts", ksvd_experts, frozenset({EXPERT_FACTORS}), check_options=_ksvd_options,
                  inspect=_inspect),)
