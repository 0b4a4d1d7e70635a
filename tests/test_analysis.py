"""The analyze step: a checkpoint's structure and parameters by module type, from its saved tensors' headers,
against independent counts from the config and the loaded model; sharded, pruned, factored and dense
checkpoints; bad input; the rule in the DAG."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
from safetensors import safe_open

from helpers import (
    ALL_ARCHITECTURE_TYPES,
    REPO,
    SNAKEMAKE,
    TINY,
    context_with_inputs,
    non_uniform_min_count,
    planned_jobs,
    saved_tensor_count,
    snakemake,
    tiny_model_of,
    validated_step,
    write_config,
)
from moe_compress.analysis import MODULE_TYPES, analyze_checkpoint, analyze_models, to_markdown, write_analysis
from moe_compress.architectures import ARCHITECTURES
from moe_compress.cache import build_cache, read_router_cache
from moe_compress.cli import main
from moe_compress.errors import ModelError
from moe_compress.methods import CompressionContext, apply_steps
from moe_compress.modelio import count_parameters, save_checkpoint
from moe_compress.stats import expert_frequency


def saved(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def without_location(facts: dict) -> dict:
    """The analysis less where the files are (the same tensors sharded or not)."""
    return {key: value for key, value in facts.items() if key not in ("path", "files", "name")}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "cohere2_moe"])  # cohere2_moe ties its embeddings
def test_totals_are_the_saved_tensors_and_the_loaded_models_parameters(tmp_path, model_type):
    model = tiny_model_of(model_type)
    facts = analyze_checkpoint(saved(model, tmp_path / "model"))
    assert facts["parameters"]["total"] == saved_tensor_count(tmp_path / "model") == model.num_parameters()
    assert facts["parameters"]["total"] == sum(facts["parameters"][kind] for kind in MODULE_TYPES)
    assert facts["bytes"]["total"] == 4 * facts["parameters"]["total"]  # float32
    assert sum(layer["parameters"]["total"] for layer in facts["layers"]) == facts["parameters"]["total"] - sum(
        facts["parameters"][kind] for kind in ("embeddings", "lm_head")) - model.config.hidden_size  # final norm
    embedding = model.config.vocab_size * model.config.hidden_size
    assert facts["parameters"]["embeddings"] == embedding
    if model.config.tie_word_embeddings:
        assert facts["lm_head"] == "tied" and facts["parameters"]["lm_head"] == 0  # stored once, counted once
    else:
        assert facts["lm_head"] == "separate" and facts["parameters"]["lm_head"] == embedding


@pytest.mark.parametrize("model_type", ALL_ARCHITECTURE_TYPES)
def test_every_architecture_is_classified_without_leftovers(tmp_path, model_type):
    """Every stored tensor falls in a named module type; the counts agree with the model (persistent buffers
    such as a routing correction bias are stored, so they count), and the config's shape is what the tensors say."""
    model = tiny_model_of(model_type)
    facts = analyze_checkpoint(saved(model, tmp_path / "model"))
    assert facts["parameters"]["total"] == count_parameters(model)
    assert facts["parameters"]["other"] == 0 and facts["notes"] == []
    assert facts["experts_per_moe_layer"] == [8] and facts["top_k"] == [2]
    assert facts["hidden_size"] == 32 and facts["vocab_size"] == 300 and facts["attention_heads"] == [4]
    assert facts["parameters"]["routed_experts"] > 0 and facts["parameters"]["router"] > 0


