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
    """What steps may read besides the model.

    - ``stats``: the expert frequency table of the original model;
    - ``original_expert_ids``: which original expert each current expert slot holds, per layer, so a
      later step can still look up the statistics of an earlier step's survivors;
    - ``moe_inputs``: cached MoE-block inputs per layer [tokens, hidden]; the last
      ``heldout_fraction`` of the tokens (whole calibration samples) are held out from fitting and
      measure reconstruction error.
    """

    stats: pd.DataFrame | None = None
    original_expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    moe_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    heldout_fraction: float = 0.1

    @classmethod
    def for_model(cls, model, stats: pd.DataFrame | None = None, moe_inputs: dict[int, torch.Tensor] | None = None,
                  heldout_fraction: float = 0.1) -> "CompressionContext":
        adapter = adapter_for(model.config)
        ids = {index: torch.arange(adapter.block_num_experts(block)) for index, block in adapter.moe_blocks(model).items()}
        return cls(stats=stats, original_expert_ids=ids, moe_inputs=moe_inputs or {}, heldout_fraction=heldout_fraction)

    def split_inputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit tokens, held-out tokens) of one layer's cached inputs."""
        hidden = self.moe_inputs[layer]
        heldout = max(1, int(round(len(hidden) * self.heldout_fraction)))
        return hidden[:-heldout], hidden[-heldout:]


def _registry():
    from moe_compress.methods import low_rank, merging, pruning

    return {"frequency_prune": pruning.frequency_prune, "hc_merge": merging.hc_merge,
            "svd_experts": low_rank.svd_experts}


@torch.no_grad()
def _heldout_outputs(model, context: CompressionContext) -> dict[int, torch.Tensor]:
    from moe_compress.methods.merging import block_output

    adapter = adapter_for(model.config)
    return {layer: block_output(block, context.split_inputs(layer)[1])
            for layer, block in adapter.moe_blocks(model).items() if layer in context.moe_inputs}


def apply_steps(model, steps: list[dict], context: CompressionContext) -> list[dict]:
    """Apply ``steps`` in order to ``model`` (in place); return one report per step.

    With cached inputs, every step's report carries the per-layer relative reconstruction error
    ||f - f'|| / ||f|| of the MoE block on held-out calibration tokens, f being the original block."""
    registry = _registry()
    reference = _heldout_outputs(model, context) if context.moe_inputs else {}
    reports = []
    for index, step in enumerate(steps):
        log.info("step %d: %s", index, step)
        report = {"step": index, **step, **registry[step["method"]](model, step, context)}
        if reference:
            from moe_compress.methods.merging import relative_error

            current = _heldout_outputs(model, context)
            report["reconstruction_error"] = {str(layer): relative_error(reference[layer], current[layer])
                                              for layer in reference}
        reports.append(report)
    return reports
