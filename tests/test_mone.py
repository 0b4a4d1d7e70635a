"""MoNE (mone_prune): the compressed block equals a token-by-token reference written from the paper's
definition, the ranking scores equal an independent computation, keeping every expert changes nothing, the
novice checkpoint reloads through remote code with the in-memory logits, compression.json reports the
constants, and the options and step order are checked."""

import copy
import json

import pytest
import torch

from helpers import (
    assert_same_model,
    context_with_inputs,
    logits,
    make_tokenizer,
    tiny_model_of,
    validated_step,
    validated_steps,
)
from moe_compress.architectures import adapter_for
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods import apply_steps
from moe_compress.modelio import load_model, save_checkpoint
from moe_compress.moe_block import block_output, run_expert
from moe_compress.remote_code.moe_compress_layers import STORED_FORMS, NoviceForm, stored_form_of
from moe_compress.serving.vllm_plugin import UNSERVED_LAYOUTS, unserved_layouts

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def reference_statistics(adapter, block, hidden):
    """Per expert, from a loop over the tokens and their top-k slots: (mean output over its routed tokens, zero
    where none; population variance per dimension; routing mass / tokens; routed token count), in float64."""
    num_experts = adapter.block_num_experts(block)
    _, weights, indices = adapter.call_router(block, hidden)
    outputs = {expert: [] for expert in range(num_experts)}
    mass = [0.0] * num_experts
    for token in range(hidden.shape[0]):
        for slot in range(indices.shape[1]):
            expert = int(indices[token, slot])
            mass[expert] += float(weights[token, slot])
            outputs[expert].append(run_expert(adapter, block, hidden[token:token + 1], expert)[0].double())
    stats = {}
    for expert, rows in outputs.items():
        if rows:
            stacked = torch.stack(rows)
            mean = stacked.mean(dim=0)
            variance = ((stacked - mean) ** 2).sum(dim=0) / len(rows)
        else:
            mean = variance = torch.zeros(hidden.shape[1], dtype=torch.float64)
        stats[expert] = (mean, variance, mass[expert] / hidden.shape[0], len(rows))
    return stats


def compressed(model_type, **options):
    model = tiny_model_of(model_type)
    original = copy.deepcopy(model)
    context = context_with_inputs(model)
    report = apply_steps(model, [validated_step("mone_prune", **options)], context)[0]
    return model, original, context, report


# architectures without shared experts, so the block's output is the routed experts' alone
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_block_equals_the_token_by_token_definition(model_type):
    model, original, context, report = compressed(model_type, keep=3)
    adapter = adapter_for(model.config)
    for layer, block in adapter.moe_blocks(model).items():
        source = adapter.moe_blocks(original)[layer]
        fit, heldout = context.split_inputs(layer)
        stats = reference_statistics(adapter, source, fit)
        novices = set(report["novices"][str(layer)]["ids"])
        assert len(novices) == 8 - 3 and isinstance(stored_form_of(adapter.experts_of(block)), NoviceForm)
        with torch.no_grad():
            _, weights, indices = adapter.call_router(source, heldout)
        expected = torch.zeros(heldout.shape, dtype=torch.float64)
        for token in range(heldout.shape[0]):
            for slot in range(indices.shape[1]):
                expert, weight = int(indices[token, slot]), float(weights[token, slot])
                if expert in novices:  # a novice: its routing weight times its mean routed output
                    expected[token] += weight * stats[expert][0]
                else:
                    with torch.no_grad():
                        output = run_expert(adapter, source, heldout[token:token + 1], expert)[0]
                    expected[token] += weight * output.double()
        with torch.no_grad():
            actual = block_output(block, heldout).double()
        # float32 experts (hidden 32, width <= 64) and a float32 constant: a few ulps of outputs of order 1
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_scores_and_constants_equal_an_independent_computation(model_type):
    model, original, context, report = compressed(model_type, keep=4)
    adapter = adapter_for(model.config)
    for layer, block in adapter.moe_blocks(model).items():
        stats = reference_statistics(adapter, adapter.moe_blocks(original)[layer], context.split_inputs(layer)[0])
        ranking = report["ranking"][str(layer)]
        for expert, score in zip(ranking["ids"], ranking["scores"]):
            mean, variance, routing_score, _ = stats[expert]
            assert score == pytest.approx(float(variance.sqrt().norm()) * routing_score, rel=1e-5, abs=1e-12)
        assert ranking["scores"] == sorted(ranking["scores"], reverse=True)
        novices = report["novices"][str(layer)]
        experts = adapter.experts_of(block)
        assert experts.novice_specs["novices"] == novices["ids"] and report["real_experts_per_layer"][str(layer)] == 4
        for row, (expert, norm, tokens) in enumerate(zip(novices["ids"], novices["constant_norms"], novices["tokens"])):
            mean, _, _, routed = stats[expert]
            torch.testing.assert_close(experts.novice_constants[row].double(), mean, rtol=1e-5, atol=1e-6)
            assert norm == pytest.approx(float(mean.norm()), rel=1e-5, abs=1e-9) and tokens == routed


