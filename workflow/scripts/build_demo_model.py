"""Train the embedded demo MoE and its tokenizer on the first calibration source (the bundled C4 sample by default)."""

from moe_compress.demo import DemoSettings, build_demo_model
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake)
settings = DemoSettings(
    text_field=snakemake.params.text_field,
    heldout_docs=snakemake.params.heldout_docs,
    documents=snakemake.params.documents,
    **json_param(snakemake, "demo"),
)
metrics = build_demo_model(snakemake.input.corpus, snakemake.output[0], settings, threads=snakemake.threads, log=log)
log.info("demo model: %s", {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})
finish_job(snakemake)
