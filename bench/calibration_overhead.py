"""Benchmark 1: the calibration pass against a plain forward pass over the same tokens.

The calibration pass (cache_router_activations) records router logits/decisions and MoE-block inputs and
writes them; the plain pass is the decoder's forward alone. Both whole-model and layer-streamed calibration
are timed. Goal: streamed calibration / plain forward <= 1.10.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import report, save_synthetic, synthetic_qwen3_moe, timed  # noqa: E402

from moe_compress.cache import build_cache
from moe_compress.modelio import load_model  # noqa: E402
from moe_compress.streaming import LayerStream  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64],
                        help="calibration sizes to time (samples of --seq-len tokens)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_calibration_") as work:
        work = Path(work)
        model_dir = work / "model"
        size = save_synthetic(synthetic_qwen3_moe(args.layers, args.hidden, args.experts, args.moe_intermediate,
                                                  args.top_k), model_dir)
        model = load_model(model_dir)
        decoder = model.get_decoder()
        for samples in args.samples:
            input_ids = torch.randint(0, 4096, (samples, args.seq_len), generator=torch.Generator().manual_seed(0))
            batches = [input_ids[start : start + args.batch_size] for start in range(0, samples, args.batch_size)]

            @torch.no_grad()
            def plain_forward():
                for batch in batches:
                    decoder(input_ids=batch, use_cache=False)

            def whole_model_calibration():
                build_cache(model, input_ids, args.batch_size, work / "cache_whole")

            def streamed_calibration():  # includes reading every layer from disk
                build_cache(LayerStream(model_dir), input_ids, args.batch_size, work / "cache_streamed")

            plain_forward()  # warm-up: first-call allocations and kernels
            plain, _ = timed(plain_forward, args.repeats)
            whole, _ = timed(whole_model_calibration, args.repeats)
            streamed, _ = timed(streamed_calibration, args.repeats)
            tokens = samples * args.seq_len
            rows += [
                {"tokens": tokens, "pass": "plain forward", "seconds": plain, "ratio_to_plain": 1.0},
                {"tokens": tokens, "pass": "whole-model calibration", "seconds": whole, "ratio_to_plain": whole / plain},
                {"tokens": tokens, "pass": "layer-streamed calibration", "seconds": streamed,
                 "ratio_to_plain": streamed / plain},
            ]

    print(f"calibration overhead: {args.layers} layers, hidden {args.hidden}, {args.experts} experts "
          f"(top-{args.top_k}), {size / 1e9:.2f} GB checkpoint (fp32), median of {args.repeats}")
    report("calibration_overhead", rows)
    for row in rows:
        if row["pass"] == "layer-streamed calibration":
            print(f"RATIO streamed calibration / plain forward at {row['tokens']} tokens = "
                  f"{row['ratio_to_plain']:.3f} (goal <= 1.10)")

if __name__ == "__main__":
    main()
