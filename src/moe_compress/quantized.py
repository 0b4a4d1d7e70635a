"""Quantized source checkpoints: which formats are read, and their dequantization.

The flagship weights of several supported families are published quantized: DeepSeek-V3/R1, Kimi-K2,
MiniMax-M2 and Qwen3's FP8 releases in block-scaled FP8, gpt-oss in MXFP4. The pipeline compresses the
dequantized model: a quantized source is dequantized as it is read (the layer stream: one decoder layer at a
time), on the job's device, into the model's dtype, as transformers' own loading defines each format
(``integrations/finegrained_fp8.py``, ``integrations/mxfp4.py``); the model is built without quantization, and
every checkpoint written is a plain one. Any other quantization is refused when the workflow is planned.

Block-scaled FP8 (``quant_method: fp8``, ``weight_block_size: [bm, bn]``): a stored tensor ``W`` (float8,
``[..., rows, cols]``) has its inverse scales in ``W_scale_inv`` (``W = *.weight``: ``*.weight_scale_inv``),
one per ``bm`` x ``bn`` block, ``[..., ceil(rows / bm), ceil(cols / bn)]``: the last block of a row or column
may be partial (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` with 128-row blocks). Element ``(i, j)`` is
``W[i, j] * scale[i // bm, j // bn]``, multiplied in float32 and then rounded to the model's dtype.

MXFP4 (``quant_method: mxfp4``, gpt-oss's experts): ``X_blocks`` (uint8 ``[experts, rows, groups, 16]``: 32
e2m1 codes per group, two per byte, the low nibble first) and ``X_scales`` (uint8 ``[experts, rows, groups]``,
one e8m0 exponent per group: ``2 ** (s - 127)``) give ``X``, ``[experts, rows, groups * 32]`` transposed to
``[experts, groups * 32, rows]``: gpt-oss's ``gate_up_proj`` ``[experts, hidden, 2 * intermediate]`` and
``down_proj`` ``[experts, intermediate, hidden]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_compress.errors import ModelError

FP8 = "fp8"
MXFP4 = "mxfp4"
READ_FORMATS = (FP8, MXFP4)
MXFP4_MODEL_TYPES = ("gpt_oss",)  # the models transformers defines the MXFP4 layout for

FP8_SCALE_SUFFIX = "_scale_inv"
FP8_DROPPED_SUFFIX = ".activation_scale"  # static activation scales: inference-time only, as transformers drops them
MXFP4_BLOCKS_SUFFIX = "_blocks"
MXFP4_SCALES_SUFFIX = "_scales"

# e2m1 (FP4): sign bit, two exponent bits, one mantissa bit, indexed by the 4-bit code
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
E8M0_NAN = 255
_MXFP4_CHUNK_BYTES = 1 << 24  # packed bytes decoded at once: a chunk's codes and values take some 30 times that
# the fields of a quantization_config that say how its tensors are stored (its skip-lists are left out)
_RECORDED_FIELDS = ("quant_method", "fmt", "weight_block_size", "scale_fmt", "activation_scheme")


@dataclass(frozen=True)
class SourceQuantization:
    """How a source checkpoint's weights are quantized (a format this module reads)."""

    method: str  # FP8 or MXFP4
    block_size: tuple[int, int] | None  # FP8's weight_block_size (rows, columns)
    record: dict  # the fields of its quantization_config that compression.json keeps


def check_source_quantization(model_dir: str | Path) -> SourceQuantization | None:
    """The quantization of the checkpoint in ``model_dir`` (from its config.json's ``quantization_config``),
    None for an unquantized one. A format this module does not read raises a ``ModelError`` naming it, the
    model path and what to do: the planner calls this at parse time, every loader again."""
    path = Path(model_dir)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # check_model_dir and load_checkpoint_config say what is wrong with the file
    config = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not config:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else None
    if method not in READ_FORMATS:
        named = repr(method) if method else "a method it does not name (no quant_method)"
        raise ModelError(f"model path {path}: its weights are quantized with {named} (quantization_config in "
                         f"config.json); moe-compress reads unquantized, block-scaled fp8 and mxfp4 (gpt-oss) "
                         f"checkpoints only. Point model.path at the model's unquantized release, or at a copy "
                         f"dequantized to bfloat16 first")
    record = {field: config[field] for field in _RECORDED_FIELDS if field in config}
    if method == MXFP4:
        if raw.get("model_type") not in MXFP4_MODEL_TYPES:
            raise ModelError(f"model path {path}: mxfp4 weights are read for {', '.join(MXFP4_MODEL_TYPES)} only "
                             f"(the layout transformers defines), not for model_type {raw.get('model_type')!r}; "
                             f"dequantize it to bfloat16 first")
        return SourceQuantization(MXFP4, None, record)
    block = config.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in block)):
        stated = "without weight_block_size" if block is None else f"with weight_block_size {block!r}"
        raise ModelError(f"model path {path}: fp8 weights {stated}; moe-compress reads "
                         f"block-scaled fp8 only (weight_block_size: [rows, columns], e.g. [128, 128]); dequantize "
                         f"it to bfloat16 first")
    return SourceQuantization(FP8, (block[0], block[1]), record)


