"""The final table: one row per variant, joined from compression records and evaluation CSVs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from moe_compress.atomic import atomic_path
from moe_compress.config import BASE_VARIANT, step_defaults
from moe_compress.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# per evaluation CSV: the columns the table needs that label a row, and the measured ones (which must be finite;
# an lm-eval stderr may be missing, so it is not among them)
EVALUATION_CSVS = {
    "perplexity": {"labels": ["dataset"], "measured": ["tokens", "nll", "perplexity"]},
    "lm_eval": {"labels": ["task", "metric"], "measured": ["value"]},
    "speed": {"labels": [], "measured": ["prefill_tokens_per_s", "prefill_tokens_per_s_min", "prefill_tokens_per_s_max",
                                         "t_token_ms", "t_token_ms_min", "t_token_ms_max", "peak_memory_mb"]},
}


def read_evaluation_csv(path: str | Path, kind: str) -> pd.DataFrame:
    """An evaluation job's CSV (``kind``: perplexity, lm_eval or speed), refused with the file and column named
    when a column is missing or a measured value is not a finite number (a hand-edited or stale file)."""
    expected = EVALUATION_CSVS[kind]
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{kind} results {path}: the file is empty; rerun the {kind} job") from None
    missing = [column for column in expected["labels"] + expected["measured"] if column not in table.columns]
    if missing:
        raise DataError(f"{kind} results {path}: no column {', '.join(missing)}; rerun the {kind} job "
                        f"(a file written by an older version lacks it)")
    if table.empty:
        raise DataError(f"{kind} results {path}: no rows; rerun the {kind} job")
    for column in expected["measured"]:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad))
            value = table[column].iloc[row]
            shown = repr(value) if isinstance(value, str) else value  # NaN is read from an empty cell, too
            raise DataError(f"{kind} results {path}: column {column} holds {shown} (row {row + 1}), "
                            f"not a finite number; rerun the {kind} job")
    return table


def read_task_results(directory: str | Path, tasks: list[str], served_elsewhere: bool = False) -> dict[str, pd.DataFrame]:
    """A variant's lm-eval CSVs by task. ``served_elsewhere``: the tasks ran in an engine that did not serve the
    variant (evaluation.backend: vllm), so it has none; its accuracy cells stay empty and the table's notes
    say why."""
    if served_elsewhere:
        return {}
    return {task: read_evaluation_csv(Path(directory) / f"{task}.csv", "lm_eval") for task in tasks}


def describe_steps(steps: list[dict]) -> str:
    """"method(key=value, ...) -> ..." with the values that differ from the method's defaults."""
    if not steps:
        return "none"
    parts = []
    for step in steps:
        defaults = step_defaults(step["method"])
        args = ", ".join(f"{key}={value}" for key, value in step.items()
                         if key != "method" and (key not in defaults or defaults[key] != value))
        parts.append(f"{step['method']}({args})")
    return " -> ".join(parts)


def mean_reconstruction_error(record: dict) -> float:
    """Mean over layers of the error after the variant's last step (0 for the unmodified model)."""
    reports = record.get("step_reports", [])
    if not reports:
        return 0.0
    errors = reports[-1].get("reconstruction_error", {})
    return sum(errors.values()) / len(errors) if errors else float("nan")


def mean_active_experts(record: dict) -> float:
    """Mean over MoE layers of the experts actually weighted per token on held-out calibration tokens
    after the last step (dynamic skipping makes it fractional); the top-k where nothing was measured."""
    reports = record.get("step_reports", [])
    measured = reports[-1].get("active_experts_mean", {}) if reports else {}
    return sum(measured.values()) / len(measured) if measured else float(record["active_experts"])


def targets_met(record: dict) -> tuple[str, str]:
    """(the whole-model targets of the variant's steps, e.g. "experts_fraction=0.75", and their allocation
    rules; empty where no step had one). What was achieved is in experts_kept and parameters."""
    reports = [report for report in record.get("step_reports", []) if "target" in report]
    targets = "; ".join(f"{kind}={value}" for report in reports for kind, value in report["target"].items())
    return targets, "; ".join(report["allocation"] for report in reports)


