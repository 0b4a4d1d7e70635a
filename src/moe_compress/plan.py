"""What the workflow will run, decided from the config before any job: the validated config, the variants,
where the model and the calibration corpus are, and which variants run one job per MoE layer.

rules/common.smk calls :func:`plan_workflow` while Snakemake parses the Snakefile, and Snakemake parses it
again in every job of a cluster run; so planning does only cheap work eagerly. What needs the model (its
shape, its MoE layers: a hub config download, a meta-device skeleton) is computed when first asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from moe_compress.config import (
    check_config_files,
    check_lengths_against_model,
    check_reference,
    check_targets_against_model,
    check_variants_against_model,
    check_variants_against_model_class,
    single_corpus_source,
    source_corpus,
    source_windows,
    validate_config,
)
from moe_compress.errors import ConfigError
from moe_compress.hub import configure_hub_environment, fetch_model_config, is_hub_id
from moe_compress.methods import method, whole_model_reason
from moe_compress.modelio import check_model_dir, context_length, hub_dir_name, model_shape
from moe_compress.quantized import check_source_quantization

# The paths the planner chooses between; the rules that write them use these same names as outputs.
DEMO_MODEL_DIR = "results/models/demo"
HUB_MODEL_DIR = "results/models/hub/{repo_id}"
# the perplexity dataset of each calibration source's held-out documents is <source>_heldout; beside them
WIKITEXT2 = "wikitext2"
HELDOUT_SUFFIX = "_heldout"


@dataclass(frozen=True, eq=False)
class WorkflowPlan:
    config: dict  # validated, defaults filled, variants normalised to {steps: [...]}
    variants: dict[str, list[dict]]  # name -> steps, in config order
    model_dir: str
    # each calibration source's file, by name, in config order: a local file, or where its hub fetch writes it
    source_corpora: dict[str, str]
    seeds: dict  # recorded in every compression.json: what, besides the steps' own seeds, fixes the result
    eval_tasks: list[str]
    eval_variants: list[str]  # benchmarked with lm-eval; speed and perplexity cover every variant
    layerwise_variants: list[str]  # one compress_layer job per MoE layer + assemble_checkpoint
    whole_model_variants: list[str]  # one compress job

    @property
    def calibration_corpus(self) -> str:
        """The first calibration source's file: what the demo model is trained on."""
        return next(iter(self.source_corpora.values()))

    @property
    def ppl_datasets(self) -> list[str]:
        """The perplexity datasets: each calibration source's held-out documents, then WikiText-2."""
        return [f"{name}{HELDOUT_SUFFIX}" for name in self.source_corpora] + [WIKITEXT2]

    @property
    def sources(self) -> dict[str, dict]:
        """The calibration sources by name (``calibration.sources`` entries, defaults filled)."""
        return {source["name"]: source for source in self.config["calibration"]["sources"]}

    def source_key(self, name: str) -> str:
        """The config key of calibration source ``name``, for messages: its entry, or the single-corpus keys."""
        if self.single_corpus:
            return "calibration"
        return f"calibration.sources[{list(self.source_corpora).index(name)}]"

    @property
    def single_corpus(self) -> bool:
        """Whether the calibration is written with the single-corpus keys (no ``calibration.sources``)."""
        calibration = self.config["calibration"]
        return calibration["sources"] == [single_corpus_source(calibration)]

    @property
    def hub_sources(self) -> list[str]:
        """The sources read from a hub dataset (fetch_calibration_source writes each)."""
        return [name for name, source in self.sources.items() if "hub" in source]

    @property
    def variant_weights(self) -> dict[str, dict | None]:
        """Each variant's calibration weights (None: the statistics of the whole calibration set)."""
        return {name: variant.get("weights") for name, variant in self.config["variants"].items()}

    @cached_property
    def residual_variants(self) -> frozenset[str]:
        """The variants with a step whose statistics need the residual stream entering each MoE sublayer
        (``Method.reads_residual``): only their jobs ask for the residual cache and EASY-EP's statistics."""
        return frozenset(name for name, steps in self.variants.items()
                         if any(method(step["method"]).reads_residual for step in steps))

    @property
    def sweeps(self) -> dict[str, str]:
        """Each variant's sweep (its own name where it belongs to none): the plots draw a sweep as a line."""
        return {name: variant.get("sweep", name) for name, variant in self.config["variants"].items()}

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
            source_corpora={source["name"]: source_corpus(source) for source in config["calibration"]["sources"]},
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
        """The ``ModelShape`` fields (experts, top-k, layers, heads, widths): of the demo from its settings, else
        from the model's config.json."""
        if self.model_config_dir is None:
            from moe_compress.demo import DEMO_MODEL_TYPE

            demo = self.config["demo_model"]
            return {**{key: demo[key] for key in ("num_experts", "top_k", "num_layers", "hidden_size",
                                                  "num_attention_heads", "num_key_value_heads")},
                    "model_type": DEMO_MODEL_TYPE, "expert_width": demo["moe_intermediate_size"]}
        return model_shape(self.model_config_dir, self.config["model"]["trust_remote_code"])

    @cached_property
    def is_moe(self) -> bool:
        """Whether the model has routed experts (a dense decoder has no router cache or expert statistics)."""
        return self.model_config_dir is None or bool(self.model_shape["moe"])

    @cached_property
    def moe_layers(self) -> list[int]:
        """The MoE decoder layers (a meta-device skeleton: no weights read); only per-layer jobs need them."""
        from moe_compress.demo import demo_moe_layers
        from moe_compress.layerwise import skeleton_moe_layers

        if self.model_config_dir is None:
            return demo_moe_layers(self.config["demo_model"]["num_layers"])
        return skeleton_moe_layers(self.model_config_dir, self.config["model"]["trust_remote_code"])

    @cached_property
    def model_context(self) -> tuple[int, str] | None:
        """The model's longest sequence and where that number comes from; None where its config.json does not say."""
        if self.model_config_dir is None:  # the demo is built with max_position_embeddings = demo_model.seq_len
            return self.config["demo_model"]["seq_len"], "demo_model.seq_len, the demo model's max_position_embeddings"
        length = context_length(self.model_config_dir)
        if length is None:
            return None
        return length, f"max_position_embeddings in {self.model_config_dir / 'config.json'}"

    def check_model_files(self) -> None:
        """A local checkpoint without weights or tokenizer files fails now, not in the job that first reads them.
        The demo is built by the workflow, and a hub model's files arrive with fetch_model: nothing to check yet."""
        path = self.config["model"]["path"]
        if path != "demo" and Path(path).exists():
            check_model_dir(path, weights=True, tokenizer=True)
            check_source_quantization(path)  # a quantization that is not read fails now, naming the format

    def check_input_files(self) -> None:
        """A data path that names nothing fails now. Snakemake would not say it: an input no rule makes and
        no file is, whose dependent outputs exist from an earlier run, is taken as an old source file, and
        those outputs are kept as they are."""
        config = self.config
        files = {"perplexity.wikitext2_path": config["perplexity"]["wikitext2_path"]}
        local = self.local_sources
        for name in local:
            files[f"{self.source_key(name)}.path"] = self.source_corpora[name]
        folders = {}
        if config["evaluation"]["source"] == "bundled" and config["evaluation"]["tasks"]:
            folders["evaluation.data_dir"] = config["evaluation"]["data_dir"]
        for key, path in [*files.items(), *folders.items()]:
            if not (Path(path).is_file() if key in files else Path(path).is_dir()):
                raise ConfigError(f"config key '{key}': {path} is not {'a file' if key in files else 'a folder'} "
                                  f"(a relative path starts in the directory Snakemake runs in, {Path.cwd()})")
        if local:
            self.check_local_sources(local)

    @property
    def local_sources(self) -> list[str]:
        """The sources read from a file the user gave (not fetched by the workflow)."""
        calibration = self.config["calibration"]
        if self.single_corpus and calibration["source"] == "hub":
            return []
        return [name for name, source in self.sources.items() if "hub" not in source]

    def check_local_sources(self, names: list[str]) -> None:
        """Each local source is read now: a damaged file, a missing field or no documents fails here, naming the
        source's key and the file. Its held-out documents are its last ``heldout_docs``: as many as it has or more
        would leave nothing to calibrate (or train the demo) on. And it must hold enough text for its windows:
        counted with the model's tokenizer where it is already on disk, else bounded by its UTF-8 bytes (a
        byte-level tokenizer, such as the demo's, makes at most one token per byte)."""
        from moe_compress.calibration import read_source
        from moe_compress.errors import DataError

        calibration = self.config["calibration"]
        windows = source_windows(calibration)
        tokenizer = self._tokenizer_on_disk()
        for name in names:
            source, key, path = self.sources[name], self.source_key(name), self.source_corpora[name]
            try:
                docs = read_source(source, path, key)
            except DataError as err:
                raise ConfigError(f"config key '{key}': {err}") from None
            heldout = source["heldout_docs"]
            if heldout >= len(docs):
                raise ConfigError(f"config key '{key}.heldout_docs': {heldout} held-out documents leave none of the "
                                  f"{len(docs)} non-empty documents of {path} ({key}.path) to calibrate on; hold out "
                                  f"at most {len(docs) - 1}")
            self._check_source_size(name, docs[:-heldout], windows[name] * calibration["seq_len"], tokenizer)

    def _tokenizer_on_disk(self):
        """The model's tokenizer if its files are here already (a local model, or a demo built by an earlier
        run), else None."""
        from moe_compress.checkpoint_files import has_tokenizer_files

        folder = Path(self.model_dir)
        if not (folder / "config.json").is_file() or not has_tokenizer_files(folder):
            return None
        from moe_compress.modelio import load_tokenizer

        return load_tokenizer(folder)

    def _check_source_size(self, name: str, pool: list, needed: int, tokenizer) -> None:
        from moe_compress.calibration import render_documents
        from moe_compress.errors import DataError

        key = self.source_key(name)
        if tokenizer is not None:
            try:
                docs = render_documents(tokenizer, pool, key)
            except DataError as err:
                raise ConfigError(f"config key '{key}.format': {err}") from None
            available, how = 0, f"tokens ({type(tokenizer).__name__})"
            for doc in docs:  # stop as soon as there is enough: a large corpus is never tokenized whole
                available += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
                if available >= needed:
                    return
        else:
            texts = [doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False) for doc in pool]
            available, how = sum(len(text.encode()) + 1 for text in texts), "UTF-8 bytes (at most one token each)"
        if available < needed:
            what = "calibration.num_samples" if self.single_corpus else f"its share ({key}.share or samples)"
            raise ConfigError(f"config key '{key}': its {len(pool)} calibration documents hold {available} {how}, "
                              f"fewer than the {needed} tokens of its windows ({needed // self.config['calibration']['seq_len']}"
                              f" x calibration.seq_len); lower {what} or give it more text")

    @cached_property
    def skeleton(self):
        """The model on the meta device (no weights), built from its config.json as every job builds it: a config
        transformers cannot build a model from fails here, before any job."""
        from moe_compress.streaming import build_skeleton

        return build_skeleton(self.model_config_dir, "float32", self.config["model"]["trust_remote_code"])

    @cached_property
    def expert_budget(self):
        """(the model's ``ExpertBudget``: experts, top-k floors and parameters per MoE layer, from a weightless
        skeleton, the demo's from its settings; whether its parameter count is exact: the demo's vocabulary is
        known only once its tokenizer is trained, so its parameter budgets are checked in the job)."""
        from moe_compress.methods.allocation import ExpertBudget, expert_budget

        if self.model_config_dir is None:
            # no skeleton: its transformers model class would cost every parse seconds. The parameter fields stay
            # zero, unread: the demo's parameter count is not known here (False)
            from moe_compress.demo import demo_moe_layers

            demo = self.config["demo_model"]
            layers = demo_moe_layers(demo["num_layers"])
            return ExpertBudget(fixed=0, count=dict.fromkeys(layers, demo["num_experts"]),
                                size=dict.fromkeys(layers, 0),
                                floor=dict.fromkeys(layers, min(demo["top_k"], demo["num_experts"]))), False
        return expert_budget(self.skeleton), True

    def check_variants_against_model(self) -> None:
        """A step asking for more experts, layers or heads than the model has, or one its model class cannot
        express, fails now, not in its job."""
        if self.model_config_dir is not None:
            self.skeleton  # noqa: B018 (built for its check)
        check_variants_against_model(self.config["variants"], **self.model_shape)
        if self.is_moe and any("target" in step for steps in self.variants.values() for step in steps):
            check_targets_against_model(self.config["variants"], *self.expert_budget)
        if self.model_config_dir is not None:
            check_variants_against_model_class(self.config["variants"], self.model_config_dir,
                                               self.config["model"]["trust_remote_code"])

    def check_lengths_against_model(self) -> None:
        """Calibration, perplexity and speed sequences longer than the model's context fail now."""
        if self.model_context is not None:
            check_lengths_against_model(self.config, *self.model_context)


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
    remote job runs with the hub off). On the submit host (``remote_job`` false) a local model's files are
    checked, and the variants and sequence lengths against the model's shape and context; a remote job skips
    that, the submit host did it before submitting.
    Raises ``ConfigError`` naming the offending key."""
    check_config_files(configfiles)
    plan = WorkflowPlan.from_config(validate_config(config))
    check_reference(plan.config)
    # before the model checks: a hub model's config.json is fetched into (or read from) this HF_HOME
    configure_hub_environment(plan.config, remote_job=remote_job, environ=environ)
    if plan.layerwise_variants and not plan.is_moe:  # no MoE layer to give a job of its own
        plan = dataclasses.replace(plan, layerwise_variants=[], whole_model_variants=list(plan.variants))
    if not remote_job:
        plan.check_input_files()
        plan.check_model_files()
        plan.check_variants_against_model()
        plan.check_lengths_against_model()
    return plan
