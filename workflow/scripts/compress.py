"""Apply one variant's steps to the model and save the checkpoint."""

import torch

from moe_compress.cache import read_moe_inputs
from moe_compress.calibration import read_samples
from moe_compress.methods import CompressionContext, apply_steps, whole_model_reason
from moe_compress.methods.protection import needs_neuron_peaks
from moe_compress.modelio import load_model, load_tokenizer, save_checkpoint
from moe_compress.stats import read_neuron_peaks, statistics_for
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"cache": []})
params = snakemake.params
steps = json_param(snakemake, "steps")
reasons = [reason for step in steps if (reason := whole_model_reason(step))]
if reasons:  # why compress.per_layer_jobs, if set, leaves this variant in one job
    log.info("one job for the whole model: %s", "; ".join(reasons))
weights = json_param(snakemake, "weights")
model = load_model(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
moe = "stats" in snakemake.input.keys()  # a dense decoder has no expert statistics or router cache
stats = statistics_for(snakemake.input.stats, snakemake.input.get("stats_by_source"), weights,
                       snakemake.input.get("easy_ep"), snakemake.input.get("easy_ep_by_source")) if moe else None
context = CompressionContext.for_model(model, stats=stats,
                                       moe_inputs=read_moe_inputs(snakemake.input.manifest, device=model.device)
                                       if moe else None,
                                       heldout_fraction=params.heldout_fraction,
                                       calibration_ids=torch.from_numpy(read_samples(snakemake.input.calibration)),
                                       neuron_peaks=read_neuron_peaks(snakemake.input.neuron_peaks)
                                       if moe and needs_neuron_peaks(steps) else None)
reports = apply_steps(model, steps, context)
record = save_checkpoint(model, load_tokenizer(snakemake.input.model), snakemake.output[0],
                         {"variant": snakemake.wildcards.variant, "source_model": str(snakemake.input.model),
                          "steps": steps, "seeds": json_param(snakemake, "seeds"), "calibration_weights": weights,
                          "step_reports": reports})
log.info("variant %s: %d routed experts, %d parameters, loader %s", snakemake.wildcards.variant, record["experts_total"],
         record["parameters"], record["loader"])
finish_job(snakemake)
