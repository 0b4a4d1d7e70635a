"""The router cache: one forward pass over the calibration tokens that records, for every MoE layer,
what the router saw and decided and what the MoE block received.

Layout of a cache directory:
- ``router_logits.parquet``: one row per (layer, token). Columns ``layer`` (int16), ``token`` (int32,
  = sample * seq_len + position), ``logits`` (fixed-size list of float32, one per expert),
  ``topk_indices`` (fixed-size list of int16) and ``topk_weights`` (fixed-size list of float32, the
  weights the block applied), in rank order: the router's first choice first, by its own choice score
  (``MoEArchitecture.rank_order``), whatever order its top-k kernel returned them in. Where layers route
  to different numbers of experts (a per-layer top-k), the lists have the largest top-k's length and a
  layer's extra slots are skipped ones (index = expert count, weight 0); the manifest holds each layer's
  own top-k, and the reader gives each layer its own.
- ``moe_inputs/layer_NNN.safetensors``: tensor ``hidden_states`` [tokens, hidden], the MoE block's input.
  A residual cache (``build_residual_cache``, manifest ``residual`` true) has the same layout with tensor
  ``residual`` [tokens, hidden] instead: the residual stream the block's output is added to (the input of the
  decoder layer's module named by ``MoEArchitecture.residual_input``), what EASY-EP's saliency compares the
  routed experts' output with.
- ``manifest.json``: the index of the cache: layers, tokens, experts, top-k, hidden size, dtype, each
  calibration sample's source (``sample_sources``, in sample order; token t is in sample t // seq_len), and
  every file with its CRC-32 (the checksum gzip and zip use against accidental corruption, cheaper than
  a cryptographic hash on a cache written on every calibration pass). Readers open the cache through
  its manifest (``CacheReader``) and check each file they read against it, so a corrupted cache is
  never used.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import nn

from moe_compress.atomic import atomic_directory, write_json
from moe_compress.errors import DataError, ModelError, check_finite
from moe_compress.integrity import file_checksum
from moe_compress.streaming import DecoderLayers, decoder_layers_of

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
    residual: list[torch.Tensor] = field(default_factory=list)


def _capture_hooks(adapter, block: nn.Module, capture: LayerCapture, hidden_dtype: torch.dtype) -> list:
    """Hooks on one MoE block: its input, and what its router returned (logits, top-k weights, indices)."""

    def save_input(module, args):
        hidden = args[0]
        capture.hidden_states.append(hidden.reshape(-1, hidden.shape[-1]).to("cpu", hidden_dtype))

    def save_routing(module, args, output):
        logits, weights, indices = output
        weights, indices = adapter.rank_order(block, logits, weights, indices)
        capture.logits.append(logits.float().cpu())
        capture.topk_weights.append(weights.float().cpu())
        capture.topk_indices.append(indices.to(torch.int16).cpu())

    return [block.register_forward_pre_hook(save_input), adapter.router_of(block).register_forward_hook(save_routing)]


def _residual_hook(adapter, layer: nn.Module, capture: LayerCapture, hidden_dtype: torch.dtype):
    """A hook on the decoder layer's module whose input is the residual stream entering its MoE sublayer."""

    def save_residual(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        capture.residual.append(hidden.reshape(-1, hidden.shape[-1]).to("cpu", hidden_dtype))

    module = getattr(layer, adapter.residual_input, None)
    if module is None:
        raise ModelError(f"{type(layer).__name__} has no module {adapter.residual_input!r} "
                         f"(MoEArchitecture.residual_input) to read the residual stream from")
    return module.register_forward_pre_hook(save_residual, with_kwargs=True)


@torch.no_grad()
def capture_layers(layers: DecoderLayers, input_ids: torch.Tensor, batch_size: int,
                   hidden_dtype: torch.dtype = torch.float32,
                   residual: bool = False) -> Iterator[tuple[int, LayerCapture]]:
    """Push ``input_ids`` [samples, seq_len] through the decoder one layer at a time; yield (layer,
    capture) for each MoE layer as soon as it has seen every calibration token. All tokens go through
    layer i before layer i + 1, so only one layer is loaded at a time; the hidden states of all
    calibration tokens are held on the CPU. ``residual``: also capture the residual stream entering each
    MoE sublayer."""
    adapter = layers.adapter
    batches = [input_ids[start : start + batch_size] for start in range(0, len(input_ids), batch_size)]
    hidden = [layers.embed(batch).cpu() for batch in batches]
    arguments = {}  # the layers' keyword arguments depend only on the batch shape
    for batch in batches:
        if batch.shape not in arguments:
            arguments[batch.shape] = layers.layer_arguments(batch)
    for index in range(len(layers.layers)):
        layer = layers.load_layer(index)
        capture, handles = None, []
        if adapter.is_moe_layer(layer):
            capture = LayerCapture([], [], [], [])
            handles = _capture_hooks(adapter, getattr(layer, adapter.moe_block), capture, hidden_dtype)
            if residual:
                handles.append(_residual_hook(adapter, layer, capture, hidden_dtype))
        try:
            for position, batch in enumerate(batches):
                output = layer(hidden[position].to(layers.device), **arguments[batch.shape][index])
                output = output[0] if isinstance(output, tuple) else output
                hidden[position] = output.cpu()
        finally:
            for handle in handles:
                handle.remove()
        layers.free_layer(index)
        log.info("layer %d of %d done%s", index + 1, len(layers.layers), " (MoE: cached)" if capture else "")
        if capture is not None:
            yield index, capture


def build_cache(model_or_layers, input_ids: torch.Tensor, batch_size: int, out_dir: str | Path,
                meta: dict | None = None, hidden_dtype: torch.dtype = torch.float32) -> dict:
    """Write the cache of ``model_or_layers`` (a model in memory or ``DecoderLayers``, e.g. a
    ``LayerStream``) on ``input_ids`` to ``out_dir``, one MoE layer at a time; return the manifest.
    The directory appears only complete: it is written under a temporary name and moved into place."""
    layers = decoder_layers_of(model_or_layers)
    with atomic_directory(out_dir) as tmp:
        writer = CacheWriter(tmp, top_k_width=_largest_top_k(layers))
        try:
            for index, capture in capture_layers(layers, input_ids, batch_size, hidden_dtype):
                writer.add_layer(index, capture)
        finally:
            writer.close()
        return writer.write_manifest(meta or {})


def build_residual_cache(model_or_layers, input_ids: torch.Tensor, batch_size: int, out_dir: str | Path,
                         meta: dict | None = None, hidden_dtype: torch.dtype = torch.float32) -> dict:
    """Write only the residual stream entering each MoE sublayer (``residual`` of ``moe_inputs/layer_NNN``, and a
    manifest a ``CacheReader`` reads) for the same ``input_ids`` as a cache built by ``build_cache``: what EASY-EP
    needs beside that cache, so asking for it never rebuilds the cache every variant depends on. Returns the
    manifest; the directory appears only complete."""
    layers = decoder_layers_of(model_or_layers)
    with atomic_directory(out_dir) as tmp:
        (tmp / INPUTS_DIR).mkdir()
        entries = {}
        for index, capture in capture_layers(layers, input_ids, batch_size, hidden_dtype, residual=True):
            residual = torch.cat(capture.residual)
            check_finite(residual, f"residual stream entering the MoE block of layer {index}")
            data = safetensors_bytes({"residual": residual.contiguous()}, metadata={"layer": str(index)})
            (tmp / inputs_file(index)).write_bytes(data)
            entries[str(index)] = {"tokens": len(residual), "file": inputs_file(index), "crc32": _checksum(data)}
        if not entries:
            raise ModelError("the model has no MoE layers to capture")
        manifest = {**(meta or {}), "residual": True, "layers": entries}
        write_json(manifest, tmp / MANIFEST)
        return manifest


def _largest_top_k(layers: DecoderLayers) -> int | None:
    """The most experts any MoE layer's router picks per token: the length of the cache's top-k lists."""
    adapter = layers.adapter
    return max((adapter.router_settings(block)["top_k"] for block in adapter.moe_blocks(layers.model).values()),
               default=None)


class CacheWriter:
    """Writes the files of a cache into ``directory`` one MoE layer at a time, so the pass never holds
    more than one layer's capture; ``write_manifest`` completes it. ``top_k_width``: the length of the
    top-k lists (the model's largest top-k; a layer with a smaller one is padded with skipped slots)."""

    def __init__(self, directory: Path, top_k_width: int | None = None):
        self.directory = directory
        self.top_k_width = top_k_width
        (directory / INPUTS_DIR).mkdir()
        self._router = None
        self._layers = {}
        self._hidden_size = None

    def add_layer(self, layer: int, capture: LayerCapture) -> None:
        logits = torch.cat(capture.logits)
        weights = torch.cat(capture.topk_weights)
        indices = torch.cat(capture.topk_indices)
        hidden = torch.cat(capture.hidden_states)
        check_finite(logits, f"router logits of layer {layer}")
        check_finite(hidden, f"MoE-block input hidden states of layer {layer}")
        tokens, num_experts = logits.shape
        top_k = indices.shape[1]
        width = max(top_k, self.top_k_width or top_k)
        if width > top_k:  # skipped slots: the expert count as index, no weight
            indices = torch.cat([indices, indices.new_full((tokens, width - top_k), num_experts)], dim=1)
            weights = torch.cat([weights, weights.new_zeros(tokens, width - top_k)], dim=1)
        table = pa.table(
            {
                "layer": pa.array(np.full(tokens, layer, np.int16)),
                "token": pa.array(np.arange(tokens, dtype=np.int32)),
                "logits": pa.FixedSizeListArray.from_arrays(logits.numpy().ravel(), num_experts),
                "topk_indices": pa.FixedSizeListArray.from_arrays(indices.numpy().ravel(), width),
                "topk_weights": pa.FixedSizeListArray.from_arrays(weights.numpy().ravel(), width),
            }
        )
        if self._router is None:
            self._router = pq.ParquetWriter(self.directory / ROUTER_FILE, table.schema)
        elif table.schema != self._router.schema:
            raise ModelError(f"layer {layer}: {num_experts} experts / top-{top_k}, but the cache's first layer has "
                             f"{self._router.schema}; the router cache needs the same expert count in every layer")
        self._router.write_table(table)
        data = safetensors_bytes({"hidden_states": hidden.contiguous()}, metadata={"layer": str(layer)})
        (self.directory / inputs_file(layer)).write_bytes(data)
        self._layers[str(layer)] = {"num_experts": num_experts, "top_k": top_k, "tokens": tokens,
                                    "file": inputs_file(layer), "crc32": _checksum(data)}
        self._hidden_size = int(hidden.shape[1])

    def close(self) -> None:
        if self._router is not None:
            self._router.close()

    def write_manifest(self, meta: dict) -> dict:
        if self._router is None:
            raise ModelError("the model has no MoE layers to capture")
        manifest = {**meta, "layers": self._layers, "hidden_size": self._hidden_size, "router_file": ROUTER_FILE,
                    "router_crc32": file_checksum(self.directory / ROUTER_FILE)}
        write_json(manifest, self.directory / MANIFEST)
        return manifest


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




class CacheReader:
    """A cache directory read through its manifest (``path``: the directory or its ``manifest.json``).
    Every file is checked against the CRC-32 the manifest recorded before it is used."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.manifest_path = path / MANIFEST if path.is_dir() or not path.suffix else path
        self.directory = self.manifest_path.parent
        if not self.manifest_path.is_file():
            raise DataError(f"{self.manifest_path} is missing: the cache in {self.directory} is incomplete or was "
                            f"invalidated; run the workflow again to rebuild it")
        self.manifest = json.loads(self.manifest_path.read_text())

    @property
    def layers(self) -> list[int]:
        return sorted(int(layer) for layer in self.manifest["layers"])

    def _verified(self, path: Path, expected: str, data: bytes | None = None) -> None:
        """Stop if ``path`` is not the file the cache job wrote. The manifest is removed with it, so the next
        run of the workflow sees the cache job's output missing and rebuilds the cache instead of using it."""
        actual = _checksum(data) if data is not None else file_checksum(path)
        if actual != expected:
            self.manifest_path.unlink(missing_ok=True)
            raise CacheCorruptError(f"{path} is corrupt (CRC-32 {actual}, the cache job recorded {expected}); "
                                    f"{self.manifest_path} was removed, so running the workflow again rebuilds the cache")

    def routing(self) -> dict[int, LayerRouting]:
        """The router cache as per-layer arrays, tokens in order."""
        path = self.directory / self.manifest["router_file"]
        self._verified(path, self.manifest["router_crc32"])
        table = pq.read_table(path)
        layers = table.column("layer").to_numpy()
        routing = {}
        for layer in np.unique(layers):
            part = table.filter(pa.compute.equal(table.column("layer"), pa.scalar(layer, pa.int16())))
            part = part.sort_by("token")
            top_k = self.manifest["layers"][str(layer)]["top_k"]  # the layer's own (the lists may be padded)
            routing[int(layer)] = LayerRouting(
                logits=_fixed_list(part.column("logits")),
                topk_indices=_fixed_list(part.column("topk_indices"))[:, :top_k].astype(np.int64),
                topk_weights=np.ascontiguousarray(_fixed_list(part.column("topk_weights"))[:, :top_k]),
            )
        return routing

    def token_sources(self, tokens: int) -> tuple[list[str], np.ndarray]:
        """(the calibration sources in order of first appearance, each of the ``tokens`` cached tokens' index into
        them): token t belongs to sample t // seq_len. A cache without sample sources (an older version's, or
        one built without them) is one source, ``all``."""
        if not self.manifest.get("sample_sources"):
            return ["all"], np.zeros(tokens, dtype=np.int64)
        sample_sources = self.manifest["sample_sources"]
        samples, seq_len = self.manifest["samples"], self.manifest["seq_len"]
        if len(sample_sources) != samples or samples * seq_len != tokens:
            raise DataError(f"{self.manifest_path}: {len(sample_sources)} sample sources of {seq_len} tokens for "
                            f"{samples} samples and {tokens} cached tokens; "
                            f"the cache is inconsistent: run the workflow again to rebuild it")
        names = list(dict.fromkeys(sample_sources))
        per_sample = np.array([names.index(name) for name in sample_sources], dtype=np.int64)
        return names, np.repeat(per_sample, seq_len)

    @property
    def has_residual(self) -> bool:
        """Whether this is a residual cache (``build_residual_cache``)."""
        return bool(self.manifest.get("residual", False))

    def _layer_tensor(self, layer: int, name: str) -> torch.Tensor:
        entry = self.manifest["layers"].get(str(layer))
        if entry is None:
            raise DataError(f"layer {layer} is not in the cache {self.manifest_path} (layers: {self.layers})")
        path = self.directory / entry["file"]
        if not path.is_file():
            raise DataError(f"{path} is missing from the cache {self.directory}; run the workflow again to rebuild it")
        data = path.read_bytes()
        self._verified(path, entry["crc32"], data)
        return load_safetensors(data)[name]

    def moe_input(self, layer: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """One layer's cached MoE-block inputs [tokens, hidden]."""
        return self._layer_tensor(layer, "hidden_states").to(device)

    def residual(self, layer: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """One layer's cached residual stream entering its MoE sublayer [tokens, hidden] (a residual cache)."""
        if not self.has_residual:
            raise DataError(f"the cache {self.directory} holds no residual stream (its manifest's residual is not "
                            f"true): it is not a residual cache; the workflow builds one (results/cache_residual) "
                            f"when a variant has an easy_ep_prune step")
        return self._layer_tensor(layer, "residual").to(device)

    def residuals(self, device: str | torch.device = "cpu") -> Mapping[int, torch.Tensor]:
        """Every layer's cached residual stream, read when a layer is looked up (see ``moe_inputs``)."""
        return _CachedInputs(self, device, self.residual)

    def moe_inputs(self, device: str | torch.device = "cpu") -> Mapping[int, torch.Tensor]:
        """Every layer's cached MoE-block inputs, read when a layer is looked up: iterating over the
        layers holds one layer's inputs at a time."""
        return _CachedInputs(self, device)


class _CachedInputs(Mapping):
    def __init__(self, reader: CacheReader, device, read=None):
        self.reader, self.device = reader, device
        self.read = read or reader.moe_input

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.read(layer, self.device)

    def __iter__(self):
        return iter(self.reader.layers)

    def __len__(self) -> int:
        return len(self.reader.layers)


def read_router_cache(path: str | Path) -> dict[int, LayerRouting]:
    """The router cache of the cache at ``path`` (its directory or manifest)."""
    return CacheReader(path).routing()


def read_moe_inputs(path: str | Path, device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
    """Every layer's cached MoE-block inputs, {layer: [tokens, hidden]}, all in memory."""
    return dict(CacheReader(path).moe_inputs(device))
