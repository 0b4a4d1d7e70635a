"""Speed of a checkpoint on the job's device: prefill throughput and decode time per token.

A fixed prompt set (held-out C4 windows cut to ``prompt_tokens``) is run ``warmup + repeats`` times;
the warm-up runs are discarded and the median of the rest is reported, so one slow run (page faults,
another process) does not decide the figure; the fastest and slowest timed runs are reported beside it, so
the final table can tell a real speed difference from noise. Decoding is greedy with a fixed number of new tokens
(``min_new_tokens = max_new_tokens``), so every variant generates the same amount of work.

The time per token is taken inside ``generate``, between the first and the last new token: decode
steps only, one clock, not the difference of two separately timed runs.
"""

from __future__ import annotations

import math
import resource
import statistics
import time

import numpy as np
import torch
from transformers import StoppingCriteriaList

from moe_compress.errors import DataError, ModelError


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TokenClock:
    """A stopping criterion that never stops: it notes the time each new token is ready."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def measure_speed(model, prompts: np.ndarray, decode_tokens: int, repeats: int, warmup: int, *,
                  checkpoint: str = "the model") -> dict:
    """``prompts`` int64 [batch, prompt_tokens]. Returns the medians over the timed repeats, and their min and
    max (``*_min``, ``*_max``). ``checkpoint`` names the model in errors."""
    if len(prompts) == 0:
        raise DataError("speed: no prompts")
    if decode_tokens < 2:
        raise DataError("speed.decode_tokens must be at least 2: the time per token is measured between new tokens")
    device = next(model.parameters()).device
    ids = torch.from_numpy(prompts).to(device)
    attention = torch.ones_like(ids)
    pad = model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id
    if isinstance(pad, list):
        pad = pad[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_times, decode_times = [], []
    for run in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=attention, use_cache=False)
        _synchronize(device)
        prefill = time.perf_counter() - start
        clock = _TokenClock(device)
        model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=decode_tokens,
                       min_new_tokens=decode_tokens, do_sample=False, pad_token_id=pad,
                       stopping_criteria=StoppingCriteriaList([clock]))
        if len(clock.times) != decode_tokens:
            raise RuntimeError(f"speed: generate made {len(clock.times)} tokens, not {decode_tokens}")
        if run >= warmup:
            prefill_times.append(prefill)
            # decode steps only: from the first new token to the last, one token per prompt each
            decode_times.append((clock.times[-1] - clock.times[0]) / (decode_tokens - 1))
    if device.type == "cuda":
        peak_mb, memory_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:  # the process's peak resident set (Linux reports KiB): includes loading the model
        peak_mb, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"
    result = {
        "device": str(device),
        "batch": int(ids.shape[0]),
        "prompt_tokens": int(ids.shape[1]),
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "prefill_tokens_per_s": ids.numel() / statistics.median(prefill_times),
        # the slowest prefill gives the lowest throughput
        "prefill_tokens_per_s_min": ids.numel() / max(prefill_times),
        "prefill_tokens_per_s_max": ids.numel() / min(prefill_times),
        "t_token_ms": 1000 * statistics.median(decode_times),
        "t_token_ms_min": 1000 * min(decode_times),
        "t_token_ms_max": 1000 * max(decode_times),
        "peak_memory_mb": peak_mb,
        "memory_kind": memory_kind,
    }
    for metric, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelError(f"speed of {checkpoint}: {metric} is {value}, not a finite number")
    return result
