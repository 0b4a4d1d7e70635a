"""Every evaluation of one checkpoint in one process: speed, perplexity and the lm-eval tasks share a
single load of the model, and each result is remembered by what it was computed from.

A full-size checkpoint takes minutes to load; one load per measurement (speed, perplexity, each lm-eval
task) would cost more than most of the measurements. One job per variant loads it once, lazily: only
when a result is not already known.

What keeps reruns incremental is the memo: each result (speed, one perplexity dataset, one lm-eval task)
is stored under a key made of the checkpoint's checksum record, the checksums of the inputs it read, the
settings it used and the versions of the libraries that computed it. When Snakemake reruns the job
(a task added, a batch size changed), the results whose key is unchanged are read back, not recomputed,
and the model is not loaded at all if nothing is new. A recompressed checkpoint has a new record, so
nothing computed from the old one is ever reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from moe_compress.atomic import atomic_path
from moe_compress.calibration import read_samples
from moe_compress.errors import DataError
from moe_compress.integrity import file_checksum, record_path

log = logging.getLogger(__name__)

MEMO_DIR = ".memo"


def content_key(*parts) -> str:
    """A hex key for JSON-able ``parts`` (order of dict keys does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def output_fingerprint(path: str | Path) -> str:
    """What a workflow output holds, from its checksum record (written when its job finished); a file
    without one (outside the workflow) by its own checksum."""
    record = record_path(path)
    if record.is_file():
        return hashlib.sha256(record.read_bytes()).hexdigest()
    path = Path(path)
    if path.is_file():
        return file_checksum(path)
    raise DataError(f"{path}: no checksum record to identify it by (a workflow output has one once its job ends)")


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("torch", "transformers", "lm_eval", "moe-compress"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


class EvaluationSession:
    """One checkpoint's evaluations; the model is loaded on the first result that is not in the memo."""

    def __init__(self, checkpoint: str | Path, *, dtype: str, device: str, memo_dir: str | Path,
                 trust_remote_code: bool = False):
        self.checkpoint = Path(checkpoint)
        self.dtype, self.device, self.trust_remote_code = dtype, device, trust_remote_code
        self.memo_dir = Path(memo_dir)
        self.model_loads = 0
        self.reused: list[str] = []
        self.computed: list[str] = []
        self._model = None
        self._base_key = {"checkpoint": output_fingerprint(checkpoint), "dtype": dtype, "device": device,
                          "versions": library_versions()}

    @property
    def model(self):
        if self._model is None:
            from moe_compress.modelio import load_model

            log.info("loading %s (%s on %s)", self.checkpoint, self.dtype, self.device)
            self._model = load_model(self.checkpoint, self.dtype, self.device, self.trust_remote_code)
            self.model_loads += 1
        return self._model

    def remembered(self, name: str, key_parts: dict, compute: Callable[[], dict]) -> dict:
        """``compute()``'s JSON result, from the memo where the same inputs were evaluated before."""
        key = content_key(self._base_key, name, key_parts)
        path = self.memo_dir / f"{name}-{key}.json"
        if path.is_file():
            try:
                entry = json.loads(path.read_text())
            except ValueError:
                entry = None  # every entry is written whole; an unreadable one is recomputed
            if isinstance(entry, dict) and entry.get("key") == key:
                log.info("%s: reusing the result computed from the same checkpoint and settings (%s)", name, path)
                self.reused.append(name)
                return entry["result"]
        result = compute()
        self.memo_dir.mkdir(parents=True, exist_ok=True)
        # keys in the order computed (not sorted): a result read back writes the same table as a fresh one
        entry = json.dumps({"key": key, "name": name, "inputs": key_parts, "result": result}, indent=1)
        with atomic_path(path) as tmp:
            tmp.write_text(entry + "\n")
        self.computed.append(name)
        return result

    def speed(self, prompts_path: str | Path, *, num_prompts: int, prompt_tokens: int, decode_tokens: int,
              repeats: int, warmup: int) -> dict:
        settings = {"num_prompts": num_prompts, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
                    "repeats": repeats, "warmup": warmup, "prompts": output_fingerprint(prompts_path)}

        def compute():
            # imported only to compute: a result read from the memo needs neither torch nor transformers
            from moe_compress.evaluate.speed import measure_speed

            windows = read_samples(prompts_path)
            if len(windows) < num_prompts or windows.shape[1] < prompt_tokens:
                raise DataError(f"speed: {prompts_path} has {len(windows)} windows of {windows.shape[1]} tokens; "
                                f"speed.num_prompts={num_prompts} x speed.prompt_tokens={prompt_tokens} asked")
            return measure_speed(self.model, windows[:num_prompts, :prompt_tokens], decode_tokens, repeats, warmup,
                                 checkpoint=str(self.checkpoint))

        return self.remembered("speed", settings, compute)

    def perplexity(self, dataset: str, windows_path: str | Path, *, batch_size: int) -> dict:
        settings = {"dataset": dataset, "windows": output_fingerprint(windows_path), "batch_size": batch_size}

        def compute():
            from moe_compress.evaluate.perplexity import perplexity  # as in speed: not for a remembered result

            return perplexity(self.model, read_samples(windows_path), batch_size, checkpoint=str(self.checkpoint),
                              dataset=dataset)

        return self.remembered(f"perplexity_{dataset}", settings, compute)

    def benchmark(self, task: str, *, source: str, data_dir: str | Path, inputs: list[str], num_fewshot: int,
                  limit: int | None, batch_size: int, backend: str, seed: int) -> dict:
        """lm-eval's results dict for ``task``. ``inputs``: the files the task reads (bundled data, or
        the prefetch record of hub data), identified by content."""
        from moe_compress.evaluate.lm_eval import run_benchmark

        settings = {"task": task, "source": source, "num_fewshot": num_fewshot, "limit": limit,
                    "batch_size": batch_size, "backend": backend, "seed": seed,
                    "inputs": {str(path): output_fingerprint(path) for path in inputs}}

        def compute():
            with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_") as task_dir:
                # vLLM builds its own engine from the path; the hf backend evaluates the model loaded here
                return run_benchmark(self.checkpoint, task, source=source, data_dir=data_dir, work_dir=task_dir,
                                     num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, dtype=self.dtype,
                                     device=self.device, trust_remote_code=self.trust_remote_code, backend=backend,
                                     seed=seed, model=self.model if backend == "hf" else None)

        return self.remembered(f"lm_eval_{task}", settings, compute)

    def summary(self) -> dict:
        return {"model_loads": self.model_loads, "computed": self.computed, "reused": self.reused}


def perplexity_table(rows: dict[str, dict]) -> pd.DataFrame:
    return pd.DataFrame([{"dataset": dataset, **result} for dataset, result in rows.items()])
