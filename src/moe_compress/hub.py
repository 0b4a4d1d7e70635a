"""What the pipeline takes from the Hugging Face hub, and the rule that only the submit host touches it.

The downloads (a model snapshot, a C4 shard, lm-eval datasets) are local rules that fill the hub cache
under ``HF_HOME``; every job that runs elsewhere (a compute node, often without internet) gets the
``OFFLINE_ENVIRONMENT`` and reads that cache. A configuration that names no hub source runs offline
throughout, so a run never reaches for the network unless the config asks for it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

from moe_compress.atomic import atomic_directory, atomic_path
from moe_compress.checkpoint_files import check_model_dir
from moe_compress.errors import DataError, ModelError

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
C4_REPO = "allenai/c4"
# what a causal-LM checkpoint needs; never pickled weights (*.bin, *.pt)
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(path: str) -> bool:
    """``org/name`` that is not a local directory."""
    return not Path(path).exists() and _HUB_ID.fullmatch(path) is not None


def hub_sources(config: dict) -> list[str]:
    """The config keys that ask for the hub (empty: the whole run stays offline)."""
    sources = []
    if config["model"]["path"] != "demo" and is_hub_id(config["model"]["path"]):
        sources.append("model.path")
    if config["calibration"]["source"] == "hub":
        sources.append("calibration.source")
    for index, source in enumerate(config["calibration"].get("sources") or []):
        if "hub" in source:
            sources.append(f"calibration.sources[{index}].hub")
    if config["evaluation"]["source"] == "hub" and config["evaluation"]["tasks"]:
        sources.append("evaluation.source")
    return sources


def resolve_hf_home(configured: str | None, environ=os.environ) -> str:
    """The hub cache every job uses: the ``hf_home`` config key, else $HF_HOME, else the hub client's own
    default. Absolute, because jobs on other hosts and working directories must find the same place."""
    if configured:
        return str(Path(configured).expanduser().resolve())
    if environ.get("HF_HOME"):
        return str(Path(environ["HF_HOME"]).expanduser().resolve())
    return str((Path(environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface").resolve())


def configure_hub_environment(config: dict, remote_job: bool, environ=os.environ) -> list[str]:
    """Set HF_HOME for this process and every job it starts, and switch the hub off where nothing may
    reach it: in a job running on another host (a cluster node), and everywhere when the config names no
    hub source. Returns the config keys that ask for the hub."""
    sources = hub_sources(config)
    environ["HF_HOME"] = resolve_hf_home(config["hf_home"], environ)
    if not sources or remote_job:
        environ.update(OFFLINE_ENVIRONMENT)
    return sources


def hub_offline(environ=os.environ) -> bool:
    return environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _not_cached(what: str, key: str, err: Exception) -> ModelError:
    where = os.environ.get("HF_HOME", "the hub cache")
    if hub_offline():
        return ModelError(f"{key}: {what} is not in the hub cache under {where} and the hub is offline "
                          f"(HF_HUB_OFFLINE=1); run once on a host with hub access, or download it there "
                          f"(e.g. `hf download ...`) into the same HF_HOME")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(f"{key}: could not download {what} into {where} ({reason}); check that this host reaches the "
                      f"hub (or its mirror, HF_ENDPOINT), or download it elsewhere into the same HF_HOME")


def fetch_model_snapshot(repo_id: str, out_dir: str | Path) -> Path:
    """Download (or find in the cache) the snapshot of ``repo_id`` and expose it at ``out_dir`` as links into
    the cache, so the weights are stored once however many workdirs use them. Returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id=repo_id, allow_patterns=MODEL_FILE_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise _not_cached(f"model {repo_id!r}", "model.path", err) from err
    files = [path for path in sorted(snapshot.rglob("*")) if path.is_file()]
    if not any(path.name == "config.json" for path in files):
        raise ModelError(f"model.path: the hub snapshot of {repo_id!r} has no config.json ({snapshot})")
    with atomic_directory(out_dir) as tmp:
        for path in files:
            link = Path(tmp) / path.relative_to(snapshot)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
        # what a local model.path is checked for at parse time, here before any job uses the snapshot
        check_model_dir(tmp, weights=True, tokenizer=True)
    return snapshot


