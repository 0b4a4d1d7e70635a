"""Compressed checkpoints served by vLLM (the CPU build, in the serving environment .venv-serve: make
setup-serve), stock and non-uniform, on several architectures: each loads, and its greedy continuations of the
fixed prompts equal the pipeline's transformers (log-probabilities within agreement.LOGPROB_TOLERANCE), or it is
refused with the reason named. Also: lm-eval through vLLM against lm-eval through transformers, and the
workflow's serving rule.

Which outcome each checkpoint must have is read from its own layout (stock, per-layer fields, unservable
layouts), never from what vLLM did. make test-serving runs everything; CI runs the architectures not marked
serving_full."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import (
    REPO,
    TINY,
    context_with_inputs,
    make_tokenizer,
    planned_jobs,
    serving_model_of,
    snakemake,
    validated_step,
    write_config,
)
from moe_compress.checkpoint_files import read_compression_record
from moe_compress.methods import apply_steps
from moe_compress.modelio import save_checkpoint
from moe_compress.serving.agreement import LOGPROB_TOLERANCE
from moe_compress.serving.job import run_engine_jobs, transformers_reference_of
from moe_compress.serving.vllm_plugin import unserved_layouts

SERVING_PYTHON = REPO / ".venv-serve/bin/python"
pytestmark = [pytest.mark.serving, pytest.mark.slow,
              pytest.mark.skipif(not SERVING_PYTHON.exists(),
                                 reason="no serving environment (.venv-serve): make test-serving builds it")]

# the families the pipeline writes non-uniform; CI serves the first three, make test-serving all
ARCHITECTURES = ["qwen3_moe", "olmoe", "deepseek_v3",
                 pytest.param("qwen2_moe", marks=pytest.mark.serving_full),
                 pytest.param("mixtral", marks=pytest.mark.serving_full)]
# the stock methods of the issue (uniform results), then per-layer results, then what vLLM cannot run
STOCK = {
    "base": [],
    "uniform_prune": [validated_step("random_prune", keep=6)],
    "active_experts": [validated_step("active_experts", k=1)],
    "drop_layers": [validated_step("drop_layers", count=1)],
    "dtype_bf16": [validated_step("dtype", dtype="bfloat16")],
    "prune_heads": [validated_step("prune_heads", keep=1)],
    "reduce_hidden": [validated_step("reduce_hidden", keep=32)],  # vLLM's CPU MoE kernels: hidden % 32 == 0
    "uniform_width": [validated_step("prune_expert_width", fraction=0.5)],
}
NON_UNIFORM = {
    "global_prune": [validated_step("random_prune", target={"experts_fraction": 0.6}, allocation="global", seed=3)],
    "layer_widths": "cut_widths",  # per-layer widths, cut as prune_expert_width's global allocation does
    "global_prune_top_k": [validated_step("random_prune", target={"experts_fraction": 0.6}, allocation="global", seed=3),
                           validated_step("active_experts", target_mean=1.5)],
}
LOW_RANK = {"low_rank": [validated_step("svd_experts", rank=4)]}
# steps an architecture refuses at config time (OLMoE's whole-key norm, tests/test_widths.py)
REFUSED = {"olmoe": {"prune_heads", "reduce_hidden"}}
# DeepSeek's MLA has as many key-value heads as query heads: a head goes with its own
STEP_OVERRIDES = {"deepseek_v3": {"prune_heads": [validated_step("prune_heads", keep=1, gqa="whole_groups")]}}
# stock checkpoints vLLM's model code cannot run, and the message it fails with: its Qwen2-MoE attention takes the
# head size as hidden_size / num_attention_heads and ignores the config's head_dim, which prune_heads and
# reduce_hidden leave different (transformers reads head_dim)
VLLM_LIMITS = {("qwen2_moe", "prune_heads"): "exceeds dimension size",
               ("qwen2_moe", "reduce_hidden"): "Unsupported CPU attention configuration: head_dim=16"}


def build_variants(model_type: str, out_dir) -> dict[str, dict]:
    """Every variant's checkpoint of ``model_type`` and its record."""
    tokenizer = make_tokenizer()
    built = {}
    for name, steps in {**STOCK, **NON_UNIFORM, **LOW_RANK}.items():
        if name in REFUSED.get(model_type, ()):
            continue
        model = serving_model_of(model_type)
        context = context_with_inputs(model, tokens=128)
        context.calibration_ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
        steps = STEP_OVERRIDES.get(model_type, {}).get(name, steps)
        if steps == "cut_widths":
            cut_widths_per_layer(model)
        else:
            apply_steps(model, steps, context)
        record = save_checkpoint(model, tokenizer, out_dir / name, {"variant": name})
        built[name] = {"path": out_dir / name, "record": record}
    return built


