"""Join compression records and evaluation CSVs into results/final_table.{csv,md}."""

from pathlib import Path

import pandas as pd

from moe_compress.checkpoint_files import read_compression_record
from moe_compress.final_table import (
    domain_expert_notes,
    final_table,
    read_evaluation_csv,
    read_task_results,
    write_final_table,
)
from moe_compress.serving.report import not_served_lines, read_serving_report
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"records": ["compression.json"]})
variants = dict(json_param(snakemake, "variants"))  # config order, same as the inputs
records = {name: read_compression_record(path) for name, path in zip(variants, snakemake.input.records)}
perplexities = {name: read_evaluation_csv(path, "perplexity")
                for name, path in zip(variants, snakemake.input.perplexity)}
speeds = {name: read_evaluation_csv(path, "speed") for name, path in zip(variants, snakemake.input.speed)}
tasks = list(snakemake.params.tasks)
# the serving reports, where the serving jobs ran (serving.vllm, or evaluation.backend: vllm)
serving = ({name: read_serving_report(path) for name, path in zip(variants, snakemake.input.serving, strict=True)}
           if snakemake.input.serving else {})
task_results = {variant: read_task_results(directory, tasks, served_elsewhere=snakemake.params.tasks_in_serving
                                           and "vllm" in serving[variant]["not_served_by"])
                for variant, directory in zip(snakemake.params.lm_eval_variants, snakemake.input.lm_eval, strict=True)}
reference = snakemake.params.reference
table = final_table(variants, records, perplexities, speeds, task_results, tasks, snakemake.params.perf_metric,
                    reference, sweeps=json_param(snakemake, "sweeps"), serving=serving,
                    weights=json_param(snakemake, "weights"), primary_perplexity=snakemake.params.primary_perplexity)
notes = not_served_lines(serving)
if snakemake.input.domain_experts:  # an MoE model: the experts specific to one calibration source
    notes += domain_expert_notes(pd.read_csv(snakemake.input.domain_experts[0]))
write_final_table(table, snakemake.output.csv, snakemake.output.md, reference, notes)
log.info("final table: %d variants, reference %s -> %s", len(table), reference, Path(snakemake.output.csv))
finish_job(snakemake)
