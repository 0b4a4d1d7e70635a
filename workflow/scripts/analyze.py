"""The structure of the source model and of every variant checkpoint -> results/analysis/model.{json,md}."""

from moe_compress.analysis import FILES_READ, analyze_models, write_analysis
from moe_compress.workflow import finish_job, start_job

# only the config, index, record and remote code are read whole; of the weights, their headers
log = start_job(snakemake, partial_reads={"model": FILES_READ, "checkpoints": FILES_READ})
variants = dict(zip(snakemake.params.variants, snakemake.input.checkpoints, strict=True))
analysis = analyze_models(variants, source=snakemake.input.model, trust_remote_code=snakemake.params.trust_remote_code)
write_analysis(analysis, snakemake.output.json, snakemake.output.md)
for model in analysis["models"]:
    log.info("%s: %s, %d decoder layers (%d MoE), %d experts, %d parameters", model["name"], model["model_type"],
             model["decoder_layers"], len(model["moe_layers"]), model["experts_total"], model["parameters"]["total"])
finish_job(snakemake)