def cut_widths_per_layer(model) -> None:
    """Every other MoE layer keeps its experts' first width - 8 neurons (a width allocation over the layers
    chooses blocks of 8): the per-layer widths a global ``prune_expert_width`` writes, made certain to differ."""
    from moe_compress.architectures import adapter_for
    from moe_compress.methods.expert_width import block_width, cut_block_width

    adapter = adapter_for(model.config)
    for position, block in enumerate(adapter.moe_blocks(model).values()):
        if position % 2 == 0:
            experts = adapter.block_num_experts(block)
            kept = torch.arange(block_width(adapter, block) - 8).expand(experts, -1).contiguous()
            cut_block_width(adapter, block, kept)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def served(request, tmp_path_factory):
    """Each variant of one architecture: its record, the transformers reference, and the serving job's result
    (vLLM, and the serving environment's transformers), all variants in one process of the serving env."""
    out_dir = tmp_path_factory.mktemp(f"serving_{request.param}")
    variants = build_variants(request.param, out_dir)
    specs = []
    for name, variant in variants.items():
        variant["reference"] = transformers_reference_of(variant["path"], "float32", "cpu", 8)
        specs.append({"checkpoint": str(variant["path"]), "references": variant["reference"]["references"],
                      "dtype": "float32", "device": "cpu", "max_model_len": 128, "seed": 0, "vocab_size": 300,
                      "kv_cache_mb": 64, "check_transformers": True})
    results = run_engine_jobs(str(SERVING_PYTHON), specs, out_dir / "engine.log")
    for variant, result in zip(variants.values(), results):
        variant["vllm"], variant["transformers"] = result["engines"]
    return request.param, variants, out_dir / "engine.log"


def expected_refusal(path) -> list[str]:
    return unserved_layouts(json.loads((path / "config.json").read_text()))


# the stock methods whose result an architecture cannot state in its stock config, and why
NOT_STOCK = {("deepseek_v3", "uniform_width"): "the width field also sizes the shared experts",
             ("deepseek_v3", "uniform_prune"): "the expert groups are kept in one layer, not in another"}


def test_stock_methods_write_stock_checkpoints_that_vllm_serves_as_transformers_runs_them(served):
    model_type, variants, log = served
    for name in STOCK:
        if name not in variants:
            continue
        variant = variants[name]
        assert (variant["record"]["loader"] == "stock") != ((model_type, name) in NOT_STOCK), (model_type, name)
        if expected_refusal(variant["path"]):
            assert not variant["vllm"]["loads"] and expected_refusal(variant["path"])[0] in variant["vllm"]["error"]
            continue
        if (model_type, name) in VLLM_LIMITS:
            assert VLLM_LIMITS[model_type, name] in variant["vllm"]["error"], (model_type, name, variant["vllm"])
            continue
        assert variant["vllm"]["loads"] and not variant["vllm"].get("error"), \
            f"{model_type}/{name}: {variant['vllm'].get('error')} (log {log})"
        assert variant["vllm"]["architecture"] == variant["record"]["architecture"] == \
            json.loads((variant["path"] / "config.json").read_text())["architectures"][0]
        agreement = variant["vllm"]["agreement"]
        assert agreement["agrees"], (model_type, name, agreement)
        assert agreement["max_logprob_difference"] <= LOGPROB_TOLERANCE


def test_non_uniform_checkpoints_are_served_through_the_plugin(served):
    model_type, variants, log = served
    for name in NON_UNIFORM:
        variant = variants[name]
        record = variant["record"]
        # the variant really is non-uniform: else this test would check nothing the stock one does not
        assert record["loader"] == "remote_code" and record["architecture"].startswith("MoeCompress"), (model_type, name)
        per_layer = (set(record["experts_per_layer"].values()), set(record["expert_width_per_layer"].values()),
                     {settings["top_k"] for settings in record["router_settings_per_layer"].values()})
        assert any(len(values) > 1 for values in per_layer), (model_type, name, per_layer)
        refusal = expected_refusal(variant["path"])
        if refusal:
            assert not variant["vllm"]["loads"] and refusal[0] in variant["vllm"]["error"], (model_type, name)
            continue
        assert variant["vllm"]["loads"], f"{model_type}/{name}: {variant['vllm'].get('error')} (log {log})"
        agreement = variant["vllm"]["agreement"]
        assert agreement["agrees"], (model_type, name, agreement)