def test_an_expert_no_token_reaches_gets_a_zero_constant():
    model = tiny_model_of("qwen3_moe")
    adapter = adapter_for(model.config)
    with torch.no_grad():  # every calibration token's first coordinate is positive: expert 7's logit is far below
        for block in adapter.moe_blocks(model).values():
            adapter.router_of(block).weight[7] = 0
            adapter.router_of(block).weight[7, 0] = -50.0
    context = context_with_inputs(model)
    report = apply_steps(model, [validated_step("mone_prune", keep=4)], context)[0]
    for layer, entry in report["novices"].items():
        row = entry["ids"].index(7)
        assert entry["tokens"][row] == 0 and entry["constant_norms"][row] == 0.0
        experts = adapter.experts_of(adapter.moe_blocks(model)[int(layer)])
        assert torch.equal(experts.novice_constants[row], torch.zeros_like(experts.novice_constants[row]))


def test_keeping_every_expert_changes_nothing():
    model = tiny_model_of("qwen3_moe")
    before = logits(model, IDS)
    report = apply_steps(model, [validated_step("mone_prune", keep=8)], context_with_inputs(model))[0]
    assert torch.equal(logits(model, IDS), before)
    assert all(not entry["ids"] for entry in report["novices"].values())
    assert all(stored_form_of(adapter_for(model.config).experts_of(block)) is None
               for block in adapter_for(model.config).moe_blocks(model).values())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_checkpoint_reloads_with_the_same_logits(model_type, tmp_path):
    model, _, _, report = compressed(model_type, min_fraction=0.1)
    record = save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {"step_reports": [report]})
    assert record["loader"] == "remote_code" and record["novice_per_layer"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    adapter = adapter_for(model.config)
    for layer, block in adapter.moe_blocks(model).items():
        experts = adapter.experts_of(block)
        novices = report["novices"][str(layer)]["ids"]
        if not novices:
            continue
        assert config["moe_compress_novice"][str(layer)] == {"num_experts": 8, "novices": novices}
        # only the kept experts' weights are stored; the router keeps all 8 rows
        assert getattr(experts, adapter.expert_matrices[1]).shape[0] == 8 - len(novices)
        assert experts.novice_constants.shape == (len(novices), model.config.hidden_size)
        assert adapter.block_num_experts(block) == 8
    assert any("MoNE novice experts" in problem for problem in unserved_layouts(config))
    reloaded = load_model(tmp_path / "ckpt")
    assert_same_model(reloaded, model, IDS)
    # the constants compression.json reports are the stored ones
    stored = json.loads((tmp_path / "ckpt" / "compression.json").read_text())["step_reports"][0]["novices"]
    for layer, block in adapter_for(reloaded.config).moe_blocks(reloaded).items():
        experts = adapter_for(reloaded.config).experts_of(block)
        if stored[str(layer)]["ids"]:
            torch.testing.assert_close(experts.novice_constants.norm(dim=-1).double(),
                                       torch.tensor(stored[str(layer)]["constant_norms"], dtype=torch.float64),
                                       rtol=1e-6, atol=1e-7)


def test_target_and_later_routing_steps():
    model = tiny_model_of("qwen3_moe")
    context = context_with_inputs(model)
    steps = validated_steps({"method": "mone_prune", "target": {"experts_fraction": 0.5}},
                            {"method": "output_rescale"})
    reports = apply_steps(model, steps, context)
    assert set(reports[0]["real_experts_per_layer"].values()) == {4}
    assert "kept_per_layer" not in reports[0]  # novices keep their ids: no pruning plan describes this checkpoint


def test_options_and_order_are_checked():
    with pytest.raises(ConfigError, match="exactly one of keep or min_fraction or target"):
        validated_step("mone_prune", keep=4, min_fraction=0.1)
    with pytest.raises(ConfigError, match="allocation"):
        validated_step("mone_prune", keep=4, allocation="global")
    with pytest.raises(ConfigError, match=r"reap_prune cannot follow the novice \(MoNE\) step steps\[0\]"):
        validated_steps({"method": "mone_prune", "keep": 4}, {"method": "reap_prune", "keep": 4})
    with pytest.raises(ConfigError, match=r"svd_experts cannot follow the novice \(MoNE\) step"):
        validated_steps({"method": "mone_prune", "keep": 4}, {"method": "svd_experts", "rank": 4})
    with pytest.raises(ConfigError, match=r"mone_prune cannot follow the low-rank step steps\[0\]"):
        validated_steps({"method": "svd_experts", "rank": 4}, {"method": "mone_prune", "keep": 4})
    model = tiny_model_of("qwen3_moe")
    with pytest.raises(ModelError, match="more than the 8 experts"):
        apply_steps(model, [validated_step("mone_prune", keep=9)], context_with_inputs(model))


def test_the_vllm_plugin_refuses_every_stored_form_it_does_not_serve():
    assert {form.config_field for form in STORED_FORMS if not form.served} <= set(UNSERVED_LAYOUTS)
