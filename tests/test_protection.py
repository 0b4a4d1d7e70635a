"""protect: super_experts — a planted expert whose one neuron carries a massive activation on one token is found
by the Super Experts rule, and kept by every expert-count step, which without protection would remove it."""

import numpy as np
import pytest
import torch

from helpers import synthetic_inputs, tiny_qwen3_moe, validated_steps
from moe_compress.architectures import adapter_for
from moe_compress.cache import LayerRouting
from moe_compress.errors import ConfigError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.protection import outliers
from moe_compress.stats import expert_statistics, layer_frequency, with_saliency

pytestmark = pytest.mark.numeric

TOKENS = 192


def cached_inputs(model) -> dict[int, torch.Tensor]:
    adapter = adapter_for(model.config)
    return {layer: synthetic_inputs(TOKENS, model.config.hidden_size, seed=layer) for layer in adapter.moe_blocks(model)}


def routing_of(model, inputs) -> dict[int, LayerRouting]:
    adapter = adapter_for(model.config)
    routing = {}
    with torch.no_grad():
        for layer, block in adapter.moe_blocks(model).items():
            logits, weights, indices = adapter.call_router(block, inputs[layer])
            routing[layer] = LayerRouting(logits.numpy(), indices.numpy(), weights.numpy())
    return routing


def statistics(model, inputs):
    """The statistics table (frequency, REAP, peaks) and the neuron peaks, as the expert_stats job computes them."""
    adapter = adapter_for(model.config)
    routing = routing_of(model, inputs)
    frequency = pd_concat([layer_frequency(layer, routing[layer], adapter.scoring_for(model.config))
                           for layer in sorted(routing)])
    computed = expert_statistics(model, inputs, ["all"], np.zeros(TOKENS, dtype=np.int64))
    return with_saliency(frequency, computed.totals), computed.neuron_peaks


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def gate_and_up_rows(adapter, neuron: int, width: int) -> tuple[int, int]:
    if adapter.gate_up_layout == "interleaved":
        return 2 * neuron, 2 * neuron + 1
    return neuron, neuron + width


def plant_spike(model, inputs, layer: int, expert: int, token: int, gate_scale: float, down_value: float,
                silence_rest: bool) -> None:
    """Neuron 0 of ``expert`` reads the direction of ``token``'s input: its activation silu(c·s)·s, s = x·u, is
    largest by far on that token; it writes ``down_value`` times that into hidden channel 0."""
    adapter = adapter_for(model.config)
    experts = adapter.experts_of(adapter.moe_blocks(model)[layer])
    gate_up, down = experts.gate_up_proj.data, experts.down_proj.data  # [E, 2I, H], [E, H, I]
    width = down.shape[-1]
    direction = inputs[layer][token] / inputs[layer][token].norm()
    if silence_rest:
        gate_up[expert].zero_()
        down[expert].zero_()
    gate_row, up_row = gate_and_up_rows(adapter, 0, width)
    gate_up[expert, gate_row] = gate_scale * direction / inputs[layer][token].norm()
    gate_up[expert, up_row] = direction
    down[expert, :, 0] = 0
    down[expert, 0, 0] = down_value


def expert_peak_by_hand(model, inputs, layer: int, expert: int) -> float:
    """The largest |output element| of ``expert`` over the tokens routed to it, from its weights (no library
    code beyond the router)."""
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[layer]
    experts = adapter.experts_of(block)
    with torch.no_grad():
        _, _, indices = adapter.call_router(block, inputs[layer])
    routed = inputs[layer][(indices == expert).any(dim=1)]
    gate_up, down = experts.gate_up_proj.data[expert], experts.down_proj.data[expert]
    width = down.shape[-1]
    projected = routed @ gate_up.T
    gate, up = ((projected[:, 0::2], projected[:, 1::2]) if adapter.gate_up_layout == "interleaved"
                else (projected[:, :width], projected[:, width:]))
    output = (torch.nn.functional.silu(gate) * up) @ down.T
    return float(output.abs().max())