def test_vllm_allocates_only_the_kept_experts(served):
    """The experts and widths vLLM built in each MoE layer (read off the running engine's fused tensors) are the
    checkpoint's own: no layer padded to the largest count or to the source model's. (vLLM's CPU MoE kernels
    pad an expert's width with zero rows up to a multiple of 32 after loading; that is the kernel's layout.)"""
    model_type, variants, _ = served
    for name, variant in variants.items():
        if not variant["vllm"]["loads"] or variant["vllm"].get("error"):
            continue
        record = variant["record"]
        built = variant["vllm"]["experts_built"]
        assert sorted(built) == sorted(record["experts_per_layer"]), (model_type, name)
        for layer, (experts, width) in built.items():
            kept_width = record["expert_width_per_layer"][layer]
            assert experts == record["experts_per_layer"][layer], (model_type, name, layer)
            assert width in (kept_width, -(-kept_width // 32) * 32), (model_type, name, layer, width, kept_width)
    counts = variants["global_prune"]["record"]["experts_per_layer"]
    assert len(set(counts.values())) > 1 and max(counts.values()) < 8


def test_low_rank_experts_are_refused_naming_the_layer(served):
    model_type, variants, _ = served
    variant = variants["low_rank"]
    assert not variant["vllm"]["loads"]
    assert "low-rank experts" in variant["vllm"]["error"] and "layer " in variant["vllm"]["error"]


def test_the_serving_environments_transformers_reads_stock_checkpoints(served):
    """Users on the transformers release vLLM pins read what our transformers wrote (stock layouts)."""
    model_type, variants, _ = served
    for name, variant in variants.items():
        if variant["record"]["loader"] == "stock":
            check = variant["transformers"]
            assert check["loads"], (model_type, name, check.get("error"))
            assert check["agreement"]["agrees"], (model_type, name, check["agreement"])


def test_lm_eval_through_vllm_equals_lm_eval_through_transformers(tmp_path):
    """The same bundled tasks, the same checkpoint: accuracies within their standard error (the engines'
    log-likelihoods differ by rounding only, so the answers are the same ones)."""
    from moe_compress.evaluate.lm_eval import run_benchmark, tidy_results, primary_score, primary_stderr

    model = serving_model_of("qwen3_moe")
    path = tmp_path / "model"
    save_checkpoint(model, make_tokenizer(), path, {})
    settings = {"source": "bundled", "data_dir": str(REPO / "data/eval"), "num_fewshot": 0, "limit": 40,
                "batch_size": 8, "seed": 0}
    tasks = ["winogrande", "hellaswag"]
    reference = transformers_reference_of(path, "float32", "cpu", 4)
    spec = {"checkpoint": str(path), "references": reference["references"], "dtype": "float32", "device": "cpu",
            "max_model_len": 256, "seed": 0, "vocab_size": 300, "kv_cache_mb": 128, "check_transformers": False,
            "tasks": tasks,
            "lm_eval": settings, "lm_eval_dir": str(tmp_path / "vllm_lm_eval"), "work_dir": str(tmp_path / "work")}
    result = run_engine_jobs(str(SERVING_PYTHON), [spec], tmp_path / "engine.log")[0]
    assert result["engines"][0]["loads"], result["engines"][0].get("error")
    for task in tasks:
        hf = tidy_results(run_benchmark(path, task, work_dir=tmp_path / f"hf_{task}", backend="hf", **settings), 0)
        vllm = json.loads((tmp_path / "vllm_lm_eval" / f"{task}.json").read_text())
        vllm = tidy_results(vllm, 0)
        difference = abs(primary_score(hf, task) - primary_score(vllm, task))
        assert difference <= primary_stderr(hf, task), (task, primary_score(hf, task), primary_score(vllm, task))


def test_the_serving_rule_reports_which_engines_serve_each_variant(tmp_path):
    """The tiny DAG with serving.vllm: every variant gets results/serving/<variant>.json, the final table a
    serves_in column and vLLM's speed; what vLLM does not serve is named in the table's notes."""
    config = json.loads(json.dumps(TINY))
    config["demo_model"].update(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    config["variants"] = {name: TINY["variants"][name] for name in ("base", "keep_some", "uniform4", "pruned_low_rank")}
    config["evaluation"]["variants"] = ["base", "uniform4"]
    config["serving"] = {"vllm": True, "python": str(SERVING_PYTHON), "max_new_tokens": 6, "max_model_len": 64,
                         "kv_cache_mb": 64,
                         "speed": {"concurrent": 2, "prompt_tokens": 8, "decode_tokens": 4, "repeats": 1, "warmup": 0}}
    import pandas as pd

    run = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "results/final_table.csv")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = tmp_path / "results"

    table = pd.read_csv(results / "final_table.csv").set_index("variant")
    for variant in config["variants"]:
        report = json.loads((results / "serving" / f"{variant}.json").read_text())
        record = read_compression_record(results / "checkpoints" / variant)
        assert report["loader"] == record["loader"]
        assert table.loc[variant, "serves_in"] == " ".join(report["serves_in"])
    assert "vllm" in table.loc["base", "serves_in"].split() and "vllm" in table.loc["keep_some", "serves_in"].split()
    assert "vllm" not in table.loc["pruned_low_rank", "serves_in"].split()
    assert math.isfinite(table.loc["base", "vllm_decode_tok_s"]) and table.loc["base", "vllm_decode_tok_s"] > 0
    assert "`pruned_low_rank` is not served by vllm" in (results / "final_table.md").read_text()
    # a serving setting reruns the serving jobs and the table, nothing upstream
    config["serving"]["speed"]["concurrent"] = 3
    dry_run = snakemake(tmp_path, write_config(tmp_path / "config.yaml", config), "results/final_table.csv", "-n")
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    planned = planned_jobs(dry_run.stdout)
    assert sorted(planned) == sorted([("serving", variant) for variant in config["variants"]] + [("final_table", "")])
