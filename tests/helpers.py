"""What tests share: tiny random MoE models of each architecture (built from their config class in seconds),
a tokenizer, logits, validated steps, synthetic MoE inputs, the hub cache layout, and the workflow runner.
No hub, no shared data. Fixtures built on these are in conftest.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)

from moe_compress.architectures import ARCHITECTURES, adapter_for
from moe_compress.cache import read_moe_inputs
from moe_compress.config import validate_config
from moe_compress.demo import train_tokenizer
from moe_compress.evaluate.speed import measure_speed
from moe_compress.layerwise import assemble_checkpoint, compress_layer, skeleton_moe_layers, write_layer_part
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.modelio import load_model, load_tokenizer, save_checkpoint
from moe_compress.streaming import CheckpointTensors

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts.",
    "Pruning rarely used experts makes the model smaller.",
    "Calibration data decides which experts are rarely used.",
] * 8


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, vocab_size)


# the tiny sizes every architecture shares
_COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2)
_HEAD_SIZE = 8  # where a flagship states its head size (head_dim), the tiny one

MODEL_CONFIGS = REPO / "tests/data/model_configs"
# the published config.json (tests/data/model_configs/<folder>) each architecture's tiny config is built from
FLAGSHIP_CONFIGS = {
    "qwen3_moe": "Qwen--Qwen3-30B-A3B", "qwen2_moe": "Qwen--Qwen1.5-MoE-A2.7B",
    "qwen3_next": "Qwen--Qwen3-Next-80B-A3B-Thinking", "qwen3_5_moe_text": "Qwen--Qwen3.5-397B-A17B",
    "mixtral": "mistralai--Mixtral-8x7B-v0.1", "olmoe": "allenai--OLMoE-1B-7B-0924",
    "flex_olmo": "allenai--FlexOlmo-7x7B-1T", "deepseek_v3": "deepseek-ai--DeepSeek-V3",
    "deepseek_v32": "deepseek-ai--DeepSeek-V3.2", "kimi_linear": "moonshotai--Kimi-Linear-48B-A3B-Instruct",
    "glm4_moe": "zai-org--GLM-4.5", "glm4_moe_lite": "zai-org--GLM-4.7-Flash", "solar_open": "upstage--Solar-Open-100B",
    "exaone_moe": "LGAI-EXAONE--K-EXAONE-236B-A23B", "dots1": "rednote-hilab--dots.llm1.inst",
    "deepseek_v2": "deepseek-ai--DeepSeek-V2", "minimax_m2": "MiniMaxAI--MiniMax-M2.5",
    "afmoe": "arcee-ai--Trinity-Mini",
    "lfm2_moe": "LiquidAI--LFM2-8B-A1B", "ernie4_5_moe": "baidu--ERNIE-4.5-21B-A3B-PT",
    "phimoe": "microsoft--Phi-3.5-MoE-instruct", "granitemoe": "ibm-granite--granite-3.0-3b-a800m-base",
    "hunyuan_v1_moe": "tencent--Hunyuan-A13B-Instruct", "cohere2_moe": "CohereLabs--command-a-plus-05-2026",
    "gpt_oss": "openai--gpt-oss-120b",
    "llama": "meta-llama--Llama-3.1-8B", "mistral": "mistralai--Mistral-7B-v0.1", "qwen2": "Qwen--Qwen2-7B-Instruct",
    "qwen3": "Qwen--Qwen3-8B", "exaone4": "LGAI-EXAONE--EXAONE-4.0-32B", "olmo2": "allenai--OLMo-2-1124-7B",
    "granite": "ibm-granite--granite-3.0-8b-base", "phi3": "microsoft--Phi-3-mini-4k-instruct",
}
# never copied into a tiny config: quantized checkpoints are built by their own helper, remote code never runs
_NOT_COPIED = ("quantization_config", "auto_map", "_name_or_path")


def flagship_config(model_type: str) -> dict:
    """The published config.json of the architecture's flagship checkpoint, as a dict (for a vision-language
    release, e.g. Qwen3.5, its text model's config)."""
    raw = json.loads((MODEL_CONFIGS / FLAGSHIP_CONFIGS[model_type] / "config.json").read_text())
    if raw.get("model_type") != model_type and isinstance(raw.get("text_config"), dict):
        raw = raw["text_config"]
    return raw


