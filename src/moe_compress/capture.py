"""The router cache: one forward pass over the calibration tokens that records, for every MoE layer,
what the router saw and decided and what the MoE block received.

Layout of a cache directory:
- ``router_logits.parquet``: one row per (layer, token). Columns ``layer`` (int16), ``token`` (int32,
  = sample * seq_len + position), ``logits`` (fixed-size list of float32, one per expert),
  ``topk_indices`` (fixed-size list of int16) and ``topk_weights`` (fixed-size list of float32, the
  weights the block applied), in rank order: the router's first choice first, by its own choice score
  (``MoEArchitecture.rank_order``), whatever order its top-k kernel returned them in.
- ``moe_inputs/layer_NNN.safetensors``: tensor ``hidden_states`` [tokens, hidden], the MoE block's input.
- ``manifest.json``: layers, tokens, experts, top-k, hidden size, dtype, and the CRC-32 of every file
  (the checksum gzip and zip use against accidental corruption: twice as fast as SHA-256 here, and the
  cache is written on every calibration pass): each reader checks the files it reads against it, so a
  corrupted cache is never used (below).
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import nn

from moe_compress.architectures import adapter_for
from moe_compress.errors import DataError, ModelError, check_finite
from moe_compress.io import atomic_directory, write_json

log = logging.getLogger(__name__)

ROUTER_FILE = "router_logits.parquet"
INPUTS_DIR = "moe_inputs"
MANIFEST = "manifest.json"


def inputs_file(layer: int) -> str:
    return f"{INPUTS_DIR}/layer_{layer:03d}.safetensors"


@dataclass
class LayerCapture:
    logits: list[torch.Tensor]
    topk_weights: list[torch.Tensor]
    topk_indices: list[torch.Tensor]
    hidden_states: list[torch.Tensor]


def _capture_hooks(adapter, block: nn.Module, capture: LayerCapture, hidden_dtype: torch.dtype) -> list:
    """Hooks on one MoE block: its input, and what its router returned (logits, top-k weights, indices)."""

    def save_input(module, args):
        hidden = args[0]
        capture.hidden_states.append(hidden.reshape(-1, hidden.shape[-1]).to("cpu", hidden_dtype))

    def save_routing(module, args, output):
        logits, weights, indices = output
        weights, indices = adapter.rank_order(module, logits, weights, indices)
        capture.logits.append(logits.float().cpu())
        capture.topk_weights.append(weights.float().cpu())
        capture.topk_indices.append(indices.to(torch.int16).cpu())

    return [block.register_forward_pre_hook(save_input), adapter.router_of(block).register_forward_hook(save_routing)]


@torch.no_grad()
def run_capture(model, input_ids: torch.Tensor, batch_size: int, hidden_dtype: torch.dtype = torch.float32):
    """Forward ``input_ids`` [samples, seq_len] in batches through the whole in-memory model; return
    {layer: LayerCapture} on CPU."""
    adapter = adapter_for(model.config)
    blocks = adapter.moe_blocks(model)
    if not blocks:
        raise ModelError("the model has no MoE layers to capture")
    captured = {index: LayerCapture([], [], [], []) for index in blocks}
    handles = [handle for index, block in blocks.items()
               for handle in _capture_hooks(adapter, block, captured[index], hidden_dtype)]
    device = next(model.parameters()).device
    # The decoder alone: the LM head's vocabulary projection is not needed for the cache.
    backbone = model.get_decoder()
    try:
        for start in range(0, len(input_ids), batch_size):
            backbone(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def run_streamed_capture(stream, input_ids: torch.Tensor, batch_size: int, writer: "CacheWriter",
                         hidden_dtype: torch.dtype = torch.float32) -> None:
    """The same cache as ``run_capture``, with one decoder layer in memory at a time (``stream``: a
    streaming.LayerStream). All calibration tokens go through layer i, its MoE inputs and routing are
    written, the layer is freed, then layer i + 1. Holds the hidden states of all calibration tokens
    (on CPU) and one layer's weights."""
    adapter = stream.adapter
    batches = [input_ids[start : start + batch_size] for start in range(0, len(input_ids), batch_size)]
    hidden = [stream.embed(batch).cpu() for batch in batches]
    arguments = {}  # the layers' keyword arguments depend only on the batch shape
    for batch in batches:
        if batch.shape not in arguments:
            arguments[batch.shape] = stream.layer_arguments(batch)
    moe_layers = 0
    for index in range(len(stream.layers)):
        layer = stream.load_layer(index)
        capture = None
        if adapter.is_moe_layer(layer):
            capture = LayerCapture([], [], [], [])
            handles = _capture_hooks(adapter, getattr(layer, adapter.moe_block), capture, hidden_dtype)
        try:
            for position, batch in enumerate(batches):
                output = layer(hidden[position].to(stream.device), **arguments[batch.shape][index])
                output = output[0] if isinstance(output, tuple) else output
                hidden[position] = output.cpu()
        finally:
            if capture is not None:
                for handle in handles:
                    handle.remove()
        stream.free_layer(index)
        if capture is not None:
            writer.add_layer(index, capture)
            moe_layers += 1
        log.info("layer %d of %d streamed%s", index + 1, len(stream.layers), " (MoE: cached)" if capture else "")
    if not moe_layers:
        raise ModelError("the model has no MoE layers to capture")


