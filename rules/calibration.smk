# Token samples: calibration windows for the router cache, and held-out windows for perplexity.
# Calibration and held-out text come from disjoint documents (the held-out ones are the last
# calibration.heldout_docs of the corpus).


rule sample_calibration:
    input:
        model=MODEL_DIR,
        corpus=config["calibration"]["path"] if config["calibration"]["source"] == "local" else [],
    output:
        "results/calibration/calibration.parquet",
    params:
        calibration=as_json(config["calibration"]),
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
        corpus=config["calibration"]["path"] if config["calibration"]["source"] == "local" else [],
        wikitext2=config["perplexity"]["wikitext2_path"],
    output:
        "results/calibration/ppl_{dataset}.parquet",
    params:
        calibration=as_json(config["calibration"]),
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