def test_qwen3_moe_counts_by_module_type(tmp_path):
    model = tiny_model_of("qwen3_moe")
    config = model.config
    facts = analyze_checkpoint(saved(model, tmp_path / "model"))
    hidden, width, experts, layers = config.hidden_size, config.moe_intermediate_size, config.num_experts, 3
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    moe_layers = [layer for layer in range(layers) if layer not in config.mlp_only_layers]
    assert facts["moe_layers"] == moe_layers == [0, 2] and facts["dense_layers"] == [1]
    expected = {
        "embeddings": config.vocab_size * hidden,
        "lm_head": config.vocab_size * hidden,
        "attention": layers * (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim),  # q, o; k, v
        "router": len(moe_layers) * experts * hidden,
        "routed_experts": len(moe_layers) * experts * (2 * width * hidden + hidden * width),
        "shared_experts": 0,
        "dense_mlp": (layers - len(moe_layers)) * 3 * config.intermediate_size * hidden,
        "norms": layers * (2 * hidden + 2 * head_dim) + hidden,  # input/post-attention, q/k norms; the final norm
        "other": 0,
    }
    assert {kind: facts["parameters"][kind] for kind in MODULE_TYPES} == expected
    assert facts["parameters"]["total"] == sum(expected.values()) == model.num_parameters()
    assert (facts["attention_heads"], facts["key_value_heads"], facts["head_dim"]) == ([heads], [kv_heads], [head_dim])
    assert facts["expert_width"] == [width] and facts["expert_format"] == ["dense"] and facts["experts_total"] == 16
    by_layer = {layer["layer"]: layer for layer in facts["layers"]}
    assert by_layer[1]["dense_mlp_width"] == config.intermediate_size and by_layer[0]["experts"] == experts
    assert by_layer[0]["parameters"]["routed_experts"] == experts * 3 * width * hidden


def test_qwen2_moe_shared_expert_counts(tmp_path):
    model = tiny_model_of("qwen2_moe")
    config = model.config
    facts = analyze_checkpoint(saved(model, tmp_path / "model"))
    hidden, shared_width = config.hidden_size, config.shared_expert_intermediate_size
    moe_layers = len(facts["moe_layers"])
    assert facts["moe_layers"] == [0, 2]
    # the shared expert's three projections and its sigmoid gate [1, hidden]
    assert facts["parameters"]["shared_experts"] == moe_layers * (3 * shared_width * hidden + hidden)
    routed_width = config.moe_intermediate_size
    assert facts["parameters"]["routed_experts"] == moe_layers * config.num_experts * 3 * routed_width * hidden
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    projections = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    biases = heads * head_dim + 2 * kv_heads * head_dim  # q, k, v
    assert facts["parameters"]["attention"] == 3 * (projections + biases)
    assert facts["shared_experts"] and {layer["shared_expert_width"] for layer in facts["layers"]
                                        if layer["kind"] == "moe"} == {shared_width}
    assert facts["parameters"]["total"] == model.num_parameters()


def test_gpt_oss_counts_biases_and_sinks(tmp_path):
    model = tiny_model_of("gpt_oss")
    config = model.config
    facts = analyze_checkpoint(saved(model, tmp_path / "model"))
    hidden, width, experts, layers = config.hidden_size, config.intermediate_size, config.num_local_experts, 3
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    assert facts["moe_layers"] == [0, 1, 2]
    # gate_up [E, H, 2I] + bias [E, 2I], down [E, I, H] + bias [E, H]
    assert facts["parameters"]["routed_experts"] == layers * experts * (hidden * 2 * width + 2 * width + width * hidden
                                                                        + hidden)
    assert facts["parameters"]["router"] == layers * (experts * hidden + experts)  # weight and bias
    attention = (hidden * heads * head_dim + heads * head_dim + 2 * (hidden * kv_heads * head_dim + kv_heads * head_dim)
                 + heads * head_dim * hidden + hidden + heads)  # q, k, v with biases, o with bias, a sink per head
    assert facts["parameters"]["attention"] == layers * attention
    assert facts["expert_width"] == [width] and facts["parameters"]["total"] == model.num_parameters()


@pytest.fixture
def stats(tmp_path, tiny_model, token_batch):
    build_cache(tiny_model, token_batch, 6, tmp_path / "cache")
    return expert_frequency(read_router_cache(tmp_path / "cache"))


