"""Device placement: every step and statistic runs where the model's weights are (CPU, CUDA), in fp32 and
bf16; results agree across devices; a failure names the step, the layer and the tensor.

Without a GPU, placement is still checked: with the default device set to ``meta``, any tensor a step
creates without naming its device lands on meta and the step fails, which is exactly the kind of tensor
that stays on the CPU while the weights are on CUDA. The cross-device comparisons run under
``make test-gpu``."""

import dataclasses

import pytest
import torch

from helpers import ARCHITECTURE_TYPES, requires_cuda, synthetic_inputs, tiny_model_of, validated_steps
from moe_compress.architectures import adapter_for, replace_tensor
from moe_compress.cache import build_cache, read_router_cache
from moe_compress.errors import ModelError
from moe_compress.methods import CompressionContext, apply_steps, methods
from moe_compress.methods.decoder import layer_similarities
from moe_compress.stats import expert_frequency, expert_saliency, with_saliency

STEP_LISTS = {
    "frequency_prune": [{"method": "frequency_prune", "min_count": 1}],
    "reap_prune": [{"method": "reap_prune", "keep": 4}],
    "merge_frequency": [{"method": "hc_merge", "merges_per_layer": 2}],
    "merge_learned": [{"method": "hc_merge", "merges_per_layer": 2, "merge": "learned", "learn_steps": 20}],
    "merge_svd_kmeans": [{"method": "hc_merge", "merges_per_layer": 2, "merge": "svd", "svd_energy": 0.9,
                          "grouping": "kmeans", "router_row": "dominant"}],
    "svd_energy": [{"method": "svd_experts", "energy": 0.9}],
    "svd_shared": [{"method": "svd_experts", "rank": 4, "share_basis": True}],
    "fewer_active_rescale": [{"method": "active_experts", "k": 1}, {"method": "output_rescale", "granularity": "channel"}],
    "skip_auto": [{"method": "renormalize"}, {"method": "dynamic_skip", "beta": "auto", "target_active": 1.5},
                  {"method": "output_rescale"}],
    "drop_layers": [{"method": "drop_layers", "count": 1}],
    "dtype": [{"method": "dtype", "dtype": "bfloat16"}],
}


def prepared(model_type: str, device: str, dtype: torch.dtype = torch.float32):
    """A tiny model on ``device`` in ``dtype``, its calibration tokens and its cached MoE inputs."""
    model = tiny_model_of(model_type).to(device=device, dtype=dtype)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))
    inputs = {layer: synthetic_inputs(192, model.config.hidden_size, seed=layer).to(device, dtype)
              for layer in adapter_for(model.config).moe_blocks(model)}
    return model, ids, inputs


