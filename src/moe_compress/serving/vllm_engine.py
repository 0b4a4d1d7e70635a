"""A vLLM engine's checks (serving environment only): its engine arguments, greedy continuations of the agreement
prompts, serving speed. The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a
checkpoint vLLM refuses raises there with vLLM's own message rather than a dead-engine notice, and no process is
spawned."""

from __future__ import annotations

import os
import statistics
import time

from moe_compress.serving.agreement import compare, summarize

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def engine_arguments(path: str, dtype: str, max_model_len: int, seed: int, device: str,
                     kv_cache_mb: int | None = None) -> dict:
    """vLLM's engine arguments for one checkpoint. Eager mode: CUDA graphs and torch.compile cost minutes of
    start-up per variant and change nothing the checks read; the prefix cache is off so each timed repeat
    prefills again. ``kv_cache_mb``: the KV cache's size, which also skips vLLM's memory profiling run (None:
    vLLM's own sizing, 4 GiB on the CPU, most of the free memory on a GPU)."""
    arguments = {"model": path, "dtype": dtype, "max_model_len": max_model_len, "seed": seed, "enforce_eager": True,
                 "enable_prefix_caching": False, "trust_remote_code": False}
    if kv_cache_mb is not None:
        arguments["kv_cache_memory_bytes"] = kv_cache_mb * 2**20
    elif device.startswith("cuda"):
        arguments["gpu_memory_utilization"] = 0.85
    return arguments


def greedy(llm, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy continuation of each prompt, with each generated token's log-probability."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=max_new_tokens, logprobs=1,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    continuations = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        continuations.append((tokens, logprobs))
    return continuations


def agreement(llm, references: list[dict]) -> dict:
    """The engine's continuations against the transformers reference (``agreement.transformers_reference``)."""
    prompts = [reference["prompt"] for reference in references]
    continuations = greedy(llm, prompts, len(references[0]["tokens"]))
    per_prompt = [compare(reference, tokens, logprobs)
                  for reference, (tokens, logprobs) in zip(references, continuations)]
    return {**summarize(per_prompt), "per_prompt": per_prompt}


def _timed(llm, prompts, params, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def serving_speed(llm, vocab_size: int, concurrent: int, prompt_tokens: int, decode_tokens: int, repeats: int,
                  warmup: int, seed: int = 0) -> dict:
    """Throughput at ``concurrent`` requests submitted together: prefill (prompt tokens per second, one
    generated token each), decode (generated tokens per second once the prompts are in), and the time to
    first token of one request alone. Prompts are random token ids (fixed seed), EOS ignored, so every
    variant does the same work."""
    import random

    from vllm import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(vocab_size) for _ in range(prompt_tokens)]} for _ in range(concurrent)]
    first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    decode = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, min_tokens=decode_tokens + 1, ignore_eos=True)
    for _ in range(warmup):
        llm.generate(prompts, decode, use_tqdm=False)
    ttft = _timed(llm, prompts[:1], first_token, repeats)
    prefill = _timed(llm, prompts, first_token, repeats)
    full = _timed(llm, prompts, decode, repeats)
    decode_s = max(full - prefill, 1e-9)
    return {"concurrent_requests": concurrent, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "repeats": repeats, "ttft_s": ttft, "prefill_tokens_per_s": concurrent * prompt_tokens / prefill,
            "decode_tokens_per_s": concurrent * decode_tokens / decode_s,
            "time_per_output_token_s": decode_s / decode_tokens}