def experts_with_weights(record: dict) -> dict[str, int]:
    """Per MoE layer, the routed experts that still compute: the router's rows less MoNE's novices, which answer
    with a constant (``novice_per_layer``)."""
    novices = record.get("novice_per_layer") or {}
    return {layer: count - len(novices.get(layer, {}).get("novices", []))
            for layer, count in record["experts_per_layer"].items()}


def variant_row(name: str, steps: list[dict], record: dict, perplexity: pd.DataFrame) -> dict:
    target, allocation = targets_met(record)
    experts = experts_with_weights(record)
    top_k = [settings.get("top_k") for _, settings in sorted(record.get("router_settings_per_layer", {}).items(),
                                                              key=lambda kv: int(kv[0]))]
    row = {
        "variant": name,
        "method": describe_steps(steps),
        "params_b": record["parameters"] / 1e9,
        "parameters": record["parameters"],
        "experts_kept": sum(experts.values()),
        "experts_per_layer": " ".join(str(n) for _, n in sorted(experts.items(), key=lambda kv: int(kv[0]))),
        "novice_experts": record["experts_total"] - sum(experts.values()),
        "top_k": record["active_experts"],
        "top_k_per_layer": " ".join(str(k) for k in top_k if k is not None),
        "target": target,
        "allocation": allocation,
        "active_experts": mean_active_experts(record),
        "layers": record.get("num_layers"),
        "loader": record["loader"],
        "recon_error_mean": mean_reconstruction_error(record),
    }
    for dataset, value in perplexity.set_index("dataset")["perplexity"].items():
        row[f"ppl_{dataset}"] = value
    return row


def describe_weights(weights: dict | None) -> str:
    """A variant's calibration weights as "c4=0.5 code=0.5" (empty: the whole calibration set)."""
    return " ".join(f"{name}={share:g}" for name, share in weights.items()) if weights else ""


# domain-specific experts named per source in the table's notes, at most
DOMAIN_EXPERTS_LISTED = 12


def domain_expert_notes(experts: pd.DataFrame) -> list[str]:
    """The notes naming each calibration source's domain-specific experts (``stats.domain_experts``'s table),
    most specific first; none with one source."""
    specific = experts[experts["domain_specific"].astype(bool)]
    sources = [column.removeprefix("frequency_") for column in experts.columns if column.startswith("frequency_")]
    if len(sources) < 2:
        return []
    lines = []
    for source in sources:
        rows = specific[specific["source"] == source]
        if rows.empty:
            lines.append(f"- `{source}`: none")
            continue
        named = ", ".join(f"L{row.layer}E{row.expert} ({getattr(row, f'frequency_{source}'):.2f}, specificity "
                          f"{row.specificity:.2f})" for row in rows.head(DOMAIN_EXPERTS_LISTED).itertuples())
        more = f" and {len(rows) - DOMAIN_EXPERTS_LISTED} more" if len(rows) > DOMAIN_EXPERTS_LISTED else ""
        lines.append(f"- `{source}`: {len(rows)} experts: {named}{more}")
    return ["Domain-specific experts (selected at least 4x as often per token by one calibration source as by any "
            "other; layer, expert, that source's selection frequency; all in results/stats/domain_experts.csv):\n"
            + "\n".join(lines)]


def perf_norm(perf, perf_base):
    """PerfNorm = perf / perf_base."""
    return perf / perf_base


def speed_norm(t_token, t_token_base):
    """SpeedNorm = 1 - t_token / t_token_base (positive when faster than the reference)."""
    return 1 - t_token / t_token_base


def score(perf_normalised, speed_normalised):
    """Score = max(0.5 PerfNorm + 0.5 SpeedNorm, 0); scalars or pandas Series."""
    value = 0.5 * perf_normalised + 0.5 * speed_normalised
    return value.clip(lower=0) if hasattr(value, "clip") else max(value, 0.0)


