"""A model larger than memory, one decoder layer at a time.

The model is built as a skeleton on the meta device (no memory). A decoder layer's tensors are read from
the checkpoint's safetensors shards with ``safe_open`` (only that layer's bytes), dequantized on the
device where the checkpoint is quantized (block-scaled FP8, MXFP4: ``moe_compress.quantized``), converted
from the hub layout to the in-memory one by transformers' own loading code (per-expert tensors -> fused
experts), used, and returned to meta. While a layer computes, a background thread reads the next one from disk
(``LayerStream``'s read-ahead), so a pass over the layers in order can take as little as reading the
checkpoint once, when the disk is the bottleneck. Peak memory is two layers' weights (the one in use,
and the next one's bytes in the page cache) + the embeddings + the activations of the calibration
tokens; one layer's without the read-ahead.

What each decoder layer receives besides the hidden states (attention masks, rotary position
embeddings, per-layer-type masks for sliding-window layers) depends only on the batch shape, not on the
previous layers' outputs: one pass of the decoder with every layer swapped for a recorder yields those
arguments, exactly as the model's own forward builds them, for every architecture.
"""

from __future__ import annotations

import ctypes
import json
import struct
import threading
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moe_compress.architectures import MoEArchitecture, adapter_for
from moe_compress.errors import ModelError
from moe_compress.modelio import (
    DTYPES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    SOURCE_QUANTIZATION_ATTRIBUTE,
    check_model_dir,
    load_checkpoint_config,
    needs_remote_code,
    resolve_device,
)
from moe_compress.quantized import check_source_quantization, dequantize_tensors

SINGLE_FILE = SAFETENSORS_FILE
INDEX_FILE = SAFETENSORS_INDEX_FILE