def dequantize_tensors(tensors: dict[str, torch.Tensor], quantization: SourceQuantization | None,
                       device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (stored names) -> the tensors an unquantized checkpoint stores under those names:
    each quantized group dequantized on ``device`` into ``dtype``; the others as they are. A group must be
    whole in ``tensors`` (a decoder layer's tensors hold their groups)."""
    if quantization is None:
        return tensors
    if quantization.method == FP8:
        return _dequantize_fp8_group(tensors, quantization.block_size, device, dtype)
    return _dequantize_mxfp4_group(tensors, device, dtype)


def _dequantize_fp8_group(tensors, block_size, device, dtype) -> dict[str, torch.Tensor]:
    result = {}
    for name, tensor in tensors.items():
        if name.endswith(FP8_DROPPED_SUFFIX):
            continue
        if name.endswith(FP8_SCALE_SUFFIX):
            if name.removesuffix(FP8_SCALE_SUFFIX) not in tensors:
                raise ModelError(f"{name}: the inverse scales of {name.removesuffix(FP8_SCALE_SUFFIX)}, which the "
                                 f"checkpoint does not hold beside them")
            continue
        scale_name = name + FP8_SCALE_SUFFIX
        if scale_name in tensors:
            try:
                result[name] = dequantize_fp8(tensors[name].to(device), tensors[scale_name].to(device), block_size,
                                              dtype)
            except ModelError as err:
                raise ModelError(f"{name}: {err}") from err
        elif _is_float8(tensor):
            raise ModelError(f"{name} is stored as {tensor.dtype} without its inverse scales ({scale_name})")
        else:
            result[name] = tensor
    return result


def _dequantize_mxfp4_group(tensors, device, dtype) -> dict[str, torch.Tensor]:
    result = {}
    for name, tensor in tensors.items():
        if name.endswith(MXFP4_SCALES_SUFFIX):
            if name.removesuffix(MXFP4_SCALES_SUFFIX) + MXFP4_BLOCKS_SUFFIX not in tensors:
                raise ModelError(f"{name}: mxfp4 scales without their blocks "
                                 f"({name.removesuffix(MXFP4_SCALES_SUFFIX)}{MXFP4_BLOCKS_SUFFIX})")
            continue
        if not name.endswith(MXFP4_BLOCKS_SUFFIX):
            result[name] = tensor
            continue
        stem = name.removesuffix(MXFP4_BLOCKS_SUFFIX)
        if stem + MXFP4_SCALES_SUFFIX not in tensors:
            raise ModelError(f"{name}: mxfp4 blocks without their scales ({stem}{MXFP4_SCALES_SUFFIX})")
        try:
            result[stem] = dequantize_mxfp4(tensor.to(device), tensors[stem + MXFP4_SCALES_SUFFIX].to(device), dtype)
        except ModelError as err:
            raise ModelError(f"{name}: {err}") from err
    return result


MXFP4_DTYPE = "MXFP4"  # how the structure table names the dtype of an MXFP4 tensor (no safetensors dtype)


def dense_tensor_facts(stored: dict[str, dict], quantization: SourceQuantization | None) -> dict[str, dict]:
    """A checkpoint's safetensors header facts (``{name: {"dtype", "shape", "bytes", ...}}``, as stored) as those
    of the dense tensors they hold, for the structure table: an FP8 weight keeps its name, shape and dtype, its
    inverse scales' bytes counted with it; MXFP4 blocks and scales are the ``[experts, groups * 32, rows]``
    tensor they decode to, under its name, dtype ``MXFP4``, their packed bytes its bytes; static activation
    scales are left out, as loading drops them. Unquantized facts come back as given."""
    if quantization is None:
        return stored
    dense = {}
    for name, facts in stored.items():
        if name.endswith(FP8_DROPPED_SUFFIX) and quantization.method == FP8:
            continue
        if quantization.method == FP8 and name.endswith(FP8_SCALE_SUFFIX) and name.removesuffix(FP8_SCALE_SUFFIX) in stored:
            continue  # counted with its weight
        if quantization.method == MXFP4 and name.endswith(MXFP4_SCALES_SUFFIX) \
                and name.removesuffix(MXFP4_SCALES_SUFFIX) + MXFP4_BLOCKS_SUFFIX in stored:
            continue  # counted with its blocks
        if quantization.method == FP8 and name + FP8_SCALE_SUFFIX in stored:
            dense[name] = {**facts, "bytes": facts["bytes"] + stored[name + FP8_SCALE_SUFFIX]["bytes"]}
        elif quantization.method == MXFP4 and name.endswith(MXFP4_BLOCKS_SUFFIX) and len(facts["shape"]) == 4:
            stem = name.removesuffix(MXFP4_BLOCKS_SUFFIX)
            experts, rows, groups, _ = facts["shape"]
            scales = stored.get(stem + MXFP4_SCALES_SUFFIX, {"bytes": 0})
            dense[stem] = {**facts, "dtype": MXFP4_DTYPE, "shape": [experts, groups * 32, rows],
                           "bytes": facts["bytes"] + scales["bytes"]}
        else:
            dense[name] = facts
    return dense


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """A block-scaled FP8 tensor ``[..., rows, cols]`` with its inverse scales ``[..., ceil(rows / bm),
    ceil(cols / bn)]``, dequantized into ``dtype`` on their device: each element times its block's scale, in
    float32 (transformers' ``Fp8Dequantize``), then rounded to ``dtype``."""
    if not _is_float8(weight) or weight.ndim < 2:
        raise ModelError(f"expected a float8 matrix beside inverse scales, found {weight.dtype} {list(weight.shape)}")
    rows, cols = weight.shape[-2:]
    block_rows, block_cols = block_size
    grid = (*weight.shape[:-2], -(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != grid:
        raise ModelError(f"inverse scales of shape {list(scale_inv.shape)}, but a {list(weight.shape)} weight in "
                         f"{block_rows}x{block_cols} blocks (weight_block_size) has {list(grid)}")
    scales = _scales_as_float32(scale_inv)
    # padded to whole blocks, so that every block is a view and its scale broadcasts over it (no scale-sized copy)
    values = torch.zeros(*weight.shape[:-2], grid[-2] * block_rows, grid[-1] * block_cols, dtype=torch.float32,
                         device=weight.device)
    values[..., :rows, :cols] = weight
    blocks = values.unflatten(-1, (grid[-1], block_cols)).unflatten(-3, (grid[-2], block_rows))
    blocks.mul_(scales[..., :, None, :, None])
    return values[..., :rows, :cols].to(dtype).contiguous()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gpt-oss's MXFP4 experts (``[experts, rows, groups, 16]`` packed codes, ``[experts, rows, groups]`` e8m0
    exponents) -> ``[experts, groups * 32, rows]`` in ``dtype``, on their device. Each value is an e2m1 value
    times a power of two, exact in float32 and in bfloat16; decoded a few experts at a time (the codes of a
    whole layer would take many times its packed size)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.ndim != 4 or blocks.shape[-1] != 16 \
            or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ModelError(f"expected uint8 blocks [experts, rows, groups, 16] and uint8 scales [experts, rows, groups], "
                         f"found {blocks.dtype} {list(blocks.shape)} and {scales.dtype} {list(scales.shape)}")
    experts, rows, groups, _ = blocks.shape
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    powers = _e8m0_as_float32(scales)
    out = torch.empty(experts, groups * 32, rows, dtype=dtype, device=blocks.device)
    step = max(1, _MXFP4_CHUNK_BYTES // max(1, rows * groups * 16))
    for start in range(0, experts, step):
        chunk = blocks[start:start + step]
        # the low nibble is the first of the byte's two values
        codes = torch.stack((chunk & 0x0F, chunk >> 4), dim=-1).int()
        values = table[codes] * powers[start:start + step, :, :, None, None]
        out[start:start + step] = values.reshape(len(chunk), rows, groups * 32).to(dtype).transpose(1, 2)
    return out


def _is_float8(tensor: torch.Tensor) -> bool:
    return tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1


def _scales_as_float32(scales: torch.Tensor) -> torch.Tensor:
    """FP8 inverse scales as float32: float32 or bfloat16 values, or e8m0 exponents (``scale_fmt: ue8m0``, stored
    as float8_e8m0fnu or as bytes)."""
    if scales.dtype == torch.uint8:
        return _e8m0_as_float32(scales)
    if scales.dtype == getattr(torch, "float8_e8m0fnu", None):
        return _e8m0_as_float32(scales.view(torch.uint8))
    if not scales.dtype.is_floating_point:
        raise ModelError(f"inverse scales of dtype {scales.dtype}")
    return scales.to(torch.float32)


def _e8m0_as_float32(exponents: torch.Tensor) -> torch.Tensor:
    """``2 ** (e - 127)`` for e8m0 bytes, exactly: the byte is a float32's exponent field (0 gives 2^-127, a
    subnormal); built from bits, so no ``pow`` of any backend can round it."""
    if bool((exponents == E8M0_NAN).any()):
        raise ModelError(f"an e8m0 scale is {E8M0_NAN}, which encodes NaN")
    powers = (exponents.to(torch.int32) << 23).view(torch.float32)
    return torch.where(exponents == 0, 2.0 ** -E8M0_BIAS, powers)
