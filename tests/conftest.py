"""Fixtures: tiny random MoE models built from their config class, in seconds; no hub, no shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts.",
    "Pruning rarely used experts makes the model smaller.",
    "Calibration data decides which experts are rarely used.",
] * 8


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_qwen3_moe(seed: int = 0, num_experts: int = 8, top_k: int = 2, vocab_size: int = 300):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                            mlp_only_layers=[1])  # a dense layer in the middle: not every layer is MoE
    model = AutoModelForCausalLM.from_config(config).eval()
    # random init leaves routers at zero in transformers 5: give them real preferences
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    return model


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return tiny_qwen3_moe()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, tokenizer) -> Path:
    path = tmp_path / "tiny_model"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 300, (6, 24), generator=generator)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "url": "x"}) + "\n" for text in texts))
    return path
