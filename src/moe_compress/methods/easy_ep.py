"""``easy_ep_prune``: EASY-EP (arXiv 2504.06792, its code RUCAIBox/EASYEP). Per MoE layer, an expert's
score is the sum over the calibration tokens routed to it of its routing weight x the norm of its output x how far
the routed experts together turn the token's residual stream, max(1 - cos(h, h + r), 0): an expert counts where it
is chosen, writes much, and the layer's routed output changes the stream's direction. The scores are the
``easy_ep_saliency`` column (stats.py), from the residual stream cached on the calibration tokens: the workflow's
cache_residual and easy_ep_stats jobs run only for the variants with this step (``reads_residual``)."""

from __future__ import annotations

from moe_compress.methods.common import (
    check_keep,
    column_scores,
    inspect_expert_selection,
    target_options,
    target_whole_model,
)
from moe_compress.methods.expert_selection import prune_by_scores
from moe_compress.methods.registry import EXPERT_COUNT, Method, Problem, exactly_one_of, reads_statistics
from moe_compress.stats import EASY_EP_COLUMN


def easy_ep_prune(model, step: dict, context) -> dict:
    """Keep the ``keep`` highest-scoring experts per layer, those holding at least ``min_fraction`` of the layer's
    total score, or the counts of a whole-model ``target``."""
    scores = column_scores(context, EASY_EP_COLUMN, "easy_ep_prune",
                           ", computed from the cached residual stream entering each MoE sublayer "
                           "(results/stats/easy_ep.parquet, written by the easy_ep_stats job for the variants with "
                           "an easy_ep_prune step; a job of this version of the workflow is given it)")
    return prune_by_scores(model, scores, step, context, EASY_EP_COLUMN)


def _easy_ep_options(step: dict) -> Problem | None:
    return exactly_one_of(step, "keep", "min_fraction", "target") or target_options(step)


def _inspect(adapter) -> str:
    return (f"rank experts by EASY-EP saliency (residual stream read at the layer's `{adapter.residual_input}`); "
            f"{inspect_expert_selection(adapter)}")


METHODS = (
    Method("easy_ep_prune", easy_ep_prune, frozenset({EXPERT_COUNT}), check_options=_easy_ep_options,
           check_shape=check_keep, whole_model=target_whole_model, reads_statistics=reads_statistics,
           reads_residual=True, inspect=_inspect),
)
