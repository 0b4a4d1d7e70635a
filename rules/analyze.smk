# The recipe's analyze step: the structure of the source model and of every variant checkpoint, read from
# the saved tensors' headers (no weights loaded): layers, heads, experts and top-k per layer, widths, and
# parameters and bytes by module type.


rule analyze:
    input:
        model=MODEL_DIR,
        checkpoints=expand(rules.compress.output.checkpoint, variant=VARIANTS),
    output:
        json="results/analysis/model.json",
        md=report("results/analysis/model.md", caption="../workflow/report/analysis.rst", category="Model structure"),
    params:
        # the variant of each checkpoint input, in order (the config's variant order)
        variants=list(VARIANTS),
        # a model with its own modeling code is built (on the meta device) only where the config trusts it
        trust_remote_code=config["model"]["trust_remote_code"],
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/analyze.log",
    benchmark:
        "results/benchmarks/analyze.tsv"
    script:
        "../workflow/scripts/analyze.py"


# a few seconds: headers and a meta-device skeleton per checkpoint
localrules:
    analyze,
