"""One forward pass over the calibration tokens; cache router logits/decisions and MoE-block inputs."""

from pathlib import Path

import torch

from moe_compress.calibration import read_samples
from moe_compress.capture import run_capture, write_cache
from moe_compress.modelio import DTYPES, load_model
from moe_compress.workflow import start_job

log = start_job(snakemake)
params = snakemake.params
model = load_model(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
input_ids = torch.from_numpy(read_samples(snakemake.input.calibration))
captured = run_capture(model, input_ids, params.batch_size, DTYPES[params.hidden_dtype])
cache_dir = Path(snakemake.output.manifest).parent
manifest = write_cache(captured, cache_dir, {"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                                             "hidden_dtype": params.hidden_dtype, "model": str(snakemake.input.model)})
log.info("cached %d MoE layers, %d tokens each", len(manifest["layers"]), input_ids.numel())
