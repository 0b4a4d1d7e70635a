"""Benchmark 5: the per-layer cost of statistics and merging at real sizes, on CPU.

One Qwen3-30B-A3B-sized MoE block (128 experts, hidden 2048, expert width 768, top-8) with random weights,
and 16k calibration tokens. Timed: routing, the frequency table, REAP saliency, HC-SMoE's router-weighted
centroids + average-linkage clustering, a frequency-weighted merge (128 -> 64), and SVD of the experts.
Each expert runs only on the tokens routed to it (top_k / E of the pairs); the research code runs every
expert on every token, timed here on a few experts and scaled to all of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import report, timed  # noqa: E402

from moe_compress.architectures import adapter_for  # noqa: E402
from moe_compress.cache import LayerRouting
from moe_compress.config import step_defaults  # noqa: E402
from moe_compress.methods.low_rank import factorize  # noqa: E402
from moe_compress.methods.merging import average_linkage_clusters, expert_centroids, merge_layer  # noqa: E402
from moe_compress.moe_block import route, run_expert  # noqa: E402
from moe_compress.stats import layer_frequency, layer_saliency  # noqa: E402


def random_block(hidden: int, experts: int, width: int, top_k: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=experts,
                            num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=1)
    with torch.device("meta"):
        block = Qwen3MoeSparseMoeBlock(config)
    block = block.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            # router logits of unit scale on unit-scale inputs; expert weights at the usual init scale
            std = hidden ** -0.5 if name.startswith("gate.") else 0.02
            parameter.copy_(torch.randn(parameter.shape, generator=generator).mul_(std))
    return config, block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sampled-experts", type=int, default=4, help="experts timed for the scaled estimates")
    args = parser.parse_args()

    config, block = random_block(args.hidden, args.experts, args.width, args.top_k)
    adapter = adapter_for(config)
    hidden = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    rows = []

    def add(stage: str, seconds: float, note: str = "") -> None:
        rows.append({"stage": stage, "seconds": seconds, "note": note})

    with torch.no_grad():
        seconds, (weights, indices) = timed(lambda: route(adapter, block, hidden))
        add("route all tokens", seconds)
        logits = adapter.router_of(block)(hidden)[0]
        routing = LayerRouting(logits.numpy(), indices.numpy(), weights.numpy())
        seconds, _ = timed(lambda: layer_frequency(0, routing))
        add("frequency table", seconds)
        seconds, _ = timed(lambda: layer_saliency(adapter, block, hidden, adapter.reap_renormalizes(config)))
        add("REAP saliency", seconds, "each expert on its routed tokens")
        centroid_seconds, (centroids, counts) = timed(lambda: expert_centroids(adapter, block, hidden))
        add("HC centroids", centroid_seconds, "each expert on its routed tokens")
        seconds, clusters = timed(lambda: average_linkage_clusters(centroids, args.experts // 2, None))
        add("average-linkage clustering", seconds, f"{args.experts} -> {args.experts // 2}")
        sample = list(range(args.sampled_experts))
        seconds, _ = timed(lambda: [run_expert(adapter, block, hidden, expert) for expert in sample])
        all_pairs = seconds * args.experts / len(sample)
        add("every expert on every token (research code)", all_pairs,
            f"scaled from {len(sample)} experts")
        experts = adapter.experts_of(block)
        seconds, _ = timed(lambda: (factorize(experts.gate_up_proj.data[sample], None, 0.9, None),
                                    factorize(experts.down_proj.data[sample], None, 0.9, None)))
        add("SVD of the experts (svd_experts)", seconds * args.experts / len(sample), f"scaled from {len(sample)} experts")
        # last: it replaces the block's experts
        step = {**step_defaults("hc_merge"), "merges_per_layer": args.experts // 2}
        half = args.tokens // 2
        seconds, _ = timed(lambda: merge_layer(adapter, block, clusters, counts, step, hidden[:half], hidden[half:]))
        add("frequency merge", seconds, "weights only")

    print(f"per-layer cost: {args.experts} experts, hidden {args.hidden}, width {args.width}, top-{args.top_k}, "
          f"{args.tokens} tokens, one layer on CPU")
    report("per_layer_cost", rows)
    print(f"RATIO HC centroids (routed tokens only) / every expert on every token = {centroid_seconds / all_pairs:.3f} "
          f"(top_k / E = {args.top_k / args.experts:.3f})")


if __name__ == "__main__":
    main()
