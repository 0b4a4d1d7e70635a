"""Real checkpoints' config.json files: one flagship per architecture of the adapter table
(tests/data/model_configs) parses, is accepted by its adapter and is described by ``model_shape`` and
``moe-compress inspect`` from the config alone, with the values the file states. Hunyuan-A13B's per-layer
fields (``moe_topk``, ``moe_intermediate_size`` and ``num_shared_expert`` lists) load, compress and reload,
one value for all layers and a different top-k per layer, each field keeping its form."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from transformers import AutoConfig

from helpers import (
    FLAGSHIP_CONFIGS,
    MODEL_CONFIGS,
    assert_same_model,
    context_with_inputs,
    flagship_config,
    make_tokenizer,
    tiny_config,
    tiny_model_of,
    validated_step,
)
from moe_compress.architectures import adapter_for
from moe_compress.cache import build_cache, read_moe_inputs, read_router_cache
from moe_compress.cli import describe_checkpoint, main
from moe_compress.config import check_variants_against_model
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.modelio import load_model, model_shape, save_checkpoint
from moe_compress.stats import expert_frequency, rank_column
from moe_compress.streaming import LayerStream

HUNYUAN = "hunyuan_v1_moe"


def config_folder(path, raw: dict):
    """A folder holding only ``raw`` as config.json (what ``inspect`` and the parse-time checks need)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(raw))
    return path


def per_layer(value, layers: int) -> list:
    return list(value) if isinstance(value, list) else [value] * layers


def test_every_architecture_has_a_flagship_config_in_the_table():
    """One published config per type of the adapter table, each listed in the folder's README."""
    from moe_compress.architectures import ARCHITECTURES

    assert sorted(FLAGSHIP_CONFIGS) == sorted(ARCHITECTURES)
    readme = (MODEL_CONFIGS / "README.md").read_text()
    for folder in FLAGSHIP_CONFIGS.values():
        assert (MODEL_CONFIGS / folder / "config.json").is_file() and f"`{folder}`" in readme, folder


@pytest.mark.parametrize("model_type", sorted(FLAGSHIP_CONFIGS))
def test_a_flagship_config_is_read_and_described_from_the_config_alone(tmp_path, model_type):
    raw = flagship_config(model_type)
    # an auto_map (DeepSeek-V3, Phi-3.5-MoE, MiniMax-M2, ...) names the release's own code, which is not in the
    # folder and is not run: transformers builds every type of the adapter table itself
    folder = config_folder(tmp_path / "model", raw)
    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for(config)
    layers = raw["num_hidden_layers"]
    shape = model_shape(folder)
    facts = describe_checkpoint(folder)
    assert config.model_type == facts["model_type"] == model_type
    assert shape["num_layers"] == facts["decoder_layers"] == layers
    if not adapter.moe:
        assert not shape["moe"] and facts["moe_layers"] == []
        return
    # the file's own numbers, read here from the JSON, against what the adapter and the built skeleton say
    experts = raw[adapter.config_num_experts]
    top_k = per_layer(raw[adapter.config_top_k], layers)
    width = per_layer(raw[adapter.config_expert_width], layers)
    moe_layers = facts["moe_layers"]
    assert moe_layers and len(moe_layers) + len(facts["dense_layers"]) == layers
    assert shape["num_experts"] == experts and shape["top_k"] == max(top_k)
    assert facts["experts_per_layer"] == {str(layer): experts for layer in moe_layers}
    assert facts["top_k_per_layer"] == {str(layer): top_k[layer] for layer in moe_layers}
    assert facts["expert_width_per_layer"] == {str(layer): width[layer] for layer in moe_layers}
    shared = raw.get(adapter.config_shared_experts) if adapter.config_shared_experts else None
    if shared is not None:
        shared = per_layer(shared, layers)
        assert facts["shared_experts_per_layer"] == {str(layer): shared[layer] for layer in moe_layers}


def test_a_vision_language_release_is_refused_and_its_text_model_read(tmp_path):
    """Qwen3.5's release is a vision-language checkpoint; its text_config is the supported text model."""
    raw = json.loads((MODEL_CONFIGS / FLAGSHIP_CONFIGS["qwen3_5_moe_text"] / "config.json").read_text())
    with pytest.raises(ModelError, match="qwen3_5_moe.*text model"):
        model_shape(config_folder(tmp_path / "release", raw))
    assert model_shape(config_folder(tmp_path / "text", raw["text_config"]))["num_experts"] == 512


