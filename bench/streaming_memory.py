"""Benchmark 2: peak memory of layer-streamed calibration against the size of the checkpoint.

Synthetic Qwen3-MoEs of 5 and 10 GB (bf16) are written to disk; then, each in a fresh process, the
calibration pass runs layer-streamed (and, for the smaller one, whole-model), and the process reports its
own peak RSS. Goal: a checkpoint at least 4x larger than the memory the streamed pass uses. For the
smaller one, the streaming checkpoint writer (the per-layer mode's assembly job) is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def peak_rss_bytes() -> int:
    """This process's peak resident set size since the last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    # a forked child inherits its parent's high-water mark (Linux >= 4.0 can reset it)
    Path("/proc/self/clear_refs").write_text("5")


def layer_parts(model_dir: Path) -> dict[int, Path]:
    return {layer: model_dir.parent / "parts" / f"layer_{layer}.safetensors"
            for layer in range(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])}


def write_unchanged_parts(model_dir: Path) -> None:
    """What compress_layer writes for a variant with no steps: each MoE layer's tensors (hub layout) and facts."""
    from moe_compress.layerwise import hub_layout_tensors, layer_state, write_layer_part
    from moe_compress.modelio import block_facts
    from moe_compress.streaming import LayerStream

    stream = LayerStream(model_dir, "bfloat16")
    for layer, path in layer_parts(model_dir).items():
        stream.load_layer(layer)
        block = stream.adapter.moe_blocks(stream.model)[layer]
        write_layer_part(path, hub_layout_tensors(stream.model, layer_state(stream, layer)),
                         {"layer": layer, "facts": block_facts(stream.adapter, block), "reports": []})
        stream.free_layer(layer)


def child(mode: str, model_dir: str, samples: int, seq_len: int) -> None:
    """Run in a fresh process: one calibration pass, the checkpoint assembly (or nothing: the import
    baseline); print peak RSS."""
    reset_peak_rss()
    import torch

    from moe_compress.cache import build_cache
    from moe_compress.layerwise import assemble_checkpoint
    from moe_compress.modelio import load_model
    from moe_compress.streaming import LayerStream

    input_ids = torch.randint(0, 4096, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(dir=Path(model_dir).parent) as out:
        if mode == "parts":
            write_unchanged_parts(Path(model_dir))
        elif mode == "assemble":
            assemble_checkpoint(model_dir, layer_parts(Path(model_dir)), Path(out) / "checkpoint", {}, "bfloat16")
        elif mode == "streamed":
            build_cache(LayerStream(model_dir, "bfloat16"), input_ids, 4, Path(out) / "cache")
        elif mode == "whole":
            build_cache(load_model(model_dir, "bfloat16"), input_ids, 4, Path(out) / "cache")
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))


def measure(mode: str, model_dir: Path, samples: int, seq_len: int) -> int:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(model_dir), str(samples), str(seq_len)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 48],
                        help="model sizes (decoder layers) to measure; about 0.2 GB per layer")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--skip-whole", action="store_true", help="do not load the whole model (needs its size in RAM)")
    parser.add_argument("--build", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "MODEL_DIR", "SAMPLES", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model_dir, samples, seq_len = args.child
        child(mode, model_dir, int(samples), int(seq_len))
        return
    if args.build:
        import torch
        from _common import save_synthetic, synthetic_qwen3_moe

        layers, hidden, experts, width, model_dir = args.build
        model = synthetic_qwen3_moe(int(layers), int(hidden), int(experts), int(width), top_k=min(8, int(experts)),
                                    dtype=torch.bfloat16)
        print(json.dumps({"bytes": save_synthetic(model, Path(model_dir))}))
        return

    from _common import report

    results = Path(__file__).resolve().parents[1] / "results"
    results.mkdir(exist_ok=True)
    rows, gb = [], 1e9
    for position, layers in enumerate(args.layers):
        with tempfile.TemporaryDirectory(prefix="bench_streaming_", dir=results) as work:
            model_dir = Path(work) / "model"
            # built in its own process, so this one stays small and its children inherit nothing
            built = subprocess.run([sys.executable, __file__, "--build", str(layers), str(args.hidden),
                                    str(args.experts), str(args.moe_intermediate), str(model_dir)],
                                   capture_output=True, text=True, check=True)
            size = json.loads(built.stdout.strip().splitlines()[-1])["bytes"]
            baseline = measure("imports", model_dir, args.samples, args.seq_len)
            streamed = measure("streamed", model_dir, args.samples, args.seq_len)
            # the whole-model pass needs about twice the checkpoint in RAM: the first (smallest) size only
            whole = None if args.skip_whole or position else measure("whole", model_dir, args.samples, args.seq_len)
            assembled = None
            if not position:  # the writer needs the parts and the output beside the checkpoint: 3x its size on disk
                measure("parts", model_dir, args.samples, args.seq_len)
                assembled = measure("assemble", model_dir, args.samples, args.seq_len)
        print(f"streaming memory: {layers} layers, hidden {args.hidden}, {args.experts} experts, bf16 checkpoint "
              f"{size / gb:.2f} GB, {args.samples} x {args.seq_len} calibration tokens")
        rows += [
            {"layers": layers, "measure": "checkpoint size", "gigabytes": size / gb},
            {"layers": layers, "measure": "peak RSS, imports only (python + torch + transformers)",
             "gigabytes": baseline / gb},
            {"layers": layers, "measure": "peak RSS, layer-streamed calibration", "gigabytes": streamed / gb,
             "checkpoint_over_peak": size / streamed},
        ]
        if whole is not None:
            rows.append({"layers": layers, "measure": "peak RSS, whole-model calibration", "gigabytes": whole / gb,
                         "checkpoint_over_peak": size / whole})
            print(f"RATIO whole-model peak RSS / streamed peak RSS = {whole / streamed:.2f}")
        print(f"RATIO checkpoint size / streamed peak RSS at {size / gb:.1f} GB = {size / streamed:.2f} (goal >= 4)")
        if assembled is not None:
            rows.append({"layers": layers, "measure": "peak RSS, streamed checkpoint writer (assembly)",
                         "gigabytes": assembled / gb, "checkpoint_over_peak": size / assembled})
            print(f"RATIO checkpoint size / streamed writer peak RSS at {size / gb:.1f} GB = {size / assembled:.2f}")
    report("streaming_memory", rows)

if __name__ == "__main__":
    main()
