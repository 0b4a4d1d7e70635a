# Shared definitions: validated config, variants, model location.

import json
import re
from pathlib import Path

from moe_compress.config import check_variants_against_model, read_config_file, validate_config
from moe_compress.errors import ConfigError
from moe_compress.hub import configure_hub_environment, fetch_model_config, is_hub_id
from moe_compress.methods import whole_model_reason
from moe_compress.modelio import hub_dir_name, hub_repo_id, model_shape

# Validate at start-up: a typo or a wrong type fails here, naming the key, before any job runs. Each
# config file is read again strictly first: plain YAML silently keeps the last of two equal keys.
for _configfile in workflow.configfiles:
    if Path(_configfile).is_file():
        read_config_file(_configfile)
_validated = validate_config(config)
config.clear()
config.update(_validated)

VARIANTS = {name: variant["steps"] for name, variant in config["variants"].items()}
PPL_DATASETS = ["c4_heldout", "wikitext2"]
EVAL_TASKS = config["evaluation"]["tasks"]
# the variants benchmarked with lm-eval (all by default); speed and perplexity cover every variant
EVAL_VARIANTS = [name for name in VARIANTS if config["evaluation"]["variants"] in (None, []) or name in config["evaluation"]["variants"]]


def as_json(value):
    """Params as canonical JSON: any change to a value changes the string Snakemake compares."""
    return json.dumps(value, sort_keys=True)


def calibration_settings(*keys):
    """Only the calibration keys a job reads, as its params: a key it does not use never reruns it."""
    return as_json({key: config["calibration"][key] for key in keys})


def exclusive_threads(wildcards):
    """All cores of a local run (so a timed job runs alone); on a cluster, where the job gets its own
    allocation and no total is defined, speed.cluster_threads."""
    try:
        return workflow.cores
    except Exception:  # WorkflowError: no --cores with a cluster executor
        return config["speed"]["cluster_threads"]


def model_dir():
    path = config["model"]["path"]
    if path == "demo":
        return "results/models/demo"
    if Path(path).exists():
        return path
    if is_hub_id(path):
        return f"results/models/hub/{hub_dir_name(path)}"
    raise ConfigError(
        f"config key 'model.path': {path!r} is neither 'demo', an existing directory, nor a hub id"
    )


MODEL_DIR = model_dir()
# recorded in every compression.json: what, besides the steps' own seeds, fixes the result
SEEDS = {"calibration": config["calibration"]["seed"],
         "demo_model": config["demo_model"]["seed"] if config["model"]["path"] == "demo" else None}
# source: hub -> the fetch_calibration_corpus local rule writes the C4 documents here
CALIBRATION_CORPUS = (
    config["calibration"]["path"]
    if config["calibration"]["source"] == "local"
    else "results/calibration/hub_corpus.jsonl.gz"
)

# The hub: one cache (HF_HOME) for every job. Downloads are local rules on the submit host; a job run
# elsewhere (a cluster node: remote execution re-reads this file there) and every job of a config that
# names no hub source run with the hub switched off.
configure_hub_environment(config, remote_job=workflow.remote_exec)


def exact_names(names):
    """A wildcard constraint that matches exactly ``names`` (nothing when there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


# compress.per_layer_jobs: a variant whose steps all work one MoE layer at a time runs as one
# compress_layer job per MoE layer + an assemble_checkpoint job; the others keep one compress job.
LAYERWISE_VARIANTS = [name for name, steps in VARIANTS.items()
                      if config["compress"]["per_layer_jobs"] and not any(whole_model_reason(step) for step in steps)]
WHOLE_MODEL_VARIANTS = [name for name in VARIANTS if name not in LAYERWISE_VARIANTS]


def model_config_dir():
    """Where the model's config.json is when the DAG is built (None for the demo, not built yet): the
    local checkpoint, or for a hub id its config.json alone, fetched into HF_HOME before the weights."""
    path = config["model"]["path"]
    if path == "demo":
        return None
    return path if Path(path).exists() else fetch_model_config(path)


def moe_layers_of_model():
    """The MoE decoder layers, known when the DAG is built (a meta-device skeleton: no weights read)."""
    from moe_compress.demo import demo_moe_layers
    from moe_compress.layerwise import skeleton_moe_layers

    if MODEL_CONFIG_DIR is None:
        return demo_moe_layers(config["demo_model"]["num_layers"])
    return skeleton_moe_layers(MODEL_CONFIG_DIR, config["model"]["trust_remote_code"])


MODEL_CONFIG_DIR = model_config_dir()
# a step asking for more experts or layers than the model has fails now, not in its job
if MODEL_CONFIG_DIR is None:
    MODEL_SHAPE = {key: config["demo_model"][key] for key in ("num_experts", "top_k", "num_layers")}
else:
    MODEL_SHAPE = model_shape(MODEL_CONFIG_DIR, config["model"]["trust_remote_code"])
check_variants_against_model(config["variants"], **MODEL_SHAPE)
MOE_LAYERS = moe_layers_of_model() if LAYERWISE_VARIANTS else []


envvars:
    "HF_HOME",


wildcard_constraints:
    variant=exact_names(VARIANTS),
    dataset="|".join(PPL_DATASETS),
    task="[A-Za-z0-9_]+",
    layer=r"\d+",
