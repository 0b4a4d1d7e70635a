"""Expert merging (HC-SMoE / Sub-MoE family): cluster the experts of each layer, then replace each
cluster by one expert, so the expert count, and with it the parameter count, really goes down.

1. What each expert is, as a point to cluster (``centroid``), from the cached MoE-block inputs:
   - ``routed_sum`` (the recipe's): h_i = sum over calibration tokens routed to i of G_i(x) * E_i(x),
     G the top-k weight renormalised over the token's k choices; each expert runs only on its tokens,
     the work of one forward pass. A sum grows with how often the expert is chosen, so rarely used
     experts sit near the origin together;
   - ``mean_output`` (HC-SMoE, ``group_experts_by_clustering_output``): E_i(x) averaged over all
     calibration tokens, unweighted: every expert runs on every token (the work of E / k passes);
   - ``router_logits`` (HC-SMoE's router-logit similarity): expert i's router logits over the tokens.
2. Grouping: agglomerative clustering with average linkage (cluster distance = mean pairwise L2 of the
   members' centroids), merging the closest pair ``merges_per_layer`` times under ``max_cluster_size``;
   or k-means on the centroids (Sub-MoE).
3. Merge rule per cluster, with coefficients c_j proportional to how often member j is selected:
   ``frequency`` (W = sum c_j W_j), ``svd`` (one SVD of the members' concatenated matrices, keep the
   shared left basis and singular values at rank r, merge the right factors with c), or ``learned``
   (c fitted with Adam so the merged block reproduces the original block's output on calibration
   tokens; early-stopped on held-out tokens and never kept if worse than the frequency initialisation).
4. Router row of the merged expert: ``frequency`` (c-weighted mean of the members' rows) or
   ``dominant`` (the most-selected member's row).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ConfigError, ModelError
from moe_compress.methods.allocation import allocate, expert_budget
from moe_compress.methods.common import expert_tensors, kept_rank, target_options, target_whole_model
from moe_compress.methods.protection import protected_experts
from moe_compress.methods.registry import EXPERT_COUNT, Method, Problem, exactly_one_of, reads_statistics_to_protect
from moe_compress.moe_block import block_output, block_output_with, relative_error, route, run_expert, selection_counts

log = logging.getLogger(__name__)


# --- measurements ------------------------------------------------------------------------------


def expert_centroids(adapter, block, hidden: torch.Tensor, centroid: str = "routed_sum") -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [experts, features], selection counts [experts]) on ``hidden``; ``centroid`` (one of the
    schema's values) as in the module's docstring."""
    logits, weights, indices = adapter.call_router(block, hidden)
    num_experts = adapter.block_num_experts(block)
    counts = selection_counts(indices, num_experts)
    if centroid == "router_logits":
        return logits.float().T.contiguous(), counts
    centroids = torch.zeros(num_experts, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    if centroid == "mean_output":
        for expert in range(num_experts):  # a loop over experts; all tokens are one batch
            centroids[expert] = run_expert(adapter, block, hidden, expert).float().mean(dim=0)
        return centroids, counts
    gates = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # normalised top-k weight G
    for expert in range(num_experts):  # a loop over experts; tokens are handled as one batch each
        token_idx, rank = torch.where(indices == expert)
        if len(token_idx):
            outputs = run_expert(adapter, block, hidden[token_idx], expert).float()
            centroids[expert] = (gates[token_idx, rank, None].float() * outputs).sum(dim=0)
    return centroids, counts






# --- grouping ----------------------------------------------------------------------------------


def clustering_points(points: torch.Tensor) -> torch.Tensor:
    """The centroids as the clustering reads them: on the CPU, in float64. Grouping is a small [experts,
    experts] problem with a discrete answer; solving it in one place and precision keeps the groups the
    same whatever device computed the centroids (and the seeded k-means generator is a CPU one)."""
    return points.detach().to("cpu", torch.float64)


def average_linkage_clusters(points: torch.Tensor, merges: int, max_cluster_size: int | None) -> list[list[int]]:
    """Agglomerative clustering with average linkage: ``merges`` times, join the closest pair of
    clusters whose combined size stays within ``max_cluster_size``. Returns clusters sorted by first member."""
    points = clustering_points(points)
    count = len(points)
    distance = torch.cdist(points, points)
    distance.fill_diagonal_(float("inf"))
    sizes = torch.ones(count, dtype=torch.long, device=points.device)
    active = torch.ones(count, dtype=torch.bool, device=points.device)
    members = [[index] for index in range(count)]
    limit = max_cluster_size or count
    for _ in range(merges):
        allowed = active[:, None] & active[None, :] & (sizes[:, None] + sizes[None, :] <= limit)
        masked = torch.where(allowed, distance, torch.full_like(distance, float("inf")))
        flat = int(torch.argmin(masked))
        a, b = divmod(flat, count)
        if not torch.isfinite(masked[a, b]):
            raise ConfigError(f"cannot merge {merges} experts with max_cluster_size={max_cluster_size}")
        # Lance-Williams update for average linkage: d(A+B, C) = (|A| d(A,C) + |B| d(B,C)) / (|A| + |B|)
        merged_row = (sizes[a] * distance[a] + sizes[b] * distance[b]) / (sizes[a] + sizes[b])
        distance[a], distance[:, a] = merged_row, merged_row
        distance[a, a] = float("inf")
        distance[b], distance[:, b] = float("inf"), float("inf")
        sizes[a] += sizes[b]
        active[b] = False
        members[a] = sorted(members[a] + members[b])
    return sorted((members[index] for index in range(count) if active[index]), key=lambda cluster: cluster[0])


def kmeans_clusters(points: torch.Tensor, num_clusters: int, seed: int, iterations: int = 100) -> list[list[int]]:
    """k-means (k-means++ initialisation, seeded) on the centroids; empty clusters are not produced:
    each is re-seeded with the point farthest from its centre."""
    generator = torch.Generator().manual_seed(seed)
    points = clustering_points(points)
    centres = points[torch.randint(len(points), (1,), generator=generator, device=points.device)]
    while len(centres) < num_clusters:
        nearest = torch.cdist(points, centres).min(dim=1).values ** 2
        probabilities = nearest / nearest.sum() if nearest.sum() > 0 else torch.ones_like(nearest) / len(nearest)
        centres = torch.cat([centres, points[torch.multinomial(probabilities, 1, generator=generator)]])
    assignment = torch.cdist(points, centres).argmin(dim=1)
    for _ in range(iterations):
        distances = torch.cdist(points, centres)
        assignment = distances.argmin(dim=1)
        for cluster in range(num_clusters):  # a loop over clusters, not tokens
            if not (assignment == cluster).any():
                farthest = int(distances.min(dim=1).values.argmax())
                assignment[farthest] = cluster
        new_centres = torch.stack([points[assignment == cluster].mean(dim=0) for cluster in range(num_clusters)])
        if torch.equal(new_centres, centres):
            break
        centres = new_centres
    clusters = [sorted(torch.where(assignment == cluster)[0].tolist()) for cluster in range(num_clusters)]
    return sorted(clusters, key=lambda cluster: cluster[0])


# --- merge rules -------------------------------------------------------------------------------


def frequency_coefficients(cluster: list[int], counts: torch.Tensor) -> torch.Tensor:
    weights = counts[cluster].double()
    if weights.sum() == 0:  # no member was selected on the calibration tokens: plain average
        weights = torch.ones(len(cluster), dtype=torch.float64, device=counts.device)
    return weights / weights.sum()


def svd_merge(matrices: torch.Tensor, coefficients: torch.Tensor, rank: int | None, energy: float) -> torch.Tensor:
    """Merge [members, m, n] matrices: one SVD of [W_1 | ... | W_k] (m x nk) = U S [V_1^T | ... | V_k^T];
    keep U and S at rank r, combine the right factors: U_r S_r (sum_j c_j V_j,r^T). At full rank this
    equals the coefficient-weighted average; truncation keeps the members' shared subspace."""
    members, rows, cols = matrices.shape
    stacked = matrices.double().permute(1, 0, 2).reshape(rows, members * cols)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    rank = kept_rank(s, rank, energy)
    right = vh[:rank].reshape(rank, members, cols)  # V_j^T blocks
    merged_right = torch.einsum("j,rjc->rc", coefficients.double(), right)
    return (u[:, :rank] * s[:rank]) @ merged_right


def merge_tensors(tensors: torch.Tensor, coefficients: torch.Tensor, rule: str, step: dict) -> torch.Tensor:
    """Merge the cluster's slices [members, ...] of one per-expert tensor."""
    if rule == "svd" and tensors.ndim == 3:
        merged = svd_merge(tensors, coefficients, step.get("svd_rank"), step["svd_energy"])
    else:  # frequency and learned start from the weighted average; biases (1-D per expert) always do
        merged = torch.einsum("j,j...->...", coefficients.double(), tensors.double())
    return merged.to(tensors.dtype)


# --- the method --------------------------------------------------------------------------------


def build_merged_tensors(adapter, block, clusters, coefficients, router_coefficients, rule, step) -> dict:
    """New per-expert tensors (dim 0 = cluster): the experts' merged by ``rule``, the router's and the
    block's (choice biases) averaged with the router coefficients."""
    new = {}
    for (owner, name), tensor in adapter.per_expert_tensors(block).items():
        if owner == "experts":
            new[(owner, name)] = torch.stack(
                [merge_tensors(tensor[cluster], coefficients[i], rule, step) for i, cluster in enumerate(clusters)])
        else:
            new[(owner, name)] = torch.stack(
                [torch.einsum("j,j...->...", router_coefficients[i].double(), tensor[cluster].double()).to(tensor.dtype)
                 for i, cluster in enumerate(clusters)])
    return new


def learn_coefficients(adapter, block, clusters, init_coefficients, init_router_coefficients, step, fit, heldout,
                       target_fit, target_heldout) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Fit each multi-member cluster's coefficients with Adam so the merged block reproduces the original
    block's output: the expert coefficients (softmax of free logits, a convex combination) and the
    router-row coefficients (free, so the merged row keeps the members' logit scale: an average of
    dissimilar rows is shorter than any of them, and the merged expert would lose its tokens). Keep the
    best held-out state; keep the initialisation when nothing beats it on held-out tokens."""
    originals = adapter.per_expert_tensors(block)  # expert dimension first
    expert_logits = [torch.log(c.clamp_min(1e-8)).float().requires_grad_(len(c) > 1) for c in init_coefficients]
    router_weights = [c.float().requires_grad_(len(c) > 1) for c in init_router_coefficients]
    trainable = [t for t in expert_logits + router_weights if t.requires_grad]

    def merged_parameters():
        parameters = {}
        for (owner, name), tensor in originals.items():
            per_cluster = [torch.softmax(logit, 0) for logit in expert_logits] if owner == "experts" else router_weights
            merged = torch.stack([torch.einsum("j,j...->...", c.to(tensor.dtype), tensor[cluster])
                                  for c, cluster in zip(per_cluster, clusters)])
            parameters[adapter.block_path(owner, name)] = adapter.stored_layout(owner, name, merged)
        return parameters

    def heldout_error():
        with torch.no_grad():
            return relative_error(target_heldout, block_output_with(block, heldout, merged_parameters()))

    def snapshot():
        return ([torch.softmax(logit.detach(), 0).double() for logit in expert_logits],
                [weights.detach().double().clone() for weights in router_weights])

    # the block must have the merged shape (and routing settings) for functional_call to run it
    with torch.no_grad():
        adapter.install_expert_tensors(block, build_merged_tensors(adapter, block, clusters, init_coefficients,
                                                                   init_router_coefficients, "frequency", step),
                                       members=clusters)
    init_error = heldout_error()
    best_error, best, iteration = init_error, snapshot(), 0
    if trainable:
        optimizer = torch.optim.Adam(trainable, lr=step["learn_lr"])
        generator = torch.Generator().manual_seed(step["seed"])
        batch = min(len(fit), step["learn_batch_tokens"])
        scale = target_fit.pow(2).sum(dim=-1).mean().clamp_min(1e-20)  # relative loss: lr independent of scale
        steps_since_best = 0
        for iteration in range(1, step["learn_steps"] + 1):
            # a CPU generator: the same batches on every device
            rows = torch.randperm(len(fit), generator=generator, device="cpu")[:batch].to(fit.device)
            loss = (block_output_with(block, fit[rows], merged_parameters()) - target_fit[rows]).pow(2).sum(-1).mean()
            optimizer.zero_grad()
            (loss / scale).backward()
            optimizer.step()
            if iteration % 10 == 0:
                error = heldout_error()
                if error < best_error:
                    best_error, best, steps_since_best = error, snapshot(), 0
                else:
                    steps_since_best += 10
                    if steps_since_best >= step["learn_patience"]:
                        break
    coefficients, router_coefficients = best
    return coefficients, router_coefficients, {"heldout_error_init": init_error, "heldout_error_learned": best_error,
                                               "learn_steps_run": iteration}




def clusters_sparing(centroids: torch.Tensor, merges: int, step: dict, protected: np.ndarray | None,
                     layer: int) -> list[list[int]]:
    """The step's grouping of the experts into ``len(centroids) - merges`` clusters, the ``protected`` experts
    (a bool per expert) each left a cluster of its own: only the others are grouped, with the same merges."""
    spared = np.zeros(len(centroids), dtype=bool) if protected is None else protected
    others = np.flatnonzero(~spared)
    if merges >= len(others):
        raise ModelError(f"layer {layer}: {merges} merges need {merges + 1} experts that are not protected; "
                         f"{int(spared.sum())} of the {len(centroids)} are protected")
    points = centroids[torch.from_numpy(others)]
    if step["grouping"] == "kmeans":
        grouped = kmeans_clusters(points, len(others) - merges, step["seed"])
    else:
        grouped = average_linkage_clusters(points, merges, step.get("max_cluster_size"))
    clusters = [[int(others[member]) for member in cluster] for cluster in grouped]
    clusters += [[int(expert)] for expert in np.flatnonzero(spared)]
    return sorted(clusters, key=lambda cluster: cluster[0])


def merge_layer(adapter, block, clusters: list[list[int]], counts: torch.Tensor, step: dict, fit: torch.Tensor,
                heldout: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Replace ``block``'s experts by one merged expert per cluster (in cluster order); return the
    coefficients used and what the merge rule measured."""
    coefficients = [frequency_coefficients(cluster, counts) for cluster in clusters]
    if step["router_row"] == "dominant":
        router_coefficients = [torch.nn.functional.one_hot(counts[cluster].argmax(), len(cluster)).double()
                               for cluster in clusters]
    else:
        router_coefficients = coefficients
    measured = {}
    settings = adapter.router_settings(block)
    if step["merge"] == "learned":
        with torch.no_grad():
            target_fit, target_heldout = block_output(block, fit), block_output(block, heldout)
        original = adapter.per_expert_tensors(block)
        coefficients, router_coefficients, measured = learn_coefficients(
            adapter, block, clusters, coefficients, router_coefficients, step, fit, heldout, target_fit, target_heldout)
        adapter.install_expert_tensors(block, original)  # back to the unmerged block before the final merge
        adapter.set_router_settings(block, settings)
        measured["router_coefficients"] = [[round(float(c), 6) for c in cs] for cs in router_coefficients]
    with torch.no_grad():
        adaptations = adapter.install_expert_tensors(
            block, build_merged_tensors(adapter, block, clusters, coefficients, router_coefficients, step["merge"], step),
            members=clusters)
    if adaptations:
        log.warning("%s", adaptations)
        measured["adaptations"] = adaptations
    return coefficients, measured


def merges_for_target(model, step: dict, context, protected: dict[int, np.ndarray]) -> tuple[dict[int, int], dict]:
    """Merges per layer that meet the step's whole-model ``target``: the experts each layer keeps are
    allocated on their selection counts over the fit tokens (global allocation compares layers by them); a layer
    keeps at least its ``protected`` experts and one more cluster for the rest."""
    adapter = adapter_for(model.config)
    counts = {}
    with torch.no_grad():
        for layer, block in context.moe_blocks(model).items():
            _, indices = route(adapter, block, context.split_inputs(layer)[0])
            counts[layer] = selection_counts(indices, adapter.block_num_experts(block)).cpu().numpy()
    budget = expert_budget(model, context)
    protected_floor = {layer: int(mask.sum()) + int(not mask.all()) for layer, mask in protected.items()}
    budget = replace(budget, floor={layer: max(floor, protected_floor.get(layer, 0))
                                    for layer, floor in budget.floor.items()})
    kept, allocation = allocate(step["target"], step.get("allocation", "uniform"), counts, budget)
    return {layer: budget.count[layer] - kept[layer] for layer in kept}, allocation


def hc_merge(model, step: dict, context) -> dict:
    context.require_inputs("hc_merge")
    adapter = adapter_for(model.config)
    report = {"clusters": {}, "layers": {}, "adaptations": {}}
    protected, protection = protected_experts(step, context)
    if protection is not None:
        report["protected"] = protection
    if "target" in step:
        merges_per_layer, allocation = merges_for_target(model, step, context, protected)
        report.update(allocation)
    else:
        merges_per_layer = {layer: step["merges_per_layer"] for layer in context.moe_blocks(model)}
    for layer, block in context.each_block(model):
        fit, heldout = context.split_inputs(layer)
        num_experts = adapter.block_num_experts(block)
        merges = merges_per_layer[layer]
        if merges == 0:
            continue
        with torch.no_grad():
            centroids, counts = expert_centroids(adapter, block, fit, step["centroid"])
        clusters = clusters_sparing(centroids, merges, step, protected.get(layer), layer)
        coefficients, measured = merge_layer(adapter, block, clusters, counts, step, fit, heldout)
        if "adaptations" in measured:
            report["adaptations"][str(layer)] = measured.pop("adaptations")
        original_ids = context.original_expert_ids[layer]
        report["clusters"][str(layer)] = [[int(original_ids[i]) for i in cluster] for cluster in clusters]
        report["layers"][str(layer)] = {"coefficients": [[round(float(c), 6) for c in cs] for cs in coefficients],
                                        **measured}
        # a merged expert stands for its members; later steps see its first member's original id
        first_members = [int(original_ids[cluster[0]]) for cluster in clusters]
        context.original_expert_ids[layer] = torch.tensor(first_members, device="cpu")
        log.info("layer %d: %d -> %d experts (%s merge)", layer, num_experts, len(clusters), step["merge"])
    return report


def _merge_options(step: dict) -> Problem | None:
    return exactly_one_of(step, "merges_per_layer", "target") or target_options(step)


def _merge_shape(step: dict, shape) -> Problem | None:
    if "merges_per_layer" not in step:
        return None
    left = shape.num_experts - step["merges_per_layer"]
    if left < shape.top_k:  # the largest top-k where layers differ: every layer keeps its own
        where = "" if not shape.top_k_per_layer else " in the layers with the largest top-k"
        return Problem("merges_per_layer", f"{step['merges_per_layer']} leaves {left} of the {shape.num_experts} "
                                           f"experts, fewer than the {shape.top_k} each token is routed to{where}")
    return None


def _inspect(adapter) -> str:
    return (f"merge clusters in {expert_tensors(adapter)}; stock when every layer keeps as many, "
            "else remote code")


METHODS = (Method("hc_merge", hc_merge, frozenset({EXPERT_COUNT}), check_options=_merge_options,
                  check_shape=_merge_shape, whole_model=target_whole_model, inspect=_inspect,
                  reads_statistics=reads_statistics_to_protect),)
