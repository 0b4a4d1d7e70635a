"""Expert statistics from the router cache, vectorised over tokens.

``expert_frequency`` has one row per (layer, expert) with
- ``tokens``: calibration tokens seen by the layer;
- ``top_k``: the experts the layer routes each token to (layers may differ: a per-layer top-k);
- ``selected_rank_<r>``: how often the expert was the router's r-th choice (r = 1..top-k), so the
  count "selected within the top-k'" for any k' <= top-k is the sum of the first k' rank columns (0 for
  ranks beyond the layer's own top-k);
- ``selected``: selected within the model's top-k; ``frequency`` = selected / tokens;
- ``mean_weight_when_selected``: mean routing weight applied when selected;
- ``routing_mass``: total routing weight applied to the expert over all tokens;
- ``mean_router_prob``: mean over all tokens of the router's own probability for the expert: the
  softmax of the logits (softmax-then-top-k routers), the sigmoid gate (DeepSeek-V3's sigmoid routers,
  independent per expert), or the weight applied, zero outside the top-k (gpt-oss: softmax over the
  top-k logits only);
- ``reap_saliency`` (REAP, Lasby et al. 2025, as its code computes it): mean over the tokens routed to
  the expert of g(x) x the L2 norm of the expert's output, g the softmax over all experts' logits,
  renormalised over the token's top-k only where the config has a true ``norm_topk_prob``. So on Mixtral,
  whose router renormalises but whose config has no such field, g is the raw softmax; on sigmoid routers
  (DeepSeek-V3), for which REAP's code has no definition of its own, the same softmax of the logits
  weighs the tokens the router actually chose;
- ``reap_saliency_applied``: the same with g the weight the block applies (where the two differ, it is
  the expert's contribution as the model computes it). From the cached MoE-block inputs; each expert
  runs only on its tokens;
- ``peak_output``: the largest absolute element of the expert's (unweighted) output over the tokens routed to
  it (0 if none): the massive activations of super experts (Su et al. 2025);
- ``easy_ep_saliency`` (EASY-EP, arXiv 2504.06792), only from a cache with the residual stream: the sum over the
  tokens routed to the expert of g(x) x ||E(x)|| x max(1 - cos(h, h + r), 0), g the weight the block applies, h the residual stream
  entering the MoE sublayer and r the routed experts' combined output (shared experts left out).

Per MoE layer and neuron (``ExpertStatistics.neuron_peaks``, ``results/stats/neuron_peaks.safetensors``): the
largest absolute value of each expert's intermediate activation (what its down projection reads) over its routed
tokens, [experts, intermediate].

Per calibration source (``expert_frequency_by_source``, ``expert_statistics``): the same columns over each source's
tokens alone, with a ``source`` column; the count columns (``tokens``, ``selected_rank_<r>``, ``selected``) and the
sums (``routing_mass``, ``easy_ep_saliency``) of the sources add up to the totals. ``reweighted_statistics`` turns them into the table a calibration with other source shares would
have given, without a new forward pass; ``domain_experts`` names the experts one source uses far more than the
others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moe_compress.cache import LayerRouting
from moe_compress.errors import DataError
from moe_compress.moe_block import expert_activation, run_expert
from moe_compress.streaming import decoder_layers_of


def rank_column(rank: int) -> str:
    return f"selected_rank_{rank}"


def router_probabilities(routing: LayerRouting, scoring: str) -> np.ndarray:
    """[tokens, experts] the router's own probability of each expert (see ``mean_router_prob``)."""
    logits = routing.logits.astype(np.float64)
    if scoring == "sigmoid_topk":
        return 1.0 / (1.0 + np.exp(-logits))
    if scoring == "topk_softmax":
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, routing.topk_indices, routing.topk_weights.astype(np.float64), axis=1)
        return probs
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def layer_frequency(layer: int, routing: LayerRouting, scoring: str = "softmax_topk") -> pd.DataFrame:
    tokens, num_experts = routing.logits.shape
    top_k = routing.topk_indices.shape[1]
    # counts[r, e]: one bincount over (rank, expert) pairs, no loop over tokens
    flat = (np.arange(top_k)[None, :] * num_experts + routing.topk_indices).ravel()
    counts = np.bincount(flat, minlength=top_k * num_experts).reshape(top_k, num_experts)
    mass = np.bincount(routing.topk_indices.ravel(), weights=routing.topk_weights.ravel().astype(np.float64),
                       minlength=num_experts)
    probs = router_probabilities(routing, scoring)
    selected = counts.sum(axis=0)
    table = pd.DataFrame(
        {
            "layer": layer,
            "expert": np.arange(num_experts),
            "tokens": tokens,
            "top_k": top_k,
            **{rank_column(rank + 1): counts[rank] for rank in range(top_k)},
            "selected": selected,
            "frequency": selected / tokens,
            "mean_weight_when_selected": np.divide(mass, selected, out=np.zeros(num_experts), where=selected > 0),
            "routing_mass": mass,
            "mean_router_prob": probs.mean(axis=0),
        }
    )
    return table


