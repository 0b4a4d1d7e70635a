"""Write a variant's checkpoint from its layer parts, one decoder layer at a time."""

from moe_compress.layerwise import assemble_checkpoint
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake)
params = snakemake.params
parts = dict(zip(params.layers, snakemake.input.parts, strict=True))
record = assemble_checkpoint(snakemake.input.model, parts, snakemake.output[0],
                             {"variant": snakemake.wildcards.variant, "source_model": str(snakemake.input.model),
                              "steps": json_param(snakemake, "steps"), "seeds": json_param(snakemake, "seeds"),
                              "calibration_weights": json_param(snakemake, "weights")},
                             params.dtype, params.trust_remote_code)
log.info("variant %s: %d experts, %d parameters, loader %s", snakemake.wildcards.variant, record["experts_total"],
         record["parameters"], record["loader"])
finish_job(snakemake)
