"""Checksums of every workflow output: recorded by the job that wrote it, checked by every job that reads it.

Each output (a file or a directory) gets a record beside it, ``.<name>.checksums.json``: the size and
CRC-32 of every file in it (CRC-32 guards against accidental damage, as gzip and zip use it, at several
GB/s). A job checks each input that is a workflow output against its record before using it. A missing
file, another size, another checksum or an unreadable record means the output is not what its job wrote: it
is removed with its record and the job stops naming the file, so the next run rebuilds it instead of
failing the same way on every rerun. An output without a record (written by an older moe-compress, or
put in place by hand) is complete, as every output is moved into place whole: it is recorded as it is,
with a warning, and checked from then on.

The record sits beside the output, not inside it: a directory output stays exactly what its job wrote
(a checkpoint folder is a plain Hugging Face checkpoint), and Snakemake never sees the record.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe_compress.atomic import write_json
from moe_compress.errors import DataError

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".checksums.json"
CHUNK_BYTES = 16 * 2**20
# Snakemake stamps directory outputs after the job ends; the stamp is not part of what the job wrote
IGNORED_NAMES = {".snakemake_timestamp"}


class DamagedOutput(DataError):
    """A workflow output no longer matches the record its job wrote; it has been removed."""


def record_path(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}{RECORD_SUFFIX}"


def file_checksum(path: str | Path) -> str:
    """The CRC-32 of the file's bytes, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files_of(output: Path) -> list[str]:
    """The files of ``output`` relative to it ("" for a file output), links followed, sorted."""
    if not output.is_dir():
        return [""]
    found = []
    for directory, _, names in os.walk(output, followlinks=True):
        for name in names:
            if name not in IGNORED_NAMES:
                found.append(str((Path(directory) / name).relative_to(output)))
    return sorted(found)


def _checksums(paths: list[Path]) -> list[str]:
    # zlib and file reads release the GIL: a sharded checkpoint is read on several cores
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_checksum, paths))


def write_record(output: str | Path) -> dict:
    """Record the size and checksum of every file of ``output`` (call once the output is complete)."""
    output = Path(output)
    if not output.exists():
        raise DataError(f"{output}: the job finished without writing this output")
    names = _files_of(output)
    paths = [output / name if name else output for name in names]
    record = {"kind": "directory" if output.is_dir() else "file",
              "files": {name: {"size": path.stat().st_size, "crc32": crc}
                        for name, path, crc in zip(names, paths, _checksums(paths), strict=True)}}
    write_json(record, record_path(output))
    return record


def invalidate(output: str | Path) -> None:
    """Remove ``output`` and its record, so that Snakemake finds it missing and rebuilds it."""
    output = Path(output)
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output)
    else:
        output.unlink(missing_ok=True)
    record_path(output).unlink(missing_ok=True)


def _problem(output: Path, read: Iterable[str] | None) -> str | None:
    """What differs between ``output`` and its record (None: nothing). Every file's presence and size is
    checked; the checksum of the files in ``read`` (all where None)."""
    record_file = record_path(output)
    try:
        files = json.loads(record_file.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"its checksum record {record_file.name} is unreadable ({err})"
    to_checksum = []
    for name, expected in files.items():
        path = output / name if name else output
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, {expected['size']} when it was written (truncated or replaced)"
        if read is None or name in read:
            to_checksum.append((path, expected["crc32"]))
    actual = _checksums([path for path, _ in to_checksum])
    for (path, expected_crc), actual_crc in zip(to_checksum, actual, strict=True):
        if actual_crc != expected_crc:
            return f"{path} has changed on disk since it was written (CRC-32 {actual_crc}, recorded {expected_crc})"
    return None


def verify_output(output: str | Path, read: Iterable[str] | None = None) -> None:
    """Stop unless ``output`` is what its job wrote. ``read``: for a directory of which the caller reads
    only some files, those (relative paths); the others are checked by presence and size only.

    A damaged output is removed with its record before the error is raised: the next run rebuilds it."""
    output = Path(output)
    if not record_path(output).is_file():
        log.warning("%s has no checksum record (written by an older moe-compress, or put there by hand): recording "
                    "it as it is now", output)
        write_record(output)
        return
    problem = _problem(output, None if read is None else set(read))
    if problem:
        invalidate(output)
        raise DamagedOutput(f"{output} is not the output its job wrote: {problem}. It was removed, so running "
                            f"the workflow again rebuilds it")
