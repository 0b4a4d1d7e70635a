"""Benchmark 3: the time of a rerun after changing one threshold, against the cold run, on the demo.

Runs the demo configuration (config/config.yaml, or --configfile, e.g. the full study
config/studies/demo-full.yaml) cold in a fresh working directory (the bundled data linked in), changes one
variant's threshold (freq_min10pct: min_fraction 0.10 -> 0.11), and runs again: only that variant's jobs,
the final table and the plots should rerun. Goal: rerun / cold <= 0.15. --no-eval drops the lm-eval
benchmarks from both runs.
"""

from __future__ import annotations

import argparse
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


def run(workdir: Path, configfile: Path, cores: int) -> tuple[float, int]:
    """(wall seconds, jobs run)."""
    start = time.perf_counter()
    result = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                             "--configfile", str(configfile), "--cores", str(cores)],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{result.stderr[-3000:]}")
    done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", result.stderr)
    return seconds, int(done[-1][1]) if done else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configfile", type=Path, default=REPO / "config/config.yaml",
                        help="the experiment to run (default: the demo's); it needs a variant freq_min10pct")
    args = parser.parse_args()
    config = yaml.safe_load(args.configfile.read_text())
    if "freq_min10pct" not in config["variants"]:
        raise SystemExit(f"{args.configfile}: no variant freq_min10pct, the threshold this benchmark changes")
    if args.no_eval:
        config["evaluation"]["tasks"] = []
    with tempfile.TemporaryDirectory(prefix="bench_rerun_", dir=REPO / "results") as work:
        workdir = Path(work)
        (workdir / "data").symlink_to(REPO / "data")
        configfile = workdir / "config.yaml"
        configfile.write_text(yaml.safe_dump(config, sort_keys=False))
        cold, cold_jobs = run(workdir, configfile, args.cores)
        config["variants"]["freq_min10pct"]["min_fraction"] = 0.11
        configfile.write_text(yaml.safe_dump(config, sort_keys=False))
        rerun, rerun_jobs = run(workdir, configfile, args.cores)
    print(f"rerun after one threshold: {args.configfile.name}{' without lm-eval' if args.no_eval else ''}, "
          f"{args.cores} cores")
    report("rerun_ratio", [
        {"run": "cold", "seconds": cold, "jobs": cold_jobs},
        {"run": "after freq_min10pct.min_fraction 0.10 -> 0.11", "seconds": rerun, "jobs": rerun_jobs,
         "ratio_to_cold": rerun / cold},
    ])
    print(f"RATIO rerun / cold = {rerun / cold:.3f} (goal <= 0.15)")


if __name__ == "__main__":
    main()
