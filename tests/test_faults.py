"""Reliability: bad input is refused early with an error that names it, faults never leave an output a rerun
accepts, and runs are reproducible. Each test provokes one case."""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    TINY,
    make_tokenizer,
    snakemake,
    start_snakemake_paused_before,
    tiny_model_of,
    wait_until,
    write_config,
)
from moe_compress.atomic import atomic_directory
from moe_compress.cache import CacheCorruptError, CacheReader, build_cache, read_router_cache
from moe_compress.calibration import read_documents, tokenize_contiguous, tokenize_into_samples
from moe_compress.config import check_variants_against_model, read_config_file, validate_config
from moe_compress.errors import ConfigError, DataError, ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.modelio import load_model, model_shape
from moe_compress.streaming import LayerStream

REPO = Path(__file__).resolve().parents[1]


# ---- config: refused before any job runs ----------------------------------------------------------------

def test_a_key_written_twice_is_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {path: demo}\nvariants:\n  base: {steps: []}\n  small: {method: reap_prune, keep: 4}\n"
                    "  small: {method: reap_prune, keep: 2}\n")
    with pytest.raises(ConfigError, match=r"config.yaml: line 5: key 'small' is written twice .*first on line 4"):
        read_config_file(path)


def test_variant_names_that_share_an_output_folder_are_refused():
    config = {"model": {"path": "demo"}, "calibration": {},
              "variants": {"base": {"steps": []}, "Top2": {"method": "active_experts", "k": 2},
                                                      "top2": {"method": "active_experts", "k": 2}}}
    with pytest.raises(ConfigError, match=r"'variants.top2': same output folder as variant 'Top2'"):
        validate_config(config)


@pytest.mark.parametrize("step, message", [
    ({"method": "active_experts", "k": 12}, r"steps\[0\].k': 12 is more than the 8 experts per layer"),
    ({"method": "frequency_prune", "top_k": 4, "min_count": 1}, r"steps\[0\].top_k': 4 is more than the 2 experts each"),
    ({"method": "reap_prune", "keep": 9}, r"steps\[0\].keep': 9 is more than the 8 experts per layer"),
    ({"method": "random_prune", "keep": 9}, r"steps\[0\].keep': 9 is more than the 8 experts per layer"),
    ({"method": "hc_merge", "merges_per_layer": 7}, r"steps\[0\].merges_per_layer': 7 leaves 1 of the 8 experts, fewer than the 2"),
    ({"method": "dynamic_skip", "beta": 0.3, "target_active": 3}, r"steps\[0\].target_active': 3 is more than the 2 experts"),
    ({"method": "drop_layers", "count": 3}, r"steps\[0\].count': dropping 3 of the 3 decoder layers leaves none"),
    ({"method": "drop_layers", "layers": [1, 5]}, r"steps\[0\].layers': \[5\] are not decoder layers \(0..2\)"),
])
def test_steps_beyond_the_model_are_refused(step, message):
    variants = validate_config({"model": {"path": "demo"}, "calibration": {}, "variants": {"v": step}})["variants"]
    with pytest.raises(ConfigError, match=r"config key 'variants.v." + message):
        check_variants_against_model(variants, num_experts=8, top_k=2, num_layers=3)


@pytest.mark.slow  # a Snakemake run
def test_a_step_beyond_the_model_fails_the_workflow_before_any_job(tmp_path):
    config = copy.deepcopy(TINY)
    config["variants"]["top9"] = {"method": "active_experts", "k": 9}  # the tiny demo has 8 experts
    result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "-n", "results/final_table.csv")
    assert result.returncode != 0
    assert "config key 'variants.top9.steps[0].k': 9 is more than the 8 experts per layer" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


# ---- model: one line that says what to do -----------------------------------------------------------------

def write_checkpoint(path: Path, model_type: str = "qwen3_moe") -> Path:
    tiny_model_of(model_type).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def edit_config_json(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_unusable_model_paths_say_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="does not exist; set model.path to a local HF directory, a hub id, or 'demo'"):
        load_model(tmp_path / "absent")
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ModelError, match=r"not_a_model is not a Hugging Face checkpoint \(no config.json"):
        model_shape(tmp_path / "not_a_model")
    other = write_checkpoint(tmp_path / "other")
    edit_config_json(other, model_type="gpt2")
    with pytest.raises(ModelError, match=r"model_type 'gpt2' is not supported; supported types: .*qwen3_moe"):
        model_shape(other)


