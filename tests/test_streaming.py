"""Layer-streamed calibration: one decoder layer in memory at a time, the same cache as the whole model."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import ARCHITECTURE_TYPES, forward_pass_capture, make_tokenizer, tiny_model_of
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


# read-ahead: the next decoder layer is read by a background thread while this one computes

def read_ahead_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("LayerStream read-ahead")]


def layer_state_dict(layer):
    return {name: tensor.clone() for name, tensor in layer.state_dict().items()}


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_read_ahead_gives_the_same_cache_and_saliency(tmp_path, model_type):
    model_dir = save_tiny(tmp_path / "model", model_type, max_shard_size="40KB")
    input_ids = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(3))
    ahead, serial = LayerStream(model_dir), LayerStream(model_dir, read_ahead=False)
    manifest = build_cache(ahead, input_ids, 2, tmp_path / "ahead")
    assert manifest == build_cache(serial, input_ids, 2, tmp_path / "serial")
    # embed starts reading layer 0, each layer the next: every layer came from the read-ahead, bitwise the same
    assert ahead.layers_read_ahead == len(ahead.layers) and serial.layers_read_ahead == 0
    assert_same_cache(tmp_path / "ahead", tmp_path / "serial")
    moe_inputs = CacheReader(tmp_path / "ahead").moe_inputs()
    serial_saliency = expert_saliency(LayerStream(model_dir, read_ahead=False), moe_inputs)
    ahead_saliency = expert_saliency(LayerStream(model_dir), moe_inputs)
    pd.testing.assert_frame_equal(ahead_saliency, serial_saliency, check_exact=True)
    assert not read_ahead_threads()


@pytest.mark.parametrize("model_type, dtype", [("gpt_oss", torch.float32), ("deepseek_v3", torch.bfloat16)])
def test_tensors_read_ahead_equal_a_direct_read(tmp_path, model_type, dtype):
    model_dir = tmp_path / "model"
    tiny_model_of(model_type).to(dtype).save_pretrained(model_dir, max_shard_size="40KB")
    stream = LayerStream(model_dir, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    for index in range(len(stream.layers)):
        names = stream.layer_tensor_names(index)
        direct, prefetched = stream.tensors.read(names), stream.tensors.prefetch(names)
        assert list(prefetched) == list(direct)
        for name, tensor in direct.items():
            assert prefetched[name].dtype == tensor.dtype == dtype and torch.equal(prefetched[name], tensor), name
    stream.embed(torch.zeros(1, 4, dtype=torch.long))
    stream.load_layer(0)
    # the thread has read layer 1, all of it and only it
    ahead = stream._ahead.wait()
    direct = stream.tensors.read(stream.layer_tensor_names(1))
    assert stream._ahead.index == 1 and list(ahead) == list(direct)
    assert all(torch.equal(ahead[name], tensor) for name, tensor in direct.items())
    stream.close()


def bytes_read_by_this_process():
    """Bytes this process (every thread) has asked of read calls: those of mapped files are not counted."""
    counts = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(counts["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux's per-process I/O counts")
@pytest.mark.parametrize("read_ahead", [True, False], ids=["read-ahead", "serial"])
def test_the_read_ahead_thread_reads_the_next_layer_from_disk(tmp_path, read_ahead):
    """The next layer's bytes are read by the thread, with read calls, before it is asked for (safetensors'
    own tensors map the file: their bytes would be read by whoever uses them first); only the next layer's."""
    model_dir = save_tiny(tmp_path / "model", "qwen3_moe")
    stream = LayerStream(model_dir, read_ahead=read_ahead)
    layer_bytes = [sum(tensor.nbytes for tensor in stream.tensors.read(stream.layer_tensor_names(index)).values())
                   for index in range(len(stream.layers))]
    stream.load_layer(0)
    stream._ahead.wait()  # nothing read ahead after a first, single load
    before = bytes_read_by_this_process()
    stream.load_layer(1)  # layer 1 follows layer 0: starts reading layer 2
    stream._ahead.wait()
    read = bytes_read_by_this_process() - before
    if read_ahead:
        assert layer_bytes[2] <= read < layer_bytes[2] + min(layer_bytes[:2]), (read, layer_bytes)
    else:
        assert read < layer_bytes[2] / 10, (read, layer_bytes)
    stream.close()


def file_of_layer_2_alone(stream):
    """A shard of the (3-layer, sharded) checkpoint that holds tensors of decoder layer 2 and of nothing else."""
    weight_map = stream.tensors.weight_map
    others = {weight_map[name] for name in weight_map if not name.startswith("model.layers.2.")}
    return sorted({weight_map[name] for name in stream.layer_tensor_names(2)} - others)[0]


