"""Atomic outputs: every file or directory is written under a temporary name and moved into place,
so a job killed mid-write never leaves something a rerun would accept.

The temporaries are created owner-only (``mkstemp``/``mkdtemp``); before they take the output's name they
get the mode any other new file would have under the process's umask, so colleagues and a model server
under another account can read the results on a shared filesystem, as they can read the logs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (another thread creating a
    file meanwhile would otherwise get the temporary umask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_default_mode(path: Path, directory: bool) -> None:
    """The mode ``open``/``mkdir`` would have given: 0o666 (files) or 0o777 (folders) less the umask; in a
    folder, to everything in it too (libraries that write through their own temporary file, as the
    safetensors writer does, leave it owner-only). Links are left alone: they point outside the output."""
    umask = current_umask()
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)
    if directory:
        for folder, subfolders, files in os.walk(path):
            for name in subfolders:
                if not os.path.islink(os.path.join(folder, name)):
                    os.chmod(os.path.join(folder, name), 0o777 & ~umask)
            for name in files:
                if not os.path.islink(os.path.join(folder, name)):
                    os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _remove_stale_temporaries(path: Path) -> None:
    """What a killed earlier attempt at ``path`` left (no ``finally`` runs on SIGKILL). Only one job writes
    a given output at a time, so every temporary of this name is stale."""
    # tempfile's random part has no dot: ".m.*.tmp" must not catch ".m.2.<random>.tmp" (a variant "m.2")
    own = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]+\.tmp")
    for stale in (item for item in path.parent.glob(f".{path.name}.*.tmp") if own.fullmatch(item.name)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _give_default_mode(Path(tmp), directory=Path(tmp).is_dir())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary directory beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _give_default_mode(tmp, directory=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
