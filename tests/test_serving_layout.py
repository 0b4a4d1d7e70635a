"""What the serving checks rest on, without vLLM (make test): the per-layer fields a non-uniform checkpoint writes
describe each layer as a stock layer of its architecture would be built; the architecture name engines resolve;
the plugin's checks of what it built; the agreement rule; the serving report and the final table's columns."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoConfig

from helpers import ARCHITECTURE_TYPES, context_with_inputs, make_tokenizer, tiny_model_of
from moe_compress.architectures import adapter_for
from moe_compress.final_table import final_table, to_markdown
from moe_compress.methods.expert_selection import prune_experts
from moe_compress.methods.expert_width import block_width, cut_block_width
from moe_compress.methods.resize import skeleton
from moe_compress.modelio import save_checkpoint
from moe_compress.serving.agreement import LOGPROB_TOLERANCE, compare, summarize
from moe_compress.serving.report import not_served_lines, serving_report, table_columns
from moe_compress.serving.vllm_plugin import (
    base_architecture,
    check_built_layers,
    fields_set,
    layer_fields,
    unserved_layouts,
)


def non_uniform(model_type: str, widths: bool):
    """A tiny model whose MoE layers keep different expert counts, top-k and (``widths``) widths."""
    model = tiny_model_of(model_type)
    adapter = adapter_for(model.config)
    blocks = adapter.moe_blocks(model)
    keep = {layer: torch.arange(8 - position - 1) for position, layer in enumerate(blocks)}
    prune_experts(model, keep, context_with_inputs(model, tokens=32))
    first = next(iter(blocks.values()))
    if adapter.fixed_top_k is None:
        adapter.set_router_settings(first, {"top_k": 3})
    if widths:
        experts = adapter.block_num_experts(first)
        cut_block_width(adapter, first, torch.arange(block_width(adapter, first) - 8).expand(experts, -1).contiguous())
    return model


def layer_shapes(layer: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in layer.state_dict().items()}


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_layer_fields_build_each_layer_as_the_checkpoint_holds_it(model_type, tmp_path):
    """A stock model built from the config with one layer's fields set has that layer's tensors at the shapes
    the compressed model has: what an engine builds from the fields is what the checkpoint holds."""
    model = non_uniform(model_type, widths=False)
    record = save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {})
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert record["loader"] == "remote_code"
    assert raw["architectures"] == [record["architecture"]] and base_architecture(record["architecture"]) == type(model).__name__
    config = AutoConfig.from_pretrained(tmp_path / "ckpt")  # the stock config class: no remote code
    adapter = adapter_for(config)
    fields = layer_fields(raw)
    assert sorted(fields) == sorted(adapter.moe_blocks(model))
    built = adapter.decoder_layers(model)
    for layer, values in fields.items():
        with fields_set(config, values):
            stock = skeleton(config)
        assert layer_shapes(adapter.decoder_layers(stock)[layer]) == layer_shapes(built[layer]), layer
        router = adapter.router_of(adapter.moe_blocks(stock)[layer])
        assert router.top_k == adapter.router_of(adapter.moe_blocks(model)[layer]).top_k
    assert not unserved_layouts(raw)


def test_per_layer_widths_are_fields_where_the_width_field_is_the_experts_own(tmp_path):
    model = non_uniform("qwen3_moe", widths=True)
    save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {})
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    widths = {layer: values["moe_intermediate_size"] for layer, values in layer_fields(raw).items()}
    assert len(set(widths.values())) == 2 and not unserved_layouts(raw)


def test_a_width_field_that_also_sizes_shared_experts_is_not_served(tmp_path):
    model = non_uniform("deepseek_v3", widths=True)
    save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {})
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert all("moe_intermediate_size" not in values for values in layer_fields(raw).values())
    assert unserved_layouts(raw) == [raw["moe_compress_unservable"]] and "moe_intermediate_size" in raw["moe_compress_unservable"]


def test_stock_checkpoints_name_the_stock_architecture(tmp_path):
    model = tiny_model_of("qwen3_moe")
    record = save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {})
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert record["loader"] == "stock" and raw["architectures"] == ["Qwen3MoeForCausalLM"] == [record["architecture"]]
    assert "moe_compress_layer_fields" not in raw


def test_unserved_layouts_name_the_layer():
    config = {"moe_compress_low_rank": {"2": {}, "0": {}}, "moe_compress_dynamic_skip": {"1": {}}}
    assert unserved_layouts(config) == ["layer 0: low-rank experts (factored expert tensors)",
                                        "layer 2: low-rank experts (factored expert tensors)",
                                        "layer 1: dynamic expert skipping (a top-k that varies per token)"]


def test_fields_set_restores_the_config_through_its_aliases():
    config = AutoConfig.for_model("qwen3_moe", num_experts=8, moe_intermediate_size=16)
    with fields_set(config, {"num_experts": 5, "moe_intermediate_size": 8, "moe_compress_extra": 1}):
        assert (config.num_experts, config.moe_intermediate_size, config.moe_compress_extra) == (5, 8, 1)
    assert (config.num_experts, config.moe_intermediate_size) == (8, 16) and not hasattr(config, "moe_compress_extra")


class FusedExperts(nn.Module):
    """The tensors of a vLLM fused-MoE layer: w13 [E, 2I, H], w2 [E, H, I]."""

    def __init__(self, experts: int, width: int, hidden: int = 4):
        super().__init__()
        self.w13_weight = nn.Parameter(torch.empty(experts, 2 * width, hidden))
        self.w2_weight = nn.Parameter(torch.empty(experts, hidden, width))


def test_the_plugin_checks_each_built_layer_against_the_record():
    layers = nn.ModuleList([nn.Linear(2, 2), nn.Sequential(FusedExperts(5, 8)), nn.Sequential(FusedExperts(6, 16))])
    record = {"moe_compress_experts_per_layer": {"1": 5, "2": 6}, "moe_compress_expert_width": {"1": 8, "2": 16}}
    check_built_layers(layers, record)
    with pytest.raises(ValueError, match="decoder layer 2 was built with 6 experts of width 16, the checkpoint records 6 of width 12"):
        check_built_layers(layers, {**record, "moe_compress_expert_width": {"1": 8, "2": 12}})
    with pytest.raises(ValueError, match="decoder layer 0 was built without routed experts"):
        check_built_layers(layers, {"moe_compress_experts_per_layer": {"0": 4}})


REFERENCE = {"prompt": [1, 2], "tokens": [5, 6, 7, 8], "logprobs": [-1.0, -2.0, -0.5, -0.1],
             "top2_margin": [0.5, 0.0004, 0.2, 0.3]}


@pytest.mark.parametrize("tokens, logprobs, agrees, departs", [
    ([5, 6, 7, 8], [-1.0, -2.0, -0.5, -0.1], True, None),
    ([5, 6, 7, 8], [-1.0, -2.0 + 2 * LOGPROB_TOLERANCE, -0.5, -0.1], False, None),  # a log-probability off
    ([5, 9, 1, 1], [-1.0, -2.0, -3.0, -3.0], True, 1),  # departs where the reference's top two tie
    ([5, 6, 9, 9], [-1.0, -2.0, -0.9, -0.9], False, 2),  # departs where the reference was sure
    ([5, 6], [-1.0, -2.0], False, 2),  # stopped early
])
def test_agreement_allows_departures_at_near_ties_only(tokens, logprobs, agrees, departs):
    result = compare(REFERENCE, tokens, logprobs)
    assert (result["agrees"], result["departs_at"]) == (agrees, departs)
    assert summarize([result, compare(REFERENCE, REFERENCE["tokens"], REFERENCE["logprobs"])])["agrees"] == agrees


def engine_result(loads=True, agrees=True, error=None):
    vllm = {"engine": "vllm", "loads": loads, **({"error": error} if error else {})}
    if loads:
        vllm["agreement"] = {"agrees": agrees, "max_logprob_difference": 1e-6, "per_prompt": []}
        vllm["speed"] = {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 100.0, "ttft_s": 0.02}
    transformers = {"engine": "transformers", "version": "5.19.0", "loads": True, "agreement": {"agrees": True}}
    return {"engines": [vllm, transformers], "versions": {"vllm": "0.32.0"}}


def test_the_report_says_which_engines_serve_and_why_not():
    reference = {"transformers": "5.23.0"}
    served = serving_report("a", {"loader": "stock"}, reference, engine_result())
    assert served["serves_in"] == ["transformers-5.23.0", "vllm", "transformers-5.19.0"]
    refused = serving_report("b", {"loader": "remote_code"}, reference,
                             engine_result(loads=False, error="ValueError: layer 0: low-rank experts"))
    disagrees = serving_report("c", {"loader": "stock"}, reference, engine_result(agrees=False))
    assert refused["serves_in"] == ["transformers-5.23.0", "transformers-5.19.0"]
    assert not_served_lines({"b": refused, "c": disagrees}) == [
        "`b` is not served by vllm: ValueError: layer 0: low-rank experts",
        "`c` is not served by vllm: loads, but its continuations disagree with the reference"]
    columns = table_columns(served)
    assert columns["vllm_decode_tok_s"] == 100.0 and columns["vllm_ttft_ms"] == pytest.approx(20.0)
    assert table_columns(refused)["vllm_decode_tok_s"] is None


def test_the_final_table_has_a_serves_in_column():
    records = {name: {"parameters": 100, "experts_total": 8, "experts_per_layer": {"0": 8}, "active_experts": 2,
                      "loader": "stock", "step_reports": []} for name in ("base", "pruned")}
    perplexity = pd.DataFrame([{"dataset": "c4_heldout", "tokens": 10, "nll": 1.0, "perplexity": 2.7}])
    reports = {"base": serving_report("base", records["base"], {"transformers": "5.23.0"}, engine_result()),
               "pruned": serving_report("pruned", records["pruned"], {"transformers": "5.23.0"},
                                        engine_result(loads=False, error="refused"))}
    table = final_table({"base": [], "pruned": []}, records, {"base": perplexity, "pruned": perplexity},
                        perf_metric="perplexity", serving=reports)
    assert list(table["serves_in"]) == ["transformers-5.23.0 vllm transformers-5.19.0",
                                        "transformers-5.23.0 transformers-5.19.0"]
    without = final_table({"base": []}, {"base": records["base"]}, {"base": perplexity}, perf_metric="perplexity")
    assert list(without["serves_in"]) == ["transformers"] and "vllm_decode_tok_s" not in without
    assert "serves_in" in to_markdown(table)
