# moe-compress: model + config -> calibration cache -> expert statistics -> compressed checkpoints
# -> evaluation -> results/final_table.csv. One rule file per stage in rules/; the logic lives in
# the moe_compress package (src/), the scripts in workflow/scripts/ only translate the snakemake object.


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/calibration.smk"
include: "rules/cache.smk"
include: "rules/stats.smk"
include: "rules/compress.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        rules.final_table.output.csv,
        rules.plots.output.quality,
        [rules.track_mlflow.output.runs] if config["tracking"]["mlflow_uri"] else [],
