"""Expert frequency, REAP saliency and peak-output tables from the router cache and the cached MoE-block inputs: over all calibration tokens, per calibration source, and the
experts one source uses far more than the others; and each expert's per-neuron activation peaks."""

from safetensors.torch import save_file

from moe_compress.atomic import atomic_path
from moe_compress.cache import CacheReader
from moe_compress.stats import (
    domain_experts,
    expert_frequency,
    expert_frequency_by_source,
    expert_statistics,
    neuron_peaks_tensors,
    with_saliency,
)
from moe_compress.workflow import finish_job, job_model_layers, start_job

log = start_job(snakemake, partial_reads={"cache": []})
params = snakemake.params
cache = CacheReader(snakemake.input.manifest)
layers = job_model_layers(snakemake)  # one decoder layer at a time with model.layer_streaming
routing = cache.routing()
source_names, token_source = cache.token_sources(len(next(iter(routing.values())).logits))
statistics = expert_statistics(layers, cache.moe_inputs(), source_names, token_source)
saliency, saliency_by_source = statistics.totals, statistics.by_source
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
with atomic_path(outputs.neuron_peaks) as tmp:
    save_file(neuron_peaks_tensors(statistics.neuron_peaks), str(tmp))
specific = domain_experts(by_source)
with atomic_path(outputs.domain_experts) as tmp:
    specific.to_csv(tmp, index=False)
log.info("statistics for %d layers x %d experts, %d calibration sources (%s); %d domain-specific experts",
         table["layer"].nunique(), table.groupby("layer").size().max(), len(source_names), ", ".join(source_names),
         int(specific["domain_specific"].sum()))
finish_job(snakemake)