def tiny_config(model_type: str, num_experts: int = 8, top_k: int = 2, **overrides):
    """A tiny config of each architecture, with the real architecture's options switched on (``overrides``:
    further config fields, e.g. DeepSeek-V3's ``n_group``)."""
    config = _tiny_config(model_type, num_experts, top_k)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


# DeepSeek-V3-style routers: two groups of four experts, one kept per token; sigmoid + correction bias
_GROUPED = dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)


def _tiny_config(model_type: str, num_experts: int, top_k: int):
    """Each architecture's config built from its flagship's published config.json: the same field names, types
    and nesting (a per-layer list stays a list, with one entry per tiny layer), only the sizes shrunk, and the
    unusual options switched on: dense layers, shared experts, hybrid (linear-attention / convolution) layers,
    groups, scaling, biases. The expert count and top-k go into the adapter's config fields, in their form."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    pattern = ["linear_attention", "full_attention", "linear_attention"]
    options = {
        # a dense layer in the middle (mlp_only_layers)
        "qwen3_moe": dict(head_dim=8, moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[1]),
        # shared expert + its sigmoid gate, no top-k renormalisation
        "qwen2_moe": dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, norm_topk_prob=False,
                          decoder_sparse_step=1, mlp_only_layers=[1]),
        "qwen3_next": dict(head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                           layer_types=pattern, linear_num_value_heads=4, linear_num_key_heads=2,
                           linear_key_head_dim=8, linear_value_head_dim=8, mlp_only_layers=[2]),
        "qwen3_5_moe_text": dict(head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                 layer_types=pattern, linear_num_value_heads=4, linear_num_key_heads=2,
                                 linear_key_head_dim=8, linear_value_head_dim=8),
        "mixtral": dict(head_dim=8),
        "olmoe": dict(norm_topk_prob=False, eos_token_id=0, pad_token_id=0),
        "flex_olmo": dict(norm_topk_prob=False, eos_token_id=0, pad_token_id=0),
        # groups, sigmoid + correction bias, scaling, dense first layer, shared expert
        "deepseek_v3": dict(moe_intermediate_size=16, **_GROUPED, first_k_dense_replace=1, n_shared_experts=1, **_MLA),
        "deepseek_v32": dict(moe_intermediate_size=16, **_GROUPED, first_k_dense_replace=1, n_shared_experts=1, **_MLA,
                             index_n_heads=2, index_head_dim=8, index_topk=4, num_key_value_heads=4,
                             mlp_layer_types=["dense", "sparse", "sparse"]),
        "glm4_moe": dict(head_dim=8, moe_intermediate_size=16, **_GROUPED, first_k_dense_replace=1, n_shared_experts=1),
        "glm4_moe_lite": dict(moe_intermediate_size=16, **_GROUPED, n_shared_experts=1, **_MLA,
                              mlp_layer_types=["dense", "sparse", "sparse"]),
        "solar_open": dict(head_dim=8, moe_intermediate_size=16, **_GROUPED, n_shared_experts=1),
        "exaone_moe": dict(head_dim=8, moe_intermediate_size=16, **_GROUPED, num_shared_experts=1,
                           layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=8,
                           mlp_layer_types=["dense", "sparse", "sparse"]),
        "dots1": dict(head_dim=8, moe_intermediate_size=16, **_GROUPED, first_k_dense_replace=1, n_shared_experts=1,
                      layer_types=["full_attention"] * 3),
        "kimi_linear": dict(moe_intermediate_size=16, num_expert_group=2, topk_group=1, routed_scaling_factor=2.5,
                            moe_renormalize=True, num_shared_experts=1, first_k_dense_replace=1, **_MLA, pad_token_id=0,
                            linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2],
                                                "num_heads": 4, "head_dim": 8, "short_conv_kernel_size": 4}),
        "deepseek_v2": dict(moe_intermediate_size=16, n_group=2, topk_group=1, topk_method="group_limited_greedy",
                            routed_scaling_factor=2.0, first_k_dense_replace=1, n_shared_experts=1, **_MLA),
        "minimax_m2": dict(head_dim=8),
        "afmoe": dict(head_dim=8, moe_intermediate_size=16, num_dense_layers=1, num_shared_experts=1,
                      route_scale=1.5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      sliding_window=8),
        "lfm2_moe": dict(moe_intermediate_size=16, num_dense_layers=1, use_expert_bias=True,
                         routed_scaling_factor=1.5, norm_topk_prob=True,
                         layer_types=["conv", "full_attention", "conv"]),
        "ernie4_5_moe": dict(moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1,
                             moe_layer_end_index=2),
        "phimoe": dict(head_dim=8),
        "granitemoe": dict(),
        "hunyuan_v1_moe": dict(head_dim=8, use_qk_norm=True),
        # sigmoid scoring with renormalisation, and a shared expert averaged with the routed output
        "cohere2_moe": dict(head_dim=8, expert_selection_fn="sigmoid", norm_topk_prob=True,
                            num_shared_experts=1, shared_expert_combination_strategy="average",
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            sliding_window=8),
        # router bias, transposed/interleaved gate_up with biases, attention sinks
        "gpt_oss": dict(head_dim=8, sliding_window=8),
        # dense decoders: attention biases, q/k norms, sliding layers, multipliers, a fused q/k/v projection
        "llama": dict(head_dim=8),
        "mistral": dict(head_dim=8),
        "qwen2": dict(),
        "qwen3": dict(head_dim=8),
        "exaone4": dict(head_dim=8, sliding_window=8, sliding_window_pattern=2,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "olmo2": dict(),
        "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                        logits_scaling=4.0),
        "phi3": dict(pad_token_id=0),
    }
    if model_type not in options:
        raise ValueError(model_type)
    config_class = CONFIG_MAPPING[model_type]
    adapter = ARCHITECTURES[model_type]
    flagship = flagship_config(model_type)
    fields = getattr(config_class, "__dataclass_fields__", {})
    tiny = {key: value for key, value in flagship.items() if key not in _NOT_COPIED}
    layers = flagship["num_hidden_layers"]
    for key, value in tiny.items():  # per-layer lists: the first layers' entries
        if isinstance(value, list) and len(value) == layers and key != "architectures":
            tiny[key] = value[:_COMMON["num_hidden_layers"]]
    tiny.update({key: value for key, value in _COMMON.items() if key in flagship or key in fields})
    tiny.update(_shrunk_head_sizes(flagship, options[model_type].get("head_dim", _HEAD_SIZE)))
    tiny.update(_small_token_ids(tiny, _COMMON["vocab_size"]))
    for key in ("torch_dtype", "dtype"):  # models are built in the config's dtype: float32, as the tests compare
        if key in tiny:
            tiny[key] = "float32"
    if adapter.moe:
        sizes = {adapter.config_num_experts: num_experts, adapter.config_top_k: top_k}
        tiny.update({key: _in_form(flagship, key, value) for key, value in sizes.items()})
    tiny.update({key: _in_form(flagship, key, value) for key, value in options[model_type].items()})
    if adapter.moe:  # every field stating the experts' width or top-k agrees with the one the class reads
        width = tiny.get(adapter.config_expert_width, _COMMON["intermediate_size"])
        tiny.update({key: _in_form(flagship, key, width) for key in adapter.config_width_mirrors if key in flagship})
        tiny.update({key: _in_form(flagship, key, top_k) for key in adapter.config_top_k_mirrors if key in flagship})
    config = config_class.from_dict(tiny)
    # token ids the flagship leaves to the class's defaults, inside the tiny vocabulary too
    defaults = {key: getattr(config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for key, value in _small_token_ids(defaults, _COMMON["vocab_size"]).items():
        if value is not None:
            setattr(config, key, value)
    return config


def _in_form(flagship: dict, key: str, value):
    """``value`` in the form the flagship gives ``key``: one entry per tiny layer where it is a per-layer list."""
    if isinstance(flagship.get(key), list) and len(flagship[key]) == flagship["num_hidden_layers"] \
            and not isinstance(value, list):
        return [value] * _COMMON["num_hidden_layers"]
    return value


def _shrunk_head_sizes(flagship: dict, head_size: int) -> dict:
    """The head-size fields the flagship states, at the tiny head size; a partial rotary width (``rotary_dim``)
    and long-RoPE factor lists (one per rotary frequency) shrink with it."""
    shrunk = {key: head_size for key in ("head_dim", "attention_head_dim") if isinstance(flagship.get(key), int)}
    full = flagship.get("head_dim") or flagship["hidden_size"] // flagship["num_attention_heads"]
    if isinstance(flagship.get("rotary_dim"), int):
        shrunk["rotary_dim"] = max(2, flagship["rotary_dim"] * head_size // full)
    rope = flagship.get("rope_scaling")
    if isinstance(rope, dict) and any(isinstance(value, list) for value in rope.values()):
        shrunk["rope_scaling"] = {key: value[:head_size // 2] if isinstance(value, list) else value
                                  for key, value in rope.items()}
    return shrunk


def _small_token_ids(config: dict, vocab_size: int) -> dict:
    """Token-id fields (``*_id``) inside the tiny vocabulary, each id or list of ids in its own form."""
    def small(value):
        if isinstance(value, list):
            return [small(item) for item in value]
        return value % vocab_size if isinstance(value, int) and not isinstance(value, bool) else value
    return {key: small(value) for key, value in config.items() if key.endswith("_id")}


ARCHITECTURE_TYPES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]
# every type in the adapter table: the architecture suite (tests/test_architecture_suite.py) runs on all
ALL_ARCHITECTURE_TYPES = sorted(model_type for model_type, adapter in ARCHITECTURES.items() if adapter.moe)
# the dense decoders of the table: the steps for any decoder and the evaluation run on them
DENSE_TYPES = sorted(model_type for model_type, adapter in ARCHITECTURES.items() if not adapter.moe)

NO_CUDA = "CUDA is not available on this machine (make test-gpu runs these on a GPU node)"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
# the devices every method and statistics test runs on: the CPU always, CUDA where present
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, requires_cuda])]


def assert_same_model(reloaded, model, ids: torch.Tensor) -> None:
    """A reloaded checkpoint is the in-memory model: every saved tensor bitwise equal, and the same logits.

    The logits are compared within the dtype's tolerance, not bitwise: the loaded tensors sit at other
    memory alignments (safetensors maps the file), and CPU GEMM kernels pick their code path by
    alignment and vector width, so the last bits of a sum may differ though the weights are equal."""
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name].cpu(), tensor.cpu()), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids.to(reloaded.device)).logits,
                                   model(input_ids=ids.to(model.device)).logits)


def tiny_model_of(model_type: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kwargs)).eval()
    # random init leaves routers (and biases) at zero: give them real preferences, so tokens spread
    # unevenly over experts and pruning has something to choose
    adapter = adapter_for(model.config)
    with torch.no_grad():
        for block in adapter.moe_blocks(model).values():
            for (owner, name), tensor in adapter.per_expert_tensors(block).items():
                if owner != "experts":  # router rows and choice biases
                    tensor.normal_(0, 0.5)
                elif name.endswith("bias"):
                    tensor.normal_(0, 0.02)
    return model


# vLLM's CPU attention takes head sizes from 32 (the tiny models' 8 it refuses), and its CPU MLA only
# DeepSeek's latent width: kv_lora_rank + qk_rope_head_dim = 576
SERVING_SIZES = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
SERVING_HEAD = {"head_dim": 32}
SERVING_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, head_dim=64,
                   qk_head_dim=96, num_key_value_heads=2)


def serving_model_of(model_type: str, seed: int = 0, **kwargs):
    """The tiny model of ``model_type`` at head sizes vLLM's CPU kernels serve (tests/test_serving.py)."""
    sizes = dict(SERVING_SIZES)
    if model_type in ("deepseek_v3", "deepseek_v2", "glm4_moe_lite", "kimi_linear"):
        sizes.update(SERVING_MLA)
    elif "head_dim" in flagship_config(model_type) or model_type in ("qwen3_moe", "mixtral"):
        sizes.update(SERVING_HEAD)
    if "moe_intermediate_size" in flagship_config(model_type):
        sizes["moe_intermediate_size"] = 32  # room for a global width allocation to differ between layers
    return tiny_model_of(model_type, seed, **{**sizes, **kwargs})