@pytest.mark.parametrize("moe_topk, message", [
    ([2, 2], "'moe_topk' has 2 entries for 3 decoder layers"),
    ([2, 0, 2], "'moe_topk' holds 0"),
    ([2, 9, 2], "'moe_topk' routes each token to 9 experts in layer 1, more than its 8 experts"),
])
def test_a_per_layer_field_that_does_not_fit_the_layers_is_refused_naming_it(moe_topk, message):
    config = tiny_config(HUNYUAN, moe_topk=moe_topk)
    with pytest.raises(ModelError, match=message):
        adapter_for(config)


def test_the_tiny_hunyuan_has_the_releases_field_types():
    """The suite's Hunyuan keeps the release's per-layer lists (one entry per tiny layer), and every width
    field agrees with the one the transformers class sizes the experts by (intermediate_size)."""
    config = tiny_config(HUNYUAN)
    assert config.moe_topk == [2, 2, 2] and config.num_shared_expert == [1, 1, 1]
    assert config.moe_intermediate_size == [config.intermediate_size] * 3 and config.num_experts == 8
    assert "quantization_config" not in config.to_dict() and "auto_map" not in config.to_dict()


@pytest.fixture
def hunyuan(tmp_path):
    """A tiny Hunyuan with the given ``moe_topk`` saved as a checkpoint, its calibration cache (streamed from
    the checkpoint) and its frequency statistics."""
    def build(moe_topk):
        model_dir, cache_dir = tmp_path / "model", tmp_path / "cache"
        tiny_model_of(HUNYUAN, moe_topk=moe_topk).save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
        ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(5))
        build_cache(LayerStream(model_dir), ids, 2, cache_dir)
        stats = expert_frequency(read_router_cache(cache_dir))
        return model_dir, cache_dir, stats, ids
    return build


def compress(model_dir, cache_dir, stats, steps, out_dir):
    model = load_model(model_dir)
    context = CompressionContext.for_model(model, stats=stats, moe_inputs=read_moe_inputs(cache_dir),
                                           heldout_fraction=0.25)
    reports = apply_steps(model, steps, context)
    record = save_checkpoint(model, make_tokenizer(), out_dir, {"steps": steps, "step_reports": reports})
    return model, reports, record, json.loads((out_dir / "config.json").read_text())


@pytest.mark.numeric
def test_hunyuan_with_one_top_k_in_a_list_compresses_to_a_stock_checkpoint(tmp_path, hunyuan):
    model_dir, cache_dir, stats, ids = hunyuan([2, 2, 2])
    steps = [validated_step("frequency_prune", uniform=True, keep=6), validated_step("active_experts", k=1)]
    model, _, record, saved = compress(model_dir, cache_dir, stats, steps, tmp_path / "out")
    # each field in the release's form: lists stay lists with one entry per layer
    assert saved["moe_topk"] == [1, 1, 1] and saved["num_experts"] == 6
    assert saved["num_shared_expert"] == [1, 1, 1] and saved["moe_intermediate_size"] == [64, 64, 64]
    assert record["loader"] == "stock" and "auto_map" not in saved
    assert_same_model(load_model(tmp_path / "out"), model, ids)


