"""One record per compression method, read by the config check, the planner and the runner.

A method module declares ``METHODS``: a tuple of ``Method`` records. Every module of this package is
searched, so adding a method means adding its module (and its schema entry under
``$defs.methods`` of ``config.schema.json``, the one source of its option names, types and defaults).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Callable

from moe_compress.errors import ConfigError

if TYPE_CHECKING:
    from moe_compress.architectures import MoEArchitecture

# What a step may change. Steps that change the expert count or factor the experts need dense
# experts, so they cannot follow a step that factored them or replaced some by constants.
EXPERT_COUNT = "expert_count"  # experts removed or merged (with their router rows)
EXPERT_FACTORS = "expert_factors"  # expert matrices stored as low-rank factors
EXPERT_NOVICES = "expert_novices"  # experts replaced by constants (MoNE novices), router rows kept
EXPERT_SCALE = "expert_scale"  # expert output projections rescaled
ROUTING = "routing"  # router settings: top-k, renormalisation, skipping
DECODER_LAYERS = "decoder_layers"  # whole decoder layers removed
ATTENTION_HEADS = "attention_heads"  # query (and key-value) heads removed
HIDDEN_SIZE = "hidden_size"  # residual channels removed
EXPERT_WIDTH = "expert_width"  # intermediate neurons removed from every expert
DTYPE = "dtype"  # every weight cast
NEEDS_DENSE_EXPERTS = {EXPERT_COUNT, EXPERT_FACTORS, EXPERT_NOVICES, EXPERT_WIDTH, HIDDEN_SIZE}
# the edits after which a layer's experts are no longer all dense, and how a message names such a step
NOT_DENSE_AFTER = {EXPERT_FACTORS: "low-rank", EXPERT_NOVICES: "novice (MoNE)"}


@dataclass(frozen=True)
class ModelShape:
    """What a step is checked against: the model's shape when the workflow is parsed, and each MoE
    layer's current shape (after the variant's earlier steps) when the step runs."""

    num_experts: int
    top_k: int  # experts each token is routed to; where layers differ, the largest
    num_layers: int
    fixed_top_k: int | None = None  # the router's top-k cannot change (MoEArchitecture.fixed_top_k)
    # the decoder's widths (None where the check runs per MoE layer, which does not need them)
    model_type: str | None = None
    moe: bool = True  # False: a dense decoder, where only the any-decoder steps apply
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    expert_width: int | None = None  # intermediate neurons per expert (the narrowest layer's)
    # each decoder layer's top-k where the config states them per layer and they differ (empty: all top_k)
    top_k_per_layer: tuple[int, ...] = ()

    @property
    def fewest_routed(self) -> int:
        """The smallest top-k of any layer: what every layer routes each token to at least."""
        return min(self.top_k_per_layer or (self.top_k,))

    @property
    def mean_top_k(self) -> float:
        values = self.top_k_per_layer or (self.top_k,)
        return sum(values) / len(values)

    def describe_top_k(self) -> str:
        """"top-8", or where layers differ "top-k 2 to 4 by layer"."""
        if not self.top_k_per_layer:
            return f"top-{self.top_k}"
        return f"top-k {self.fewest_routed} to {self.top_k} by layer"


@dataclass(frozen=True)
class Problem:
    """A step that cannot work: the option at fault and why, phrased for both of the places it is
    reported (the config check and the running step)."""

    option: str | None
    message: str


def _no_problem(step: dict, shape: ModelShape | None = None) -> Problem | None:
    return None


def _reads_no_statistics(step: dict) -> bool:
    return False


def reads_statistics(step: dict) -> bool:
    """For methods whose step always reads the expert statistics table."""
    return True


def reads_statistics_to_protect(step: dict) -> bool:
    """For methods that read the statistics table only to find the experts their ``protect`` option names."""
    return "protect" in step


def _layer_by_layer(step: dict) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """A compression method.

    - ``apply(model, step, context) -> report``: edits the in-memory model; returns what the step did
      (JSON-able, in ``compression.json``);
    - ``edits``: what the method changes (the constants above);
    - ``check_options(step)``: rules between its options that the schema does not express;
    - ``check_shape(step, shape)``: what only the model can tell (e.g. more experts asked for than the
      layer has), run when the workflow is parsed and again for each layer when the step runs;
    - ``whole_model(step)``: why the step cannot run one MoE layer at a time (None: it can);
    - ``last``: must be the last step of a variant;
    - ``any_decoder``: applies to dense decoders too (otherwise it needs MoE layers);
    - ``check_model(step, config)``: what only the model class can tell (e.g. whether its projections hold
      whole heads), run on a weightless skeleton when the workflow is parsed;
    - ``reads_statistics(step)``: whether the step reads the expert statistics table (what a variant's
      calibration ``weights`` re-weight);
    - ``reads_residual``: its statistics need the residual stream entering each MoE sublayer, which the cache
      then stores (the planner's ``cache_residual``);
    - ``inspect(adapter)``: one line: what the step does on this architecture (``moe-compress inspect``
      prints it; every record has one, tests/test_config.py checks it).
    """

    name: str
    apply: Callable[..., dict]
    edits: frozenset[str]
    check_options: Callable[[dict], Problem | None] = _no_problem
    check_shape: Callable[[dict, ModelShape], Problem | None] = _no_problem
    whole_model: Callable[[dict], str | None] = _layer_by_layer
    last: bool = False
    any_decoder: bool = False
    check_model: Callable[[dict, object], Problem | None] | None = None
    reads_statistics: Callable[[dict], bool] = _reads_no_statistics
    reads_residual: bool = False
    inspect: Callable[[MoEArchitecture], str] | None = None


def exactly_one_of(step: dict, *options: str) -> Problem | None:
    """A problem unless ``step`` sets exactly one of ``options``."""
    given = [option for option in options if step.get(option) is not None]
    if len(given) != 1:
        return Problem(None, f"{step['method']} needs exactly one of {' or '.join(options)}; got "
                             f"{' and '.join(given) or 'none'}")
    return None


@cache
def methods() -> dict[str, Method]:
    """Every method record of the package, by name."""
    import moe_compress.methods as package

    found: dict[str, Method] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for record in getattr(module, "METHODS", ()):
            if record.name in found:
                raise RuntimeError(f"method {record.name!r} is declared twice ({module.__name__})")
            found[record.name] = record
    return found


def method(name: str) -> Method:
    """The record of method ``name``; a name the schema knows but no module declares is a broken install or
    a half-added method, said as such (not a bare KeyError)."""
    try:
        return methods()[name]
    except KeyError:
        raise ConfigError(f"method {name!r} has no Method record (registered: {', '.join(sorted(methods()))}); "
                          f"a method is a module in src/moe_compress/methods/ declaring it in METHODS, and its "
                          f"entry in the schema's $defs.methods") from None


def registry_schema_problems(registered: set[str], in_schema: set[str]) -> list[str]:
    """What breaks the contract that every method has both a record (``METHODS``) and a schema entry
    (``$defs.methods``): one line per method that has only one of the two."""
    return ([f"{name}: a schema entry ($defs.methods) but no Method record" for name in sorted(in_schema - registered)]
            + [f"{name}: a Method record but no schema entry ($defs.methods)" for name in sorted(registered - in_schema)])


def whole_model_reason(step: dict) -> str | None:
    """Why ``step`` cannot run one MoE layer at a time (None: it can, each layer on its own)."""
    return method(step["method"]).whole_model(step)


def variant_problems(steps: list[dict]) -> list[tuple[int, Problem]]:
    """(step index, problem) for every step that cannot work in this order or with these options."""
    problems = []
    not_dense = None  # (step index, what it made of the experts)
    for index, step in enumerate(steps):
        record = method(step["method"])
        if not_dense is not None and record.edits & NEEDS_DENSE_EXPERTS:
            # factored experts, or novices, have no dense matrices left to cut or combine
            problems.append((index, Problem("method", f"{record.name} cannot follow the {not_dense[1]} step "
                                                      f"steps[{not_dense[0]}]; put it before that step")))
        for edit, what in NOT_DENSE_AFTER.items():
            if edit in record.edits:
                not_dense = (index, what)
        if record.last and index != len(steps) - 1:
            problems.append((index, Problem("method", f"{record.name} must be the last step of a variant")))
        problem = record.check_options(step) or _protect_problem(step)
        if problem:
            problems.append((index, problem))
    return problems


def _protect_problem(step: dict) -> Problem | None:
    from moe_compress.methods.protection import protect_problem  # protection reads this module's Problem

    return protect_problem(step) if "protect" in step else None


def shape_problem(step: dict, shape: ModelShape) -> Problem | None:
    record = method(step["method"])
    if not shape.moe and not record.any_decoder:
        return Problem("method", f"{record.name} needs MoE layers; {shape.model_type or 'this model'} is a dense "
                                 f"decoder (steps for any decoder: {', '.join(any_decoder_methods())})")
    return record.check_shape(step, shape)


# rows of a cut dimension come in multiples of this many elements: the grouped-matmul kernels the experts run
# on need 16-byte aligned rows (8 elements in bfloat16), and GPU matmuls run fastest on such shapes
ALIGNMENT = 8


def aligned_count(step: dict, full: int) -> int:
    """``keep``, or ``fraction`` of ``full`` rounded to a multiple of ALIGNMENT (at least one multiple, at
    most ``full``)."""
    if step.get("keep") is not None:
        return step["keep"]
    return min(full, max(ALIGNMENT, ALIGNMENT * round(step["fraction"] * full / ALIGNMENT)))


def alignment_problem(step: dict, full: int, what: str) -> Problem | None:
    option = "keep" if step.get("keep") is not None else "fraction"
    kept = aligned_count(step, full)
    if kept > full:
        return Problem(option, f"keeps {kept} {what}; the model has {full}")
    if kept != full and kept % ALIGNMENT:
        return Problem(option, f"keeps {kept} {what}, not a multiple of {ALIGNMENT} (the grouped-matmul kernels need "
                               f"aligned rows); use {ALIGNMENT * max(1, kept // ALIGNMENT)}")
    return None


def any_decoder_methods() -> list[str]:
    return sorted(name for name, record in methods().items() if record.any_decoder)
