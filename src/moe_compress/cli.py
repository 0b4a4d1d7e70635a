"""``moe-compress``: the supported architectures, what the pipeline would do with a local checkpoint, and
the configuration reference.

    moe-compress architectures [--markdown]   the adapter table (docs/architectures.md's table is this output)
    moe-compress inspect PATH [--json]        model type, MoE layers, experts, top-k, scoring, and what
                                              each step would do; needs only config.json (no weights)
    moe-compress analyze PATH... [--json]     the structure table: layers, heads, experts, widths, and
                                              parameters and bytes by module type, from the safetensors
                                              headers (the weights themselves are never read); what the
                                              workflow's analyze rule writes to results/analysis/
    moe-compress config-reference [--markdown]  every config key and method option, from the schema
                                              (docs/configuration.md's reference is the --markdown output)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from moe_compress.architectures import ARCHITECTURES, REFUSED, SCORING_RULES, MoEArchitecture, check_structure
from moe_compress.errors import MoeCompressError
from moe_compress.methods.registry import (
    ATTENTION_HEADS,
    DECODER_LAYERS,
    DTYPE,
    EXPERT_COUNT,
    EXPERT_FACTORS,
    EXPERT_SCALE,
    EXPERT_WIDTH,
    HIDDEN_SIZE,
    ROUTING,
    Method,
    any_decoder_methods,
    methods,
)

ARCHITECTURES_START, ARCHITECTURES_END = "<!-- architectures:start -->", "<!-- architectures:end -->"
ARCHITECTURES_PAGE = "docs/architectures.md"


def _routing_summary(adapter: MoEArchitecture) -> str:
    scoring = (" or ".join(f"`{rule}`" for _, rule in adapter.scoring_by_config[1]) if adapter.scoring_by_config
               else f"`{adapter.scoring}`")
    renormalize = {True: "renormalised", False: "not renormalised"}.get(adapter.renormalize,
                                                                        f"`{adapter.renormalize}`")
    extras = [renormalize]
    if adapter.choice_bias:
        extras.append("bias to choose")
    if adapter.group_attrs:
        extras.append("groups")
    if adapter.scaling:
        extras.append(f"`{adapter.scaling}`")
    return f"{scoring}; {', '.join(extras)}"


# the order `inspect` lists the steps in, by what they change: the experts (removed, factored, narrowed), the
# routing, then the steps any decoder takes
_LISTING_ORDER = (EXPERT_COUNT, EXPERT_FACTORS, EXPERT_WIDTH, ROUTING, EXPERT_SCALE, DECODER_LAYERS, DTYPE,
                  ATTENTION_HEADS, HIDDEN_SIZE)


def _listing_position(record: Method) -> int:
    return min((_LISTING_ORDER.index(edit) for edit in record.edits if edit in _LISTING_ORDER),
               default=len(_LISTING_ORDER))


def step_support(adapter: MoEArchitecture) -> dict[str, str]:
    """What each step does on this architecture (one line each, from each method's ``inspect``); steps with the
    same line share it, as "a / b"."""
    records = sorted(methods().values(), key=_listing_position)
    if not adapter.moe:
        records = [record for record in records if record.any_decoder]
    by_line: dict[str, list[str]] = {}
    for record in records:
        line = record.inspect(adapter) if record.inspect else "not described (its Method record has no inspect)"
        by_line.setdefault(line, []).append(record.name)
    support = {" / ".join(names): line for line, names in by_line.items()}
    if not adapter.moe:
        support["every other step"] = "refused: a dense decoder has no routed experts"
    return support


def architectures_table() -> str:
    """The table of docs/architectures.md, generated from the adapter table."""
    lines = ["| `model_type` | example models | what is special | routing | steps with limits |",
             "|---|---|---|---|---|"]
    for model_type in sorted(name for name, adapter in ARCHITECTURES.items() if adapter.moe):
        adapter = ARCHITECTURES[model_type]
        limits = []
        if adapter.fixed_top_k is not None:
            limits.append("`active_experts` refused")
        if adapter.renormalize is False:
            limits.append("`renormalize` only after `dynamic_skip`")
        lines.append(f"| `{model_type}` | {adapter.examples} | {adapter.notes} | {_routing_summary(adapter)} | "
                     f"{'; '.join(limits) or 'all'} |")
    dense = sorted(name for name, adapter in ARCHITECTURES.items() if not adapter.moe)
    any_decoder = ", ".join(f"`{name}`" for name in any_decoder_methods())
    lines += ["", f"Dense decoders, for the steps that apply to any decoder ({any_decoder}) and the whole evaluation; "
              "an MoE step is refused when the config is read:",
              "", "| `model_type` | example models |", "|---|---|"]
    lines += [f"| `{model_type}` | {ARCHITECTURES[model_type].examples} |" for model_type in dense]
    lines += ["", "Scoring rules: " + "; ".join(f"`{name}`: {text}" for name, text in SCORING_RULES.items()) + ".",
              "", "Refused, with the reason the check gives:", "",
              "| `model_type` | why |", "|---|---|"]
    lines += [f"| `{model_type}` | {reason} |" for model_type, reason in sorted(REFUSED.items())]
    return "\n".join(lines)


def describe_checkpoint(path: str | Path) -> dict:
    """What the pipeline sees in a local checkpoint, from its config alone (a meta-device skeleton holds
    the shapes; no weight is read)."""
    from moe_compress.modelio import check_model_dir, needs_remote_code, read_compression_record
    from moe_compress.streaming import build_skeleton

    path = check_model_dir(path)
    trust = needs_remote_code(path)
    skeleton = build_skeleton(path, "float32", trust_remote_code=trust)
    config = skeleton.config
    adapter = check_structure(skeleton)
    blocks = adapter.moe_blocks(skeleton)
    layers = adapter.decoder_layers(skeleton)
    layer_types = getattr(config, "layer_types", None)
    if not adapter.moe:
        return {"path": str(path), "model_type": config.model_type, "decoder_layers": len(layers), "moe_layers": [],
                "dense_layers": list(range(len(layers))),
                "layer_kinds": dict(Counter(layer_types)) if isinstance(layer_types, list) else None,
                "loader": "remote_code" if trust else "stock",
                "compressed_by_moe_compress": read_compression_record(path) is not None, "steps": step_support(adapter)}
    router = adapter.router_of(next(iter(blocks.values())))
    # per MoE layer, as the built routers and experts hold them (a config may state them per layer)
    top_k = {str(index): adapter.router_settings(block)["top_k"] for index, block in blocks.items()}
    shared = ({str(index): adapter.shared_experts(config, index) for index in blocks}
              if adapter.shared_experts(config, next(iter(blocks))) is not None else None)
    return {
        "path": str(path),
        "model_type": config.model_type,
        "decoder_layers": len(layers),
        "moe_layers": sorted(blocks),
        "dense_layers": [index for index in range(len(layers)) if index not in blocks],
        "layer_kinds": dict(Counter(layer_types)) if isinstance(layer_types, list) else None,
        "experts_per_layer": {str(index): adapter.block_num_experts(block) for index, block in blocks.items()},
        "top_k": next(iter(top_k.values())) if len(set(top_k.values())) == 1 else None,  # None: see per layer
        "top_k_per_layer": top_k,
        "expert_width_per_layer": {str(index): adapter.block_expert_width(block) for index, block in blocks.items()},
        "shared_experts_per_layer": shared,
        "scoring": adapter.scoring_for(config),
        "renormalize": (getattr(router, adapter.renormalize) if isinstance(adapter.renormalize, str)
                        else adapter.renormalize),
        "routed_scaling": getattr(router, adapter.scaling) if adapter.scaling else None,
        "expert_groups": getattr(router, adapter.group_attrs[0], None) if adapter.group_attrs else None,
        "shared_modules": list(adapter.shared_modules),
        "loader": "remote_code" if trust else "stock",
        "compressed_by_moe_compress": read_compression_record(path) is not None,
        "steps": step_support(adapter),
    }


def _print_description(facts: dict) -> None:
    for key, value in facts.items():
        if key != "steps":
            print(f"{key:28} {value}")
    print("steps:")
    for step, what in facts["steps"].items():
        print(f"  {step:28} {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-compress", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("architectures", help="list the supported and refused model types")
    listing.add_argument("--markdown", action="store_true", help=f"the table of {ARCHITECTURES_PAGE}")
    listing.add_argument("--write", metavar="PAGE",
                         help=f"put the table between the markers of PAGE ({ARCHITECTURES_PAGE})")
    inspect = commands.add_parser(
        "inspect", help="check a local checkpoint: needs only its config.json (no weights, no tokenizer)",
        description="What the pipeline sees in a local checkpoint and what each step would do on it. Reads only "
                    "config.json (a weightless skeleton holds the shapes): a folder with config.json alone is enough.")
    inspect.add_argument("path", help="a local model folder with config.json")
    inspect.add_argument("--json", action="store_true")
    analyze = commands.add_parser(
        "analyze", help="the structure table of local checkpoints: needs config.json and the safetensors files "
                        "(only their headers are read)",
        description="Layers, heads, experts, widths, and parameters and bytes by module type, from config.json and "
                    "the safetensors headers (tensor names, shapes, dtypes); the weights themselves are never "
                    "read. A folder without safetensors files is refused.")
    analyze.add_argument("paths", nargs="+", metavar="PATH",
                         help="local model folders with config.json and model.safetensors (or an index and its shards)")
    analyze.add_argument("--json", action="store_true", help="the analysis as JSON (else markdown)")
    analyze.add_argument("--trust-remote-code", action="store_true",
                         help="build checkpoints that carry their own modeling code (this pipeline's own are trusted)")
    reference = commands.add_parser("config-reference", help="every config key and method option, from the schema")
    reference.add_argument("--markdown", action="store_true", help="the reference of docs/configuration.md")
    reference.add_argument("--write", metavar="PAGE",
                           help="put the markdown reference between the markers of PAGE (docs/configuration.md)")
    args = parser.parse_args(argv)
    if (args.command == "architectures" and args.write) or args.command == "config-reference":
        return _reference(args)
    if args.command == "architectures":
        if args.markdown:
            print(architectures_table())
        else:
            for model_type in sorted(ARCHITECTURES):
                adapter = ARCHITECTURES[model_type]
                print(f"{model_type:18} {'' if adapter.moe else 'dense: '}{adapter.examples}")
            for model_type, reason in sorted(REFUSED.items()):
                print(f"{model_type:18} refused: {reason}")
        return 0
    if args.command == "analyze":
        return _analyze(args)
    try:
        facts = describe_checkpoint(args.path)
    except MoeCompressError as error:
        print(f"moe-compress inspect: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        _print_description(facts)
    return 0


def _reference(args) -> int:
    """The generated reference pages: print the configuration reference, or write either into its page."""
    from moe_compress import reference

    if args.command == "config-reference" and not args.write:
        print(reference.configuration_reference() if args.markdown else reference.configuration_keys())
        return 0
    start, end, block = ((ARCHITECTURES_START, ARCHITECTURES_END, architectures_table())
                         if args.command == "architectures" else
                         (reference.CONFIG_START, reference.CONFIG_END, reference.configuration_reference()))
    try:
        reference.write_block(args.write, start, end, block)
    except (MoeCompressError, OSError) as error:
        print(f"moe-compress {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


def _analyze(args) -> int:
    from moe_compress.analysis import analyze_models, to_markdown

    names = [Path(path).resolve().name or str(path) for path in args.paths]
    # the same folder name twice (two runs' checkpoints of one variant): the paths tell them apart
    variants = dict(zip([str(path) if names.count(name) > 1 else name for name, path in zip(names, args.paths)],
                        args.paths))
    try:
        analysis = analyze_models(variants, trust_remote_code=args.trust_remote_code, role="checkpoint")
    except MoeCompressError as error:
        print(f"moe-compress analyze: {error}", file=sys.stderr)
        return 2
    print(json.dumps(analysis, indent=2, sort_keys=True) if args.json else to_markdown(analysis).rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