class CheckpointTensors:
    """Where each tensor of a safetensors checkpoint lives; reads only the tensors asked for.

    A quantized checkpoint (``quantization``: block-scaled FP8 or MXFP4, see ``moe_compress.quantized``) is read
    dequantized, on ``device`` into ``dtype``: ``read`` gives the tensors an unquantized checkpoint stores;
    ``read_stored`` and ``prefetch`` give them as stored, ``dequantized`` turns those into ``read``'s."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        # the refusal and advice of every loader: pickled weights only, other file names, a shard missing
        self.model_dir = check_model_dir(model_dir, weights=True)
        self.quantization = check_source_quantization(self.model_dir)
        self.device, self.dtype = torch.device(device), dtype
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(self.model_dir / SINGLE_FILE, framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        self.weight_map: dict[str, str] = weight_map

    def names_under(self, prefix: str) -> list[str]:
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def _by_file(self, names: list[str]) -> dict[str, list[str]]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        return by_file

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (stored names, whole quantized groups) as an unquantized checkpoint holds them:
        ``read_stored``'s, dequantized where the checkpoint is quantized."""
        return self.dequantized(self.read_stored(names))

    def dequantized(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``read_stored``'s tensors with each quantized group dequantized (on ``device``, into ``dtype``); those
        of an unquantized checkpoint unchanged."""
        return dequantize_tensors(stored, self.quantization, self.device, self.dtype)

    def read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` as safetensors gives them: views of the files, mapped into memory, whose bytes
        are read from disk when first used."""
        tensors = {}
        for file_name, file_names in self._by_file(names).items():
            path = self.model_dir / file_name
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            except (OSError, SafetensorError) as err:
                raise ModelError(f"cannot read {path}: {err}") from err
        return tensors

    def prefetch(self, names: list[str], cancelled: threading.Event | None = None) -> dict[str, torch.Tensor] | None:
        """``read_stored``'s tensors, with their bytes read from disk now, into the page cache, so that whoever
        uses them next finds them in memory. Plain file reads into a small reused buffer, which release the GIL:
        in a background thread they overlap the main thread's compute. None as soon as ``cancelled`` is set.
        Nothing is dequantized here: that is compute, for the thread that loads the layer, on its device."""
        tensors = self.read_stored(names)  # safe_open checks each file (header, size) first
        # into the page cache, not into new tensors: filling fresh memory would cost page faults and a second
        # copy of the layer, on the CPU the compute needs; and the tensors stay those ``read`` gives
        scratch = memoryview(bytearray(_CHUNK_BYTES))
        for file_name, file_names in self._by_file(names).items():
            path = self.model_dir / file_name
            try:
                with open(path, "rb", buffering=0) as file:
                    data_start, offsets = _data_offsets(file)
                    for begin, end in _merged(offsets[name] for name in file_names):
                        file.seek(data_start + begin)
                        left = end - begin
                        while left:
                            if cancelled is not None and cancelled.is_set():
                                return None
                            count = file.readinto(scratch[: min(left, _CHUNK_BYTES)])
                            if not count:
                                raise ModelError(f"the file ends {left} bytes before the end of its tensors' data")
                            left -= count
            except (OSError, ValueError, KeyError, struct.error, ModelError) as err:
                raise ModelError(f"cannot read {path}: {err}") from err
        return tensors


_CHUNK_BYTES = 8 << 20


def _data_offsets(file) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where a safetensors file holds each tensor's bytes: (where the data starts, {name: (begin, end)} from
    there). The format: an 8-byte little-endian header length, the JSON header, the data."""
    (length,) = struct.unpack("<Q", file.read(8))
    header = json.loads(file.read(length))
    return 8 + length, {name: tuple(entry["data_offsets"]) for name, entry in header.items() if name != "__metadata__"}


def _merged(ranges) -> list[tuple[int, int]]:
    """Byte ranges with the overlapping and adjacent ones joined: one read per run of neighbouring tensors."""
    merged: list[list[int]] = []
    for begin, end in sorted(ranges):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(begin, end) for begin, end in merged]


def build_skeleton(model_dir: str | Path, dtype: str, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device; non-persistent buffers (rotary tables) are
    rebuilt for real, on CPU, as loading would make them. A quantized checkpoint's skeleton is the plain
    model (its config without ``quantization_config``): its tensors are loaded dequantized."""
    from transformers import AutoModelForCausalLM

    model_dir = check_model_dir(model_dir)
    trust = trust_remote_code or needs_remote_code(model_dir)
    config = load_checkpoint_config(model_dir, trust)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust)
        rebuild_derived_buffers(model)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as err:
        # a field the class needs is missing or of another form: transformers fails deep inside the class
        import transformers

        raise ModelError(f"{model_dir / 'config.json'}: transformers {transformers.__version__} cannot build a "
                         f"{config.model_type} model from it ({type(err).__name__}: {err}): a field its class reads is "
                         f"missing or of another form than this version expects") from err
    quantization = check_source_quantization(model_dir)
    if quantization is not None:  # for compression.json
        setattr(model, SOURCE_QUANTIZATION_ATTRIBUTE, quantization.record)
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

    def __init__(self, layer: nn.Module, calls: list, inputs: list | None = None):
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type
        self.calls = calls
        self.inputs = inputs  # where given, the hidden states it is passed are recorded too

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ModelError("layer streaming expects decoder layers to be called with keyword arguments")
        self.calls.append(kwargs)
        if self.inputs is not None:
            self.inputs.append(hidden_states)
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

    @torch.no_grad()
    def first_layer_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """What the decoder passes its first layer for these input embeddings: a decoder may transform them
        first (Granite multiplies them by ``embedding_multiplier``). From a pass of the decoder with recorders
        in place of the layers."""
        inputs: list[torch.Tensor] = []
        recorders = nn.ModuleList(_Recorder(layer, [], inputs) for layer in self.layers)
        self.adapter.set_decoder_layers(self.model, recorders)
        try:
            self.decoder(inputs_embeds=embeddings, use_cache=False)
        except Exception:
            if not inputs:  # a streamed decoder's final norm may still be on meta: only the first layer matters
                raise
        finally:
            self.adapter.set_decoder_layers(self.model, self.layers)
        return inputs[0]

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
        return self.first_layer_input(self.decoder.get_input_embeddings()(input_ids.to(self.device)))


