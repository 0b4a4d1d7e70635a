"""Imported by every Python process of a Snakemake run that a test starts with this folder on PYTHONPATH
(helpers.start_snakemake_paused_before): a job about to write a file whose absolute path matches the glob in
MOE_COMPRESS_TEST_PAUSE_BEFORE stops there for good, after creating the file MOE_COMPRESS_TEST_PAUSED. A test
then kills the run at a known point of a job's work, however fast or slow the machine is, instead of polling
for a moment that a busy machine may let pass unseen."""

import fnmatch
import os
import sys
import time

_PATTERN = os.environ.get("MOE_COMPRESS_TEST_PAUSE_BEFORE")
_MARKER = os.environ.get("MOE_COMPRESS_TEST_PAUSED")


def _pause_before_writing(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], (str, os.PathLike)):
        return
    path, mode, flags = os.path.abspath(os.fspath(args[0])), args[1], args[2]
    writes = any(letter in mode for letter in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
    if writes and fnmatch.fnmatch(path, _PATTERN):
        with open(_MARKER, "w") as marker:  # the marker's own path does not match the pattern
            marker.write(f"{os.getpid()} {path}\n")
        while True:  # until the test kills the run (or this job's watchdog stops it)
            time.sleep(60)


if _PATTERN and _MARKER:
    sys.addaudithook(_pause_before_writing)
