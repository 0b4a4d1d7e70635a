"""The library environment's half of the serving jobs: the transformers reference of a checkpoint
(``serving_reference`` rule), and the ``serving`` rule's call of the serving environment (``engine_job``), whose
interpreter is another Python (vLLM pins its own transformers)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import moe_compress
from moe_compress.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

# where make setup-serve builds the serving environment, relative to the workflow's directory
DEFAULT_SERVING_VENV = Path(".venv-serve")


def transformers_reference_of(checkpoint: str | Path, dtype: str, device: str, max_new_tokens: int) -> dict:
    """The pipeline's transformers on ``checkpoint``: greedy continuations of the fixed prompts with their
    log-probabilities (``agreement.transformers_reference``)."""
    import transformers

    from moe_compress.checkpoint_files import context_length
    from moe_compress.modelio import load_model, load_tokenizer
    from moe_compress.serving.agreement import prompt_token_ids, transformers_reference

    model = load_model(checkpoint, dtype=dtype, device=device)
    # prompt and continuation within the model's context, which an engine enforces
    longest_prompt = (context_length(checkpoint) or 2**31) - max_new_tokens
    prompts = [ids[:longest_prompt] for ids in prompt_token_ids(load_tokenizer(checkpoint))]
    return {"checkpoint": str(checkpoint), "transformers": transformers.__version__, "dtype": dtype,
            "references": transformers_reference(model, prompts, max_new_tokens)}


def serving_python(configured: str | None) -> str:
    """The serving environment's interpreter: ``serving.python``, else ``.venv-serve/bin/python`` (where make
    setup-serve builds it, or ``conda env create -p .venv-serve -f envs/serve/environment.yaml`` on GPU nodes), else this
    job's own (an environment the user put vLLM in)."""
    if configured:
        if not Path(configured).exists():
            raise ConfigError(f"config key 'serving.python': {configured} does not exist")
        return configured
    venv_python = DEFAULT_SERVING_VENV / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def run_engine_job(python: str, spec: dict, log_path: str | Path | None = None) -> dict:
    """Run ``engine_job`` with ``spec`` in the serving environment; its output goes to ``log_path`` (appended);
    return its result. A failure of the job itself (not a refusal by vLLM, which is a result) raises."""
    return run_engine_jobs(python, [spec], log_path)[0]


def run_engine_jobs(python: str, specs: list[dict], log_path: str | Path | None = None) -> list[dict]:
    """``run_engine_job`` for several checkpoints in one process of the serving environment."""
    with tempfile.TemporaryDirectory(prefix="moe-compress-serving-") as work:
        spec_path = Path(work) / "spec.json"
        result_paths = [Path(work) / f"result-{index}.json" for index in range(len(specs))]
        spec_path.write_text(json.dumps([{**spec, "result": str(path)} for spec, path in zip(specs, result_paths)]))
        command = [python, "-m", "moe_compress.serving.engine_job", str(spec_path)]
        log.info("serving environment: %s", " ".join(command))
        # this package's own source, first on the path: the serving environment needs vLLM and lm-eval, not
        # moe-compress installed (its pins of transformers differ from vLLM's)
        package_root = str(Path(moe_compress.__file__).resolve().parent.parent)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        with open(log_path or os.devnull, "a") as sink:
            finished = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=environment, check=False)
        if finished.returncode != 0 or not all(path.exists() for path in result_paths):
            raise ModelError(f"the serving environment's job failed (exit {finished.returncode}, {python}); its "
                             f"output is in {log_path or 'the job log'}. Is vLLM installed there (make setup-serve)?")
        return [json.loads(path.read_text()) for path in result_paths]
