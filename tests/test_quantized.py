"""Quantized sources: block-scaled FP8 and MXFP4 checkpoints are read dequantized (layer streamed, and whole),
compressed into plain checkpoints; any other quantization is refused when the workflow is planned.

The checkpoints are tiny random models quantized here by an encoder written from the formats' definitions,
stored under the published checkpoints' tensor names with their ``quantization_config``; the expected weights
come from a decoder written here too, bit by bit from the same definitions (not the package's code)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (
    DEVICES,
    all_tensors,
    make_tokenizer,
    per_layer_checkpoint,
    tiny_model_of,
    validated_steps,
    whole_model_checkpoint,
)
from moe_compress.analysis import analyze_checkpoint
from moe_compress.cache import build_cache, read_moe_inputs, read_router_cache
from moe_compress.errors import ModelError
from moe_compress.modelio import load_model
from moe_compress.plan import plan_workflow
from moe_compress.stats import expert_frequency
from moe_compress.streaming import CheckpointTensors, LayerStream

pytestmark = pytest.mark.numeric

# The published weight_block_size is [128, 128]; the tiny models' matrices are 16 to 64 wide, so the blocks
# shrink with them: several blocks per matrix, and partial blocks at the edges (a 20-row kv_a_proj_with_mqa,
# like DeepSeek-V3's 576 rows in 128-row blocks; 32 columns in 12-column blocks), not square.
BLOCK = [16, 12]
FP8_DEEPSEEK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": BLOCK}
# Qwen3-30B-A3B-FP8: its routers and head stay unquantized (its list names every MoE layer's router)
FP8_QWEN3 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": BLOCK,
             "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]}
# gpt-oss-20b and -120b
MXFP4_GPT_OSS = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                            "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
# (model type, quantization_config, dtype of the FP8 inverse scales: float32 in DeepSeek-V3's files, bfloat16
# in Qwen's FP8 releases)
SOURCES = {"fp8-deepseek_v3": ("deepseek_v3", FP8_DEEPSEEK, torch.float32),
           "fp8-qwen3_moe": ("qwen3_moe", FP8_QWEN3, torch.bfloat16),
           "mxfp4-gpt_oss": ("gpt_oss", MXFP4_GPT_OSS, None)}


# --- the formats, from their definitions ---------------------------------------------------------------------

def decode_e4m3fn(codes: torch.Tensor) -> torch.Tensor:
    """float8 e4m3fn bytes -> float64: a sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
    subnormal; 0x7f and 0xff are NaN (no infinities)."""
    codes = codes.to(torch.int64)
    sign = 1.0 - 2.0 * (codes >> 7)
    exponent, mantissa = (codes >> 3) & 0xF, (codes & 0x7).to(torch.float64)
    normal = (1.0 + mantissa / 8) * torch.pow(2.0, (exponent - 7).to(torch.float64))
    subnormal = mantissa / 8 * 2.0 ** -6
    value = sign * torch.where(exponent == 0, subnormal, normal)
    return torch.where((exponent == 0xF) & (mantissa == 7), torch.nan, value)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes -> float64: a sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is
    subnormal (0 or 0.5)."""
    codes = codes.to(torch.int64)
    sign = 1.0 - 2.0 * (codes >> 3)
    exponent, mantissa = (codes >> 1) & 0x3, (codes & 0x1).to(torch.float64)
    normal = (1.0 + mantissa / 2) * torch.pow(2.0, (exponent - 1).to(torch.float64))
    return sign * torch.where(exponent == 0, mantissa / 2, normal)


E4M3_CODES = torch.tensor([code for code in range(256) if code not in (0x7F, 0xFF)], dtype=torch.uint8)
E2M1_CODES = torch.arange(16, dtype=torch.uint8)


def nearest_code(values: torch.Tensor, codes: torch.Tensor, decode) -> torch.Tensor:
    """The code whose value is nearest each of ``values`` (the encoder: any code is a valid checkpoint)."""
    table = decode(codes)
    return codes[(values.to(torch.float64)[..., None] - table).abs().argmin(dim=-1)]


