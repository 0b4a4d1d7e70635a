"""Take the calibration documents from a C4 shard on the hub, cached in HF_HOME (a local rule: the submit host)."""

from moe_compress.hub import fetch_c4_documents
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake)
params = snakemake.params
count = fetch_c4_documents(params.shard, params.num_docs, snakemake.output[0], params.text_field)
log.info("%d documents from allenai/c4 %s", count, params.shard)
finish_job(snakemake)
