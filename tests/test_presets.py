"""config/presets/: ready configs for real models. Each validates against the schema, and the README's line
for it plans as a dry run from the root of a clone, from the model's config.json alone (tests/data/model_configs,
put in an offline hub cache)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from helpers import REPO, offline_environment, planned_jobs, put_in_hub_cache, user_clone
from moe_compress.config import load_config, read_config_file

PRESETS = sorted((REPO / "config/presets").glob("*.yaml"))
MODEL_CONFIGS = REPO / "tests/data/model_configs"


def test_the_presets_cover_the_seed_recipe_and_the_published_sizes():
    assert {path.stem for path in PRESETS} >= {"qwen3-30b-a3b", "mixtral-8x7b", "qwen1.5-moe-a2.7b"}
    seed = load_config(REPO / "config/presets/qwen3-30b-a3b.yaml")
    # the seed recipe's C4 calibration (8 x 2048 tokens), beside as many Korean windows
    from moe_compress.config import source_windows

    assert source_windows(seed["calibration"]) == {"c4": 8, "korean": 8} and seed["calibration"]["seq_len"] == 2048
    assert seed["calibration"]["sources"][0]["hub"] == {"id": "allenai/c4", "config": "en", "split": "train",
                                                        "docs": 2000}
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
    # the seed recipe's pruning reads the C4 statistics; the same REAP target on C4 and on C4 + Korean
    assert all(variants[name]["weights"] == {"c4": 1.0} for name in variants
               if name.startswith(("topk_prune-", "prune_svd_merge-", "top6_")))
    assert variants["reap50_c4"]["steps"] == variants["reap50_c4_korean"]["steps"]
    assert variants["reap50_c4_korean"]["weights"] == {"c4": 0.5, "korean": 0.5}


def readme_preset_command(preset) -> str:
    """The README's line for ``preset`` (the line naming another preset, with this one's file, where the README
    shows one line for all)."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if "snakemake" in line and "--configfile config/presets/" in line and not line.lstrip().startswith("#")]
    assert lines, "the README shows no command running a preset"
    command = next((line for line in lines if f"config/presets/{preset.name}" in line), lines[0])
    command = command.split(" #")[0].strip()
    return re.sub(r"config/presets/[\w.-]+\.yaml", f"config/presets/{preset.name}", command)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=[path.stem for path in PRESETS])
def test_each_preset_plans_from_the_model_config_alone(tmp_path, preset):
    """The README's line, run from the root of a clone (the demo's config/config.yaml present) as a dry run,
    with the model's config.json alone in an offline hub cache: every variant of the preset, and only those."""
    repo_id = read_config_file(preset)["model"]["path"]
    model_config = MODEL_CONFIGS / repo_id.replace("/", "--") / "config.json"
    hf_home = tmp_path / "hf_home"
    put_in_hub_cache(hf_home, repo_id, {"config.json": model_config})
    clone = user_clone(tmp_path / "moe-compress")
    result = subprocess.run([*shlex.split(readme_preset_command(preset)), "-n"], cwd=clone, capture_output=True,
                            text=True, timeout=600, env=offline_environment(HF_HOME=str(hf_home)), check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"moe-compress: config from config/presets/{preset.name}; config/config.yaml (the demo) is not read" in output
    jobs = planned_jobs(output)
    variants = load_config(preset)["variants"]
    compressed = [name for rule, name in jobs if rule in ("compress", "assemble_checkpoint")]
    assert sorted(compressed) == sorted(variants)  # every variant of the preset, each planned once, no other
    layers = json.loads(model_config.read_text())["num_hidden_layers"]
    per_layer = [name for rule, name in jobs if rule == "compress_layer"]
    assert all(per_layer.count(name) == layers for name in set(per_layer))  # every layer is an MoE layer
