"""The structure of a checkpoint, read from its saved tensors: what the recipe's ``analyze`` step prints
before anything is cut, for the source model and for every variant checkpoint.

Every number that a tensor can tell comes from the safetensors headers (names, shapes, dtypes, byte
ranges; no weight is read): parameters and bytes by module type, experts per MoE layer (the router's
rows), expert and MLP widths, query and key-value heads (the projections' sizes over the head size).
The config says only what no tensor shape can: the head size, top-k and the per-layer routing settings
the pipeline writes (``moe_compress_router_settings``, ``moe_compress_dynamic_skip``). Where the config
disagrees with the tensors, the tensors are reported and the difference is listed under ``notes``.

A saved tensor is named in the checkpoint's (hub) layout: per-expert ``experts.<e>.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.<e>.w1``, ... Each name is mapped to the model's own parameter the way
``from_pretrained`` maps it (transformers' conversion mapping, on a meta-device skeleton of the model), and
classified with the adapter table: tensors under ``<layers>.<i>.<moe_block>.<experts>`` are routed experts,
under ``.<router>`` (and the block's own per-expert tensors) the router, under a shared module shared
experts; the ``<moe_block>`` slot of a layer without routed experts is its dense MLP. A model without MoE
blocks (a dense decoder) is all dense MLP. Outside that slot, normalisation layers (a module whose class
is a norm, wherever it sits) are ``norms``, and the rest of a decoder layer's modules, its token mixer
(self-attention, linear attention, short convolution), is ``attention``. The model's input and output
embedding modules are ``embeddings`` and ``lm_head``; an output embedding tied to the input one is stored
once, counted once (under embeddings), and reported as ``tied``.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from moe_compress.architectures import adapter_for
from moe_compress.atomic import atomic_path, write_json
from moe_compress.errors import ModelError
from moe_compress.modelio import (
    COMPRESSION_RECORD,
    LAYERS_FILE,
    REMOTE_CODE_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    check_model_dir,
    needs_remote_code,
    read_compression_record,
)
from moe_compress.quantized import check_source_quantization, dense_tensor_facts
from moe_compress.remote_code.moe_compress_layers import dictionary_names, factor_names

FORMAT_VERSION = 1
MODULE_TYPES = ("embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp", "norms",
                "lm_head", "other")
# what the analysis reads of a checkpoint folder besides the safetensors headers (the workflow checks
# these against their checksums; the weight files by size, as only their headers are read)
FILES_READ = ("config.json", SAFETENSORS_INDEX_FILE, COMPRESSION_RECORD, REMOTE_CODE_FILE, LAYERS_FILE)
# per-layer config keys the pipeline writes (modelio.apply_checkpoint_layout) that the analysis interprets
# moe_compress_layer_fields restates the others for the vLLM plugin; moe_compress_novice is read as novices
_KNOWN_LAYER_KEYS = ("moe_compress_experts_per_layer", "moe_compress_router_settings", "moe_compress_low_rank",
                     "moe_compress_dynamic_skip", "moe_compress_dictionary", "moe_compress_expert_width",
                     "moe_compress_layer_fields", "moe_compress_novice")


# --- the tensors: safetensors headers ------------------------------------------------------------------

def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "bytes"}} of every tensor in one safetensors file, from its header alone
    (an 8-byte little-endian length, then that many bytes of JSON). A file that is not one, or whose
    header places a tensor beyond the file's end (a truncated copy), is refused naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise ValueError(f"its header length ({length} bytes) is beyond the file's {size} bytes")
            header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (OSError, ValueError) as err:  # json and unicode decode errors are ValueErrors
        raise ModelError(f"{path}: not a readable safetensors file ({err}); copy or download it again") from err
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(offset) for offset in entry["data_offsets"])
            shape = [int(dim) for dim in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{path}: the header entry of tensor {name!r} has no dtype, shape and "
                             "data_offsets") from err
        if not 0 <= begin <= end <= data_bytes:
            raise ModelError(f"{path}: tensor {name!r} lies beyond the end of the file (bytes {begin}-{end} of "
                             f"{data_bytes}); the file is truncated: copy or download it again")
        tensors[name] = {"dtype": dtype, "shape": shape, "bytes": end - begin}
    return tensors


def checkpoint_tensors(path: str | Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "bytes", "file"}} of every tensor a checkpoint stores: one
    ``model.safetensors``, or the shards its ``model.safetensors.index.json`` names (each tensor from the
    shard the index names, as loading reads it); a quantized source's as the dense tensors they hold
    (``quantized.dense_tensor_facts``). Raises naming the file: no config.json, no weights, a shard missing,
    unreadable or without a tensor the index puts in it."""
    path = check_model_dir(path, weights=True)
    return dense_tensor_facts(_stored_tensors(path), check_source_quantization(path))