def expert_frequency(routing: dict[int, LayerRouting], scoring: str = "softmax_topk") -> pd.DataFrame:
    """The frequency table; ``scoring``: the architecture's (``MoEArchitecture.scoring``), for
    ``mean_router_prob``."""
    table = pd.concat([layer_frequency(layer, routing[layer], scoring) for layer in sorted(routing)],
                      ignore_index=True)
    # a layer with a smaller top-k never chose an expert at the higher ranks: 0, not missing
    ranks = [column for column in table.columns if column.startswith("selected_rank_")]
    table[ranks] = table[ranks].fillna(0).astype(np.int64)
    order = ["layer", "expert", "tokens", "top_k", *sorted(ranks, key=lambda c: int(c.rsplit("_", 1)[1]))]
    return table[order + [column for column in table.columns if column not in order]]


def selected_within_top(table: pd.DataFrame, k: int) -> pd.Series:
    """Per row, how often the expert was chosen within the router's first ``k`` ranks; ``k`` may not exceed
    the top-k of any layer in the table (the ranks beyond a layer's own top-k were never recorded)."""
    available = sum(c.startswith("selected_rank_") for c in table.columns)
    layer_top_k = table.groupby("layer")["top_k"].first() if "top_k" in table.columns else None
    if layer_top_k is not None and (layer_top_k < k).any():
        layer = int(layer_top_k.index[layer_top_k < k][0])
        raise DataError(f"top_k={k} is more than layer {layer}'s top-k ({int(layer_top_k[layer])}) recorded in the "
                        "statistics")
    if k > available:
        raise DataError(f"top_k={k} is more than the model's top-k ({available}) recorded in the statistics")
    return table[[rank_column(rank) for rank in range(1, k + 1)]].sum(axis=1)


SALIENCY_COLUMNS = ("reap_saliency", "reap_saliency_applied")
PEAK_COLUMN = "peak_output"
EASY_EP_COLUMN = "easy_ep_saliency"