def tiny_qwen3_moe(seed: int = 0, **kwargs):
    return tiny_model_of("qwen3_moe", seed, **kwargs)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "url": "x"}) + "\n" for text in texts))
    return path


C4_SAMPLE = REPO / "data/c4/c4_en_train.00000-of-01024_first1000.jsonl.gz"
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"


def put_in_hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path], repo_type: str = "model") -> Path:
    """Lay ``files`` ({path in the repo: local file}) out as the hub client caches a download under
    ``hf_home`` (blobs, a snapshot of links, refs/main), so the offline client finds them, as on a
    host where someone ran the download earlier. Returns the snapshot folder."""
    import shutil

    repo_dir = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / commit
    for index, (name, source) in enumerate(sorted(files.items())):
        blob = repo_dir / "blobs" / f"{index:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def put_model_in_hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> Path:
    return put_in_hub_cache(hf_home, repo_id, {path.name: path for path in model_dir.iterdir() if path.is_file()})


def put_c4_in_hub_cache(hf_home: Path) -> Path:
    """The bundled C4 sample (the first 1,000 documents of this very shard) as the cached shard."""
    return put_in_hub_cache(hf_home, "allenai/c4", {C4_SHARD: C4_SAMPLE}, repo_type="dataset")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


def validated_steps(*raw_steps: dict) -> list[dict]:
    """Steps as the validated config passes them to a job: every default filled."""
    raw = {"model": {"path": "demo"}, "calibration": {}, "variants": {"v": {"steps": list(raw_steps)}}}
    return validate_config(raw)["variants"]["v"]["steps"]