@pytest.mark.parametrize("read_ahead", [True, False], ids=["read-ahead", "serial"])
@pytest.mark.parametrize("breakage", ["removed", "corrupted", "cut short"])
def test_a_shard_broken_after_the_stream_opened_is_named_at_the_load_of_its_layer(tmp_path, read_ahead, breakage):
    model_dir = save_tiny(tmp_path / "model", "qwen3_moe", max_shard_size="40KB")
    stream = LayerStream(model_dir, read_ahead=read_ahead)
    broken = file_of_layer_2_alone(stream)
    stream.embed(torch.zeros(1, 4, dtype=torch.long))
    stream.load_layer(0)
    stream.free_layer(0)
    path = model_dir / broken
    if breakage == "removed":
        path.unlink()
    elif breakage == "corrupted":
        with path.open("r+b") as handle:
            handle.write(b"\xff" * 8)  # the header length
    else:
        with path.open("r+b") as handle:
            handle.truncate(path.stat().st_size - 100)
    stream.load_layer(1)  # starts reading layer 2 in the background: its error waits for load_layer(2)
    stream.free_layer(1)
    assert stream._ahead.index == (2 if read_ahead else None)
    with pytest.raises(ModelError, match=rf"decoder layer 2: cannot read .*{broken}"):
        stream.load_layer(2)
    # nothing read ahead is left over: asking again reads again, and fails again
    with pytest.raises(ModelError, match=rf"decoder layer 2: cannot read .*{broken}"):
        stream.load_layer(2)
    assert not read_ahead_threads()


def test_a_read_error_is_not_raised_for_a_layer_not_asked_for(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "qwen3_moe", max_shard_size="40KB")
    stream = LayerStream(model_dir)
    stream.load_layer(0)
    (model_dir / file_of_layer_2_alone(stream)).unlink()
    stream.load_layer(1)  # reading layer 2 ahead fails in the thread
    assert stream._ahead.index == 2
    stream.load_layer(0)  # the failed read is dropped, not raised
    assert stream._ahead.index is None


def test_layers_load_in_any_order(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "mixtral", max_shard_size="40KB")
    reference = LayerStream(model_dir, read_ahead=False)
    expected = {}
    for index in range(len(reference.layers)):
        expected[index] = layer_state_dict(reference.load_layer(index))
        reference.free_layer(index)
    stream = LayerStream(model_dir)
    # in order (each read ahead), backwards, repeated, skipping, loading without freeing, a read ahead not taken
    order = [0, 1, 2, 1, 0, 0, 2, 0, 1, 0, 1, 2, 2, 1, 2]
    for step, index in enumerate(order):
        layer = stream.load_layer(index)
        assert layer_state_dict(layer).keys() == expected[index].keys()
        for name, tensor in layer_state_dict(layer).items():
            assert torch.equal(tensor, expected[index][name]), (step, index, name)
        if step % 3 != 2:
            stream.free_layer(index)
    assert stream.layers_read_ahead > 0
    random_order = torch.randperm(30, generator=torch.Generator().manual_seed(0)) % len(stream.layers)
    for index in random_order.tolist():
        assert all(torch.equal(tensor, expected[index][name])
                   for name, tensor in layer_state_dict(stream.load_layer(index)).items())
        stream.free_layer(index)
    stream.close()


def test_read_ahead_holds_only_the_next_layer(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "model", "qwen2_moe", max_shard_size="40KB")
    stream = LayerStream(model_dir)
    held = []
    load_layer = stream.load_layer

    def checking_load(index):
        layer = load_layer(index)
        ahead = stream._ahead.wait()
        held.append((sum(not any(p.is_meta for p in each.parameters()) for each in stream.layers),
                     stream._ahead.index, sorted(ahead) if ahead is not None else None))
        return layer

    monkeypatch.setattr(stream, "load_layer", checking_load)
    input_ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(4))
    build_cache(stream, input_ids, 2, tmp_path / "cache")
    last = len(stream.layers) - 1
    # one layer loaded, the next one's tensors (and only them) read; nothing after the last
    assert held == [(1, index + 1, stream.layer_tensor_names(index + 1)) for index in range(last)] + [(1, None, None)]


def test_a_single_layer_load_reads_no_other_layer(tmp_path):
    """A per-layer job loads its one layer: reading the next would double its reading."""
    stream = LayerStream(save_tiny(tmp_path / "model", "olmoe"))
    stream.load_layer(1)
    assert stream._ahead.index is None and not read_ahead_threads()


def test_no_read_ahead_thread_outlives_its_stream(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "olmoe")

    def endless_read(names, cancelled):  # a read that lasts until it is stopped
        assert cancelled.wait(60), "the read-ahead was never stopped"

    with LayerStream(model_dir) as stream:
        stream.tensors.prefetch = endless_read
        stream.embed(torch.zeros(1, 4, dtype=torch.long))
        assert stream._ahead.index == 0 and len(read_ahead_threads()) == 1
    assert not read_ahead_threads() and stream._ahead.index is None
    stream.load_layer(0)  # a closed stream still loads layers, without reading ahead
    stream.load_layer(1)
    assert stream._ahead.index is None
    # a stream dropped mid-pass (e.g. after an error): collecting it stops its thread
    stream = LayerStream(model_dir)
    stream.tensors.prefetch = endless_read
    stream.load_layer(0)
    stream.load_layer(1)
    assert stream._ahead.index == 2 and len(read_ahead_threads()) == 1
    del stream
    gc.collect()
    assert not read_ahead_threads()
