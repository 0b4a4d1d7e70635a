"""The tiny DAG through a real one-node Slurm cluster (slurmctld + slurmd + munged started by
tests/slurm/cluster.sh): every job submitted with sbatch and run by slurmd, through profiles/slurm;
the final table must equal a local run's, downloads run on the submit host and compute jobs offline,
and a failing job ends the run promptly. Run by `make test-slurm` (and by CI, where it must not skip).
With MOE_COMPRESS_SLURM_ACCOUNTING=1 the cluster also runs slurmdbd on MariaDB, and the profile's
default job-status path (sacct) is used instead of squeue."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import REPO, TINY, TINY_HUB_C4, make_tokenizer, put_c4_in_hub_cache, tiny_qwen3_moe

pytestmark = pytest.mark.slurm

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CLUSTER = REPO / "tests/slurm/cluster.sh"
# timings differ between any two runs; everything else in the table must not
TIMING_COLUMNS = ["prefill_tok_s", "t_token_ms", "t_token_ms_min", "t_token_ms_max", "peak_memory_mb", "speed_norm",
                  "speed_norm_low", "speed_norm_high", "speed_noisy", "score"]
ACCOUNTING = os.environ.get("MOE_COMPRESS_SLURM_ACCOUNTING") == "1"


def _skip_or_fail(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the SLURM test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        _skip_or_fail("the one-node Slurm cluster needs root (it starts munged, slurmctld and slurmd)")
    state = Path(tempfile.mkdtemp(prefix="moe_compress_slurm_"))
    start = [str(CLUSTER), "start", str(state)] + (["--accounting"] if ACCOUNTING else [])
    started = subprocess.run(start, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, timeout=120)
        pytest.fail(f"could not start the Slurm cluster:\n{started.stdout}\n{started.stderr}")
    yield state
    stopped = subprocess.run([str(CLUSTER), "stop", str(state)], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not state.exists()


def tiny_config(workdir: Path, **changes) -> Path:
    """The tiny demo DAG without lm-eval tasks, its C4 taken from the hub (a cache under workdir/hf_home
    holding the shard, so the local download rule finds it without a network)."""
    config = copy.deepcopy(TINY)
    config["evaluation"] = {"tasks": []}
    # one compressed variant: every rule runs through the cluster; what a variant computes is not the cluster's
    config["variants"] = {"base": {"steps": []}, "uniform4": {"method": "frequency_prune", "uniform": True, "keep": 4}}
    config["hf_home"] = str(workdir / "hf_home")
    put_c4_in_hub_cache(workdir / "hf_home")
    # one corpus (the single-corpus keys), fetched by the local rule on the submit host
    config["calibration"] = dict(TINY_HUB_C4)
    config.update(changes)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 900, offline: bool = True):
    command = ["timeout", "-s", "KILL", str(timeout), str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(configfile or tiny_config(workdir)), *args,
               "results/final_table.csv"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"]:
        env.pop(name, None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout + 60)


def slurm_profile_args() -> list[str]:
    """The real profile, with the test cluster's partition and no GPU requests (this node has none).
    Without slurmdbd there is no sacct, so job states come from squeue."""
    args = ["--profile", str(REPO / "profiles/slurm"), "--jobs", "2",
            "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=30", "cpus_per_task=1",
            "--set-resources", *(f"{rule}:slurm_partition=debug" for rule in GPU_RULES),
            "--slurm-init-seconds-before-status-checks", "2"]
    return args if ACCOUNTING else [*args, "--slurm-status-command", "squeue"]


GPU_RULES = ["build_demo_model", "cache_router_activations", "expert_stats", "compress", "evaluate"]


def submitted_jobs(output: str) -> list[tuple[str, str]]:
    """(rule, Slurm job id) of every job that went through sbatch, read from snakemake's log: a job's
    block names its rule and snakemake jobid; the plugin's submission line maps that jobid to Slurm's."""
    rule_of, jobs, rule = {}, [], None
    for line in output.splitlines():
        if match := re.match(r"^\s*(?:local)?rule (\w+):", line):
            rule = match.group(1)
        elif (match := re.match(r"^\s*jobid: (\d+)$", line)) and rule:
            rule_of[match.group(1)] = rule
        elif match := re.search(r"Job (\d+) has been submitted with SLURM jobid (\d+)", line):
            jobs.append((rule_of.get(match.group(1), "?"), match.group(2)))
    return jobs


def test_slurm_run_gives_the_local_final_table(cluster, tmp_path):
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    local.mkdir(), slurm.mkdir()
    result = run(local, "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    # the submit host has the network here (no HF_HUB_OFFLINE): the workflow itself must switch it off
    # for the jobs that run on the compute node
    started = time.monotonic()
    result = run(slurm, *slurm_profile_args(), offline=False)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    jobs = submitted_jobs(output)
    assert len(jobs) >= 8, f"only {len(jobs)} jobs went through sbatch:\n{output[-3000:]}"
    print(f"Slurm run: {len(jobs)} jobs through sbatch in {elapsed:.0f} s "
          f"({'sacct via slurmdbd' if ACCOUNTING else 'squeue'} for job states)")
    for rule, job_id in jobs:
        print(f"  job {job_id}: {rule}")
    assert {rule for rule, _ in jobs} >= {"build_demo_model", "sample_calibration", "cache_router_activations",
                                          "expert_stats", "compress", "evaluate"}
    # downloads and small rules ran on the submit host, with the network; compute jobs without it
    assert "localrule fetch_calibration_corpus:" in output and "localrule final_table:" in output
    assert "hub online" in (slurm / "results/logs/fetch_calibration_corpus.log").read_text()
    for log in ["sample_calibration.log", "cache_router_activations.log", "compress/uniform4.log"]:
        assert "hub offline" in (slurm / "results/logs" / log).read_text(), log
    ours = pd.read_csv(slurm / "results/final_table.csv").drop(columns=TIMING_COLUMNS)
    theirs = pd.read_csv(local / "results/final_table.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(ours, theirs)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_failing_slurm_job_ends_the_run_promptly(cluster, tmp_path):
    """A job that fails on the node (asking for more calibration tokens than the corpus has) makes
    snakemake exit non-zero by itself, naming the rule and its log: it does not hang until the test's
    kill timer. (How soon depends on the machine: the independent jobs still run, keep-going.)"""
    model_dir = tmp_path / "model"
    tiny_qwen3_moe().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    # a hub corpus is counted only once fetched: the job finds it too small (a local one is refused at parse time)
    calibration = {**TINY_HUB_C4, "num_samples": 100_000}
    configfile = tiny_config(tmp_path, model={"path": str(model_dir)}, calibration=calibration)
    started = time.monotonic()
    result = run(tmp_path, *slurm_profile_args(), configfile=configfile, timeout=300)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode not in (0, -9, 137), output[-4000:]  # failed, and not by the test's kill timer
    jobs = submitted_jobs(output)
    assert any(rule == "sample_calibration" for rule, _ in jobs), output[-4000:]  # it failed on the node
    assert "Error in rule sample_calibration" in output
    assert "were requested; lower calibration.num_samples" in (tmp_path / "results/logs/sample_calibration.log").read_text()
    assert not (tmp_path / "results/calibration/calibration.parquet").exists()
    print(f"failing job: snakemake exited {result.returncode} after {elapsed:.0f} s")
    shutil.rmtree(tmp_path, ignore_errors=True)
