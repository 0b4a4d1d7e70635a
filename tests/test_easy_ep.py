"""EASY-EP saliency, peak outputs and per-neuron peaks against token-by-token references written from their
definitions, on a tiny Qwen3-MoE (routed experts only) and a tiny Qwen2-MoE (a gated shared expert beside them,
which EASY-EP leaves out); easy_ep_prune; re-weighting; and a cache without the residual stream."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_model_of, validated_step, validated_steps
from moe_compress.architectures import adapter_for
from moe_compress.cache import CacheReader, build_cache, build_residual_cache, read_router_cache
from moe_compress.config import validate_config
from moe_compress.errors import DataError, ModelError
from moe_compress.methods import CompressionContext
from moe_compress.methods.easy_ep import easy_ep_prune
from moe_compress.plan import WorkflowPlan
from moe_compress.stats import (
    expert_frequency_by_source,
    expert_statistics,
    neuron_peaks_tensors,
    read_neuron_peaks,
    reweighted_statistics,
)

pytestmark = pytest.mark.numeric

SAMPLE_SOURCES = ["web", "code", "web", "code"]
SEQ_LEN = 12


def _model(model_type: str):
    model = tiny_model_of(model_type)
    adapter = adapter_for(model.config)
    with torch.no_grad():  # the random init's tiny experts barely turn the stream: make the turn measurable
        for block in adapter.moe_blocks(model).values():
            for name in adapter.expert_matrices:
                getattr(adapter.experts_of(block), name).mul_(8.0)
            for name in adapter.shared_modules:  # and the shared expert as large, so leaving it out shows
                for parameter in getattr(block, name).parameters():
                    parameter.mul_(8.0)
    return model


def _reference_capture(model, input_ids):
    """{layer: (x, h)} from one plain forward, with hooks written here: x the MoE block's input, h the decoder
    layer's input plus its attention output (the stream the MoE output is added to, not read from any norm)."""
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    seen, handles = {}, []
    for index, block in adapter.moe_blocks(model).items():
        layer = layers[index]
        entry = seen.setdefault(index, {})
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs, entry=entry: entry.__setitem__(
                "layer_input", (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(
            lambda module, args, output, entry=entry: entry.__setitem__("attention", output[0].detach())))
        handles.append(block.register_forward_pre_hook(
            lambda module, args, entry=entry: entry.__setitem__("x", args[0].detach())))
    with torch.no_grad():
        model(input_ids=input_ids)
    for handle in handles:
        handle.remove()
    hidden = model.config.hidden_size
    return {index: (entry["x"].reshape(-1, hidden).double(),
                    (entry["layer_input"] + entry["attention"]).reshape(-1, hidden).double())
            for index, entry in seen.items()}


@torch.no_grad()
def _reference_layer(model, block, x, h, token_source, include_shared=False):
    """Token by token, from the definitions: EASY-EP's score (also per source), each expert's peak |output|
    and its per-neuron peak |activation|, the experts and the router computed by hand in float64."""
    config = model.config
    experts = block.experts
    gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()  # [E, 2I, H], [E, H, I]
    num_experts, width = down.shape[0], down.shape[-1]
    probs = torch.softmax(x @ block.gate.weight.double().T, dim=-1)
    top_weights, top_experts = probs.topk(config.num_experts_per_tok, dim=-1)
    if config.norm_topk_prob:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    score = np.zeros((2, num_experts))
    peak = np.zeros(num_experts)
    neuron_peak = np.zeros((num_experts, width))
    for t in range(len(x)):
        outputs, routed = [], torch.zeros_like(x[t])
        for k in range(top_experts.shape[1]):
            expert, weight = int(top_experts[t, k]), float(top_weights[t, k])
            gate, up = (gate_up[expert] @ x[t]).split(width)
            activation = torch.nn.functional.silu(gate) * up
            output = down[expert] @ activation
            outputs.append((expert, weight, output))
            routed = routed + weight * output
            peak[expert] = max(peak[expert], float(output.abs().max()))
            neuron_peak[expert] = np.maximum(neuron_peak[expert], activation.abs().numpy())
        if include_shared:
            shared = block.shared_expert
            shared_out = shared.down_proj.weight.double() @ (
                torch.nn.functional.silu(shared.gate_proj.weight.double() @ x[t]) * (shared.up_proj.weight.double() @ x[t]))
            routed = routed + torch.sigmoid(block.shared_expert_gate.weight.double() @ x[t]) * shared_out
        after = h[t] + routed
        cosine = float(h[t] @ after / (h[t].norm() * after.norm()))
        turn = max(1.0 - cosine, 0.0)
        for expert, weight, output in outputs:
            score[token_source[t], expert] += weight * float(output.norm()) * turn
    return score, peak, neuron_peak


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def measured(request, tmp_path_factory):
    model = _model(request.param)
    input_ids = torch.randint(0, 300, (len(SAMPLE_SOURCES), SEQ_LEN), generator=torch.Generator().manual_seed(3))
    cache_dir = tmp_path_factory.mktemp("cache") / "cache"
    meta = {"samples": len(input_ids), "seq_len": SEQ_LEN, "sample_sources": SAMPLE_SOURCES}
    build_cache(model, input_ids, len(input_ids), cache_dir, meta)  # one batch, as the reference
    build_residual_cache(model, input_ids, len(input_ids), cache_dir.with_name("residual"))
    reader, residual = CacheReader(cache_dir), CacheReader(cache_dir.with_name("residual"))
    names, token_source = reader.token_sources(input_ids.numel())
    statistics = expert_statistics(model, reader.moe_inputs(), names, token_source, residual.residuals())
    return model, input_ids, reader, names, token_source, statistics


def test_statistics_equal_the_token_by_token_reference(measured):
    # float32 expert runs against a float64 reference: agreement to float32 rounding, amplified at most a little
    # by 1 - cos (well away from 0 with the scaled experts)
    model, input_ids, reader, names, token_source, statistics = measured
    adapter = adapter_for(model.config)
    residual = CacheReader(reader.directory.with_name("residual"))
    captured = _reference_capture(model, input_ids)
    for layer, block in adapter.moe_blocks(model).items():
        x, h = captured[layer]
        torch.testing.assert_close(residual.residual(layer).double(), h, rtol=1e-5, atol=1e-6)
        score, peak, neuron_peak = _reference_layer(model, block, x, h, token_source)
        totals = statistics.totals[statistics.totals["layer"] == layer].sort_values("expert")
        assert (score.sum(axis=0) > 0).sum() >= 4  # enough routed experts for the comparison to mean something
        np.testing.assert_allclose(totals["easy_ep_saliency"], score.sum(axis=0), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(totals["peak_output"], peak, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(statistics.neuron_peaks[layer].numpy(), neuron_peak, rtol=1e-5, atol=1e-7)
        for index, name in enumerate(names):
            rows = statistics.by_source[(statistics.by_source["source"] == name)
                                        & (statistics.by_source["layer"] == layer)].sort_values("expert")
            np.testing.assert_allclose(rows["easy_ep_saliency"], score[index], rtol=1e-4, atol=1e-9)
        if model.config.model_type == "qwen2_moe":  # the shared expert is left out of r, and that matters
            with_shared, _, _ = _reference_layer(model, block, x, h, token_source, include_shared=True)
            assert not np.allclose(totals["easy_ep_saliency"], with_shared.sum(axis=0), rtol=1e-2)


def test_neuron_peaks_file_round_trip(measured, tmp_path):
    statistics = measured[-1]
    save_file(neuron_peaks_tensors(statistics.neuron_peaks), str(tmp_path / "neuron_peaks.safetensors"))
    read = read_neuron_peaks(tmp_path / "neuron_peaks.safetensors")
    assert list(read) == sorted(statistics.neuron_peaks)
    for layer, peaks in read.items():
        assert peaks.dtype == torch.float32 and torch.equal(peaks, statistics.neuron_peaks[layer])


def test_reweighting_to_the_token_shares_gives_the_totals(measured):
    model, _ids, reader, names, token_source, statistics = measured
    by_source = expert_frequency_by_source(reader.routing(), names, token_source).merge(
        statistics.by_source, on=["source", "layer", "expert"], validate="one_to_one")
    summed = statistics.by_source.groupby(["layer", "expert"])["easy_ep_saliency"].sum().to_numpy()
    totals = statistics.totals.set_index(["layer", "expert"]).sort_index()
    np.testing.assert_allclose(summed, totals["easy_ep_saliency"], rtol=1e-12)
    shares = {name: SAMPLE_SOURCES.count(name) / len(SAMPLE_SOURCES) for name in names}
    reweighted = reweighted_statistics(by_source, shares).set_index(["layer", "expert"]).sort_index()
    for column in ("easy_ep_saliency", "peak_output"):
        np.testing.assert_allclose(reweighted[column], totals[column], rtol=1e-12, err_msg=column)
    # one source alone: its sum scaled to every cached token, its own peaks
    web = by_source[by_source["source"] == "web"].set_index(["layer", "expert"]).sort_index()
    alone = reweighted_statistics(by_source, {"web": 1.0}).set_index(["layer", "expert"]).sort_index()
    np.testing.assert_allclose(alone["easy_ep_saliency"], web["easy_ep_saliency"] * 2, rtol=1e-12)
    np.testing.assert_allclose(alone["peak_output"], web["peak_output"], rtol=0)


def test_easy_ep_prune_keeps_the_highest_scores(measured):
    model, input_ids, _reader, _names, token_source, statistics = measured
    adapter = adapter_for(model.config)
    captured = _reference_capture(model, input_ids)
    expected = {}
    for layer, block in adapter.moe_blocks(model).items():
        score, _, _ = _reference_layer(model, block, *captured[layer], token_source)
        expected[str(layer)] = sorted(np.argsort(-score.sum(axis=0), kind="stable")[:3].tolist())
    pruned = tiny_model_of(model.config.model_type)  # any weights: the step reads the scores alone
    context = CompressionContext.for_model(pruned, stats=statistics.totals)
    report = easy_ep_prune(pruned, validated_step("easy_ep_prune", keep=3), context)
    assert report["kept_original_ids"] == expected and report["score"] == "easy_ep_saliency"
    for block in adapter.moe_blocks(pruned).values():
        assert adapter.block_num_experts(block) == 3


def test_without_the_residual_stream_the_column_is_absent_and_the_step_says_why(tmp_path):
    model = tiny_model_of("qwen3_moe")
    build_cache(model, torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0)), 2, tmp_path / "c")
    reader = CacheReader(tmp_path / "c")
    assert not reader.has_residual
    with pytest.raises(DataError, match="holds no residual stream"):
        reader.residual(0)
    names, token_source = reader.token_sources(16)
    statistics = expert_statistics(model, reader.moe_inputs(), names, token_source)
    assert "easy_ep_saliency" not in statistics.totals and "easy_ep_saliency" not in statistics.by_source
    assert "peak_output" in statistics.totals
    with pytest.raises(ModelError, match=r"easy_ep_saliency column .* residual stream .* easy_ep_stats"):
        easy_ep_prune(model, validated_step("easy_ep_prune", keep=4),
                      CompressionContext.for_model(model, stats=statistics.totals))


def test_the_planner_names_the_variants_that_need_the_residual_stream():
    plan = WorkflowPlan.from_config(validate_config({"model": {"path": "demo"}, "calibration": {}, "variants": {
        "ranked": {"steps": [{"method": "easy_ep_prune", "keep": 4}]},
        "reap": {"steps": [{"method": "reap_prune", "keep": 4}]}}}))
    assert plan.residual_variants == {"ranked"}
    assert validated_steps({"method": "easy_ep_prune", "target": {"experts_fraction": 0.5},
                            "allocation": "global"})[0]["allocation"] == "global"
