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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_compress.atomic import atomic_path
from moe_compress.errors import DataError
from moe_compress.checkpoint_files import TOKENIZER_CHOICES

log = logging.getLogger(__name__)

# What reading a gzip file raises when it was cut short (EOFError), has damaged bytes (zlib.error, a CRC
# mismatch) or is no gzip at all (BadGzipFile); none of them names the file.
GZIP_READ_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

# Natural text's most frequent token (a space, "the", a comma, EOS between documents) is a few percent of
# all tokens with a real vocabulary, and well under half even with a tiny byte-level one. One id making
# up more than half the tokens means the tokenizer or the text is broken, and every statistic computed
# from such samples would be meaningless.
MAX_TOKEN_SHARE = 0.5


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    # strict decoding: a non-UTF-8 corpus is an error, not silently mangled text
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")


def _unreadable_gzip(name: str | Path, err: Exception) -> DataError:
    return DataError(f"{name}: the gzip file is truncated or corrupt ({err}); download or copy it again")


def _invalid_json(name: str | Path, line_no: int, err: json.JSONDecodeError) -> DataError:
    return DataError(f"{name}:{line_no}: not valid JSON ({err.msg}, column {err.colno})")


def jsonl_records(path: str | Path, text_field: str, name: str | None = None) -> Iterator[tuple[str, dict]]:
    """(line, parsed record) for each non-empty line of a JSON-lines file (gzip if it ends in .gz); a
    record that is not valid JSON or has no ``text_field`` is an error naming the file (or ``name``) and the line."""
    name = name or path
    try:
        with _open_text(Path(path)) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _invalid_json(name, line_no, err) from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{name}:{line_no}: record has no field {text_field!r} (calibration.text_field)")
                yield line.rstrip("\n"), record
    except GZIP_READ_ERRORS as err:
        raise _unreadable_gzip(name, err) from err


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
            elif isinstance(records, list) and all(isinstance(record, dict) and text_field in record
                                                   for record in records):
                docs = [record[text_field] for record in records]
            else:
                raise DataError(f"{path}: expected a list of records with field {text_field!r}, or an object holding "
                                f"a {text_field!r} list (calibration.text_field)")
        else:
            raise DataError(f"{path}: unsupported corpus format (use .jsonl, .json, .parquet, or .jsonl.gz/.json.gz)")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err})") from err
    except json.JSONDecodeError as err:  # a .json file; .jsonl lines are reported by jsonl_records
        raise _invalid_json(path, err.lineno, err) from None
    except GZIP_READ_ERRORS as err:
        raise _unreadable_gzip(path, err) from err
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


def _describe_tokenizer(tokenizer) -> str:
    where = f" from {tokenizer.name_or_path}" if getattr(tokenizer, "name_or_path", "") else ""
    return f"{type(tokenizer).__name__}{where}, vocabulary size {len(tokenizer)}"


def _refuse_text_without_tokens(tokenizer, ids: np.ndarray, what: str) -> None:
    """A tokenizer whose files are missing still loads (transformers builds one with an empty vocabulary)
    and turns every text into nothing: blame it, not the corpus."""
    if not np.isin(ids, tokenizer.all_special_ids, invert=True).any():
        raise DataError(
            f"the tokenizer ({_describe_tokenizer(tokenizer)}) turns {what} into no tokens (special tokens aside): "
            f"its files (one of {TOKENIZER_CHOICES}) are likely missing or broken; copy them from the original model"
        )


def _refuse_dominant_token(tokenizer, ids: np.ndarray, source: str) -> None:
    """Stop when one token id makes up more than MAX_TOKEN_SHARE of ``ids``."""
    counts = np.bincount(ids.ravel())
    token_id = int(counts.argmax())
    share = counts[token_id] / ids.size
    if share > MAX_TOKEN_SHARE:
        raise DataError(
            f"{source}: token {token_id} ({tokenizer.decode([token_id])!r}) is {share:.1%} of the {ids.size} tokens "
            f"sampled (natural text's most frequent token is a few percent); the text or the tokenizer "
            f"({_describe_tokenizer(tokenizer)}) is broken: check calibration.text_field and the tokenizer files"
        )


def tokenize_into_samples(tokenizer, docs: list[str], num_samples: int, seq_len: int, seed: int,
                          source: str = "the corpus") -> np.ndarray:
    """``num_samples`` windows of exactly ``seq_len`` tokens, as int64 [num_samples, seq_len].

    Documents are visited in a seeded order and concatenated with the EOS token between them (the
    usual packing for C4 calibration), then cut into consecutive windows. Raises when the text is
    too short for the request (a silently smaller calibration set would bias every statistic), when
    the tokenizer turns the documents into nothing, or when one token dominates the samples
    (``source`` names the corpus in that message).
    """
    order = np.random.default_rng(seed).permutation(len(docs))
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = num_samples * seq_len
    stream: list[int] = []
    visited = 0
    for index in order:
        stream.extend(tokenizer(docs[index], add_special_tokens=False)["input_ids"])
        stream.extend(separator)
        visited += 1
        if len(stream) >= needed:
            break
    stream_ids = np.asarray(stream, dtype=np.int64)
    _refuse_text_without_tokens(tokenizer, stream_ids, f"{visited} non-empty documents of {source}")
    if len(stream) < needed:
        raise DataError(
            f"the corpus yields {len(stream)} tokens but {num_samples} samples x {seq_len} tokens = {needed} "
            "were requested; lower calibration.num_samples / seq_len or use a larger corpus"
        )
    samples = stream_ids[:needed].reshape(num_samples, seq_len)
    _refuse_dominant_token(tokenizer, samples, source)
    return samples


def tokenize_contiguous(tokenizer, text: str, seq_len: int, max_windows: int | None,
                        source: str = "the text") -> np.ndarray:
    """Non-overlapping ``seq_len`` windows over one long text (WikiText-2 style perplexity); refused like
    calibration samples when the tokenizer turns the text into nothing or one token dominates."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _refuse_text_without_tokens(tokenizer, np.asarray(ids, dtype=np.int64), f"{source} ({len(text)} characters)")
    windows = len(ids) // seq_len
    if windows < 1:
        raise DataError(f"the text yields {len(ids)} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        if windows < max_windows:  # said, not silent: the perplexity table's token count shows it too
            log.warning("the text yields %d windows of %d tokens, fewer than perplexity.max_windows=%d; scoring all %d",
                        windows, seq_len, max_windows, windows)
        windows = min(windows, max_windows)
    samples = np.asarray(ids[: windows * seq_len], dtype=np.int64).reshape(windows, seq_len)
    _refuse_dominant_token(tokenizer, samples, source)
    return samples


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
    except GZIP_READ_ERRORS as err:
        raise _unreadable_gzip(path, err) from err


def load_corpus(path: str | Path, settings: dict) -> tuple[list[str], list[str]]:
    """(calibration pool, held-out documents) from the corpus file ``path`` (the configured local file, or
    the C4 documents fetch_calibration_corpus took from the hub) and the ``calibration`` config section."""
    return split_documents(read_documents(path, settings["text_field"]), settings["heldout_docs"])
