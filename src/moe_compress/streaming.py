"""A model larger than memory, one decoder layer at a time.

The model is built as a skeleton on the meta device (no memory). A decoder layer's tensors are read from
the checkpoint's safetensors shards with ``safe_open`` (only that layer's bytes), converted from the hub
layout to the in-memory one by transformers' own loading code (per-expert tensors -> fused experts),
used, and returned to meta. Peak memory is one layer's weights + the embeddings + the activations of
the calibration tokens.

What each decoder layer receives besides the hidden states (attention masks, rotary position
embeddings, per-layer-type masks for sliding-window layers) depends only on the batch shape, not on the
previous layers' outputs: one pass of the decoder with every layer swapped for a recorder yields those
arguments, exactly as the model's own forward builds them, for every architecture.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moe_compress.architectures import MoEArchitecture, adapter_for
from moe_compress.errors import ModelError
from moe_compress.modelio import (
    DTYPES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    check_model_dir,
    load_checkpoint_config,
    needs_remote_code,
    resolve_device,
)

SINGLE_FILE = SAFETENSORS_FILE
INDEX_FILE = SAFETENSORS_INDEX_FILE


class CheckpointTensors:
    """Where each tensor of a safetensors checkpoint lives; reads only the tensors asked for."""

    def __init__(self, model_dir: str | Path):
        # the refusal and advice of every loader: pickled weights only, other file names, a shard missing
        self.model_dir = check_model_dir(model_dir, weights=True)
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(self.model_dir / SINGLE_FILE, framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        self.weight_map: dict[str, str] = weight_map

    def names_under(self, prefix: str) -> list[str]:
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file_name, file_names in by_file.items():
            with safe_open(self.model_dir / file_name, framework="pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        return tensors


def build_skeleton(model_dir: str | Path, dtype: str, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device; non-persistent buffers (rotary tables) are
    rebuilt for real, on CPU, as loading would make them."""
    from transformers import AutoModelForCausalLM

    model_dir = check_model_dir(model_dir)
    trust = trust_remote_code or needs_remote_code(model_dir)
    config = load_checkpoint_config(model_dir, trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust)
    rebuild_derived_buffers(model)
    return model.eval()


def rebuild_derived_buffers(model: nn.Module, only_meta: bool = True) -> None:
    """Real values, on CPU, for the non-persistent buffers (rotary tables) of a model built on meta (or,
    with ``only_meta=False``, after ``to_empty``): they are not in the checkpoint; each module that has
    them is built again from the config."""
    for name, module in model.named_modules():
        if any(buffer.is_meta or not only_meta for key, buffer in module._buffers.items()
               if buffer is not None and key in module._non_persistent_buffers_set):
            try:
                fresh = type(module)(config=model.config)
            except TypeError as err:
                raise ModelError(f"layer streaming cannot rebuild the buffers of {name} ({type(module).__name__})") from err
            for key in module._non_persistent_buffers_set:
                module._buffers[key] = fresh._buffers[key]


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put checkpoint tensors (hub names and layout) into ``model``, converting them as ``from_pretrained``
    does (e.g. per-expert gate/up/down -> fused gate_up_proj / down_proj)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as transformers_logging

    settings = LoadStateDictConfig(device_map={"": device}, dtype=next(model.parameters()).dtype,
                                   weight_mapping=get_model_conversion_mapping(model))
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # one bar per layer would flood the job log
    try:
        info, _ = convert_and_load_state_dict_in_model(model, tensors, settings)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    if info.unexpected_keys or info.mismatched_keys or info.conversion_errors:
        raise ModelError(f"could not load {sorted(tensors)[:3]}...: unexpected {sorted(info.unexpected_keys)[:5]}, "
                         f"mismatched {sorted(info.mismatched_keys)[:5]}, errors {info.conversion_errors}")