def test_pruned_checkpoint_reports_its_experts_per_layer(tmp_path, tiny_model, tokenizer, stats):
    step = {"method": "frequency_prune", "min_count": non_uniform_min_count(stats)}
    reports = apply_steps(tiny_model, [step], CompressionContext.for_model(tiny_model, stats))
    assert len(set(reports[0]["kept_per_layer"].values())) > 1, "fixture should give a non-uniform pruning"
    record = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", {"variant": "pruned"})
    facts = analyze_checkpoint(tmp_path / "ckpt", "pruned")
    assert record["loader"] == facts["loader"] == "remote_code"
    per_layer = {str(layer["layer"]): layer["experts"] for layer in facts["layers"] if layer["kind"] == "moe"}
    assert per_layer == reports[0]["kept_per_layer"] == record["experts_per_layer"]
    assert facts["experts_total"] == record["experts_total"] and facts["notes"] == []
    assert facts["experts_per_moe_layer"] == sorted(set(per_layer.values()))
    config = tiny_model.config
    assert facts["parameters"]["routed_experts"] == sum(per_layer.values()) * 3 * config.moe_intermediate_size * 32
    assert facts["parameters"]["router"] == sum(per_layer.values()) * 32
    assert facts["parameters"]["total"] == record["parameters"] == saved_tensor_count(tmp_path / "ckpt")


def test_low_rank_and_dynamic_skip_checkpoints(tmp_path, tokenizer):
    model = tiny_model_of("qwen3_moe")
    steps = [validated_step("svd_experts", rank=4, share_basis=True), validated_step("dynamic_skip", beta=0.3)]
    reports = apply_steps(model, steps, context_with_inputs(model))
    record = save_checkpoint(model, tokenizer, tmp_path / "ckpt", {"steps": steps, "step_reports": reports})
    facts = analyze_checkpoint(tmp_path / "ckpt")
    assert facts["expert_format"] == ["low_rank"] and facts["dynamic_skip"] and facts["expert_width"] == [16]
    layer = next(layer for layer in facts["layers"] if layer["kind"] == "moe")
    assert {matrix: spec["rank"] for matrix, spec in layer["low_rank"].items()} == {"gate_up_proj": 4, "down_proj": 4}
    assert layer["dynamic_skip"] == {"beta": 0.3, "renormalize": True} and layer["top_k"] == 2
    assert 1 <= layer["active_experts_measured"] <= 2
    # factors [8, 2I, r] + [1, r, H] and [1, H, r] + [8, r, I] per MoE layer
    assert facts["parameters"]["routed_experts"] == 2 * (8 * 32 * 4 + 4 * 32 + 32 * 4 + 8 * 4 * 16)
    assert facts["parameters"]["total"] == record["parameters"]
    assert "low-rank (rank 4)" in to_markdown({"models": [facts]})


def test_sharded_checkpoint_gives_the_same_counts(tmp_path):
    model = tiny_model_of("qwen2_moe")
    single = analyze_checkpoint(saved(model, tmp_path / "single"))
    saved(model, tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = analyze_checkpoint(tmp_path / "sharded")
    assert len(sharded["files"]) > 1
    assert without_location(sharded) == without_location(single)


def test_dense_decoder_has_no_experts(tmp_path):
    if "qwen3" not in ARCHITECTURES:
        pytest.skip("the adapter table has no dense decoders yet")
    model = tiny_model_of("qwen3")
    facts = analyze_checkpoint(saved(model, tmp_path / "model"))
    config = model.config
    assert facts["moe_layers"] == [] and facts["dense_layers"] == [0, 1, 2] and facts["experts_total"] == 0
    assert facts["experts_per_moe_layer"] == [] and facts["top_k"] == []
    assert facts["parameters"]["dense_mlp"] == 3 * 3 * config.intermediate_size * config.hidden_size
    assert facts["parameters"]["routed_experts"] == facts["parameters"]["router"] == 0
    assert facts["parameters"]["total"] == model.num_parameters() and facts["attention_heads"] == [4]
    assert "0 MoE, 3 dense" in to_markdown({"models": [facts]})


def test_heads_come_from_the_tensors_when_the_config_misleads(tmp_path):
    """A config whose head counts do not match its projections (as a head-pruning step that forgot the
    config would leave): the tensors are reported, the difference is noted."""
    path = saved(tiny_model_of("qwen3_moe"), tmp_path / "model")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "num_attention_heads": 8, "num_key_value_heads": 4}))
    facts = analyze_checkpoint(path)
    assert facts["attention_heads"] == [4] and facts["key_value_heads"] == [2]
    assert any("4 attention heads in the tensors, 8 in config.json" in note for note in facts["notes"])