@pytest.fixture
def planted():
    """A tiny model whose least-used expert of its last MoE layer is a super expert, and its statistics."""
    model = tiny_qwen3_moe()
    inputs = cached_inputs(model)
    stats, _ = statistics(model, inputs)
    layer = int(stats["layer"].max())
    rows = stats[stats["layer"] == layer].set_index("expert")
    expert = int(rows["selected"].idxmin())
    routing = routing_of(model, inputs)[layer]
    token_ranks = np.argwhere(routing.topk_indices == expert)  # (token, rank) pairs
    token = int(token_ranks[np.argmax(token_ranks[:, 1]), 0])  # one on which it is a later choice
    others_peak = float(stats["peak_output"].max())
    plant_spike(model, inputs, layer, expert, token, gate_scale=4.0, down_value=1.0, silence_rest=True)
    spike = expert_peak_by_hand(model, inputs, layer, expert)
    plant_spike(model, inputs, layer, expert, token, gate_scale=4.0, down_value=3 * others_peak / spike,
                silence_rest=True)
    stats, _ = statistics(model, inputs)
    return model, inputs, stats, layer, expert


def compress(model, inputs, stats, *steps):
    context = CompressionContext.for_model(model, stats=stats, moe_inputs=inputs, heldout_fraction=0.25)
    return apply_steps(model, validated_steps(*steps), context)


def kept(report, layer) -> list[int]:
    return report["kept_original_ids"][str(layer)]


def test_the_super_experts_rule_matches_the_papers_definition():
    peaks = np.concatenate([np.linspace(1, 20, 400), [500.0, 40.0]])
    chosen = outliers(peaks, {"quantile": 99.5, "fraction_of_max": 0.1})
    # above the 99.5th percentile of all peaks (np.percentile's linear interpolation) and above max / 10
    expected = (peaks > np.percentile(peaks, 99.5)) & (peaks > 50.0)
    assert chosen.tolist() == expected.tolist() and chosen.sum() == 1 and chosen[400]
    assert outliers(peaks, {"count": 2}).nonzero()[0].tolist() == [400, 401]


def test_the_planted_expert_is_the_one_super_expert(planted):
    model, inputs, stats, layer, expert = planted
    row = stats[(stats["layer"] == layer) & (stats["expert"] == expert)].iloc[0]
    assert row["peak_output"] == pytest.approx(expert_peak_by_hand(model, inputs, layer, expert), rel=1e-5)
    reports = compress(model, inputs, stats, {"method": "reap_prune", "keep": 8, "protect": "super_experts"})
    assert [(entry["layer"], entry["expert"]) for entry in reports[0]["protected"]] == [(layer, expert)]


@pytest.mark.parametrize("method", [{"method": "frequency_prune", "uniform": True, "keep": 4},
                                    {"method": "reap_prune", "keep": 4},
                                    {"method": "reap_prune", "target": {"experts_fraction": 0.5},
                                     "allocation": "global"},
                                    {"method": "random_prune", "keep": 2, "seed": 1}])
def test_protection_keeps_the_super_expert_that_the_ranking_removes(planted, method):
    model, inputs, stats, layer, expert = planted
    unprotected = compress(tiny_qwen3_moe(), inputs, stats, method)
    assert expert not in kept(unprotected[0], layer), "the fixture's super expert should rank low"
    protected = compress(model, inputs, stats, {**method, "protect": "super_experts"})[0]
    assert expert in kept(protected, layer)
    assert protected["kept_per_layer"] == unprotected[0]["kept_per_layer"]  # kept instead of another, not extra
    assert protected["protected"][0]["expert"] == expert


def test_a_merge_leaves_the_super_expert_a_cluster_of_its_own(planted):
    model, inputs, stats, layer, expert = planted
    report = compress(model, inputs, stats, {"method": "hc_merge", "merges_per_layer": 4, "merge": "frequency",
                                             "protect": "super_experts"})[0]
    clusters = report["clusters"][str(layer)]
    assert [expert] in clusters and len(clusters) == 4