def _stored_tensors(path: Path) -> dict[str, dict]:
    index = path / SAFETENSORS_INDEX_FILE
    if not index.is_file():
        return {name: {**facts, "file": SAFETENSORS_FILE}
                for name, facts in read_safetensors_header(path / SAFETENSORS_FILE).items()}
    weight_map = json.loads(index.read_text())["weight_map"]  # check_model_dir has parsed it
    headers = {shard: read_safetensors_header(path / shard) for shard in sorted(set(weight_map.values()))}
    tensors = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise ModelError(f"{index}: names tensor {name!r} in {path / shard}, which does not hold it; the shards "
                             f"and the index are from different checkpoints: copy or download them again")
        tensors[name] = {**headers[shard][name], "file": shard}
    return tensors


def numel(shape: list[int]) -> int:
    return math.prod(shape)


# --- the model's own names ------------------------------------------------------------------------------

def model_parameter_names(skeleton, names) -> dict[str, str | None]:
    """{saved name: the model's own parameter (or persistent buffer) it loads into, None for a tensor the
    model does not load}, renamed as ``from_pretrained`` renames it (the conversion mapping of each
    architecture: per-expert hub tensors -> the fused experts, Mixtral's w1/w2/w3, ...)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = copy.deepcopy(get_model_conversion_mapping(skeleton))  # some renamings keep state across keys
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    state = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", None)
    result = {}
    for name in sorted(names, key=dot_natural_key):  # the order loading renames them in
        renamed, _ = rename_source_key(name, renamings, converters, prefix, state)
        if renamed not in state and name in state:
            renamed = name
        result[name] = renamed if renamed in state else None
    return result


def _module_name(model, module) -> str | None:
    if module is None:
        return None
    return next((name for name, candidate in model.named_modules() if candidate is module), None)


def _is_norm(skeleton, parameter: str) -> bool:
    parent = parameter.rpartition(".")[0]
    try:
        module = skeleton.get_submodule(parent)
    except AttributeError:
        return False
    return "norm" in type(module).__name__.lower()


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


class _Layout:
    """Where the adapter table puts things, as prefixes of the model's own parameter names."""

    def __init__(self, adapter, skeleton, model_names: dict[str, str | None]):
        self.adapter = adapter
        self.skeleton = skeleton
        self.layers = adapter.layers + "."
        self.block = getattr(adapter, "moe_block", None)
        self.embeddings = _module_name(skeleton, skeleton.get_input_embeddings())
        self.lm_head = _module_name(skeleton, skeleton.get_output_embeddings())
        # MoE layers: those that store routed experts (the tensors decide, not the config); none in a dense decoder
        moe_layers = set()
        for name in filter(None, model_names.values() if getattr(adapter, "moe", True) else ()):
            layer, part = self.layer_part(name)
            inside = self.block_part(part) if layer is not None else None
            if inside is not None and _under(inside, adapter.experts):
                moe_layers.add(layer)
        self.moe_layers = sorted(moe_layers)

    def layer_part(self, name: str) -> tuple[int | None, str]:
        """(decoder layer, the rest of the name below it), or (None, name) outside the decoder layers."""
        if name.startswith(self.layers):
            index, _, rest = name[len(self.layers):].partition(".")
            if index.isdigit() and rest:
                return int(index), rest
        return None, name

    def block_part(self, part: str) -> str | None:
        if self.block and part.startswith(self.block + "."):
            return part[len(self.block) + 1:]
        return None

    def classify(self, name: str | None, saved_name: str) -> tuple[str, int | None, str | None]:
        """(module type, decoder layer or None, the token mixer's module for ``attention``) of one tensor:
        ``name`` the model's parameter (None: a tensor the model does not load)."""
        if name is None:
            layer, _ = self.layer_part(saved_name)
            return "other", layer, None
        adapter = self.adapter
        layer, part = self.layer_part(name)
        if layer is not None:
            inside = self.block_part(part)
            if inside is not None:
                if layer not in self.moe_layers:
                    return "dense_mlp", layer, None
                if _under(inside, adapter.experts):
                    return "routed_experts", layer, None
                if _under(inside, adapter.router) or any(_under(inside, tensor) for tensor in adapter.block_tensors):
                    return "router", layer, None
                if any(_under(inside, module) for module in adapter.shared_modules):
                    return "shared_experts", layer, None
                return "other", layer, None
            if _is_norm(self.skeleton, name):
                return "norms", layer, None
            mixer, dot, _ = part.partition(".")
            return ("attention", layer, mixer) if dot else ("other", layer, None)
        if self.embeddings and _under(name, self.embeddings):
            return "embeddings", None, None
        if self.lm_head and _under(name, self.lm_head):
            return "lm_head", None, None
        if _is_norm(self.skeleton, name):
            return "norms", None, None
        return "other", None, None