@torch.no_grad()
def layer_saliency(adapter, block, hidden: torch.Tensor, reap_renormalize: bool,
                   token_source: torch.Tensor | None = None, num_sources: int = 1,
                   residual: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """The per-expert columns of ``block`` on ``hidden`` [tokens, hidden]: "reap_saliency",
    "reap_saliency_applied", "peak_output" (0 for an expert never routed to), and with ``residual`` (the residual
    stream entering the MoE sublayer, [tokens, hidden]) "easy_ep_saliency"; ``reap_renormalize``: REAP's
    renormalisation (``reap_renormalizes``). Also "neuron_peaks" [experts, intermediate] (float32 tensor). With
    ``token_source`` (each token's source index, of ``num_sources``) also ``<column>_by_source``: the same over
    each source's tokens, [sources, experts]."""
    logits, weights, indices = adapter.call_router(block, hidden)
    reap_weights = torch.softmax(logits.double(), dim=-1).gather(1, indices)
    if reap_renormalize:
        reap_weights = reap_weights / reap_weights.sum(dim=-1, keepdim=True)
    num_experts = adapter.block_num_experts(block)
    device = hidden.device
    saliency = torch.zeros(2, num_experts, dtype=torch.float64, device=device)
    # per source: the sums of the same products and the routed-token counts they are averaged over
    sums = torch.zeros(2, num_sources, num_experts, dtype=torch.float64, device=device)
    counts = torch.zeros(num_sources, num_experts, dtype=torch.float64, device=device)
    peaks = torch.zeros(num_sources, num_experts, dtype=torch.float64, device=device)
    neuron_peaks = []
    # EASY-EP: the routed experts' combined output per token, and each (token, expert) pair's weight x norm
    routed_output = (torch.zeros(residual.shape, dtype=torch.float64, device=device)
                     if residual is not None else None)
    pair_tokens, pair_experts, pair_applied = [], [], []
    sources_of = token_source if token_source is not None else torch.zeros(len(hidden), dtype=torch.long,
                                                                            device=device)
    for expert in range(num_experts):  # a loop over experts; each expert's tokens are one batch
        token_idx, rank = torch.where(indices == expert)
        # what the down projection reads; a never-routed expert's peaks are 0
        activation = expert_activation(adapter, block, hidden[token_idx], expert)
        neuron_peaks.append(activation.abs().amax(dim=0).float() if len(token_idx)
                            else activation.new_zeros(activation.shape[-1], dtype=torch.float32))
        if not len(token_idx):
            continue
        output = run_expert(adapter, block, hidden[token_idx], expert).double()
        norms = output.norm(dim=-1)
        applied_weight = weights[token_idx, rank].double()
        reap = reap_weights[token_idx, rank] * norms
        applied = applied_weight * norms
        saliency[0, expert] = reap.mean()
        saliency[1, expert] = applied.mean()
        sources = sources_of[token_idx]
        peaks[:, expert] = torch.zeros(num_sources, dtype=torch.float64, device=device).scatter_reduce(
            0, sources, output.abs().amax(dim=-1), reduce="amax")
        if token_source is not None:
            sums[0, :, expert].index_add_(0, sources, reap)
            sums[1, :, expert].index_add_(0, sources, applied)
            counts[:, expert] = torch.bincount(sources, minlength=num_sources).double()
        if routed_output is not None:
            routed_output.index_add_(0, token_idx, applied_weight[:, None] * output)
            pair_tokens.append(token_idx)
            pair_experts.append(torch.full_like(token_idx, expert))
            pair_applied.append(applied)
    reap, applied = saliency.cpu().numpy()
    result = {"reap_saliency": reap, "reap_saliency_applied": applied,
              PEAK_COLUMN: peaks.amax(dim=0).cpu().numpy(), "neuron_peaks": torch.stack(neuron_peaks).cpu()}
    if routed_output is not None:
        stream = residual.to(device, torch.float64)
        # how far the routed experts turn each token's residual stream
        turn = (1 - F.cosine_similarity(stream, stream + routed_output, dim=-1)).clamp(min=0)
        tokens, experts = torch.cat(pair_tokens), torch.cat(pair_experts)
        contribution = torch.cat(pair_applied) * turn[tokens]
        easy_ep = torch.zeros(num_sources * num_experts, dtype=torch.float64, device=device).index_add_(
            0, sources_of[tokens] * num_experts + experts, contribution).reshape(num_sources, num_experts)
        result[EASY_EP_COLUMN] = easy_ep.sum(dim=0).cpu().numpy()
        if token_source is not None:
            result[f"{EASY_EP_COLUMN}_by_source"] = easy_ep.cpu().numpy()
    if token_source is not None:
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums)).cpu().numpy()
        result.update({f"{column}_by_source": means[index] for index, column in enumerate(SALIENCY_COLUMNS)})
        result[f"{PEAK_COLUMN}_by_source"] = peaks.cpu().numpy()
    return result


@dataclass
class ExpertStatistics:
    """What the experts' runs on the cached inputs give: ``totals`` (one row per (layer, expert)), ``by_source``
    (one row per (source, layer, expert)) and ``neuron_peaks`` ({layer: float32 [experts, intermediate]})."""

    totals: pd.DataFrame
    by_source: pd.DataFrame
    neuron_peaks: dict[int, torch.Tensor]


