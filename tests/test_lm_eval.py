"""Benchmarks through lm-eval on bundled data, speed, and the score formulas."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import REPO, measure_speed_on_a_controlled_clock
from moe_compress.errors import DataError
from moe_compress.evaluate.lm_eval import (
    CSV_COLUMNS,
    official_tasks_dir,
    primary_score,
    run_benchmark,
    tidy_results,
    write_offline_tasks,
)
from moe_compress.evaluate.speed import measure_speed
from moe_compress.final_table import final_table, perf_norm, score, speed_norm

DATA = REPO / "data/eval"


def official_spec(folder, official_yaml: str, task: str, split: str, docs: list[dict], extra=None) -> str:
    """lm-eval's own task definition of ``task`` as ``official_<task>`` in ``folder``, fed ``docs`` in the hub schema
    from a local JSON file."""
    data = folder / f"{task}_hub_schema.jsonl"
    data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
    spec = {"include": str(official_tasks_dir() / official_yaml), "task": f"official_{task}", "dataset_path": "json",
            "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data)}}, **(extra or {})}
    (folder / f"official_{task}.yaml").write_text(yaml.safe_dump(spec))
    return f"official_{task}"


def rendered(task, doc):
    return task.fewshot_context(doc, 0), task.doc_to_choice(doc), task.doc_to_target(doc)


@pytest.mark.slow  # lm-eval builds its tasks
def test_the_mmlu_hellaswag_and_kmmlu_mirrors_render_the_official_prompt(tmp_path):
    """Each bundled mirror renders the first document as lm-eval's own definition of the task renders it from the
    hub's copy (one task manager for the mirrors and the official definitions: building one is what costs)."""
    from lm_eval.tasks import TaskManager

    mmlu = pd.read_csv(DATA / "mmlu/test/management_test.csv", header=None,
                       names=["question", "A", "B", "C", "D", "answer"]).iloc[0]
    mmlu_doc = {"question": mmlu["question"], "subject": "management",
                "choices": [mmlu[letter] for letter in "ABCD"], "answer": "ABCD".index(mmlu["answer"])}
    raw = json.loads((DATA / "hellaswag_val_subset1000.jsonl").read_text().splitlines()[0])
    hellaswag_doc = {**raw, "label": str(raw["label"])}  # the hub stores the label as a string
    official = tmp_path / "official"
    official.mkdir()
    official_mmlu = official_spec(official, "mmlu/default/mmlu_management.yaml", "mmlu_management", "test",
                                  [mmlu_doc], {"fewshot_split": "test"})
    official_hellaswag = official_spec(official, "hellaswag/hellaswag.yaml", "hellaswag", "validation",
                                       [hellaswag_doc], {"training_split": None})
    mirrors = write_offline_tasks(["mmlu", "hellaswag", "kmmlu"], DATA, tmp_path / "mirror")
    manager = TaskManager(include_path=[str(mirrors), str(official)], include_defaults=False)
    names = ["mmlu_management", "hellaswag", "kmmlu_accounting", official_mmlu, official_hellaswag]
    tasks = manager.load(names)["tasks"]

    ours, theirs = tasks["mmlu_management"], tasks[official_mmlu]
    assert rendered(ours, next(iter(ours.test_docs()))) == rendered(theirs, next(iter(theirs.test_docs())))
    context, choices, target = rendered(ours, next(iter(ours.test_docs())))
    assert context.startswith("The following are multiple choice questions (with answers) about management.")
    assert context.endswith(f"{mmlu['question'].strip()}\nA. {mmlu['A']}\nB. {mmlu['B']}\n"
                            f"C. {mmlu['C']}\nD. {mmlu['D']}\nAnswer:")
    assert choices == ["A", "B", "C", "D"] and target == "ABCD".index(mmlu["answer"])

    ours, theirs = tasks["hellaswag"], tasks[official_hellaswag]
    assert rendered(ours, next(iter(ours.validation_docs()))) == rendered(theirs, next(iter(theirs.validation_docs())))

    kmmlu = tasks["kmmlu_accounting"]
    context, _, target = rendered(kmmlu, next(iter(kmmlu.test_docs())))
    first = pd.read_csv(DATA / "kmmlu/Accounting-test.csv").iloc[0]
    assert context.endswith(f"{first['question'].strip()}\nA. {first['A']}\nB. {first['B']}\nC. {first['C']}\n"
                            f"D. {first['D']}\n정답：")
    assert target == int(first["answer"]) - 1


