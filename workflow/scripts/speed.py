"""Time one checkpoint: prefill tokens/s, decode time per token, peak memory."""

import pandas as pd
import torch

from moe_compress.atomic import atomic_path
from moe_compress.calibration import read_samples
from moe_compress.errors import DataError
from moe_compress.evaluate.speed import measure_speed
from moe_compress.modelio import load_model
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake)
params = snakemake.params
torch.set_num_threads(snakemake.threads)
windows = read_samples(snakemake.input.prompts)
if len(windows) < params.num_prompts or windows.shape[1] < params.prompt_tokens:
    raise DataError(f"speed: {snakemake.input.prompts} has {len(windows)} windows of {windows.shape[1]} tokens; "
                    f"speed.num_prompts={params.num_prompts} x speed.prompt_tokens={params.prompt_tokens} asked")
model = load_model(snakemake.input.checkpoint, params.dtype, params.device)
result = measure_speed(model, windows[: params.num_prompts, : params.prompt_tokens], params.decode_tokens,
                       params.repeats, params.warmup, checkpoint=snakemake.input.checkpoint)
log.info("%s", result)
with atomic_path(snakemake.output[0]) as tmp:
    pd.DataFrame([result]).to_csv(tmp, index=False)
finish_job(snakemake)
