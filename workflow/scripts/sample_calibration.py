"""Tokenise calibration samples from the corpus (the local file, or the C4 documents fetched from the hub)."""

from moe_compress.calibration import TokenSamples, load_corpus, tokenize_into_samples, write_samples
from moe_compress.modelio import TOKENIZER_READS, load_tokenizer
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"model": TOKENIZER_READS})  # the tokenizer only
settings = json_param(snakemake, "calibration")
pool, _heldout = load_corpus(snakemake.input.corpus, settings)
hub_file = snakemake.params.hub_file
source = f"hub:allenai/c4/{hub_file}" if hub_file else str(snakemake.input.corpus)
ids = tokenize_into_samples(load_tokenizer(snakemake.input.model), pool, settings["num_samples"], settings["seq_len"],
                            settings["seed"], source=source)
write_samples(TokenSamples(ids, source=source), snakemake.output[0])
log.info("%d calibration samples x %d tokens from %d candidate documents", *ids.shape, len(pool))
finish_job(snakemake)
