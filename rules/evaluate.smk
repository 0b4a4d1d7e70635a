# Evaluation of each checkpoint: perplexity on held-out C4 and WikiText-2.


rule perplexity:
    input:
        checkpoint="results/checkpoints/{variant}",
        windows=expand("results/calibration/ppl_{dataset}.parquet", dataset=PPL_DATASETS),
    output:
        "results/eval/{variant}/perplexity.csv",
    params:
        datasets=PPL_DATASETS,
        batch_size=config["perplexity"]["batch_size"],
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/perplexity/{variant}.log",
    benchmark:
        "results/benchmarks/perplexity/{variant}.tsv"
    script:
        "../workflow/scripts/perplexity.py"
