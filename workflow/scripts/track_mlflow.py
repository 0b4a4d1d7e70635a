"""Log every variant of the final table to MLflow (tracking.mlflow_uri)."""

import pandas as pd

from moe_compress.atomic import write_json
from moe_compress.tracking import log_variants
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake)
variants = dict(json_param(snakemake, "variants"))
table = pd.read_csv(snakemake.input[0])
run_ids = log_variants(table, variants, snakemake.params.uri, snakemake.params.experiment)
log.info("logged %d runs to %s", len(run_ids), snakemake.params.uri)
write_json({"uri": snakemake.params.uri, "experiment": snakemake.params.experiment,
            "runs": dict(zip(table["variant"], run_ids))}, snakemake.output[0])
finish_job(snakemake)
