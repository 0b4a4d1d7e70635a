"""One checkpoint in vLLM: the serving environment's job (``serving.engine_job``), then the variant's report."""

import json
import tempfile
from pathlib import Path

from moe_compress.atomic import atomic_directory, write_json
from moe_compress.checkpoint_files import context_length, read_compression_record
from moe_compress.evaluate.lm_eval import bundled_data_files
from moe_compress.serving.job import run_engine_job, serving_python
from moe_compress.serving.report import serving_report
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake)
params, checkpoint = snakemake.params, snakemake.input.checkpoint
engine = json_param(snakemake, "engine")
lm_eval = json_param(snakemake, "lm_eval")
reference = json.loads(Path(snakemake.input.reference).read_text())
config = json.loads((Path(checkpoint) / "config.json").read_text())
with atomic_directory(snakemake.output.lm_eval) as lm_eval_dir, tempfile.TemporaryDirectory() as work_dir:
    spec = {"checkpoint": str(Path(checkpoint).resolve()), "references": reference["references"],
            "vocab_size": config.get("vocab_size") or config["text_config"]["vocab_size"], "seed": 0,
            "speed": json_param(snakemake, "speed"), "tasks": list(params.tasks), "lm_eval": lm_eval,
            "lm_eval_dir": str(lm_eval_dir), "work_dir": str(work_dir), **engine}
    # vLLM refuses a context longer than the model's own
    spec["max_model_len"] = min(filter(None, [engine["max_model_len"], context_length(checkpoint)]))
    if params.tasks and lm_eval["source"] == "bundled":
        log.info("bundled task data: %s", [bundled_data_files(task, lm_eval["data_dir"]) for task in params.tasks])
    result = run_engine_job(serving_python(params.python), spec, snakemake.log[0])
report = serving_report(snakemake.wildcards.variant, read_compression_record(checkpoint), reference, result)
write_json(report, snakemake.output.report)
log.info("serves in: %s; not served by: %s", report["serves_in"], report["not_served_by"] or "-")
finish_job(snakemake)
