"""Benchmark 4: `snakemake -n` wall time for a large configuration: a 48-MoE-layer model (Qwen3-30B-A3B's
shape; only its config.json is needed to plan) and 20 variants, with per-layer jobs (one compress job per
variant and MoE layer: 960 of them) and with one job per variant. Goal: <= 10 s in per-layer mode.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, report  # noqa: E402

SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def variants(count: int) -> dict:
    methods = [
        lambda i: {"method": "frequency_prune", "min_fraction": round(0.01 * (i + 1), 3)},
        lambda i: {"method": "frequency_prune", "uniform": True, "keep": 128 - 8 * (i + 1)},
        lambda i: {"method": "reap_prune", "keep": 128 - 8 * (i + 1)},
        lambda i: {"method": "hc_merge", "merges_per_layer": 8 * (i + 1)},
        lambda i: {"method": "svd_experts", "rank": 64 * (i + 1)},
    ]
    found = {"base": {"steps": []}}
    for i in range(count - 1):
        found[f"variant_{i:02d}"] = methods[i % len(methods)](i // len(methods))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--variants", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_dry_run_") as work:
        work = Path(work)
        model_dir = work / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({
            "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": args.layers,
            "hidden_size": 2048, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}))
        # planning checks that weights and a tokenizer are there, never reads them
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
        (model_dir / "tokenizer.json").write_text("{}")
        base_config = {"model": {"path": str(model_dir)},
                       "calibration": {"path": str(REPO / "data/c4/c4_en_train.00000-of-01024_first1000.jsonl.gz")},
                       "perplexity": {"wikitext2_path": str(REPO / "data/wikitext2/wikitext-2-raw-v1_test.joined.txt.gz")},
                       "evaluation": {"tasks": ["mmlu"], "data_dir": str(REPO / "data/eval")},
                       "variants": variants(args.variants)}
        rows = []
        for per_layer in (True, False):
            config = {**base_config, "compress": {"per_layer_jobs": per_layer}}
            configfile = work / "config.yaml"
            configfile.write_text(yaml.safe_dump(config, sort_keys=False))
            seconds, jobs = dry_runs(work, configfile, args.repeats)
            mode = "per-layer jobs" if per_layer else "per-variant jobs"
            rows.append({"layers": args.layers, "variants": args.variants, "mode": mode, "jobs_planned": jobs,
                         "seconds": seconds})
            print(f"dry run: {args.layers} MoE layers, {args.variants} variants, {mode}: {jobs} jobs planned in "
                  f"{seconds:.2f} s (median of {args.repeats})")
    report("dry_run_scale", rows)
    print(f"RATIO snakemake -n seconds (per-layer jobs) / goal 10 s = {rows[0]['seconds'] / 10:.3f} (goal <= 1)")


def dry_runs(work: Path, configfile: Path, repeats: int) -> tuple[float, int]:
    """Median wall time of ``repeats`` dry runs, and the number of jobs planned."""
    seconds, jobs = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
                                 "--configfile", str(configfile), "-n", "--quiet", "rules"],
                                capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"snakemake -n failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        totals = re.findall(r"^total\s+(\d+)", result.stdout + result.stderr, flags=re.M)
        jobs = int(totals[-1]) if totals else 0
    return sorted(seconds)[len(seconds) // 2], jobs


if __name__ == "__main__":
    main()
