"""Perplexity over fixed token windows: exp(mean next-token negative log-likelihood)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: np.ndarray, batch_size: int) -> dict:
    """``windows`` int64 [n, seq_len]; every window is scored independently (no context carried over)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start : start + batch_size]).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    mean_nll = total_nll / total_tokens
    return {"tokens": total_tokens, "nll": mean_nll, "perplexity": math.exp(mean_nll)}