@pytest.mark.slow  # a Snakemake run
def test_a_workflow_on_an_unsupported_model_fails_before_any_job(tmp_path):
    other = write_checkpoint(tmp_path / "model")
    edit_config_json(other, model_type="gpt2")
    config = {**copy.deepcopy(TINY), "model": {"path": str(other)}}
    del config["demo_model"]
    result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "-n", "results/final_table.csv")
    assert result.returncode != 0
    assert "model_type 'gpt2' is not supported" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow  # a Snakemake run
def test_a_hub_model_that_cannot_be_reached_fails_before_any_job(tmp_path):
    config = {**copy.deepcopy(TINY), "model": {"path": "tiny-org/not-cached"}, "hf_home": str(tmp_path / "hf_home")}
    del config["demo_model"]
    result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "-n", "results/final_table.csv")
    assert result.returncode != 0
    assert ("model.path: the config of model 'tiny-org/not-cached' is not in the hub cache under "
            f"{tmp_path / 'hf_home'} and the hub is offline") in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


# ---- safety: safetensors only, no foreign code unless asked ----------------------------------------------

def test_pickled_weights_are_never_loaded(tmp_path):
    path = write_checkpoint(tmp_path / "model")
    for weights in path.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))  # the file names of a pickled checkpoint; never opened
    with pytest.raises(ModelError, match=r"only pickled weights \(model.bin\); moe-compress reads safetensors only"):
        load_model(path)


def test_a_checkpoints_own_code_is_never_run_unless_trusted(tmp_path):
    """A release of a type transformers implements may name its own code (DeepSeek-V3's auto_map): untrusted, it
    loads with transformers' class and its code is never imported. A type only its own code knows is refused."""
    path = write_checkpoint(tmp_path / "model")
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    edit_config_json(path, auto_map=auto_map)
    marker = tmp_path / "the checkpoint's code ran"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert type(load_model(path)) is type(tiny_model_of("qwen3_moe"))
    LayerStream(path).load_layer(0)
    assert model_shape(path)["num_experts"] == 8
    assert not marker.exists()
    edit_config_json(path, model_type="evil_moe")
    with pytest.raises(ModelError, match=r"asks to run the checkpoint's own code.*model.trust_remote_code: true"):
        load_model(path)
    with pytest.raises(ModelError, match="asks to run the checkpoint's own code"):
        LayerStream(path)
    assert not marker.exists()


# ---- data ---------------------------------------------------------------------------------------------------

