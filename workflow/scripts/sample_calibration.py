"""Tokenise the calibration windows of every source of the mix (a local file, or what a hub fetch wrote)."""

from moe_compress.calibration import TokenSamples, load_source, sample_mix, write_samples
from moe_compress.config import source_windows
from moe_compress.modelio import TOKENIZER_READS, load_tokenizer
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"model": TOKENIZER_READS})  # the tokenizer only
settings = json_param(snakemake, "calibration")
sources = settings["sources"]
single = len(sources) == 1
keys = snakemake.params.source_keys  # each source's config key, for messages
pools = {source["name"]: load_source(source, corpus, keys[source["name"]])[0]
         for source, corpus in zip(sources, snakemake.input.corpora)}
hub_file = snakemake.params.hub_file
descriptions = {source["name"]: f"hub:allenai/c4/{hub_file}" if hub_file and single else str(corpus)
                for source, corpus in zip(sources, snakemake.input.corpora)}
windows = source_windows(settings)
ids, sample_sources = sample_mix(load_tokenizer(snakemake.input.model), pools, windows, settings["seq_len"],
                                 settings["seed"], descriptions, keys)
source = "; ".join(f"{name}: {descriptions[name]}" for name in pools) if not single else descriptions[sources[0]["name"]]
write_samples(TokenSamples(ids, source=source, sample_sources=sample_sources), snakemake.output[0])
for name, pool in pools.items():
    log.info("source %s: %d windows x %d tokens from %d candidate documents", name, windows[name], ids.shape[1],
             len(pool))
finish_job(snakemake)
