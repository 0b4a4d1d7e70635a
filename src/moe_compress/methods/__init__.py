"""Compression methods. Each is a function ``apply(model, step, context) -> dict`` (a per-step report)
registered by method name; a variant applies its steps in order. Methods edit the in-memory model and
know nothing of Snakemake or file paths."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd
import torch

from moe_compress.architectures import adapter_for

log = logging.getLogger(__name__)


@dataclass
class CompressionContext:
    """What steps may read besides the model: calibration statistics, and which original expert each
    current expert slot holds (so a later step can still look up the statistics of an earlier one's survivors)."""

    stats: pd.DataFrame | None = None
    original_expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model, stats: pd.DataFrame | None = None) -> "CompressionContext":
        adapter = adapter_for(model.config)
        ids = {index: torch.arange(adapter.block_num_experts(block)) for index, block in adapter.moe_blocks(model).items()}
        return cls(stats=stats, original_expert_ids=ids)


def _registry():
    from moe_compress.methods import pruning

    return {"frequency_prune": pruning.frequency_prune}


def apply_steps(model, steps: list[dict], context: CompressionContext) -> list[dict]:
    """Apply ``steps`` in order to ``model`` (in place); return one report per step."""
    registry = _registry()
    reports = []
    for index, step in enumerate(steps):
        log.info("step %d: %s", index, step)
        reports.append({"step": index, **step, **registry[step["method"]](model, step, context)})
    return reports