def expert_statistics(model_or_layers, moe_inputs: Mapping[int, torch.Tensor], source_names: list[str],
                      token_source: np.ndarray, residuals: Mapping[int, torch.Tensor] | None = None) -> ExpertStatistics:
    """The per-expert columns of ``layer_saliency`` on the cached MoE-block inputs, over all tokens and over
    each source's (``token_source``: each cached token's index into ``source_names``), and the per-neuron peaks.
    The experts run once for all of them. ``residuals`` ({layer: [tokens, hidden]}, e.g.
    ``CacheReader.residuals``): the residual streams EASY-EP needs; without them there is no
    ``easy_ep_saliency`` column.

    ``model_or_layers``: a model in memory or ``DecoderLayers`` (a ``LayerStream`` loads each decoder
    layer when its turn comes); ``moe_inputs``: {layer: [tokens, hidden]}, e.g. ``CacheReader.moe_inputs``,
    which reads each layer's inputs when it is looked up. One layer and its inputs at a time."""
    layers = decoder_layers_of(model_or_layers)
    adapter, config = layers.adapter, layers.model.config
    columns = [*SALIENCY_COLUMNS, PEAK_COLUMN, *([EASY_EP_COLUMN] if residuals is not None else [])]
    totals, by_source, neuron_peaks = [], [], {}
    for layer in sorted(moe_inputs):
        block = layers.moe_block(layer)
        hidden = moe_inputs[layer].to(layers.device, next(block.parameters()).dtype)
        if len(token_source) != len(hidden):
            raise DataError(f"layer {layer}: {len(hidden)} cached MoE-block inputs, but {len(token_source)} tokens "
                            f"have a calibration source; rebuild results/cache")
        residual = residuals[layer] if residuals is not None else None
        if residual is not None and residual.shape != hidden.shape:
            raise DataError(f"layer {layer}: {tuple(residual.shape)} cached residual-stream rows for "
                            f"{tuple(hidden.shape)} MoE-block inputs; rebuild results/cache")
        sources = torch.as_tensor(token_source, device=layers.device)
        result = layer_saliency(adapter, block, hidden, adapter.reap_renormalizes(config), sources,
                                len(source_names), residual)
        experts = np.arange(adapter.block_num_experts(block))
        totals.append(pd.DataFrame({"layer": layer, "expert": experts,
                                    **{column: result[column] for column in columns}}))
        by_source += [pd.DataFrame({"source": name, "layer": layer, "expert": experts,
                                    **{column: result[f"{column}_by_source"][index] for column in columns}})
                      for index, name in enumerate(source_names)]
        neuron_peaks[layer] = result["neuron_peaks"]
        layers.free_layer(layer)
    return ExpertStatistics(pd.concat(totals, ignore_index=True), pd.concat(by_source, ignore_index=True),
                            neuron_peaks)


def expert_saliency_tables(model_or_layers, moe_inputs: Mapping[int, torch.Tensor], source_names: list[str],
                           token_source: np.ndarray, residuals: Mapping[int, torch.Tensor] | None = None
                           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per (layer, expert), one row per (source, layer, expert)) of ``expert_statistics``."""
    statistics = expert_statistics(model_or_layers, moe_inputs, source_names, token_source, residuals)
    return statistics.totals, statistics.by_source


NEURON_PEAKS_KEY = "layer_{layer}"


def neuron_peaks_tensors(neuron_peaks: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-neuron peaks as the tensors of ``neuron_peaks.safetensors``: {"layer_<L>": float32 [experts,
    intermediate]}."""
    return {NEURON_PEAKS_KEY.format(layer=layer): peaks.float().contiguous() for layer, peaks in neuron_peaks.items()}


def read_neuron_peaks(path: str | Path) -> dict[int, torch.Tensor]:
    """{layer: float32 [experts, intermediate]}: each expert's largest absolute intermediate activation per neuron
    over its routed calibration tokens (``results/stats/neuron_peaks.safetensors``)."""
    peaks = {int(name.removeprefix("layer_")): tensor for name, tensor in load_file(str(path)).items()}
    return dict(sorted(peaks.items()))


def expert_saliency(model_or_layers, moe_inputs: Mapping[int, torch.Tensor]) -> pd.DataFrame:
    """One row per (layer, expert): the REAP saliency columns on the cached MoE-block inputs (see
    ``expert_saliency_tables``)."""
    tokens = len(next(iter(moe_inputs.values())))
    return expert_saliency_tables(model_or_layers, moe_inputs, ["all"], np.zeros(tokens, dtype=np.int64))[0]


