"""The embedded demo model: trains on a tiny corpus, saves a loadable HF directory, deterministically. The demo's
config (one variant of every family) and the full study's (every variant of the dated figures), which shares its
results."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import REPO
from moe_compress import demo
from moe_compress.architectures import adapter_for
from moe_compress.config import load_config
from moe_compress.errors import DataError
from moe_compress.evaluate.perplexity import next_token_loss

TINY = demo.DemoSettings(
    num_layers=2,
    hidden_size=32,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    seq_len=32,
    batch_size=4,
    steps=5,
    heldout_docs=10,
    learning_rate=3e-3,
)
THREADS = 1

WORDS = "the a cat dog bird sat ran flew on under over mat tree house red small big quickly slowly and".split()


def _write_corpus(path, num_docs=60):
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(num_docs):
            sentences = [" ".join(rng.choices(WORDS, k=rng.randint(5, 9))).capitalize() + "." for _ in range(6)]
            handle.write(json.dumps({"text": f"Document {index}. " + " ".join(sentences)}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "model"
    metrics = demo.build_demo_model(corpus, out_dir, TINY, threads=THREADS)
    return out_dir, metrics


def test_output_loads_offline_and_gives_finite_logits(built, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out_dir, _ = built
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert model.config.model_type == "qwen3_moe"
    assert model.config.num_experts == TINY.num_experts and model.config.num_experts_per_tok == TINY.top_k
    assert model.config.output_router_logits is False
    # per-layer jobs are planned before the model exists, from its settings alone
    assert sorted(adapter_for(model.config).moe_blocks(model)) == demo.demo_moe_layers(TINY.num_layers)
    assert tokenizer.eos_token == demo.EOS_TOKEN
    assert tokenizer.eos_token_id == model.config.eos_token_id
    text = "The small cat sat on the mat, quickly! Ünïcödé too."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text  # byte level: lossless, no unknowns
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_metrics_file_has_the_keys(built):
    out_dir, metrics = built
    saved = json.loads((out_dir / demo.METRICS_FILE).read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("steps", "seconds", "final_train_loss", "heldout_perplexity", "unigram_heldout_perplexity",
                "expert_selection_frequency", "hyperparameters"):
        assert key in saved
    assert saved["steps"] == TINY.steps
    assert math.isfinite(saved["heldout_perplexity"]) and math.isfinite(saved["unigram_heldout_perplexity"])
    frequency = np.array(saved["expert_selection_frequency"])
    assert frequency.shape == (TINY.num_layers, TINY.num_experts)
    # each token picks top_k experts in every layer
    np.testing.assert_allclose(frequency.sum(axis=1), TINY.top_k)


def test_metrics_record_every_setting(built, corpus):
    out_dir, _ = built
    recorded = json.loads((out_dir / demo.METRICS_FILE).read_text())["hyperparameters"]
    settings = json.loads(json.dumps(dataclasses.asdict(TINY)))
    assert {name: recorded[name] for name in settings} == settings
    assert recorded.keys() - settings.keys() == {"corpus_path", "threads", "warmup_steps"}
    assert recorded["corpus_path"] == str(corpus)
    assert recorded["threads"] == THREADS
    assert recorded["warmup_steps"] == TINY.warmup_steps == 1
    # the keys that readers of training_metrics.json know
    assert set(recorded) == {
        "corpus_path", "text_field", "heldout_docs", "documents", "seed", "num_layers", "hidden_size", "num_experts", "top_k",
        "moe_intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "seq_len",
        "batch_size", "steps", "learning_rate", "router_aux_loss_coef", "threads", "warmup_steps",
        "min_lr_fraction", "weight_decay", "adam_betas", "grad_clip", "tie_word_embeddings",
    }


@pytest.mark.parametrize(
    "setting, value",
    [("top_k", 0), ("top_k", 9), ("num_key_value_heads", 3), ("hidden_size", 30), ("vocab_size", 256),
     ("seq_len", 1), ("steps", 0), ("batch_size", 0)],
)
def test_settings_reject_a_bad_value_naming_it(setting, value):
    with pytest.raises(DataError, match=f"{setting}={value}"):
        dataclasses.replace(TINY, **{setting: value})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.steps = 10


def test_next_token_loss_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    ids = torch.randint(0, 7, (2, 5), generator=generator)
    log_probs = torch.log_softmax(logits, dim=-1)
    # position t predicts token t+1
    expected = -torch.stack([log_probs[b, t, ids[b, t + 1]] for b in range(2) for t in range(4)])
    torch.testing.assert_close(next_token_loss(logits, ids, reduction="none"), expected)
    torch.testing.assert_close(next_token_loss(logits, ids), expected.mean())
    torch.testing.assert_close(next_token_loss(logits, ids, reduction="sum"), expected.sum())
    # half-precision logits are scored in float32
    assert next_token_loss(logits.bfloat16(), ids).dtype == torch.float32


def test_same_seed_is_bitwise_identical(corpus, tmp_path):
    for name in ("a", "b"):
        demo.build_demo_model(corpus, tmp_path / name, TINY, threads=THREADS)
    for filename in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / filename).read_bytes() == (tmp_path / "b" / filename).read_bytes(), filename
    demo.build_demo_model(corpus, tmp_path / "c", dataclasses.replace(TINY, seed=1), threads=THREADS)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_heldout_documents_are_never_trained_on(corpus, tmp_path, monkeypatch):
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    heldout = docs[-TINY.heldout_docs :]
    seen = {}
    real_train_tokenizer, real_batches = demo.train_tokenizer, demo._batches

    def spy_train_tokenizer(texts, vocab_size):
        seen["tokenizer_texts"] = list(texts)
        seen["tokenizer"] = real_train_tokenizer(texts, vocab_size)
        return seen["tokenizer"]

    def spy_batches(stream, *args):
        seen["training_stream"] = stream.copy()
        return real_batches(stream, *args)

    monkeypatch.setattr(demo, "train_tokenizer", spy_train_tokenizer)
    monkeypatch.setattr(demo, "_batches", spy_batches)
    demo.build_demo_model(corpus, tmp_path / "model", TINY, threads=THREADS)

    assert seen["tokenizer_texts"] == docs[: -TINY.heldout_docs]
    assert not set(heldout) & set(seen["tokenizer_texts"])
    # the model trains on exactly the training documents' tokens
    expected = demo.token_stream(seen["tokenizer"], docs[: -TINY.heldout_docs])
    np.testing.assert_array_equal(seen["training_stream"], expected)


def test_training_loss_decreases(corpus, tmp_path):
    settings = dataclasses.replace(TINY, steps=80, batch_size=8)
    metrics = demo.build_demo_model(corpus, tmp_path / "model", settings, threads=THREADS)
    curve = metrics["train_loss_curve"]
    assert len(curve) == 80
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 1.0
    # it learnt more than token frequencies
    assert metrics["heldout_perplexity"] < metrics["unigram_heldout_perplexity"]


def test_unigram_perplexity_matches_the_definition():
    train = np.array([0, 1, 1, 2, 2, 2])
    held = np.array([2, 1, 3])
    vocab = 4
    probs = [(np.sum(train == token) + 1) / (len(train) + vocab) for token in held]
    expected = math.exp(-np.mean(np.log(probs)))
    assert demo.unigram_perplexity(train, held, vocab) == pytest.approx(expected)


def test_too_small_corpus_is_a_data_error(tmp_path):
    corpus = _write_corpus(tmp_path / "small.jsonl", num_docs=12)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with pytest.raises(DataError, match="too few"):
        demo.build_demo_model(corpus, tmp_path / "model", dataclasses.replace(TINY, batch_size=64), threads=THREADS)
    with pytest.raises(DataError, match="heldout_docs"):
        demo.build_demo_model(corpus, tmp_path / "model", dataclasses.replace(TINY, heldout_docs=12), threads=THREADS)
    assert not (tmp_path / "model").exists()
    # a failed build leaves torch's settings as it found them
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)


# ------------------------------------------------------------------------------------ the demo and the study

DEMO_CONFIG = REPO / "config" / "config.yaml"
STUDY_CONFIG = REPO / "config" / "studies" / "demo-full.yaml"
# the sections the demo model, the calibration sample, the router cache, the statistics, the checkpoints and
# their perplexity and speed depend on: equal in both files, so the study reuses what the demo computed
SHARED_SECTIONS = ("model", "demo_model", "calibration", "cache", "compress", "perplexity", "speed", "score")
LM_EVAL_SETTINGS = ("source", "data_dir", "num_fewshot", "limit", "batch_size", "backend", "seed")
MITIGATIONS = {"output_rescale", "renormalize"}
DENSE_SIDE = {"prune_heads", "reduce_hidden", "drop_layers"}


def _methods(variant: dict) -> list[str]:
    return [step["method"] for step in variant["steps"]]


def test_the_demo_config_shows_one_variant_of_every_family():
    config = load_config(DEMO_CONFIG)
    variants = config["variants"]
    families = {
        "threshold pruning": [name for name, variant in variants.items()
                              if _methods(variant) == ["frequency_prune"] and not variant["steps"][0]["uniform"]],
        "REAP with a global target": [name for name, variant in variants.items() if _methods(variant) == ["reap_prune"]
                                      and "target" in variant["steps"][0]
                                      and variant["steps"][0]["allocation"] == "global"],
        "merge": [name for name, variant in variants.items() if "hc_merge" in _methods(variant)],
        "low rank": [name for name, variant in variants.items()
                     if {"svd_experts", "ksvd_experts"} & set(_methods(variant))],
        "fewer active experts with a mitigation": [
            name for name, variant in variants.items()
            if {"active_experts", "dynamic_skip"} & set(_methods(variant)) and MITIGATIONS & set(_methods(variant))],
        "dense-side cut": [name for name, variant in variants.items() if DENSE_SIDE & set(_methods(variant))],
    }
    assert all(families.values()), {family: names for family, names in families.items() if not names}
    assert variants["base"] == {"steps": []} and config["score"]["reference"] == "base"
    # lm-eval on a few variants, the reference among them
    benchmarked = config["evaluation"]["variants"]
    assert config["evaluation"]["tasks"] and "base" in benchmarked and 2 < len(benchmarked) < len(variants)


def test_the_study_holds_the_demo_so_it_reuses_the_demos_results():
    """`make study` after `make demo` (one results/) reruns none of the demo's jobs but the lm-eval tasks it adds:
    the same model, data and settings, and every demo variant with the same steps under the same name."""
    demo_config, study = load_config(DEMO_CONFIG), load_config(STUDY_CONFIG)
    for section in SHARED_SECTIONS:
        assert demo_config[section] == study[section], section
    for name, variant in demo_config["variants"].items():
        assert name in study["variants"], name
        assert variant["steps"] == study["variants"][name]["steps"], name
    demo_eval, study_eval = demo_config["evaluation"], study["evaluation"]
    assert {key: demo_eval[key] for key in LM_EVAL_SETTINGS} == {key: study_eval[key] for key in LM_EVAL_SETTINGS}
    assert set(demo_eval["tasks"]) <= set(study_eval["tasks"])
    assert set(demo_eval["variants"]) <= set(study_eval["variants"])


def test_the_study_has_every_variant_of_the_dated_demo_figures():
    """The dated figure pages stay reproducible: each variant in their tables is a variant of the study."""
    study = load_config(STUDY_CONFIG)["variants"]
    figures = (REPO / "docs" / "2026-11-30-demo-figures.md").read_text()
    named, in_table = [], False
    for line in figures.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| variant |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not set(cells[0]) <= set("-"):
            named.append(cells[0])
    assert len(named) > 30
    assert [name for name in named if name not in study] == []


def test_the_planner_budget_of_the_demo_matches_its_model_built_on_the_meta_device():
    """The planner reads the demo's experts, top-k floors and model type from its settings, without building
    the model: they must be what the model built from those settings has."""
    from transformers import Qwen3MoeForCausalLM

    from moe_compress.config import load_config
    from moe_compress.demo import DEMO_MODEL_TYPE, DemoSettings, model_config
    from moe_compress.methods.allocation import expert_budget
    from moe_compress.plan import WorkflowPlan

    config = load_config(REPO / "config/config.yaml")
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(model_config(DemoSettings(**config["demo_model"]), tokenizer=None))
    built = expert_budget(model)
    planned, exact = WorkflowPlan.from_config(config).expert_budget
    assert not exact  # its parameter count waits for the trained tokenizer
    assert (planned.count, planned.floor) == (built.count, built.floor)
    assert model.config.model_type == DEMO_MODEL_TYPE