def decoder_layers_of(model_or_layers) -> DecoderLayers:
    """``model_or_layers`` as ``DecoderLayers`` (a model in memory is wrapped in ``LoadedModel``)."""
    return model_or_layers if isinstance(model_or_layers, DecoderLayers) else LoadedModel(model_or_layers)


class LayerStream(DecoderLayers):
    """A checkpoint's decoder layers, each read from its safetensors when loaded and returned to the meta
    device when freed.

    Read-ahead (``read_ahead=True``): when the layers are loaded in order (``load_layer(i)`` after
    ``load_layer(i - 1)``; ``embed`` for layer 0), loading layer i starts a background thread that reads
    layer i + 1's bytes from disk into the page cache (``CheckpointTensors.prefetch``), and
    ``load_layer(i + 1)`` takes its tensors, waiting for the read to end if it has not; an error of that
    read is raised there, naming the layer and the file. The tensors are those a direct read gives.

    Peak memory is then two layers' weights: the one loaded, and the next one's bytes in the page cache
    (should the system evict them before their use, they are read again: slower, not wrong). A layer read
    ahead that is not the one asked for next is dropped and the asked one read directly, so any order
    works; a single ``load_layer`` (a per-layer job) reads no other layer. The conversion and the copy to
    ``device`` (host to GPU) stay in ``load_into``, on the calling thread. The thread is a daemon;
    ``close`` (or the stream being garbage-collected, or the interpreter exiting) stops a read in progress
    at its next chunk and waits for it."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
                 trust_remote_code: bool = False, read_ahead: bool = True):
        self.model = build_skeleton(model_dir, dtype, trust_remote_code)
        self.adapter: MoEArchitecture = adapter_for(self.model.config)
        self.device = resolve_device(str(device))
        self.tensors = CheckpointTensors(model_dir, self.device, DTYPES[dtype])
        self.layers = self.adapter.decoder_layers(self.model)
        self._prefix = self.adapter.layers + "."
        self.read_ahead = read_ahead
        self.layers_read_ahead = 0  # how many load_layer calls took a layer the thread had read
        self._last_loaded: int | None = None
        self._ahead = _ReadAhead()
        # the thread holds no reference to the stream, so a stream dropped mid-pass is collected and its read stopped
        weakref.finalize(self, self._ahead.discard)

    def layer_tensor_names(self, index: int) -> list[str]:
        names = self.tensors.names_under(f"{self._prefix}{index}.")
        if not names:
            raise ModelError(f"{self.tensors.model_dir}: no tensors for decoder layer {index} ({self._prefix}{index}.*)")
        return names

    def load_layer(self, index: int) -> nn.Module:
        stored = self._ahead.take(index)
        in_order = stored is not None or (self._last_loaded is not None and index == self._last_loaded + 1)
        if stored is None:
            stored = _layer_tensors(self.tensors, self.layer_tensor_names(index), index)
        else:
            self.layers_read_ahead += 1
        try:  # a quantized checkpoint's layer: dequantized here, on the device, before the conversion
            tensors = self.tensors.dequantized(stored)
        except ModelError as err:
            raise ModelError(f"decoder layer {index}: {err}") from err
        del stored
        load_into(self.model, tensors, self.device)
        del tensors  # before reading ahead: two layers at most, the one loaded and the next
        self._last_loaded = index
        layer = self.layers[index]
        if not _materialised(layer):
            raise ModelError(f"decoder layer {index}: the checkpoint left some of its tensors unloaded")
        if in_order:
            self._start_read_ahead(index + 1)
        return layer

    def free_layer(self, index: int) -> None:
        self.layers[index].to("meta")
        _return_freed_memory()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first decoder layer's input for ``input_ids`` (the embedding table is loaded once, on first use)."""
        embeddings = self.decoder.get_input_embeddings()
        if not _materialised(embeddings):
            path = next(name for name, module in self.model.named_modules() if module is embeddings)
            load_into(self.model, self.tensors.read(self.tensors.names_under(f"{path}.")), self.device)
        if self._ahead.index is None:  # a pass through the decoder starts here: layer 0 comes next
            self._start_read_ahead(0)
        return self.first_layer_input(embeddings(input_ids.to(self.device)))

    def close(self) -> None:
        """Stop reading ahead: a read in progress stops at its next chunk, what it read is dropped. The stream
        still loads layers, without reading ahead."""
        self.read_ahead = False
        self._ahead.discard()

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start_read_ahead(self, index: int) -> None:
        if not self.read_ahead or index >= len(self.layers):
            return
        try:
            names = self.layer_tensor_names(index)
        except ModelError:
            return  # load_layer(index) raises it, if that layer is asked for
        self._ahead.start(index, self.tensors, names)


