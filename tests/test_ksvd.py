"""Dictionary-coded experts (ksvd_experts): Batch-OMP agrees with a plain one-signal-at-a-time OMP and recovers
exact sparse combinations, K-SVD never raises the error, full settings keep the model, the coded forward equals
the dense forward of the rebuilt weights, parameter counts are the saved tensors', checkpoints (whole-model and
per-layer) round-trip, and later expert edits are refused."""

import itertools

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import (
    all_tensors,
    assert_same_model,
    context_with_inputs,
    logits,
    make_tokenizer,
    per_layer_checkpoint,
    saved_tensor_count,
    tiny_model_of,
    validated_step,
    validated_steps,
    whole_model_checkpoint,
)
from moe_compress.architectures import adapter_for
from moe_compress.cache import build_cache
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.ksvd import batch_omp, learn_dictionary, reconstruct, update_dictionary
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.remote_code.moe_compress_layers import dictionary_names, is_dictionary_coded, is_low_rank
from moe_compress.streaming import LayerStream

pytestmark = pytest.mark.numeric

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def ksvd_step(**options):
    return validated_step("ksvd_experts", **options)


def unit_columns(rows, columns, seed):
    matrix = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return matrix / matrix.norm(dim=0)


# --- the algorithm ---------------------------------------------------------------------------------------

def reference_omp(signal: np.ndarray, dictionary: np.ndarray, sparsity: int) -> tuple[list[int], np.ndarray]:
    """Textbook OMP of one signal: the atom most correlated with the residual joins, least squares on the support."""
    residual, support = signal.copy(), []
    for _ in range(sparsity):
        scores = np.abs(dictionary.T @ residual)
        scores[support] = -1
        support.append(int(np.argmax(scores)))
        coefficients = np.linalg.lstsq(dictionary[:, support], signal, rcond=None)[0]
        residual = signal - dictionary[:, support] @ coefficients
    return support, coefficients


def test_batch_omp_is_textbook_omp_signal_by_signal():
    dictionary = unit_columns(16, 40, seed=0)
    signals = torch.randn(50, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    indices, values = batch_omp(signals, dictionary, sparsity=5)
    for row in range(len(signals)):
        support, coefficients = reference_omp(signals[row].numpy(), dictionary.numpy(), 5)
        assert indices[row].tolist() == support
        np.testing.assert_allclose(values[row].numpy(), coefficients, rtol=1e-9, atol=1e-12)


def test_batch_omp_recovers_exact_sparse_combinations():
    dictionary = unit_columns(64, 48, seed=2)  # random atoms in R^64: nearly orthogonal, so OMP recovers
    generator = torch.Generator().manual_seed(3)
    support = torch.stack([torch.randperm(48, generator=generator)[:3] for _ in range(20)])
    coefficients = (torch.rand(20, 3, generator=generator, dtype=torch.float64) + 0.5) * torch.tensor([1.0, -1.0, 2.0])
    signals = torch.einsum("ns,nsh->nh", coefficients, dictionary.mT[support])
    indices, values = batch_omp(signals, dictionary, sparsity=3)
    found = torch.zeros(20, 48, dtype=torch.float64).scatter_(1, indices, values)
    expected = torch.zeros(20, 48, dtype=torch.float64).scatter_(1, support, coefficients)
    torch.testing.assert_close(found, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(reconstruct(indices, values, dictionary), signals)


def sparse_signals(count=300, hidden=24, atoms=40, sparsity=3, noise=0.05, seed=4):
    """Signals made of ``sparsity`` atoms of a hidden dictionary, plus noise: something K-SVD can learn."""
    generator = torch.Generator().manual_seed(seed)
    truth = unit_columns(hidden, atoms, seed)
    support = torch.stack([torch.randperm(atoms, generator=generator)[:sparsity] for _ in range(count)])
    values = torch.randn(count, sparsity, generator=generator, dtype=torch.float64)
    clean = torch.einsum("ns,nsh->nh", values, truth.mT[support])
    return clean + noise * torch.randn(clean.shape, generator=generator, dtype=torch.float64)


def test_an_atom_sweep_never_raises_the_error_and_keeps_the_residual_current():
    signals = sparse_signals()
    dictionary = unit_columns(24, 40, seed=9)
    indices, values = batch_omp(signals, dictionary, 3)
    residual = signals - reconstruct(indices, values, dictionary)
    for _ in range(3):
        before = float(residual.norm())
        update_dictionary(dictionary, indices, values, residual)
        assert float(residual.norm()) <= before * (1 + 1e-12)
        torch.testing.assert_close(residual, signals - reconstruct(indices, values, dictionary))
        torch.testing.assert_close(dictionary.norm(dim=0), torch.ones(40, dtype=torch.float64))


@pytest.mark.parametrize("atoms", [16, 40], ids=["undercomplete", "overcomplete"])
def test_ksvd_error_never_rises_and_the_result_is_what_it_reports(atoms):
    signals = sparse_signals()
    dictionary, indices, values, errors = learn_dictionary(signals, atoms, 3, iterations=8, seed=0)
    assert len(errors) == 9 and all(later <= earlier * (1 + 1e-12) for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 0.9 * errors[0]  # it learns
    final = (signals - reconstruct(indices, values, dictionary)).norm() / signals.norm()
    assert float(final) == pytest.approx(errors[-1], rel=1e-9)
    assert dictionary.shape == (24, atoms) and indices.shape == values.shape == (300, 3)
    assert all(len(set(row)) == 3 for row in indices.tolist())  # an atom at most once per code
    again = learn_dictionary(signals, atoms, 3, iterations=8, seed=0)
    assert torch.equal(again[0], dictionary) and torch.equal(again[1], indices)  # deterministic
    if atoms > 24:  # the atoms past the hidden size are drawn with the seed
        assert not torch.equal(learn_dictionary(signals, atoms, 3, iterations=0, seed=1)[0][:, 24:],
                               learn_dictionary(signals, atoms, 3, iterations=0, seed=0)[0][:, 24:])


def test_full_settings_code_exactly_and_stop_at_once():
    signals = torch.randn(100, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dictionary, indices, values, errors = learn_dictionary(signals, 12, 12, iterations=10, seed=0)
    assert errors == [pytest.approx(0, abs=1e-11)]  # a complete orthonormal start: exact at the first coding
    torch.testing.assert_close(reconstruct(indices, values, dictionary), signals, rtol=1e-10, atol=1e-10)


# --- the method on models ---------------------------------------------------------------------------------

# qwen3_moe: plain layout; gpt_oss: transposed storage, interleaved gate/up with biases; deepseek_v3: shared
# expert, groups, a dense first layer
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_full_settings_keep_the_model(model_type, device):
    model = tiny_model_of(model_type).to(device)
    expected = logits(model, IDS)
    hidden = model.config.hidden_size
    report = apply_steps(model, [ksvd_step(atoms=hidden, sparsity=hidden)], CompressionContext.for_model(model))[0]
    adapter = adapter_for(model.config)
    assert all(is_dictionary_coded(adapter.experts_of(block)) and is_low_rank(adapter.experts_of(block))
               for block in adapter.moe_blocks(model).values())
    for matrices in report["layers"].values():
        for facts in matrices.values():
            assert facts["weight_error"] < 1e-10 and facts["iterations"] == 0 and facts["sparsity"] == hidden
    # the weights are kept to float32 rounding; the logits then agree to the float32 forward's tolerance
    torch.testing.assert_close(logits(model, IDS), expected, rtol=1e-4, atol=1e-4)


def saved_layer_tensors(path, layer, name):
    """(dictionary + values elements, index bytes) of one layer's matrix in a saved checkpoint."""
    atoms, values, indices = dictionary_names(name)
    with safe_open(path / "model.safetensors", "pt") as handle:
        prefix = f"model.layers.{layer}.mlp.experts."
        index = handle.get_tensor(prefix + indices)
        assert index.dtype == torch.int16
        return (handle.get_tensor(prefix + atoms).numel() + handle.get_tensor(prefix + values).numel(),
                index.numel() * index.element_size())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_reduced_settings_shrink_the_checkpoint_and_it_reloads(tmp_path, model_type, tokenizer, device):
    model = tiny_model_of(model_type).to(device)
    before = sum(p.numel() for p in model.parameters())
    report = apply_steps(model, [ksvd_step(atoms=24, sparsity=4, iterations=3)],
                         context_with_inputs(model, device=device))[0]
    assert all(0 < error < 1.5 for error in report["reconstruction_error"].values())
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["loader"] == "remote_code" and record["low_rank_per_layer"] == {}
    assert record["dictionary_per_layer"]["0"] == {name: {"atoms": 24, "sparsity": 4, "index_dtype": "int16"}
                                                   for name in ("gate_up_proj", "down_proj")}
    # the checkpoint's count is every stored element (the int16 indices too); each layer's report counts the
    # dictionary and the values as parameters and the indices in bytes
    assert record["parameters"] == saved_tensor_count(tmp_path / "ckpt") < before
    for layer, matrices in report["layers"].items():
        for name, facts in matrices.items():
            assert 1 <= facts["iterations"] <= 3 and facts["atoms"] == 24 and facts["sparsity"] == 4
            assert facts["parameters_after"] < facts["parameters_before"]
            assert saved_layer_tensors(tmp_path / "ckpt", layer, name) == (facts["parameters_after"],
                                                                           facts["index_bytes"])
    # the same tensors, bit for bit (indices in their int16), and the same float32 logits
    assert_same_model(load_model(tmp_path / "ckpt", device=str(device)), model, IDS)
    if model_type == "qwen3_moe":  # with transformers alone, from the checkpoint's own modeling files
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).to(device).eval()
        assert_same_model(reloaded, model, IDS)


def dense_linear(experts, name):
    """Matrix ``name`` of every expert [E, out, in] (nn.Linear orientation), rebuilt from the codes."""
    dense = getattr(experts, name)  # the property: the stock storage orientation
    return dense.mT if getattr(experts, "is_transposed", False) else dense


def dense_loop(experts, hidden, index, weights):
    """The experts' output one token and slot at a time, in float64, from the rebuilt dense matrices."""
    gate_up, down = experts.dictionary_matrices
    dense = {name: dense_linear(experts, name).double() for name in (gate_up, down)}
    bias = {name: getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
            for name in (gate_up, down)}
    output = torch.zeros(hidden.shape, dtype=torch.float64)
    for token in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            expert = int(index[token, slot])
            if expert == experts.num_experts:
                continue
            y = dense[gate_up][expert] @ hidden[token].double()
            if bias[gate_up] is not None:
                y = y + bias[gate_up][expert].double()
            y = dense[down][expert] @ experts._apply_gate(y)
            if bias[down] is not None:
                y = y + bias[down][expert].double()
            output[token] += float(weights[token, slot]) * y
    return output


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("kernel", [True, False], ids=["grouped_mm", "no_grouped_mm"])
def test_coded_forward_equals_the_dense_forward_of_the_rebuilt_weights(model_type, kernel, monkeypatch):
    if not kernel:
        monkeypatch.delattr(torch.nn.functional, "grouped_mm")
    model = tiny_model_of(model_type)
    adapter = adapter_for(model.config)
    apply_steps(model, [ksvd_step(atoms=40, sparsity=3, iterations=1)], CompressionContext.for_model(model))
    experts = adapter.experts_of(adapter.moe_blocks(model)[0])
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(24, model.config.hidden_size, generator=generator)
    # only experts 1, 4 and 6 routed (the others' codes are never expanded), some slots skipped, token 5 entirely
    index = torch.tensor([1, 4, 6])[torch.randint(0, 3, (24, 2), generator=generator)]
    weights = torch.rand(24, 2, generator=generator)
    skipped = torch.rand(24, 2, generator=generator) < 0.3
    skipped[5] = True
    index, weights = torch.where(skipped, experts.num_experts, index), torch.where(skipped, 0.0, weights)
    with torch.no_grad():
        output = experts(hidden, index, weights)
        reference = dense_loop(experts, hidden, index, weights)
    assert torch.all(output[5] == 0)
    # float32: a few roundings of 6e-8 in short sums; a wrong expert, code, atom or bias is of order 1
    torch.testing.assert_close(output.double(), reference, rtol=1e-5, atol=2e-6 * float(reference.abs().max()))
    with torch.no_grad():  # no routed slot at all
        assert torch.equal(experts(hidden, torch.full_like(index, experts.num_experts), weights * 0),
                           torch.zeros_like(hidden))


def test_output_scaling_reaches_every_coded_expert():
    model = tiny_model_of("gpt_oss")  # with a down bias, which is scaled too
    adapter = adapter_for(model.config)
    apply_steps(model, [ksvd_step(atoms=24, sparsity=4, iterations=1)], CompressionContext.for_model(model))
    block = adapter.moe_blocks(model)[0]
    experts = adapter.experts_of(block)
    hidden = torch.randn(10, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    index = torch.randint(0, experts.num_experts, (10, 2), generator=torch.Generator().manual_seed(8))
    weights = torch.rand(10, 2, generator=torch.Generator().manual_seed(9))
    scale = torch.linspace(0.5, 2.0, model.config.hidden_size)
    with torch.no_grad():
        before = experts(hidden, index, weights)
        adapter.scale_expert_outputs(block, scale)
        torch.testing.assert_close(experts(hidden, index, weights), before * scale)


def test_later_expert_edits_are_refused():
    model = tiny_model_of("qwen3_moe")
    apply_steps(model, [ksvd_step(atoms=8, sparsity=2, iterations=0)], CompressionContext.for_model(model))
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[0]
    assert adapter.block_num_experts(block) == 8
    with pytest.raises(ModelError, match="already factored; put expert pruning"):
        adapter.select_experts(block, torch.arange(4))
    with pytest.raises(ModelError, match="already factored"):
        apply_steps(model, [ksvd_step(atoms=8, sparsity=2)], CompressionContext.for_model(model))
    with pytest.raises(ConfigError, match=r"steps\[1\].method': frequency_prune cannot follow the low-rank step steps\[0\]"):
        validated_steps({"method": "ksvd_experts", "atoms": 8, "sparsity": 2},
                        {"method": "frequency_prune", "min_count": 1})
    with pytest.raises(ConfigError, match=r"steps\[1\].method': svd_experts cannot follow"):
        validated_steps({"method": "ksvd_experts", "atoms": 8, "sparsity": 2}, {"method": "svd_experts", "rank": 2})
    with pytest.raises(ConfigError, match=r"steps\[0\].sparsity': 9 nonzeros per code need at least as many atoms"):
        ksvd_step(atoms=8, sparsity=9)
    with pytest.raises(ConfigError, match=r"steps\[0\].atoms': missing, and required"):
        validated_step("ksvd_experts", sparsity=2)


def test_creates_nothing_on_the_default_device():
    model = tiny_model_of("gpt_oss")
    with torch.device("meta"):  # a tensor made without naming its device would land here
        apply_steps(model, [ksvd_step(atoms=40, sparsity=3, iterations=1)], CompressionContext.for_model(model))
    assert all(not tensor.is_meta for tensor in model.state_dict().values())


def test_per_layer_jobs_save_what_the_whole_model_job_saves(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model_of("qwen3_moe").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    build_cache(LayerStream(model_dir), torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0)),
                4, tmp_path / "cache")
    steps = validated_steps({"method": "ksvd_experts", "atoms": 24, "sparsity": 3, "iterations": 2})
    whole = whole_model_checkpoint(model_dir, tmp_path / "cache", None, steps, tmp_path / "whole")
    layered = per_layer_checkpoint(model_dir, tmp_path / "cache", None, steps, tmp_path / "parts", tmp_path / "layered")
    ours, theirs = all_tensors(tmp_path / "layered"), all_tensors(tmp_path / "whole")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert layered == whole and whole["dictionary_per_layer"]["2"]["down_proj"]["atoms"] == 24
    table = (tmp_path / "whole" / "dictionary.csv").read_text()
    assert table == (tmp_path / "layered" / "dictionary.csv").read_text() and len(table.splitlines()) == 1 + 2 * 2
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "layered")(IDS).logits, load_model(tmp_path / "whole")(IDS).logits)