def test_bad_corpora_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no non-empty documents in field 'text'"):
        read_documents(empty)
    latin1 = tmp_path / "latin1.jsonl.gz"
    with gzip.open(latin1, "wb") as handle:
        handle.write('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl.gz: not valid UTF-8"):
        read_documents(latin1)
    with pytest.raises(DataError, match=r"yields \d+ tokens but 4 samples x 64 tokens = 256 were requested"):
        tokenize_into_samples(make_tokenizer(), ["a short document"], num_samples=4, seq_len=64, seed=0)


def test_fewer_perplexity_windows_than_asked_are_said_in_the_log(caplog):
    text = "the quick brown fox jumps over the lazy dog " * 20
    windows = tokenize_contiguous(make_tokenizer(), text, seq_len=64, max_windows=1000)
    assert 1 <= len(windows) < 1000
    assert f"yields {len(windows)} windows of 64 tokens, fewer than perplexity.max_windows=1000" in caplog.text
    with pytest.raises(DataError, match="fewer than one window of 100000"):
        tokenize_contiguous(make_tokenizer(), text, seq_len=100000, max_windows=None)


# ---- numbers: NaN or inf stops the job, naming the layer ---------------------------------------------------

def test_a_step_that_produces_inf_names_the_layer_and_step():
    """A weight beyond float16's range becomes inf when the variant converts to float16."""
    model = tiny_model_of("qwen3_moe")
    with torch.no_grad():
        model.model.layers[2].mlp.experts.down_proj[3, 0, 0] = 1e6
    hidden = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    context = CompressionContext.for_model(model, moe_inputs={0: hidden, 2: hidden}, heldout_fraction=0.25)
    with pytest.raises(ModelError, match=r"non-finite values \(NaN or inf\) in experts.down_proj of MoE layer 2 "
                                         r"after step 0 \(dtype\)"):
        apply_steps(model, [{"method": "dtype", "dtype": "float16"}], context)


# ---- faults: nothing half-written is accepted --------------------------------------------------------------

def small_cache(tmp_path) -> Path:
    model_dir = write_checkpoint(tmp_path / "model")
    input_ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    build_cache(LayerStream(model_dir), input_ids, 2, tmp_path / "cache")
    return tmp_path / "cache"


def flip_one_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_cache_file_is_detected_and_invalidated(tmp_path):
    cache = small_cache(tmp_path)
    flip_one_byte(cache / "moe_inputs/layer_002.safetensors")
    with pytest.raises(CacheCorruptError, match=r"layer_002.safetensors is corrupt \(CRC-32 .* running the workflow "
                                                r"again rebuilds the cache"):
        CacheReader(cache).moe_input(2)
    assert not (cache / "manifest.json").exists()  # the cache job's output is gone: the next run rebuilds it
    with pytest.raises(DataError, match="manifest.json is missing"):
        CacheReader(cache).moe_input(0)

    cache = small_cache(tmp_path / "second")
    flip_one_byte(cache / "router_logits.parquet", offset_from_end=2000)
    with pytest.raises(CacheCorruptError, match="router_logits.parquet is corrupt"):
        read_router_cache(cache)


def test_a_killed_writer_leaves_nothing_and_the_next_write_cleans_up(tmp_path):
    out = tmp_path / "checkpoint"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from moe_compress.atomic import atomic_directory\n"
        "with atomic_directory(%r) as tmp:\n"
        "    (tmp / 'half.bin').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n"
    ) % (str(REPO / "src"), str(out))], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists() and len(list(tmp_path.glob(".checkpoint.*.tmp"))) == 1
    with atomic_directory(out) as tmp:
        (tmp / "done").write_text("ok")
    assert (out / "done").read_text() == "ok" and not list(tmp_path.glob(".checkpoint.*.tmp"))
    # a temporary of another output whose name extends this one (variant "checkpoint.2") is not stale
    (tmp_path / ".checkpoint.2.abc123.tmp").mkdir()
    with atomic_directory(out):
        pass
    assert (tmp_path / ".checkpoint.2.abc123.tmp").is_dir()


# ---- the workflow: kill -9 mid-run, a corrupted cache, two cold runs ----------------------------------------

STATS = "results/stats/expert_frequency.parquet"
FAULT_TARGETS = [STATS, "results/checkpoints/merged", "results/checkpoints/pruned_low_rank"]


def outputs_of(workdir: Path) -> dict[str, bytes]:
    """The bytes of the stats tables, and of each checkpoint's tensor files, config.json and compression.json."""
    files = [workdir / "results/stats/expert_frequency.parquet", workdir / "results/stats/expert_frequency.csv"]
    for variant in ("merged", "pruned_low_rank"):
        files += sorted((workdir / "results/checkpoints" / variant).glob("*.safetensors"))
        files += [workdir / "results/checkpoints" / variant / name for name in ("compression.json", "config.json")]
    return {str(path.relative_to(workdir)): path.read_bytes() for path in files}


