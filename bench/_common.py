"""Shared by the benchmark scripts: synthetic MoE checkpoints, timing, and one CSV per benchmark in
results/bench/. Each script prints the ratios it measured in that one run, on this machine."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "results" / "bench"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(function, repeats: int = 1) -> tuple[float, object]:
    """(median wall seconds over ``repeats`` calls, the last call's result)."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def write_rows(name: str, rows: list[dict]) -> Path:
    """results/bench/<name>.csv: the rows, each stamped with the date and the machine."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.csv"
    stamped = [{"date": date.today().isoformat(), "machine": machine(), **row} for row in rows]
    columns = list(dict.fromkeys(key for row in stamped for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(stamped)
    return path


def report(name: str, rows: list[dict]) -> None:
    path = write_rows(name, rows)
    for row in rows:
        print("  " + ", ".join(f"{key}={_fmt(value)}" for key, value in row.items()))
    print(f"  -> {path.relative_to(REPO)}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def synthetic_qwen3_moe(num_layers: int, hidden_size: int, num_experts: int, moe_intermediate_size: int,
                        top_k: int, vocab_size: int = 4096, dtype: torch.dtype = torch.float32, seed: int = 0,
                        num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                        head_dim: int | None = None, router_std: float = 0.5, device: str | torch.device = "cpu"):
    """A Qwen3-MoE of the given size with random weights, built without the library's initialisers
    (fast at several GB): parameters filled with N(0, 0.02), norms at 1, routers with real preferences
    (N(0, ``router_std``)). Heads default to hidden / 128 query and hidden / 512 key-value heads of 128;
    ``device``: where the weights are drawn and kept (a GPU draws a real-size model in seconds)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            moe_intermediate_size=moe_intermediate_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_attention_heads or max(1, hidden_size // 128),
                            num_key_value_heads=num_key_value_heads or max(1, hidden_size // 512),
                            head_dim=head_dim or (128 if hidden_size >= 128 else hidden_size), num_experts=num_experts,
                            num_experts_per_tok=top_k, norm_topk_prob=True, tie_word_embeddings=False)
    from moe_compress.streaming import rebuild_derived_buffers

    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    rebuild_derived_buffers(model, only_meta=False)  # rotary tables as loading makes them (on the CPU)
    model.to(device)  # ... so move them beside the weights
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                std = router_std if name.endswith("mlp.gate.weight") else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32,
                                            device=device).mul_(std))
    return model.eval()


def save_synthetic(model, path: Path, max_shard_size: str = "1GB") -> int:
    """Save with a tokenizer-free layout (the benchmarks feed token ids); returns the bytes on disk."""
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))
