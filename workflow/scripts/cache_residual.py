"""The residual stream entering each MoE sublayer on the calibration tokens, beside the cache (EASY-EP)."""

from pathlib import Path

import torch

from moe_compress.cache import build_residual_cache
from moe_compress.calibration import read_samples
from moe_compress.modelio import DTYPES
from moe_compress.workflow import finish_job, job_model_layers, start_job

log = start_job(snakemake)
params = snakemake.params
input_ids = torch.from_numpy(read_samples(snakemake.input.calibration))
meta = {"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]), "hidden_dtype": params.hidden_dtype,
        "model": str(snakemake.input.model), "layer_streaming": params.layer_streaming}
layers = job_model_layers(snakemake)  # one decoder layer at a time with model.layer_streaming
manifest = build_residual_cache(layers, input_ids, params.batch_size, Path(snakemake.output.manifest).parent, meta,
                                DTYPES[params.hidden_dtype])
log.info("cached the residual stream of %d MoE layers, %d tokens each", len(manifest["layers"]), input_ids.numel())
finish_job(snakemake)
