# One checkpoint per variant: the variant's ordered steps applied to the model. The steps are this
# rule's params, so editing one variant reruns only that variant's jobs.


rule compress:
    input:
        model=MODEL_DIR,
        stats="results/stats/expert_frequency.parquet",
        cache="results/cache/moe_inputs",
        calibration="results/calibration/calibration.parquet",
    output:
        directory("results/checkpoints/{variant}"),
    params:
        steps=lambda wildcards: as_json(VARIANTS[wildcards.variant]),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
        heldout_fraction=config["compress"]["heldout_fraction"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/compress/{variant}.log",
    benchmark:
        "results/benchmarks/compress/{variant}.tsv"
    script:
        "../workflow/scripts/compress.py"
