# Evaluation of each checkpoint: perplexity on held-out C4 and WikiText-2, zero-shot benchmarks through
# lm-evaluation-harness (one job per variant and task), and speed (prefill, time per decoded token).


rule perplexity:
    input:
        checkpoint=rules.compress.output.checkpoint,
        windows=expand(rules.perplexity_windows.output.windows, dataset=PPL_DATASETS),
    output:
        csv="results/eval/{variant}/perplexity.csv",
    params:
        datasets=PPL_DATASETS,
        batch_size=config["perplexity"]["batch_size"],
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
    threads: 2
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/perplexity/{variant}.log",
    benchmark:
        "results/benchmarks/perplexity/{variant}.tsv"
    script:
        "../workflow/scripts/perplexity.py"


# source: hub -> the datasets are fetched once, on the submit host (a local rule), into HF_HOME; the
# evaluation jobs then read it with the hub switched off (compute nodes often have no internet)
rule prefetch_eval_data:
    output:
        prefetched="results/eval_data/prefetched.json",
    params:
        tasks=EVAL_TASKS,
    conda:
        "../envs/eval.yaml"
    log:
        "results/logs/prefetch_eval_data.log",
    benchmark:
        "results/benchmarks/prefetch_eval_data.tsv"
    script:
        "../workflow/scripts/prefetch_eval_data.py"


localrules:
    prefetch_eval_data,


rule lm_eval:
    input:
        checkpoint=rules.compress.output.checkpoint,
        prefetched=(
            [rules.prefetch_eval_data.output.prefetched] if config["evaluation"]["source"] == "hub" else []
        ),
    output:
        csv="results/eval/{variant}/lm_eval/{task}.csv",
        json="results/eval/{variant}/lm_eval/{task}.json",
    params:
        source=config["evaluation"]["source"],
        data_dir=config["evaluation"]["data_dir"],
        num_fewshot=config["evaluation"]["num_fewshot"],
        limit=config["evaluation"]["limit"],
        batch_size=config["evaluation"]["batch_size"],
        backend=config["evaluation"]["backend"],
        seed=config["evaluation"]["seed"],
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
    threads: 2
    conda:
        "../envs/eval.yaml"
    log:
        "results/logs/lm_eval/{variant}/{task}.log",
    benchmark:
        "results/benchmarks/lm_eval/{variant}/{task}.tsv"
    script:
        "../workflow/scripts/lm_eval.py"


rule speed:
    input:
        checkpoint=rules.compress.output.checkpoint,
        prompts=rules.perplexity_windows.output.windows.format(dataset="c4_heldout"),
    output:
        csv="results/eval/{variant}/speed.csv",
    params:
        num_prompts=config["speed"]["num_prompts"],
        prompt_tokens=config["speed"]["prompt_tokens"],
        decode_tokens=config["speed"]["decode_tokens"],
        repeats=config["speed"]["repeats"],
        warmup=config["speed"]["warmup"],
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
    # every core: timings are only comparable when no other job runs beside this one
    threads: exclusive_threads
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/speed/{variant}.log",
    benchmark:
        "results/benchmarks/speed/{variant}.tsv"
    script:
        "../workflow/scripts/speed.py"
