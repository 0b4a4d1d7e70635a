"""Calibration and held-out text: read each calibration source, split it, tokenise it into fixed-length samples.

A source (a ``calibration.sources`` entry; one source, ``c4``, without them) is split by document index,
once, the same way for every consumer: its last ``heldout_docs`` documents are held out (its perplexity
dataset, demo-model validation), everything before them may be used for calibration and demo training.
Calibration and held-out text are therefore disjoint by construction. A mix draws each source's share of the
windows from that source alone (``sample_mix``) and records each window's source.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
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


def _fields(text_field: str | list[str]) -> list[str]:
    return [text_field] if isinstance(text_field, str) else list(text_field)


def _field_key(key: str | None) -> str:
    return f"{key}.text_field" if key else "calibration.text_field"


def jsonl_records(path: str | Path, text_field: str | list[str], name: str | None = None,
                  key: str | None = None) -> Iterator[tuple[str, dict]]:
    """(line, parsed record) for each non-empty line of a JSON-lines file (gzip if it ends in .gz); a
    record that is not valid JSON or lacks a field of ``text_field`` (one field or a list) is an error naming
    the file (or ``name``), the line and the config key (``key``: the source's)."""
    name = name or path
    fields = _fields(text_field)
    try:
        with _open_text(Path(path)) as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _invalid_json(name, line_no, err) from None
                if not isinstance(record, dict) or any(field not in record for field in fields):
                    missing = [field for field in fields if not isinstance(record, dict) or field not in record]
                    has = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{name}:{line_no}: record has no field {missing[0]!r} ({_field_key(key)}; "
                                    f"the record has {has})")
                yield line.rstrip("\n"), record
    except GZIP_READ_ERRORS as err:
        raise _unreadable_gzip(name, err) from err


def _record_document(record: dict, fields: list[str], chat: bool, where: str, key: str | None):
    """A record's document: its fields' text joined with a newline, or (chat) its list of messages."""
    if chat:
        messages = record[fields[0]]
        if not (isinstance(messages, list) and messages and all(
                isinstance(message, dict) and "role" in message and "content" in message for message in messages)):
            raise DataError(f"{where}: field {fields[0]!r} is not a list of {{role, content}} messages "
                            f"({_field_key(key)} with format: chat)")
        return messages
    values = [record[field] for field in fields]
    bad = [field for field, value in zip(fields, values) if value is not None and not isinstance(value, str)]
    if bad:
        raise DataError(f"{where}: field {bad[0]!r} holds {type(record[bad[0]]).__name__}, not text "
                        f"({_field_key(key)})")
    return "\n".join(value for value in values if value)


def _text_documents(text: str, documents: str, path: Path) -> list[str]:
    """A plain-text file's documents (see the ``documents`` option of a calibration source)."""
    if documents == "whole":
        return [text]
    if documents == "lines":
        return text.splitlines()
    if documents == "doc_tags":
        blocks = re.findall(r"<doc\b[^>]*>\n?(.*?)</doc>", text, flags=re.DOTALL)
        if not blocks:
            raise DataError(f"{path}: no <doc ...> ... </doc> blocks (documents: doc_tags reads WikiExtractor "
                            f"output); use documents: paragraphs for plain text")
        return blocks
    return re.split(r"\n[ \t]*\n", text)


def read_documents(path: str | Path, text_field: str | list[str] = "text", documents: str = "paragraphs",
                   chat: bool = False, key: str | None = None) -> list:
    """Read documents from a local .json / .jsonl / .parquet file (records with ``text_field``: one field, or a
    list of fields joined with a newline) or a .txt file (split by ``documents``), each optionally .gz.

    Columns are read by name (``text_field``), never by position. ``chat``: each document is the list of
    messages in ``text_field`` (rendered later with the tokenizer's chat template). ``key``: the config key of
    the source, named in errors.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file not found: {path}" + (f" ({key}.path)" if key else ""))
    name = path.name.removesuffix(".gz")
    fields = _fields(text_field)
    if chat and len(fields) != 1:
        raise DataError(f"{_field_key(key)}: format: chat reads one field of messages, not {fields}")
    try:
        if name.endswith(".parquet"):
            table = pq.read_table(path)
            missing = [field for field in fields if field not in table.column_names]
            if missing:
                raise DataError(f"{path}: no column {missing[0]!r} ({_field_key(key)}; columns: {table.column_names})")
            docs = [_record_document(record, fields, chat, f"{path}: row {row + 1}", key)
                    for row, record in enumerate(table.select(fields).to_pylist())]
        elif name.endswith(".jsonl"):
            docs = [_record_document(record, fields, chat, f"{path}: record {index + 1}", key)
                    for index, (_, record) in enumerate(jsonl_records(path, fields, key=key))]
        elif name.endswith(".json"):
            with _open_text(path) as handle:
                records = json.load(handle)
            if len(fields) == 1 and isinstance(records, dict) and fields[0] in records and not chat:
                docs = list(records[fields[0]])
            elif isinstance(records, list) and all(isinstance(record, dict) and all(field in record for field in fields)
                                                   for record in records):
                docs = [_record_document(record, fields, chat, f"{path}: record {index + 1}", key)
                        for index, record in enumerate(records)]
            else:
                raise DataError(f"{path}: expected a list of records with field {'/'.join(fields)!r}, or an object "
                                f"holding a {fields[0]!r} list ({_field_key(key)})")
        elif name.endswith(".txt"):
            with _open_text(path) as handle:
                docs = _text_documents(handle.read(), documents, path)
        else:
            raise DataError(f"{path}: unsupported corpus format (use .jsonl, .json, .parquet or .txt, each optionally "
                            f".gz)")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err})") from err
    except json.JSONDecodeError as err:  # a .json file; .jsonl lines are reported by jsonl_records
        raise _invalid_json(path, err.lineno, err) from None
    except GZIP_READ_ERRORS as err:
        raise _unreadable_gzip(path, err) from err
    docs = [doc for doc in docs if (isinstance(doc, list) and doc) or (isinstance(doc, str) and doc.strip())]
    if not docs:
        raise DataError(f"{path}: no non-empty documents in field {'/'.join(fields)!r}"
                        + (f" ({key})" if key else ""))
    return docs


def read_source(source: dict, path: str | Path, key: str) -> list:
    """The documents of one calibration source (a ``calibration.sources`` entry) read from ``path`` (its
    local file, or the records its hub fetch wrote)."""
    return read_documents(path, source["text_field"], source.get("documents", "paragraphs"),
                          chat=source.get("format") == "chat", key=key)


def render_documents(tokenizer, docs: list, key: str) -> list[str]:
    """Chat documents (lists of messages) as text through the tokenizer's chat template; text as it is."""
    if not docs or isinstance(docs[0], str):
        return docs
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{key}.format: chat, but the tokenizer ({_describe_tokenizer(tokenizer)}) has no chat "
                        f"template; use format: text with the fields that hold the text")
    return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in docs]


