"""Run one lm-eval task (or group) on one checkpoint: a tidy CSV and lm-eval's raw results JSON."""

import tempfile

from moe_compress.atomic import atomic_path, write_json
from moe_compress.evaluate.lm_eval import run_benchmark, tidy_results
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake)
params = snakemake.params
task = snakemake.wildcards.task
with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_") as task_dir:
    results = run_benchmark(snakemake.input.checkpoint, task, source=params.source, data_dir=params.data_dir,
                            work_dir=task_dir, num_fewshot=params.num_fewshot, limit=params.limit,
                            batch_size=params.batch_size, dtype=params.dtype, device=params.device,
                            trust_remote_code=params.trust_remote_code, backend=params.backend, seed=params.seed)
table = tidy_results(results, params.num_fewshot, checkpoint=snakemake.input.checkpoint)
write_json(results, snakemake.output.json)
with atomic_path(snakemake.output.csv) as tmp:
    table.to_csv(tmp, index=False)
for row in table[table["task"] == task].itertuples():
    log.info("%s %s = %.4f (+- %.4f, n=%s)", row.task, row.metric, row.value, row.stderr, row.n)
finish_job(snakemake)
