"""MoNE, Mixture of Novices and Experts (ICLR 2026, arXiv 2507.00390; the authors' code: zxgx/mode-pd,
``expert_prune_by_mone`` with its default ``--mone_ranking_metric fusion``).

Per MoE layer, on the calibration tokens (the cached MoE-block inputs, fit part):

- expert i's novice constant c_i: the mean of its unweighted output e_i(x_t) over the tokens routed to it, an
  unbiased estimator of that output; an expert no token reaches has no mean, and its constant is zero;
- its fluctuation: the per-dimension variance of e_i(x_t) over the same tokens. The reference code updates a
  running variance batch by batch (an approximation); this is the exact variance over the routed tokens (the
  population variance, divided by their number, so one routed token gives 0);
- its routing score: the mean over all tokens of the routing weight the block applies to it (0 where it is not
  in the token's top-k), i.e. its routing mass divided by the tokens;
- the fusion score: ||sqrt(variance)||_2 (the norm over hidden dimensions of the per-dimension standard
  deviation) times the routing score.

The experts with the lowest scores are not removed: each becomes a novice, its constant in place of its
weights. The router keeps every row and weight; a token routed to a novice gets weight x constant, with no
expert compute (moe_compress_layers.NoviceExpertsMixin). Which experts stay real: ``keep`` per layer,
``min_fraction`` of the layer's total score, or a whole-model ``target`` (``choose_kept``, which also applies
``protect``).
"""

from __future__ import annotations

import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.common import check_keep, expert_tensors, target_options, target_whole_model
from moe_compress.methods.expert_selection import choose_kept, score_counts
from moe_compress.methods.registry import EXPERT_NOVICES, Method, Problem, exactly_one_of, reads_statistics_to_protect
from moe_compress.moe_block import route, run_expert
from moe_compress.remote_code.moe_compress_layers import convert_to_novices, stored_form_of

# the score's name in the report: ||per-dimension std of the expert's output|| x its mean routing weight
FUSION_SCORE = "mone_fusion"


@torch.no_grad()
def novice_statistics(adapter, block, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per expert of ``block`` on the tokens ``hidden`` [tokens, hidden] (float64, on the block's device):
    ``mean`` [E, hidden] (its output averaged over the tokens routed to it; zero where none is),
    ``std_norm`` [E] (||sqrt(per-dimension variance)||, exact over those tokens), ``routing_score`` [E] (the
    applied routing weight averaged over all tokens), ``tokens`` [E] (how many tokens are routed to it) and
    ``score`` [E] = std_norm x routing_score."""
    num_experts = adapter.block_num_experts(block)
    weights, indices = route(adapter, block, hidden)
    routed = indices < num_experts  # a skipped slot (dynamic skipping) routes the token nowhere
    flat_experts = indices[routed]
    routing_mass = torch.zeros(num_experts, dtype=torch.float64, device=hidden.device)
    routing_mass.index_add_(0, flat_experts, weights[routed].double())
    tokens = torch.bincount(flat_experts, minlength=num_experts)
    mean = torch.zeros(num_experts, hidden.shape[1], dtype=torch.float64, device=hidden.device)
    std_norm = torch.zeros(num_experts, dtype=torch.float64, device=hidden.device)
    for expert in range(num_experts):  # a loop over experts; each expert's tokens are one batch
        token_idx = torch.where((indices == expert).any(dim=-1))[0]
        if len(token_idx) == 0:
            continue
        outputs = run_expert(adapter, block, hidden[token_idx], expert).double()
        mean[expert] = outputs.mean(dim=0)
        std_norm[expert] = outputs.var(dim=0, correction=0).sqrt().norm()
    routing_score = routing_mass / max(hidden.shape[0], 1)
    return {"mean": mean, "std_norm": std_norm, "routing_score": routing_score, "tokens": tokens,
            "score": std_norm * routing_score}


def mone_prune(model, step: dict, context) -> dict:
    """Turn, per MoE layer, all but the kept experts into novices (their mean routed output as a constant)."""
    adapter = adapter_for(model.config)
    context.require_inputs("mone_prune")
    statistics, scores = {}, {}
    for layer, block in context.each_block(model):
        if stored_form_of(adapter.experts_of(block)) is not None:
            raise ModelError(f"mone_prune: the experts of layer {layer} are already "
                             f"{stored_form_of(adapter.experts_of(block)).what}; MoNE needs dense experts")
        statistics[layer] = novice_statistics(adapter, block, context.split_inputs(layer)[0])
        scores[layer] = statistics[layer]["score"].cpu().numpy()
    keep_per_layer, chosen = choose_kept(model, scores, step, context, FUSION_SCORE, score_counts(step, scores))
    # the checkpoint keeps every expert id (novices answer for the others), so no pruning plan is written for it:
    # the count of real experts goes under its own name, not choose_kept's ``kept_per_layer``
    real_experts = chosen.pop("kept_per_layer")
    report = {**chosen, "real_experts_per_layer": real_experts, "novices": {}}
    for layer, block in context.each_block(model, only=keep_per_layer):
        experts = adapter.experts_of(block)
        kept = sorted(int(slot) for slot in keep_per_layer[layer])
        novices = [slot for slot in range(adapter.block_num_experts(block)) if slot not in set(kept)]
        layer_statistics = statistics[layer]
        constants = layer_statistics["mean"][novices]
        report["novices"][str(layer)] = {
            "ids": context.original_expert_ids[layer][novices].tolist(),
            "constant_norms": constants.norm(dim=-1).tolist(),
            "tokens": layer_statistics["tokens"][novices].tolist(),
            "scores": layer_statistics["score"][novices].tolist(),
        }
        if not novices:  # every expert stays real: the layer is left as it is
            continue
        dense = getattr(experts, adapter.expert_matrices[1])
        convert_to_novices(experts, kept, constants.to(device=dense.device, dtype=dense.dtype).contiguous(),
                           {name: adapter.expert_dim("experts", name) for name in adapter.expert_tensors},
                           adapter.expert_count_attrs)
    return report


def _mone_options(step: dict) -> Problem | None:
    return exactly_one_of(step, "keep", "min_fraction", "target") or target_options(step)


def _mone_inspect(adapter) -> str:
    return (f"the lowest-scoring experts' rows of {expert_tensors(adapter)} (beside the router's) are replaced by one "
            "constant each, their mean output on the calibration tokens routed to them; the router keeps every row; "
            "remote code")


METHODS = (
    Method("mone_prune", mone_prune, frozenset({EXPERT_NOVICES}), check_options=_mone_options, check_shape=check_keep,
           whole_model=target_whole_model, inspect=_mone_inspect, reads_statistics=reads_statistics_to_protect),
)
