"""The files of a checkpoint folder: their names, the check that a folder holds a checkpoint (config.json,
safetensors weights, tokenizer files), and its compression record. No torch: the jobs that only read records
(the final table, the plots) and the hub helpers every job imports use this, not ``modelio``."""

from __future__ import annotations

import json
from pathlib import Path

from moe_compress.errors import ModelError

COMPRESSION_RECORD = "compression.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# What transformers builds a tokenizer from (TokenizersBackend, Qwen2Tokenizer, GPTNeoXTokenizer, the
# sentencepiece, tiktoken and Mistral tekken converters). Without any, AutoTokenizer returns an empty
# tokenizer: every text becomes no tokens, and the calibration samples nothing but separators.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "tekken.json", "vocab.txt")
TOKENIZER_FILE_PATTERNS = ("tokenizer.model.*", "*.tiktoken")
TOKENIZER_FILE_PAIR = ("vocab.json", "merges.txt")
TOKENIZER_CHOICES = "tokenizer.json, tokenizer.model, vocab.json + merges.txt, vocab.txt, *.tiktoken or tekken.json"
# what loading a tokenizer reads of a model folder (a job that needs only the tokenizer checks only these)
TOKENIZER_READS = (*TOKENIZER_FILES, *TOKENIZER_FILE_PAIR, "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "config.json")


def check_model_dir(path: str | Path, weights: bool = False, tokenizer: bool = False) -> Path:
    """``path`` as a checkpoint folder; with ``weights``, one whose weights are safetensors (pickled weights,
    ``*.bin`` or ``*.pt``, can run code when loaded, so they are never read), every shard its index names
    present; with ``tokenizer``, one with the files a tokenizer is built from."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; set model.path to a local HF directory, a hub id, or 'demo'")
    if not (path / "config.json").is_file():
        raise ModelError(f"model path {path} is not a Hugging Face checkpoint (no config.json in it)")
    if weights:
        _check_weights(path)
    if tokenizer and not has_tokenizer_files(path):
        raise ModelError(f"model path {path}: no tokenizer files (it needs one of {TOKENIZER_CHOICES}); without them "
                         f"transformers builds an empty tokenizer and every text becomes no tokens. Copy the model's "
                         f"tokenizer files into {path}")
    return path


def _check_weights(path: Path) -> None:
    index = path / SAFETENSORS_INDEX_FILE
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelError(f"model path {path}: {SAFETENSORS_INDEX_FILE} is not a safetensors index "
                             f"(no weight_map)") from err
        missing = sorted(shard for shard in shards if not (path / shard).is_file())
        if missing:
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ModelError(f"model path {path}: {len(missing)} of the {len(shards)} weight files that "
                             f"{SAFETENSORS_INDEX_FILE} names are missing ({listed}); copy or download them again")
        return
    if (path / SAFETENSORS_FILE).is_file():
        return
    pickled = sorted(item.name for item in path.iterdir() if item.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise ModelError(f"model path {path}: only pickled weights ({', '.join(pickled[:3])}); moe-compress reads "
                         f"safetensors only. Convert it once where you trust the file, e.g. "
                         f"AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)")
    others = sorted(item.name for item in path.glob("*.safetensors"))
    if others:
        raise ModelError(f"model path {path}: safetensors files ({', '.join(others[:3])}) but no {SAFETENSORS_FILE} "
                         f"or {SAFETENSORS_INDEX_FILE}, the names transformers loads; rename a single file to "
                         f"{SAFETENSORS_FILE}, or copy the checkpoint's index file into it")
    raise ModelError(f"model path {path}: no weights (no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}); copy the "
                     f"model's safetensors files into it")


def has_tokenizer_files(path: Path) -> bool:
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return True
    if any(any(path.glob(pattern)) for pattern in TOKENIZER_FILE_PATTERNS):
        return True
    return all((path / name).is_file() for name in TOKENIZER_FILE_PAIR)


def context_length(path: str | Path) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` of its config.json), or None
    where the config does not say."""
    raw = json.loads((Path(path) / "config.json").read_text())
    value = raw.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_compression_record(path: str | Path) -> dict | None:
    record_path = Path(path) / COMPRESSION_RECORD
    return json.loads(record_path.read_text()) if record_path.is_file() else None
