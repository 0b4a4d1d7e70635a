# Expert statistics: selection counts per top-k rank, routing weights and mass (from the router
# cache), REAP saliency and peak outputs (the experts run once on the cached MoE-block inputs routed to them;
# one decoder layer and its cached inputs in memory at a time with model.layer_streaming); the same per
# calibration source (a variant's weights re-weight them), the experts specific to one source, and each
# expert's per-neuron activation peaks. EASY-EP's saliency has a job of its own, run only for variants that
# rank by it, so adding such a variant leaves every other variant's inputs as they are.


rule expert_stats:
    input:
        model=MODEL_DIR,
        router=rules.cache_router_activations.output.router,
        # the MoE-block inputs, opened through the manifest; an input too, so a rebuilt folder reruns this job
        cache=rules.cache_router_activations.output.inputs,
        # the checksums every reader verifies; a reader that finds a corrupt file removes it, so the
        # cache is rebuilt (it is an input of compress and compress_layer too)
        manifest=rules.cache_router_activations.output.manifest,
    output:
        parquet="results/stats/expert_frequency.parquet",
        csv="results/stats/expert_frequency.csv",
        by_source="results/stats/expert_frequency_by_source.parquet",
        by_source_csv="results/stats/expert_frequency_by_source.csv",
        domain_experts=report(
            "results/stats/domain_experts.csv", caption="../workflow/report/domain_experts.rst", category="Statistics"
        ),
        neuron_peaks="results/stats/neuron_peaks.safetensors",
    params:
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
        layer_streaming=config["model"]["layer_streaming"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/expert_stats.log",
    benchmark:
        "results/benchmarks/expert_stats.tsv"
    script:
        "../workflow/scripts/expert_stats.py"


rule easy_ep_stats:
    input:
        model=MODEL_DIR,
        cache=rules.cache_router_activations.output.inputs,
        manifest=rules.cache_router_activations.output.manifest,
        residual=rules.cache_residual.output.residual,
        residual_manifest=rules.cache_residual.output.manifest,
    output:
        parquet="results/stats/easy_ep.parquet",
        by_source="results/stats/easy_ep_by_source.parquet",
    params:
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
        layer_streaming=config["model"]["layer_streaming"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/easy_ep_stats.log",
    benchmark:
        "results/benchmarks/easy_ep_stats.tsv"
    script:
        "../workflow/scripts/easy_ep_stats.py"
