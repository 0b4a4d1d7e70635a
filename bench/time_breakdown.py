"""Where the time of a finished run goes, per rule, and of a test run, per test.

For a results folder (``--results``, default results/):

- each rule's jobs: count, total, median and max wall seconds, from Snakemake's ``benchmark:`` files;
- each job's start-up (process start -> the first line ``start_job`` logs), work (first -> last logged line)
  and exit (last logged line -> process end). The process ends when Snakemake writes the job's benchmark file
  (its mtime) and started its wall time ``s`` before; that start is checked against the job's start in the
  Snakemake log (``.snakemake/log/`` beside the results folder, 1 s resolution), which is used instead where
  the two disagree (a results folder copied without its mtimes);
- each rule script's imports (``--scripts``, default workflow/scripts/): one ``python -X importtime``
  process per rule importing what the job imports before its first line (Snakemake's script preamble, then
  the script's top-level imports), its top 10 modules by cumulative time;

and for a pytest run (``--pytest``: the output of ``pytest --durations=30``, or a junit XML file), its 30
slowest tests. Prints the tables and writes results/bench/time_breakdown_{rules,imports,tests}.csv.

    .venv/bin/python bench/time_breakdown.py                              # results/ of the last run
    .venv/bin/python bench/time_breakdown.py --results /tmp/run/results --pytest durations.txt
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from datetime import date, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "results" / "bench"
# what Snakemake's preamble imports in every script job before the script's own code
SCRIPT_PREAMBLE = "import pickle\nfrom snakemake.logging import logger\nfrom snakemake.iocontainers import Snakemake\n"
# logging's default asctime, as start_job configures it
LOG_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SNAKEMAKE_TIMESTAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
# a job's start time in the Snakemake log agrees with the benchmark's (1 s resolution) within this
START_TOLERANCE_S = 2.0


# --- the jobs of a results folder -------------------------------------------------------------------------

def job_records(results: Path, snakemake_logs: list[Path]) -> list[dict]:
    """One record per job with a benchmark file: rule, job (the path under benchmarks/), wall seconds, and,
    where its log has timestamped lines, start-up, work and exit seconds and where the start came from."""
    starts = snakemake_job_starts(snakemake_logs)
    records = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        job = tsv.relative_to(results / "benchmarks").with_suffix("")
        wall = benchmark_seconds(tsv)
        if wall is None:
            continue
        record = {"rule": job.parts[0], "job": str(job), "wall_s": wall}
        log = results / "logs" / job.with_suffix(".log")
        first, last = log_span(log) if log.is_file() else (None, None)
        if first is not None:
            end = tsv.stat().st_mtime
            start, source = end - wall, "benchmark"
            logged_start = starts.get(str(job.with_suffix(".log")))
            if logged_start is not None and abs(logged_start - start) > START_TOLERANCE_S:
                start, end, source = logged_start, None, "snakemake_log"
            record.update(startup_s=first - start, work_s=last - first,
                          exit_s=(end - last) if end is not None else None, start_from=source)
        records.append(record)
    return records


def benchmark_seconds(tsv: Path) -> float | None:
    """The wall seconds ``s`` of a Snakemake benchmark file (the mean where it holds several repeats)."""
    with tsv.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    values = [float(row["s"]) for row in rows if row.get("s") not in (None, "", "NA")]
    return statistics.fmean(values) if values else None


def log_span(log: Path) -> tuple[float | None, float | None]:
    """(first, last) timestamp of a job log's logging lines, as epoch seconds (local time, as logged)."""
    stamps = [match.group(1) for line in log.read_text(errors="replace").splitlines()
              if (match := LOG_TIMESTAMP.match(line))]
    if not stamps:
        return None, None
    return _log_time(stamps[0]), _log_time(stamps[-1])


def _log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def snakemake_job_starts(logs: list[Path]) -> dict[str, float]:
    """{a job's log path under logs/: the time Snakemake started it}, from Snakemake logs (the latest start
    of each job over all of them: a rerun replaces the job's log)."""
    starts: dict[str, float] = {}
    for path in logs:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
        for index, line in enumerate(lines[:-1]):
            match = SNAKEMAKE_TIMESTAMP.match(line)
            # a job's block: its start time, "rule <name>:", its fields up to a blank line
            if not match or not re.match(r"^(local)?rule \w+:$", lines[index + 1]):
                continue
            stamp = datetime.strptime(match.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
            for field in lines[index + 2:]:
                if not field or SNAKEMAKE_TIMESTAMP.match(field):
                    break
                if field.startswith("log: "):
                    for name in field[len("log: "):].split(", "):
                        key = name.split("logs/", 1)[-1].split(" ")[0]
                        starts[key] = max(starts.get(key, stamp), stamp)
    return starts


def rule_rows(records: list[dict]) -> list[dict]:
    """Per rule, slowest total first: jobs, total/median/max wall seconds, median and max start-up, median work
    and exit seconds."""
    rows = []
    for rule in dict.fromkeys(record["rule"] for record in records):
        jobs = [record for record in records if record["rule"] == rule]
        walls = [job["wall_s"] for job in jobs]
        startups = [job["startup_s"] for job in jobs if job.get("startup_s") is not None]
        works = [job["work_s"] for job in jobs if job.get("work_s") is not None]
        exits = [job["exit_s"] for job in jobs if job.get("exit_s") is not None]
        rows.append({"rule": rule, "jobs": len(jobs), "total_s": sum(walls), "median_s": statistics.median(walls),
                     "max_s": max(walls),
                     "startup_median_s": statistics.median(startups) if startups else None,
                     "startup_max_s": max(startups) if startups else None,
                     "work_median_s": statistics.median(works) if works else None,
                     "exit_median_s": statistics.median(exits) if exits else None,
                     "start_from": ",".join(sorted({job["start_from"] for job in jobs if "start_from" in job}))})
    return sorted(rows, key=lambda row: -row["total_s"])


# --- the imports of each rule's script -------------------------------------------------------------------

def script_imports(script: Path) -> str:
    """The script's top-level import statements, as source: what runs before its first line of work."""
    tree = ast.parse(script.read_text(), filename=str(script))
    return "\n".join(ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))


