"""Fixtures built on tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import DEVICES, make_tokenizer, tiny_qwen3_moe

# `make test-fast` runs the tests parametrised over the architectures on this one; `make test` on all
FAST_ARCHITECTURE = "qwen3_moe"


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("model_type", FAST_ARCHITECTURE) != FAST_ARCHITECTURE:
            item.add_marker(pytest.mark.other_architectures)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


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


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache under tmp_path/hf_home, with the hub client switched off."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the client read these at import; point them at this cache for the test
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home
