# Expert statistics from the router cache: selection counts per top-k rank, routing weights and mass.


rule expert_stats:
    input:
        router="results/cache/router_logits.parquet",
    output:
        parquet="results/stats/expert_frequency.parquet",
        csv="results/stats/expert_frequency.csv",
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/expert_stats.log",
    benchmark:
        "results/benchmarks/expert_stats.tsv"
    script:
        "../workflow/scripts/expert_stats.py"
