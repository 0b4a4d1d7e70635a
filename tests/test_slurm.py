"""The tiny DAG through a real one-node Slurm cluster (slurmctld + slurmd + munged started by
tests/slurm/cluster.sh): every job submitted with sbatch and run by slurmd, through profiles/slurm;
the final table must equal a local run's. Run by `make test-slurm` (and by CI, where it must not skip)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO
from test_workflow import TINY

pytestmark = pytest.mark.slurm

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CLUSTER = REPO / "tests/slurm/cluster.sh"
# timings differ between any two runs; everything else in the table must not
TIMING_COLUMNS = ["prefill_tok_s", "t_token_ms", "peak_memory_mb", "speed_norm", "score"]


def _skip_or_fail(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the SLURM test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        _skip_or_fail("the one-node Slurm cluster needs root (it starts munged, slurmctld and slurmd)")
    state = Path(tempfile.mkdtemp(prefix="moe_compress_slurm_"))
    started = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, timeout=120)
        pytest.fail(f"could not start the Slurm cluster:\n{started.stdout}\n{started.stderr}")
    yield state
    stopped = subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not state.exists()


def tiny_config(workdir: Path) -> Path:
    config = copy.deepcopy(TINY)
    config["evaluation"] = {"tasks": []}
    config["variants"] = {"base": {"steps": []}, "keep_some": {"method": "frequency_prune", "min_fraction": 0.15},
                          "uniform4": {"method": "frequency_prune", "uniform": True, "keep": 4}}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    command = ["timeout", "-s", "KILL", str(timeout), str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(tiny_config(workdir)), *args,
               "results/final_table.csv"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout + 60)


def test_slurm_run_gives_the_local_final_table(cluster, tmp_path):
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    local.mkdir(), slurm.mkdir()
    result = run(local, "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    # the real profile, with the test cluster's partition and no GPU requests (this node has none);
    # no slurmdbd here, so job states come from squeue
    result = run(slurm, "--profile", str(REPO / "profiles/slurm"), "--jobs", "2",
                 "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=30", "cpus_per_task=1",
                 "--set-resources", "compress:slurm_partition=debug", "--slurm-no-account",
                 "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    output = result.stdout + result.stderr
    submitted = output.count("has been submitted with SLURM jobid")
    assert submitted >= 8, f"only {submitted} jobs went through sbatch:\n{output[-3000:]}"
    assert "Rule: final_table" in output
    ours = pd.read_csv(slurm / "results/final_table.csv").drop(columns=TIMING_COLUMNS)
    theirs = pd.read_csv(local / "results/final_table.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(ours, theirs)
    shutil.rmtree(tmp_path, ignore_errors=True)
