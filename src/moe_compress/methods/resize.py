"""Shrink a model along one axis of its config (query heads, key-value heads, hidden size), for any
decoder transformers builds, without a per-architecture list of which tensor dimension is which.

The model class itself says which dimensions follow a config field: two weightless (meta-device)
skeletons are built with the field set to two different smaller values, and a tensor dimension that
takes ``units × block`` elements in both (``block`` = its size in the original divided by the original
number of units) is laid out unit by unit, ``block`` elements each (a head's ``head_dim`` rows, a
channel's one column). Keeping units then keeps those blocks. A dimension that changes any other way
(e.g. a fused q/k/v projection, or a size derived from the field by rounding) is refused, naming the
tensor: the step cannot be expressed for that model. Two probes, not one, so a size that matches the
pattern by coincidence at one value is not mistaken for one that follows the field.

After the tensors are cut, every module's plain attributes (``num_key_value_groups``, ``in_features``,
...) are set to what the smaller config builds, and the config is rewritten, so the model in memory is
the stock model its saved checkpoint loads as.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from moe_compress.architectures import replace_tensor
from moe_compress.errors import ModelError


@dataclass(frozen=True)
class Axis:
    """A config field being shrunk: ``units`` of it now, the tensors' dims that follow it."""

    field: str
    units: int


def _config_with(config, changes: dict):
    new = copy.deepcopy(config)
    for field, value in changes.items():
        setattr(new, field, value)
    return new


def skeleton(config) -> nn.Module:
    """The model ``config`` builds, on the meta device (no memory, no initialisation)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def follow_map(config, fixed: dict, axes: list[Axis], probes: list[dict[str, int]]) -> dict[str, dict[int, tuple[str, int]]]:
    """{tensor name: {dim: (axis field, block)}} for every dimension that follows one of ``axes``.

    ``fixed``: config fields pinned to their current value first (e.g. ``head_dim``, which many configs
    otherwise derive from the hidden size). ``probes``: two or more {field: smaller unit count} settings
    of the axes; a dimension follows an axis when, in every probe, its size is that axis' unit count times
    the same block."""
    base = _config_with(config, fixed)
    original = _shapes(skeleton(base))
    probed = [_shapes(skeleton(_config_with(base, probe))) for probe in probes]
    result: dict[str, dict[int, tuple[str, int]]] = {}
    for name, shape in original.items():
        for dim, size in enumerate(shape):
            sizes = [shapes.get(name, (None,) * len(shape))[dim] for shapes in probed]
            if all(probe_size == size for probe_size in sizes):
                continue
            matches = []
            for axis in axes:
                if size % axis.units:
                    continue
                block = size // axis.units
                if all(probe_size == probe[axis.field] * block for probe, probe_size in zip(probes, sizes, strict=True)):
                    matches.append((axis.field, block))
            if not matches:
                raise ModelError(f"{config.model_type}: {name} (shape {shape}) changes with "
                                 f"{', '.join(axis.field for axis in axes)} in a way this step cannot cut "
                                 f"(dimension {dim}: {size} -> {sizes}); the step does not apply to this model")
            result.setdefault(name, {})[dim] = matches[0] if len(matches) == 1 else ("ambiguous", matches)
    return result


def block_index(units: torch.Tensor, block: int) -> torch.Tensor:
    """The element indices of ``units`` (sorted unit numbers) in a dimension laid out unit by unit."""
    return (units[:, None] * block + torch.arange(block)).reshape(-1)


def cut_tensors(model: nn.Module, follows: dict[str, dict[int, tuple[str, int]]], units_for) -> None:
    """Cut every tensor dimension in ``follows`` to the units ``units_for(name, field)`` returns (sorted
    unit indices, possibly different per decoder layer). A tensor shared by two names (tied embeddings)
    is cut once and stays shared."""
    state = model.state_dict(keep_vars=True)
    missing = sorted(set(follows) - set(state))
    if missing:
        raise ModelError(f"{model.config.model_type}: the model has no {missing[0]}, which its config describes")
    replaced: dict[int, torch.Tensor] = {}  # id of the original tensor -> what replaced it
    for name, dims in follows.items():
        original = state[name]
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if id(original) in replaced:
            new = replaced[id(original)]
            if isinstance(new, nn.Parameter):
                setattr(module, leaf, new)
            else:
                module._buffers[leaf] = new
            continue
        value = original.data
        for dim, rule in dims.items():
            field, block = _resolved(name, dim, rule, units_for)
            index = block_index(units_for(name, field), block).to(value.device)
            if value.shape[dim] <= int(index.max()):
                raise ModelError(f"{name}: dimension {dim} has {value.shape[dim]} elements, fewer than the config "
                                 f"describes; an earlier step changed it")
            value = value.index_select(dim, index)
        replace_tensor(module, leaf, value.contiguous())
        replaced[id(original)] = getattr(module, leaf)


def _resolved(name: str, dim: int, rule, units_for) -> tuple[str, int]:
    """An unambiguous (field, block); an ambiguous dimension is accepted only where every reading keeps
    the same elements."""
    if rule[0] != "ambiguous":
        return rule
    readings = rule[1]
    indices = {tuple(block_index(units_for(name, field), block).tolist()) for field, block in readings}
    if len(indices) != 1:
        raise ModelError(f"{name}: dimension {dim} could follow any of {[field for field, _ in readings]} and they "
                         f"keep different elements; the step cannot decide which to cut")
    return readings[0]


def adopt_config(model: nn.Module, fixed: dict, changes: dict, follows: dict[str, dict[int, tuple[str, int]]]) -> None:
    """Rewrite ``model.config`` (in place: modules hold the same config object) with ``fixed`` and
    ``changes``, and set the plain attributes (``num_key_value_groups``, ``in_features``, ...) that the
    change alters in a freshly built model to their new values; then check every cut dimension against
    what the rewritten config builds. Only what the change alters is touched: an earlier step's edits
    (fewer experts in one layer) stay."""
    before = skeleton(_config_with(model.config, fixed))
    for field, value in {**fixed, **changes}.items():
        setattr(model.config, field, value)
    after = skeleton(model.config)
    before_modules, after_modules = dict(before.named_modules()), dict(after.named_modules())
    for name, module in model.named_modules():
        old, new = before_modules.get(name), after_modules.get(name)
        if old is None or new is None:
            continue
        for attr, value in vars(new).items():
            # plain numbers and shapes only (not bools: the training flag must stay as it is)
            if attr.startswith("_") or not _plain(value):
                continue
            if vars(old).get(attr) != value and hasattr(module, attr):
                setattr(module, attr, value)
    ours, theirs = _shapes(model), _shapes(after)
    for name, dims in follows.items():
        for dim in dims:
            if ours[name][dim] != theirs[name][dim]:
                raise ModelError(f"{model.config.model_type}: after the cut {name} has shape {ours[name]} but the "
                                 f"rewritten config builds {theirs[name]}")


def _plain(value) -> bool:
    if isinstance(value, tuple):
        return bool(value) and all(_plain(item) for item in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def layer_of(name: str, layers_path: str) -> int | None:
    """The decoder-layer index of a tensor name below ``layers_path`` (None outside the decoder layers)."""
    prefix = f"{layers_path}."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])