# --- one checkpoint --------------------------------------------------------------------------------------

def _layer_keyed(raw: dict, key: str) -> dict[str, object]:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _layer_int(config, field: str | None, layer: int) -> int | None:
    """Config ``field`` for decoder layer ``layer``: its entry where the field is a per-layer list."""
    value = getattr(config, field, None) if field else None
    if isinstance(value, (list, tuple)):
        value = value[layer] if layer < len(value) else None
    return _int_or_none(value)


def _head_sizes(config) -> tuple[int | None, int | None, int | None]:
    """(query/key head size, value head size, MLA's no-rope key part) from the config, as the model computes
    them: the one number per head no tensor shape gives (a projection holds heads x head size)."""
    heads = _int_or_none(getattr(config, "num_attention_heads", None))
    hidden = _int_or_none(getattr(config, "hidden_size", None))
    head_dim = _int_or_none(getattr(config, "qk_head_dim", None)) or _int_or_none(getattr(config, "head_dim", None))
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    value_dim = _int_or_none(getattr(config, "v_head_dim", None)) or head_dim
    return head_dim, value_dim, _int_or_none(getattr(config, "qk_nope_head_dim", None))


def _divide(total: int, size: int | None, what: str, notes: list[str]) -> int | None:
    if not size:
        return None
    if total % size:
        notes.append(f"{what}: {total} is not a multiple of the head size {size}")
        return None
    return total // size


