"""``random_prune``: keep ``keep`` experts per layer chosen uniformly at random, the control that
expert-pruning criteria are compared against. Each layer draws from its own generator, seeded by
(``seed``, layer index), so a per-layer job keeps the experts a whole-model job keeps."""

from __future__ import annotations

import numpy as np

from moe_compress.methods.common import check_keep, inspect_expert_selection, target_options, target_whole_model
from moe_compress.methods.expert_selection import prune_to_highest, prune_to_target
from moe_compress.methods.registry import EXPERT_COUNT, Method, Problem, exactly_one_of, reads_statistics_to_protect

RANDOM_SCORE = "random"  # the score's name in the pruning plan


def random_scores(seed: int, layer: int, num_experts: int) -> np.ndarray:
    """One uniform random score per expert slot: the ``keep`` highest are a uniform random subset."""
    return np.random.default_rng([seed, layer]).random(num_experts)


def random_prune(model, step: dict, context) -> dict:
    scores = {layer: random_scores(step["seed"], layer, len(original_ids))
              for layer, original_ids in context.original_expert_ids.items()}
    if "target" in step:
        return prune_to_target(model, scores, step, context, RANDOM_SCORE)
    return prune_to_highest(model, scores, dict.fromkeys(scores, step["keep"]), context, RANDOM_SCORE, step)


def _random_options(step: dict) -> Problem | None:
    return exactly_one_of(step, "keep", "target") or target_options(step)


METHODS = (Method("random_prune", random_prune, frozenset({EXPERT_COUNT}), check_options=_random_options,
                  check_shape=check_keep, whole_model=target_whole_model, inspect=inspect_expert_selection,
                  reads_statistics=reads_statistics_to_protect),)
