"""factorize (svd_experts' factorisation) against an independent reference: numpy's SVD in float64 of the same
matrices. Its error must be the Eckart-Young optimum, sqrt(sum of the discarded s^2) / ||W||, within 1e-3 (relative
Frobenius), per expert and with a shared input or output basis; full rank reproduces the matrices; the energy mode
picks the rank the exact spectrum gives; and the facts describe the factors returned."""

import numpy as np
import pytest
import torch

from helpers import DEVICES
from moe_compress.methods import low_rank
from moe_compress.methods.common import energy_rank
from moe_compress.methods.low_rank import _leading_eigenvectors, _orthonormalize, factorize

pytestmark = pytest.mark.numeric

TOLERANCE = 1e-3  # on the relative Frobenius error, as the fast factorisation promises


@pytest.fixture(autouse=True)
def one_thread():
    """These matrices are tiny: one thread runs them in microseconds, where two contending threads take milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["cpu", "cuda"])
def eigh_rule(request, monkeypatch):
    """Where the full eigendecomposition takes over from the iteration: CPU's rule, or the GPU's (the iteration up
    to larger ranks), both run here on CPU so the iteration is tested at the ranks a GPU would use it for."""
    rules = low_rank._FULL_EIGH_FROM
    monkeypatch.setattr(low_rank, "_FULL_EIGH_FROM", {**rules, "cpu": rules[request.param]})
    return request.param


def spectrum_matrices(experts, rows, cols, singular, seed=0, dtype=torch.float64):
    """[experts, rows, cols] with the given singular values (padded with zeros), random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    count = min(rows, cols)
    values = torch.zeros(count, dtype=torch.float64)
    values[: len(singular)] = torch.as_tensor(singular, dtype=torch.float64)[:count]
    u = torch.linalg.qr(torch.randn(experts, rows, count, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(experts, cols, count, generator=generator, dtype=torch.float64)).Q
    scale = 1 + torch.rand(experts, 1, generator=generator, dtype=torch.float64)  # experts of unlike norms
    return ((u * (values * scale)[:, None, :]) @ v.mT).to(dtype)


def kind_of(kind, experts, rows, cols, seed=0, dtype=torch.float64):
    count = min(rows, cols)
    index = torch.arange(1, count + 1, dtype=torch.float64)
    if kind == "gaussian":  # slow decay (Marchenko-Pastur), like trained expert weights
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(experts, rows, cols, generator=generator, dtype=torch.float64).to(dtype)
    if kind == "spiked":  # a few strong directions over a flat floor
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(experts, rows, cols, generator=generator, dtype=torch.float64)
        spikes = torch.randn(experts, rows, 4, generator=generator, dtype=torch.float64) @ torch.randn(
            experts, 4, cols, generator=generator, dtype=torch.float64)
        return (noise + spikes).to(dtype)
    singular = {
        "fast": 0.7**index,  # fast decay, down to ~1e-10
        "slow": index**-0.3,  # slow power-law decay
        # repeated values, a cliff and exact zeros: a numerically rank-deficient Gram
        "repeated": torch.cat([torch.full((6,), 5.0), torch.full((6,), 2.0), torch.full((4,), 1e-9),
                               torch.zeros(max(0, count - 16))])[:count],
    }[kind]
    return spectrum_matrices(experts, rows, cols, singular, seed, dtype)


def reference(matrices, shared):
    """The exact singular values of what the factorisation decomposes: each expert, or the stacked experts."""
    weights = matrices.double().numpy()
    experts, rows, cols = weights.shape
    if shared is None:
        return np.linalg.svd(weights, compute_uv=False)  # [E, min(rows, cols)]
    if shared == "right":
        return np.linalg.svd(weights.reshape(experts * rows, cols), compute_uv=False)
    return np.linalg.svd(weights.transpose(1, 0, 2).reshape(rows, experts * cols), compute_uv=False)


def optimal_error(singular, rank):
    squared = singular**2
    return float(np.sqrt(squared[..., rank:].sum() / squared.sum()))


def true_error(matrices, left, right):
    weights = matrices.double()
    return float((weights - left.double() @ right.double()).norm() / weights.norm())


def check_contract(matrices, left, right, facts, shared, rank):
    experts, rows, cols = matrices.shape
    assert left.shape == (1 if shared == "left" else experts, rows, rank)
    assert right.shape == (1 if shared == "right" else experts, rank, cols)
    assert left.dtype == right.dtype == matrices.dtype and left.device == right.device == matrices.device
    assert left.is_contiguous() and right.is_contiguous()
    assert facts["rank"] == rank
    assert facts["parameters_before"] == matrices.numel()
    assert facts["parameters_after"] == left.numel() + right.numel()


SHAPES = {"wide": (4, 64, 112), "tall": (4, 112, 64)}
KINDS = ["gaussian", "spiked", "fast", "slow", "repeated"]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("shared", [None, "right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_error_is_the_truncated_svds_at_every_rank(kind, shared, shape, eigh_rule):
    matrices = kind_of(kind, *SHAPES[shape])
    singular = reference(matrices, shared)
    count = singular.shape[-1]
    # ranks through both paths: the subspace iteration (small r) and the full eigendecomposition (r near full)
    for rank in sorted({1, 4, 8, 20, 28, count // 2, count - 3, count}):
        left, right, facts = factorize(matrices, rank=rank, energy=None, shared=shared)
        check_contract(matrices, left, right, facts, shared, rank)
        optimum = optimal_error(singular, rank)
        assert facts["weight_error"] == pytest.approx(optimum, abs=TOLERANCE), (rank, facts)
        assert facts["weight_error"] >= optimum - 1e-9  # nothing beats the optimum: the error is measured, not assumed
        # the facts describe the factors returned
        assert facts["weight_error"] == pytest.approx(true_error(matrices, left, right), abs=1e-12)
        assert facts["energy_kept"] == pytest.approx(1 - facts["weight_error"] ** 2, abs=1e-9)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("shared", [None, "right", "left"])
def test_full_rank_reproduces_the_matrices(shared, shape):
    for kind in ("gaussian", "repeated"):
        matrices = kind_of(kind, *SHAPES[shape], seed=3)
        full = reference(matrices, shared).shape[-1]
        left, right, facts = factorize(matrices, rank=full + 5, energy=None, shared=shared)  # capped at full rank
        assert facts["rank"] == full
        torch.testing.assert_close(left @ right, matrices, rtol=0, atol=1e-12 * float(matrices.abs().max()))
        assert facts["weight_error"] < 1e-12 and facts["energy_kept"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shared", [None, "right", "left"])
@pytest.mark.parametrize("kind", ["gaussian", "fast", "slow", "repeated"])
def test_energy_picks_the_rank_of_the_exact_spectrum(kind, shared, eigh_rule):
    matrices = kind_of(kind, 4, 40, 64, seed=5)
    singular = reference(matrices, shared)
    for energy in (0.3, 0.5, 0.8, 0.9, 0.99, 0.999):
        expected = energy_rank(torch.from_numpy(singular), energy)
        left, right, facts = factorize(matrices, rank=None, energy=energy, shared=shared)
        assert facts["rank"] == expected, energy
        check_contract(matrices, left, right, facts, shared, expected)
        assert facts["energy_kept"] >= energy - TOLERANCE
        assert facts["weight_error"] == pytest.approx(optimal_error(singular, expected), abs=TOLERANCE)


@pytest.mark.parametrize("shared", [None, "right", "left"])
def test_bf16_weights_are_factorised_in_higher_precision(shared, eigh_rule):
    matrices = kind_of("spiked", 4, 64, 96, seed=7, dtype=torch.bfloat16)
    singular = reference(matrices, shared)  # of the bf16 values themselves
    for rank in (8, 24, 64):
        left, right, facts = factorize(matrices, rank=rank, energy=None, shared=shared)
        check_contract(matrices, left, right, facts, shared, rank)
        assert facts["weight_error"] == pytest.approx(optimal_error(singular, rank), abs=TOLERANCE)
        # the bf16 factors add only their own rounding (~3 significant digits) to the error
        assert true_error(matrices, left, right) == pytest.approx(facts["weight_error"], abs=2e-2)


def test_per_expert_factors_split_the_singular_values_evenly():
    singular = 2.0 ** -torch.arange(24, dtype=torch.float64)  # well separated: the singular vectors are defined
    for rows, cols in ((40, 64), (64, 40)):
        matrices = spectrum_matrices(3, rows, cols, singular, seed=11)
        exact = torch.linalg.svdvals(matrices)[:, :6]
        left, right, _ = factorize(matrices, rank=6, energy=None, shared=None)
        torch.testing.assert_close(left.norm(dim=-2), exact.sqrt(), rtol=1e-8, atol=0)
        torch.testing.assert_close(right.norm(dim=-1), exact.sqrt(), rtol=1e-8, atol=0)


def test_a_flat_spectrum_converges_too(eigh_rule):
    """The iteration's slowest case, a flat (Marchenko-Pastur) spectrum, at r / n from 1/12 to 1/3, held to 1e-4."""
    matrices = kind_of("gaussian", 2, 192, 256, seed=13)
    singular = reference(matrices, None)
    for rank in (16, 32, 64):
        _, _, facts = factorize(matrices, rank=rank, energy=None, shared=None)
        assert facts["weight_error"] == pytest.approx(optimal_error(singular, rank), abs=1e-4)


def test_a_shared_basis_wider_than_the_stacked_rows():
    """Fewer stacked rows than inputs: the input Gram is rank deficient, and the rank is capped at the stacked rows."""
    matrices = kind_of("gaussian", 2, 8, 64, seed=31)
    singular = reference(matrices, "right")
    for rank in (4, 10, 16, 20):
        left, right, facts = factorize(matrices, rank=rank, energy=None, shared="right")
        check_contract(matrices, left, right, facts, "right", min(rank, 16))
        assert facts["weight_error"] == pytest.approx(optimal_error(singular, min(rank, 16)), abs=TOLERANCE)
    torch.testing.assert_close(left @ right, matrices)


def test_both_eigenvector_paths_agree_with_eigh(monkeypatch):
    generator = torch.Generator().manual_seed(17)
    weights = torch.randn(3, 90, 120, generator=generator, dtype=torch.float64)
    gram = weights @ weights.mT
    values = torch.linalg.eigvalsh(gram).flip(-1)
    for rank, path in ((8, "iterated"), (60, "full")):
        sizes = []
        eigh = torch.linalg.eigh
        monkeypatch.setattr(torch.linalg, "eigh", lambda matrix: sizes.append(matrix.shape[-1]) or eigh(matrix))
        vectors = _leading_eigenvectors(gram, rank)
        monkeypatch.undo()
        assert (sizes == [90]) == (path == "full") and len(sizes) == 1
        torch.testing.assert_close(vectors.mT @ vectors, torch.eye(rank, dtype=torch.float64).expand(3, -1, -1))
        captured = (vectors.mT @ gram @ vectors).diagonal(dim1=-2, dim2=-1).sum(-1)
        assert torch.allclose(captured, values[:, :rank].sum(-1), rtol=1e-5)


def test_orthonormalisation_survives_ill_conditioned_and_rank_deficient_blocks():
    generator = torch.Generator().manual_seed(19)
    basis = torch.linalg.qr(torch.randn(2, 50, 12, generator=generator, dtype=torch.float64)).Q
    graded = basis * torch.logspace(0, -14, 12, dtype=torch.float64)  # condition 1e14
    deficient = basis.clone()
    deficient[..., 6:] = deficient[..., :6] @ torch.randn(6, 6, generator=generator, dtype=torch.float64)
    for block in (graded, deficient, torch.zeros(2, 50, 12, dtype=torch.float64)):
        result = _orthonormalize(block)
        torch.testing.assert_close(result.mT @ result, torch.eye(12, dtype=torch.float64).expand(2, -1, -1))
    # the range is kept: the well-conditioned block's columns lie in the result's span
    result = _orthonormalize(graded)
    torch.testing.assert_close(result @ (result.mT @ basis), basis)


def test_the_same_input_gives_the_same_factors_bit_for_bit():
    matrices = kind_of("gaussian", 3, 48, 80, seed=23)
    first = factorize(matrices, rank=8, energy=None, shared=None)
    torch.randn(10)  # the global generator is neither used nor disturbed
    second = factorize(matrices, rank=8, energy=None, shared=None)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    state = torch.random.get_rng_state()
    factorize(matrices, rank=8, energy=None, shared="right")
    assert torch.equal(state, torch.random.get_rng_state())


def test_unknown_shared_is_refused():
    with pytest.raises(ValueError, match="shared"):
        factorize(torch.zeros(2, 4, 4), rank=2, energy=None, shared="both")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [None, "right", "left"])
def test_factors_stay_on_the_weights_device(device, shared):
    matrices = kind_of("spiked", 4, 48, 80, seed=29).to(device)
    singular = reference(matrices.cpu(), shared)
    left, right, facts = factorize(matrices, rank=10, energy=None, shared=shared)
    check_contract(matrices, left, right, facts, shared, 10)
    assert facts["weight_error"] == pytest.approx(optimal_error(singular, 10), abs=TOLERANCE)


def test_zero_matrices_factor_to_zero():
    left, right, facts = factorize(torch.zeros(3, 40, 64, dtype=torch.float64), rank=4, energy=None, shared=None)
    assert not left.isnan().any() and not right.isnan().any() and (left @ right).abs().max() == 0
    assert facts["weight_error"] == 0.0

