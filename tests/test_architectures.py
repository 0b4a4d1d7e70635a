"""One parametrised suite over every supported architecture: cache -> stats -> prune nothing (bitwise)
-> prune (uniform and per-layer) -> save -> reload (equal logits) -> perplexity."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import ARCHITECTURE_TYPES, assert_same_model, logits, tiny_model_of
from moe_compress.architectures import adapter_for
from moe_compress.cache import build_cache, read_router_cache
from moe_compress.evaluate.perplexity import perplexity
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.methods.expert_selection import prune_experts
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.stats import expert_frequency

pytestmark = pytest.mark.numeric


def shared_state(model):
    adapter = adapter_for(model.config)
    return {f"{layer}.{name}.{key}": value.clone()
            for layer, block in adapter.moe_blocks(model).items()
            for name in adapter.shared_modules
            for key, value in getattr(block, name).state_dict().items()}


@pytest.fixture
def ids():
    return torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_cache_stats_prune_nothing(tmp_path, model_type, ids, device):
    model = tiny_model_of(model_type).to(device)
    adapter = adapter_for(model.config)
    build_cache(model, ids, 2, tmp_path / "cache")
    routing = read_router_cache(tmp_path / "cache")
    assert sorted(routing) == sorted(adapter.moe_blocks(model))  # dense layers are not cached
    stats = expert_frequency(routing)
    top_k = adapter.top_k(model.config)
    assert (stats.groupby("layer")["selected"].sum() == ids.numel() * top_k).all()
    before = logits(model, ids)
    apply_steps(model, [{"method": "frequency_prune", "min_count": 0}], CompressionContext.for_model(model, stats))
    assert torch.equal(before, logits(model, ids))  # the same weights, kernels and shapes: bit for bit


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per_layer"])
def test_prune_save_reload(tmp_path, model_type, uniform, tokenizer, ids, device):
    model = tiny_model_of(model_type).to(device)
    adapter = adapter_for(model.config)
    shared_before = shared_state(model)
    layers = sorted(adapter.moe_blocks(model))
    # uniform: 2 experts from each group of 4 (keeps DeepSeek's groups); per-layer: different counts
    keep = {layer: torch.tensor([0, 2, 5, 7] if uniform else list(range(3 + i))) for i, layer in enumerate(layers)}
    prune_experts(model, keep, CompressionContext.for_model(model))
    assert all(adapter.block_num_experts(block) == len(keep[layer]) for layer, block in adapter.moe_blocks(model).items())
    for key, value in shared_state(model).items():  # shared experts are never touched
        assert torch.equal(value, shared_before[key]), key
    assert torch.isfinite(logits(model, ids)).all()
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"variant": "t"})
    assert record["loader"] == ("stock" if uniform else "remote_code")
    assert record["experts_per_layer"] == {str(layer): len(keep[layer]) for layer in layers}
    if uniform:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    reloaded = reloaded.to(device).eval()
    assert_same_model(reloaded, model, ids)
    assert_same_model(load_model(tmp_path / "ckpt", device=str(device)), model, ids)
    result = perplexity(reloaded, ids.numpy(), batch_size=2)
    assert math.isfinite(result["perplexity"]) and result["tokens"] == 4 * 15


@pytest.mark.parametrize("model_type", ARCHITECTURE_TYPES)
def test_frequency_prune_keeps_most_used(model_type, ids, tmp_path, device):
    model = tiny_model_of(model_type).to(device)
    build_cache(model, ids, 4, tmp_path / "cache")
    stats = expert_frequency(read_router_cache(tmp_path / "cache"))
    report = apply_steps(model, [{"method": "frequency_prune", "uniform": True, "keep": 4}],
                         CompressionContext.for_model(model, stats))[0]
    for layer, kept in report["kept_original_ids"].items():
        counts = stats[stats["layer"] == int(layer)].set_index("expert")["selected"]
        assert counts[kept].min() >= counts.drop(kept).max()
    assert torch.isfinite(logits(model, ids)).all()


@pytest.mark.parametrize("model_type", ["deepseek_v3"])
def test_deepseek_groups_adapt_when_pruning_breaks_them(tmp_path, model_type, tokenizer, ids):
    model = tiny_model_of(model_type)
    adapter = adapter_for(model.config)
    layers = sorted(adapter.moe_blocks(model))
    # experts 0-3 are group 0, 4-7 group 1: keeping 0-3 empties group 1, so groups cannot survive
    adaptations = prune_experts(model, {layer: torch.arange(4) for layer in layers}, CompressionContext.for_model(model))
    assert sorted(adaptations) == [str(layer) for layer in layers]
    assert all(adapter.router_of(block).num_group == 1 for block in adapter.moe_blocks(model).values())
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {})
    assert record["loader"] == "stock"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert reloaded.config.n_group == 1 and reloaded.config.n_routed_experts == 4
    assert_same_model(reloaded.eval(), model, ids)
