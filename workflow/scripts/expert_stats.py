"""Expert frequency and REAP saliency tables from the router cache and the cached MoE-block inputs: over all
calibration tokens, per calibration source, and the experts one source uses far more than the others."""

from moe_compress.atomic import atomic_path
from moe_compress.cache import CacheReader
from moe_compress.modelio import load_model
from moe_compress.stats import (
    domain_experts,
    expert_frequency,
    expert_frequency_by_source,
    expert_saliency_tables,
    with_saliency,
)
from moe_compress.streaming import LayerStream, LoadedModel
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake, partial_reads={"cache": []})
params = snakemake.params
cache = CacheReader(snakemake.input.manifest)
if params.layer_streaming:  # one decoder layer and its cached inputs in memory at a time
    layers = LayerStream(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
else:
    layers = LoadedModel(load_model(snakemake.input.model, params.dtype, params.device, params.trust_remote_code))
routing = cache.routing()
source_names, token_source = cache.token_sources(len(next(iter(routing.values())).logits))
saliency, saliency_by_source = expert_saliency_tables(layers, cache.moe_inputs(), source_names, token_source)
# mean_router_prob is each router's own probability: its scoring rule says which
scoring = layers.adapter.scoring_for(layers.model.config)
table = with_saliency(expert_frequency(routing, scoring), saliency)
by_source = expert_frequency_by_source(routing, source_names, token_source, scoring).merge(
    saliency_by_source, on=["source", "layer", "expert"], how="left", validate="one_to_one")
outputs = snakemake.output
for frame, parquet, csv in [(table, outputs.parquet, outputs.csv), (by_source, outputs.by_source, outputs.by_source_csv)]:
    with atomic_path(parquet) as tmp:
        frame.to_parquet(tmp, index=False)
    with atomic_path(csv) as tmp:
        frame.to_csv(tmp, index=False)
specific = domain_experts(by_source)
with atomic_path(outputs.domain_experts) as tmp:
    specific.to_csv(tmp, index=False)
log.info("statistics for %d layers x %d experts, %d calibration sources (%s); %d domain-specific experts",
         table["layer"].nunique(), table.groupby("layer").size().max(), len(source_names), ", ".join(source_names),
         int(specific["domain_specific"].sum()))
finish_job(snakemake)
