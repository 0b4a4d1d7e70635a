"""Perplexity of one checkpoint on each prepared dataset."""

import pandas as pd

from moe_compress.atomic import atomic_path
from moe_compress.calibration import read_samples
from moe_compress.evaluate.perplexity import perplexity
from moe_compress.modelio import load_model
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake)
params = snakemake.params
model = load_model(snakemake.input.checkpoint, params.dtype, params.device)
rows = []
for dataset, windows_path in zip(params.datasets, snakemake.input.windows):
    result = perplexity(model, read_samples(windows_path), params.batch_size, checkpoint=snakemake.input.checkpoint,
                        dataset=dataset)
    rows.append({"dataset": dataset, **result})
    log.info("%s: perplexity %.3f over %d tokens", dataset, result["perplexity"], result["tokens"])
with atomic_path(snakemake.output[0]) as tmp:
    pd.DataFrame(rows).to_csv(tmp, index=False)
finish_job(snakemake)
