"""bench/time_breakdown.py on a synthetic finished run whose every time is known: per rule wall times, each job's
start-up, work and exit, the import profile's and the pytest durations' parsing."""

from __future__ import annotations

import csv
import importlib.util
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("time_breakdown", REPO / "bench/time_breakdown.py")
time_breakdown = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(time_breakdown)

T0 = 1_790_000_000  # a whole second: the Snakemake log's resolution


def log_line(at: float, message: str) -> str:
    """A line as start_job's logging writes it (local time, milliseconds)."""
    stamp = datetime.fromtimestamp(at)
    return f"{stamp:%Y-%m-%d %H:%M:%S},{stamp.microsecond // 1000:03d} moe_compress.rule INFO: {message}\n"


def finished_job(results: Path, job: str, start: float, first: float, last: float, wall: float,
                 benchmark_written: float) -> str:
    """A job's benchmark file (written at ``benchmark_written``) and log (first and last lines at ``first`` and
    ``last``, a progress bar between); returns its block of the Snakemake log, started at ``start``."""
    tsv = results / "benchmarks" / f"{job}.tsv"
    log = results / "logs" / f"{job}.log"
    tsv.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    tsv.write_text(f"s\th:m:s\tmax_rss\n{wall}\t0:00:0{int(wall)}\t480.3\n")
    os.utime(tsv, (benchmark_written, benchmark_written))
    log.write_text(log_line(first, "rule ...") + "Loading weights: 100%|####| 24/24\n" + log_line(last, "checksums"))
    return (f"[{time.asctime(time.localtime(start))}]\nlocalrule {job.split('/')[0]}:\n    input: results/x\n"
            f"    log: results/logs/{job}.log\n    jobid: 3\n    benchmark: results/benchmarks/{job}.tsv\n\n")


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """Two compress jobs whose benchmark files kept their mtimes, and a final_table job whose benchmark file lost
    its mtime (a copy): its start is the Snakemake log's."""
    results = tmp_path / "run" / "results"
    blocks = [
        # process start T0, first line 1.5 s later, last 4.0 s, process end 5.0 s
        finished_job(results, "compress/a", T0, T0 + 1.5, T0 + 4.0, 5.0, T0 + 5.0),
        finished_job(results, "compress/b", T0 + 10, T0 + 10.5, T0 + 12.0, 3.0, T0 + 13.0),
        finished_job(results, "final_table", T0 + 20, T0 + 21.25, T0 + 21.5, 2.0, T0 + 900.0),
    ]
    snakemake_log = tmp_path / "run" / ".snakemake" / "log" / "2026-01-01T000000.snakemake.log"
    snakemake_log.parent.mkdir(parents=True)
    finished = f"[{time.asctime()}]\nFinished jobid: 3\n"
    snakemake_log.write_text("Building DAG of jobs...\n\n" + "".join(blocks) + finished)
    return results


def test_each_rule_gets_its_wall_times_and_each_job_its_start_up_work_and_exit(finished_run, tmp_path):
    logs = sorted((finished_run.parent / ".snakemake" / "log").glob("*.snakemake.log"))
    jobs = {record["job"]: record for record in time_breakdown.job_records(finished_run, logs)}
    assert jobs["compress/a"] == pytest.approx({"rule": "compress", "job": "compress/a", "wall_s": 5.0,
                                                "startup_s": 1.5, "work_s": 2.5, "exit_s": 1.0,
                                                "start_from": "benchmark"})
    assert jobs["compress/b"]["startup_s"] == pytest.approx(0.5)
    # the benchmark file's mtime says nothing here: the start is the Snakemake log's, the end unknown
    assert jobs["final_table"] == pytest.approx({"rule": "final_table", "job": "final_table", "wall_s": 2.0,
                                                 "startup_s": 1.25, "work_s": 0.25, "exit_s": None,
                                                 "start_from": "snakemake_log"})

    rows = {row["rule"]: row for row in time_breakdown.rule_rows(list(jobs.values()))}
    assert [row["rule"] for row in time_breakdown.rule_rows(list(jobs.values()))] == ["compress", "final_table"]
    assert rows["compress"] == pytest.approx({
        "rule": "compress", "jobs": 2, "total_s": 8.0, "median_s": 4.0, "max_s": 5.0, "startup_median_s": 1.0,
        "startup_max_s": 1.5, "work_median_s": 2.0, "exit_median_s": 1.0, "start_from": "benchmark"})

    # the command line: the same table in results/bench-style CSV, without the import profiles
    time_breakdown.main(["--results", str(finished_run), "--no-imports", "--out", str(tmp_path / "out")])
    with (tmp_path / "out" / "time_breakdown_rules.csv").open() as handle:
        written = {row["rule"]: row for row in csv.DictReader(handle)}
    assert float(written["compress"]["startup_max_s"]) == pytest.approx(1.5)
    assert written["final_table"]["exit_median_s"] == ""


def test_the_imports_before_a_scripts_first_line_and_their_profile_are_read(tmp_path):
    script = tmp_path / "rule.py"
    script.write_text('"""doc"""\n\nimport os\n\nfrom moe_compress.workflow import start_job\n\n'
                      'log = start_job(snakemake)\nimport json  # not at the top: not before the first line\n')
    assert time_breakdown.script_imports(script).splitlines()[:2] == ["import os",
                                                                      "from moe_compress.workflow import start_job"]
    stderr = ("import time: self [us] | cumulative | imported package\n"
              "import time:       120 |        120 |     torch._C\n"
              "import time:      2000 |       2120 |   torch\n"
              "import time:       500 |       2620 | moe_compress.workflow\n")
    assert time_breakdown.parse_importtime(stderr) == [
        {"module": "torch._C", "depth": 2, "self_s": 0.00012, "cumulative_s": 0.00012},
        {"module": "torch", "depth": 1, "self_s": 0.002, "cumulative_s": 0.00212},
        {"module": "moe_compress.workflow", "depth": 0, "self_s": 0.0005, "cumulative_s": 0.00262}]


def test_the_slowest_tests_come_from_durations_output_or_junit_xml(tmp_path):
    durations = tmp_path / "durations.txt"
    durations.write_text("============ slowest 30 durations ============\n"
                         "12.50s call     tests/test_workflow.py::test_a[x y]\n"
                         "30.01s setup    tests/test_workflow.py::test_b\n"
                         "0.20s teardown tests/test_plan.py::test_c\n"
                         "(2 durations < 0.005s hidden.)\n")
    assert time_breakdown.slowest_tests(durations, count=2) == [
        {"test": "tests/test_workflow.py::test_b", "phase": "setup", "seconds": 30.01},
        {"test": "tests/test_workflow.py::test_a[x y]", "phase": "call", "seconds": 12.5}]
    junit = tmp_path / "junit.xml"
    junit.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">'
                     '<testcase classname="tests.test_plan" name="test_c" time="0.2"/>'
                     '<testcase classname="tests.test_workflow" name="test_b" time="31.5"/></testsuite></testsuites>')
    assert [row["test"] for row in time_breakdown.slowest_tests(junit)] == ["tests/test_workflow.py::test_b",
                                                                           "tests/test_plan.py::test_c"]
