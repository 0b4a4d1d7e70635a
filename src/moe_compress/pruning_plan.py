"""The pruning plan a checkpoint carries when its variant removed experts (``pruning_plan.json``).

Per MoE layer it names the experts of the source model that the checkpoint keeps (their ids in the
source model, highest score first), the scores that ranked them and what each pruning step asked for,
so the same pruning can be applied to the original weights by any tool, without this package: keep, in
every MoE layer, the experts ``sorted(kept)`` and the same rows of the router (and of every other
per-expert tensor), in that order, which is how the checkpoint stores them.

The file is at the same time a vLLM RIY expert profile (vLLM PR #37824, ``--riy-expert-profile``):
``version: 1`` and ``pruned_experts`` ([layer, expert] pairs of the source model). RIY's version 1 masks
the pruned experts' router logits before the top-k, which is what removing their router rows does. The
reader ignores the other fields.

Built from the step reports alone (``record["step_reports"]``), so the whole-model job and the per-layer
jobs, whose reports are merged into the same record, write the same file.
"""

from __future__ import annotations

PLAN_FILE = "pruning_plan.json"
PLAN_FORMAT = "moe-compress-pruning-plan/1"
RIY_PROFILE_VERSION = 1

# the options of a pruning step that decide how many experts each layer keeps
COUNT_OPTIONS = ("keep", "min_count", "min_fraction", "uniform", "top_k", "target", "allocation")


def is_pruning(report: dict) -> bool:
    """A step that kept a subset of each layer's experts, ranked by a score (methods/pruning.py)."""
    return "ranking" in report and "kept_per_layer" in report


def merged_experts(report: dict) -> bool:
    """A step that replaced experts by combinations of them (hc_merge, where a layer merged any)."""
    return bool(report.get("clusters"))


def pruning_plan(record: dict) -> tuple[dict | None, str | None]:
    """(the plan, None) for a variant with pruning steps; (None, why) where it pruned but no list of
    source experts describes the checkpoint; (None, None) where no step pruned."""
    reports = record.get("step_reports") or []
    if not any(is_pruning(report) for report in reports):
        return None, None
    merging = [report for report in reports if merged_experts(report)]
    if merging:
        first = merging[0]
        return None, (f"step {first['step']} ({first['method']}) merged experts: a merged expert is a new tensor, "
                      "not an expert of the source model, so no list of source experts gives this checkpoint "
                      "(its members are in merge_clusters.csv)")
    source_layer: dict[int, int] = {}  # current decoder-layer index -> the source model's (drop_layers renumbers)
    layers: dict[int, dict] = {}
    steps, other_steps, dropped = [], [], []
    for report in reports:
        if "layer_mapping" in report:
            mapping = {int(old): new for old, new in report["layer_mapping"].items()}
            dropped += [source_layer.get(old, old) for old in report["dropped_layers"]]
            source_layer = {new: source_layer.get(old, old) for old, new in mapping.items()}
        if not is_pruning(report):
            other_steps.append({"step": report["step"], "method": report["method"]})
            continue
        steps.append({"step": report["step"], "method": report["method"], "score": report["score"],
                      "asked": {key: report[key] for key in COUNT_OPTIONS if report.get(key) is not None},
                      **({"achieved": report["achieved"]} if "achieved" in report else {})})
        floored = set(report["floored_to_top_k"])
        for layer, ranking in report["ranking"].items():
            count = report["kept_per_layer"][layer]
            # the first pruning of a layer ranks all its experts: nothing before it changes the count
            entry = layers.setdefault(source_layer.get(int(layer), int(layer)),
                                      {"num_experts": len(ranking["ids"]), "steps": []})
            entry["kept"] = ranking["ids"][:count]
            entry["steps"].append({"step": report["step"], "score": report["score"], "kept_count": count,
                                   "floored_to_top_k": int(layer) in floored,
                                   "ranked_ids": ranking["ids"], "scores": ranking["scores"],
                                   **({"adaptations": report["adaptations"][layer]}
                                      if layer in report.get("adaptations", {}) else {})})
    pruned = [[layer, expert] for layer, entry in sorted(layers.items())
              for expert in sorted(set(range(entry["num_experts"])) - set(entry["kept"]))]
    plan = {"format": PLAN_FORMAT, "version": RIY_PROFILE_VERSION, "pruned_experts": pruned,
            "reproduces_checkpoint": not other_steps, "other_steps": other_steps, "dropped_layers": sorted(dropped),
            "steps": steps, "moe_layers": {str(layer): entry for layer, entry in sorted(layers.items())}}
    if record.get("source_model"):
        plan["model"] = str(record["source_model"])
    return plan, None
