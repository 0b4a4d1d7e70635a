# Evaluation of each checkpoint in one job per variant, one load of the model: speed (prefill, time per
# decoded token), perplexity on each calibration source's held-out documents and WikiText-2, and zero-shot benchmarks through
# lm-evaluation-harness. Each result is remembered by what it was computed from (evaluate/session.py), so a
# rerun (a task added, a setting changed) computes only what changed.


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


rule evaluate:
    input:
        checkpoint=rules.compress.output.checkpoint,
        windows=expand(rules.perplexity_windows.output.windows, dataset=PPL_DATASETS),
        prompts=rules.perplexity_windows.output.windows.format(dataset=PROMPT_DATASET),
        prefetched=prefetched_eval_data,
    output:
        speed="results/eval/{variant}/speed.csv",
        perplexity="results/eval/{variant}/perplexity.csv",
        lm_eval=directory("results/eval/{variant}/lm_eval"),
        summary="results/eval/{variant}/evaluation.json",
    params:
        speed=as_json({key: config["speed"][key] for key in
                       ("num_prompts", "prompt_tokens", "decode_tokens", "repeats", "warmup")}),
        datasets=PPL_DATASETS,
        perplexity_batch_size=config["perplexity"]["batch_size"],
        tasks=benchmark_tasks,
        lm_eval=benchmark_settings,
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        trust_remote_code=config["model"]["trust_remote_code"],
        memo_dir="results/eval/{variant}/.memo",
    # every core: speed is only comparable when no other job runs beside this one
    threads: exclusive_threads
    conda:
        "../envs/eval.yaml"
    log:
        "results/logs/evaluate/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate/{variant}.tsv"
    script:
        "../workflow/scripts/evaluate.py"
