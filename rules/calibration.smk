# Token samples: calibration windows for the router cache, and held-out windows for perplexity.
# Calibration and held-out text come from disjoint documents (the held-out ones are the last
# calibration.heldout_docs of the corpus).


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


localrules:
    fetch_calibration_corpus,


rule sample_calibration:
    input:
        model=MODEL_DIR,
        corpus=CALIBRATION_CORPUS,
    output:
        samples="results/calibration/calibration.parquet",
    params:
        calibration=calibration_settings("text_field", "heldout_docs", "num_samples", "seq_len", "seed"),
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
        corpus=CALIBRATION_CORPUS,
        wikitext2=config["perplexity"]["wikitext2_path"],
    output:
        windows="results/calibration/ppl_{dataset}.parquet",
    params:
        # the held-out C4 windows depend on how the corpus is split; WikiText-2's on nothing of it
        calibration=lambda wildcards: (
            calibration_settings("text_field", "heldout_docs") if wildcards.dataset == "c4_heldout" else as_json({})
        ),
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
