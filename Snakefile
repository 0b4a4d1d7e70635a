# moe-compress: model + config -> calibration cache -> expert statistics -> compressed checkpoints
# -> evaluation -> results/final_table.csv. One rule file per stage in rules/; the logic lives in
# the moe_compress package (src/), the scripts in workflow/scripts/ only translate the snakemake object.

import json
import re
from pathlib import Path

from moe_compress.config import validate_config
from moe_compress.errors import ConfigError


configfile: "config/config.yaml"


# Validate at start-up: a typo or a wrong type fails here, naming the key, before any job runs.
_validated = validate_config(config)
config.clear()
config.update(_validated)

VARIANTS = {name: variant["steps"] for name, variant in config["variants"].items()}
PPL_DATASETS = ["c4_heldout", "wikitext2"]


def as_json(value):
    """Params as canonical JSON: any change to a value changes the string Snakemake compares."""
    return json.dumps(value, sort_keys=True)


def model_dir():
    path = config["model"]["path"]
    if path == "demo":
        return "results/models/demo"
    if Path(path).exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return f"results/models/hub/{path.replace('/', '--')}"
    raise ConfigError(f"config key 'model.path': {path!r} is neither 'demo', an existing directory, nor a hub id")


MODEL_DIR = model_dir()


wildcard_constraints:
    variant="|".join(re.escape(name) for name in VARIANTS),
    dataset="|".join(PPL_DATASETS),


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
        "results/final_table.csv",
