"""Per-layer compression jobs + the streaming checkpoint writer give what one whole-model job saves."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (
    ARCHITECTURE_TYPES,
    HELDOUT,
    all_tensors,
    layer_part_paths,
    per_layer_checkpoint,
    whole_model_checkpoint,
)
from moe_compress.config import step_defaults
from moe_compress.errors import ConfigError, ModelError
from moe_compress.layerwise import (
    assemble_checkpoint,
    compress_layer,
    write_layer_part,
)
from moe_compress.modelio import load_model

pytestmark = pytest.mark.numeric



def step(method, **options):
    return {"method": method, **step_defaults(method), **options}


STEP_LISTS = {
    # same count everywhere: a stock checkpoint
    "reap": [step("reap_prune", keep=5)],
    # per-layer counts, remote code; then a fitted mitigation
    "threshold_rescale": [step("frequency_prune", top_k=2, min_fraction=0.2), step("output_rescale")],
    "merge_lowrank": [step("hc_merge", merges_per_layer=2, merge="learned"), step("svd_experts", rank=3)],
    "skip": [step("renormalize"), step("dynamic_skip", beta="auto", target_active=1.5)],
}


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
@pytest.mark.parametrize("steps_name", STEP_LISTS)
def test_per_layer_jobs_save_what_the_whole_model_job_saves(tmp_path, prepared, model_type, steps_name):
    steps = STEP_LISTS[steps_name]
    model_dir, cache_dir, stats = prepared(model_type)
    whole = whole_model_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "whole")
    layered = per_layer_checkpoint(model_dir, cache_dir, stats, steps, tmp_path / "parts", tmp_path / "layered")

    ours, theirs = all_tensors(tmp_path / "layered"), all_tensors(tmp_path / "whole")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert json.loads((tmp_path / "layered/config.json").read_text()) == json.loads((tmp_path / "whole/config.json").read_text())
    assert layered == whole
    whole_files = {path.name for path in (tmp_path / "whole").iterdir()} - {"model.safetensors"}
    layered_files = {path.name for path in (tmp_path / "layered").iterdir()}
    assert whole_files <= layered_files
    for name in whole_files - {"compression.json"}:
        assert (tmp_path / "layered" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    input_ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "layered")(input_ids).logits,
                           load_model(tmp_path / "whole")(input_ids).logits)


def test_assembly_refuses_missing_or_foreign_parts(tmp_path, prepared):
    model_dir, cache_dir, stats = prepared("qwen3_moe")  # MoE layers 0 and 2 (layer 1 is dense)
    parts = layer_part_paths(tmp_path / "parts", [0, 2])
    for layer, path in parts.items():
        write_layer_part(path, *compress_layer(model_dir, layer, [], stats, cache_dir, HELDOUT))
    with pytest.raises(ModelError, match=r"layer parts for layers \[0\].*MoE layers .* are \[0, 2\]"):
        assemble_checkpoint(model_dir, {0: parts[0]}, tmp_path / "out", {})
    with pytest.raises(ModelError, match="holds layer 0, not layer 2"):
        assemble_checkpoint(model_dir, {0: parts[0], 2: parts[0]}, tmp_path / "out", {})
    with pytest.raises(ModelError, match="layer 1 is not an MoE layer"):
        compress_layer(model_dir, 1, [], stats, cache_dir, HELDOUT)
    assert not (tmp_path / "out").exists()


def test_whole_model_steps_are_refused_in_a_per_layer_job(prepared):
    model_dir, cache_dir, stats = prepared("qwen3_moe")
    with pytest.raises(ConfigError, match="step 1: drop_layers works on the whole model, so it cannot run in a per-layer"):
        compress_layer(model_dir, 0, [step("reap_prune", keep=4), step("drop_layers", count=1)], stats, cache_dir, HELDOUT)
    with pytest.raises(ConfigError, match="step 0: frequency_prune with uniform and no keep .* mean over all layers"):
        compress_layer(model_dir, 0, [step("frequency_prune", uniform=True)], stats, cache_dir, HELDOUT)
