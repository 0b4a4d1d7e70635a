"""Apply one variant's steps to one MoE layer; write that layer's tensors and reports (a layer part)."""

from moe_compress.layerwise import compress_layer, write_layer_part
from moe_compress.stats import statistics_for
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"model": [], "cache": []})
params = snakemake.params
layer = int(snakemake.wildcards.layer)
tensors, facts = compress_layer(snakemake.input.model, layer, json_param(snakemake, "steps"),
                                statistics_for(snakemake.input.stats, snakemake.input.get("stats_by_source"),
                                               json_param(snakemake, "weights"), snakemake.input.get("easy_ep"),
                                               snakemake.input.get("easy_ep_by_source")),
                                snakemake.input.manifest,
                                params.heldout_fraction, params.dtype, params.device, params.trust_remote_code)
write_layer_part(snakemake.output[0], tensors, facts)
log.info("variant %s layer %d: %d experts, %d tensors", snakemake.wildcards.variant, layer,
         facts["facts"]["experts"], len(tensors))
finish_job(snakemake)