def context_for(model, ids, inputs, tmp_path) -> CompressionContext:
    """The context the compress job builds: statistics (frequency from the router cache, REAP saliency),
    cached inputs, calibration tokens."""
    build_cache(model, ids, 2, tmp_path / "cache")
    stats = with_saliency(expert_frequency(read_router_cache(tmp_path / "cache")), expert_saliency(model, inputs))
    return CompressionContext.for_model(model, stats=stats, moe_inputs=inputs, heldout_fraction=0.25,
                                        calibration_ids=ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_steps_and_statistics_create_nothing_on_the_default_device(tmp_path, model_type, dtype):
    for name, step_list in STEP_LISTS.items():
        model, ids, inputs = prepared(model_type, "cpu", dtype)
        with torch.device("meta"):  # a tensor made without naming its device would land here
            context = context_for(model, ids, inputs, tmp_path / name)
            layer_similarities(model, ids)
            reports = apply_steps(model, validated_steps(*step_list), context)
        assert reports[-1]["reconstruction_error"], name
        assert all(not tensor.is_meta for tensor in model.state_dict().values()), name


def test_cached_inputs_on_another_device_are_named():
    model = tiny_model_of("qwen3_moe")
    inputs = {layer: torch.zeros(8, 32, device="meta") for layer in adapter_for(model.config).moe_blocks(model)}
    context = CompressionContext.for_model(model, moe_inputs=inputs)
    with pytest.raises(ModelError, match="cached MoE inputs of layer 0 are on meta, but the model's weights are on cpu"):
        apply_steps(model, validated_steps({"method": "renormalize"}), context)


def replace_apply(monkeypatch, name, apply):
    """Run ``apply`` in place of method ``name``'s own, for this test."""
    monkeypatch.setitem(methods(), name, dataclasses.replace(methods()[name], apply=apply))


def test_a_tensor_a_step_leaves_on_another_device_is_named(monkeypatch):
    def misplacing_step(model, step, context):
        for layer, block in context.each_block(model):
            router = adapter_for(model.config).router_of(block)
            replace_tensor(router, "weight", router.weight.data.to("meta"))
        return {}

    replace_apply(monkeypatch, "renormalize", misplacing_step)
    model = tiny_model_of("qwen3_moe")
    with pytest.raises(ModelError, match=r"gate\.weight of MoE layer 0 is on meta after step 0 \(renormalize\), "
                                         r"but the model's weights are on cpu"):
        apply_steps(model, validated_steps({"method": "renormalize"}), CompressionContext.for_model(model))


def test_a_torch_error_inside_a_step_names_the_step_and_the_layer(monkeypatch):
    def failing_step(model, step, context):
        for layer, block in context.each_block(model):
            if layer == 2:
                torch.zeros(2, device="cpu") + torch.zeros(3, device="cpu")  # a shape error, raised by torch
        return {}

    replace_apply(monkeypatch, "frequency_prune", failing_step)
    model = tiny_model_of("qwen3_moe")
    with pytest.raises(ModelError, match=r"step 1 \(frequency_prune\), MoE layer 2 failed: The size of tensor a"):
        apply_steps(model, [{"method": "renormalize"}, {"method": "frequency_prune", "min_count": 0}],
                    CompressionContext.for_model(model))


# what must agree between a CPU and a CUDA run of the same step list (fp32): the discrete choices exactly,
# fitted and measured quantities to a tolerance: fp32 kernels differ in summation order (~1e-6 relative per
# sum), which a ratio of norms or a least-squares fit amplifies by a few orders of magnitude, and an
# iterative fit (Adam, early-stopped on held-out tokens) by more
MEASURED_RTOL = 1e-3
ITERATIVE_FIT_RTOL = 1e-2
ITERATIVE_FACTS = ("heldout_error_learned",)
EXACT_KEYS = ("kept_per_layer", "kept_original_ids", "clusters", "dropped_layers", "previous_top_k", "switched")


def assert_reports_agree(cpu_reports, cuda_reports, name):
    for cpu, cuda in zip(cpu_reports, cuda_reports, strict=True):
        for key in EXACT_KEYS:
            assert cpu.get(key) == cuda.get(key), (name, key)
        rtol = ITERATIVE_FIT_RTOL if cpu["method"] == "hc_merge" and cpu.get("merge") == "learned" else MEASURED_RTOL
        for key in ("reconstruction_error", "active_experts_mean"):
            for layer, value in cpu.get(key, {}).items():
                assert cuda[key][layer] == pytest.approx(value, rel=rtol, abs=1e-6), (name, key, layer)
        for layer, facts in cpu.get("layers", {}).items():
            for fact, value in facts.items():
                if isinstance(value, float):
                    rtol = ITERATIVE_FIT_RTOL if fact in ITERATIVE_FACTS else MEASURED_RTOL
                    assert cuda["layers"][layer][fact] == pytest.approx(value, rel=rtol, abs=1e-6), (name, fact)
        for layer, beta in cpu.get("beta", {}).items():
            assert cuda["beta"][layer] == pytest.approx(beta, rel=MEASURED_RTOL), (name, layer)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_cpu_and_cuda_agree(tmp_path, model_type):
    for name, step_list in STEP_LISTS.items():
        runs = {}
        for device in ("cpu", "cuda"):
            model, ids, inputs = prepared(model_type, device)
            context = context_for(model, ids, inputs, tmp_path / name / device)
            runs[device] = (context.stats, apply_steps(model, validated_steps(*step_list), context))
        (cpu_stats, cpu_reports), (cuda_stats, cuda_reports) = runs["cpu"], runs["cuda"]
        counts = [column for column in cpu_stats.columns if column.startswith("selected")]
        assert cpu_stats[counts].equals(cuda_stats[counts]), name
        torch.testing.assert_close(torch.tensor(cuda_stats["reap_saliency"].to_numpy()),
                                   torch.tensor(cpu_stats["reap_saliency"].to_numpy()), rtol=1e-4, atol=1e-7)
        assert_reports_agree(cpu_reports, cuda_reports, name)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_every_step_runs_in_bf16_on_cuda(tmp_path, model_type):
    for name, step_list in STEP_LISTS.items():
        model, ids, inputs = prepared(model_type, "cuda", torch.bfloat16)
        reports = apply_steps(model, validated_steps(*step_list), context_for(model, ids, inputs, tmp_path / name))
        assert all(0 <= error < 2 for error in reports[-1]["reconstruction_error"].values()), name
        assert all(tensor.device.type == "cuda" for tensor in model.state_dict().values()), name
