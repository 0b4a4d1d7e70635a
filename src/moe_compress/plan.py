"""What the workflow will run, decided from the config before any job: the validated config, the variants,
where the model and the calibration corpus are, and which variants run one job per MoE layer.

rules/common.smk calls :func:`plan_workflow` while Snakemake parses the Snakefile, and Snakemake parses it
again in every job of a cluster run; so planning does only cheap work eagerly. What needs the model (its
shape, its MoE layers: a hub config download, a meta-device skeleton) is computed when first asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from moe_compress.config import check_variants_against_model, read_config_file, validate_config
from moe_compress.errors import ConfigError
from moe_compress.hub import configure_hub_environment, fetch_model_config, is_hub_id
from moe_compress.methods import whole_model_reason
from moe_compress.modelio import hub_dir_name, model_shape

# The paths the planner chooses between; the rules that write them use these same names as outputs.
DEMO_MODEL_DIR = "results/models/demo"
HUB_MODEL_DIR = "results/models/hub/{repo_id}"
HUB_CALIBRATION_CORPUS = "results/calibration/hub_corpus.jsonl.gz"
PPL_DATASETS = ["c4_heldout", "wikitext2"]


@dataclass(frozen=True, eq=False)
class WorkflowPlan:
    config: dict  # validated, defaults filled, variants normalised to {steps: [...]}
    variants: dict[str, list[dict]]  # name -> steps, in config order
    model_dir: str
    calibration_corpus: str
    seeds: dict  # recorded in every compression.json: what, besides the steps' own seeds, fixes the result
    eval_tasks: list[str]
    eval_variants: list[str]  # benchmarked with lm-eval; speed and perplexity cover every variant
    layerwise_variants: list[str]  # one compress_layer job per MoE layer + assemble_checkpoint
    whole_model_variants: list[str]  # one compress job

    @classmethod
    def from_config(cls, config: dict) -> WorkflowPlan:
        """The plan of an already validated config (no model read, no hub access)."""
        variants = {name: variant["steps"] for name, variant in config["variants"].items()}
        listed = config["evaluation"]["variants"]
        # compress.per_layer_jobs: only variants whose every step works one MoE layer at a time
        layerwise = [name for name, steps in variants.items()
                     if config["compress"]["per_layer_jobs"] and not any(whole_model_reason(step) for step in steps)]
        demo = config["model"]["path"] == "demo"
        return cls(
            config=config,
            variants=variants,
            model_dir=_model_dir(config["model"]["path"]),
            calibration_corpus=(config["calibration"]["path"] if config["calibration"]["source"] == "local"
                                else HUB_CALIBRATION_CORPUS),
            seeds={"calibration": config["calibration"]["seed"],
                   "demo_model": config["demo_model"]["seed"] if demo else None},
            eval_tasks=config["evaluation"]["tasks"],
            eval_variants=[name for name in variants if not listed or name in listed],
            layerwise_variants=layerwise,
            whole_model_variants=[name for name in variants if name not in layerwise],
        )

    @cached_property
    def model_config_dir(self) -> Path | None:
        """Where the model's config.json is before its weights are (None for the demo: not built yet): the
        local checkpoint, or for a hub id its config.json alone, fetched into HF_HOME."""
        path = self.config["model"]["path"]
        if path == "demo":
            return None
        return Path(path) if Path(path).exists() else fetch_model_config(path)

    @cached_property
    def model_shape(self) -> dict[str, int]:
        """num_experts, top_k, num_layers: of the demo from its settings, else from the model's config.json."""
        if self.model_config_dir is None:
            return {key: self.config["demo_model"][key] for key in ("num_experts", "top_k", "num_layers")}
        return model_shape(self.model_config_dir, self.config["model"]["trust_remote_code"])

    @cached_property
    def moe_layers(self) -> list[int]:
        """The MoE decoder layers (a meta-device skeleton: no weights read); only per-layer jobs need them."""
        from moe_compress.demo import demo_moe_layers
        from moe_compress.layerwise import skeleton_moe_layers

        if self.model_config_dir is None:
            return demo_moe_layers(self.config["demo_model"]["num_layers"])
        return skeleton_moe_layers(self.model_config_dir, self.config["model"]["trust_remote_code"])

    def check_variants_against_model(self) -> None:
        """A step asking for more experts or layers than the model has fails now, not in its job."""
        check_variants_against_model(self.config["variants"], **self.model_shape)


def _model_dir(path: str) -> str:
    if path == "demo":
        return DEMO_MODEL_DIR
    if Path(path).exists():
        return path
    if is_hub_id(path):
        return HUB_MODEL_DIR.format(repo_id=hub_dir_name(path))
    raise ConfigError(f"config key 'model.path': {path!r} is neither 'demo', an existing directory, nor a hub id")


def plan_workflow(config: dict, configfiles: Iterable[str | Path] = (), remote_job: bool = False,
                  environ: MutableMapping[str, str] = os.environ) -> WorkflowPlan:
    """Validate ``config`` (raw, as Snakemake read it; left untouched) and plan the workflow.

    ``configfiles`` are read again strictly first: plain YAML silently keeps the last of two equal keys.
    ``environ`` gets HF_HOME and, where the hub must stay off, the offline switches (in every job: a
    remote job runs with the hub off). On the submit host (``remote_job`` false) the variants are checked
    against the model's shape; a remote job skips that, the submit host did it before submitting.
    Raises ``ConfigError`` naming the offending key."""
    for path in configfiles:
        if Path(path).is_file():
            read_config_file(path)
    plan = WorkflowPlan.from_config(validate_config(config))
    # before the shape check: a hub model's config.json is fetched into (or read from) this HF_HOME
    configure_hub_environment(plan.config, remote_job=remote_job, environ=environ)
    if not remote_job:
        plan.check_variants_against_model()
    return plan
