"""Download the datasets of the configured lm-eval tasks into HF_HOME (a local rule: needs the hub)."""

import os

from moe_compress.atomic import write_json
from moe_compress.evaluate.lm_eval import prefetch
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake)
summary = prefetch(list(snakemake.params.tasks))
for task, documents in summary.items():
    log.info("%s: %d documents cached", task, documents)
write_json({"hf_home": os.environ["HF_HOME"], "documents": summary}, snakemake.output[0])
finish_job(snakemake)
