"""Profile of issue #19: throughput of the routed experts of one MoE block (Qwen3-30B-A3B-like, scaled down)
in three forms: the stock fused experts (transformers' grouped_mm path), the low-rank experts of
moe_compress_layers (at an aligned rank: grouped_mm; at an odd rank: the per-expert fallback), and the old
Python loop over experts (the module at --old-rev, a commit from before the grouped forward).
Usage: python bench/lowrank_block_speed.py [--threads 2] [--clock wall|cpu] [--old-rev REV]"""

import argparse
import subprocess
import time
import types

import torch
from transformers import Qwen3MoeConfig
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from moe_compress.remote_code import moe_compress_layers as layers


def old_forward_class(rev="HEAD"):
    """The module as committed at ``rev`` (its loop-over-experts forward, for comparison only)."""
    source = subprocess.run(["git", "show", f"{rev}:src/moe_compress/remote_code/moe_compress_layers.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("old_layers")
    exec(compile(source, "old_layers", "exec"), module.__dict__)
    return module


def build(hidden, inter, experts, dtype):
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                            num_experts_per_tok=8, hidden_act="silu")
    config._experts_implementation = "eager"
    stock = Qwen3MoeExperts(config).to(dtype)
    with torch.no_grad():
        stock.gate_up_proj.normal_(0, hidden ** -0.5)
        stock.down_proj.normal_(0, inter ** -0.5)
    stock.has_gate, stock.has_bias, stock.is_transposed = True, False, False
    stock.has_post_expert_norm, stock._is_expert_parallel = False, False
    return stock


def factors(shape, experts, rank, shared, dtype, generator):
    out, inp = shape
    left = torch.randn(1 if shared == "left" else experts, out, rank, generator=generator) * rank ** -0.5
    right = torch.randn(1 if shared == "right" else experts, rank, inp, generator=generator) * inp ** -0.5
    return left.to(dtype).contiguous(), right.to(dtype).contiguous()


def low_rank(module_lib, stock_maker, rank, share, dtype):
    experts = stock_maker()
    names = ("gate_up_proj", "down_proj")
    shapes = {name: tuple(getattr(experts, name).shape[1:]) for name in names}
    shared = {"gate_up_proj": "right" if share else None, "down_proj": "left" if share else None}
    generator = torch.Generator().manual_seed(0)
    facts = {name: factors(shapes[name], experts.num_experts, rank, shared[name], dtype, generator) for name in names}
    specs = {name: {"rank": rank, "shared": shared[name]} for name in names}
    return module_lib.convert_to_low_rank(experts, facts, specs, names)


def interleaved(variants, args, budget, clock=time.perf_counter):
    """Seconds per call of each variant: rounds that call every variant once in turn (so a load change on
    the machine hits all alike), until ``budget`` seconds are spent; the minimum over rounds."""
    best = {name: float("inf") for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm up
            fn(*args)
        start, rounds = time.perf_counter(), 0
        while rounds < 3 or (time.perf_counter() - start < budget and rounds < 200):
            for name, fn in variants.items():
                begin = clock()
                fn(*args)
                best[name] = min(best[name], clock() - begin)
            rounds += 1
    return best, rounds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=384)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 4096])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--old-rev", default="6d460f1~1", help="a commit whose low-rank forward is the old loop")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: CPU seconds of the process (all threads), less sensitive to other load")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of rounds per token count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hidden, inter, num_experts = args.hidden, args.inter, args.experts
    # half the parameters: r (2I + H) + r (H + I) = 3 I H / 2, rounded down to a multiple of 8
    half = 3 * inter * hidden / 2 / (3 * inter + 2 * hidden)
    aligned = int(half) // 8 * 8
    odd = aligned - 1
    old = old_forward_class(args.old_rev)
    make = lambda: build(hidden, inter, num_experts, dtype)
    stock = make()
    print(f"hidden {hidden}, {num_experts} experts of width {inter}, top-8, {args.dtype}, threads {args.threads}; "
          f"clock {args.clock}; rank {aligned} (aligned) / {odd} (odd) = "
          f"{aligned * (3 * inter + 2 * hidden) / (3 * inter * hidden):.3f} of the dense parameters")
    variants = {
        "stock grouped_mm": (lambda h, i, w: grouped_mm_experts_forward(stock, h, i, w)),
        "stock eager loop": stock,
    }
    for share in (False, True):
        tag = " shared" if share else ""
        variants[f"new r={aligned}{tag}"] = low_rank(layers, make, aligned, share, dtype)
        variants[f"new r={odd}{tag}"] = low_rank(layers, make, odd, share, dtype)
        variants[f"old loop r={aligned}{tag}"] = low_rank(old, make, aligned, share, dtype)
    generator = torch.Generator().manual_seed(1)
    header = f"{'variant':28s}" + "".join(f"{t:>12d} tok" for t in args.tokens)
    print(header + "   (ms per forward, best of interleaved rounds)")
    results = {}
    rounds = {}
    for tokens in args.tokens:
        hidden_states = torch.randn(tokens, hidden, generator=generator).to(dtype)
        logits = torch.randn(tokens, num_experts, generator=generator)
        weights, index = logits.softmax(-1).topk(8, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        best, rounds[tokens] = interleaved(variants, (hidden_states, index, weights), args.budget, clock)
        for name, seconds in best.items():
            results[name, tokens] = seconds
    print("rounds: " + ", ".join(f"{t} tok: {n}" for t, n in rounds.items()))
    for name in variants:
        print(f"{name:28s}" + "".join(f"{results[name, t] * 1e3:16.3f}" for t in args.tokens))


if __name__ == "__main__":
    main()
