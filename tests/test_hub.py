"""Hub downloads: into HF_HOME on the submit host, read from the cache offline elsewhere; clear errors."""

from __future__ import annotations

import gzip
import json
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import C4_SAMPLE, C4_SHARD, put_c4_in_hub_cache, put_in_hub_cache, put_model_in_hub_cache
from moe_compress.calibration import read_documents
from moe_compress.errors import DataError, ModelError
from moe_compress.hub import (
    OFFLINE_ENVIRONMENT,
    configure_hub_environment,
    fetch_c4_documents,
    fetch_dataset_documents,
    fetch_model_config,
    fetch_model_snapshot,
    hub_sources,
    is_hub_id,
    resolve_hf_home,
)


def test_hf_home_comes_from_the_config_then_the_environment_then_the_default(tmp_path):
    assert resolve_hf_home(str(tmp_path / "cfg"), {"HF_HOME": "/elsewhere"}) == str(tmp_path / "cfg")
    assert resolve_hf_home(None, {"HF_HOME": str(tmp_path / "env")}) == str(tmp_path / "env")
    assert resolve_hf_home(None, {"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "huggingface")


def test_hub_sources_name_the_keys_that_need_the_network(tmp_path):
    config = {"model": {"path": "demo"}, "calibration": {"source": "local"}, "evaluation": {"source": "bundled", "tasks": ["mmlu"]}}
    assert hub_sources(config) == []
    config["model"]["path"] = str(tmp_path)  # a local directory that happens to look like a path
    assert not is_hub_id(str(tmp_path)) and hub_sources(config) == []
    config["model"]["path"] = "Qwen/Qwen3-30B-A3B"
    config["calibration"]["source"] = "hub"
    config["evaluation"]["source"] = "hub"
    assert hub_sources(config) == ["model.path", "calibration.source", "evaluation.source"]
    config["evaluation"]["tasks"] = []  # no benchmarks: nothing to fetch for them
    assert hub_sources(config) == ["model.path", "calibration.source"]


def test_hub_sources_name_each_calibration_source_read_from_a_hub_dataset(tmp_path):
    sources = [{"name": "c4", "path": str(tmp_path / "c4.jsonl.gz")},
               {"name": "math", "hub": {"id": "openai/gsm8k", "config": "main", "split": "train", "docs": 500}},
               {"name": "code", "path": str(tmp_path / "mbpp.jsonl.gz")},
               {"name": "ko", "hub": {"id": "org/korean", "config": None, "split": "train", "docs": 200}}]
    config = {"model": {"path": "demo"}, "calibration": {"source": "local", "sources": sources},
              "evaluation": {"source": "bundled", "tasks": []}}
    assert hub_sources(config) == ["calibration.sources[1].hub", "calibration.sources[3].hub"]
    config["calibration"]["sources"] = sources[::2]  # local files only: the run stays offline
    assert hub_sources(config) == []
    config["calibration"]["sources"] = None
    assert hub_sources(config) == []


def test_jobs_are_offline_on_cluster_nodes_and_for_configs_without_a_hub_source(tmp_path):
    local = {"model": {"path": "demo"}, "calibration": {"source": "local"},
             "evaluation": {"source": "bundled", "tasks": []}, "hf_home": str(tmp_path)}
    hub = {**local, "calibration": {"source": "hub"}}
    for config, remote, offline in [(local, False, True), (local, True, True), (hub, False, False), (hub, True, True)]:
        environ = {}
        configure_hub_environment(config, remote_job=remote, environ=environ)
        assert environ["HF_HOME"] == str(tmp_path)
        assert all(environ.get(key) == "1" for key in OFFLINE_ENVIRONMENT) is offline, (config, remote)


def test_c4_documents_come_from_the_cached_shard_offline_and_reproducibly(offline_hub, tmp_path):
    put_c4_in_hub_cache(offline_hub)
    first, second = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert fetch_c4_documents(C4_SHARD, 120, first) == 120
    fetch_c4_documents(C4_SHARD, 120, second)
    assert first.read_bytes() == second.read_bytes()  # no gzip timestamp: the same bytes every run
    assert read_documents(first) == read_documents(C4_SAMPLE)[:120]
    with gzip.open(first, "rt") as handle:  # whole records, as in the shard
        assert set(json.loads(handle.readline())) >= {"text", "url", "timestamp"}


def test_c4_errors_name_the_key(offline_hub, tmp_path):
    with pytest.raises(ModelError, match=r"calibration.hub_file.*not in the hub cache.*offline"):
        fetch_c4_documents(C4_SHARD, 10, tmp_path / "out.jsonl.gz")
    put_c4_in_hub_cache(offline_hub)
    with pytest.raises(DataError, match=r"calibration.hub_docs=5000.*only 1000 documents"):
        fetch_c4_documents(C4_SHARD, 5000, tmp_path / "out.jsonl.gz")
    with pytest.raises(DataError, match=r"no field 'body'.*calibration.text_field"):
        fetch_c4_documents(C4_SHARD, 10, tmp_path / "out.jsonl.gz", text_field="body")
    assert not (tmp_path / "out.jsonl.gz").exists()


KEY = "calibration.sources[1].hub"
QA_RECORDS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5", "id": 1},
    {"question": "", "answer": "", "id": 2},  # all kept fields empty: skipped
    {"question": "대한민국의 수도는?", "answer": "서울", "id": 3},
    {"question": "  ", "answer": None, "id": 4},  # blank and null: skipped too
    {"question": "Only a question", "answer": "", "id": 5},
    {"question": "Q6", "answer": "A6", "id": 6},
]


@pytest.fixture
def offline_datasets(offline_hub, monkeypatch):
    """The offline hub cache, datasets switched off the hub as well, and no socket may connect: these tests
    read local folders, and a dataset missing from the cache must fail without a try at the network."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", offline_hub / "datasets")

    def no_network(self, *args, **kwargs):
        raise AssertionError(f"a test reached for the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return offline_hub


def local_dataset(folder, records):
    """A folder with one JSON-lines data file: what datasets.load_dataset reads as its train split."""
    folder.mkdir(parents=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                                       encoding="utf-8")
    return str(folder)


def test_dataset_records_are_cut_to_their_fields_and_written_reproducibly(offline_datasets, tmp_path):
    dataset = local_dataset(tmp_path / "qa", QA_RECORDS)
    first, second = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert fetch_dataset_documents(dataset, None, "train", ["question", "answer"], 3, first, KEY) == 3
    expected = [{"question": QA_RECORDS[i]["question"], "answer": QA_RECORDS[i]["answer"]} for i in (0, 2, 4)]
    assert gzip.decompress(first.read_bytes()).decode("utf-8") == \
        "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in expected)
    fetch_dataset_documents(dataset, None, "train", ["question", "answer"], 3, second, KEY)
    assert first.read_bytes() == second.read_bytes()  # no gzip timestamp nor file name: the same bytes every run
    header = first.read_bytes()[:10]
    assert header[3] == 0 and header[4:8] == bytes(4)  # no FNAME flag, mtime 0
    # the fields in the order asked for; one field alone
    assert fetch_dataset_documents(dataset, None, "train", ["answer", "question"], 4, first, KEY) == 4
    with gzip.open(first, "rt", encoding="utf-8") as handle:
        assert [list(json.loads(line)) for line in handle] == [["answer", "question"]] * 4
    assert fetch_dataset_documents(dataset, None, "train", ["answer"], 3, first, KEY) == 3
    with gzip.open(first, "rt", encoding="utf-8") as handle:
        assert [json.loads(line)["answer"] for line in handle] == [QA_RECORDS[i]["answer"] for i in (0, 2, 5)]


def test_dataset_errors_name_the_key(offline_datasets, tmp_path):
    dataset = local_dataset(tmp_path / "qa", QA_RECORDS)
    out = tmp_path / "out.jsonl.gz"
    with pytest.raises(DataError, match=r"calibration\.sources\[1\]\.text_field: record 0 .*/qa' "
                                        r"\(split 'train'\) has no field 'solution'; its fields are 'question', "
                                        r"'answer', 'id'"):
        fetch_dataset_documents(dataset, None, "train", ["question", "solution"], 3, out, KEY)
    with pytest.raises(DataError, match=r"calibration\.sources\[1\]\.hub\.docs=10, but .* has only 4 records"):
        fetch_dataset_documents(dataset, None, "train", ["question", "answer"], 10, out, KEY)
    with pytest.raises(DataError, match=r"calibration\.sources\[1\]\.hub\.split: .*Bad split: test"):
        fetch_dataset_documents(dataset, None, "test", ["question"], 1, out, KEY)
    with pytest.raises(DataError, match=r"calibration\.sources\[1\]\.hub\.config: .*BuilderConfig 'main' not found"):
        fetch_dataset_documents(dataset, "main", "train", ["question"], 1, out, KEY)
    with pytest.raises(ModelError, match=r"calibration\.sources\[1\]\.hub\.id: the dataset 'tiny-org/absent' is "
                                         r"not in the hub cache.*offline"):
        fetch_dataset_documents("tiny-org/absent", "main", "train", ["question"], 1, out, KEY)
    with pytest.raises(DataError, match=r"calibration\.sources\[1\]\.hub\.id: no such folder or file: .*/absent"):
        fetch_dataset_documents(str(tmp_path / "absent"), None, "train", ["question"], 1, out, KEY)
    assert not out.exists()


def test_model_snapshot_is_linked_from_the_cache_and_loads_the_same(offline_hub, tmp_path, tiny_model_dir, token_batch):
    put_model_in_hub_cache(offline_hub, "tiny-org/tiny-moe", tiny_model_dir)
    out = tmp_path / "models" / "tiny-org--tiny-moe"
    snapshot = fetch_model_snapshot("tiny-org/tiny-moe", out)
    assert snapshot.is_relative_to(offline_hub)
    linked = sorted(path.name for path in out.iterdir())
    assert linked == sorted(path.name for path in tiny_model_dir.iterdir())
    assert all(path.is_symlink() and path.resolve().is_relative_to(offline_hub) for path in out.iterdir())
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert torch.equal(ours(token_batch).logits, theirs(token_batch).logits)


def test_a_model_missing_from_the_offline_cache_says_what_to_do(offline_hub, tmp_path):
    with pytest.raises(ModelError, match=r"model.path: model 'tiny-org/absent'.*offline.*host with hub access"):
        fetch_model_snapshot("tiny-org/absent", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelError, match=r"model.path: the config of model 'tiny-org/absent'.*offline"):
        fetch_model_config("tiny-org/absent")


def test_per_layer_planning_reads_only_the_config_from_the_cache(offline_hub, tiny_model_dir):
    """Which layers are MoE comes from config.json alone (layer 1 of the tiny Qwen3-MoE is dense)."""
    from moe_compress.layerwise import skeleton_moe_layers

    put_in_hub_cache(offline_hub, "tiny-org/config-only", {"config.json": tiny_model_dir / "config.json"})
    assert skeleton_moe_layers(fetch_model_config("tiny-org/config-only")) == skeleton_moe_layers(tiny_model_dir) == [0, 2]