def fetch_model_config(repo_id: str) -> Path:
    """The folder holding ``config.json`` of ``repo_id`` in the hub cache (downloaded if missing): enough
    to plan per-layer jobs (which decoder layers are MoE) before the weights are fetched."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename="config.json")).parent
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise _not_cached(f"the config of model {repo_id!r}", "model.path", err) from err


def write_json_lines(lines: list[str], out_path: str | Path) -> None:
    """JSON lines as gzip without a timestamp or file name, so the same lines are the same bytes on every run."""
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
            handle.write(("\n".join(lines) + "\n").encode("utf-8"))


def fetch_c4_documents(shard: str, num_docs: int, out_path: str | Path, text_field: str = "text") -> int:
    """The first ``num_docs`` non-empty documents of one C4 shard (a file of the ``allenai/c4`` dataset repo,
    e.g. ``en/c4-train.00000-of-01024.json.gz``), written as JSON lines, gzip without a timestamp so the file
    is the same bytes on every run. A fixed file, not a shuffled stream: the calibration set is reproducible
    and cached like any other download."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # here, not at the top: every job imports this module (moe_compress.workflow), this rule alone reads a corpus
    from moe_compress.calibration import jsonl_records

    try:
        shard_path = hf_hub_download(repo_id=C4_REPO, filename=shard, repo_type="dataset")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise _not_cached(f"the C4 shard {shard!r}", "calibration.hub_file", err) from err
    kept = []
    for line, record in jsonl_records(shard_path, text_field, name=shard):
        if record[text_field].strip():
            kept.append(line)
        if len(kept) == num_docs:
            break
    if len(kept) < num_docs:
        raise DataError(f"calibration.hub_docs={num_docs}, but the C4 shard {shard!r} has only {len(kept)} documents")
    write_json_lines(kept, out_path)
    return len(kept)


# how datasets words a ValueError for a split or a config the dataset does not have
_BAD_SPLIT = re.compile(r"^(Bad|Unknown) split")
_BAD_CONFIG = re.compile(r"^BuilderConfig .* not found|^Config name is missing")


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def fetch_dataset_documents(dataset: str, config_name: str | None, split: str, fields: list[str], num_docs: int,
                            out_path: str | Path, key: str) -> int:
    """The first ``num_docs`` records of a dataset (``datasets.load_dataset(dataset, config_name, split=split,
    streaming=True)``: a hub dataset, or a local folder of data files), each cut to ``fields`` (in that order),
    written as JSON lines, gzip without a timestamp or file name, so the file is the same bytes on every run.
    A record whose fields are all empty (blank strings or None) is skipped. ``key`` is the config key the
    dataset comes from (a calibration source's ``hub``), named in every error: the source's ``text_field`` (a
    record without one of the fields: ``<key>.text_field`` with a trailing ``.hub`` left off),
    ``<key>.docs`` (fewer records than asked for), ``<key>.id`` (not found, not cached offline, unreachable,
    unreadable), ``<key>.split`` / ``<key>.config`` (one the dataset does not have). Returns the number of
    records written."""
    # here, not at the top: every job imports this module, and datasets (with pyarrow) is slow to import
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import httpx

    # what datasets raises for a dataset it cannot find, reach or find in the cache offline, while loading
    # and, streaming, while reading the first records (a dropped connection: httpx's errors)
    unavailable = (DatasetNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, FileNotFoundError,
                   ConnectionError, OSError, httpx.HTTPError)
    name = f"{dataset!r} (" + (f"config {config_name!r}, " if config_name else "") + f"split {split!r})"
    field_key = f"{key.removesuffix('.hub')}.text_field"  # the fields are the source's, beside its hub entry
    if dataset.startswith(("/", ".", "~")) and not Path(dataset).expanduser().exists():
        # a local path (never a hub id): no cache or network to blame
        raise DataError(f"{key}.id: no such folder or file: {dataset}")
    kept: list[str] = []
    try:
        stream = datasets.load_dataset(dataset, config_name, split=split, streaming=True)
        for index, record in enumerate(stream):
            missing = [field for field in fields if field not in record]
            if missing:
                raise DataError(f"{field_key}: record {index} (counting from 0) of {name} has no field "
                                f"{missing[0]!r}; its fields are {', '.join(map(repr, record))}")
            kept_fields = {field: record[field] for field in fields}
            if all(_is_empty(value) for value in kept_fields.values()):
                continue
            try:
                kept.append(json.dumps(kept_fields, ensure_ascii=False))
            except TypeError as err:
                raise DataError(f"{field_key}: record {index} (counting from 0) of {name}: {fields} are "
                                f"not all JSON values ({err})") from err
            if len(kept) == num_docs:
                break
    except unavailable as err:
        raise _not_cached(f"the dataset {dataset!r}", f"{key}.id", err) from err
    except ValueError as err:
        # the dataset was found: a split or config it does not have, or a data file it cannot parse
        # (pyarrow's ArrowInvalid is a ValueError); not a download to retry elsewhere
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        part = "split" if _BAD_SPLIT.search(reason) else "config" if _BAD_CONFIG.search(reason) else "id"
        raise DataError(f"{key}.{part}: cannot read {name}: {reason}") from err
    if len(kept) < num_docs:
        raise DataError(f"{key}.docs={num_docs}, but {name} has only {len(kept)} records with text in {fields}")
    write_json_lines(kept, out_path)
    return len(kept)