@pytest.mark.numeric
def test_hunyuan_with_a_top_k_per_layer_is_checked_counted_and_compressed_per_layer(tmp_path, hunyuan):
    ks = {0: 4, 1: 2, 2: 4}
    model_dir, cache_dir, stats, ids = hunyuan(list(ks.values()))
    # the statistics: each layer's own top-k, every token counted once per slot, no rank beyond the layer's k
    tokens = stats.groupby("layer")["tokens"].first()
    assert stats.groupby("layer")["top_k"].first().to_dict() == ks
    assert (stats.groupby("layer")["selected"].sum() == tokens * pd.Series(ks)).all()
    layer_1 = stats[stats["layer"] == 1]
    assert (layer_1[[rank_column(3), rank_column(4)]] == 0).all().all() and (layer_1[rank_column(2)] > 0).any()
    # the parse-time shape and checks: the floor is the largest k, a rank cut or target at most the smallest
    shape = model_shape(model_dir)
    assert shape["top_k"] == 4 and shape["top_k_per_layer"] == (4, 2, 4)
    facts = describe_checkpoint(model_dir)
    assert facts["top_k"] is None and facts["top_k_per_layer"] == {"0": 4, "1": 2, "2": 4}
    refused = {"fewest": {"method": "frequency_prune", "min_count": 1, "top_k": 3},
               "merge": {"method": "hc_merge", "merges_per_layer": 5},
               "mean": {"method": "active_experts", "target_mean": 3.5},
               "skip": {"method": "dynamic_skip", "beta": "auto", "target_active": 3}}
    for name, step in refused.items():
        with pytest.raises(ConfigError, match=rf"variants\.{name}\.steps\[0\].*top-k 2 to 4 by layer"):
            check_variants_against_model({name: {"steps": [validated_step(**step)]}}, **shape)
    check_variants_against_model({"ok": {"steps": [validated_step("frequency_prune", min_count=1, top_k=2),
                                                   validated_step("active_experts", target_mean=3)]}}, **shape)
    # a layer keeps at least its own top-k; the mean top-k is reached layer by layer
    steps = [validated_step("frequency_prune", uniform=True, keep=3), validated_step("active_experts", target_mean=2)]
    model, reports, record, saved = compress(model_dir, cache_dir, stats, steps, tmp_path / "out")
    assert reports[0]["kept_per_layer"] == {"0": 4, "1": 3, "2": 4} and reports[0]["floored_to_top_k"] == [0, 2]
    chosen = reports[1]["top_k_per_layer"]
    assert sum(chosen.values()) == 6 and reports[1]["previous_top_k"] == {"0": 4, "1": 2, "2": 4}
    # expert counts differ per layer: the remote-code loader; the top-k list states each layer's k
    assert record["loader"] == "remote_code" and saved["moe_topk"] == [chosen[str(layer)] for layer in range(3)]
    assert_same_model(load_model(tmp_path / "out"), model, ids)


@pytest.mark.numeric
def test_hunyuan_per_layer_top_k_chosen_by_a_target_is_a_stock_checkpoint(tmp_path, hunyuan):
    """A top-k per layer with one expert count is what the release's moe_topk list states: stock."""
    model_dir, cache_dir, stats, ids = hunyuan([2, 2, 2])
    steps = [validated_step("active_experts", target_mean=1.5)]
    model, reports, record, saved = compress(model_dir, cache_dir, stats, steps, tmp_path / "out")
    chosen = [reports[0]["top_k_per_layer"][str(layer)] for layer in range(3)]
    assert len(set(chosen)) == 2 and saved["moe_topk"] == chosen and record["loader"] == "stock"
    reloaded = load_model(tmp_path / "out")
    assert [block.gate.top_k for block in adapter_for(reloaded.config).moe_blocks(reloaded).values()] == chosen
    assert_same_model(reloaded, model, ids)


@pytest.mark.numeric
def test_hunyuan_width_fields_follow_a_width_cut(tmp_path, capsys):
    """intermediate_size sizes the routed experts and the shared MLP alike, so a cut goes through the
    remote-code loader; the release's moe_intermediate_size list states the new widths."""
    model = tiny_model_of(HUNYUAN)
    apply_steps(model, [validated_step("prune_expert_width", keep=32)], context_with_inputs(model))
    record = save_checkpoint(model, make_tokenizer(), tmp_path / "out", {})
    saved = json.loads((tmp_path / "out/config.json").read_text())
    assert saved["intermediate_size"] == 64 and saved["moe_intermediate_size"] == [32, 32, 32]
    assert record["loader"] == "remote_code"
    assert_same_model(load_model(tmp_path / "out"), model, torch.arange(12)[None])
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["expert_width_per_layer"] == {"0": 32, "1": 32, "2": 32}
    assert facts["shared_experts_per_layer"] == {"0": 1, "1": 1, "2": 1}


def test_a_config_transformers_cannot_build_a_model_from_is_refused_at_planning(tmp_path):
    """Hunyuan-A13B's release config states no head_dim, which transformers' class needs: one line naming the
    file, before any job."""
    from moe_compress.plan import plan_workflow

    raw = {key: value for key, value in flagship_config(HUNYUAN).items() if key != "head_dim"}
    folder = config_folder(tmp_path / "model", raw)
    make_tokenizer().save_pretrained(folder)
    tiny_model_of(HUNYUAN).save_pretrained(tmp_path / "weights")
    (folder / "model.safetensors").symlink_to(tmp_path / "weights/model.safetensors")
    config = {"model": {"path": str(folder)}, "variants": {"base": {"steps": []}}}
    with pytest.raises(ModelError) as caught:
        plan_workflow(config, environ={})
    assert str(caught.value).startswith(f"{folder / 'config.json'}: transformers ")
    assert "cannot build a hunyuan_v1_moe model from it" in str(caught.value) and "\n" not in str(caught.value)