def _attention_facts(shapes: dict[str, list[int]], mixer: str, config, layer: int, notes: list[str]) -> dict:
    """Query and key-value heads of one layer's token mixer from its projections' shapes: query heads =
    the output projection's input width / value head size (or the query projection's rows / head size),
    key-value heads = the key projection's rows / head size (MLA: kv_b_proj rows / (no-rope key + value
    head size)). None where the mixer has no such projections (linear attention, convolution)."""
    head_dim, value_dim, nope_dim = _head_sizes(config)

    def weight(name):
        shape = shapes.get(f"{mixer}.{name}.weight")
        return shape if shape is not None and len(shape) == 2 else None

    where = f"layer {layer} {mixer}"
    heads = kv_heads = None
    if weight("o_proj") is not None and any(weight(name) is not None
                                            for name in ("q_proj", "q_b_proj", "k_proj", "qkv_proj")):
        heads = _divide(weight("o_proj")[1], value_dim, f"{where}.o_proj input width", notes)
    elif weight("q_proj") is not None:
        heads = _divide(weight("q_proj")[0], head_dim, f"{where}.q_proj rows", notes)
    elif weight("q_b_proj") is not None:
        heads = _divide(weight("q_b_proj")[0], head_dim, f"{where}.q_b_proj rows", notes)
    if weight("k_proj") is not None:
        kv_heads = _divide(weight("k_proj")[0], head_dim, f"{where}.k_proj rows", notes)
    elif weight("kv_b_proj") is not None and nope_dim is not None and value_dim:
        # multi-head latent attention: every head its own key and value, up-projected from a shared latent
        kv_heads = _divide(weight("kv_b_proj")[0], nope_dim + value_dim, f"{where}.kv_b_proj rows", notes)
    elif weight("qkv_proj") is not None and heads is not None and head_dim and value_dim == head_dim:
        # one fused projection [(query heads + 2 x key-value heads) x head size, hidden]
        kv_rows = weight("qkv_proj")[0] - heads * head_dim
        kv_heads = _divide(kv_rows // 2, head_dim, f"{where}.qkv_proj rows", notes) if kv_rows > 0 else None
    if heads is None:
        return {}
    facts = {"attention_heads": heads, "key_value_heads": kv_heads, "head_dim": head_dim}
    if weight("kv_b_proj") is not None and weight("k_proj") is None:
        facts["latent_attention"] = True  # its config's num_key_value_heads means nothing
    if value_dim != head_dim:
        facts["value_head_dim"] = value_dim
    return facts


def _width(shapes: list[list[int]], hidden: int | None) -> int | None:
    """The inner width of an MLP from its 2-D weights: the input size of its output projection, the weight
    [hidden, width] that writes the hidden state (a fused gate/up [2 x width, hidden] or a gate [1, hidden]
    does not)."""
    widths = {shape[1] for shape in shapes if len(shape) == 2 and shape[0] == hidden}
    return max(widths) if widths else None


def _expert_facts(adapter, layer: int, shapes: dict[str, list[int]], hidden: int | None, notes: list[str]) -> dict:
    """Experts (the router's rows), expert width and storage of one MoE layer, from the tensors.
    ``shapes``: {the model's parameter name below the MoE block: [shape, ...]} (several for the
    per-expert hub tensors that load into one fused parameter)."""
    router_path = adapter.block_path("router", adapter.router_tensors[0])
    router = shapes.get(router_path)
    experts = None
    if router:
        dim = adapter.expert_dim("router", adapter.router_tensors[0])
        experts = router[0][dim] if len(router[0]) > dim else None
    if experts is None:
        notes.append(f"layer {layer}: no router tensor {adapter.moe_block}.{router_path}; expert count unknown")
    output = adapter.expert_matrices[1]

    def stored(name):
        found = shapes.get(f"{adapter.experts}.{name}")
        return found[0] if found else None

    coded = {}
    for matrix in adapter.expert_matrices:
        matrix_left, matrix_right = factor_names(matrix)
        atoms, values, _ = dictionary_names(matrix)
        if stored(matrix_left) and stored(matrix_right):  # [E or 1, out, r], [E or 1, r, in]; 1: shared by all
            shared = [side for side, shape in (("left", stored(matrix_left)), ("right", stored(matrix_right)))
                      if shape[0] == 1 and experts != 1]
            coded[matrix] = {"rank": stored(matrix_right)[-2], "shared": shared[0] if shared else None}
        elif stored(atoms) and stored(values):  # atoms [H, atoms], codes [E, n, sparsity]
            coded[matrix] = {"atoms": stored(atoms)[-1], "sparsity": stored(values)[-1]}
    if stored(factor_names(output)[1]):
        width = stored(factor_names(output)[1])[-1]  # the right factor reads the intermediate neurons
    elif stored(dictionary_names(output)[1]):
        width = stored(dictionary_names(output)[1])[1]  # one code per intermediate neuron (a column of down)
    else:
        dense = shapes.get(f"{adapter.experts}.{output}", [])
        widths = {dim for shape in dense for dim in shape[-2:] if dim != hidden} or ({hidden} if dense else set())
        if len(widths) > 1:
            notes.append(f"layer {layer}: experts of several widths {sorted(widths)}")
        width = max(widths) if widths else None
    kind = "dense"
    if coded:
        kind = "dictionary" if any("atoms" in facts for facts in coded.values()) else "low_rank"
    return {"experts": experts, "expert_width": width, "expert_format": kind,
            "low_rank": coded if kind == "low_rank" else None, "dictionary": coded if kind == "dictionary" else None}


@dataclass
class _Tally:
    """The saved tensors summed up: parameters and bytes by module type, parameters by dtype, and per decoder
    layer what its rows are computed from."""

    parameters: dict[str, int]
    stored: dict[str, int]  # bytes
    dtypes: Counter
    # per decoder layer: parameters and bytes by module type, its token mixers, the mixers' shapes, the MoE
    # block's shapes (by the name below the block) and the dense MLP's shapes
    layers: dict[int, dict]
    matrices: dict[str, list[int]]  # the [vocab, hidden] weights of the input and output embeddings
    not_loaded: list[str]  # saved names the model does not load


def _tally_tensors(tensors: dict[str, dict], model_names: dict[str, str | None], layout: _Layout) -> _Tally:
    tally = _Tally(dict.fromkeys(MODULE_TYPES, 0), dict.fromkeys(MODULE_TYPES, 0), Counter(), {}, {}, [])
    for saved in sorted(tensors):
        facts, model_name = tensors[saved], model_names[saved]
        kind, layer, mixer = layout.classify(model_name, saved)
        # weights only: an integer tensor (a dictionary code's atom indices) is bookkeeping, counted in bytes
        count = 0 if facts["dtype"].startswith(("I", "U", "BOOL")) else numel(facts["shape"])
        tally.parameters[kind] += count
        tally.stored[kind] += facts["bytes"]
        tally.dtypes[facts["dtype"]] += count
        if model_name is None:
            tally.not_loaded.append(saved)
        if kind in ("embeddings", "lm_head") and len(facts["shape"]) == 2 and model_name.endswith(".weight"):
            tally.matrices[kind] = facts["shape"]
        if layer is None:
            continue
        entry = tally.layers.setdefault(layer, {"parameters": Counter(), "bytes": Counter(), "mixers": set(),
                                                "shapes": {}, "block": {}, "mlp": []})
        entry["parameters"][kind] += count
        entry["bytes"][kind] += facts["bytes"]
        if model_name is None:
            continue
        _, part = layout.layer_part(model_name)
        if kind == "attention":
            entry["mixers"].add(mixer)
            entry["shapes"][part] = facts["shape"]
        elif kind in ("routed_experts", "router", "shared_experts"):
            entry["block"].setdefault(layout.block_part(part), []).append(facts["shape"])
        elif kind == "dense_mlp":
            entry["mlp"].append(facts["shape"])
    return tally


def _embedding_facts(config, layout: _Layout, tally: _Tally, notes: list[str]) -> tuple[int | None, int | None, str]:
    """(hidden size, vocabulary size, how the output head is stored: separate, tied or none), from the embedding
    matrices. A tied pair saved under its output name is moved to the embeddings' counts."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if tied and not tally.parameters["embeddings"] and tally.parameters["lm_head"]:
        for counts in (tally.parameters, tally.stored):
            counts["embeddings"], counts["lm_head"] = counts["lm_head"], 0
    embedding_shape = tally.matrices.get("embeddings") or tally.matrices.get("lm_head")
    hidden, vocab = (embedding_shape[1], embedding_shape[0]) if embedding_shape else (None, None)
    config_hidden = _int_or_none(getattr(config, "hidden_size", None))
    if hidden is not None and config_hidden is not None and hidden != config_hidden:
        notes.append(f"hidden size: {hidden} in the embeddings, {config_hidden} in config.json")
    if tally.parameters["lm_head"]:
        lm_head = "separate"
    else:
        lm_head = "tied" if tied and layout.lm_head else "none"
    return hidden, vocab, lm_head


@dataclass(frozen=True)
class _ConfigSays:
    """What config.json (and compression.json) say per layer, read beside the tensors: the per-layer keys the
    pipeline writes ({layer: value}), the stock fields they are checked against, and the measured active experts."""

    router_settings: dict
    dynamic_skip: dict
    experts: dict
    expert_widths: dict
    novices: dict  # MoNE: per layer {num_experts, novices (their slots)}
    other_codings: dict[str, dict]  # per-layer moe_compress_* keys the analysis does not interpret
    measured_active_experts: dict
    width_field: str | None
    num_experts: int | None
    attention_heads: int | None
    key_value_heads: int | None
    layer_types: list | None


def _config_says(raw: dict, config, adapter, path: Path) -> _ConfigSays:
    record = read_compression_record(path) or {}
    reports = record.get("step_reports") or []
    layer_types = getattr(config, "layer_types", None)
    return _ConfigSays(
        router_settings=_layer_keyed(raw, "moe_compress_router_settings"),
        dynamic_skip=_layer_keyed(raw, "moe_compress_dynamic_skip"),
        experts=_layer_keyed(raw, "moe_compress_experts_per_layer"),
        expert_widths=_layer_keyed(raw, "moe_compress_expert_width"),
        novices=_layer_keyed(raw, "moe_compress_novice"),
        other_codings={key.removeprefix("moe_compress_"): _layer_keyed(raw, key) for key in sorted(raw)
                       if key.startswith("moe_compress_") and key not in _KNOWN_LAYER_KEYS and _layer_keyed(raw, key)
                       and all(str(index).isdigit() for index in _layer_keyed(raw, key))},
        measured_active_experts=(reports[-1].get("active_experts_mean") or {}) if reports else {},
        width_field=getattr(adapter, "config_expert_width", None),
        num_experts=_int_or_none(getattr(config, adapter.config_num_experts, None)),
        attention_heads=_int_or_none(getattr(config, "num_attention_heads", None)),
        key_value_heads=_int_or_none(getattr(config, "num_key_value_heads", None)),
        layer_types=layer_types if isinstance(layer_types, list) else None,
    )


def _add_attention_facts(row: dict, entry: dict, config, says: _ConfigSays, notes: list[str]) -> None:
    """The heads of the layer's first token mixer that has them, checked against config.json in an attention
    layer."""
    index = row["layer"]
    for mixer in row["mixers"]:
        attention = _attention_facts(entry["shapes"], mixer, config, index, notes)
        if attention:
            row.update(attention)
            break
    if "attention_heads" not in row or row.get("layer_type") not in (None, "full_attention", "sliding_attention",
                                                                     "attention"):
        return
    for field, expected in (("attention_heads", says.attention_heads), ("key_value_heads", says.key_value_heads)):
        if field == "key_value_heads" and row.get("latent_attention"):
            continue
        if row[field] is not None and expected is not None and row[field] != expected:
            notes.append(f"layer {index}: {row[field]} {field.replace('_', ' ')} in the tensors, "
                         f"{expected} in config.json")


def _add_moe_facts(row: dict, entry: dict, adapter, config, says: _ConfigSays, hidden: int | None,
                   notes: list[str]) -> None:
    """The experts, their width and format, the routing settings and the shared experts of one MoE layer, the
    counts checked against config.json."""
    index, key = row["layer"], str(row["layer"])
    row.update(_expert_facts(adapter, index, entry["block"], hidden, notes))
    settings = says.router_settings.get(key) if isinstance(says.router_settings.get(key), dict) else {}
    top_k = _int_or_none(settings.get("top_k")) or _layer_int(config, adapter.config_top_k, index)
    row["top_k"] = adapter.fixed_top_k or top_k
    skip = says.dynamic_skip.get(key)
    row["dynamic_skip"] = skip if skip else None
    if key in says.measured_active_experts:
        row["active_experts_measured"] = says.measured_active_experts[key]
    # per-layer counts are in the pipeline's layout key; a stock config holds one count for all layers
    expected, field = ((_int_or_none(says.experts.get(key)), "moe_compress_experts_per_layer")
                       if says.experts else (says.num_experts, adapter.config_num_experts))
    if row["experts"] is not None and expected is not None and row["experts"] != expected:
        notes.append(f"layer {index}: {row['experts']} experts in the router, {expected} in config.json ({field})")
    expected, field = ((_int_or_none(says.expert_widths.get(key)), "moe_compress_expert_width")
                       if says.expert_widths else (_layer_int(config, says.width_field, index), says.width_field))
    if row["expert_width"] is not None and expected is not None and row["expert_width"] != expected:
        notes.append(f"layer {index}: experts {row['expert_width']} wide in the tensors, {expected} in "
                     f"config.json ({field})")
    novices = says.novices.get(key) if isinstance(says.novices.get(key), dict) else None
    if novices and novices.get("novices"):  # MoNE: router rows whose expert is a constant
        row["novices"] = len(novices["novices"])
        row["expert_format"] = f"{row['expert_format']} + {row['novices']} novices"
    codings = {name: values[key] for name, values in says.other_codings.items() if key in values}
    if codings:
        row["other_codings"] = codings
        if row["expert_format"] == "dense":
            row["expert_format"] = "+".join(sorted(codings))
    shared = [shape for part, shapes in entry["block"].items()
              if any(_under(part, module) for module in adapter.shared_modules) for shape in shapes]
    row["shared_expert_width"] = _width(shared, hidden) if shared else None


def protected_by_steps(path: Path) -> dict[str, list[dict]]:
    """The super experts and super neurons the checkpoint's steps protected (compression.json's step reports):
    {"experts": [{layer, expert, peak_output}], "neurons": [{layer, expert, neuron, peak}]}, original ids."""
    record = read_compression_record(path) or {}
    protected = {"experts": [], "neurons": []}
    for report in record.get("step_reports") or []:
        for entry in report.get("protected") or []:
            if entry not in protected["experts"]:
                protected["experts"].append(entry)
        for entry in report.get("protected_neurons") or []:
            if entry not in protected["neurons"]:
                protected["neurons"].append(entry)
    return protected


def _layer_row(index: int, entry: dict, layout: _Layout, config, says: _ConfigSays, hidden: int | None,
               notes: list[str]) -> dict:
    """One decoder layer's row: its kind, heads, experts or MLP width, and parameters and bytes by module type."""
    row = {"layer": index, "kind": "moe" if index in layout.moe_layers else "dense"}
    if says.layer_types is not None and index < len(says.layer_types):
        row["layer_type"] = says.layer_types[index]
    row["mixers"] = sorted(entry["mixers"])
    _add_attention_facts(row, entry, config, says, notes)
    if row["kind"] == "moe":
        _add_moe_facts(row, entry, layout.adapter, config, says, hidden, notes)
    else:
        row["dense_mlp_width"] = _width(entry["mlp"], hidden) if entry["mlp"] else None
    row["parameters"] = {kind: entry["parameters"][kind] for kind in MODULE_TYPES if entry["parameters"][kind]}
    row["parameters"]["total"] = sum(entry["parameters"].values())
    row["bytes"] = {kind: entry["bytes"][kind] for kind in MODULE_TYPES if entry["bytes"][kind]}
    row["bytes"]["total"] = sum(entry["bytes"].values())
    return row