def validated_step(method: str, **options) -> dict:
    return validated_steps({"method": method, **options})[0]


def saved_tensor_count(path: Path) -> int:
    """Weights (floating-point elements) stored in a checkpoint's safetensors files; integer tensors (a
    dictionary code's atom indices) are bookkeeping."""
    total = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            tensors = [handle.get_tensor(key) for key in handle.keys()]
            total += sum(tensor.numel() for tensor in tensors if tensor.is_floating_point())
    return total


def synthetic_inputs(tokens: int = 256, hidden: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(tokens, hidden, generator=generator)
    inputs[:, 0] = inputs[:, 0].abs() + 3.0  # every token has a positive first coordinate
    return inputs


def context_with_inputs(model, tokens: int = 192, device="cpu") -> CompressionContext:
    """A compression context with synthetic cached inputs for every MoE layer, a quarter held out."""
    adapter = adapter_for(model.config)
    inputs = {layer: synthetic_inputs(tokens, model.config.hidden_size, seed=layer).to(device)
              for layer in adapter.moe_blocks(model)}
    return CompressionContext.for_model(model, moe_inputs=inputs, heldout_fraction=0.25)


# --- the workflow, through real snakemake runs ------------------------------------------------------------

SNAKEMAKE = Path(sys.executable).with_name("snakemake")

TINY = {
    "model": {"path": "demo", "dtype": "float32", "device": "cpu"},
    "demo_model": {"num_layers": 2, "hidden_size": 32, "num_experts": 8, "top_k": 2, "moe_intermediate_size": 32,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512, "seq_len": 32,
                   "batch_size": 8, "steps": 30, "seed": 0},
    # a mix of three sources: the calibration windows, the statistics per source, a held-out perplexity each
    "calibration": {"num_samples": 16, "seq_len": 32, "seed": 0, "sources": [
        {"name": "c4", "path": str(REPO / "data/c4/c4_en_train.00000-of-01024_first1000.jsonl.gz"),
         "heldout_docs": 50, "share": 0.5},
        {"name": "korean", "path": str(REPO / "data/korean/kowiki_wikiextractor_AA_wiki_00.txt.gz"),
         "documents": "doc_tags", "heldout_docs": 8, "share": 0.25},
        {"name": "code", "path": str(REPO / "data/code/mbpp.jsonl.gz"), "text_field": ["text", "code"],
         "heldout_docs": 50, "share": 0.25}]},
    "cache": {"batch_size": 8},
    "evaluation": {"tasks": ["winogrande"], "limit": 4, "batch_size": 8, "variants": ["base", "uniform4"],
                   "data_dir": str(REPO / "data/eval")},
    "speed": {"num_prompts": 2, "prompt_tokens": 16, "decode_tokens": 4, "repeats": 3, "warmup": 0},
    "perplexity": {"seq_len": 32, "batch_size": 8, "max_windows": 8,
                   "wikitext2_path": str(REPO / "data/wikitext2/wikitext-2-raw-v1_test.joined.txt.gz")},
    "variants": {
        "base": {"steps": []},
        "keep_most": {"method": "frequency_prune", "min_fraction": 0.02},
        "keep_some": {"method": "frequency_prune", "min_fraction": 0.15},
        "uniform4": {"method": "frequency_prune", "uniform": True, "keep": 4},
        "merged": {"method": "hc_merge", "merges_per_layer": 2, "merge": "learned", "learn_steps": 20},
        "pruned_low_rank": {"steps": [{"method": "frequency_prune", "uniform": True, "keep": 6},
                                      {"method": "svd_experts", "rank": 8, "share_basis": True}]},
        "reap4": {"method": "reap_prune", "keep": 4},
        # the same pruned for the code source alone: its statistics re-weighted, no new forward pass
        "reap4_code": {"method": "reap_prune", "keep": 4, "weights": {"code": 1.0}},
        "skip_rescale": {"steps": [{"method": "dynamic_skip", "beta": "auto", "target_active": 1.5},
                                   {"method": "output_rescale"}]},
        # a sweep: 75 % of the experts, shared uniformly or by one ranking over both layers
        "reap_target": {"method": "reap_prune", "target": {"experts_fraction": [0.75]},
                        "allocation": ["uniform", "global"]},
        # beyond REAP: constants for the dropped experts (remote code); EASY-EP's saliency (a cache with the
        # residual stream) with the super expert protected; a width cut keeping the largest neuron peak
        "mone4": {"method": "mone_prune", "keep": 4},
        "easy_ep4_protected": {"method": "easy_ep_prune", "keep": 4, "protect": "super_experts"},
        "width_protected": {"method": "prune_expert_width", "fraction": 0.5, "protect": {"super_experts": {"count": 1}}},
    },
}


# TINY's windows from one corpus written with the single-corpus keys: C4 from the hub (a cached shard)
TINY_HUB_C4 = {"source": "hub", "hub_docs": 400, "heldout_docs": 50, "num_samples": 16, "seq_len": 32, "seed": 0}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    """The workflow on a test's own config, run in ``workdir`` (``--directory``), not in the repository: each test
    needs a results/ of its own (a fresh one, or one it damages on purpose), and a run in the checkout would mix
    its outputs with the user's. With a ``--configfile`` the run reads nothing of config/config.yaml, as from the
    repository root. The README's own commands run from a clone's root instead (``user_clone``)."""
    return subprocess.run(snakemake_command(workdir, configfile, *args), capture_output=True, text=True,
                          env=offline_environment(), timeout=900)


def snakemake_command(workdir: Path, configfile: Path, *args: str) -> list[str]:
    return [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), "--cores", "2", *args]


