"""Per-layer compression jobs and the streaming checkpoint writer.

Given the calibration cache, every step that works on one MoE layer at a time (all but the whole-model
ones, see ``methods.whole_model_reason``) is independent per layer, so a variant can run as one job per
MoE layer: the job reads only that decoder layer from the checkpoint, applies the variant's steps to it,
and writes the layer's tensors in the hub layout (a "layer part": one safetensors file whose metadata
carries the layer's facts and step reports). The assembly job then writes the checkpoint one decoder
layer at a time (its part, or the source layer for dense layers) without ever holding the model: peak
memory is one layer plus the embeddings.

The assembled checkpoint equals, tensor for tensor, what one job over the whole model saves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe_compress.architectures import adapter_for
from moe_compress.atomic import atomic_directory, atomic_path, write_json
from moe_compress.cache import CacheReader
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import CompressionContext, apply_steps, merge_layer_reports, whole_model_reason
from moe_compress.modelio import (
    DTYPES,
    SOURCE_QUANTIZATION,
    apply_checkpoint_layout,
    block_facts,
    load_tokenizer,
    source_quantization_of,
    write_checkpoint_record,
)
from moe_compress.streaming import INDEX_FILE, LayerStream, build_skeleton, load_into

log = logging.getLogger(__name__)

PART_METADATA_KEY = "moe_compress_layer"


def moe_layer_indices(model: nn.Module) -> list[int]:
    """The decoder layers with an MoE block (works on a meta skeleton)."""
    return sorted(adapter_for(model.config).moe_blocks(model))


def hub_layout_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors (full names) -> the names and layout ``save_pretrained`` writes (e.g. fused
    experts -> one tensor per expert), by transformers' own reverse conversion."""
    from transformers.core_model_loading import revert_weight_conversion

    return {name: tensor.contiguous() for name, tensor in revert_weight_conversion(model, state).items()}


def layer_state(stream: LayerStream, index: int) -> dict[str, torch.Tensor]:
    """A loaded decoder layer's saved tensors under their full names."""
    prefix = f"{stream.adapter.layers}.{index}."
    return {prefix + name: tensor for name, tensor in stream.layers[index].state_dict().items()}


