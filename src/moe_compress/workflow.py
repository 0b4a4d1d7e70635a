"""Glue shared by the thin scripts in workflow/scripts/: logging into the rule's log file, threads."""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

from moe_compress.errors import MoeCompressError
from moe_compress.hub import hub_offline


def start_job(snakemake) -> logging.Logger:
    """Send everything this job writes to stderr into its ``log:`` file: logging (ours and the
    libraries'), warnings, progress bars, and what native code and child processes write to file
    descriptor 2. Set torch's thread count."""
    if snakemake.log:
        redirect_stderr(snakemake.log[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)], force=True)
    logging.captureWarnings(True)
    torch.set_num_threads(max(1, int(snakemake.threads)))
    logger = logging.getLogger(f"moe_compress.rule.{snakemake.rule}")
    logger.info("rule %s, wildcards %s, threads %s", snakemake.rule, dict(snakemake.wildcards), snakemake.threads)
    logger.info("hub %s, HF_HOME=%s", "offline" if hub_offline() else "online", os.environ.get("HF_HOME"))
    sys.excepthook = _log_failure(logger)
    return logger


def redirect_stderr(path: str) -> None:
    """Point file descriptor 2 and ``sys.stderr`` at ``path`` (line-buffered, so a killed job's log ends
    where it stopped)."""
    log_file = open(path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives as long as the job)
    os.dup2(log_file.fileno(), sys.__stderr__.fileno() if sys.__stderr__ else 2)
    sys.stderr = log_file


def _log_failure(logger: logging.Logger):
    """An excepthook that writes the error into the job's log (which Snakemake points users to), not only
    to stderr (which on a cluster lands in the scheduler's log): our own errors as their one-line message,
    anything else with its traceback. Where our error names a library's (a torch error inside a step), the
    library error's traceback follows the message: it tells where in the code the error arose."""

    def log_and_exit(exc_type, exc, traceback):
        cause = exc.__cause__
        if issubclass(exc_type, MoeCompressError) and isinstance(cause, RuntimeError):
            logger.error("%s: %s", exc_type.__name__, exc, exc_info=(type(cause), cause, cause.__traceback__))
        elif issubclass(exc_type, MoeCompressError):
            logger.error("%s: %s", exc_type.__name__, exc)
        else:
            logger.error("failed", exc_info=(exc_type, exc, traceback))

    return log_and_exit


def json_param(snakemake, name: str):
    """Structured params travel as JSON strings so that Snakemake's change detection sees every value."""
    return json.loads(getattr(snakemake.params, name))
