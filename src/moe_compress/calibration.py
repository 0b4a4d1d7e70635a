"""Calibration and held-out text: read a corpus, split it, tokenise it into fixed-length samples.

The corpus is split by document index, once, the same way for every consumer: the last
``heldout_docs`` documents are held out (perplexity, demo-model validation), everything before
them may be used for calibration and demo training. Calibration and held-out text are therefore
disjoint by construction.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_compress.atomic import atomic_path
from moe_compress.errors import DataError

log = logging.getLogger(__name__)


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    # strict decoding: a non-UTF-8 corpus is an error, not silently mangled text
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")


def jsonl_records(path: str | Path, text_field: str, name: str | None = None) -> Iterator[tuple[str, dict]]:
    """(line, parsed record) for each non-empty line of a JSON-lines file (gzip if it ends in .gz); a
    record without ``text_field`` is an error naming the file (or ``name``) and the line."""
    with _open_text(Path(path)) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise DataError(f"{name or path}:{line_no}: record has no field {text_field!r} (calibration.text_field)")
            yield line.rstrip("\n"), record


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Read documents from a local .json / .jsonl / .parquet file (optionally .gz for the json forms).

    Columns are read by name (``text_field``), never by position.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}")
    name = path.name.removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise DataError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
            docs = table.column(text_field).to_pylist()
        elif name.endswith(".jsonl"):
            docs = [record[text_field] for _, record in jsonl_records(path, text_field)]
        elif name.endswith(".json"):
            with _open_text(path) as handle:
                records = json.load(handle)
            if isinstance(records, dict) and text_field in records:
                docs = list(records[text_field])
            else:
                docs = [record[text_field] for record in records]
        else:
            raise DataError(f"{path}: unsupported corpus format (use .jsonl, .json, .parquet, or .jsonl.gz/.json.gz)")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err})") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from err
    docs = [doc for doc in docs if isinstance(doc, str) and doc.strip()]
    if not docs:
        raise DataError(f"{path}: no non-empty documents in field {text_field!r}")
    return docs


def split_documents(docs: list[str], heldout_docs: int) -> tuple[list[str], list[str]]:
    """Split into (train/calibration pool, held-out): the held-out part is the last ``heldout_docs``."""
    if heldout_docs < 1 or heldout_docs >= len(docs):
        raise DataError(
            f"calibration.heldout_docs={heldout_docs} must be between 1 and the number of documents - 1 ({len(docs) - 1})"
        )
    return docs[:-heldout_docs], docs[-heldout_docs:]


def tokenize_into_samples(tokenizer, docs: list[str], num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """``num_samples`` windows of exactly ``seq_len`` tokens, as int64 [num_samples, seq_len].

    Documents are visited in a seeded order and concatenated with the EOS token between them (the
    usual packing for C4 calibration), then cut into consecutive windows. Raises when the text is
    too short for the request: a silently smaller calibration set would bias every statistic.
    """
    order = np.random.default_rng(seed).permutation(len(docs))
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = num_samples * seq_len
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(docs[index], add_special_tokens=False)["input_ids"])
        stream.extend(separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise DataError(
            f"the corpus yields {len(stream)} tokens but {num_samples} samples x {seq_len} tokens = {needed} "
            "were requested; lower calibration.num_samples / seq_len or use a larger corpus"
        )
    return np.asarray(stream[:needed], dtype=np.int64).reshape(num_samples, seq_len)


def tokenize_contiguous(tokenizer, text: str, seq_len: int, max_windows: int | None) -> np.ndarray:
    """Non-overlapping ``seq_len`` windows over one long text (WikiText-2 style perplexity)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = len(ids) // seq_len
    if windows < 1:
        raise DataError(f"the text yields {len(ids)} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        if windows < max_windows:  # said, not silent: the perplexity table's token count shows it too
            log.warning("the text yields %d windows of %d tokens, fewer than perplexity.max_windows=%d; scoring all %d",
                        windows, seq_len, max_windows, windows)
        windows = min(windows, max_windows)
    return np.asarray(ids[: windows * seq_len], dtype=np.int64).reshape(windows, seq_len)


@dataclass(frozen=True)
class TokenSamples:
    input_ids: np.ndarray  # int64 [samples, seq_len]
    source: str


def write_samples(samples: TokenSamples, path: str | Path) -> None:
    table = pa.table(
        {
            "sample": pa.array(np.arange(len(samples.input_ids)), pa.int32()),
            "input_ids": pa.array(list(samples.input_ids.astype(np.int32)), pa.list_(pa.int32())),
        }
    )
    table = table.replace_schema_metadata({"source": samples.source, "seq_len": str(samples.input_ids.shape[1])})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_samples(path: str | Path) -> np.ndarray:
    table = pq.read_table(path)
    ids = table.column("input_ids").combine_chunks()
    seq_len = int(table.schema.metadata[b"seq_len"])
    return ids.flatten().to_numpy().astype(np.int64).reshape(-1, seq_len)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        with _open_text(path) as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err})") from err


def load_corpus(path: str | Path, settings: dict) -> tuple[list[str], list[str]]:
    """(calibration pool, held-out documents) from the corpus file ``path`` (the configured local file, or
    the C4 documents fetch_calibration_corpus took from the hub) and the ``calibration`` config section."""
    return split_documents(read_documents(path, settings["text_field"]), settings["heldout_docs"])