class CacheWriter:
    """Writes a cache directory one layer at a time (so a streamed pass never holds more than one
    layer's capture), under a temporary name that ``finish`` moves into place; leaving the ``with``
    block without ``finish`` (an error) removes it."""

    def __init__(self, out_dir: str | Path):
        self._atomic = atomic_directory(out_dir)
        self.tmp = self._atomic.__enter__()
        (self.tmp / INPUTS_DIR).mkdir()
        self._router = None
        self._layers = {}
        self._hidden_size = None
        self._finished = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if not self._finished:
            self.abort()
        return False

    def add_layer(self, layer: int, capture: LayerCapture) -> None:
        logits = torch.cat(capture.logits)
        weights = torch.cat(capture.topk_weights)
        indices = torch.cat(capture.topk_indices)
        hidden = torch.cat(capture.hidden_states)
        check_finite(logits, f"router logits of layer {layer}")
        check_finite(hidden, f"MoE-block input hidden states of layer {layer}")
        tokens, num_experts = logits.shape
        top_k = indices.shape[1]
        table = pa.table(
            {
                "layer": pa.array(np.full(tokens, layer, np.int16)),
                "token": pa.array(np.arange(tokens, dtype=np.int32)),
                "logits": pa.FixedSizeListArray.from_arrays(logits.numpy().ravel(), num_experts),
                "topk_indices": pa.FixedSizeListArray.from_arrays(indices.numpy().ravel(), top_k),
                "topk_weights": pa.FixedSizeListArray.from_arrays(weights.numpy().ravel(), top_k),
            }
        )
        if self._router is None:
            self._router = pq.ParquetWriter(self.tmp / ROUTER_FILE, table.schema)
        elif table.schema != self._router.schema:
            raise ModelError(f"layer {layer}: {num_experts} experts / top-{top_k}, but the cache's first layer has "
                             f"{self._router.schema}; the router cache needs the same expert count in every layer")
        self._router.write_table(table)
        data = safetensors_bytes({"hidden_states": hidden.contiguous()}, metadata={"layer": str(layer)})
        (self.tmp / inputs_file(layer)).write_bytes(data)
        self._layers[str(layer)] = {"num_experts": num_experts, "top_k": top_k, "tokens": tokens,
                                    "crc32": _checksum(data)}
        self._hidden_size = int(hidden.shape[1])

    def finish(self, meta: dict) -> dict:
        if self._router is None:
            raise ModelError("the model has no MoE layers to capture")
        self._router.close()
        manifest = {**meta, "layers": self._layers, "hidden_size": self._hidden_size,
                    "router_crc32": _file_checksum(self.tmp / ROUTER_FILE)}
        write_json(manifest, self.tmp / MANIFEST)
        self._atomic.__exit__(None, None, None)
        self._finished = True
        return manifest

    def abort(self) -> None:
        if self._router is not None:
            self._router.close()
        self._finished = True
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_cache(captured: dict[int, LayerCapture], out_dir: str | Path, meta: dict) -> dict:
    """Write the cache directory atomically; return the manifest."""
    with CacheWriter(out_dir) as writer:
        for layer, capture in captured.items():
            writer.add_layer(layer, capture)
        return writer.finish(meta)


