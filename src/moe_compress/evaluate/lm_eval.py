"""Zero-shot benchmarks through lm-evaluation-harness's Python API.

Task names are lm-eval's own (``hellaswag``, ``winogrande``, ``mmlu``, ``kmmlu``, ``click``, ...). With
``source: hub`` they run exactly as lm-eval ships them (datasets from the hub, or from the local HF cache
a ``prefetch_eval_data`` run filled). With ``source: bundled`` the tasks this repository carries data for
run through the *official* task definitions with only the data source swapped: each mirror is a YAML
that ``include``s the installed official YAML and overrides the dataset location (and, for MMLU, maps
the upstream CSV layout onto the hub schema the official prompt reads). Prompts, choices, targets and
metrics are lm-eval's. MMLU and KMMLU are groups of the subjects bundled (4 and 3 of 57 and 45).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from moe_compress.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]  # the upstream CSVs have no header row
MMLU_SUBJECTS = ["abstract_algebra", "college_computer_science", "management", "marketing"]
KMMLU_SUBJECTS = {"accounting": "Accounting", "criminal_law": "Criminal-Law", "korean_history": "korean-history"}
# the metric the final table shows per benchmark (the one the papers report)
PRIMARY_METRIC = {"hellaswag": "acc_norm"}
CSV_COLUMNS = ["task", "metric", "value", "stderr", "n", "num_fewshot"]


@dataclass(frozen=True)
class TaskMirror:
    """An official lm-eval task, its data read from bundled files."""

    task: str
    official_yaml: str  # relative to the installed lm_eval/tasks
    builder: str  # datasets builder: json or csv
    data_files: dict[str, str]  # split -> path relative to the data directory
    column_names: tuple[str, ...] | None = None
    process_docs: str | None = None  # importable function, replacing the official one
    extra: dict = field(default_factory=dict)


# the training splits are not bundled: few-shot examples then come from the evaluated split itself
# (lm-eval excludes the document being asked); zero-shot, the default, does not use them
NO_TRAINING_SPLIT = {"training_split": None}


def _mirrors() -> dict[str, list[TaskMirror]]:
    mmlu = [TaskMirror(f"mmlu_{subject}", f"mmlu/default/mmlu_{subject}.yaml", "csv",
                       {"test": f"mmlu/test/{subject}_test.csv", "dev": f"mmlu/dev/{subject}_dev.csv"},
                       column_names=tuple(MMLU_COLUMNS), process_docs="moe_compress.evaluate.lm_eval.mmlu_docs")
            for subject in MMLU_SUBJECTS]
    kmmlu = [TaskMirror(f"kmmlu_{name}", f"kmmlu/default/kmmlu_{name}.yaml", "csv",
                        {"test": f"kmmlu/{stem}-test.csv", "dev": f"kmmlu/{stem}-dev.csv"})
             for name, stem in KMMLU_SUBJECTS.items()]
    return {
        "hellaswag": [TaskMirror("hellaswag", "hellaswag/hellaswag.yaml", "json",
                                 {"validation": "hellaswag_val_subset1000.jsonl"}, extra=NO_TRAINING_SPLIT)],
        "winogrande": [TaskMirror("winogrande", "winogrande/default.yaml", "json",
                                  {"validation": "winogrande_dev.jsonl"}, extra=NO_TRAINING_SPLIT)],
        "mmlu": mmlu,
        "kmmlu": kmmlu,
    }


def bundled_tasks() -> list[str]:
    return sorted(_mirrors())


def bundled_data_files(task: str, data_dir: str | Path) -> list[Path]:
    """The files of ``data_dir`` that the bundled ``task`` (or group) reads."""
    mirrors = _mirrors()
    if task not in mirrors:
        raise ConfigError(f"config key 'evaluation.tasks': {task} has no bundled data (bundled: "
                          f"{', '.join(bundled_tasks())}); use evaluation.source: hub for it")
    return [Path(data_dir) / path for mirror in mirrors[task] for path in mirror.data_files.values()]


def mmlu_docs(dataset):
    """Upstream MMLU rows (question, A-D, answer letter) in the hub schema the official prompt reads
    (question, choices, answer index)."""
    dataset = dataset.rename_column("answer", "answer_letter")  # the new integer column must not inherit its type

    def convert(doc):
        return {"choices": [str(doc[letter]) for letter in "ABCD"],
                "answer": "ABCD".index(str(doc["answer_letter"]).strip())}

    return dataset.map(convert, remove_columns=["A", "B", "C", "D", "answer_letter"])


def official_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def write_offline_tasks(tasks: list[str], data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the mirror YAMLs of ``tasks`` into ``out_dir`` (an lm-eval include path)."""
    mirrors = _mirrors()
    unknown = [task for task in tasks if task not in mirrors]
    if unknown:
        raise ConfigError(f"config key 'evaluation.tasks': {unknown} have no bundled data (bundled: "
                          f"{', '.join(bundled_tasks())}); use evaluation.source: hub for them")
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    official = official_tasks_dir()
    for task in tasks:
        for mirror in mirrors[task]:
            files = {split: str(data_dir / path) for split, path in mirror.data_files.items()}
            missing = [path for path in files.values() if not Path(path).is_file()]
            if missing:
                raise DataError(f"bundled data for task {mirror.task} not found: {missing}")
            kwargs = {"data_files": files}
            if mirror.column_names:
                kwargs["column_names"] = list(mirror.column_names)
            spec = {"include": str(official / mirror.official_yaml), "task": mirror.task,
                    "dataset_path": mirror.builder, "dataset_name": None, "dataset_kwargs": kwargs, **mirror.extra}
            text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
            if mirror.process_docs:
                text += f"process_docs: !function {mirror.process_docs}\n"
            (out_dir / f"{mirror.task}.yaml").write_text(text)
        if len(mirrors[task]) > 1:  # the group, aggregated like the official one
            group = {"group": task, "task": [mirror.task for mirror in mirrors[task]],
                     "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                     "metadata": {"version": 2.0, "bundled_subjects_only": True}}
            (out_dir / f"_{task}_group.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return out_dir


def task_manager(source: str, tasks: list[str], data_dir: str | Path, work_dir: str | Path):
    from lm_eval.tasks import TaskManager

    if source == "bundled":  # the mirrors include the official YAMLs by path: lm-eval's index of its own is not read
        return TaskManager(include_path=str(write_offline_tasks(tasks, data_dir, work_dir)), include_defaults=False)
    return TaskManager()


def prefetch(tasks: list[str]) -> dict:
    """Download the datasets of ``tasks`` (lm-eval's own definitions) into the hub cache (HF_HOME), on a
    host with hub access, so evaluation jobs on offline compute nodes find them there. Returns the
    documents per task."""
    from lm_eval.tasks import TaskManager

    loaded = TaskManager().load(tasks)  # building a task downloads its dataset
    summary = {}
    for name, task in loaded["tasks"].items():
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        summary[name] = len(docs) if docs is not None else 0
    return summary


def model_arguments(model_path: str | Path, dtype: str, device: str, trust_remote_code: bool, backend: str) -> dict:
    from moe_compress.modelio import check_model_dir, needs_remote_code

    path = check_model_dir(model_path, weights=True)
    remote = needs_remote_code(path)
    if backend == "vllm":
        # a checkpoint with per-layer experts is served by the moe-compress vLLM plugin, never by its remote code
        try:
            import vllm  # noqa: F401  (only: is it installed)
        except ImportError:
            raise ModelError("evaluation.backend: vllm runs in the serving environment (make setup-serve, or "
                             "envs/serve/environment.yaml on GPU nodes)") from None
        return {"pretrained": str(path), "dtype": dtype, "trust_remote_code": False}
    return {"pretrained": str(path), "dtype": dtype, "trust_remote_code": remote or trust_remote_code}


def run_benchmark(model_path: str | Path, task: str, *, source: str, data_dir: str | Path, work_dir: str | Path,
                  num_fewshot: int, limit: int | None, batch_size: int, dtype: str = "float32", device: str = "cpu",
                  trust_remote_code: bool = False, backend: str = "hf", seed: int = 0, model=None) -> dict:
    """Run one lm-eval task (or group) on a checkpoint; return lm-eval's results dict (JSON-safe).

    ``model``: the checkpoint already loaded (hf backend: the torch model; vllm backend: lm-eval's vLLM model,
    whose engine the serving job also measures), so several tasks share one load; lm-eval then reads only the
    tokenizer from ``model_path``."""
    import lm_eval

    from moe_compress.modelio import resolve_device

    arguments = model_arguments(model_path, dtype, device, trust_remote_code, backend)
    device = str(resolve_device(device))  # "auto" made concrete here, with our error where CUDA is missing
    manager = task_manager(source, [task], data_dir, work_dir)
    if model is not None and backend == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=arguments["pretrained"], batch_size=batch_size,
                  trust_remote_code=arguments["trust_remote_code"])
        backend_or_model, arguments = lm, None
    elif model is not None:
        backend_or_model, arguments = model, None
    else:
        backend_or_model = backend
    results = lm_eval.simple_evaluate(model=backend_or_model, model_args=arguments, tasks=[task], num_fewshot=num_fewshot,
                                      limit=limit, batch_size=batch_size, device=device if backend == "hf" else None,
                                      task_manager=manager, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=1000)
    if results is None:
        raise ModelError(f"lm-eval returned no results for task {task}")
    return json.loads(json.dumps(results, default=str))  # plain JSON types (numpy scalars, dtypes)


def tidy_results(results: dict, num_fewshot: int, *, checkpoint: str | Path = "the checkpoint") -> pd.DataFrame:
    """One row per (task or group, metric): value, stderr, number of documents, few-shot count. A NaN or inf
    value stops here, naming ``checkpoint``, the task and the metric (a missing stderr is NaN and allowed)."""
    rows = []
    samples = results.get("n-samples", {})
    for name, metrics in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            count = samples.get(name, {}).get("effective")
            if count is None:  # a group: the documents of its subtasks
                subtasks = results.get("group_subtasks", {}).get(name, [])
                count = sum(samples.get(sub, {}).get("effective", 0) for sub in subtasks) or None
            rows.append({"task": name, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                         "n": count, "num_fewshot": num_fewshot})
    table = pd.DataFrame(rows, columns=CSV_COLUMNS).drop_duplicates(["task", "metric"])
    table = table.sort_values(["task", "metric"], ignore_index=True)
    non_finite = table[~np.isfinite(table["value"].to_numpy(dtype=float))]
    if not non_finite.empty:
        listed = ", ".join(f"task {row.task} {row.metric} = {row.value}" for row in non_finite.itertuples())
        raise ModelError(f"lm-eval on {checkpoint}: non-finite results ({listed}); check the checkpoint's weights")
    return table


def _primary_row(table: pd.DataFrame, task: str) -> pd.Series:
    metric = PRIMARY_METRIC.get(task, "acc")
    rows = table[(table["task"] == task) & (table["metric"] == metric)]
    if rows.empty:
        rows = table[(table["task"] == task) & (table["metric"] == "acc")]
    if rows.empty:
        raise DataError(f"no {metric} for task {task} in the lm-eval results")
    return rows.iloc[0]


def primary_score(table: pd.DataFrame, task: str) -> float:
    """The benchmark's headline number: the task's (or group's) primary metric."""
    return float(_primary_row(table, task)["value"])


def primary_stderr(table: pd.DataFrame, task: str) -> float:
    """The standard error lm-eval reports for that number (NaN where it reports none)."""
    row = _primary_row(table, task)
    return float(pd.to_numeric(row.get("stderr"), errors="coerce"))
