"""Evaluation results are finite or the job fails; speed noise is carried into the final table and flagged;
PerfNorm / SpeedNorm / Score are relative to the configured reference variant."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import measure_speed_on_a_controlled_clock
from moe_compress.errors import ConfigError, DataError, ModelError
from moe_compress.evaluate import speed as speed_module
from moe_compress.evaluate.lm_eval import tidy_results
from moe_compress.evaluate.perplexity import perplexity
from moe_compress.evaluate.speed import measure_speed
from moe_compress.final_table import final_table, read_evaluation_csv, to_markdown

RECORD = {"parameters": 100, "experts_total": 8, "experts_per_layer": {"0": 8}, "active_experts": 2,
          "loader": "stock", "num_layers": 2}


def speed_frame(median: float, fastest: float, slowest: float) -> pd.DataFrame:
    return pd.DataFrame([{"prefill_tokens_per_s": 100.0, "t_token_ms": median, "t_token_ms_min": fastest,
                          "t_token_ms_max": slowest, "peak_memory_mb": 50.0}])


def table_of(timings: dict[str, tuple[float, float, float]], reference: str = "base",
             perplexities: dict[str, float] | None = None) -> pd.DataFrame:
    """The final table of variants given by their (median, min, max) time per token; perf from perplexity."""
    variants = {name: [] if name == reference else [{"method": "frequency_prune", "min_count": 3}] for name in timings}
    perplexities = perplexities or dict.fromkeys(timings, 10.0)
    ppl = {name: pd.DataFrame({"dataset": ["c4_heldout"], "perplexity": [perplexities[name]]}) for name in timings}
    speeds = {name: speed_frame(*timing) for name, timing in timings.items()}
    return final_table(variants, dict.fromkeys(timings, RECORD), ppl, speeds, reference=reference)


# --- speed: the spread of the timed repeats -----------------------------------------------------------------


def test_speed_reports_min_median_and_max_of_the_timed_repeats(tiny_model, monkeypatch):
    """On a controlled clock every forward takes 1 ms, and the decode steps of the second timed run 200 ms
    more: the max shows them, the median and the min do not."""
    forwards = []

    def seconds(ids) -> float:
        forwards.append(ids.shape[1])
        runs_started = sum(length > 1 for length in forwards) // 2  # two per run: the timed prefill, generate's
        return 0.201 if ids.shape[1] == 1 and runs_started == 3 else 0.001  # run 0 is the warm-up

    result = measure_speed_on_a_controlled_clock(tiny_model, monkeypatch, seconds, repeats=3, warmup=1)
    assert result["t_token_ms_max"] == pytest.approx(201)
    assert result["t_token_ms"] == pytest.approx(1) and result["t_token_ms_min"] == pytest.approx(1)
    # 16 prompt tokens in every 1 ms prefill
    assert result["prefill_tokens_per_s_min"] == result["prefill_tokens_per_s"] == pytest.approx(16_000)


def test_speed_refuses_a_non_finite_time(tiny_model, monkeypatch):
    monkeypatch.setattr(speed_module, "time", SimpleNamespace(perf_counter=lambda: math.nan))
    with pytest.raises(ModelError, match=r"speed of results/checkpoints/broken: \w+ is nan"):
        measure_speed(tiny_model, np.zeros((1, 4), dtype=np.int64), decode_tokens=2, repeats=1, warmup=0,
                      checkpoint="results/checkpoints/broken")


# --- perplexity and lm-eval: a NaN or inf result fails the job ----------------------------------------------


def test_perplexity_of_corrupted_weights_fails_naming_checkpoint_dataset_and_metric(tiny_model):
    windows = np.random.default_rng(0).integers(0, 300, size=(3, 12))
    assert math.isfinite(perplexity(tiny_model, windows, batch_size=2)["perplexity"])
    with torch.no_grad():
        tiny_model.lm_head.weight[0, 0] = math.nan
    with pytest.raises(ModelError, match="perplexity of results/checkpoints/bad on c4_heldout: nll is nan"):
        perplexity(tiny_model, windows, batch_size=2, checkpoint="results/checkpoints/bad", dataset="c4_heldout")


def test_perplexity_that_overflows_is_refused(tiny_model):
    """A finite nll too large for exp is an inf perplexity: refused, not an OverflowError."""
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(1e6)
    with pytest.raises(ModelError, match="on wikitext2: (nll|perplexity) is inf"):
        perplexity(tiny_model, np.random.default_rng(0).integers(0, 300, size=(2, 12)), batch_size=2,
                   checkpoint="ckpt", dataset="wikitext2")


def lm_eval_results(**metrics) -> dict:
    return {"results": {"hellaswag": {"alias": "hellaswag", **metrics}}, "n-samples": {"hellaswag": {"effective": 10}}}


def test_lm_eval_results_with_a_nan_metric_are_refused_naming_checkpoint_task_and_metric():
    results = lm_eval_results(**{"acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": math.nan,
                                 "acc_norm_stderr,none": 0.01})
    with pytest.raises(ModelError, match=r"lm-eval on results/checkpoints/bad: .*task hellaswag acc_norm = nan"):
        tidy_results(results, 0, checkpoint="results/checkpoints/bad")
    inf = lm_eval_results(**{"acc,none": math.inf, "acc_stderr,none": 0.01})
    with pytest.raises(ModelError, match="task hellaswag acc = inf"):
        tidy_results(inf, 0, checkpoint="ckpt")


def test_lm_eval_results_without_a_stderr_are_kept():
    table = tidy_results(lm_eval_results(**{"acc,none": 0.3, "acc_stderr,none": "N/A"}), 0, checkpoint="ckpt")
    assert table["value"].tolist() == [0.3] and math.isnan(table["stderr"].iloc[0])


# --- the final table's inputs: present and finite -----------------------------------------------------------


def test_final_table_input_with_nan_is_refused_naming_file_and_column(tmp_path):
    path = tmp_path / "perplexity.csv"
    pd.DataFrame({"dataset": ["c4_heldout", "wikitext2"], "tokens": [100, 100], "nll": [2.0, math.nan],
                  "perplexity": [7.4, math.nan]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=f"perplexity results {path}: column nll holds nan"):
        read_evaluation_csv(path, "perplexity")
    lm_eval = tmp_path / "mmlu.csv"
    pd.DataFrame([{"task": "mmlu", "metric": "acc", "value": "inf", "stderr": math.nan, "n": 12,
                   "num_fewshot": 0}]).to_csv(lm_eval, index=False)
    with pytest.raises(DataError, match=f"lm_eval results {lm_eval}: column value holds"):
        read_evaluation_csv(lm_eval, "lm_eval")
    edited = tmp_path / "speed.csv"
    row = {"prefill_tokens_per_s": 1.0, "prefill_tokens_per_s_min": 1.0, "prefill_tokens_per_s_max": 1.0,
           "t_token_ms": "fast", "t_token_ms_min": 1.0, "t_token_ms_max": 1.0, "peak_memory_mb": 1.0}
    pd.DataFrame([row]).to_csv(edited, index=False)
    with pytest.raises(DataError, match=f"speed results {edited}: column t_token_ms holds 'fast'"):
        read_evaluation_csv(edited, "speed")


def test_final_table_input_without_a_column_is_refused_naming_file_and_column(tmp_path):
    old_speed = tmp_path / "speed.csv"  # as written before the spread was recorded
    pd.DataFrame([{"device": "cpu", "batch": 4, "prompt_tokens": 64, "decode_tokens": 32, "repeats": 5,
                   "prefill_tokens_per_s": 100.0, "t_token_ms": 20.0, "peak_memory_mb": 50.0,
                   "memory_kind": "cpu_peak_rss"}]).to_csv(old_speed, index=False)
    with pytest.raises(DataError, match=f"speed results {old_speed}: no column .*t_token_ms_min"):
        read_evaluation_csv(old_speed, "speed")


def test_final_table_input_that_is_fine_is_read():
    """A missing lm-eval stderr is allowed: only measured values must be finite."""
    from io import StringIO

    table = read_evaluation_csv(StringIO("task,metric,value,stderr,n,num_fewshot\nmmlu,acc,0.25,,12,0\n"), "lm_eval")
    assert table["value"].tolist() == [0.25]


# --- the SpeedNorm interval and speed_noisy -----------------------------------------------------------------


def test_speed_norm_interval_and_noisy_flag(caplog):
    # base 40 ms (38..42); "clear" is clearly faster, "noisy" has a spread far wider than its small gain
    timings = {"base": (40.0, 38.0, 42.0), "clear": (30.0, 29.0, 31.0), "noisy": (39.0, 30.0, 50.0)}
    with caplog.at_level(logging.WARNING, logger="moe_compress"):
        table = table_of(timings).set_index("variant")
    assert table.loc["clear", "speed_norm"] == pytest.approx(1 - 30 / 40)
    assert table.loc["clear", "speed_norm_low"] == pytest.approx(1 - 31 / 38)
    assert table.loc["clear", "speed_norm_high"] == pytest.approx(1 - 29 / 42)
    assert table.loc["noisy", "speed_norm"] == pytest.approx(1 - 39 / 40)
    assert table.loc["noisy", "speed_norm_low"] == pytest.approx(1 - 50 / 38)
    assert table.loc["noisy", "speed_norm_high"] == pytest.approx(1 - 30 / 42)
    assert table.loc["noisy", "t_token_ms_min"] == 30.0 and table.loc["noisy", "t_token_ms_max"] == 50.0
    assert table["speed_noisy"].to_dict() == {"base": False, "clear": False, "noisy": True}
    # the reference's SpeedNorm is exactly 0 whatever its own spread
    assert table.loc["base", ["speed_norm", "speed_norm_low", "speed_norm_high"]].tolist() == [0.0, 0.0, 0.0]
    # the formulas are unchanged: Score from the median SpeedNorm
    assert table.loc["noisy", "score"] == pytest.approx(0.5 * 1.0 + 0.5 * (1 - 39 / 40))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "speed_noisy" in warnings[0]
    assert "noisy (SpeedNorm" in warnings[0] and "clear" not in warnings[0]


def test_markdown_shows_the_noisy_flag_and_the_reference():
    table = table_of({"base": (40.0, 38.0, 42.0), "noisy": (39.0, 30.0, 50.0)})
    markdown = to_markdown(table, "base")
    assert markdown.startswith("| variant |")
    header = markdown.splitlines()[0].split(" | ")
    assert "speed_noisy" in header and "speed_norm_low" in header and "speed_norm_high" in header
    assert "Reference variant: `base`" in markdown
    assert "wider than |SpeedNorm| for `noisy`" in markdown


def test_no_warning_when_every_spread_is_small(caplog):
    with caplog.at_level(logging.WARNING, logger="moe_compress"):
        table = table_of({"base": (40.0, 39.5, 40.5), "fast": (20.0, 19.5, 20.5), "slow": (60.0, 59.0, 61.0)})
    assert not table["speed_noisy"].any()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


# --- the reference variant ----------------------------------------------------------------------------------


def test_final_table_is_relative_to_the_reference_it_is_given():
    timings = {"full": (40.0, 40.0, 40.0), "half": (20.0, 20.0, 20.0)}
    table = table_of(timings, reference="full", perplexities={"full": 10.0, "half": 20.0}).set_index("variant")
    assert table.loc["full", ["perf_norm", "speed_norm"]].tolist() == [1.0, 0.0]
    assert table.loc["half", "perf_norm"] == pytest.approx(0.5) and table.loc["half", "speed_norm"] == pytest.approx(0.5)
    assert table.loc["half", "score"] == pytest.approx(0.5)
    assert table.loc["half", "ppl_c4_heldout_ratio"] == pytest.approx(2.0)
    # retention on the held-out text: the reference's perplexity over the variant's
    assert table.loc["half", "retention_c4_heldout"] == pytest.approx(0.5) and table.loc["full", "retention_c4_heldout"] == 1.0
    assert "Reference variant: `full`" in to_markdown(table.reset_index(), "full")


def test_final_table_refuses_a_reference_that_is_not_a_variant():
    names = ["full", "half"]
    ppl = {name: pd.DataFrame({"dataset": ["c4_heldout"], "perplexity": [10.0]}) for name in names}
    with pytest.raises(ConfigError, match="'score.reference': 'base' is not a variant .*full, half"):
        final_table({name: [] for name in names}, dict.fromkeys(names, RECORD), ppl)  # the default reference, base
