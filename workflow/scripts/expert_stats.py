"""Expert frequency and REAP saliency table from the router cache and the cached MoE-block inputs."""

from moe_compress.architectures import adapter_for
from moe_compress.capture import read_moe_inputs, read_router_cache
from moe_compress.io import atomic_path
from moe_compress.modelio import load_model
from moe_compress.stats import expert_frequency, expert_saliency, streamed_expert_saliency, with_saliency
from moe_compress.streaming import LayerStream
from moe_compress.workflow import start_job

log = start_job(snakemake)
params = snakemake.params
if params.layer_streaming:  # one decoder layer and its cached inputs in memory at a time
    stream = LayerStream(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
    saliency, adapter = streamed_expert_saliency(stream, snakemake.input.cache), stream.adapter
else:
    model = load_model(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
    saliency = expert_saliency(model, read_moe_inputs(snakemake.input.cache, device=model.device))
    adapter = adapter_for(model.config)
# mean_router_prob is each router's own probability: its scoring rule says which
table = with_saliency(expert_frequency(read_router_cache(snakemake.input.router), adapter.scoring), saliency)
with atomic_path(snakemake.output.parquet) as tmp:
    table.to_parquet(tmp, index=False)
with atomic_path(snakemake.output.csv) as tmp:
    table.to_csv(tmp, index=False)
log.info("statistics for %d layers x %d experts", table["layer"].nunique(), table.groupby("layer").size().max())