def _distinct(rows: list[dict], field: str) -> list:
    return sorted({row[field] for row in rows if row.get(field) is not None})


def analyze_checkpoint(path: str | Path, name: str | None = None, trust_remote_code: bool = False) -> dict:
    """The structure of one checkpoint (see the module's docstring), deterministic: the same files give the
    same dict. Builds a meta-device skeleton (no memory, no weights read) to learn the model's own names."""
    from moe_compress.streaming import build_skeleton

    path = check_model_dir(path, weights=True)
    tensors = checkpoint_tensors(path)
    trust = trust_remote_code or needs_remote_code(path)
    skeleton = build_skeleton(path, "float32", trust_remote_code=trust)  # refuses a config.json that is not JSON
    raw = json.loads((path / "config.json").read_text())
    config = skeleton.config
    adapter = adapter_for(config)
    model_names = model_parameter_names(skeleton, tensors)
    layout = _Layout(adapter, skeleton, model_names)
    notes: list[str] = []

    tally = _tally_tensors(tensors, model_names, layout)
    if tally.not_loaded:
        notes.append(f"{len(tally.not_loaded)} stored tensors the model does not load (counted under other), e.g. "
                     f"{', '.join(tally.not_loaded[:3])}")
    hidden, vocab, lm_head = _embedding_facts(config, layout, tally, notes)
    says = _config_says(raw, config, adapter, path)
    per_layer = [_layer_row(index, tally.layers[index], layout, config, says, hidden, notes)
                 for index in sorted(tally.layers)]
    config_layers = _int_or_none(getattr(config, "num_hidden_layers", None))
    if config_layers is not None and config_layers != len(per_layer):
        notes.append(f"{len(per_layer)} decoder layers store tensors, config.json says {config_layers}")
    moe_rows = [row for row in per_layer if row["kind"] == "moe"]
    attention_rows = [row for row in per_layer if "attention_heads" in row]
    return {
        "name": name if name is not None else path.name,
        "path": str(path),
        "model_type": config.model_type,
        "loader": "remote_code" if needs_remote_code(path) else "stock",
        "decoder_layers": len(per_layer),
        "moe_layers": [row["layer"] for row in moe_rows],
        "dense_layers": [row["layer"] for row in per_layer if row["kind"] == "dense"],
        "hidden_size": hidden,
        "vocab_size": vocab,
        "head_dim": _distinct(attention_rows, "head_dim"),
        "attention_heads": _distinct(attention_rows, "attention_heads"),
        "key_value_heads": _distinct(attention_rows, "key_value_heads"),
        "attention_layers": [row["layer"] for row in attention_rows],
        "experts_per_moe_layer": _distinct(moe_rows, "experts"),
        "experts_total": sum(row["experts"] or 0 for row in moe_rows),
        "top_k": _distinct(moe_rows, "top_k"),
        "dynamic_skip": any(row["dynamic_skip"] for row in moe_rows),
        "expert_width": _distinct(moe_rows, "expert_width"),
        "expert_format": _distinct(moe_rows, "expert_format"),
        "shared_experts": any(row.get("shared_expert_width") for row in moe_rows),
        "lm_head": lm_head,
        "parameters": {**tally.parameters, "total": sum(tally.parameters.values())},
        "bytes": {**tally.stored, "total": sum(tally.stored.values())},
        "dtypes": dict(sorted(tally.dtypes.items())),
        "tensors": len(tensors),
        "files": sorted({facts["file"] for facts in tensors.values()}),
        "layers": per_layer,
        "protected": protected_by_steps(path),
        "notes": notes,
    }


