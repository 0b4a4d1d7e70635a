"""The pipeline's transformers on one checkpoint: greedy continuations of the agreement prompts."""

from moe_compress.atomic import write_json
from moe_compress.serving.job import transformers_reference_of
from moe_compress.workflow import finish_job, start_job

log = start_job(snakemake)
params = snakemake.params
reference = transformers_reference_of(snakemake.input.checkpoint, params.dtype, params.device, params.max_new_tokens)
write_json(reference, snakemake.output.reference)
log.info("reference: %d prompts x %d tokens (transformers %s)", len(reference["references"]),
         params.max_new_tokens, reference["transformers"])
finish_job(snakemake)
