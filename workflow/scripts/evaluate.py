"""Evaluate one checkpoint with a single load of the model: speed first (the job holds the device alone),
then perplexity on each prepared dataset, then each lm-eval task. Results already computed from the same
checkpoint and settings are read back from the memo, not recomputed."""

from pathlib import Path

import pandas as pd

from moe_compress.atomic import atomic_directory, atomic_path, write_json
from moe_compress.evaluate.lm_eval import bundled_data_files, tidy_results
from moe_compress.evaluate.session import EvaluationSession, perplexity_table
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake)
params = snakemake.params
output = snakemake.output
session = EvaluationSession(snakemake.input.checkpoint, dtype=params.dtype, device=params.device,
                            memo_dir=params.memo_dir, trust_remote_code=params.trust_remote_code)

speed = json_param(snakemake, "speed")
result = session.speed(snakemake.input.prompts, **speed)
log.info("speed: %s", result)
with atomic_path(output.speed) as tmp:
    pd.DataFrame([result]).to_csv(tmp, index=False)

perplexities = {}
for dataset, windows in zip(params.datasets, snakemake.input.windows, strict=True):
    perplexities[dataset] = session.perplexity(dataset, windows, batch_size=params.perplexity_batch_size)
    log.info("%s: perplexity %.3f over %d tokens", dataset, perplexities[dataset]["perplexity"],
             perplexities[dataset]["tokens"])
with atomic_path(output.perplexity) as tmp:
    perplexity_table(perplexities).to_csv(tmp, index=False)

lm_eval = json_param(snakemake, "lm_eval")
with atomic_directory(output.lm_eval) as tmp_dir:
    for task in params.tasks:
        inputs = (list(snakemake.input.prefetched) if lm_eval["source"] == "hub"
                  else bundled_data_files(task, lm_eval["data_dir"]))
        results = session.benchmark(task, inputs=inputs, **lm_eval)
        table = tidy_results(results, lm_eval["num_fewshot"], checkpoint=snakemake.input.checkpoint)
        write_json(results, Path(tmp_dir) / f"{task}.json")
        table.to_csv(Path(tmp_dir) / f"{task}.csv", index=False)
        for row in table[table["task"] == task].itertuples():
            log.info("%s %s = %.4f (+- %.4f, n=%s)", row.task, row.metric, row.value, row.stderr, row.n)

log.info("model loads: %d; computed %s; reused %s", session.model_loads, session.computed, session.reused)
write_json(session.summary(), output.summary)
finish_job(snakemake)
