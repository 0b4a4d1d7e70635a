"""Perplexity over fixed token windows: exp(mean next-token negative log-likelihood)."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from moe_compress.errors import DataError, ModelError


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of ``logits`` [batch, seq, vocab] on ``input_ids`` [batch, seq]: position t predicts
    token t+1 (the last position has no target). The loss is taken in float32 whatever the model's dtype.

    The one definition of the language-modelling loss: demo training and every perplexity use it.
    """
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction=reduction
    )


@torch.no_grad()
def perplexity(model, windows: np.ndarray, batch_size: int, *, checkpoint: str = "the model",
               dataset: str = "the windows") -> dict:
    """``windows`` int64 [n, seq_len]; every window is scored independently (no context carried over).
    ``checkpoint`` and ``dataset`` name the run in errors: a NaN or inf result stops here."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[start : start + batch_size]).to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        total_nll += float(next_token_loss(logits, ids, reduction="sum"))
        total_tokens += ids[:, 1:].numel()
    if total_tokens == 0:
        raise DataError(f"perplexity of {checkpoint} on {dataset}: no tokens to score (windows {windows.shape})")
    mean_nll = total_nll / total_tokens
    # a finite but huge nll overflows exp: report it as inf, which is refused below
    value = math.exp(mean_nll) if mean_nll < math.log(sys.float_info.max) else math.inf
    for metric, number in (("nll", mean_nll), ("perplexity", value)):
        if not math.isfinite(number):
            raise ModelError(f"perplexity of {checkpoint} on {dataset}: {metric} is {number}, not a finite number "
                             f"(NaN or inf in the model's outputs: check the checkpoint's weights and dtype)")
    return {"tokens": total_tokens, "nll": mean_nll, "perplexity": value}