# --- several checkpoints, the files ------------------------------------------------------------------------

def analyze_models(variants: dict[str, str | Path], source: str | Path | None = None, trust_remote_code: bool = False,
                   role: str = "variant") -> dict:
    """The analysis of the source model (named ``source``, first) and of each checkpoint of ``variants``
    ({name: folder}, in their order, each with ``role``). ``trust_remote_code``: build checkpoints that carry
    their own modeling code (as ``model.trust_remote_code`` lets the loader); this pipeline's own are trusted."""
    models = []
    if source is not None:
        models.append({**analyze_checkpoint(source, "source", trust_remote_code), "role": "source"})
    for name, path in variants.items():
        models.append({**analyze_checkpoint(path, name, trust_remote_code), "role": role})
    return {"format_version": FORMAT_VERSION, "module_types": list(MODULE_TYPES), "models": models}


def _span(values: list, suffix: str = "") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]}{suffix}"
    return f"{values[0]}–{values[-1]}{suffix}"


def human_count(value: int) -> str:
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return str(value)


def human_bytes(value: int) -> str:
    for size, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows])


def _label(model: dict) -> str:
    return f"{model['name']} ({Path(model['path']).name})" if model.get("role") == "source" else model["name"]


def _heads(model_or_row: dict) -> str:
    heads, kv_heads, head_dim = (model_or_row.get(key) for key in ("attention_heads", "key_value_heads", "head_dim"))
    if not heads:
        return "–"
    as_list = (lambda value: value if isinstance(value, list) else [value])
    kv = as_list(kv_heads) if kv_heads not in (None, []) else []
    return f"{_span(as_list(heads))}/{_span(kv) if kv else '?'} × {_span(as_list(head_dim))}"


