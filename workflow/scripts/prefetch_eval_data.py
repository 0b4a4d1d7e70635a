"""Download the datasets of the configured lm-eval tasks into the evaluation cache (needs the hub)."""

from moe_compress.evaluate.benchmarks import prefetch
from moe_compress.io import write_json
from moe_compress.workflow import start_job

log = start_job(snakemake)
summary = prefetch(list(snakemake.params.tasks), snakemake.params.cache_dir)
for task, documents in summary.items():
    log.info("%s: %d documents cached", task, documents)
write_json({"cache_dir": snakemake.params.cache_dir, "documents": summary}, snakemake.output[0])
