"""Expert merging: identical experts merge losslessly, clustering is average linkage, the learned
merge never ends worse than its initialisation, and merged checkpoints round-trip."""

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from transformers import AutoModelForCausalLM

from helpers import (
    ARCHITECTURE_TYPES,
    assert_same_model,
    context_with_inputs,
    saved_tensor_count,
    synthetic_inputs,
    tiny_model_of,
)
from moe_compress.architectures import adapter_for
from moe_compress.config import validate_config
from moe_compress.methods import apply_steps
from moe_compress.methods.merging import average_linkage_clusters, kmeans_clusters, merge_layer, svd_merge
from moe_compress.modelio import save_checkpoint
from moe_compress.moe_block import block_output, relative_error, route, selection_counts

pytestmark = pytest.mark.numeric


def merge_step(**overrides):
    """A fully defaulted hc_merge step, as the validated config would pass it."""
    raw = {"model": {"path": "demo"}, "calibration": {},
           "variants": {"v": {"method": "hc_merge", "merges_per_layer": 1, **overrides}}}
    return validate_config(raw)["variants"]["v"]["steps"][0]


@pytest.mark.parametrize("rule", ["frequency", "svd", "learned"])
def test_merging_identical_experts_is_lossless(rule, device):
    model = tiny_model_of("qwen3_moe").to(device)  # renormalised top-k: removing a never-chosen expert changes nothing
    adapter = adapter_for(model.config)
    block = adapter.moe_blocks(model)[0]
    experts, router = adapter.experts_of(block), adapter.router_of(block)
    hidden = synthetic_inputs().to(device)
    with torch.no_grad():
        for name in adapter.expert_tensors:  # expert 1 is a copy of expert 0 ...
            getattr(experts, name)[1] = getattr(experts, name)[0]
        router.weight[1] = router.weight[0]
        router.weight[1, 0] -= 100.0  # ... that the router never picks (x[0] > 3 for every token)
        _, indices = route(adapter, block, hidden)
        assert selection_counts(indices, 8)[1] == 0
        before = block_output(block, hidden)
    clusters = [[0, 1]] + [[i] for i in range(2, 8)]
    merge_layer(adapter, block, clusters, selection_counts(indices, 8), merge_step(merge=rule, svd_energy=1.0),
                hidden[:200], hidden[200:])
    assert adapter.block_num_experts(block) == 7
    with torch.no_grad():
        after = block_output(block, hidden)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_svd_merge_full_rank_is_the_weighted_average_and_truncation_keeps_the_shared_subspace():
    generator = torch.Generator().manual_seed(0)
    matrices = torch.randn(3, 12, 20, generator=generator, dtype=torch.float64)
    coefficients = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    expected = torch.einsum("j,jmn->mn", coefficients, matrices)
    torch.testing.assert_close(svd_merge(matrices, coefficients, rank=None, energy=1.0), expected)
    # members that share a rank-2 column space: rank 2 is already exact
    basis = torch.randn(12, 2, generator=generator, dtype=torch.float64)
    low_rank = torch.stack([basis @ torch.randn(2, 20, generator=generator, dtype=torch.float64) for _ in range(3)])
    torch.testing.assert_close(svd_merge(low_rank, coefficients, rank=2, energy=1.0),
                               torch.einsum("j,jmn->mn", coefficients, low_rank))


def test_average_linkage_matches_scipy():
    points = torch.randn(16, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ours = average_linkage_clusters(points, merges=10, max_cluster_size=None)
    labels = fcluster(linkage(points.numpy(), method="average", metric="euclidean"), t=6, criterion="maxclust")
    theirs = sorted((sorted(np.where(labels == label)[0].tolist()) for label in set(labels)), key=lambda c: c[0])
    assert ours == theirs


def test_cluster_size_limit_and_kmeans_partition():
    points = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    clusters = average_linkage_clusters(points, merges=8, max_cluster_size=2)
    assert len(clusters) == 8 and max(map(len, clusters)) == 2
    assert sorted(sum(clusters, [])) == list(range(16))
    groups = kmeans_clusters(points, 5, seed=0)
    assert len(groups) == 5 and all(groups) and sorted(sum(groups, [])) == list(range(16))
    assert groups == kmeans_clusters(points, 5, seed=0)  # seeded


def test_learned_merge_never_ends_worse_than_its_initialisation(device):
    for seed in range(3):
        model = tiny_model_of("mixtral", seed=seed).to(device)
        report = apply_steps(model, [merge_step(merges_per_layer=3, merge="learned", learn_steps=60, learn_lr=0.5)],
                             context_with_inputs(model, device=device))[0]
        for layer in report["layers"].values():
            assert layer["heldout_error_learned"] <= layer["heldout_error_init"]


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
@pytest.mark.parametrize("rule", ["frequency", "svd", "learned"])
def test_merged_checkpoint_round_trips(tmp_path, model_type, rule, tokenizer, device):
    model = tiny_model_of(model_type).to(device)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    step = merge_step(merges_per_layer=3, merge=rule, max_cluster_size=3, learn_steps=20, svd_energy=0.9)
    report = apply_steps(model, [step], context_with_inputs(model, device=device))[0]
    assert all(len(clusters) == 5 for clusters in report["clusters"].values())
    assert all(0 < error < 2 for error in report["reconstruction_error"].values())
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["loader"] == "stock" and record["parameters"] == saved_tensor_count(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").to(device).eval()
    assert_same_model(reloaded, model, ids)
    reloaded.generate(ids[:, :4].to(device), max_new_tokens=3, do_sample=False)  # the KV-cache path too


def test_merging_reports_reconstruction_error_and_fewer_parameters():
    model = tiny_model_of("qwen3_moe")
    before = sum(p.numel() for p in model.parameters())
    report = apply_steps(model, [merge_step(merges_per_layer=2)], context_with_inputs(model))[0]
    assert sum(p.numel() for p in model.parameters()) < before
    assert set(report["reconstruction_error"]) == {"0", "2"}
    assert relative_error(torch.ones(3), torch.ones(3)) == 0.0


def test_clusters_and_coefficients_are_written_as_a_readable_table():
    from moe_compress.final_table import describe_steps
    from moe_compress.modelio import clusters_table, step_report_tables

    model = tiny_model_of("qwen3_moe")
    step = merge_step(merges_per_layer=3, merge="frequency")
    reports = apply_steps(model, [step], context_with_inputs(model))
    table = clusters_table(reports)
    assert len(table) == 2 * 5 and set(table["layer"]) == {0, 2}
    members = sorted(int(e) for experts in table[table["layer"] == 0]["original_experts"] for e in experts.split())
    assert members == list(range(8))  # every original expert is in exactly one cluster
    for _, row in table.iterrows():
        assert sum(float(c) for c in row["coefficients"].split()) == pytest.approx(1.0, abs=1e-3)
    assert set(step_report_tables(reports)) == {"reconstruction_error.csv", "merge_clusters.csv"}
    assert describe_steps([step]) == "hc_merge(merges_per_layer=3)"  # defaults are left out