def parse_importtime(stderr: str) -> list[dict]:
    """``python -X importtime``'s lines as {module, depth, self_s, cumulative_s}, in the order printed."""
    rows = []
    for line in stderr.splitlines():
        match = re.match(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", line)
        if match:
            rows.append({"module": match.group(4), "depth": len(match.group(3)) // 2,
                         "self_s": int(match.group(1)) / 1e6, "cumulative_s": int(match.group(2)) / 1e6})
    return rows


def import_profile(rule: str, scripts: Path, top: int = 10) -> tuple[float, list[dict]]:
    """(seconds of all imports, the ``top`` modules by cumulative time) of one process importing what the
    rule's job imports before its first line."""
    code = SCRIPT_PREAMBLE + script_imports(scripts / f"{rule}.py")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{rule}: importing what its script imports failed:\n{done.stderr[-2000:]}")
    rows = parse_importtime(done.stderr)
    total = sum(row["cumulative_s"] for row in rows if row["depth"] == 0)
    ranked = sorted(rows, key=lambda row: -row["cumulative_s"])[:top]
    return total, [{"rule": rule, "rank": rank, **row} for rank, row in enumerate(ranked, 1)]


# --- the slowest tests -----------------------------------------------------------------------------------

def slowest_tests(path: Path, count: int = 30) -> list[dict]:
    """The ``count`` slowest entries of a pytest run: from ``--durations`` output (per phase) or a junit XML
    file (per test, setup to teardown)."""
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("<"):
        rows = []
        for case in ElementTree.fromstring(text).iter("testcase"):
            module = case.get("classname", "").replace(".", "/")
            rows.append({"test": f"{module}.py::{case.get('name')}" if module else case.get("name"),
                         "phase": "total", "seconds": float(case.get("time", 0))})
    else:
        rows = [{"test": match.group(3).strip(), "phase": match.group(2), "seconds": float(match.group(1))}
                for line in text.splitlines()
                if (match := re.match(r"^\s*([\d.]+)s (setup|call|teardown)\s+(\S.*)$", line))]
    return sorted(rows, key=lambda row: -row["seconds"])[:count]


# --- output -----------------------------------------------------------------------------------------------

def machine() -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores, load average {load}"


def write_csv(path: Path, rows: list[dict]) -> Path:
    """``rows`` as CSV, each stamped with the date and the machine (its load average now)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = [{"date": date.today().isoformat(), "machine": machine(), **row} for row in rows]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in stamped for key in row)))
        writer.writeheader()
        writer.writerows(stamped)
    return path


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print("  " + "  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
    for line in cells:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"), help="a finished run's results folder")
    parser.add_argument("--snakemake-log", type=Path, action="append", default=[],
                        help="a Snakemake log of the run (default: .snakemake/log/*.snakemake.log beside --results)")
    parser.add_argument("--scripts", type=Path, default=REPO / "workflow" / "scripts",
                        help="the rule scripts whose imports are timed")
    parser.add_argument("--no-imports", action="store_true", help="skip the import profiles")
    parser.add_argument("--pytest", type=Path, help="pytest --durations output, or a junit XML file")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the CSV files go")
    args = parser.parse_args(argv)

    print(f"machine: {machine()}")
    if args.results.is_dir():
        logs = args.snakemake_log or sorted((args.results.resolve().parent / ".snakemake" / "log").glob(
            "*.snakemake.log"))
        records = job_records(args.results, logs)
        rows = rule_rows(records)
        imports = []
        if not args.no_imports:
            for row in rows:
                if (args.scripts / f"{row['rule']}.py").is_file():
                    row["imports_s"], top = import_profile(row["rule"], args.scripts)
                    imports.extend(top)
        print_table(f"per rule, {args.results} ({len(records)} jobs; seconds)", rows,
                    ["rule", "jobs", "total_s", "median_s", "max_s", "startup_median_s", "startup_max_s",
                     "work_median_s", "exit_median_s", "imports_s"])
        print(f"  -> {write_csv(args.out / 'time_breakdown_rules.csv', rows)}")
        if imports:
            print_table("each rule's imports before its first line: top 10 by cumulative seconds", imports,
                        ["rule", "rank", "module", "depth", "cumulative_s", "self_s"])
            print(f"  -> {write_csv(args.out / 'time_breakdown_imports.csv', imports)}")
    else:
        print(f"\n{args.results}: no results folder; no rule table")
    if args.pytest:
        tests = slowest_tests(args.pytest)
        print_table(f"the {len(tests)} slowest tests ({args.pytest})", tests, ["seconds", "phase", "test"])
        print(f"  -> {write_csv(args.out / 'time_breakdown_tests.csv', tests)}")


if __name__ == "__main__":
    main()
