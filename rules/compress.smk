# One checkpoint per variant: the variant's ordered steps applied to the model. The steps are the
# params of every job that applies them, so editing one variant reruns only that variant's jobs.

# written by compress or, for a per-layer variant, assemble_checkpoint (the wildcard constraints pick one);
# later rules read it as rules.compress.output.checkpoint
CHECKPOINT_DIR = "results/checkpoints/{variant}"


# compress.per_layer_jobs: false (or a variant with a whole-model step): one job loads the model,
# applies the steps and saves the checkpoint.
rule compress:
    input:
        unpack(moe_data),
        unpack(weighted_stats),
        unpack(easy_ep_data),
        unpack(neuron_peaks),
        model=MODEL_DIR,
        calibration=rules.sample_calibration.output.samples,
    output:
        checkpoint=directory(CHECKPOINT_DIR),
    wildcard_constraints:
        variant=exact_names(WHOLE_MODEL_VARIANTS),
    params:
        steps=lambda wildcards: as_json(VARIANTS[wildcards.variant]),
        # the calibration sources' shares the statistics are re-weighted to (variants.<name>.weights)
        weights=weights_settings,
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
        heldout_fraction=config["compress"]["heldout_fraction"],
        seeds=as_json(SEEDS),
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/compress/{variant}.log",
    benchmark:
        "results/benchmarks/compress/{variant}.tsv"
    script:
        "../workflow/scripts/compress.py"


# compress.per_layer_jobs: true: one job per (variant, MoE layer) reads only that decoder layer and its
# cached inputs, applies the steps, and writes the layer's tensors (hub layout) with its reports.
rule compress_layer:
    input:
        unpack(weighted_stats),
        unpack(easy_ep_data),
        model=MODEL_DIR,
        stats=rules.expert_stats.output.parquet,
        cache=rules.cache_router_activations.output.inputs,
        manifest=rules.cache_router_activations.output.manifest,
    output:
        part="results/layers/{variant}/layer_{layer}.safetensors",
    wildcard_constraints:
        variant=exact_names(LAYERWISE_VARIANTS),
    params:
        steps=lambda wildcards: as_json(VARIANTS[wildcards.variant]),
        weights=weights_settings,
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
        heldout_fraction=config["compress"]["heldout_fraction"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/compress_layer/{variant}/layer_{layer}.log",
    benchmark:
        "results/benchmarks/compress_layer/{variant}/layer_{layer}.tsv"
    script:
        "../workflow/scripts/compress_layer.py"


# ... then the checkpoint, written one decoder layer at a time: never the whole model in memory.
rule assemble_checkpoint:
    input:
        model=MODEL_DIR,
        parts=lambda wildcards: expand(
            rules.compress_layer.output.part, variant=wildcards.variant, layer=moe_layers(wildcards)
        ),
    output:
        checkpoint=directory(CHECKPOINT_DIR),
    wildcard_constraints:
        variant=exact_names(LAYERWISE_VARIANTS),
    params:
        steps=lambda wildcards: as_json(VARIANTS[wildcards.variant]),
        layers=moe_layers,
        seeds=as_json(SEEDS),
        weights=weights_settings,
        dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
    threads: 1
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/assemble_checkpoint/{variant}.log",
    benchmark:
        "results/benchmarks/assemble_checkpoint/{variant}.tsv"
    script:
        "../workflow/scripts/assemble_checkpoint.py"
