"""What tests share: tiny random MoE models of each architecture (built from their config class in seconds),
a tokenizer, logits, validated steps, synthetic MoE inputs, the hub cache layout, and the workflow runner.
No hub, no shared data. Fixtures built on these are in conftest.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


_COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2)


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
    """Each architecture's own config class, small, with its unusual options switched on: dense layers,
    shared experts, hybrid (linear-attention / convolution) layers, groups, scaling, biases."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    experts = {"num_experts": num_experts, "num_experts_per_tok": top_k}
    local = {"num_local_experts": num_experts, "num_experts_per_tok": top_k}
    routed = {"n_routed_experts": num_experts, "num_experts_per_tok": top_k}
    pattern = ["linear_attention", "full_attention", "linear_attention"]
    options = {
        # a dense layer in the middle (mlp_only_layers)
        "qwen3_moe": dict(head_dim=8, moe_intermediate_size=16, **experts, norm_topk_prob=True, mlp_only_layers=[1]),
        # shared expert + its sigmoid gate, no top-k renormalisation
        "qwen2_moe": dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, **experts,
                          norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]),
        "qwen3_next": dict(head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24, **experts,
                           layer_types=pattern, linear_num_value_heads=4, linear_num_key_heads=2,
                           linear_key_head_dim=8, linear_value_head_dim=8, mlp_only_layers=[2]),
        "qwen3_5_moe_text": dict(head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=24, **experts,
                                 layer_types=pattern, linear_num_value_heads=4, linear_num_key_heads=2,
                                 linear_key_head_dim=8, linear_value_head_dim=8),
        "mixtral": dict(head_dim=8, **local),
        "olmoe": dict(**experts, norm_topk_prob=False, eos_token_id=0, pad_token_id=0),
        "flex_olmo": dict(**experts, norm_topk_prob=False, eos_token_id=0, pad_token_id=0),
        # groups, sigmoid + correction bias, scaling, dense first layer, shared expert
        "deepseek_v3": dict(moe_intermediate_size=16, **routed, **_GROUPED, first_k_dense_replace=1,
                            n_shared_experts=1, **_MLA),
        "deepseek_v32": dict(moe_intermediate_size=16, **routed, **_GROUPED, first_k_dense_replace=1,
                             n_shared_experts=1, **_MLA, index_n_heads=2, index_head_dim=8, index_topk=4,
                             num_key_value_heads=4,
                             mlp_layer_types=["dense", "sparse", "sparse"]),
        "glm4_moe": dict(head_dim=8, moe_intermediate_size=16, **routed, **_GROUPED, first_k_dense_replace=1,
                         n_shared_experts=1),
        "glm4_moe_lite": dict(moe_intermediate_size=16, **routed, **_GROUPED, n_shared_experts=1, **_MLA,
                              mlp_layer_types=["dense", "sparse", "sparse"]),
        "solar_open": dict(head_dim=8, moe_intermediate_size=16, **routed, **_GROUPED, n_shared_experts=1),
        "exaone_moe": dict(head_dim=8, moe_intermediate_size=16, **experts, **_GROUPED, num_shared_experts=1,
                           layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=8,
                           mlp_layer_types=["dense", "sparse", "sparse"]),
        "dots1": dict(head_dim=8, moe_intermediate_size=16, **routed, **_GROUPED, first_k_dense_replace=1,
                      n_shared_experts=1, layer_types=["full_attention"] * 3),
        "kimi_linear": dict(moe_intermediate_size=16, num_experts=num_experts, num_experts_per_token=top_k,
                            num_expert_group=2, topk_group=1, routed_scaling_factor=2.5, moe_renormalize=True,
                            num_shared_experts=1, first_k_dense_replace=1, **_MLA, pad_token_id=0,
                            linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2],
                                                "num_heads": 4, "head_dim": 8, "short_conv_kernel_size": 4}),
        "deepseek_v2": dict(moe_intermediate_size=16, **routed, n_group=2, topk_group=1,
                            topk_method="group_limited_greedy", routed_scaling_factor=2.0, first_k_dense_replace=1,
                            n_shared_experts=1, **_MLA),
        "minimax_m2": dict(head_dim=8, **local),
        "afmoe": dict(head_dim=8, moe_intermediate_size=16, **experts, num_dense_layers=1, num_shared_experts=1,
                      route_scale=1.5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      sliding_window=8),
        "lfm2_moe": dict(moe_intermediate_size=16, **experts, num_dense_layers=1, use_expert_bias=True,
                         routed_scaling_factor=1.5, norm_topk_prob=True,
                         layer_types=["conv", "full_attention", "conv"]),
        "ernie4_5_moe": dict(moe_intermediate_size=16, moe_num_experts=num_experts, moe_k=top_k,
                             moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2),
        "phimoe": dict(head_dim=8, **local),
        "granitemoe": dict(**local),
        "hunyuan_v1_moe": dict(head_dim=8, num_experts=num_experts, moe_topk=top_k, use_qk_norm=True),
        # sigmoid scoring with renormalisation, and a shared expert averaged with the routed output
        "cohere2_moe": dict(head_dim=8, **experts, expert_selection_fn="sigmoid", norm_topk_prob=True,
                            num_shared_experts=1, shared_expert_combination_strategy="average",
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            sliding_window=8),
        # router bias, transposed/interleaved gate_up with biases, attention sinks
        "gpt_oss": dict(head_dim=8, **local, sliding_window=8),
        # dense decoders: attention biases, q/k norms, sliding layers, multipliers, a fused q/k/v projection
        "llama": dict(head_dim=8),
        "mistral": dict(head_dim=8),
        "qwen2": dict(),
        "qwen3": dict(head_dim=8),
        "exaone4": dict(head_dim=8, sliding_window=8, sliding_window_pattern=2),
        "olmo2": dict(),
        "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                        logits_scaling=4.0),
        "phi3": dict(pad_token_id=0),
    }
    if model_type not in options:
        raise ValueError(model_type)
    return CONFIG_MAPPING[model_type](**{**_COMMON, **options[model_type]})


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
    "calibration": {"source": "local", "path": str(REPO / "data/c4/c4_en_train.00000-of-01024_first1000.jsonl.gz"),
                    "heldout_docs": 50, "num_samples": 16, "seq_len": 32, "seed": 0},
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
        "skip_rescale": {"steps": [{"method": "dynamic_skip", "beta": "auto", "target_active": 1.5},
                                   {"method": "output_rescale"}]},
        # a sweep: 75 % of the experts, shared uniformly or by one ranking over both layers
        "reap_target": {"method": "reap_prune", "target": {"experts_fraction": [0.75]},
                        "allocation": ["uniform", "global"]},
    },
}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(configfile), "--cores", "2", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


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


def measure_speed_with_hook(model, hook, repeats: int, warmup: int) -> dict:
    """measure_speed on two random 8-token prompts, 4 new tokens, with ``hook`` run before every forward of
    the model's decoder (``hook(module, args, kwargs)``: a sleep there makes chosen steps slower)."""
    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
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
