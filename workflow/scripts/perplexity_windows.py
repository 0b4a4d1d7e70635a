"""Token windows for perplexity: held-out C4 documents, or the WikiText-2 test split."""

from moe_compress.calibration import TokenSamples, load_corpus, read_text, tokenize_contiguous, write_samples
from moe_compress.modelio import TOKENIZER_READS, load_tokenizer
from moe_compress.workflow import finish_job, json_param, start_job

log = start_job(snakemake, partial_reads={"model": TOKENIZER_READS})  # the tokenizer only
tokenizer = load_tokenizer(snakemake.input.model)
seq_len, max_windows = snakemake.params.seq_len, snakemake.params.max_windows
if snakemake.wildcards.dataset == "c4_heldout":
    _pool, heldout = load_corpus(snakemake.input.corpus, json_param(snakemake, "calibration"))
    # held-out documents joined with EOS, scored as contiguous windows
    text = tokenizer.eos_token.join(heldout) if tokenizer.eos_token else "\n\n".join(heldout)
    source = f"the held-out documents of {snakemake.input.corpus}"
else:
    text = read_text(snakemake.input.wikitext2)
    source = str(snakemake.input.wikitext2)
ids = tokenize_contiguous(tokenizer, text, seq_len, max_windows, source=source)
write_samples(TokenSamples(ids, source=source), snakemake.output[0])
log.info("%s: %d windows x %d tokens", snakemake.wildcards.dataset, *ids.shape)
finish_job(snakemake)
