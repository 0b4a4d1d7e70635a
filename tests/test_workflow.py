"""The whole DAG on a tiny configuration, and the incremental-rerun guarantee, through real snakemake runs. The
tiny DAG runs once per session (conftest.py's ``tiny_dag``); a test that runs Snakemake again works on its own copy
of that finished run."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import (
    REPO,
    TINY,
    TINY_HUB_C4,
    copy_of_run,
    make_tokenizer,
    planned_jobs,
    put_c4_in_hub_cache,
    put_model_in_hub_cache,
    requires_cuda,
    snakemake,
    tiny_model_of,
    write_config,
)

pytestmark = pytest.mark.slow


def test_end_to_end_final_table(tiny_dag):
    workdir = tiny_dag
    table = pd.read_csv(workdir / "results/final_table.csv")
    swept = ["reap_target-experts_fraction0.75-uniform", "reap_target-experts_fraction0.75-global"]
    assert table["variant"].tolist() == ["base", "keep_most", "keep_some", "uniform4", "merged", "pruned_low_rank",
                                         "reap4", "reap4_code", "skip_rescale", *swept, "mone4", "easy_ep4_protected",
                                         "width_protected"]
    per_domain = [f"{kind}_{dataset}" for kind in ("ppl", "retention")
                  for dataset in ("c4_heldout", "korean_heldout", "code_heldout", "wikitext2")]
    assert not table[["parameters", "experts_kept", "recon_error_mean", *per_domain]].isna().any().any()
    by_name = table.set_index("variant")
    assert by_name.loc["base", "experts_kept"] == 2 * 8
    assert by_name.loc["keep_some", "experts_kept"] <= by_name.loc["keep_most", "experts_kept"]
    assert by_name.loc["uniform4", "experts_kept"] == 2 * 4 and by_name.loc["uniform4", "loader"] == "stock"
    assert by_name.loc["base", "ppl_c4_heldout_ratio"] == 1.0
    assert by_name.loc["merged", "experts_kept"] == 2 * 6 and by_name.loc["merged", "loader"] == "stock"
    assert by_name.loc["pruned_low_rank", "loader"] == "remote_code"
    assert by_name.loc["pruned_low_rank", "parameters"] < by_name.loc["uniform4", "parameters"]
    assert (by_name.drop(index="base")["recon_error_mean"] > 0).all()
    assert by_name.loc["reap4", "experts_kept"] == 2 * 4
    assert 1.2 < by_name.loc["skip_rescale", "active_experts"] < 1.8 and by_name.loc["skip_rescale", "top_k"] == 2
    # the sweep: one line per allocation in the plots; the target met (12 of 16 experts) by either
    assert by_name.loc[swept, "sweep"].tolist() == ["reap_target-uniform", "reap_target-global"]
    assert by_name.loc["uniform4", "sweep"] == "uniform4"
    assert (by_name.loc[swept, "experts_kept"] == 12).all() and (by_name.loc[swept, "target"] == "experts_fraction=0.75").all()
    assert by_name.loc[swept, "allocation"].tolist() == ["uniform", "global"]
    assert by_name.loc[swept[0], "experts_per_layer"] == "6 6"
    stats = pd.read_csv(workdir / "results/stats/expert_frequency.csv")
    assert "reap_saliency" in stats.columns
    # per calibration source: counts that add up to the totals, and the experts specific to one source named
    by_source = pd.read_parquet(workdir / "results/stats/expert_frequency_by_source.parquet")
    assert list(dict.fromkeys(by_source["source"])) == ["c4", "korean", "code"]
    summed = by_source.groupby(["layer", "expert"])[["selected", "tokens"]].sum().reset_index()
    assert (stats[["selected", "tokens"]].to_numpy() == summed[["selected", "tokens"]].to_numpy()).all()
    assert by_source.groupby("source")["tokens"].first().to_dict() == {"c4": 8 * 32, "korean": 4 * 32, "code": 4 * 32}
    assert (workdir / "results/stats/domain_experts.csv").is_file()
    assert "Domain-specific experts" in (workdir / "results/final_table.md").read_text()
    weighted = json.loads((workdir / "results/checkpoints/reap4_code/compression.json").read_text())
    assert weighted["calibration_weights"] == {"code": 1.0} and by_name.loc["reap4_code", "calibration_weights"] == "code=1"
    assert by_name.loc["reap4_code", "experts_kept"] == 2 * 4
    assert by_name.loc["base", "retention_korean_heldout"] == 1.0
    # beyond REAP: the novices answer through remote code; the protected experts and neurons are recorded
    assert by_name.loc["mone4", "loader"] == "remote_code"
    assert by_name.loc["mone4", "experts_kept"] == 2 * 4 and by_name.loc["mone4", "novice_experts"] == 2 * 4
    mone = json.loads((workdir / "results/checkpoints/mone4/compression.json").read_text())["step_reports"][0]
    assert [len(layer["ids"]) for layer in mone["novices"].values()] == [4, 4]
    assert json.loads((workdir / "results/cache_residual/manifest.json").read_text())["residual"] is True
    assert "residual" not in json.loads((workdir / "results/cache/manifest.json").read_text())["layers"]["0"]
    easy_ep = json.loads((workdir / "results/checkpoints/easy_ep4_protected/compression.json").read_text())
    protected = easy_ep["step_reports"][0]["protected"]
    peaks = stats.set_index(["layer", "expert"])["peak_output"]
    assert [(entry["layer"], entry["expert"]) for entry in protected] == [peaks.idxmax()]
    assert peaks.idxmax()[1] in easy_ep["step_reports"][0]["kept_original_ids"][str(peaks.idxmax()[0])]
    width = json.loads((workdir / "results/checkpoints/width_protected/compression.json").read_text())
    assert len(width["step_reports"][0]["protected_neurons"]) == 1
    assert (workdir / "results/stats/neuron_peaks.safetensors").is_file()
    clusters = json.loads((workdir / "results/checkpoints/merged/compression.json").read_text())
    assert len(clusters["step_reports"][0]["clusters"]["0"]) == 6
    assert (workdir / "results/final_table.md").read_text().startswith("| variant |")
    for column in ("acc_winogrande", "acc_mean", "perf_norm", "t_token_ms", "speed_norm", "score"):
        assert not by_name.loc[["base", "uniform4"], column].isna().any(), column
    assert by_name.loc["base", "perf_norm"] == 1.0 and by_name.loc["base", "speed_norm"] == 0.0
    assert not by_name["t_token_ms"].isna().any()
    lm_eval_csv = pd.read_csv(workdir / "results/eval/uniform4/lm_eval/winogrande.csv")
    assert list(lm_eval_csv.columns) == ["task", "metric", "value", "stderr", "n", "num_fewshot"]
    for rule_log in ("build_demo_model", "cache_router_activations", "expert_stats", "final_table"):
        assert (workdir / f"results/logs/{rule_log}.log").stat().st_size > 0


@pytest.mark.gpu
@requires_cuda
def test_tiny_dag_on_cuda(tiny_dag, tmp_path):
    """The tiny DAG with model.device: cuda, plus the whole-model steps (layer dropping, bf16) and the
    per-layer jobs: every rule reaches the final table on the GPU, and the discrete outcomes (the
    experts each pruning variant keeps) are the CPU run's."""
    config = copy.deepcopy(TINY)
    config["model"]["device"] = "cuda"
    config["variants"] = {**config["variants"],
                          "dropped": {"method": "drop_layers", "count": 1},
                          "bf16_pruned": {"steps": [{"method": "frequency_prune", "uniform": True, "keep": 6},
                                                    {"method": "dtype", "dtype": "bfloat16"}]}}
    config["evaluation"]["variants"] = ["base", "uniform4", "bf16_pruned"]
    result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "results/final_table.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    per_layer = copy.deepcopy(config)
    per_layer["compress"] = {"per_layer_jobs": True}
    result = snakemake(tmp_path, write_config(tmp_path / "per_layer.yaml", per_layer), "--forcerun", "compress_layer",
                       "assemble_checkpoint", "results/final_table.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    table = pd.read_csv(tmp_path / "results/final_table.csv").set_index("variant")
    assert not table[["parameters", "ppl_c4_heldout", "ppl_wikitext2", "t_token_ms"]].isna().any().any()
    assert not table.loc[["base", "uniform4", "bf16_pruned"], "acc_winogrande"].isna().any()
    assert table.loc["dropped", "layers"] == 1 and table.loc["base", "layers"] == 2
    assert pd.read_csv(tmp_path / "results/eval/base/speed.csv")["device"].str.startswith("cuda").all()
    cpu_workdir = tiny_dag
    for variant in ("keep_most", "keep_some", "uniform4", "reap4", "merged"):
        ours, theirs = (json.loads((workdir / f"results/checkpoints/{variant}/compression.json").read_text())
                        for workdir in (tmp_path, cpu_workdir))
        assert ours["experts_per_layer"] == theirs["experts_per_layer"], variant
        assert [report.get("kept_original_ids", report.get("clusters")) for report in ours["step_reports"]] == \
            [report.get("kept_original_ids", report.get("clusters")) for report in theirs["step_reports"]], variant


def test_nothing_to_do_after_a_complete_run(tiny_dag, tmp_path):
    """A complete run has nothing left to do, and neither has its copy: the copy every other test here changes
    is, to Snakemake, the finished run itself."""
    workdir = copy_of_run(tiny_dag, tmp_path)
    result = snakemake(workdir, workdir / "config.yaml", "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_jobs(result.stdout + result.stderr) == []


def test_a_key_no_job_reads_replans_nothing(tiny_dag, tmp_path):
    """The MLflow experiment means nothing without an MLflow server: changing it must not rerun the DAG."""
    workdir = copy_of_run(tiny_dag, tmp_path)
    changed = copy.deepcopy(TINY)
    changed["tracking"] = {"experiment": "another"}
    result = snakemake(workdir, write_config(workdir / "config_unused.yaml", changed), "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_jobs(result.stdout + result.stderr) == []


def test_changing_one_threshold_replans_only_that_variant(tiny_dag, tmp_path):
    workdir = copy_of_run(tiny_dag, tmp_path)
    changed = copy.deepcopy(TINY)
    changed["variants"]["keep_some"]["min_fraction"] = 0.2
    configfile = write_config(workdir / "config_changed.yaml", changed)
    result = snakemake(workdir, configfile, "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert sorted(jobs) == sorted([("compress", "keep_some"), ("evaluate", "keep_some"), ("final_table", "")]), jobs
    # a variant evaluated with lm-eval too: the same two jobs, and nothing else
    changed = copy.deepcopy(TINY)
    changed["variants"]["uniform4"]["keep"] = 5
    result = snakemake(workdir, write_config(workdir / "config_changed2.yaml", changed), "-n", "results/final_table.csv")
    jobs = planned_jobs(result.stdout + result.stderr)
    assert sorted(jobs) == sorted([("compress", "uniform4"), ("evaluate", "uniform4"), ("final_table", "")]), jobs


def test_a_first_easy_ep_variant_plans_its_own_residual_pass_and_nothing_else(tiny_dag, tmp_path):
    """EASY-EP needs the residual stream, which the shared cache does not hold: the first variant asking for it
    adds the residual pass and its statistics, and reruns no other variant (nor the cache or the statistics)."""
    workdir = copy_of_run(tiny_dag, tmp_path)
    shutil.rmtree(workdir / "results/cache_residual")
    for name in ("easy_ep.parquet", "easy_ep_by_source.parquet"):
        (workdir / "results/stats" / name).unlink()
    changed = copy.deepcopy(TINY)
    del changed["variants"]["easy_ep4_protected"]
    changed["variants"]["easy_ep3"] = {"method": "easy_ep_prune", "keep": 3}
    result = snakemake(workdir, write_config(workdir / "config_easy_ep.yaml", changed), "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert sorted(jobs) == sorted([("cache_residual", ""), ("easy_ep_stats", ""), ("compress", "easy_ep3"),
                                   ("evaluate", "easy_ep3"), ("final_table", "")]), jobs


def test_a_changed_calibration_weight_replans_only_that_variant(tiny_dag, tmp_path):
    """Re-weighting the calibration sources reads the per-source statistics again: no new cache, no new
    statistics, and only the variant whose weights changed."""
    workdir = copy_of_run(tiny_dag, tmp_path)
    changed = copy.deepcopy(TINY)
    changed["variants"]["reap4_code"]["weights"] = {"code": 0.5, "korean": 0.5}
    result = snakemake(workdir, write_config(workdir / "config_weights.yaml", changed), "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert sorted(jobs) == sorted([("compress", "reap4_code"), ("evaluate", "reap4_code"), ("final_table", "")]), jobs
    # weights given to a variant that had none: that variant alone
    changed["variants"]["reap4"]["weights"] = {"c4": 1.0}
    result = snakemake(workdir, write_config(workdir / "config_weights2.yaml", changed), "-n", "results/final_table.csv")
    jobs = planned_jobs(result.stdout + result.stderr)
    assert sorted(jobs) == sorted([(rule, name) for name in ("reap4", "reap4_code") for rule in ("compress", "evaluate")]
                                  + [("final_table", "")]), jobs
    # another share draws other calibration windows (a new cache), but leaves every held-out text as it was
    shares = copy.deepcopy(TINY)
    shares["calibration"]["sources"][0]["share"], shares["calibration"]["sources"][2]["share"] = 0.625, 0.125
    result = snakemake(workdir, write_config(workdir / "config_shares.yaml", shares), "-n", "results/final_table.csv")
    rules = {rule for rule, _ in planned_jobs(result.stdout + result.stderr)}
    assert {"sample_calibration", "cache_router_activations", "expert_stats"} <= rules, rules
    assert "perplexity_windows" not in rules and "build_demo_model" not in rules, rules


def test_a_value_added_to_a_sweep_plans_only_its_variants(tiny_dag, tmp_path):
    workdir = copy_of_run(tiny_dag, tmp_path)
    changed = copy.deepcopy(TINY)
    changed["variants"]["reap_target"]["target"]["experts_fraction"] = [0.75, 0.5]
    result = snakemake(workdir, write_config(workdir / "config_sweep.yaml", changed), "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    new = ["reap_target-experts_fraction0.5-uniform", "reap_target-experts_fraction0.5-global"]
    assert sorted(planned_jobs(result.stdout + result.stderr)) == sorted(
        [(rule, name) for name in new for rule in ("compress", "evaluate")] + [("final_table", "")])


def test_a_changed_task_list_evaluates_only_the_new_task_with_one_load(tiny_dag, tmp_path):
    """Adding a benchmark reruns the evaluate job of each benchmarked variant only; that job loads the model
    once, runs the new task and reads every other result back from its memo; removing it loads nothing."""
    copy_of_run(tiny_dag, tmp_path)
    config = copy.deepcopy(TINY)
    config["evaluation"] = {**TINY["evaluation"], "tasks": ["winogrande", "mmlu"]}
    configfile = write_config(tmp_path / "config.yaml", config)
    result = snakemake(tmp_path, configfile, "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(planned_jobs(result.stdout + result.stderr)) == [("evaluate", "base"), ("evaluate", "uniform4"),
                                                                   ("final_table", "")]
    speed_before = (tmp_path / "results/eval/base/speed.csv").read_text()
    result = snakemake(tmp_path, configfile, "results/final_table.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for variant in ("base", "uniform4"):
        summary = json.loads((tmp_path / f"results/eval/{variant}/evaluation.json").read_text())
        assert summary["model_loads"] == 1 and summary["computed"] == ["lm_eval_mmlu"], summary
        assert sorted(summary["reused"]) == ["lm_eval_winogrande", "perplexity_c4_heldout", "perplexity_code_heldout",
                                             "perplexity_korean_heldout", "perplexity_wikitext2", "speed"], summary
    assert (tmp_path / "results/eval/base/speed.csv").read_text() == speed_before
    assert not pd.read_csv(tmp_path / "results/final_table.csv").set_index("variant").loc[
        ["base", "uniform4"], "acc_mmlu"].isna().any()

    result = snakemake(tmp_path, write_config(tmp_path / "fewer.yaml", TINY), "results/final_table.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads((tmp_path / "results/eval/uniform4/evaluation.json").read_text())
    assert summary["model_loads"] == 0 and summary["computed"] == [], summary
    assert sorted((tmp_path / "results/eval/uniform4/lm_eval").glob("*.csv")) == [
        tmp_path / "results/eval/uniform4/lm_eval/winogrande.csv"]


def checkpoint_tensors(checkpoint_dir: Path) -> dict:
    from moe_compress.streaming import CheckpointTensors

    tensors = CheckpointTensors(checkpoint_dir)
    return tensors.read(list(tensors.weight_map))


def test_per_layer_jobs_write_the_same_checkpoints(tiny_dag, tmp_path):
    """compress.per_layer_jobs: one job per (variant, MoE layer) + an assembly job give the checkpoints
    the per-variant jobs gave; a whole-model step keeps its variant in one job; a changed option
    replans that variant's layer jobs only. Two variants wire every input a layer job reads (statistics,
    cached inputs and their held-out part) and a remote-code assembly; that per-layer jobs save what one
    job saves for every step is tests/test_architecture_suite.py's, on every architecture."""
    workdir = tiny_dag
    for stage in ("models", "calibration", "cache", "stats"):  # the upstream outputs, mtimes kept
        shutil.copytree(workdir / "results" / stage, tmp_path / "results" / stage, symlinks=True)
    config = copy.deepcopy(TINY)
    config["compress"] = {"per_layer_jobs": True}
    config["evaluation"] = {**TINY["evaluation"], "variants": ["merged"]}
    config["score"] = {"reference": "merged"}  # no unmodified base among these variants
    layerwise = ["merged", "pruned_low_rank"]
    config["variants"] = {**{name: config["variants"][name] for name in layerwise},
                          "shallower": {"method": "drop_layers", "count": 1}}
    targets = [f"results/checkpoints/{name}" for name in config["variants"]]
    result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "-n", *targets)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert sorted(jobs) == sorted([("compress", "shallower")]
                                  + [("compress_layer", name) for name in layerwise for _ in range(2)]
                                  + [("assemble_checkpoint", name) for name in layerwise]), jobs

    result = snakemake(tmp_path, tmp_path / "config.yaml", *targets[:-1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for name in layerwise:
        ours, theirs = (checkpoint_tensors(root / "results/checkpoints" / name) for root in (tmp_path, workdir))
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name
        records = [json.loads((root / "results/checkpoints" / name / "compression.json").read_text())
                   for root in (tmp_path, workdir)]
        assert records[0] == records[1], name
    assert (tmp_path / "results/logs/compress_layer/merged/layer_1.log").stat().st_size > 0

    config["variants"]["pruned_low_rank"]["steps"][1]["rank"] = 4
    result = snakemake(tmp_path, write_config(tmp_path / "config_changed.yaml", config), "-n", *targets[:-1])
    jobs = planned_jobs(result.stdout + result.stderr)
    assert sorted(jobs) == [("assemble_checkpoint", "pruned_low_rank"), ("compress_layer", "pruned_low_rank"),
                            ("compress_layer", "pruned_low_rank")], jobs


def test_bad_config_fails_before_any_job(tmp_path):
    broken = copy.deepcopy(TINY)
    broken["variants"]["keep_some"]["min_fraction"] = -0.5
    configfile = write_config(tmp_path / "config.yaml", broken)
    result = snakemake(tmp_path, configfile, "results/final_table.csv")
    assert result.returncode != 0
    assert "variants.keep_some.steps[0].min_fraction" in result.stderr
    assert not (tmp_path / "results").exists()


def test_hub_lm_eval_data_is_prefetched_on_the_submit_host_first(tmp_path):
    config = copy.deepcopy(TINY)
    config["evaluation"] = {"tasks": ["click", "mmlu"], "source": "hub", "variants": ["base"]}
    result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "-n", "results/final_table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    jobs = planned_jobs(output)
    assert jobs.count(("prefetch_eval_data", "")) == 1
    assert ("evaluate", "base") in jobs
    bundled = copy.deepcopy(config)
    bundled["evaluation"]["source"] = "bundled"
    result = snakemake(tmp_path, write_config(tmp_path / "bundled.yaml", bundled), "-n", "results/final_table.csv")
    message = result.stdout + result.stderr  # a dry run reports the error on stdout
    assert result.returncode != 0 and "config key 'evaluation.tasks'" in message and "click" in message


# The rules are the same for every architecture; what differs is tested per stage for every type in the
# table (tests/test_architecture_suite.py). The whole DAG runs for one model of each scoring family:
# softmax then top-k with a dense layer in the middle (Qwen3-MoE, here also from the hub cache), sigmoid
# with groups + shared experts + a dense first layer (DeepSeek-V3), top-k then softmax with transposed
# experts and biases (gpt-oss), SparseMixer (Phi-3.5-MoE). One compressed variant beside the base: the rules are
# the same for every variant, and each variant's checkpoint round-trip is tests/test_architecture_suite.py's.
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss", "phimoe"])
def test_every_architecture_runs_the_dag(tmp_path, model_type):
    """model.path pointing at a checkpoint of each architecture: the whole DAG completes. Qwen3-MoE comes
    as a hub id, with C4 from the hub: both found in the hub cache (HF_HOME) by the local download rules."""
    model_dir = tmp_path / f"tiny_{model_type}"
    tiny_model_of(model_type).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    config = copy.deepcopy(TINY)
    config["model"]["path"] = str(model_dir)
    del config["demo_model"]
    from_hub = model_type == "qwen3_moe"
    if from_hub:
        hf_home = tmp_path / "hf_home"
        put_model_in_hub_cache(hf_home, "tiny-org/tiny-qwen3-moe", model_dir)
        put_c4_in_hub_cache(hf_home)
        config["model"]["path"] = "tiny-org/tiny-qwen3-moe"
        config["hf_home"] = str(hf_home)
        # one corpus, the single-corpus keys: C4 from the hub (the others calibrate on TINY's three-source mix)
        config["calibration"] = dict(TINY_HUB_C4)
    if model_type == "phimoe":
        # the code source from a dataset through the datasets library (a local dataset folder, as a hub id would
        # be read): fetched by fetch_calibration_source on the submit host
        dataset = tmp_path / "mbpp_dataset"
        dataset.mkdir()
        with gzip.open(REPO / "data/code/mbpp.jsonl.gz", "rt", encoding="utf-8") as handle:
            (dataset / "train.jsonl").write_text("".join(handle.readlines()[:300]))
        config["calibration"] = copy.deepcopy(config["calibration"])
        code = config["calibration"]["sources"][2]
        del code["path"]
        code["hub"] = {"id": str(dataset), "split": "train", "docs": 300}
    config["evaluation"] = {"tasks": []}  # lm-eval runs in the tiny demo DAG; here the architectures matter
    # per-layer jobs planned from the hub model's config.json, with a dense layer (1) copied by the assembly
    config["compress"] = {"per_layer_jobs": from_hub}
    config["variants"] = {"base": {"steps": []},
                          "uniform4": {"method": "frequency_prune", "uniform": True, "keep": 4}}
    configfile = write_config(tmp_path / "config.yaml", config)
    result = snakemake(tmp_path, configfile, "results/final_table.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    if from_hub:
        jobs = planned_jobs(result.stdout + result.stderr)
        assert ("fetch_model", "repo_id=tiny-org--tiny-qwen3-moe") in jobs and ("fetch_calibration_corpus", "") in jobs
        assert "localrule fetch_model:" in result.stdout + result.stderr
        assert (tmp_path / "results/models/hub/tiny-org--tiny-qwen3-moe/model.safetensors").resolve().is_relative_to(hf_home)
        assert sorted(job for job in jobs if job[0] == "compress_layer") == [
            ("compress_layer", name) for name in ("base", "base", "uniform4", "uniform4")]
    if model_type == "phimoe":
        assert ("fetch_calibration_source", "name=code") in planned_jobs(result.stdout + result.stderr)
        with gzip.open(tmp_path / "results/calibration/hub/code.jsonl.gz", "rt", encoding="utf-8") as handle:
            fetched = [json.loads(line) for line in handle]
        assert len(fetched) == 300 and list(fetched[0]) == ["text", "code"]
    table = pd.read_csv(tmp_path / "results/final_table.csv").set_index("variant")
    record = json.loads((tmp_path / "results/checkpoints/uniform4/compression.json").read_text())
    same_routing = len({json.dumps(s, sort_keys=True) for s in record["router_settings_per_layer"].values()}) == 1
    # stock whenever every layer routes alike (DeepSeek-V3 may lose its groups in some layers only)
    assert table.loc["uniform4", "loader"] == ("stock" if same_routing else "remote_code")
    assert table.loc["uniform4", "parameters"] < table.loc["base", "parameters"]
    assert not table[["ppl_c4_heldout", "ppl_wikitext2"]].isna().any().any()
    if not from_hub:  # TINY's three-source mix: a held-out perplexity per source
        assert not table[["ppl_korean_heldout", "ppl_code_heldout", "retention_code_heldout"]].isna().any().any()


@pytest.mark.slow  # a Snakemake run with lm-eval
def test_a_dense_decoder_runs_the_dag(tmp_path):
    """A dense Llama: no router cache or expert statistics are planned; the steps for any decoder compress
    it and the whole evaluation (perplexity, speed, lm-eval) runs on every variant."""
    model_dir = tmp_path / "tiny_llama"
    tiny_model_of("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    config = copy.deepcopy(TINY)
    config["model"]["path"] = str(model_dir)
    del config["demo_model"]
    config["evaluation"] = {**config["evaluation"], "variants": ["base", "heads2"]}
    config["variants"] = {"base": {"steps": []}, "dropped": {"method": "drop_layers", "count": 1},
                          "heads2": {"method": "prune_heads", "keep": 2},
                          "composed": {"steps": [{"method": "prune_heads", "keep": 2, "gqa": "whole_groups"},
                                                 {"method": "reduce_hidden", "keep": 24},
                                                 {"method": "dtype", "dtype": "bfloat16"}]}}
    configfile = write_config(tmp_path / "config.yaml", config)
    result = snakemake(tmp_path, configfile, "results/final_table.csv", "results/analysis/model.json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    jobs = {rule for rule, _ in planned_jobs(result.stdout + result.stderr)}
    assert not jobs & {"cache_router_activations", "expert_stats"}
    table = pd.read_csv(tmp_path / "results/final_table.csv").set_index("variant")
    assert table.loc["heads2", "acc_winogrande"] >= 0 and table.loc["heads2", "perf_norm"] > 0
    assert (table.loc[["dropped", "heads2", "composed"], "parameters"] < table.loc["base", "parameters"]).all()
    assert not table[["ppl_c4_heldout", "ppl_wikitext2", "t_token_ms"]].isna().any().any()
    analysis = {model["name"]: model for model in
                json.loads((tmp_path / "results/analysis/model.json").read_text())["models"]}
    assert analysis["composed"]["hidden_size"] == 24 and analysis["composed"]["attention_heads"] == [2]
    assert analysis["composed"]["key_value_heads"] == [1]

    # an MoE step on a dense decoder fails when the config is read, naming the step and the model type
    config["variants"]["pruned"] = {"method": "frequency_prune", "uniform": True, "keep": 4}
    result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "-n")
    assert result.returncode != 0
    assert "variants.pruned.steps[0].method': frequency_prune needs MoE layers; llama is a dense decoder" in (
        result.stdout + result.stderr)
