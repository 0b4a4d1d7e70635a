# The model under compression: the embedded demo MoE (trained here on the first calibration source: the
# bundled C4 sample by default), a local HF directory (used in place), or a hub id (downloaded once, on the
# submit host).


rule build_demo_model:
    input:
        corpus=CALIBRATION_CORPUS,
    output:
        model=directory(DEMO_MODEL_DIR),
    params:
        demo=as_json(config["demo_model"]),
        # the first calibration source: how its documents are read and which are held out
        text_field=config["calibration"]["sources"][0]["text_field"],
        heldout_docs=config["calibration"]["sources"][0]["heldout_docs"],
        documents=config["calibration"]["sources"][0]["documents"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/build_demo_model.log",
    benchmark:
        "results/benchmarks/build_demo_model.tsv"
    script:
        "../workflow/scripts/build_demo_model.py"


rule fetch_model:
    output:
        model=directory(HUB_MODEL_DIR),
    params:
        repo_id=lambda wildcards: hub_repo_id(wildcards.repo_id),
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/fetch_model/{repo_id}.log",
    benchmark:
        "results/benchmarks/fetch_model/{repo_id}.tsv"
    script:
        "../workflow/scripts/fetch_model.py"


localrules:
    fetch_model,
