"""Layer-streamed calibration: one decoder layer in memory at a time, the same cache as the whole model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import ARCHITECTURE_TYPES, make_tokenizer, tiny_model_of
from moe_compress.architectures import adapter_for
from moe_compress.cache import CacheReader, CacheWriter, build_cache, read_moe_inputs, read_router_cache
from moe_compress.errors import ModelError
from moe_compress.modelio import load_model
from moe_compress.stats import expert_saliency
from moe_compress.streaming import LayerStream

pytestmark = pytest.mark.numeric


def save_tiny(path, model_type, **save_options):
    tiny_model_of(model_type).save_pretrained(path, **save_options)
    make_tokenizer().save_pretrained(path)
    return path


def streamed_cache(model_dir, input_ids, out_dir, batch_size=2):
    return build_cache(LayerStream(model_dir), input_ids, batch_size, out_dir)


def assert_same_cache(ours, theirs):
    routing_ours, routing_theirs = read_router_cache(ours), read_router_cache(theirs)
    assert routing_ours.keys() == routing_theirs.keys()
    for layer in routing_ours:
        for field in ["logits", "topk_indices", "topk_weights"]:
            assert np.array_equal(getattr(routing_ours[layer], field), getattr(routing_theirs[layer], field)), (layer, field)
    inputs_ours, inputs_theirs = read_moe_inputs(ours), read_moe_inputs(theirs)
    assert inputs_ours.keys() == inputs_theirs.keys()
    for layer in inputs_ours:
        assert torch.equal(inputs_ours[layer], inputs_theirs[layer]), layer


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_streamed_cache_equals_the_whole_model_pass(tmp_path, model_type):
    model_dir = save_tiny(tmp_path / "model", model_type)
    # 5 samples in batches of 2: a last, smaller batch gets its own layer arguments
    input_ids = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    model = load_model(model_dir)
    whole = build_cache(model, input_ids, 2, tmp_path / "whole")
    streamed = streamed_cache(model_dir, input_ids, tmp_path / "streamed")
    assert streamed == whole
    assert_same_cache(tmp_path / "streamed", tmp_path / "whole")
    # and both are what the model's own forward pass feeds its MoE blocks and routers, batch by batch
    reference = forward_pass_capture(model, input_ids, 2)
    routing, inputs = read_router_cache(tmp_path / "streamed"), read_moe_inputs(tmp_path / "streamed")
    assert sorted(reference) == sorted(routing)
    for layer, (logits, hidden) in reference.items():
        assert torch.equal(torch.tensor(routing[layer].logits), logits), layer
        assert torch.equal(inputs[layer], hidden), layer


def forward_pass_capture(model, input_ids, batch_size):
    """{layer: (router logits, MoE-block inputs)} from hooks on the whole model's ordinary forward."""
    adapter = adapter_for(model.config)
    seen = {layer: ([], []) for layer in adapter.moe_blocks(model)}
    handles = []
    for layer, block in adapter.moe_blocks(model).items():
        handles.append(block.register_forward_pre_hook(
            lambda module, args, layer=layer: seen[layer][1].append(args[0].reshape(-1, args[0].shape[-1]))))
        handles.append(adapter.router_of(block).register_forward_hook(
            lambda module, args, output, layer=layer: seen[layer][0].append(output[0].float())))
    with torch.no_grad():
        for batch in input_ids.split(batch_size):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    return {layer: (torch.cat(logits), torch.cat(hidden)) for layer, (logits, hidden) in seen.items()}


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_streamed_saliency_equals_the_whole_model(tmp_path, model_type):
    model_dir = save_tiny(tmp_path / "model", model_type)
    input_ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    streamed_cache(model_dir, input_ids, tmp_path / "cache")
    whole = expert_saliency(load_model(model_dir), read_moe_inputs(tmp_path / "cache"))
    streamed = expert_saliency(LayerStream(model_dir), CacheReader(tmp_path / "cache").moe_inputs())
    pd.testing.assert_frame_equal(streamed, whole)
    assert (streamed["reap_saliency"] > 0).any()


def test_sharded_checkpoint_streams_one_layer_at_a_time(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "model", "qwen3_moe", max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    input_ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    stream = LayerStream(model_dir)
    layers_in_memory = []
    load_layer = stream.load_layer

    def counting_load(index):
        layer = load_layer(index)
        layers_in_memory.append(sum(not any(p.is_meta for p in each.parameters()) for each in stream.layers))
        return layer

    monkeypatch.setattr(stream, "load_layer", counting_load)
    build_cache(stream, input_ids, 3, tmp_path / "streamed")
    assert layers_in_memory == [1] * len(stream.layers)
    assert all(p.is_meta for layer in stream.layers for p in layer.parameters())
    build_cache(load_model(model_dir), input_ids, 3, tmp_path / "whole")
    assert_same_cache(tmp_path / "streamed", tmp_path / "whole")


def test_streaming_needs_safetensors_and_says_so(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "mixtral")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors or model.safetensors.index.json"):
        LayerStream(model_dir)


def test_a_failed_stream_leaves_no_cache(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "model", "olmoe")
    stream = LayerStream(model_dir)
    monkeypatch.setattr(stream, "layer_tensor_names", lambda index: (_ for _ in ()).throw(ModelError(f"layer {index} broken")))
    with pytest.raises(ModelError, match="layer 0 broken"):
        build_cache(stream, torch.zeros(2, 8, dtype=torch.long), 2, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".cache.*"))


@pytest.mark.parametrize("where, value", [("hidden_states", float("nan")), ("logits", float("inf")),
                                          ("logits", -float("inf"))])
def test_non_finite_activations_stop_the_cache_naming_the_layer(tmp_path, where, value):
    from moe_compress.cache import LayerCapture

    capture = LayerCapture([torch.randn(6, 8)], [torch.rand(6, 2)], [torch.zeros(6, 2, dtype=torch.int16)],
                           [torch.randn(6, 4)])
    getattr(capture, where)[0][3, 1] = value
    (tmp_path / "cache").mkdir()
    with pytest.raises(ModelError, match="non-finite.*layer 3"):
        CacheWriter(tmp_path / "cache").add_layer(3, capture)
