"""Perplexity over fixed token windows: exp(mean next-token negative log-likelihood)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of ``logits`` [batch, seq, vocab] on ``input_ids`` [batch, seq]: position t predicts
    token t+1 (the last position has no target). The loss is taken in float32 whatever the model's dtype.

    The one definition of the language-modelling loss: demo training and every perplexity use it.
    """
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction=reduction
    )


@torch.no_grad()
def perplexity(model, windows: np.ndarray, batch_size: int) -> dict:
    """``windows`` int64 [n, seq_len]; every window is scored independently (no context carried over)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start : start + batch_size]).to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        total_nll += float(next_token_loss(logits, ids, reduction="sum"))
        total_tokens += ids[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return {"tokens": total_tokens, "nll": mean_nll, "perplexity": math.exp(mean_nll)}