def _format(row: dict) -> str:
    """How one MoE layer stores its experts, in words."""
    if row.get("low_rank"):
        return f"low-rank (rank {_span(sorted({facts['rank'] for facts in row['low_rank'].values()}))})"
    if row.get("dictionary"):
        atoms = _span(sorted({facts["atoms"] for facts in row["dictionary"].values()}))
        sparsity = _span(sorted({facts["sparsity"] for facts in row["dictionary"].values()}))
        return f"dictionary ({atoms} atoms, {sparsity} per vector)"
    return row.get("expert_format") or "–"


def _formats(model: dict) -> str:
    return ", ".join(dict.fromkeys(_format(row) for row in model["layers"] if row["kind"] == "moe")) or "–"


def _peak(peak: float, entry: dict) -> str:
    times = entry.get("times_median")
    return f"{peak:.3g}" + (f", {times:g}× the median peak" if times is not None else "")


def to_markdown(analysis: dict) -> str:
    """A summary table (one row per model), parameters and bytes by module type, then each model's layers."""
    models = analysis["models"]
    lines = ["# Model structure", "",
             "The source model and every variant checkpoint, read from the saved tensors (safetensors headers; no "
             "weights loaded). Heads are query/key-value × head size; `attention` is each decoder layer's token "
             "mixer (self-attention, linear attention, convolution), `norms` every normalisation layer; a tied "
             "`lm_head` is stored once and counted under embeddings.", ""]
    rows = []
    for model in models:
        top_k = _span(model["top_k"]) + (" + dynamic skip" if model["dynamic_skip"] else "")
        experts = _span(model["experts_per_moe_layer"])
        if model["moe_layers"]:
            experts += f" ({model['experts_total']} total)"
        rows.append([_label(model), model["model_type"],
                     f"{model['decoder_layers']} ({len(model['moe_layers'])} MoE, {len(model['dense_layers'])} dense)",
                     model["hidden_size"], model["vocab_size"], _heads(model), experts,
                     top_k if model["moe_layers"] else "–", _span(model["expert_width"]), _formats(model),
                     model["lm_head"], human_count(model["parameters"]["total"]), human_bytes(model["bytes"]["total"])])
    lines += _table(["model", "model_type", "decoder layers", "hidden", "vocab", "heads q/kv × dim",
                     "experts per MoE layer", "top-k", "expert width", "experts stored as", "lm_head", "parameters",
                     "size"], rows)
    for title, key, show in (("Parameters by module type", "parameters", human_count),
                             ("Bytes by module type", "bytes", human_bytes)):
        lines += ["", f"## {title}", ""]
        lines += _table(["model", *MODULE_TYPES, "total"],
                        [[_label(model), *(show(model[key][kind]) if model[key][kind] else "–"
                                           for kind in MODULE_TYPES), show(model[key]["total"])] for model in models])
    protecting = [model for model in models if model.get("protected", {}).get("experts")
                  or model.get("protected", {}).get("neurons")]
    if protecting:
        lines += ["", "## Protected super experts and neurons", "",
                  "What a step's `protect` kept (original layer and expert ids; the peak is the largest absolute "
                  "down-projection output, or for a neuron its activation, over the calibration tokens).", ""]
        lines += _table(["model", "super experts (layer:expert, peak)", "super neurons (layer:expert:neuron, peak)"],
                        [[_label(model),
                          ", ".join(f"{e['layer']}:{e['expert']} ({_peak(e['peak_output'], e)})"
                                    for e in model["protected"]["experts"]) or "–",
                          ", ".join(f"{n['layer']}:{n['expert']}:{n['neuron']} ({_peak(n['peak'], n)})"
                                    for n in model["protected"]["neurons"]) or "–"]
                         for model in protecting])
    lines += ["", "## Per layer"]
    for model in models:
        lines += ["", f"### {_label(model)}", ""]
        rows = []
        for row in model["layers"]:
            moe = row["kind"] == "moe"
            top_k = (f"{row['top_k']}" + (" + skip" if row.get("dynamic_skip") else "")) if moe else "–"
            measured = row.get("active_experts_measured")
            rows.append([row["layer"], row["kind"], ", ".join(row["mixers"]) or "–", _heads(row),
                         row.get("experts") if moe else "–", top_k, "–" if measured is None else f"{measured:.2f}",
                         row.get("expert_width") if moe else "–", _format(row) if moe else "–",
                         row.get("shared_expert_width") or "–", row.get("dense_mlp_width") or "–",
                         human_count(row["parameters"]["total"])])
        lines += _table(["layer", "kind", "mixer", "heads q/kv × dim", "experts", "top-k", "active (measured)",
                         "expert width", "experts stored as", "shared width", "dense MLP width", "parameters"], rows)
        if model["notes"]:
            lines += ["", "Notes:", "", *(f"- {note}" for note in model["notes"])]
    return "\n".join(lines) + "\n"


def write_analysis(analysis: dict, json_path: str | Path, md_path: str | Path) -> None:
    """Both files, each written under a temporary name and moved into place."""
    write_json(analysis, json_path)
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(analysis))