@dataclass(frozen=True)
class LayerRouting:
    logits: np.ndarray  # float32 [tokens, experts]
    topk_indices: np.ndarray  # int64 [tokens, k]
    topk_weights: np.ndarray  # float32 [tokens, k]


def _fixed_list(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)


class CacheCorruptError(DataError):
    """A cache file does not match the checksum its manifest recorded."""


def _checksum(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def _file_checksum(path: Path) -> str:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _verified(path: Path, cache_dir: Path, expected: str, data: bytes | None = None) -> None:
    """Stop if ``path`` is not the file the cache job wrote. The manifest is removed with it, so the next
    run of the workflow sees the cache job's output missing and rebuilds the cache instead of using it."""
    actual = _checksum(data) if data is not None else _file_checksum(path)
    if actual != expected:
        manifest = cache_dir / MANIFEST
        manifest.unlink(missing_ok=True)
        raise CacheCorruptError(f"{path} is corrupt (CRC-32 {actual}, the cache job recorded {expected}); {manifest} "
                                f"was removed, so running the workflow again rebuilds the cache")


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: the cache in {cache_dir} is incomplete or was invalidated; run the "
                        f"workflow again to rebuild it")
    return json.loads(path.read_text())


def read_router_cache(path: str | Path) -> dict[int, LayerRouting]:
    """Read ``router_logits.parquet`` (the file or its directory) into per-layer arrays, after checking
    it against the manifest's checksum."""
    path = Path(path)
    if path.is_dir():
        path = path / ROUTER_FILE
    _verified(path, path.parent, read_manifest(path.parent)["router_crc32"])
    table = pq.read_table(path)
    layers = table.column("layer").to_numpy()
    routing = {}
    for layer in np.unique(layers):
        part = table.filter(pa.compute.equal(table.column("layer"), pa.scalar(layer, pa.int16())))
        part = part.sort_by("token")
        routing[int(layer)] = LayerRouting(
            logits=_fixed_list(part.column("logits")),
            topk_indices=_fixed_list(part.column("topk_indices")).astype(np.int64),
            topk_weights=_fixed_list(part.column("topk_weights")),
        )
    return routing


def moe_input_files(inputs_dir: str | Path) -> dict[int, Path]:
    """{layer: file} of the cached MoE-block inputs (``inputs_dir`` is ``<cache>/moe_inputs``)."""
    files = {int(path.stem.removeprefix("layer_")): path for path in sorted(Path(inputs_dir).glob("layer_*.safetensors"))}
    if not files:
        raise ModelError(f"no cached MoE inputs in {inputs_dir}")
    return files


def read_moe_input(path: str | Path, device: str | torch.device = "cpu") -> torch.Tensor:
    """One layer's cached MoE-block inputs [tokens, hidden], after checking the file against the manifest."""
    path = Path(path)
    cache_dir = path.parent.parent
    layer = str(int(path.stem.removeprefix("layer_")))
    entry = read_manifest(cache_dir)["layers"].get(layer)
    if entry is None:
        raise DataError(f"{path}: layer {layer} is not in the cache manifest {cache_dir / MANIFEST}")
    data = path.read_bytes()
    _verified(path, cache_dir, entry["crc32"], data)
    return load_safetensors(data)["hidden_states"].to(device)


def read_moe_inputs(inputs_dir: str | Path, device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
    """Every layer's cached MoE-block inputs, {layer: [tokens, hidden]}."""
    return {layer: read_moe_input(path, device) for layer, path in moe_input_files(inputs_dir).items()}