@pytest.mark.slow  # Snakemake runs
def test_a_run_killed_mid_write_recovers_by_the_readme_to_what_a_cold_run_gives(tiny_dag, tmp_path):
    """kill -9 of Snakemake alone (a closed terminal, an OOM kill) while the cache job is writing its layers:
    the job stops by itself and leaves nothing a rerun would accept; the README's sequence (--unlock, then a rerun
    with --rerun-incomplete) finishes the run, to the bytes of a cold run (the session's tiny DAG); a cache file
    corrupted on disk is then found by the job that reads it, never used, and rebuilt."""
    reference = outputs_of(tiny_dag)
    record = json.loads(reference["results/checkpoints/merged/compression.json"])
    assert record["seeds"] == {"calibration": 0, "demo_model": 0}
    assert {"python", "torch", "transformers", "safetensors", "numpy", "moe-compress"} <= set(record["versions"])

    # a second cold run; its cache job stops as it is about to write the last of its two layers
    configfile = write_config(tmp_path / "config.yaml", TINY)
    run, paused = start_snakemake_paused_before(tmp_path, configfile,
                                                "*/results/.cache.*.tmp/moe_inputs/layer_001.safetensors",
                                                *FAULT_TARGETS)
    jobs = str(tmp_path / ".snakemake/scripts")
    try:
        wait_until(paused.exists, "the cache job reached its last layer", run)
        run.send_signal(signal.SIGKILL)  # Snakemake alone, not its process group
        run.wait()
        # the job stops by itself (its watchdog: test_a_job_stops_when_its_snakemake_is_killed)
        wait_until(lambda: not processes_running(jobs), "the jobs of the killed Snakemake stopped")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # whatever a failure above left running
    assert "has exited: stopping this job" in (tmp_path / "results/logs/cache_router_activations.log").read_text()
    assert list((tmp_path / "results").glob(".cache.*.tmp/moe_inputs/layer_000.safetensors"))  # stopped mid-write
    assert not (tmp_path / "results/cache/manifest.json").exists()  # nothing a rerun would accept
    assert snakemake(tmp_path, configfile, "--unlock").returncode == 0  # the lock a killed Snakemake leaves
    result = snakemake(tmp_path, configfile, "--rerun-incomplete", *FAULT_TARGETS)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not list((tmp_path / "results").glob(".*.tmp"))
    assert outputs_of(tmp_path) == reference  # bitwise: resuming changes nothing, and two cold runs agree

    # a cache file corrupted on disk is detected by the job that reads it, never used, and rebuilt
    flip_one_byte(tmp_path / "results/cache/moe_inputs/layer_001.safetensors")
    result = snakemake(tmp_path, configfile, "--forcerun", "expert_stats", STATS)
    assert result.returncode != 0
    log = (tmp_path / "results/logs/expert_stats.log").read_text()
    assert "layer_001.safetensors is corrupt" in log, log[-2000:]
    result = snakemake(tmp_path, configfile, STATS)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule cache_router_activations:" in result.stdout + result.stderr
    assert outputs_of(tmp_path) == reference


def processes_running(marker: str) -> list[int]:
    """The pids whose command line contains ``marker`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_job_stops_when_its_snakemake_is_killed(tmp_path):
    job_log = tmp_path / "job.log"
    job = tmp_path / "job.py"
    job.write_text(
        "import logging, sys, time\n"
        "from moe_compress.atomic import atomic_path\n"
        "from moe_compress.workflow import stop_with_parent\n"
        f"logging.basicConfig(filename={str(job_log)!r}, level=logging.INFO)\n"
        "stop_with_parent(logging.getLogger('job'), interval_s=0.1)\n"
        f"with atomic_path({str(tmp_path / 'out.csv')!r}) as tmp:\n"
        "    print('writing', flush=True); time.sleep(3600)\n")
    # a stand-in for Snakemake: starts the job, reports its pid, waits on it
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        f"job = subprocess.Popen([sys.executable, {str(job)!r}], stdout=subprocess.PIPE, text=True)\n"
        "print(job.pid, job.stdout.readline().strip(), flush=True); job.wait()\n")], stdout=subprocess.PIPE, text=True)
    pid, state = parent.stdout.readline().split()
    assert state == "writing"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # no bound on how soon (a busy machine may take long): the job would sleep for an hour, so its ending at all,
    # with the watchdog's line in its log, is the watchdog's doing; the deadline only keeps a failure from hanging
    deadline = time.monotonic() + 900
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the job ran on after its parent was killed"
    assert "has exited: stopping this job" in job_log.read_text()
    assert not (tmp_path / "out.csv").exists()
