"""Join compression records and evaluation CSVs into results/final_table.{csv,md}."""

from pathlib import Path

import pandas as pd

from moe_compress.final_table import final_table, write_final_table
from moe_compress.modelio import read_compression_record
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"records": ["compression.json"]})
variants = dict(json_param(snakemake, "variants"))  # config order, same as the inputs
records = {name: read_compression_record(path) for name, path in zip(variants, snakemake.input.records)}
perplexities = {name: pd.read_csv(path) for name, path in zip(variants, snakemake.input.perplexity)}
speeds = {name: pd.read_csv(path) for name, path in zip(variants, snakemake.input.speed)}
runs = json_param(snakemake, "lm_eval_runs")
task_results = {}
for (variant, task), path in zip(runs, snakemake.input.lm_eval, strict=True):
    task_results.setdefault(variant, {})[task] = pd.read_csv(path)
tasks = list(dict.fromkeys(task for _, task in runs))
table = final_table(variants, records, perplexities, speeds, task_results, tasks, snakemake.params.perf_metric)
write_final_table(table, snakemake.output.csv, snakemake.output.md)
log.info("final table: %d variants -> %s", len(table), Path(snakemake.output.csv))
finish_job(snakemake)
