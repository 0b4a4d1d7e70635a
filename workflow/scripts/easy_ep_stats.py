"""EASY-EP saliency per expert, over all calibration tokens and per source, from the cached MoE-block inputs and
the cached residual streams."""

from moe_compress.atomic import atomic_path
from moe_compress.cache import CacheReader
from moe_compress.stats import easy_ep_tables
from moe_compress.workflow import finish_job, job_model_layers, start_job

log = start_job(snakemake, partial_reads={"cache": [], "residual": []})
params = snakemake.params
cache, residual = CacheReader(snakemake.input.manifest), CacheReader(snakemake.input.residual_manifest)
layers = job_model_layers(snakemake)  # one decoder layer at a time with model.layer_streaming
source_names, token_source = cache.token_sources(len(next(iter(cache.routing().values())).logits))
totals, by_source = easy_ep_tables(layers, cache.moe_inputs(), residual.residuals(), source_names, token_source)
for frame, path in [(totals, snakemake.output.parquet), (by_source, snakemake.output.by_source)]:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
log.info("EASY-EP saliency of %d experts", len(totals))
finish_job(snakemake)
