"""The report's figures from the final table and the checkpoints' compression records."""

import pandas as pd

from moe_compress import plots
from moe_compress.checkpoint_files import read_compression_record
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake, partial_reads={"records": ["compression.json"]})
table = pd.read_csv(snakemake.input.table)
records = {name: read_compression_record(path) for name, path in zip(snakemake.params.variants, snakemake.input.records)}
plots.quality_vs_parameters(table, snakemake.output.quality)
plots.experts_per_layer(records, snakemake.output.experts)
plots.reconstruction_error(records, snakemake.output.reconstruction)
plots.domain_retention(table, snakemake.output.retention)
log.info("plots written for %d variants", len(table))
finish_job(snakemake)