@pytest.mark.slow
def test_lm_eval_on_a_tiny_model_writes_the_csv_schema(tmp_path, tiny_model_dir):
    results = run_benchmark(tiny_model_dir, "mmlu", source="bundled", data_dir=DATA, work_dir=tmp_path / "tasks",
                            num_fewshot=0, limit=3, batch_size=8)
    table = tidy_results(results, 0, checkpoint=tiny_model_dir)
    assert list(table.columns) == CSV_COLUMNS
    assert set(table["task"]) == {"mmlu", "mmlu_abstract_algebra", "mmlu_college_computer_science",
                                  "mmlu_management", "mmlu_marketing"}
    group = table[(table["task"] == "mmlu") & (table["metric"] == "acc")].iloc[0]
    assert group["n"] == 12 and 0 <= group["value"] <= 1 and group["stderr"] > 0
    assert primary_score(table, "mmlu") == group["value"]
    assert json.dumps(results)  # the raw results are JSON


def test_speed_reports_medians_and_memory(tiny_model):
    prompts = np.random.default_rng(0).integers(0, 300, size=(2, 8))
    result = measure_speed(tiny_model, prompts, decode_tokens=4, repeats=2, warmup=1)
    assert result["prompt_tokens"] == 8 and result["batch"] == 2 and result["repeats"] == 2
    assert result["prefill_tokens_per_s"] > 0 and result["t_token_ms"] > 0 and result["peak_memory_mb"] > 0
    assert 0 < result["t_token_ms_min"] <= result["t_token_ms"] <= result["t_token_ms_max"]
    assert 0 < result["prefill_tokens_per_s_min"] <= result["prefill_tokens_per_s"] <= result["prefill_tokens_per_s_max"]


def test_time_per_token_counts_decode_steps_only(tiny_model, monkeypatch):
    """On a controlled clock a decode step takes 30 ms and a prefill 200 ms: the time per token is exactly
    30 ms, the prefill not in it."""
    result = measure_speed_on_a_controlled_clock(tiny_model, monkeypatch, lambda ids: 0.03 if ids.shape[1] == 1
                                                 else 0.2, repeats=1, warmup=0)
    assert result["t_token_ms"] == pytest.approx(30)
    assert result["prefill_tokens_per_s"] == pytest.approx(16 / 0.2)
    with pytest.raises(DataError, match="decode_tokens must be at least 2"):
        measure_speed(tiny_model, np.zeros((1, 4), dtype=np.int64), decode_tokens=1, repeats=1, warmup=0)


def test_score_formulas_on_fixed_numbers():
    assert perf_norm(0.45, 0.5) == pytest.approx(0.9)
    assert speed_norm(30.0, 40.0) == pytest.approx(0.25)
    assert score(0.9, 0.25) == pytest.approx(0.575)
    assert score(0.2, -1.5) == 0.0  # clipped at zero
    assert list(score(pd.Series([0.9, 0.2]), pd.Series([0.25, -1.5]))) == pytest.approx([0.575, 0.0])


def test_final_table_has_one_row_per_variant_and_no_nan_where_inputs_exist():
    variants = {"base": [], "small": [{"method": "frequency_prune", "min_count": 3}]}
    record = {"parameters": 100, "experts_total": 8, "experts_per_layer": {"0": 8}, "active_experts": 2,
              "loader": "stock", "num_layers": 2}
    records = {"base": record, "small": {**record, "parameters": 80, "experts_total": 6,
                                         "experts_per_layer": {"0": 6}}}
    ppl = {name: pd.DataFrame({"dataset": ["c4_heldout"], "perplexity": [value]})
           for name, value in (("base", 10.0), ("small", 12.0))}
    speeds = {name: pd.DataFrame([{"prefill_tokens_per_s": 100.0, "t_token_ms": t, "t_token_ms_min": t - 1,
                                   "t_token_ms_max": t + 1, "peak_memory_mb": 50.0}])
              for name, t in (("base", 40.0), ("small", 30.0))}
    accuracy = {("base", "mmlu"): 0.5, ("base", "hellaswag"): 0.4, ("small", "mmlu"): 0.45, ("small", "hellaswag"): 0.36}
    task_results = {}
    for (name, task), value in accuracy.items():
        metric = "acc_norm" if task == "hellaswag" else "acc"
        task_results.setdefault(name, {})[task] = pd.DataFrame(
            [{"task": task, "metric": metric, "value": value, "stderr": 0.01, "n": 10, "num_fewshot": 0}])
    table = final_table(variants, records, ppl, speeds, task_results, ["mmlu", "hellaswag"])
    assert table["variant"].tolist() == ["base", "small"]
    assert not table.drop(columns=["layers"]).isna().any().any()
    small = table.set_index("variant").loc["small"]
    assert small["acc_mean"] == pytest.approx(0.405) and small["perf_norm"] == pytest.approx(0.9)
    assert small["speed_norm"] == pytest.approx(0.25) and small["score"] == pytest.approx(0.575)
    assert not small["speed_noisy"]
    assert not math.isnan(small["ppl_c4_heldout_ratio"])
