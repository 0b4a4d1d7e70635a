"""Take a calibration source's records from a hub dataset, cached in HF_HOME (a local rule: the submit host)."""

from moe_compress.hub import fetch_dataset_documents
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake)
hub = json_param(snakemake, "hub")
text_field = snakemake.params.text_field
fields = [text_field] if isinstance(text_field, str) else list(text_field)
count = fetch_dataset_documents(hub["id"], hub["config"], hub["split"], fields, hub["docs"], snakemake.output[0],
                                f"{snakemake.params.key}.hub")
log.info("%d records of %s (%s, split %s)", count, hub["id"], hub["config"], hub["split"])
finish_job(snakemake)