def speed_norm_interval(table: pd.DataFrame, base: pd.Series) -> tuple[pd.Series, pd.Series]:
    """The lowest and highest SpeedNorm the timed repeats allow: this variant's slowest run against the
    reference's fastest, and the other way round."""
    low = speed_norm(table["t_token_ms_max"], base["t_token_ms_min"])
    high = speed_norm(table["t_token_ms_min"], base["t_token_ms_max"])
    return low, high


def warn_noisy_speeds(table: pd.DataFrame) -> None:
    noisy = table[table["speed_noisy"]]
    if noisy.empty:
        return
    listed = ", ".join(f"{row.variant} (SpeedNorm {row.speed_norm:.3g}, repeats allow {row.speed_norm_low:.3g} "
                       f"to {row.speed_norm_high:.3g})" for row in noisy.itertuples())
    log.warning("speed_noisy: the spread of the timed speed repeats is wider than |SpeedNorm| for %s; their "
                "SpeedNorm and Score are not reliable: rerun the speed jobs on an idle machine or raise speed.repeats",
                listed)


def final_table(variants: dict[str, list[dict]], records: dict[str, dict], perplexities: dict[str, pd.DataFrame],
                speeds: dict[str, pd.DataFrame] | None = None,
                task_results: dict[str, dict[str, pd.DataFrame]] | None = None, tasks: list[str] = (),
                perf_metric: str = "lm_eval", reference: str = BASE_VARIANT,
                sweeps: dict[str, str] | None = None, serving: dict[str, dict] | None = None,
                weights: dict[str, dict | None] | None = None,
                primary_perplexity: str = "c4_heldout") -> pd.DataFrame:
    """One row per variant: its sweep (``sweeps``, a line in the plots), size, experts, routing and targets,
    reconstruction error, perplexities, the primary metric of each lm-eval task
    (``task_results[variant][task]``) with its standard error, their mean (and its standard error), speed, and
    PerfNorm / SpeedNorm / Score against the ``reference`` variant, with the SpeedNorm interval the speed
    repeats allow and ``speed_noisy`` where that interval is wider than |SpeedNorm|. ``serves_in``: the engines
    that serve the checkpoint as the pipeline's transformers runs it (``serving``: the serving reports, where the
    serving job ran; otherwise the transformers the evaluate job loaded it with), and vLLM's speed.
    ``weights``: each variant's calibration weights (``calibration_weights``, empty for the whole calibration
    set). Per perplexity dataset (each calibration source's held-out documents, WikiText-2): ``ppl_<dataset>``,
    its ratio to the reference and ``retention_<dataset>`` = the reference's perplexity / the variant's (1: no
    loss). With perf_metric: perplexity, perf is 1 / ``ppl_<primary_perplexity>`` (the first source's)."""
    from moe_compress.serving.report import PIPELINE_ENGINE, table_columns
    from moe_compress.evaluate.lm_eval import primary_score, primary_stderr

    if reference not in variants:
        raise ConfigError(f"config key 'score.reference': '{reference}' is not a variant "
                          f"(variants: {', '.join(variants)})")
    speeds, task_results = speeds or {}, task_results or {}
    rows = []
    for name, steps in variants.items():
        row = {"variant": name, "sweep": (sweeps or {}).get(name, name),
               **variant_row(name, steps, records[name], perplexities[name]),
               "calibration_weights": describe_weights((weights or {}).get(name))}
        for task in tasks:
            if task in task_results.get(name, {}):
                row[f"acc_{task}"] = primary_score(task_results[name][task], task)
                row[f"acc_{task}_stderr"] = primary_stderr(task_results[name][task], task)
        row.update(table_columns(serving[name]) if serving else {"serves_in": PIPELINE_ENGINE})
        if name in speeds:
            speed = speeds[name].iloc[0]
            row.update({"prefill_tok_s": speed["prefill_tokens_per_s"], "t_token_ms": speed["t_token_ms"],
                        "t_token_ms_min": speed["t_token_ms_min"], "t_token_ms_max": speed["t_token_ms_max"],
                        "peak_memory_mb": speed["peak_memory_mb"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    accuracy_columns = [f"acc_{task}" for task in tasks if f"acc_{task}" in table.columns]
    if accuracy_columns:
        table["acc_mean"] = table[accuracy_columns].mean(axis=1, skipna=False)
        # the tasks' samples are independent: the mean's variance is the sum of theirs over n^2
        stderr = table[[f"{column}_stderr" for column in accuracy_columns]]
        table["acc_mean_stderr"] = np.sqrt((stderr ** 2).sum(axis=1, skipna=False)) / len(accuracy_columns)
    use_tasks = perf_metric == "lm_eval" and bool(accuracy_columns)
    primary = f"ppl_{primary_perplexity}"
    if not use_tasks and primary not in table.columns:
        raise DataError(f"perf_metric perplexity reads {primary}, which the perplexity results lack; rerun the "
                        f"evaluate jobs")
    table["perf"] = table["acc_mean"] if use_tasks else 1.0 / table[primary]
    table["perf_source"] = "acc_mean" if use_tasks else f"1/{primary}"
    is_reference = table["variant"] == reference
    base = table[is_reference].iloc[0]
    if not np.isfinite(base["perf"]):
        raise DataError(f"the reference variant '{reference}' has no {table['perf_source'].iloc[0]}, so PerfNorm "
                        f"cannot be computed; evaluate it on every task (evaluation.variants)")
    table["experts_kept_ratio"] = table["experts_kept"] / base["experts_kept"]
    table["params_ratio"] = table["parameters"] / base["parameters"]
    for column in [c for c in table.columns if c.startswith("ppl_") and not c.endswith("_ratio")]:
        table[f"{column}_ratio"] = table[column] / base[column]
    for column in [c for c in table.columns if c.startswith("ppl_") and not c.endswith("_ratio")]:
        table[f"retention_{column.removeprefix('ppl_')}"] = base[column] / table[column]
    table["perf_norm"] = perf_norm(table["perf"], base["perf"])
    if "t_token_ms" in table.columns:
        table["speed_norm"] = speed_norm(table["t_token_ms"], base["t_token_ms"])
        low, high = speed_norm_interval(table, base)
        # the reference's SpeedNorm is 0 by definition, whatever its timings
        table["speed_norm_low"] = low.mask(is_reference, 0.0)
        table["speed_norm_high"] = high.mask(is_reference, 0.0)
        table["speed_noisy"] = (table["speed_norm_high"] - table["speed_norm_low"]) > table["speed_norm"].abs()
        table["score"] = score(table["perf_norm"], table["speed_norm"])
        warn_noisy_speeds(table)
    return table


def to_markdown(table: pd.DataFrame, reference: str = BASE_VARIANT) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    relative = "PerfNorm, SpeedNorm, Score and the `*_ratio` columns are relative to it"
    notes = [f"Reference variant: `{reference}` ({relative})."]
    if "speed_noisy" in table.columns and table["speed_noisy"].any():
        noisy = ", ".join(f"`{name}`" for name in table.loc[table["speed_noisy"], "variant"])
        notes.append(f"speed_noisy: the spread of the timed speed repeats is wider than |SpeedNorm| for {noisy}; "
                     f"their SpeedNorm and Score are not reliable.")
    return "\n".join([header, rule, *rows]) + "\n\n" + "\n\n".join(notes) + "\n"


def write_final_table(table: pd.DataFrame, csv_path: str | Path, md_path: str | Path,
                      reference: str = BASE_VARIANT, notes: list[str] = ()) -> None:
    """The table as CSV and Markdown; ``notes`` (e.g. the variants an engine does not serve) follow the
    Markdown table."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(table, reference) + "".join(f"\n{note}\n" for note in notes))
    for note in notes:
        log.warning("%s", note)

