"""Glue shared by the thin scripts in workflow/scripts/: logging into the rule's log file, threads, the
checksum check of the inputs and record of the outputs, and stopping with Snakemake."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from moe_compress.errors import MoeCompressError
from moe_compress.hub import hub_offline
from moe_compress.integrity import verify_output, write_record

# every output of a rule lies under this folder (relative to where snakemake runs); nothing else does
RESULTS_DIR = "results"


# How long (libgomp's spin iterations) one of torch's OpenMP threads that waits for another spins before it
# sleeps. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) makes each of a job's many small parallel regions pay a
# wake-up, which on an idle machine costs more than the short spin; libgomp's much longer default spin gains
# nothing idle and holds cores that other work needs. Where other processes hold the cores all the time,
# PASSIVE is faster, and a policy the user set is kept (docs/benchmarks.md, "Threads that wait"). The computed
# numbers are the same bits under every policy.
OPENMP_SPIN_COUNT = "10000"


def set_openmp_waiting(environ: dict | None = None) -> None:
    """Give the processes started from here (Snakemake's jobs; in tests, the test process itself) the short
    OpenMP spin; a wait policy or spin count the user set is kept. It takes effect in a process that loads torch
    after it: OpenMP reads it once, when it loads."""
    environ = os.environ if environ is None else environ
    if not environ.get("OMP_WAIT_POLICY") and not environ.get("GOMP_SPINCOUNT"):
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def start_job(snakemake, partial_reads: Mapping[str, Iterable[str]] | None = None) -> logging.Logger:
    """Send everything this job writes to stderr into its ``log:`` file: logging (ours and the
    libraries'), warnings, progress bars, and what native code and child processes write to file
    descriptor 2. Set torch's thread count. Check every input that another job wrote against its
    checksum record (``partial_reads``: input name -> the files this job reads of that directory, where
    it reads only some; the rest are checked by size)."""
    if snakemake.log:
        redirect_stderr(snakemake.log[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)], force=True)
    logging.captureWarnings(True)
    # every job imports this module first: torch is set here only where the script imported it (a job that
    # imports it later starts with Snakemake's OMP_NUM_THREADS, the same count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, int(snakemake.threads)))
    logger = logging.getLogger(f"moe_compress.rule.{snakemake.rule}")
    logger.info("rule %s, wildcards %s, threads %s", snakemake.rule, dict(snakemake.wildcards), snakemake.threads)
    logger.info("hub %s, HF_HOME=%s", "offline" if hub_offline() else "online", os.environ.get("HF_HOME"))
    sys.excepthook = _log_failure(logger)
    stop_with_parent(logger)
    verify_inputs(snakemake, partial_reads or {})
    return logger


def stop_with_parent(logger: logging.Logger, interval_s: float = 1.0) -> None:
    """Stop this job when the Snakemake that started it is gone (kill -9, a closed terminal): a job running
    on unseen would finish an output the next run must treat as incomplete, or write it while the next
    run writes it too. The orphan is adopted by another process, so its parent's pid changes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        logger.error("Snakemake (pid %d) has exited: stopping this job; its outputs are not written", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-snakemake", daemon=True).start()


def is_workflow_output(path: str | os.PathLike) -> bool:
    results = os.path.abspath(RESULTS_DIR)
    return os.path.commonpath([os.path.abspath(path), results]) == results


def verify_inputs(snakemake, partial_reads: Mapping[str, Iterable[str]]) -> None:
    """Each input under results/ against the record its job wrote (a damaged one is removed and named)."""
    named = {path: name for name, paths in snakemake.input.items() for path in _as_list(paths)}
    for path in dict.fromkeys(snakemake.input):
        if is_workflow_output(path):
            read = partial_reads.get(named.get(path))
            verify_output(path, None if read is None else list(read))


def finish_job(snakemake) -> None:
    """Record the checksums of every output, now that all are complete (the last line of each script)."""
    for path in snakemake.output:
        write_record(path)
    logging.getLogger(f"moe_compress.rule.{snakemake.rule}").info("checksums recorded for %d outputs",
                                                                  len(snakemake.output))
    # the process exits next: spare the exit's garbage collection its walk over every object that torch and
    # transformers created (it frees nothing the exit does not; atexit handlers and buffered files are unaffected)
    gc.freeze()


def _as_list(paths) -> list[str]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


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


def job_model_layers(snakemake):
    """The job's model (``input.model``) as ``DecoderLayers``: with ``params.layer_streaming`` read one decoder
    layer at a time from its safetensors (the cache pass and the statistics never hold the whole model), else
    loaded whole."""
    from moe_compress.modelio import load_model
    from moe_compress.streaming import LayerStream, LoadedModel

    params, model_dir = snakemake.params, snakemake.input.model
    if params.layer_streaming:
        return LayerStream(model_dir, params.dtype, params.device, params.trust_remote_code)
    return LoadedModel(load_model(model_dir, params.dtype, params.device, params.trust_remote_code))
