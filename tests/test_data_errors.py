"""Bad data and model files are refused with one line that names the file (and the line, where there is one)
and says what to do; nothing silently wrong reaches calibration.parquet or the perplexity windows."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from helpers import C4_SAMPLE, TEXTS, make_tokenizer, tiny_config, tiny_model_of, write_jsonl
from moe_compress.calibration import (
    MAX_TOKEN_SHARE,
    read_documents,
    read_text,
    tokenize_contiguous,
    tokenize_into_samples,
)
from moe_compress.errors import DataError, ModelError
from moe_compress.modelio import check_model_dir
from moe_compress.streaming import LayerStream

GZIP_HEADER_BYTES = 10  # what gzip.compress writes before the deflate data (no file name)


# ---- a tokenizer that turns text into nothing, a sample set dominated by one token -------------------------

def test_a_model_without_tokenizer_files_blames_the_tokenizer_not_the_corpus(tmp_path):
    model_dir = tmp_path / "model"
    tiny_config("qwen3_moe").save_pretrained(model_dir)  # config.json, no tokenizer files
    # transformers still builds a tokenizer here: an empty vocabulary besides its special tokens, every text -> []
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"] == []

    corpus = str(tmp_path / "corpus.jsonl")
    with pytest.raises(DataError) as refused:
        tokenize_into_samples(tokenizer, TEXTS, num_samples=64, seq_len=128, seed=0, source=corpus)
    message = str(refused.value)
    assert f"from {model_dir}" in message
    assert f"turns {len(TEXTS)} non-empty documents of {corpus} into no tokens" in message
    assert "likely missing or broken; copy them from the original model" in message
    assert "larger corpus" not in message

    # the held-out perplexity text: documents joined with EOS, which is all such a tokenizer keeps
    with pytest.raises(DataError, match=r"turns the held-out documents \(\d+ characters\) into no tokens"):
        tokenize_contiguous(tokenizer, tokenizer.eos_token.join(TEXTS), seq_len=8, max_windows=None,
                            source="the held-out documents")


def test_samples_dominated_by_one_token_are_refused_naming_the_token_and_its_share(tmp_path):
    tokenizer = make_tokenizer()
    corpus = str(tmp_path / "dashes.jsonl")
    dash = tokenizer("-", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(DataError, match=rf"^{re.escape(corpus)}: token {dash} \('-'\) is [\d.]+% of the 1024 "
                                        r"tokens sampled .*; the text or the tokenizer \(.*vocabulary size 300\)"):
        tokenize_into_samples(tokenizer, ["-" * 400] * 10, num_samples=4, seq_len=256, seed=0, source=corpus)
    with pytest.raises(DataError, match=r"^wiki.txt: token \d+ \('-'\) is 100.0% of the 512 tokens sampled"):
        tokenize_contiguous(tokenizer, "-" * 600, seq_len=128, max_windows=None, source="wiki.txt")


def test_real_text_stays_far_below_the_one_token_limit():
    tokenizer = make_tokenizer()
    docs = read_documents(C4_SAMPLE)
    samples = tokenize_into_samples(tokenizer, docs[:-100], num_samples=64, seq_len=128, seed=0)
    heldout = tokenize_contiguous(tokenizer, tokenizer.eos_token.join(docs[-100:]), seq_len=128, max_windows=64)
    for ids in (samples, heldout):
        assert np.bincount(ids.ravel()).max() / ids.size < MAX_TOKEN_SHARE / 2


# ---- a truncated or corrupt gzip file ------------------------------------------------------------------------

def _gzip_bytes(text: str) -> bytes:
    return gzip.compress(text.encode(), mtime=0)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt(data: bytes) -> bytes:
    # a first deflate byte of 0xFF declares a block of the reserved type: always a decompression error
    return data[:GZIP_HEADER_BYTES] + b"\xff" * 8 + data[GZIP_HEADER_BYTES + 8:]


JSON_LINES = "".join(json.dumps({"text": f"document {i}: {text}"}) + "\n" for i, text in enumerate(TEXTS * 4))


@pytest.mark.parametrize("damage", [_truncated, _corrupt, lambda data: JSON_LINES.encode()],
                         ids=["truncated", "corrupt", "not-gzip"])
@pytest.mark.parametrize("name, text, read", [
    ("corpus.jsonl.gz", JSON_LINES, read_documents),
    ("corpus.json.gz", json.dumps([json.loads(line) for line in JSON_LINES.splitlines()]), read_documents),
    ("wiki.txt.gz", "\n".join(TEXTS * 20), read_text),
], ids=["jsonl.gz", "json.gz", "text.gz"])
def test_a_damaged_gzip_file_is_named(tmp_path, damage, name, text, read):
    path = tmp_path / name
    path.write_bytes(damage(_gzip_bytes(text)))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the gzip file is truncated or corrupt \(.+\); "
                                        "download or copy it again$"):
        read(path)


# ---- a broken JSON record: the file's line, not the column inside the record ---------------------------------

BROKEN_LINE = '{"text": "unterminated, "url": "x"}'


@pytest.mark.parametrize("name, content, line", [
    ("bad.jsonl", f'{{"text": "one"}}\n\n{{"text": "two"}}\n{BROKEN_LINE}\n{{"text": "five"}}\n', 4),
    ("bad.jsonl.gz", f'{{"text": "one"}}\n{BROKEN_LINE}\n', 2),
    ("bad.json", '[\n  {"text": "one"},\n  {"text": "two"},\n  {"text": "three",}\n]\n', 4),
], ids=["jsonl", "jsonl.gz", "json"])
def test_a_broken_json_record_names_the_file_and_its_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(_gzip_bytes(content) if name.endswith(".gz") else content.encode())
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: not valid JSON \(.+, column \d+\)$"):
        read_documents(path)


def test_a_json_file_without_the_text_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"body": text} for text in TEXTS]))
    with pytest.raises(DataError, match=rf"^{re.escape(str(records))}: expected a list of records with field 'text'"):
        read_documents(records)
    assert read_documents(path) == TEXTS


# ---- pickled weights with layer streaming: the same refusal and advice as loading the model whole ------------

def test_streaming_a_model_with_pickled_weights_only_gives_the_conversion_advice(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model_of("mixtral").save_pretrained(model_dir)
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")  # a pickled checkpoint's file name
    with pytest.raises(ModelError) as whole:
        check_model_dir(model_dir, weights=True)
    with pytest.raises(ModelError) as streamed:
        LayerStream(model_dir)
    message = str(streamed.value)
    assert message.startswith(str(whole.value))  # one wording, kept in modelio
    assert "pytorch_model.bin" in message and "Convert it" in message
    assert "layer streaming" not in message and "layer_streaming" not in message
