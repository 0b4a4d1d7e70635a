# Glue between Snakemake and the planner (moe_compress.plan): the names the rule files use, and helpers
# that need Snakemake's own objects. Snakemake parses this in every job of a cluster run: the planner
# does only cheap work there (no model shape check, no MoE-layer skeleton unless a job needs one).

import json
import re

from moe_compress.modelio import hub_repo_id
from moe_compress.config import HUB_CALIBRATION_CORPUS, HUB_SOURCE_CORPUS
from moe_compress.plan import DEMO_MODEL_DIR, HELDOUT_SUFFIX, HUB_MODEL_DIR, plan_workflow

# A bad config fails here, naming the key, before any job; sets HF_HOME and the hub's offline switches.
PLAN = plan_workflow(config, workflow.configfiles, remote_job=workflow.remote_exec)
# The rules read validated values (defaults filled) as config[...]: filled in place, as Snakemake's own
# validate(config, schema, set_default=True) does. The planner's dict holds every top-level key.
config.update(PLAN.config)

VARIANTS = PLAN.variants
EVAL_TASKS = PLAN.eval_tasks
EVAL_VARIANTS = PLAN.eval_variants
LAYERWISE_VARIANTS = PLAN.layerwise_variants
WHOLE_MODEL_VARIANTS = PLAN.whole_model_variants
MODEL_DIR = PLAN.model_dir
CALIBRATION_CORPUS = PLAN.calibration_corpus
PPL_DATASETS = PLAN.ppl_datasets
# the held-out windows the speed prompts are cut from: the first calibration source's
PROMPT_DATASET = PPL_DATASETS[0]
SEEDS = PLAN.seeds


def moe_layers(wildcards):
    """The MoE layers, for per-layer jobs only: asked for when such a job is planned, not at every parse."""
    return PLAN.moe_layers


def moe_data(wildcards):
    """The expert statistics and the router cache: a dense decoder has neither."""
    if not PLAN.is_moe:
        return {}
    return {"stats": rules.expert_stats.output.parquet, "cache": rules.cache_router_activations.output.inputs,
            "manifest": rules.cache_router_activations.output.manifest}


def easy_ep_data(wildcards):
    """EASY-EP's statistics, for a variant with a step ranking by them only (``Method.reads_residual``)."""
    if wildcards.variant not in PLAN.residual_variants:
        return {}
    return {"easy_ep": rules.easy_ep_stats.output.parquet, "easy_ep_by_source": rules.easy_ep_stats.output.by_source}


def neuron_peaks(wildcards):
    """Each routed neuron's peak activation, what a protected width cut reads: a dense decoder has none."""
    return {"neuron_peaks": rules.expert_stats.output.neuron_peaks} if PLAN.is_moe else {}


def as_json(value):
    """Params as canonical JSON: any change to a value changes the string Snakemake compares."""
    return json.dumps(value, sort_keys=True)


def calibration_settings(*keys):
    """Only the calibration keys a job reads, as its params: a key it does not use never reruns it."""
    return as_json({key: config["calibration"][key] for key in keys})


def heldout_source_name(wildcards):
    """The calibration source of a perplexity dataset (<source>_heldout), or None (WikiText-2)."""
    name = wildcards.dataset.removesuffix(HELDOUT_SUFFIX)
    return name if wildcards.dataset.endswith(HELDOUT_SUFFIX) and name in PLAN.sources else None


def heldout_text(wildcards):
    """The file a perplexity dataset is cut from: its source's corpus, or the WikiText-2 test split."""
    name = heldout_source_name(wildcards)
    return PLAN.source_corpora[name] if name else config["perplexity"]["wikitext2_path"]


def heldout_source(wildcards):
    """How a held-out dataset's source is read and split, as JSON (not its share of the calibration windows,
    which leaves its held-out documents as they are); nothing for WikiText-2."""
    name = heldout_source_name(wildcards)
    if not name:
        return as_json({})
    return as_json({key: value for key, value in PLAN.sources[name].items() if key not in ("share", "samples")})


def weights_settings(wildcards):
    """A variant's calibration weights (null: the statistics of the whole calibration set)."""
    return as_json(PLAN.variant_weights[wildcards.variant])


def weighted_stats(wildcards):
    """The per-source statistics, for a variant with calibration weights only."""
    if PLAN.variant_weights.get(wildcards.variant) is None or not PLAN.is_moe:
        return {}
    return {"stats_by_source": rules.expert_stats.output.by_source}


def exclusive_threads(wildcards):
    """All cores of a local run (so a timed job runs alone); on a cluster, where the job gets its own
    allocation and no total is defined, speed.cluster_threads."""
    try:
        return workflow.cores
    except Exception:  # WorkflowError: no --cores with a cluster executor
        return config["speed"]["cluster_threads"]


# evaluation.backend: vllm runs the lm-eval tasks in the serving job (the serving environment), so it needs it
VLLM_TASKS = config["evaluation"]["backend"] == "vllm"
SERVING = config["serving"]["vllm"] or VLLM_TASKS


def benchmark_tasks(wildcards):
    """The lm-eval tasks of the evaluate job (with evaluation.backend: vllm the serving job runs them)."""
    return EVAL_TASKS if wildcards.variant in EVAL_VARIANTS and not VLLM_TASKS else []


def serving_tasks(wildcards):
    return EVAL_TASKS if wildcards.variant in EVAL_VARIANTS and VLLM_TASKS else []


def _lm_eval_settings(runs_tasks):
    """The lm-eval settings, for the variants whose job runs tasks only: the others never rerun for them."""
    if not runs_tasks:
        return as_json({})
    keys = ("source", "data_dir", "num_fewshot", "limit", "batch_size", "backend", "seed")
    return as_json({key: config["evaluation"][key] for key in keys})


def benchmark_settings(wildcards):
    return _lm_eval_settings(bool(benchmark_tasks(wildcards)))


def serving_task_settings(wildcards):
    return _lm_eval_settings(bool(serving_tasks(wildcards)))


def prefetched_eval_data(wildcards):
    """The hub datasets' prefetch record, for a job that runs lm-eval tasks from the hub."""
    runs_tasks = bool(benchmark_tasks(wildcards) or serving_tasks(wildcards))
    if config["evaluation"]["source"] == "hub" and runs_tasks:
        return [rules.prefetch_eval_data.output.prefetched]
    return []


def exact_names(names):
    """A wildcard constraint that matches exactly ``names`` (nothing when there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


envvars:
    "HF_HOME",


wildcard_constraints:
    variant=exact_names(VARIANTS),
    dataset="|".join(PPL_DATASETS),
    task="[A-Za-z0-9_]+",
    layer=r"\d+",