def _layer_tensors(tensors: CheckpointTensors, names: list[str], index: int,
                   cancelled: threading.Event | None = None) -> dict[str, torch.Tensor] | None:
    """Decoder layer ``index``'s tensors as stored (``read_stored``, or ``prefetch`` with ``cancelled``: the
    read-ahead thread); a read error names the layer and the file."""
    try:
        return tensors.read_stored(names) if cancelled is None else tensors.prefetch(names, cancelled)
    except ModelError as err:
        raise ModelError(f"decoder layer {index}: {err}") from err


class _ReadAhead:
    """One decoder layer's tensors being read from disk by a background thread."""

    def __init__(self):
        self.index: int | None = None
        self._thread: threading.Thread | None = None
        self._cancelled = threading.Event()
        self._tensors: dict[str, torch.Tensor] | None = None
        self._error: BaseException | None = None

    def start(self, index: int, tensors: CheckpointTensors, names: list[str]) -> None:
        self.discard()
        self.index, self._cancelled = index, threading.Event()
        # a daemon: a read in progress never keeps the interpreter from exiting
        self._thread = threading.Thread(target=self._read, args=(tensors, names, index, self._cancelled),
                                        name=f"LayerStream read-ahead (layer {index})", daemon=True)
        self._thread.start()

    def _read(self, tensors: CheckpointTensors, names: list[str], index: int, cancelled: threading.Event) -> None:
        try:
            self._tensors = _layer_tensors(tensors, names, index, cancelled)
        except BaseException as err:  # kept for the load_layer of this layer: nothing is lost with the thread
            self._error = err

    def wait(self) -> dict[str, torch.Tensor] | None:
        """The tensors of layer ``index`` once read (raising the read's error), None if nothing is being read."""
        if self._thread is None:
            return None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._tensors

    def take(self, index: int) -> dict[str, torch.Tensor] | None:
        """Layer ``index``'s tensors if it is the layer being read ahead (waiting for the read), else None
        (another layer's read is dropped); either way nothing is held here afterwards."""
        if self.index != index:
            self.discard()
            return None
        try:
            return self.wait()
        finally:
            self._clear()

    def discard(self) -> None:
        """Stop the read in progress (at its next chunk), wait for the thread, drop what it read."""
        if self._thread is not None:
            self._cancelled.set()
            self._thread.join()
        self._clear()

    def _clear(self) -> None:
        self.index, self._thread, self._tensors, self._error = None, None, None, None


def _return_freed_memory() -> None:
    """Hand the freed layer's memory back to the system: glibc keeps freed heap chunks (the checkpoint's
    per-expert tensors are small enough to live there), so without a trim the process grows with every
    layer streamed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass

