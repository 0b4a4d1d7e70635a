# The final table: one row per variant.


rule final_table:
    input:
        records=expand("results/checkpoints/{variant}", variant=VARIANTS),
        perplexity=expand("results/eval/{variant}/perplexity.csv", variant=VARIANTS),
        speed=expand("results/eval/{variant}/speed.csv", variant=VARIANTS),
        benchmarks=expand("results/eval/{variant}/lm_eval/{task}.csv", variant=EVAL_VARIANTS, task=EVAL_TASKS),
    output:
        csv="results/final_table.csv",
        md="results/final_table.md",
    params:
        # a list of [name, steps] pairs: the table keeps the config's variant order
        variants=as_json([[name, steps] for name, steps in VARIANTS.items()]),
        benchmarked=as_json([[variant, task] for variant in EVAL_VARIANTS for task in EVAL_TASKS]),
        perf_metric=config["score"]["perf_metric"],
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/final_table.log",
    benchmark:
        "results/benchmarks/final_table.tsv"
    script:
        "../workflow/scripts/final_table.py"


localrules:
    final_table,
