# The expensive step on a real model: one forward pass that caches router logits/decisions and the
# MoE-block inputs, by default streamed one decoder layer at a time (model.layer_streaming). Its params
# are only the model and calibration settings, so a changed compression threshold never reruns it.


rule cache_router_activations:
    input:
        model=MODEL_DIR,
        calibration=rules.sample_calibration.output.samples,
    output:
        router="results/cache/router_logits.parquet",
        manifest="results/cache/manifest.json",
        inputs=directory("results/cache/moe_inputs"),
    params:
        batch_size=config["cache"]["batch_size"],
        hidden_dtype=config["cache"]["hidden_dtype"],
        layer_streaming=config["model"]["layer_streaming"],
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/cache_router_activations.log",
    benchmark:
        "results/benchmarks/cache_router_activations.tsv"
    script:
        "../workflow/scripts/cache_router_activations.py"


# A second pass, only for variants that rank experts by EASY-EP: the residual stream entering each MoE
# sublayer on the same calibration tokens. Apart from the cache, so that adding such a variant reruns none of
# the others.
rule cache_residual:
    input:
        model=MODEL_DIR,
        calibration=rules.sample_calibration.output.samples,
    output:
        manifest="results/cache_residual/manifest.json",
        residual=directory("results/cache_residual/moe_inputs"),
    params:
        batch_size=config["cache"]["batch_size"],
        hidden_dtype=config["cache"]["hidden_dtype"],
        layer_streaming=config["model"]["layer_streaming"],
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/cache_residual.log",
    benchmark:
        "results/benchmarks/cache_residual.tsv"
    script:
        "../workflow/scripts/cache_residual.py"