def block_scales(scales: torch.Tensor, rows: int, cols: int, block: list[int]) -> torch.Tensor:
    """One scale per element: each block's, the edge blocks cut to the matrix."""
    return scales.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def encode_fp8(weight: torch.Tensor, block: list[int], scale_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix -> (e4m3fn codes, inverse scales): each block's largest magnitude maps to 448, e4m3fn's largest."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float64)
    padded[:rows, :cols] = weight
    largest = padded.reshape(grid[0], block[0], grid[1], block[1]).abs().amax(dim=(1, 3))
    scale_inv = torch.where(largest > 0, largest / 448, 1.0).to(scale_dtype)
    scaled = weight.to(torch.float64) / block_scales(scale_inv.to(torch.float64), rows, cols, block)
    return nearest_code(scaled, E4M3_CODES, decode_e4m3fn).view(torch.float8_e4m3fn), scale_inv


def decode_fp8(codes: torch.Tensor, scale_inv: torch.Tensor, block: list[int], dtype) -> torch.Tensor:
    """The reference dequantization. The product of an e4m3 value (4 significant bits) and a float32 scale
    (24) needs 28 bits: exact in float64, so rounding it to float32 gives the bits of the float32 product
    (IEEE 754 rounds a product correctly) that transformers defines the format by; then the model's dtype."""
    rows, cols = codes.shape[-2:]
    exact = decode_e4m3fn(codes.view(torch.uint8)) * block_scales(scale_inv.to(torch.float64), rows, cols, block)
    return exact.to(torch.float32).to(dtype)


def encode_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's [experts, in, out] expert weights -> (blocks [experts, out, in / 32, 16], scales [experts, out,
    in / 32]): 32 values along ``in`` share a power of two that brings their largest within e2m1's 6."""
    groups = weight.transpose(1, 2).to(torch.float64).unflatten(-1, (-1, 32))
    largest = groups.abs().amax(dim=-1).clamp(min=2.0 ** -100)
    exponent = torch.ceil(torch.log2(largest / 6)).to(torch.int64)
    codes = nearest_code(groups / torch.pow(2.0, exponent.to(torch.float64))[..., None], E2M1_CODES, decode_e2m1)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # the first of two values in the low nibble
    return packed, (exponent + 127).to(torch.uint8)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """The reference dequantization: an e2m1 value (2 significant bits) times a power of two is exact in
    float64 and, within float32's exponent range, in float32 and bfloat16: one rounding-free cast."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)
    values = decode_e2m1(codes) * torch.pow(2.0, scales.to(torch.float64) - 127)[..., None]
    return values.flatten(-2).transpose(1, 2).to(torch.float32).to(dtype)


# --- tiny quantized checkpoints ------------------------------------------------------------------------------

def quantize_state(stored: dict[str, torch.Tensor], quantization: dict, scale_dtype) -> dict[str, torch.Tensor]:
    """A plain checkpoint's tensors -> those of its quantized release, under the published names: FP8 for every
    decoder-layer matrix but the routers (``*_scale_inv`` beside each); MXFP4 for gpt-oss's experts
    (``*_blocks`` + ``*_scales`` in place of each)."""
    quantized = {}
    for name, tensor in stored.items():
        if quantization["quant_method"] == "fp8" and name.startswith("model.layers.") and tensor.ndim == 2 \
                and not name.endswith("mlp.gate.weight"):
            quantized[name], quantized[name + "_scale_inv"] = encode_fp8(tensor, BLOCK, scale_dtype)
        elif quantization["quant_method"] == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            quantized[name + "_blocks"], quantized[name + "_scales"] = encode_mxfp4(tensor)
        else:
            quantized[name] = tensor
    return quantized


def reference_dequantized(quantized: dict[str, torch.Tensor], quantization: dict, dtype) -> dict[str, torch.Tensor]:
    """The plain tensors of a quantized release, by the reference decoders (the other tensors as they are)."""
    plain = {}
    for name, tensor in quantized.items():
        if name + "_scale_inv" in quantized:
            plain[name] = decode_fp8(tensor, quantized[name + "_scale_inv"], BLOCK, dtype)
        elif name.endswith("_blocks"):
            plain[name.removesuffix("_blocks")] = decode_mxfp4(tensor, quantized[name.replace("_blocks", "_scales")],
                                                               dtype)
        elif not name.endswith(("_scale_inv", "_scales")):
            plain[name] = tensor
    return plain


def write_checkpoint(path, tensors: dict[str, torch.Tensor], config: dict):
    """A checkpoint folder; a quantized one in two shards, the scales apart from their weights (as a release's
    shards may split a layer)."""
    path.mkdir(parents=True)
    scales = {name for name in tensors if name.endswith(("_scale_inv", "_scales"))}
    shards = {"model-00001-of-00002.safetensors": sorted(set(tensors) - scales),
              "model-00002-of-00002.safetensors": sorted(scales)} if scales else {"model.safetensors": sorted(tensors)}
    for shard, names in shards.items():
        save_file({name: tensors[name].contiguous() for name in names}, path / shard, metadata={"format": "pt"})
    if scales:
        weight_map = {name: shard for shard, names in shards.items() for name in names}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(SOURCES))
def source(request, tmp_path_factory):
    """(the quantized checkpoint, the plain checkpoint of its reference dequantization in float32, its stored
    tensors, its quantization_config), of each format."""
    model_type, quantization, scale_dtype = SOURCES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tiny_model_of(model_type).save_pretrained(root / "original")
    config = json.loads((root / "original/config.json").read_text())
    quantized = quantize_state(load_file(root / "original/model.safetensors"), quantization, scale_dtype)
    quantized_dir = write_checkpoint(root / "quantized", quantized, {**config, "quantization_config": quantization})
    plain_dir = write_checkpoint(root / "dequantized", reference_dequantized(quantized, quantization, torch.float32),
                                 config)
    return quantized_dir, plain_dir, quantized, quantization


# --- the tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_each_dequantized_tensor_is_the_reference_dequantization(source, device, dtype):
    quantized_dir, _, quantized, quantization = source
    tensors = CheckpointTensors(quantized_dir, device, dtype)
    read = tensors.read(list(tensors.weight_map))
    expected = reference_dequantized(quantized, quantization, dtype)
    assert read.keys() == expected.keys()
    dequantized = [name for name in expected if name not in quantized or name + "_scale_inv" in quantized]
    assert len(dequantized) >= 6  # every decoder layer's matrices, or its experts
    for name in dequantized:
        assert read[name].device.type == device and read[name].dtype == dtype, name
        assert torch.equal(read[name].cpu(), expected[name]), name
    # the quantization loses something (so the checks above compare distinct numbers), and not much
    original = load_file(quantized_dir.parent / "original/model.safetensors")
    name = dequantized[-1]
    error = (expected[name].float() - original[name]).norm() / original[name].norm()
    assert 0 < error < 0.2, (name, error)


def caches_equal(ours, theirs) -> None:
    routing_ours, routing_theirs = read_router_cache(ours), read_router_cache(theirs)
    assert routing_ours.keys() == routing_theirs.keys()
    for layer in routing_ours:
        for field in ["logits", "topk_indices", "topk_weights"]:
            assert (getattr(routing_ours[layer], field) == getattr(routing_theirs[layer], field)).all(), (layer, field)
    inputs_ours, inputs_theirs = read_moe_inputs(ours), read_moe_inputs(theirs)
    assert inputs_ours.keys() == inputs_theirs.keys()
    for layer in inputs_ours:
        assert torch.equal(inputs_ours[layer], inputs_theirs[layer]), layer


def test_the_layer_stream_gives_the_whole_model_cache(source, tmp_path):
    """The quantized checkpoint streamed one layer at a time (with the read-ahead), loaded whole, and the plain
    checkpoint of its reference dequantization give the same calibration cache, bit for bit."""
    quantized_dir, plain_dir, _, _ = source
    input_ids = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    stream = LayerStream(quantized_dir)
    streamed = build_cache(stream, input_ids, 2, tmp_path / "streamed")
    assert stream.layers_read_ahead == len(stream.layers)
    assert all(tensor.is_meta for layer in stream.layers for tensor in layer.parameters())
    whole = build_cache(load_model(quantized_dir), input_ids, 2, tmp_path / "whole")
    plain = build_cache(load_model(plain_dir), input_ids, 2, tmp_path / "plain")
    assert streamed == whole == plain
    caches_equal(tmp_path / "streamed", tmp_path / "whole")
    caches_equal(tmp_path / "streamed", tmp_path / "plain")


def test_a_pruned_quantized_source_is_a_plain_checkpoint_of_the_pruned_dequantized_model(source, tmp_path):
    """Frequency pruning of the quantized source, in one job and in per-layer jobs, writes the checkpoint that
    pruning the dequantized model writes: plain (no quantization_config), stock, the same tensors and logits;
    compression.json names the source's format."""
    quantized_dir, plain_dir, _, quantization = source
    input_ids = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(1))
    build_cache(LayerStream(quantized_dir), input_ids, 8, tmp_path / "cache")
    stats = expert_frequency(read_router_cache(tmp_path / "cache"))
    steps = validated_steps({"method": "frequency_prune", "uniform": True, "keep": 5})
    whole = whole_model_checkpoint(quantized_dir, tmp_path / "cache", stats, steps, tmp_path / "whole")
    layered = per_layer_checkpoint(quantized_dir, tmp_path / "cache", stats, steps, tmp_path / "parts",
                                   tmp_path / "layered")
    reference = whole_model_checkpoint(plain_dir, tmp_path / "cache", stats, steps, tmp_path / "reference")

    recorded = {key: quantization[key] for key in ("quant_method", "fmt", "weight_block_size", "activation_scheme")
                if key in quantization}
    assert whole["source_quantization"] == layered["source_quantization"] == recorded
    assert reference["source_quantization"] is None
    assert whole["loader"] == layered["loader"] == "stock" and set(whole["experts_per_layer"].values()) == {5}
    assert layered == whole
    expected = all_tensors(tmp_path / "reference")
    for checkpoint in ("whole", "layered"):
        written = all_tensors(tmp_path / checkpoint)
        assert written.keys() == expected.keys(), checkpoint
        assert all(torch.equal(written[name], tensor) for name, tensor in expected.items()), checkpoint
    for checkpoint in ("whole", "layered"):
        config = json.loads((tmp_path / checkpoint / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == "float32", checkpoint
    reloaded, pruned = load_model(tmp_path / "whole"), load_model(tmp_path / "reference")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, pruned(input_ids=input_ids).logits)


PLANNED = {
    "model": {"path": "demo"},
    "calibration": {"seq_len": 16},
    "perplexity": {"seq_len": 16},
    "speed": {"prompt_tokens": 8, "decode_tokens": 8},
    "evaluation": {"tasks": []},
    "variants": {"base": {"steps": []}},
}


@pytest.mark.parametrize("quantization, refused", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}, "'awq'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "'compressed-tensors'"),
    ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static"}, "fp8 weights without weight_block_size"),
])
def test_a_quantization_that_is_not_read_is_refused_at_planning(tmp_path, quantization, refused):
    path = tmp_path / "model"
    tiny_model_of("qwen3_moe").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    with pytest.raises(ModelError) as caught:
        plan_workflow({**copy.deepcopy(PLANNED), "model": {"path": str(path)}}, environ={})
    message = str(caught.value)
    assert message.startswith(f"model path {path}: ") and refused in message and "\n" not in message
    assert "dequantize" in message or "dequantized" in message
    with pytest.raises(ModelError, match=refused):
        load_model(path)


def test_mxfp4_is_read_for_gpt_oss_only(tmp_path):
    path = tmp_path / "model"
    tiny_model_of("mixtral").save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_GPT_OSS}))
    with pytest.raises(ModelError, match="mxfp4 weights are read for gpt_oss only.*model_type 'mixtral'"):
        LayerStream(path)


def test_the_structure_table_counts_a_quantized_source_as_the_model_it_holds(source):
    """`analyze` reads headers only: FP8 weights with their scales, MXFP4 blocks with theirs, are counted as the
    dense tensors they decode to (the plain checkpoint's parameters, layer by layer), stored in fewer bytes."""
    quantized_dir, plain_dir, _, _ = source
    ours, plain = analyze_checkpoint(quantized_dir), analyze_checkpoint(plain_dir)
    assert ours["parameters"] == plain["parameters"] and ours["notes"] == plain["notes"] == []
    without_storage = [{key: value for key, value in row.items() if key != "bytes"} for row in ours["layers"]]
    assert without_storage == [{key: value for key, value in row.items() if key != "bytes"} for row in plain["layers"]]
    assert ours["bytes"]["total"] < plain["bytes"]["total"]
