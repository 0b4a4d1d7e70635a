# Serving (serving.vllm, or evaluation.backend: vllm): each variant's checkpoint in vLLM. The pipeline's
# transformers writes the reference (greedy continuations of fixed prompts, with their log-probabilities); the
# serving job starts one vLLM engine per checkpoint in the serving environment (another Python: vLLM pins its own
# transformers), compares it with the reference, measures its serving speed and, with evaluation.backend: vllm,
# runs the lm-eval tasks through it. results/serving/<variant>.json says which engines serve the variant.


rule serving_reference:
    input:
        checkpoint=rules.compress.output.checkpoint,
    output:
        reference="results/serving/{variant}/reference.json",
    params:
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        max_new_tokens=config["serving"]["max_new_tokens"],
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/serving_reference/{variant}.log",
    benchmark:
        "results/benchmarks/serving_reference/{variant}.tsv"
    script:
        "../workflow/scripts/serving_reference.py"


rule serving:
    input:
        checkpoint=rules.compress.output.checkpoint,
        reference=rules.serving_reference.output.reference,
        prefetched=prefetched_eval_data,
    output:
        report="results/serving/{variant}.json",
        lm_eval=directory("results/serving/{variant}/lm_eval"),
    params:
        python=config["serving"]["python"],
        engine=as_json({key: config["serving"][key] for key in ("max_model_len", "kv_cache_mb", "check_transformers")}
                       | {"dtype": config["model"]["dtype"], "device": config["model"]["device"]}),
        speed=as_json(config["serving"]["speed"]),
        tasks=serving_tasks,
        lm_eval=serving_task_settings,
    # every core: serving speed is only comparable when no other job runs beside this one
    threads: exclusive_threads
    # this half reads and writes the files; the engine runs in the serving environment's Python (serving.python)
    conda:
        "../envs/core.yaml"
    log:
        "results/logs/serving/{variant}.log",
    benchmark:
        "results/benchmarks/serving/{variant}.tsv"
    script:
        "../workflow/scripts/serving.py"
