"""Expert frequency and REAP saliency table from the router cache and the cached MoE-block inputs."""

from moe_compress.atomic import atomic_path
from moe_compress.cache import CacheReader
from moe_compress.modelio import load_model
from moe_compress.stats import expert_frequency, expert_saliency, with_saliency
from moe_compress.streaming import LayerStream, LoadedModel
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake, partial_reads={"cache": []})
params = snakemake.params
cache = CacheReader(snakemake.input.manifest)
if params.layer_streaming:  # one decoder layer and its cached inputs in memory at a time
    layers = LayerStream(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
else:
    layers = LoadedModel(load_model(snakemake.input.model, params.dtype, params.device, params.trust_remote_code))
saliency = expert_saliency(layers, cache.moe_inputs())
# mean_router_prob is each router's own probability: its scoring rule says which
table = with_saliency(expert_frequency(cache.routing(), layers.adapter.scoring_for(layers.model.config)), saliency)
with atomic_path(snakemake.output.parquet) as tmp:
    table.to_parquet(tmp, index=False)
with atomic_path(snakemake.output.csv) as tmp:
    table.to_csv(tmp, index=False)
log.info("statistics for %d layers x %d experts", table["layer"].nunique(), table.groupby("layer").size().max())
finish_job(snakemake)