def split_documents(docs: list, heldout_docs: int, key: str = "calibration") -> tuple[list, list]:
    """Split into (train/calibration pool, held-out): the held-out part is the last ``heldout_docs``."""
    if heldout_docs < 1 or heldout_docs >= len(docs):
        raise DataError(
            f"{key}.heldout_docs={heldout_docs} must be between 1 and the number of documents - 1 ({len(docs) - 1})"
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
                          source: str = "the corpus", key: str | None = None) -> np.ndarray:
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
        if key:  # one source of a mix: its share is what asks for too much
            raise DataError(f"{key}: {source} yields {len(stream)} tokens but its {num_samples} windows x {seq_len} "
                            f"tokens = {needed} were requested; lower its share (or samples), calibration.num_samples "
                            f"or seq_len, or use a larger source")
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
    # each sample's calibration source (a mix), or None: one text
    sample_sources: list[str] | None = None


# the samples file's column naming each sample's calibration source
SOURCE_COLUMN = "calibration_source"


def sample_mix(tokenizer, pools: dict[str, list], windows: dict[str, int], seq_len: int, seed: int,
               descriptions: dict[str, str], keys: dict[str, str]) -> tuple[np.ndarray, list[str]]:
    """The calibration windows of a mix: ``windows[name]`` windows from each source's pool (in the order of
    ``pools``), each source packed on its own with the same seeded document order, so a source's windows do
    not depend on the other sources. With more than one source the windows are then shuffled (seeded), so
    the tokens the compression steps hold out (the last whole samples) come from every source. Returns
    (ids [samples, seq_len], each sample's source)."""
    parts, names = [], []
    for name, pool in pools.items():
        docs = render_documents(tokenizer, pool, keys[name])
        parts.append(tokenize_into_samples(tokenizer, docs, windows[name], seq_len, seed, source=descriptions[name],
                                           key=keys[name] if len(pools) > 1 else None))
        names += [name] * windows[name]
    ids = np.concatenate(parts)
    if len(pools) > 1:
        order = np.random.default_rng(seed).permutation(len(ids))
        ids, names = ids[order], [names[index] for index in order]
    return ids, names


def write_samples(samples: TokenSamples, path: str | Path) -> None:
    columns = {
        "sample": pa.array(np.arange(len(samples.input_ids)), pa.int32()),
        "input_ids": pa.array(list(samples.input_ids.astype(np.int32)), pa.list_(pa.int32())),
    }
    if samples.sample_sources is not None:
        columns[SOURCE_COLUMN] = pa.array(samples.sample_sources, pa.string())
    table = pa.table(columns)
    table = table.replace_schema_metadata({"source": samples.source, "seq_len": str(samples.input_ids.shape[1])})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_samples(path: str | Path) -> np.ndarray:
    table = pq.read_table(path)
    ids = table.column("input_ids").combine_chunks()
    seq_len = int(table.schema.metadata[b"seq_len"])
    return ids.flatten().to_numpy().astype(np.int64).reshape(-1, seq_len)


def read_sample_sources(path: str | Path) -> list[str] | None:
    """Each calibration sample's source, or None for windows of one text (perplexity windows)."""
    schema = pq.read_schema(path)
    if SOURCE_COLUMN not in schema.names:
        return None
    return pq.read_table(path, columns=[SOURCE_COLUMN]).column(SOURCE_COLUMN).to_pylist()


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


def load_source(source: dict, path: str | Path, key: str) -> tuple[list, list]:
    """(calibration pool, held-out documents) of one calibration source (a ``calibration.sources`` entry,
    ``key`` its config key) read from ``path`` (its local file, or what its hub fetch wrote)."""
    return split_documents(read_source(source, path, key), source["heldout_docs"], key)