def expert_frequency_by_source(routing: dict[int, LayerRouting], source_names: list[str], token_source: np.ndarray,
                               scoring: str = "softmax_topk") -> pd.DataFrame:
    """The frequency table over each source's tokens alone, with a ``source`` column (sources in the order of
    ``source_names``; ``token_source``: each cached token's index into them)."""
    frames = []
    for index, name in enumerate(source_names):
        mask = token_source == index
        subset = {}
        for layer, layer_routing in routing.items():
            if len(layer_routing.logits) != len(token_source):
                raise DataError(f"layer {layer}: {len(layer_routing.logits)} cached router decisions, but "
                                f"{len(token_source)} tokens have a calibration source; rebuild results/cache")
            subset[layer] = LayerRouting(layer_routing.logits[mask], layer_routing.topk_indices[mask],
                                         layer_routing.topk_weights[mask])
        frames.append(expert_frequency(subset, scoring).assign(source=name))
    table = pd.concat(frames, ignore_index=True)
    return table[["source", *(column for column in table.columns if column != "source")]]


# columns that are counts or sums over tokens: per source they add up to the totals (easy_ep_saliency only where
# the cache has the residual stream)
ADDITIVE_COLUMNS = ("selected", "routing_mass", EASY_EP_COLUMN)


def reweighted_statistics(by_source: pd.DataFrame, weights: Mapping[str, float]) -> pd.DataFrame:
    """The statistics table (the totals' columns) a calibration set whose tokens came from the sources in the
    shares ``weights`` would give, from the per-source table: each source's per-token rates mixed by its
    weight. Counts and sums are scaled to the cached token count, so thresholds read them as they read the
    totals; ``frequency`` and ``mean_router_prob`` are the weighted means of the sources'; REAP saliency, a mean
    over the tokens routed to the expert, is the sources' means weighted by their routed tokens under the mix
    (Σ w·f·s / Σ w·f, f the source's frequency); ``peak_output``, a maximum, is the largest of the sources with a
    weight above 0. Weights equal to the sources' token shares give the totals. A source left out of ``weights``
    counts with weight 0."""
    names = list(dict.fromkeys(by_source["source"]))
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise DataError(f"the weights name {unknown}, which the statistics have no tokens of (their sources: "
                        f"{', '.join(names)}); the statistics come from another calibration: rebuild them")
    keys = ["layer", "expert"]
    tables = {name: by_source[by_source["source"] == name].drop(columns="source").set_index(keys).sort_index()
              for name in names}
    first = tables[names[0]]
    total_tokens = sum(table["tokens"] for table in tables.values())
    rank_columns = [column for column in first.columns if column.startswith("selected_rank_")]
    result = first[["tokens", "top_k"]].copy()
    result["tokens"] = total_tokens
    additive = [column for column in ADDITIVE_COLUMNS if column in first.columns]
    mixed = {column: 0.0 for column in [*rank_columns, *additive, "mean_router_prob"]}
    peaks = [table[PEAK_COLUMN] for name, table in tables.items()
             if PEAK_COLUMN in first.columns and weights.get(name, 0.0) > 0]
    saliency_numerator = {column: 0.0 for column in SALIENCY_COLUMNS if column in first.columns}
    routed = 0.0
    for name, table in tables.items():
        weight = float(weights.get(name, 0.0))
        for column in [*rank_columns, *additive]:
            mixed[column] = mixed[column] + weight * table[column] / table["tokens"]
        mixed["mean_router_prob"] = mixed["mean_router_prob"] + weight * table["mean_router_prob"]
        frequency = table["selected"] / table["tokens"]
        routed = routed + weight * frequency
        for column in saliency_numerator:
            saliency_numerator[column] = saliency_numerator[column] + weight * frequency * table[column]
    for column in [*rank_columns, *additive]:
        result[column] = mixed[column] * total_tokens
    result["frequency"] = mixed["selected"]
    result["mean_weight_when_selected"] = (result["routing_mass"] / result["selected"]).where(result["selected"] > 0, 0.0)
    result["mean_router_prob"] = mixed["mean_router_prob"]
    for column, numerator in saliency_numerator.items():
        result[column] = (numerator / routed).where(routed > 0, 0.0)
    if peaks:
        result[PEAK_COLUMN] = pd.concat(peaks, axis=1).max(axis=1)
    order = [column for column in first.columns if column in result.columns]
    return result[order].reset_index()


