"""One forward pass over the calibration tokens; cache router logits/decisions and MoE-block inputs."""

from pathlib import Path

import torch

from moe_compress.calibration import read_samples
from moe_compress.capture import CacheWriter, run_capture, run_streamed_capture, write_cache
from moe_compress.modelio import DTYPES, load_model
from moe_compress.streaming import LayerStream
from moe_compress.workflow import start_job

log = start_job(snakemake)
params = snakemake.params
input_ids = torch.from_numpy(read_samples(snakemake.input.calibration))
hidden_dtype = DTYPES[params.hidden_dtype]
meta = {"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]), "hidden_dtype": params.hidden_dtype,
        "model": str(snakemake.input.model), "layer_streaming": params.layer_streaming}
cache_dir = Path(snakemake.output.manifest).parent
if params.layer_streaming:  # one decoder layer in memory at a time, the cache written layer by layer
    stream = LayerStream(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
    with CacheWriter(cache_dir) as writer:
        run_streamed_capture(stream, input_ids, params.batch_size, writer, hidden_dtype)
        manifest = writer.finish(meta)
else:
    model = load_model(snakemake.input.model, params.dtype, params.device, params.trust_remote_code)
    manifest = write_cache(run_capture(model, input_ids, params.batch_size, hidden_dtype), cache_dir, meta)
log.info("cached %d MoE layers, %d tokens each", len(manifest["layers"]), input_ids.numel())