def test_a_protected_count_takes_the_largest_peaks(planted):
    model, inputs, stats, layer, expert = planted
    report = compress(model, inputs, stats, {"method": "reap_prune", "keep": 3,
                                             "protect": {"super_experts": {"count": 3}}})[0]
    largest = stats.sort_values("peak_output", ascending=False).head(3)
    assert [(entry["layer"], entry["expert"]) for entry in report["protected"]] == \
        list(zip(largest["layer"].tolist(), largest["expert"].tolist()))
    for row in largest.itertuples():
        assert row.expert in kept(report, row.layer)


def test_a_width_cut_keeps_the_super_neuron_it_would_cut():
    inputs = cached_inputs(tiny_qwen3_moe())
    layer, expert = max(inputs), 0
    routing = routing_of(tiny_qwen3_moe(), inputs)[layer]
    token = int(np.flatnonzero((routing.topk_indices == expert).any(axis=1))[0])

    def planted_model():
        # a huge activation that writes almost nothing back: the least important neuron of its expert by the
        # width cut's measure, the largest peak of the model by the super-neuron rule
        model = tiny_qwen3_moe()
        plant_spike(model, inputs, layer, expert, token, gate_scale=40.0, down_value=1e-6, silence_rest=False)
        return model

    stats, neuron_peaks = statistics(planted_model(), inputs)
    step = {"method": "prune_expert_width", "fraction": 0.5}

    def cut(steps):
        model = planted_model()
        context = CompressionContext.for_model(model, stats=stats, moe_inputs=inputs, heldout_fraction=0.25,
                                               neuron_peaks=neuron_peaks)
        report = apply_steps(model, validated_steps(*steps), context)[0]
        experts = adapter_for(model.config).experts_of(adapter_for(model.config).moe_blocks(model)[layer])
        return report, experts.down_proj.data[expert, 0]  # hidden channel 0 of each kept neuron's down column

    report, channel = cut([step])
    assert "protected_neurons" not in report
    assert not torch.any(channel == torch.tensor(1e-6)), "the fixture's super neuron should be cut without protection"
    report, channel = cut([{**step, "protect": {"super_experts": {"count": 1}}}])
    assert report["protected_neurons"][0] | {"peak": 0, "times_median": 0} == \
        {"layer": layer, "expert": expert, "neuron": 0, "peak": 0, "times_median": 0}
    assert report["protected_neurons"][0]["peak"] == pytest.approx(float(neuron_peaks[layer].max()))
    assert torch.any(channel == torch.tensor(1e-6))


def test_a_count_beside_a_threshold_is_refused():
    with pytest.raises(ConfigError, match="protect"):
        validated_steps({"method": "reap_prune", "keep": 4, "protect": {"super_experts": {"count": 2, "quantile": 99}}})


def test_analyze_lists_the_protected_experts_of_a_mone_checkpoint(planted, tmp_path):
    from helpers import make_tokenizer
    from moe_compress.analysis import analyze_checkpoint, to_markdown
    from moe_compress.modelio import save_checkpoint

    model, inputs, stats, layer, expert = planted
    steps = [{"method": "mone_prune", "keep": 4, "protect": "super_experts"}]
    reports = compress(model, inputs, stats, *steps)
    save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {"steps": steps, "step_reports": reports})
    analysis = analyze_checkpoint(tmp_path / "ckpt")
    assert [(entry["layer"], entry["expert"]) for entry in analysis["protected"]["experts"]] == [(layer, expert)]
    assert analysis["protected"]["experts"][0]["times_median"] > 1
    rows = {row["layer"]: row for row in analysis["layers"] if row["kind"] == "moe"}
    assert rows[layer]["novices"] == 4 and rows[layer]["expert_format"] == "dense + 4 novices"
    markdown = to_markdown({"models": [analysis]})
    assert "Protected super experts" in markdown and f"{layer}:{expert} (" in markdown