def _materialised(module: nn.Module) -> bool:
    return not any(tensor.is_meta for tensor in list(module.parameters()) + list(module.buffers()))


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the decoder passes it, passes the
    hidden states through unchanged."""

    def __init__(self, layer: nn.Module, calls: list):
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        self.calls = calls

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ModelError("layer streaming expects decoder layers to be called with keyword arguments")
        self.calls.append(kwargs)
        return hidden_states


class DecoderLayers:
    """A model's decoder layers as the cache pass and the statistics consume them: one layer at a time
    (``load_layer`` ... ``free_layer``), with the embeddings and the arguments the decoder passes each
    layer. ``LoadedModel`` serves a model in memory, ``LayerStream`` a checkpoint read layer by layer;
    the code that consumes MoE blocks is the same for both."""

    model: nn.Module
    adapter: MoEArchitecture
    device: torch.device
    layers: nn.ModuleList

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def load_layer(self, index: int) -> nn.Module:
        raise NotImplementedError

    def free_layer(self, index: int) -> None:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def moe_block(self, index: int) -> nn.Module:
        """The MoE block of decoder layer ``index`` (loaded)."""
        layer = self.load_layer(index)
        if not self.adapter.is_moe_layer(layer):
            raise ModelError(f"decoder layer {index} is not an MoE layer")
        return getattr(layer, self.adapter.moe_block)

    @torch.no_grad()
    def layer_arguments(self, input_ids: torch.Tensor) -> list[dict]:
        """The keyword arguments each decoder layer gets for a batch of this shape (no padding, positions
        from 0), from one pass of the decoder with recorders in place of the layers."""
        calls: list[dict] = []
        originals = list(self.layers)
        recorders = nn.ModuleList(_Recorder(layer, calls) for layer in originals)
        self.adapter.set_decoder_layers(self.model, recorders)
        try:
            self.decoder(inputs_embeds=torch.zeros(*input_ids.shape, self.model.config.hidden_size,
                                                   dtype=next(self.model.parameters()).dtype, device=self.device),
                         use_cache=False)
        except Exception as err:
            # a streamed decoder's final norm is still on meta, so the pass may fail after its last layer; what
            # matters is that every layer was called
            if len(calls) != len(originals):
                raise ModelError(f"layer streaming could not record the decoder's layer arguments: {err}") from err
        finally:
            self.adapter.set_decoder_layers(self.model, self.layers)
        if len(calls) != len(originals):
            raise ModelError(f"the decoder called {len(calls)} of its {len(originals)} layers")
        return calls




class LoadedModel(DecoderLayers):
    """The decoder layers of a model already in memory: loading and freeing are no-ops."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = adapter_for(model.config)
        self.device = next(model.parameters()).device
        self.layers = self.adapter.decoder_layers(model)

    def load_layer(self, index: int) -> nn.Module:
        return self.layers[index]

    def free_layer(self, index: int) -> None:
        pass

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(input_ids.to(self.device))


def decoder_layers_of(model_or_layers) -> DecoderLayers:
    """``model_or_layers`` as ``DecoderLayers`` (a model in memory is wrapped in ``LoadedModel``)."""
    return model_or_layers if isinstance(model_or_layers, DecoderLayers) else LoadedModel(model_or_layers)


class LayerStream(DecoderLayers):
    """A checkpoint's decoder layers, each read from its safetensors when loaded and returned to the meta
    device when freed."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
                 trust_remote_code: bool = False):
        self.model = build_skeleton(model_dir, dtype, trust_remote_code)
        self.adapter: MoEArchitecture = adapter_for(self.model.config)
        self.device = resolve_device(str(device))
        self.tensors = CheckpointTensors(model_dir)
        self.layers = self.adapter.decoder_layers(self.model)
        self._prefix = self.adapter.layers + "."

    def layer_tensor_names(self, index: int) -> list[str]:
        names = self.tensors.names_under(f"{self._prefix}{index}.")
        if not names:
            raise ModelError(f"{self.tensors.model_dir}: no tensors for decoder layer {index} ({self._prefix}{index}.*)")
        return names

    def load_layer(self, index: int) -> nn.Module:
        load_into(self.model, self.tensors.read(self.layer_tensor_names(index)), self.device)
        layer = self.layers[index]
        if not _materialised(layer):
            raise ModelError(f"decoder layer {index}: the checkpoint left some of its tensors unloaded")
        return layer

    def free_layer(self, index: int) -> None:
        self.layers[index].to("meta")
        _return_freed_memory()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``input_ids`` (the embedding table is loaded once, on first use)."""
        embeddings = self.decoder.get_input_embeddings()
        if not _materialised(embeddings):
            path = next(name for name, module in self.model.named_modules() if module is embeddings)
            load_into(self.model, self.tensors.read(self.tensors.names_under(f"{path}.")), self.device)
        return embeddings(input_ids.to(self.device))

def _return_freed_memory() -> None:
    """Hand the freed layer's memory back to the system: glibc keeps freed heap chunks (the checkpoint's
    per-expert tensors are small enough to live there), so without a trim the process grows with every
    layer streamed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass

