"""The ``moe-compress`` command: docs/architectures.md's table is its output, and ``inspect`` reads a
checkpoint's structure without its weights."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from helpers import REPO, make_tokenizer, tiny_model_of
from moe_compress.architectures import ARCHITECTURES, REFUSED
from moe_compress.cli import (
    ARCHITECTURES_END,
    ARCHITECTURES_PAGE,
    ARCHITECTURES_START,
    architectures_table,
    describe_checkpoint,
    main,
    step_support,
)
from moe_compress.methods import CompressionContext
from moe_compress.methods.expert_selection import prune_experts
from moe_compress.methods.registry import methods
from moe_compress.modelio import save_checkpoint


def test_the_architectures_page_table_is_generated_from_the_adapter_table():
    page = (REPO / ARCHITECTURES_PAGE).read_text()
    block = page.split(ARCHITECTURES_START, 1)[1].split(ARCHITECTURES_END, 1)[0].strip("\n")
    assert block == architectures_table(), f"run `moe-compress architectures --write {ARCHITECTURES_PAGE}`"
    for model_type in list(ARCHITECTURES) + list(REFUSED):
        assert f"| `{model_type}` |" in block


def test_inspect_reads_the_structure_without_the_weights(tmp_path):
    model = tiny_model_of("deepseek_v3")
    model.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    # the weights are unreadable: the facts must come from config.json and a meta-device skeleton
    (tmp_path / "model/model.safetensors").write_bytes(b"not a safetensors file")
    facts = describe_checkpoint(tmp_path / "model")
    assert facts["model_type"] == "deepseek_v3" and facts["moe_layers"] == [1, 2] and facts["dense_layers"] == [0]
    assert facts["experts_per_layer"] == {"1": 8, "2": 8} and facts["top_k"] == 2
    assert facts["scoring"] == "sigmoid_topk" and facts["expert_groups"] == 2 and facts["routed_scaling"] == 2.5
    assert facts["shared_modules"] == ["shared_experts"] and facts["loader"] == "stock"
    assert "gate.e_score_correction_bias" in facts["steps"]["hc_merge"]


def test_inspect_sees_per_layer_counts_of_a_compressed_checkpoint(tmp_path, capsys):
    model = tiny_model_of("phimoe")
    keep = {0: torch.arange(3), 1: torch.arange(5), 2: torch.arange(8)}
    prune_experts(model, keep, CompressionContext.for_model(model))
    save_checkpoint(model, make_tokenizer(), tmp_path / "ckpt", {})
    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["experts_per_layer"] == {"0": 3, "1": 5, "2": 8} and facts["loader"] == "remote_code"
    assert facts["compressed_by_moe_compress"] and facts["steps"]["active_experts"].startswith("refused")


def test_inspect_refuses_an_unsupported_checkpoint_in_one_line(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text(json.dumps({"model_type": "dbrx"}))
    result = subprocess.run([sys.executable, "-m", "moe_compress.cli", "inspect", str(tmp_path / "model")],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "dbrx" in message[0] and "not supported" in message[0], result.stderr


def test_inspect_lists_every_registered_method():
    """`inspect`'s step lines come from the Method records: a new method appears without touching the command."""
    moe = next(adapter for adapter in ARCHITECTURES.values() if adapter.moe)
    dense = next(adapter for adapter in ARCHITECTURES.values() if not adapter.moe)

    def listed(support):
        return {name for names in support for name in names.split(" / ")}

    assert listed(step_support(moe)) == set(methods())
    any_decoder = {name for name, record in methods().items() if record.any_decoder}
    assert listed(step_support(dense)) == any_decoder | {"every other step"}
    assert step_support(dense)["every other step"].startswith("refused")
