import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moe_compress.architectures import adapter_for
from moe_compress.cache import LayerRouting, build_cache, inputs_file, read_router_cache
from moe_compress.stats import expert_frequency, selected_within_top

pytestmark = pytest.mark.numeric


def test_router_cache_matches_direct_forward(tmp_path, tiny_model, token_batch, device):
    tiny_model.to(device)
    batch_size = 4
    manifest = build_cache(tiny_model, token_batch, batch_size, tmp_path / "cache")
    routing = read_router_cache(tmp_path / "cache")
    assert sorted(routing) == [0, 2] and sorted(manifest["layers"]) == ["0", "2"]  # layer 1 is dense
    batches = token_batch.split(batch_size)
    with torch.no_grad():
        # the model's own router-logit output (independent of our hooks), batch by batch as the cache ran:
        # the same kernels on the same shapes, so bit for bit
        direct = [tiny_model(input_ids=batch.to(device), output_router_logits=True).router_logits for batch in batches]
    for position, layer in enumerate(sorted(routing)):  # router_logits come in MoE-layer order
        direct_logits = torch.cat([per_batch[position] for per_batch in direct]).float().cpu()
        np.testing.assert_array_equal(routing[layer].logits, direct_logits.numpy())
    adapter = adapter_for(tiny_model.config)
    rows_per_batch = [batch.numel() for batch in batches]
    for layer, block in adapter.moe_blocks(tiny_model).items():
        inputs = load_file(tmp_path / "cache" / inputs_file(layer))["hidden_states"]
        assert inputs.shape == (token_batch.numel(), 32)
        with torch.no_grad():  # the router on the cached inputs, in the rows of each batch it saw
            decided = [adapter.router_of(block)(part.to(device)) for part in inputs.split(rows_per_batch)]
        logits, weights, indices = (torch.cat([part[i] for part in decided]).cpu() for i in range(3))
        # the cached inputs are exactly what the router saw, and the cached decisions what it chose
        np.testing.assert_array_equal(logits.numpy(), routing[layer].logits)
        np.testing.assert_array_equal(indices.numpy(), routing[layer].topk_indices)
        np.testing.assert_array_equal(weights.numpy(), routing[layer].topk_weights)


def test_frequency_counts_equal_brute_force(tmp_path, tiny_model, token_batch):
    build_cache(tiny_model, token_batch, 6, tmp_path / "cache")
    routing = read_router_cache(tmp_path / "cache")
    table = expert_frequency(routing)
    for layer, layer_routing in routing.items():
        tokens, top_k = layer_routing.topk_indices.shape
        rows = table[table["layer"] == layer].set_index("expert")
        for expert in range(8):
            for rank in range(top_k):
                brute = sum(int(layer_routing.topk_indices[t, rank] == expert) for t in range(tokens))
                assert rows.loc[expert, f"selected_rank_{rank + 1}"] == brute
            mass = sum(float(layer_routing.topk_weights[t, r]) for t in range(tokens) for r in range(top_k)
                       if layer_routing.topk_indices[t, r] == expert)
            assert abs(rows.loc[expert, "routing_mass"] - mass) < 1e-5
        assert rows["selected"].sum() == tokens * top_k
        within_1 = selected_within_top(rows.reset_index(), 1)
        assert within_1.sum() == tokens


def test_hand_made_counts():

    indices = np.array([[0, 1], [0, 2], [1, 0], [2, 1]])
    weights = np.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]], dtype=np.float32)
    table = expert_frequency({3: LayerRouting(np.zeros((4, 3), np.float32), indices, weights)})
    assert table["selected_rank_1"].tolist() == [2, 1, 1]
    assert table["selected_rank_2"].tolist() == [1, 2, 1]
    np.testing.assert_allclose(table["routing_mass"], [1.8, 1.0, 1.2])
    np.testing.assert_allclose(table["mean_router_prob"], [1 / 3] * 3)
    assert table["layer"].unique().tolist() == [3]
