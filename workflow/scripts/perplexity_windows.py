"""Token windows for perplexity: a calibration source's held-out documents, or the WikiText-2 test split."""

from moe_compress.calibration import (
    TokenSamples,
    load_source,
    read_text,
    render_documents,
    tokenize_contiguous,
    write_samples,
)
from moe_compress.modelio import TOKENIZER_READS, load_tokenizer
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"model": TOKENIZER_READS})  # the tokenizer only
tokenizer = load_tokenizer(snakemake.input.model)
seq_len, max_windows = snakemake.params.seq_len, snakemake.params.max_windows
source_settings = json_param(snakemake, "source")
if source_settings:  # <source>_heldout
    key = snakemake.params.key
    _pool, heldout = load_source(source_settings, snakemake.input.text, key)
    heldout = render_documents(tokenizer, heldout, key)
    # held-out documents joined with EOS, scored as contiguous windows
    text = tokenizer.eos_token.join(heldout) if tokenizer.eos_token else "\n\n".join(heldout)
    source = f"the held-out documents of {snakemake.input.text}"
else:
    text = read_text(snakemake.input.text)
    source = str(snakemake.input.text)
ids = tokenize_contiguous(tokenizer, text, seq_len, max_windows, source=source)
write_samples(TokenSamples(ids, source=source), snakemake.output[0])
log.info("%s: %d windows x %d tokens", snakemake.wildcards.dataset, *ids.shape)
finish_job(snakemake)
