"""pruning_plan.json: the experts a pruned checkpoint keeps, as ids of the source model, applicable to the
original weights without this package."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import (
    ARCHITECTURE_TYPES,
    non_uniform_min_count,
    per_layer_checkpoint,
    validated_step,
    whole_model_checkpoint,
)
from moe_compress.methods.random_prune import random_scores

pytestmark = pytest.mark.numeric

# --- applying a plan by hand: what a user does with the original safetensors and the plan alone -------------

# one tensor per expert: "<...>.layers.<layer>.<block>.experts.<expert>.<rest>"
PER_EXPERT = re.compile(r"^(?P<head>.*\.layers\.(?P<layer>\d+)\.[a-z_]+\.experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")
# one row per expert: the router's weight, bias and choice bias, and experts stored fused ([experts, ...])
PER_EXPERT_ROWS = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\."
                             r"(?:(?:gate|router)\.[a-z_]+|experts\.[a-z_]+)$")


def safetensors_of(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def apply_plan(original: dict[str, torch.Tensor], plan: dict) -> dict[str, torch.Tensor]:
    """The original tensors with, in every layer of the plan, the experts ``sorted(kept)`` in that slot order,
    and the same rows of every per-expert tensor."""
    pruned = {}
    for name, tensor in original.items():
        per_expert, rows = PER_EXPERT.match(name), PER_EXPERT_ROWS.match(name)
        layer = plan["moe_layers"].get((per_expert or rows).group("layer")) if (per_expert or rows) else None
        if layer is None:
            pruned[name] = tensor
            continue
        slots = sorted(layer["kept"])
        if per_expert:
            expert = int(per_expert.group("expert"))
            if expert in slots:
                pruned[f"{per_expert.group('head')}.{slots.index(expert)}.{per_expert.group('rest')}"] = tensor
        else:
            pruned[name] = tensor[slots]
    return pruned


def write_applied(original_dir, checkpoint_dir, out_dir) -> dict[str, torch.Tensor]:
    """The plan of ``checkpoint_dir`` applied to ``original_dir``'s weights, saved with the checkpoint's config
    (and modeling files, where it has per-layer counts) in ``out_dir``."""
    plan = json.loads((checkpoint_dir / "pruning_plan.json").read_text())
    tensors = apply_plan(safetensors_of(original_dir), plan)
    out_dir.mkdir()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    for path in [checkpoint_dir / "config.json", *checkpoint_dir.glob("*.py")]:
        shutil.copy(path, out_dir / path.name)
    return tensors


def checkpoint_logits(directory, input_ids) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_plan_gives_checkpoint(original_dir, checkpoint_dir, out_dir):
    """Applied by hand to the original weights, the plan gives the checkpoint: every tensor bitwise equal, and
    the same logits bitwise (same weights, shapes and kernels)."""
    applied = write_applied(original_dir, checkpoint_dir, out_dir)
    saved = safetensors_of(checkpoint_dir)
    assert applied.keys() == saved.keys()
    for name, tensor in saved.items():
        assert applied[name].dtype == tensor.dtype and torch.equal(applied[name], tensor), name
    input_ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(checkpoint_logits(out_dir, input_ids), checkpoint_logits(checkpoint_dir, input_ids))


def read_plan(checkpoint_dir) -> dict:
    return json.loads((checkpoint_dir / "pruning_plan.json").read_text())


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_plan_applied_to_the_original_weights_gives_the_checkpoint(tmp_path, prepared, model_type):
    model_dir, cache_dir, stats = prepared(model_type)
    record = whole_model_checkpoint(model_dir, cache_dir, stats, [validated_step("reap_prune", keep=5)],
                                    tmp_path / "ckpt")
    plan = read_plan(tmp_path / "ckpt")
    assert record["pruning_plan"] == "pruning_plan.json" and plan["reproduces_checkpoint"]
    assert {layer: len(entry["kept"]) for layer, entry in plan["moe_layers"].items()} == record["experts_per_layer"]
    # the vLLM RIY profile in the same file: every expert of every pruned layer not kept
    assert plan["version"] == 1 and plan["pruned_experts"] == [
        [int(layer), expert] for layer, entry in sorted(plan["moe_layers"].items(), key=lambda item: int(item[0]))
        for expert in range(entry["num_experts"]) if expert not in entry["kept"]]
    assert_plan_gives_checkpoint(model_dir, tmp_path / "ckpt", tmp_path / "applied")


def test_threshold_plan_keeps_different_counts_per_layer_and_applies(tmp_path, prepared):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    step = validated_step("frequency_prune", min_count=non_uniform_min_count(stats))
    record = whole_model_checkpoint(model_dir, cache_dir, stats, [step], tmp_path / "ckpt")
    plan = read_plan(tmp_path / "ckpt")
    counts = {layer: len(entry["kept"]) for layer, entry in plan["moe_layers"].items()}
    assert len(set(counts.values())) > 1 and counts == record["experts_per_layer"]
    assert plan["steps"] == [{"step": 0, "method": "frequency_prune", "score": "frequency",
                              "asked": {"min_count": step["min_count"], "uniform": False}}]
    assert record["loader"] == "remote_code"  # per-layer counts: the config needs the checkpoint's modeling file
    assert_plan_gives_checkpoint(model_dir, tmp_path / "ckpt", tmp_path / "applied")


def test_global_target_plan_records_the_target_and_the_counts(tmp_path, prepared):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    step = validated_step("reap_prune", target={"experts_fraction": 0.75}, allocation="global")
    record = whole_model_checkpoint(model_dir, cache_dir, stats, [step], tmp_path / "ckpt")
    plan = read_plan(tmp_path / "ckpt")
    counts = {layer: len(entry["kept"]) for layer, entry in plan["moe_layers"].items()}
    assert len(set(counts.values())) > 1, "the global allocation shares 12 of 16 experts unevenly on this model"
    assert counts == record["experts_per_layer"] and sum(counts.values()) == 12
    (described,) = plan["steps"]
    assert described["asked"] == {"target": {"experts_fraction": 0.75}, "allocation": "global"}
    assert described["achieved"]["experts"] == 12
    assert_plan_gives_checkpoint(model_dir, tmp_path / "ckpt", tmp_path / "applied")


@pytest.mark.parametrize("method, options", [("reap_prune", {"keep": 5}), ("frequency_prune", {"min_fraction": 0.3}),
                                             ("random_prune", {"keep": 3, "seed": 7})])
def test_rank_order_follows_the_scores(tmp_path, prepared, method, options):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    whole_model_checkpoint(model_dir, cache_dir, stats, [validated_step(method, **options)], tmp_path / "ckpt")
    plan = read_plan(tmp_path / "ckpt")
    for layer, entry in plan["moe_layers"].items():
        (ranked,) = entry["steps"]
        assert sorted(ranked["ranked_ids"]) == list(range(8))  # every expert of the source layer
        assert entry["kept"] == ranked["ranked_ids"][:ranked["kept_count"]]
        pairs = list(zip(ranked["scores"], ranked["ranked_ids"]))
        assert pairs == sorted(pairs, key=lambda pair: (-pair[0], pair[1]))  # highest first, ties by lower id
        # each score is the expert's own, from where the method reads it
        if method == "random_prune":
            expected = random_scores(7, int(layer), 8)
        else:
            rows = stats[stats["layer"] == int(layer)].set_index("expert")
            expected = rows["reap_saliency" if method == "reap_prune" else "selected"].to_numpy()
        assert ranked["scores"] == [expected[expert].item() for expert in ranked["ranked_ids"]]
        assert ranked["score"] == {"reap_prune": "reap_saliency", "frequency_prune": "frequency",
                                   "random_prune": "random"}[method]


def test_chained_prunes_name_the_source_experts(tmp_path, prepared):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    steps = [validated_step("frequency_prune", uniform=True, keep=6), validated_step("reap_prune", keep=4)]
    whole_model_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "ckpt")
    plan = read_plan(tmp_path / "ckpt")
    for entry in plan["moe_layers"].values():
        first, second = entry["steps"]
        assert len(first["ranked_ids"]) == 8 and len(entry["kept"]) == 4
        # the second step ranked the first one's survivors, by their ids in the source model
        assert sorted(second["ranked_ids"]) == sorted(first["ranked_ids"][:6])
        assert entry["kept"] == second["ranked_ids"][:4]
    assert plan["reproduces_checkpoint"]
    assert_plan_gives_checkpoint(model_dir, tmp_path / "ckpt", tmp_path / "applied")


@pytest.mark.parametrize("steps", [
    [validated_step("reap_prune", keep=5)],
    [validated_step("frequency_prune", min_fraction=0.3), validated_step("random_prune", keep=3)],
], ids=["reap", "threshold_then_random"])
def test_per_layer_jobs_write_the_plan_the_whole_model_job_writes(tmp_path, prepared, steps):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    whole_model_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "whole")
    per_layer_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "parts", tmp_path / "layered")
    whole = (tmp_path / "whole/pruning_plan.json").read_bytes()
    assert (tmp_path / "layered/pruning_plan.json").read_bytes() == whole
    assert sorted(json.loads(whole)["moe_layers"]) == ["0", "2"]


def test_a_merge_leaves_no_plan_and_says_why(tmp_path, prepared):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    steps = [validated_step("reap_prune", keep=6), validated_step("hc_merge", merges_per_layer=2)]
    record = whole_model_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt/pruning_plan.json").exists() and "pruning_plan" not in record
    assert record["pruning_plan_omitted"].startswith("step 1 (hc_merge) merged experts")
    assert json.loads((tmp_path / "ckpt/compression.json").read_text())["pruning_plan_omitted"] == \
        record["pruning_plan_omitted"]


def test_no_pruning_step_no_plan(tmp_path, prepared):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    record = whole_model_checkpoint(model_dir, cache_dir, stats, [validated_step("renormalize")], tmp_path / "ckpt")
    assert not (tmp_path / "ckpt/pruning_plan.json").exists()
    assert "pruning_plan" not in record and "pruning_plan_omitted" not in record


def test_plan_after_dropped_layers_names_the_source_layers(tmp_path, prepared):
    """qwen3_moe's tiny model has MoE layers 0 and 2; dropping layer 0 makes source layer 2 layer 1."""
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    steps = [validated_step("drop_layers", layers=[0]), validated_step("random_prune", keep=4)]
    whole_model_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "ckpt")
    plan = read_plan(tmp_path / "ckpt")
    assert sorted(plan["moe_layers"]) == ["2"] and plan["pruned_experts"][0][0] == 2
    assert plan["dropped_layers"] == [0] and not plan["reproduces_checkpoint"]
    assert plan["other_steps"] == [{"step": 0, "method": "drop_layers"}]
    # the checkpoint's layer 1 holds source layer 2's experts sorted(kept), in that order
    original, saved = safetensors_of(model_dir), safetensors_of(tmp_path / "ckpt")
    kept = sorted(plan["moe_layers"]["2"]["kept"])
    for slot, expert in enumerate(kept):
        for matrix in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(saved[f"model.layers.1.mlp.experts.{slot}.{matrix}.weight"],
                               original[f"model.layers.2.mlp.experts.{expert}.{matrix}.weight"])
    assert torch.equal(saved["model.layers.1.mlp.gate.weight"], original["model.layers.2.mlp.gate.weight"][kept])


def test_pruning_after_dropped_layers_ranks_by_the_source_layers_statistics(tmp_path, prepared):
    """After drop_layers renumbers the layers, reap_prune still reads each layer's own row of the statistics
    table (source layer 2, now layer 1): it keeps what the same prune keeps in the undropped model."""
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    prune = validated_step("reap_prune", keep=4)
    whole_model_checkpoint(model_dir, cache_dir, stats, [validated_step("drop_layers", layers=[0]), prune],
                           tmp_path / "dropped")
    whole_model_checkpoint(model_dir, cache_dir, stats, [prune], tmp_path / "whole")
    dropped, whole = read_plan(tmp_path / "dropped"), read_plan(tmp_path / "whole")
    assert dropped["moe_layers"]["2"]["kept"] == whole["moe_layers"]["2"]["kept"]
    saliency = stats[stats["layer"] == 2].set_index("expert")["reap_saliency"]
    assert sorted(dropped["moe_layers"]["2"]["kept"]) == sorted(saliency.nlargest(4).index.tolist())