def test_bad_input_names_the_file(tmp_path):
    model = tiny_model_of("qwen3_moe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty.*no config\.json"):
        analyze_checkpoint(tmp_path / "empty")
    sharded = saved(model, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ModelError, match=rf"missing \({shards[1].name}\)"):
        analyze_checkpoint(sharded)
    truncated = saved(model, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"truncated/model\.safetensors: tensor .* beyond the end of the file"):
        analyze_checkpoint(truncated)
    (truncated / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"truncated/model\.safetensors: not a readable safetensors file"):
        analyze_checkpoint(truncated)


def test_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    sharded = saved(tiny_model_of("qwen3_moe"), tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(file for file in sorted(set(index["weight_map"].values())) if file != shard)
    index["weight_map"][name] = other
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=rf"names tensor '{name}' in .*{other}, which does not hold it"):
        analyze_checkpoint(sharded)


def test_the_files_are_deterministic_with_one_row_per_model(tmp_path, tokenizer):
    base = tiny_model_of("qwen3_moe")
    save_checkpoint(base, tokenizer, tmp_path / "source", {})
    pruned = tiny_model_of("qwen3_moe")
    apply_steps(pruned, [validated_step("random_prune", keep=5)], context_with_inputs(pruned))
    save_checkpoint(pruned, tokenizer, tmp_path / "random5", {})
    written = []
    for run in ("a", "b"):
        analysis = analyze_models({"base": tmp_path / "source", "random5": tmp_path / "random5"},
                                  source=tmp_path / "source")
        write_analysis(analysis, tmp_path / run / "model.json", tmp_path / run / "model.md")
        written.append([(tmp_path / run / name).read_bytes() for name in ("model.json", "model.md")])
    assert written[0] == written[1]
    assert not list(tmp_path.glob("*/.*.tmp"))  # no temporaries left
    analysis = json.loads(written[0][0])
    assert [(model["name"], model["role"]) for model in analysis["models"]] == [
        ("source", "source"), ("base", "variant"), ("random5", "variant")]
    assert analysis["models"][2]["experts_per_moe_layer"] == [5]
    markdown = written[0][1].decode()
    summary = markdown.split("\n## ")[0]
    assert [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")][1:] == [
        "source (source)", "base", "random5"]
    assert "## Per layer" in markdown and "### random5" in markdown


def test_cli_analyze(tmp_path, capsys):
    path = saved(tiny_model_of("qwen3_moe"), tmp_path / "model")
    assert main(["analyze", str(path), "--json"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert analysis["models"][0]["name"] == "model" and analysis["models"][0]["parameters"]["total"] == 59920
    assert main(["analyze", str(path)]) == 0
    assert capsys.readouterr().out.startswith("# Model structure")
    assert main(["analyze", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_analyze_is_in_the_default_target_and_the_workflow_lints_clean(tmp_path):
    # the lint (of the repository's workflow) runs beside the dry run: two processes, one core each
    lint = subprocess.Popen([str(SNAKEMAKE), "--lint"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        result = snakemake(tmp_path, write_config(tmp_path / "config.yaml", copy.deepcopy(TINY)), "-n")
    finally:
        lint_output, _ = lint.communicate(timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    assert ("analyze", "") in jobs and ("all", "") in jobs
    assert "output: results/analysis/model.json, results/analysis/model.md" in result.stdout
    assert lint.returncode == 0 and "Congratulations" in lint_output, lint_output


def test_saved_tensor_count_matches_the_headers(tmp_path):
    """The header reader against safetensors' own reader: every tensor's shape and dtype."""
    from moe_compress.analysis import checkpoint_tensors

    path = saved(tiny_model_of("gpt_oss"), tmp_path / "model")
    tensors = checkpoint_tensors(path)
    with safe_open(path / "model.safetensors", "pt") as handle:
        assert sorted(handle.keys()) == sorted(tensors)
        for name in handle.keys():
            assert handle.get_slice(name).get_shape() == tensors[name]["shape"]
            assert handle.get_slice(name).get_dtype() == tensors[name]["dtype"]
