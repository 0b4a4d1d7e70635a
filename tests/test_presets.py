"""config/presets/: ready configs for real models. Each validates against the schema, and plans with
`snakemake -n` from the model's config.json alone (tests/data/model_configs, put in an offline hub cache)."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, planned_jobs, put_in_hub_cache, snakemake, write_config
from moe_compress.config import load_config, read_config_file

PRESETS = sorted((REPO / "config/presets").glob("*.yaml"))
MODEL_CONFIGS = REPO / "tests/data/model_configs"


def test_the_presets_cover_the_seed_recipe_and_the_published_sizes():
    assert {path.stem for path in PRESETS} >= {"qwen3-30b-a3b", "mixtral-8x7b", "qwen1.5-moe-a2.7b"}
    seed = load_config(REPO / "config/presets/qwen3-30b-a3b.yaml")
    assert seed["calibration"]["num_samples"] == 8 and seed["calibration"]["seq_len"] == 2048
    assert seed["evaluation"]["tasks"] == ["mmlu", "hellaswag", "winogrande", "click", "kmmlu"]
    assert seed["evaluation"]["num_fewshot"] == 0
    variants = seed["variants"]
    assert [variants[f"topk_prune-top_k{k}"]["steps"][0]["top_k"] for k in (8, 6, 4, 2)] == [8, 6, 4, 2]
    assert [variants[f"active-k{k}"]["steps"][0]["k"] for k in (8, 6, 4, 2)] == [8, 6, 4, 2]
    merges = {(step["merges_per_layer"], step["max_cluster_size"]) for name, variant in variants.items()
              if name.startswith("prune_svd_merge-") for step in variant["steps"][1:]}
    assert merges == {(4, 2), (4, 6), (12, 2), (12, 6)}
    assert [step["method"] for step in variants["top6_active4_rescale"]["steps"]] == [
        "frequency_prune", "active_experts", "output_rescale"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=[path.stem for path in PRESETS])
def test_each_preset_plans_from_the_model_config_alone(tmp_path, preset):
    repo_id = read_config_file(preset)["model"]["path"]
    model_config = MODEL_CONFIGS / repo_id.replace("/", "--") / "config.json"
    hf_home = tmp_path / "hf_home"
    put_in_hub_cache(hf_home, repo_id, {"config.json": model_config})
    config = read_config_file(preset)
    # a preset runs from the repository root, where its relative paths are; here from tmp_path
    wikitext = str(REPO / "data/wikitext2/wikitext-2-raw-v1_test.joined.txt.gz")
    config = {**config, "hf_home": str(hf_home), "perplexity": {**config["perplexity"], "wikitext2_path": wikitext}}
    result = snakemake(tmp_path, write_config(tmp_path / "preset.yaml", config), "-n")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    variants = load_config(tmp_path / "preset.yaml")["variants"]
    compressed = {name for rule, name in jobs if rule in ("compress", "assemble_checkpoint")}
    assert compressed == set(variants)  # every variant, each planned once
    layers = json.loads(model_config.read_text())["num_hidden_layers"]
    per_layer = [name for rule, name in jobs if rule == "compress_layer"]
    assert all(per_layer.count(name) == layers for name in set(per_layer))  # every layer is an MoE layer