def run_tiny_dag(workdir: Path) -> Path:
    """The TINY DAG run to its final table in ``workdir`` (its config in workdir/config.yaml), under umask 022, the
    usual one, so that tests can check the modes of what it wrote. The finished run the Snakemake-level tests
    share (conftest.py's ``tiny_dag``): built once per session, read in place, copied (``copy_of_run``) by a test
    that runs Snakemake on it."""
    previous = os.umask(0o022)
    try:
        result = snakemake(workdir, write_config(workdir / "config.yaml", TINY), "results/final_table.csv")
    finally:
        os.umask(previous)
    if result.returncode != 0:
        raise AssertionError(f"the tiny DAG failed in {workdir}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return workdir


def copy_of_run(source: Path, destination: Path) -> Path:
    """A finished run's outputs and its config, with Snakemake's record of how each output was made
    (.snakemake/metadata: the params, code and inputs a rerun is decided on), modification times kept: Snakemake
    sees the copy as finished as the original (``snakemake -n`` plans nothing), and a test may change it."""
    for folder in ("results", ".snakemake/metadata"):
        shutil.copytree(source / folder, destination / folder, symlinks=True)
    shutil.copy2(source / "config.yaml", destination / "config.yaml")
    return destination


JOB_HOOKS = REPO / "tests/job_hooks"


def start_snakemake_paused_before(workdir: Path, configfile: Path, written: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """The workflow started in the background, its jobs stopping for good where one is about to write a file whose
    absolute path matches the glob ``written`` (tests/job_hooks/sitecustomize.py). Returns the run and the file
    that appears once a job has stopped there: a test waits for it, then kills the run at that known point."""
    paused = workdir / "paused_job.txt"
    env = offline_environment(MOE_COMPRESS_TEST_PAUSE_BEFORE=written, MOE_COMPRESS_TEST_PAUSED=str(paused),
                              PYTHONPATH=os.pathsep.join(filter(None, [str(JOB_HOOKS), os.environ.get("PYTHONPATH")])))
    run = subprocess.Popen(snakemake_command(workdir, configfile, *args), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    return run, paused


def wait_until(condition, what: str, run: subprocess.Popen | None = None, poll_s: float = 0.1) -> None:
    """Poll ``condition()`` until it holds. No bound on how soon: the deadline, far beyond any machine's need,
    only keeps a failure from hanging the suite. With ``run``, its ending first fails at once."""
    deadline = time.monotonic() + 1200
    while not condition():
        assert run is None or run.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(poll_s)


def planned_jobs(dry_run_output: str) -> list[tuple[str, str]]:
    """(rule, variant-or-empty) for every job a dry run plans, read from its job list."""
    jobs, current = [], None
    for line in dry_run_output.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if match:
            if current:
                jobs.append(current)
            current = (match.group(1), "")
            continue
        match = re.match(r"^wildcards: (.*)$", line.strip())
        if match and current:
            variant = re.search(r"variant=([^,\s]+)", match.group(1))
            current = (current[0], variant.group(1) if variant else match.group(1))
    if current:
        jobs.append(current)
    return jobs


def measure_speed_on_a_controlled_clock(model, monkeypatch, seconds, repeats: int, warmup: int) -> dict:
    """measure_speed on two random 8-token prompts, 4 new tokens, on a clock that stands still except where
    ``seconds(input_ids) -> float`` moves it, before every forward of the model's decoder: each forward takes
    exactly what the test says, whatever else the machine is doing."""
    from moe_compress.evaluate import speed as speed_module

    now = [0.0]
    monkeypatch.setattr(speed_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def advance(module, args, kwargs):
        now[0] += seconds(kwargs.get("input_ids", args[0] if args else None))

    handle = model.model.register_forward_pre_hook(advance, with_kwargs=True)
    try:
        return measure_speed(model, np.random.default_rng(0).integers(0, 300, size=(2, 8)), decode_tokens=4,
                             repeats=repeats, warmup=warmup)
    finally:
        handle.remove()


# --- shared by the streaming, layerwise and architecture suites ----------------------------------------

HELDOUT = 0.25  # the held-out fraction of cached tokens in the per-layer job comparisons


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


def layer_part_paths(parts_dir, layers):
    return {layer: parts_dir / f"layer_{layer}.safetensors" for layer in layers}


def model_cache_and_stats(model_type: str, work_dir: Path):
    """A saved tiny model of ``model_type``, its calibration cache and its statistics table (with REAP
    saliency), under ``work_dir``: the inputs of a compress job."""
    from moe_compress.cache import CacheReader, build_cache, read_router_cache
    from moe_compress.stats import expert_frequency, expert_saliency, with_saliency
    from moe_compress.streaming import LayerStream

    model_dir, cache_dir = work_dir / "model", work_dir / "cache"
    tiny_model_of(model_type).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    input_ids = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    build_cache(LayerStream(model_dir), input_ids, 4, cache_dir)
    stats = with_saliency(expert_frequency(read_router_cache(cache_dir)),
                          expert_saliency(LayerStream(model_dir), CacheReader(cache_dir).moe_inputs()))
    return model_dir, cache_dir, stats


def whole_model_checkpoint(model_dir, cache_dir, stats, steps, out_dir):
    model = load_model(model_dir)
    context = CompressionContext.for_model(model, stats=stats, moe_inputs=read_moe_inputs(cache_dir),
                                           heldout_fraction=HELDOUT)
    reports = apply_steps(model, steps, context)
    return save_checkpoint(model, load_tokenizer(model_dir), out_dir, {"steps": steps, "step_reports": reports})


def per_layer_checkpoint(model_dir, cache_dir, stats, steps, parts_dir, out_dir):
    layers = skeleton_moe_layers(model_dir)
    parts = layer_part_paths(parts_dir, layers)
    for layer, path in parts.items():
        tensors, facts = compress_layer(model_dir, layer, steps, stats, cache_dir, HELDOUT)
        write_layer_part(path, tensors, facts)
    return assemble_checkpoint(model_dir, parts, out_dir, {"steps": steps})


def all_tensors(model_dir):
    tensors = CheckpointTensors(model_dir)
    return tensors.read(list(tensors.weight_map))


# --- where the user stands: a clone of the repository -------------------------------------------------------

def user_clone(destination: Path) -> Path:
    """The repository as a user's clone has it (the files git tracks, and new ones it does not ignore), with this
    checkout's set-up (.venv) linked in: a test of a README command runs it from the clone's root, as written.
    Nothing this checkout made (results/, .snakemake/, caches) comes along."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not (source.is_file() or source.is_symlink()):  # tracked, but deleted in this checkout
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    (destination / ".venv").symlink_to(REPO / ".venv")
    return destination


def offline_environment(**extra: str) -> dict[str, str]:
    """The environment CI runs in: no hub."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}



# --- statistics that make a pruning differ between layers -----------------------------------------------------

def non_uniform_min_count(stats, floor: int = 2) -> int:
    """A frequency_prune ``min_count`` that keeps a different number of experts in the MoE layers of ``stats``
    (each layer floored at ``floor``, its top-k), found from the table itself rather than hoped for."""
    layers = sorted(stats["layer"].unique())
    for threshold in sorted(stats["selected"].unique()):
        kept = stats[stats["selected"] >= threshold].groupby("layer").size().reindex(layers, fill_value=0)
        if kept.clip(lower=floor).nunique() > 1:
            return int(threshold)
    raise AssertionError("no frequency threshold keeps different expert counts in these layers")
