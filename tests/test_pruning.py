import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import assert_same_model, logits, non_uniform_min_count, saved_tensor_count
from moe_compress.cache import build_cache, read_router_cache
from moe_compress.errors import ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.stats import expert_frequency

pytestmark = pytest.mark.numeric


@pytest.fixture
def stats(tmp_path, tiny_model, token_batch):
    build_cache(tiny_model, token_batch, 6, tmp_path / "cache")
    return expert_frequency(read_router_cache(tmp_path / "cache"))


def compress(model, steps, stats):
    context = CompressionContext.for_model(model, stats)
    return apply_steps(model, steps, context)


def test_prune_nothing_is_bitwise_identical(tiny_model, token_batch, stats, device):
    tiny_model.to(device)
    before = logits(tiny_model, token_batch)
    reports = compress(tiny_model, [{"method": "frequency_prune", "min_count": 0}], stats)
    assert reports[0]["kept_per_layer"] == {"0": 8, "2": 8}
    assert torch.equal(before, logits(tiny_model, token_batch))  # the same weights, kernels and shapes


def test_pruning_changes_logits_and_drops_rarely_used(tiny_model, token_batch, stats, device):
    tiny_model.to(device)
    before = logits(tiny_model, token_batch)
    threshold = int(stats["selected"].median())
    reports = compress(tiny_model, [{"method": "frequency_prune", "min_count": threshold}], stats)
    for layer, kept_ids in reports[0]["kept_original_ids"].items():
        rows = stats[stats["layer"] == int(layer)].set_index("expert")
        expected = sorted(rows.index[rows["selected"] >= threshold].tolist())
        assert kept_ids == expected or len(kept_ids) == 2  # floored at the active top-k
    assert not torch.equal(before, logits(tiny_model, token_batch))


def test_non_uniform_checkpoint_reloads_with_remote_code(tmp_path, tiny_model, tokenizer, token_batch, stats, device):
    tiny_model.to(device)
    reports = compress(tiny_model, [{"method": "frequency_prune", "min_count": non_uniform_min_count(stats)}], stats)
    assert len(set(reports[0]["kept_per_layer"].values())) > 1, "fixture should give a non-uniform pruning"
    record = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", {"variant": "t"})
    assert record["loader"] == "remote_code"
    assert record["parameters"] == saved_tensor_count(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "compression.json").read_text())["experts_per_layer"] == reports[0]["kept_per_layer"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).to(device)
    assert_same_model(reloaded, tiny_model, token_batch)
    assert_same_model(load_model(tmp_path / "ckpt", device=str(device)), tiny_model, token_batch)  # our loader finds the flag


def test_uniform_checkpoint_is_stock(tmp_path, tiny_model, tokenizer, token_batch, stats):
    reports = compress(tiny_model, [{"method": "frequency_prune", "uniform": True, "keep": 5}], stats)
    assert reports[0]["kept_per_layer"] == {"0": 5, "2": 5}
    record = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", {"variant": "u"})
    assert record["loader"] == "stock" and not (tmp_path / "ckpt" / "modeling_moe_compress.py").exists()
    config = AutoConfig.from_pretrained(tmp_path / "ckpt")
    assert config.num_experts == 5 and not hasattr(config, "auto_map")
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), tiny_model, token_batch)  # no remote code
    assert record["parameters"] == saved_tensor_count(tmp_path / "ckpt")


def test_uniform_keeps_most_used(tiny_model, stats):
    reports = compress(tiny_model, [{"method": "frequency_prune", "uniform": True, "keep": 3, "top_k": 1}], stats)
    for layer, kept_ids in reports[0]["kept_original_ids"].items():
        rows = stats[stats["layer"] == int(layer)]
        top3 = rows.sort_values(["selected_rank_1", "expert"], ascending=[False, True], kind="stable")["expert"][:3]
        assert kept_ids == sorted(top3.tolist())


def test_chained_pruning_tracks_original_ids(tiny_model, stats):
    reports = compress(tiny_model, [{"method": "frequency_prune", "uniform": True, "keep": 6},
                                    {"method": "frequency_prune", "uniform": True, "keep": 4}], stats)
    for layer in ("0", "2"):
        assert set(reports[1]["kept_original_ids"][layer]) <= set(reports[0]["kept_original_ids"][layer])


def test_top_k_above_model_is_refused(tiny_model, stats):
    with pytest.raises(ModelError, match=r"step 0 \(frequency_prune\).top_k, MoE layer 0: 3 is more than the 2 experts"):
        compress(tiny_model, [{"method": "frequency_prune", "top_k": 3, "min_count": 1}], stats)


def test_unsupported_type_lists_supported():
    from moe_compress.architectures import adapter_for, supported_model_types

    with pytest.raises(ModelError) as error:
        adapter_for("gpt2")
    assert all(name in str(error.value) for name in supported_model_types())
    assert "\n" not in str(error.value) and "qwen3_next" in supported_model_types()