def statistics_for(totals_path, by_source_path, weights: Mapping[str, float] | None, easy_ep_path=None,
                   easy_ep_by_source_path=None) -> pd.DataFrame:
    """The statistics table a variant's steps read: the totals, or with calibration ``weights`` the
    per-source table re-weighted to them; with ``easy_ep_path`` (and, for weights, ``easy_ep_by_source_path``:
    ``easy_ep_tables``' files) the ``easy_ep_saliency`` column beside the others."""
    if weights is None:
        return _with_columns(pd.read_parquet(totals_path), easy_ep_path, ["layer", "expert"])
    if by_source_path is None or (easy_ep_path is not None and easy_ep_by_source_path is None):
        raise DataError("calibration weights need the per-source statistics (results/stats/"
                        "expert_frequency_by_source.parquet, and easy_ep_by_source.parquet for EASY-EP), which this "
                        "job was not given")
    by_source = _with_columns(pd.read_parquet(by_source_path), easy_ep_by_source_path, ["source", "layer", "expert"])
    return reweighted_statistics(by_source, weights)


def _with_columns(table: pd.DataFrame, path, keys: list[str]) -> pd.DataFrame:
    """``table`` with the columns of the table at ``path`` (None: as it is), row for row on ``keys``."""
    if path is None:
        return table
    merged = table.merge(pd.read_parquet(path), on=keys, how="left", validate="one_to_one")
    if merged.isna().any().any():
        raise DataError(f"{path} has no rows for some experts of the statistics table: they come from different "
                        "calibration caches; rerun the workflow to rebuild them")
    return merged


def easy_ep_tables(model_or_layers, moe_inputs: Mapping[int, torch.Tensor], residuals: Mapping[int, torch.Tensor],
                   source_names: list[str], token_source: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(layer, expert, easy_ep_saliency) and the same per source: EASY-EP's column on its own, from the cached
    MoE-block inputs and the residual streams of ``build_residual_cache`` (what the workflow's easy_ep_stats job
    writes, so that a variant asking for EASY-EP leaves the statistics every other variant reads as they are)."""
    statistics = expert_statistics(model_or_layers, moe_inputs, source_names, token_source, residuals)
    return (statistics.totals[["layer", "expert", EASY_EP_COLUMN]],
            statistics.by_source[["source", "layer", "expert", EASY_EP_COLUMN]])


# an expert is specific to a source when that source selects it at least this many times as often (per token)
# as any other source does, and at least as often as a uniform router would
DOMAIN_RATIO = 4.0


def domain_experts(by_source: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, expert): its selection frequency in each source (``frequency_<source>``), the source
    that selects it most (``source``), that source's share of the expert's summed per-token frequency
    (``specificity``: 1/sources when every source uses it alike, 1 when one alone does), and ``domain_specific``:
    that source selects it at least ``DOMAIN_RATIO`` times as often as any other, and at least at the uniform
    rate top-k / experts. Sorted by specificity, highest first."""
    names = list(dict.fromkeys(by_source["source"]))
    frequency = by_source.pivot_table(index=["layer", "expert"], columns="source", values="frequency")[names]
    values = frequency.to_numpy(dtype=float)
    dominant = values.argmax(axis=1)
    top = values[np.arange(len(values)), dominant]
    others = np.where(np.eye(len(names), dtype=bool)[dominant], -np.inf, values).max(axis=1) if len(names) > 1 \
        else np.zeros(len(values))
    total = values.sum(axis=1)
    # a uniform router's rate: the layer's top-k over its experts (every source has the same rows)
    rows = by_source[by_source["source"] == names[0]].set_index(["layer", "expert"])["top_k"]
    uniform = (rows / rows.groupby(level="layer").transform("size")).reindex(frequency.index).to_numpy(dtype=float)
    table = pd.DataFrame({
        "source": np.array(names)[dominant],
        **{f"frequency_{name}": values[:, index] for index, name in enumerate(names)},
        "specificity": np.divide(top, total, out=np.zeros_like(top), where=total > 0),
        "domain_specific": (len(names) > 1) & (top >= uniform) & (top >= DOMAIN_RATIO * others),
    }, index=frequency.index).reset_index()
    return table.sort_values(["specificity", "layer", "expert"], ascending=[False, True, True], ignore_index=True)


def with_saliency(frequency: pd.DataFrame, saliency: pd.DataFrame) -> pd.DataFrame:
    """The frequency table with the saliency column beside it (same rows, same order)."""
    table = frequency.merge(saliency, on=["layer", "expert"], how="left", validate="one_to_one")
    if table["reap_saliency"].isna().any():
        missing = table.loc[table["reap_saliency"].isna(), "layer"].unique().tolist()
        raise DataError(f"no cached MoE-block inputs for layers {missing}; rebuild results/cache")
    return table
