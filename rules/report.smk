# The final table: one row per variant.


rule final_table:
    input:
        records=expand(rules.compress.output.checkpoint, variant=VARIANTS),
        perplexity=expand(rules.evaluate.output.perplexity, variant=VARIANTS),
        speed=expand(rules.evaluate.output.speed, variant=VARIANTS),
        # with evaluation.backend: vllm the serving job runs the tasks
        lm_eval=expand(rules.serving.output.lm_eval if VLLM_TASKS else rules.evaluate.output.lm_eval,
                       variant=EVAL_VARIANTS),
        serving=expand(rules.serving.output.report, variant=VARIANTS) if SERVING else [],
        # the experts specific to one calibration source, named in the table's notes (an MoE model only)
        domain_experts=[rules.expert_stats.output.domain_experts] if PLAN.is_moe else [],
    output:
        csv=report("results/final_table.csv", caption="../workflow/report/final_table.rst", category="Results"),
        md="results/final_table.md",
    params:
        # a list of [name, steps] pairs: the table keeps the config's variant order
        variants=as_json([[name, steps] for name, steps in VARIANTS.items()]),
        # the sweep each variant belongs to (a line in the plots)
        sweeps=as_json(PLAN.sweeps),
        # the variant of each lm_eval input (a directory of <task>.csv), in order, and the tasks
        lm_eval_variants=EVAL_VARIANTS,
        tasks=EVAL_TASKS,
        # the tasks ran in the serving job: a variant vLLM does not serve has none
        tasks_in_serving=VLLM_TASKS,
        perf_metric=config["score"]["perf_metric"],
        # perf_metric perplexity: on the first calibration source's held-out documents
        primary_perplexity=PPL_DATASETS[0],
        # each variant's calibration weights (variants.<name>.weights), shown in the table
        weights=as_json(PLAN.variant_weights),
        # PerfNorm, SpeedNorm, Score and the ratios are relative to this variant
        reference=config["score"]["reference"],
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/final_table.log",
    benchmark:
        "results/benchmarks/final_table.tsv"
    script:
        "../workflow/scripts/final_table.py"


rule plots:
    input:
        table=rules.final_table.output.csv,
        records=expand(rules.compress.output.checkpoint, variant=VARIANTS),
    output:
        quality=report("results/plots/quality_vs_parameters.png", caption="../workflow/report/quality.rst", category="Plots"),
        experts=report("results/plots/experts_per_layer.png", caption="../workflow/report/experts.rst", category="Plots"),
        reconstruction=report(
            "results/plots/reconstruction_error.png", caption="../workflow/report/reconstruction.rst", category="Plots"
        ),
        retention=report(
            "results/plots/domain_retention.png", caption="../workflow/report/domain_retention.rst", category="Plots"
        ),
    params:
        variants=list(VARIANTS),
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/plots.log",
    benchmark:
        "results/benchmarks/plots.tsv"
    script:
        "../workflow/scripts/plots.py"


# optional: one MLflow run per variant (tracking.mlflow_uri); in `rule all` only when configured
rule track_mlflow:
    input:
        table=rules.final_table.output.csv,
    output:
        runs="results/tracking/mlflow_runs.json",
    params:
        uri=config["tracking"]["mlflow_uri"],
        experiment=config["tracking"]["experiment"],
        variants=as_json([[name, steps] for name, steps in VARIANTS.items()]),
    conda:
        "../envs/tracking.yaml"
    log:
        "results/logs/track_mlflow.log",
    benchmark:
        "results/benchmarks/track_mlflow.tsv"
    script:
        "../workflow/scripts/track_mlflow.py"


localrules:
    final_table,
    plots,
    track_mlflow,
