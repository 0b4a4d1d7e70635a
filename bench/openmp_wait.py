"""Benchmark 6: how torch's OpenMP threads wait, on an idle machine and on a busy one.

Times the demo model's training steps (the costliest job of `make demo`, many small parallel regions per step)
in a fresh process per setting: libgomp's default (spin for milliseconds), OMP_WAIT_POLICY=PASSIVE (sleep at
once), OMP_WAIT_POLICY=ACTIVE (spin), and the workflow's short spin (moe_compress.workflow.OPENMP_SPIN_COUNT),
first alone, then beside --busy processes that spin on the CPU (another user's work). The settings take turns,
--repeats rounds (a busy machine's scheduling drifts: one setting measured after another would see a different
machine); prints the median ms per step and each setting's ratio to the workflow's short spin. Goal: the short spin within 1.10 of the fastest setting on
the idle machine, and the fastest on the busy one.

    .venv/bin/python bench/openmp_wait.py [--steps 30] [--busy 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from moe_compress.workflow import OPENMP_SPIN_COUNT

sys.path.insert(0, str(Path(__file__).parent))
from _common import REPO, report  # noqa: E402

CORPUS = REPO / "data/c4/c4_en_train.00000-of-01024_first1000.jsonl.gz"
SETTINGS = {
    "libgomp default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    f"GOMP_SPINCOUNT={OPENMP_SPIN_COUNT} (the workflow's)": {"GOMP_SPINCOUNT": OPENMP_SPIN_COUNT},
}
WORKFLOWS = f"GOMP_SPINCOUNT={OPENMP_SPIN_COUNT} (the workflow's)"
# one process: the demo's data and model, 3 warm-up steps, then the timed steps; prints ms per step
TRAIN_STEPS = """
import dataclasses, sys, time
import torch
from moe_compress import demo
torch.set_num_threads(2)
settings = demo.DemoSettings()
data = demo.prepare_data(sys.argv[1], settings)
model = demo.init_model(demo.model_config(settings, data.tokenizer), settings.seed)
demo.train(model, data.train_ids, dataclasses.replace(settings, steps=3))
start = time.perf_counter()
demo.train(model, data.train_ids, dataclasses.replace(settings, steps=int(sys.argv[2])))
print((time.perf_counter() - start) / int(sys.argv[2]) * 1000)
"""
SPIN = "while True: pass"


def ms_per_step(environment: dict, steps: int) -> float:
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", TRAIN_STEPS, str(CORPUS), str(steps)], env={**env, **environment},
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--busy", type=int, default=2, help="processes spinning beside the busy measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds in which every setting runs once")
    args = parser.parse_args()
    rows = []
    all_rounds = {}
    for machine in ("idle", f"{args.busy} busy processes beside"):
        busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy if machine != "idle" else 0)]
        try:
            rounds = [{name: ms_per_step(environment, args.steps) for name, environment in SETTINGS.items()}
                      for _ in range(args.repeats)]
            all_rounds[machine] = rounds
            times = {name: statistics.median(measured[name] for measured in rounds) for name in SETTINGS}
        finally:
            for process in busy:
                process.kill()
                process.wait()
        for name, milliseconds in times.items():
            rows.append({"machine": machine, "setting": name, "ms_per_step": round(milliseconds, 1),
                         "ms_per_step_rounds": " ".join(f"{measured[name]:.0f}" for measured in all_rounds[machine]),
                         "ratio_to_workflows": round(milliseconds / times[WORKFLOWS], 2)})
    print(f"demo training steps, 2 threads, {os.cpu_count()} cores")
    report("openmp_wait", rows)


if __name__ == "__main__":
    main()