def compress_layer(model_dir: str | Path, layer: int, steps: list[dict], stats: pd.DataFrame | None,
                   cache: str | Path, heldout_fraction: float, dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Apply ``steps`` to MoE layer ``layer`` alone; return its tensors (hub layout) and its facts and reports."""
    for index, step in enumerate(steps):
        reason = whole_model_reason(step)
        if reason:
            raise ConfigError(f"step {index}: {reason}, so it cannot run in a per-layer job "
                              f"(compress.per_layer_jobs gives such variants one job)")
    stream = LayerStream(model_dir, dtype, device, trust_remote_code)
    moe_layers = moe_layer_indices(stream.model)
    if layer not in moe_layers:
        raise ModelError(f"layer {layer} is not an MoE layer of {model_dir} (MoE layers: {moe_layers})")
    stream.load_layer(layer)
    context = CompressionContext.for_model(stream.model, stats=stats, heldout_fraction=heldout_fraction,
                                           moe_inputs={layer: CacheReader(cache).moe_input(layer, stream.device)},
                                           layers={layer})
    reports = apply_steps(stream.model, steps, context)
    block = stream.adapter.moe_blocks(stream.model)[layer]
    tensors = hub_layout_tensors(stream.model, layer_state(stream, layer))
    return tensors, {"layer": layer, "facts": block_facts(stream.adapter, block), "reports": reports}


def write_layer_part(path: str | Path, tensors: dict[str, torch.Tensor], facts: dict) -> None:
    """One file, written atomically: the layer's tensors, its facts and reports in the metadata."""
    with atomic_path(path) as tmp:
        save_file({name: tensor.cpu() for name, tensor in tensors.items()}, tmp,
                  metadata={"format": "pt", PART_METADATA_KEY: json.dumps(facts)})


def read_layer_part_facts(path: str | Path) -> dict:
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if PART_METADATA_KEY not in metadata:
        raise ModelError(f"{path} is not a layer part written by compress_layer (no {PART_METADATA_KEY} metadata)")
    return json.loads(metadata[PART_METADATA_KEY])  # key order kept: the report tables follow it


def read_layer_part(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _outer_state(stream: LayerStream) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (embeddings, final norm, head), loaded and under their
    full names, tied copies left out as ``save_pretrained`` leaves them out."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    prefix = stream.adapter.layers + "."
    names = [name for name in stream.tensors.weight_map if not name.startswith(prefix)]
    load_into(stream.model, stream.tensors.read(names), stream.device)
    stream.model.tie_weights()
    state = {name: tensor for name, tensor in stream.model.state_dict().items() if not name.startswith(prefix)}
    unloaded = sorted(name for name, tensor in state.items() if tensor.is_meta)
    if unloaded:
        raise ModelError(f"{stream.tensors.model_dir}: the checkpoint has no tensors for {unloaded[:5]}")
    return remove_tied_weights_from_state_dict(state, stream.model)


def assemble_checkpoint(model_dir: str | Path, parts: dict[int, str | Path], out_dir: str | Path, record: dict,
                        dtype: str = "float32", trust_remote_code: bool = False) -> dict:
    """Write the checkpoint of ``model_dir`` with its MoE layers replaced by ``parts`` ({layer: part
    file}), one decoder layer per safetensors shard, never more than one layer in memory. Returns the
    completed ``compression.json`` record (the same fields one whole-model job writes)."""
    stream = LayerStream(model_dir, dtype, "cpu", trust_remote_code)
    adapter, model = stream.adapter, stream.model
    moe_layers = moe_layer_indices(model)
    if sorted(parts) != moe_layers:
        raise ModelError(f"layer parts for layers {sorted(parts)}, but the MoE layers of {model_dir} are {moe_layers}")
    part_facts = {layer: read_layer_part_facts(path) for layer, path in sorted(parts.items())}
    for layer, facts in part_facts.items():
        if facts["layer"] != layer:
            raise ModelError(f"{parts[layer]} holds layer {facts['layer']}, not layer {layer}")
    reports = merge_layer_reports([facts["reports"] for facts in part_facts.values()])
    layout, remote_code = apply_checkpoint_layout(model.config, adapter,
                                                  {layer: facts["facts"] for layer, facts in part_facts.items()},
                                                  type(model))
    num_layers = len(stream.layers)
    shard_names = [f"model-{index:05d}-of-{num_layers + 1:05d}.safetensors" for index in range(1, num_layers + 2)]
    weight_map, total_bytes, parameters = {}, 0, 0
    with atomic_directory(out_dir) as tmp:
        for shard, shard_name in enumerate(shard_names):
            if shard == num_layers:
                tensors = hub_layout_tensors(model, _outer_state(stream))
            elif shard in parts:
                tensors = read_layer_part(parts[shard])
            else:  # a dense layer: as loading and saving the whole model would write it
                stream.load_layer(shard)
                tensors = hub_layout_tensors(model, layer_state(stream, shard))
                stream.free_layer(shard)
            save_file(tensors, tmp / shard_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard_name))
            total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
            parameters += sum(tensor.numel() for tensor in tensors.values() if tensor.is_floating_point())
            log.info("wrote %s (%d tensors)", shard_name, len(tensors))
            del tensors
        write_json({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                   tmp / INDEX_FILE)
        model.config.dtype = DTYPES[dtype]
        model.config.save_pretrained(tmp)
        if model.can_generate():
            _generation_config(model_dir, model).save_pretrained(tmp)
        load_tokenizer(model_dir).save_pretrained(tmp)
        return write_checkpoint_record(tmp, {**record, "step_reports": reports,
                                             SOURCE_QUANTIZATION: source_quantization_of(model)},
                                       layout, remote_code, num_layers, parameters)


def _generation_config(model_dir: str | Path, model: nn.Module):
    """The source checkpoint's generation config, as ``from_pretrained`` would attach it."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the one derived from the model config
        return model.generation_config


def skeleton_moe_layers(model_dir: str | Path, trust_remote_code: bool = False) -> list[int]:
    """The MoE layers of a checkpoint, read from its config alone (meta skeleton, no weights)."""
    return moe_layer_indices(build_skeleton(model_dir, "float32", trust_remote_code))
