"""One forward pass over the calibration tokens; cache router logits/decisions and MoE-block inputs."""

from pathlib import Path

import torch

from moe_compress.cache import build_cache
from moe_compress.calibration import read_sample_sources, read_samples
from moe_compress.modelio import DTYPES
from moe_compress.workflow import finish_job, job_model_layers, start_job

log = start_job(snakemake)
params = snakemake.params
input_ids = torch.from_numpy(read_samples(snakemake.input.calibration))
meta = {"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]), "hidden_dtype": params.hidden_dtype,
        "model": str(snakemake.input.model), "layer_streaming": params.layer_streaming,
        # each sample's calibration source: the statistics are kept per source
        "sample_sources": read_sample_sources(snakemake.input.calibration)}
layers = job_model_layers(snakemake)  # one decoder layer at a time with model.layer_streaming
manifest = build_cache(layers, input_ids, params.batch_size, Path(snakemake.output.manifest).parent, meta,
                       DTYPES[params.hidden_dtype])
log.info("cached %d MoE layers, %d tokens each", len(manifest["layers"]), input_ids.numel())
finish_job(snakemake)
