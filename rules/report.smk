# The final table: one row per variant.


rule final_table:
    input:
        records=expand("results/checkpoints/{variant}", variant=VARIANTS),
        perplexity=expand("results/eval/{variant}/perplexity.csv", variant=VARIANTS),
    output:
        csv="results/final_table.csv",
        md="results/final_table.md",
    params:
        variants=as_json(VARIANTS),
    log:
        "results/logs/final_table.log",
    benchmark:
        "results/benchmarks/final_table.tsv"
    script:
        "../workflow/scripts/final_table.py"


localrules:
    final_table,
