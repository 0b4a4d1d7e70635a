# moe-compress: model + config -> calibration cache -> expert statistics -> compressed checkpoints
# -> evaluation -> results/final_table.csv. One rule file per stage in rules/ (common.smk: the plan,
# from moe_compress.plan); each rule's script in workflow/scripts/ has the rule's name and only
# translates the snakemake object; the logic is the moe_compress package. Map: docs/code-organisation.md

import sys

from moe_compress.config import DEFAULT_CONFIG_FILE, check_config_files, describe_config_files
from moe_compress.workflow import set_openmp_waiting

# every job's torch threads spin briefly, then sleep, while they wait for each other (a busy machine's cores go
# to work, not to spinning); a policy the user set is kept
set_openmp_waiting()

# A --configfile names the whole experiment: the demo's config/config.yaml is read only when none is given,
# so the user's variants are never merged with the demo's (docs/design-notes.md, "One config, one experiment").
if not workflow.overwrite_configfiles:
    # Snakemake's own reader names neither the file nor the line of a YAML error: read the file strictly first
    check_config_files([DEFAULT_CONFIG_FILE])

    configfile: DEFAULT_CONFIG_FILE


if not workflow.remote_exec:
    print(describe_config_files(workflow.overwrite_configfiles, overrides=bool(workflow.config_settings.config)),
          file=sys.stderr)


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/calibration.smk"
include: "rules/cache.smk"
include: "rules/stats.smk"
include: "rules/compress.smk"
include: "rules/analyze.smk"
include: "rules/evaluate.smk"
include: "rules/serving.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        rules.final_table.output.csv,
        rules.plots.output.quality,
        rules.analyze.output.json,
        rules.analyze.output.md,
        [rules.track_mlflow.output.runs] if config["tracking"]["mlflow_uri"] else [],
