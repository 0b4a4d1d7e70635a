"""Download a hub model snapshot into HF_HOME (a local rule: runs on the submit host, which has the network)
and expose it as the model directory."""

from moe_compress.hub import fetch_model_snapshot
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake)
snapshot = fetch_model_snapshot(snakemake.params.repo_id, snakemake.output[0])
log.info("%s: snapshot %s linked into %s", snakemake.params.repo_id, snapshot, snakemake.output[0])
finish_job(snakemake)
