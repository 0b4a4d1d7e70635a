"""What the steps of a variant share besides the model: statistics, cached inputs, bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError


@dataclass
class CompressionContext:
    """What steps may read besides the model.

    - ``stats``: the expert frequency table of the original model;
    - ``neuron_peaks``: {layer: [experts, intermediate]} each routed expert neuron's peak activation in the
      original model (what protects super neurons from a width cut), where a step needs them;
    - ``original_expert_ids``: which original expert each current expert slot holds, per layer, so a
      later step can still look up the statistics of an earlier step's survivors;
    - ``original_layers``: the original model's index of each decoder layer, where a step (``drop_layers``)
      renumbered them (``original_layer``): the statistics table is indexed by it;
    - ``moe_inputs``: cached MoE-block inputs per layer [tokens, hidden]; the last
      ``heldout_fraction`` of the tokens (whole calibration samples) are held out from fitting and
      measure reconstruction error;
    - ``reference_outputs``: the original (unmodified) MoE blocks' outputs on those inputs, filled by
      ``apply_steps`` before the first step: the target of fitted mitigations and of every error;
    - ``calibration_ids``: the calibration token windows [samples, seq_len], for whole-model measurements;
    - ``renormalized``: layers a ``renormalize`` step has switched to renormalised top-k weights;
    - ``layers``: the MoE layers the steps work on (None: all). A per-layer job sets one layer: the
      model's other layers may stay on the meta device, unread;
    - ``current_layer``: the layer a step is working on (set by ``each_block``), so an error raised
      inside a step can name it.

    Device placement: cached inputs and reference outputs live on the device of the layer they feed;
    ``original_expert_ids`` are bookkeeping that index the statistics table, so they stay on the CPU.
    """

    stats: pd.DataFrame | None = None
    neuron_peaks: dict[int, torch.Tensor] | None = None
    original_expert_ids: dict[int, torch.Tensor] = field(default_factory=dict)
    original_layers: dict[int, int] = field(default_factory=dict)
    moe_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    heldout_fraction: float = 0.1
    reference_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    calibration_ids: torch.Tensor | None = None
    renormalized: set[int] = field(default_factory=set)
    layers: set[int] | None = None
    current_layer: int | None = None

    @classmethod
    def for_model(cls, model, stats: pd.DataFrame | None = None, moe_inputs: dict[int, torch.Tensor] | None = None,
                  heldout_fraction: float = 0.1, calibration_ids: torch.Tensor | None = None,
                  layers: set[int] | None = None,
                  neuron_peaks: dict[int, torch.Tensor] | None = None) -> "CompressionContext":
        context = cls(stats=stats, moe_inputs=moe_inputs or {}, heldout_fraction=heldout_fraction,
                      calibration_ids=calibration_ids, layers=layers, neuron_peaks=neuron_peaks)
        adapter = adapter_for(model.config)
        context.original_expert_ids = {index: torch.arange(adapter.block_num_experts(block), device="cpu")
                                       for index, block in context.moe_blocks(model).items()}
        return context

    def original_layer(self, layer: int) -> int:
        """The original model's index of decoder layer ``layer`` (the statistics table's ``layer``)."""
        return self.original_layers.get(layer, layer)

    def moe_blocks(self, model) -> dict[int, torch.nn.Module]:
        """The MoE blocks the steps work on, by decoder-layer index."""
        blocks = adapter_for(model.config).moe_blocks(model)
        if self.layers is None:
            return blocks
        missing = self.layers - set(blocks)
        if missing:
            raise ModelError(f"layers {sorted(missing)} are not MoE layers of this model (MoE layers: {sorted(blocks)})")
        return {index: block for index, block in blocks.items() if index in self.layers}

    def each_block(self, model, only=None):
        """``moe_blocks(model).items()`` (restricted to the layers in ``only``, if given), noting each
        layer in ``current_layer`` while the caller works on it."""
        blocks = self.moe_blocks(model)
        for layer in (blocks if only is None else only):
            if layer not in blocks:
                raise ModelError(f"layer {layer} is not an MoE layer this step works on (MoE layers: {sorted(blocks)})")
            self.current_layer = layer
            yield layer, blocks[layer]
        self.current_layer = None

    def heldout_count(self, layer: int) -> int:
        return max(1, int(round(len(self.moe_inputs[layer]) * self.heldout_fraction)))

    def split_inputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit tokens, held-out tokens) of one layer's cached inputs."""
        hidden, heldout = self.moe_inputs[layer], self.heldout_count(layer)
        return hidden[:-heldout], hidden[-heldout:]

    def split_reference(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit, held-out) original block outputs, aligned with ``split_inputs``."""
        reference, heldout = self.reference_outputs[layer], self.heldout_count(layer)
        return reference[:-heldout], reference[-heldout:]

    def require_inputs(self, method: str) -> None:
        if not self.moe_inputs:
            raise ModelError(f"{method} needs the cached MoE-block inputs (results/cache/moe_inputs)")


@torch.no_grad()
def calibration_forward(model, input_ids: torch.Tensor, batch_size: int = 8) -> int:
    """Run ``model`` over the calibration windows [samples, seq_len] in batches, for the hooks a step has
    registered to measure something; return the number of tokens seen."""
    device = next(model.parameters()).device
    count = 0
    for start in range(0, len(input_ids), batch_size):
        batch = input_ids[start:start + batch_size].to(device)
        model(input_ids=batch, use_cache=False)
        count += batch.numel()
    return count
