# Token samples: calibration windows for the router cache, and held-out windows for perplexity.
# Calibration is a mix of named sources (calibration.sources; one source, c4, without it). Each source's
# calibration and held-out text come from disjoint documents (its held-out ones are its last heldout_docs).


# source: hub -> the C4 documents are fetched once, on the submit host, into HF_HOME
rule fetch_calibration_corpus:
    output:
        corpus=HUB_CALIBRATION_CORPUS,
    params:
        shard=config["calibration"]["hub_file"],
        num_docs=config["calibration"]["hub_docs"],
        text_field=config["calibration"]["text_field"],
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/fetch_calibration_corpus.log",
    benchmark:
        "results/benchmarks/fetch_calibration_corpus.tsv"
    script:
        "../workflow/scripts/fetch_calibration_corpus.py"


# a source with a hub dataset: its first records, fetched once, on the submit host
rule fetch_calibration_source:
    output:
        corpus=HUB_SOURCE_CORPUS,
    wildcard_constraints:
        name=exact_names(PLAN.hub_sources),
    params:
        hub=lambda wildcards: as_json(PLAN.sources[wildcards.name]["hub"]),
        text_field=lambda wildcards: PLAN.sources[wildcards.name]["text_field"],
        key=lambda wildcards: PLAN.source_key(wildcards.name),
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/fetch_calibration_source/{name}.log",
    benchmark:
        "results/benchmarks/fetch_calibration_source/{name}.tsv"
    script:
        "../workflow/scripts/fetch_calibration_source.py"


localrules:
    fetch_calibration_corpus,
    fetch_calibration_source,


rule sample_calibration:
    input:
        model=MODEL_DIR,
        corpora=list(PLAN.source_corpora.values()),
    output:
        samples="results/calibration/calibration.parquet",
    params:
        # every source (its file, fields, share, held-out documents) and the windows: what the samples are
        calibration=calibration_settings("sources", "num_samples", "seq_len", "seed"),
        source_keys={name: PLAN.source_key(name) for name in PLAN.sources},
        # recorded as the samples' source (with a local corpus: the input file itself)
        hub_file=config["calibration"]["hub_file"] if config["calibration"]["source"] == "hub" else None,
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/sample_calibration.log",
    benchmark:
        "results/benchmarks/sample_calibration.tsv"
    script:
        "../workflow/scripts/sample_calibration.py"


rule perplexity_windows:
    input:
        model=MODEL_DIR,
        text=heldout_text,
    output:
        windows="results/calibration/ppl_{dataset}.parquet",
    params:
        # a source's held-out windows depend on how that source is read and split; WikiText-2's on nothing of it
        source=heldout_source,
        key=lambda wildcards: PLAN.source_key(heldout_source_name(wildcards)) if heldout_source_name(wildcards) else "",
        seq_len=config["perplexity"]["seq_len"],
        max_windows=config["perplexity"]["max_windows"],
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/perplexity_windows/{dataset}.log",
    benchmark:
        "results/benchmarks/perplexity_windows/{dataset}.tsv"
    script:
        "../workflow/scripts/perplexity_windows.py"
