"""Steps for any decoder: drop whole decoder layers, and cast the weights to a lower-precision dtype.

``drop_layers`` removes the ``count`` layers whose output hidden state is most similar to their input
(mean cosine over the calibration tokens: the layers that change the residual stream least), or an
explicit list. The checkpoint stays stock: the per-layer config fields are rewritten for the kept
layers, and each kept layer's attention learns its new index (the KV cache is indexed by it).
"""

from __future__ import annotations

import logging
import re

import torch

from moe_compress.architectures import adapter_for
from moe_compress.errors import ModelError
from moe_compress.methods.context import calibration_forward
from moe_compress.methods.registry import DECODER_LAYERS, DTYPE, Method, Problem, exactly_one_of
from moe_compress.modelio import DTYPES

log = logging.getLogger(__name__)


@torch.no_grad()
def layer_similarities(model, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean over tokens of cos(input, output) of every decoder layer's hidden states, [num_layers]."""
    layers = adapter_for(model.config).decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)  # beside the hidden states it sums
    inputs = {}

    def remember_input(index):
        def hook(module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def compare_output(index):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(inputs.pop(index).double(), hidden.double(), dim=-1)
            sums[index] += cosine.sum()
        return hook

    handles = [handle for index, layer in enumerate(layers) for handle in (
        layer.register_forward_pre_hook(remember_input(index), with_kwargs=True),
        layer.register_forward_hook(compare_output(index), with_kwargs=True))]
    try:
        count = calibration_forward(model, input_ids, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).cpu()


def remove_layers(model, drop: list[int]) -> dict[int, int]:
    """Remove decoder layers ``drop`` in place; return {old index: new index} of the kept layers."""
    adapter = adapter_for(model.config)
    layers = adapter.decoder_layers(model)
    old_count = len(layers)
    dropped = set(drop)
    kept = [index for index in range(old_count) if index not in dropped]
    mapping = {old: new for new, old in enumerate(kept)}
    new_layers = torch.nn.ModuleList([layers[old] for old in kept])
    for new, layer in enumerate(new_layers):
        for module in layer.modules():  # attention (and anything else) indexes the KV cache by layer
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    adapter.set_decoder_layers(model, new_layers)
    _rewrite_layer_config(adapter, model.config, kept, old_count, [adapter.is_moe_layer(layer) for layer in new_layers])
    _check_layer_config(model)
    return mapping


def _rewrite_layer_config(adapter, config, kept: list[int], old_count: int, is_moe: list[bool]) -> None:
    """The config fields that describe layers by index, rewritten for the kept layers: every list with one
    entry per layer, and the architecture's ``layer_config_fields``."""
    config.num_hidden_layers = len(kept)
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_count and name != "architectures":
            setattr(config, name, [value[old] for old in kept])
    dense = [index for index, moe in enumerate(is_moe) if not moe]
    moe = [index for index, moe in enumerate(is_moe) if moe]
    mapping = {old: new for new, old in enumerate(kept)}
    for field, kind in adapter.layer_config_fields:
        head, *rest = field.split(".")  # a nested field lives in a dict (e.g. linear_attn_config.kda_layers)
        fields = vars(config)
        for part in rest:
            fields = fields.get(head)
            head = part
        if not isinstance(fields, dict) or fields.get(head) is None:
            continue
        old = fields[head]
        if kind == "dense_indices":
            new = dense
        elif kind == "indices_1based":
            new = [mapping[i - 1] + 1 for i in old if i - 1 in mapping]
        elif kind == "prefix":
            if dense != list(range(len(dense))):
                raise ModelError(f"drop_layers: the kept dense layers {dense} are no longer the first layers, "
                                 f"which {config.model_type}'s config field {field!r} requires")
            new = len(dense)
        elif kind in ("first_moe", "last_moe"):
            new = (moe[0] if kind == "first_moe" else moe[-1]) if moe else old
        elif kind == "sparse_step":
            new = 1
        else:
            raise ValueError(kind)
        fields[head] = new


def _layer_kinds(layers) -> list[tuple[tuple[str, str], ...]]:
    return [tuple((name, type(child).__name__) for name, child in layer.named_children()) for layer in layers]


def _check_layer_config(model) -> None:
    """The rewritten config must build the kept layers as they are (MoE or dense, attention or linear
    mixer), or the saved checkpoint would load as another model: checked on a weightless skeleton."""
    from transformers import AutoModelForCausalLM

    adapter = adapter_for(model.config)
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(model.config)
    ours, theirs = _layer_kinds(adapter.decoder_layers(model)), _layer_kinds(adapter.decoder_layers(rebuilt))
    for index, (kept, described) in enumerate(zip(ours, theirs, strict=True)):
        if kept != described:
            raise ModelError(f"drop_layers: {model.config.model_type}'s config cannot describe the kept layers: "
                             f"layer {index} is {dict(kept)} but the rewritten config builds {dict(described)}")


def drop_layers(model, step: dict, context) -> dict:
    num_layers = len(adapter_for(model.config).decoder_layers(model))
    similarities = None
    if step.get("layers") is not None:
        drop = sorted(set(step["layers"]))
    else:
        if step["count"] == 0:
            drop = []
        else:
            if context.calibration_ids is None:
                raise ModelError("drop_layers with count needs the calibration tokens")
            similarities = layer_similarities(model, context.calibration_ids)
            drop = sorted(torch.argsort(similarities, descending=True, stable=True)[:step["count"]].tolist())
    mapping = remove_layers(model, drop) if drop else {index: index for index in range(num_layers)}
    # the cached per-layer data follows the layers to their new index; dropped layers' data goes
    for name in ("moe_inputs", "reference_outputs", "original_expert_ids"):
        table = getattr(context, name)
        setattr(context, name, {mapping[old]: value for old, value in table.items() if old in mapping})
    context.renormalized = {mapping[old] for old in context.renormalized if old in mapping}
    context.original_layers = {new: context.original_layer(old) for old, new in mapping.items()}
    log.info("dropped decoder layers %s", drop)
    return {"dropped_layers": drop, "layer_mapping": {str(old): new for old, new in mapping.items()},
            "similarity": None if similarities is None else [round(float(s), 6) for s in similarities]}


def loaded_dtypes(model, dtype: torch.dtype) -> tuple[dict[str, torch.dtype], re.Pattern | None]:
    """The dtype each stored tensor gets when the checkpoint is loaded in ``dtype``, by transformers' own
    rule: the dtype the module creates it with under that default dtype (some routers and biases are
    created in float32 explicitly), and float32 for the names the model class keeps in float32
    (``_keep_in_fp32_modules``: its dtype plan, a name pattern, also returned for tensors the stock
    model does not have, such as low-rank factors)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    plan = skeleton._get_dtype_plan(dtype)
    keep_fp32 = re.compile("|".join(f"(?:{name})" for name in plan)) if plan else None
    dtypes = {name: torch.float32 if keep_fp32 is not None and keep_fp32.search(name) else tensor.dtype
              for name, tensor in skeleton.state_dict().items() if tensor.is_floating_point()}
    return dtypes, keep_fp32


def cast_dtype(model, step: dict, context) -> dict:
    dtype = DTYPES[step["dtype"]]
    previous = str(next(model.parameters()).dtype).removeprefix("torch.")
    # what a checkpoint stores changes dtype, to what loading it in that dtype gives each tensor, so the
    # model in memory is the model users load; derived buffers (rotary tables) stay as loading makes them
    dtypes, keep_fp32 = loaded_dtypes(model, dtype)

    def target(name: str) -> torch.dtype:
        if name in dtypes:
            return dtypes[name]
        return torch.float32 if keep_fp32 is not None and keep_fp32.search(name) else dtype

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, parameter in module._parameters.items():
            if parameter is not None and parameter.is_floating_point():
                parameter.data = parameter.data.to(target(prefix + name))
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(target(prefix + name))
    model.config.dtype = step["dtype"]
    # measurements after this step run in the new dtype, so the cached inputs follow (the reference
    # outputs stay in full precision: the error then includes the rounding)
    context.moe_inputs = {layer: value.to(dtype) for layer, value in context.moe_inputs.items()}
    return {"from": previous, "to": step["dtype"]}


def _drop_shape(step: dict, shape) -> Problem | None:
    if step.get("count") is not None and step["count"] >= shape.num_layers:
        return Problem("count", f"dropping {step['count']} of the {shape.num_layers} decoder layers leaves none")
    layers = set(step.get("layers") or [])
    outside = sorted(layer for layer in layers if layer >= shape.num_layers)
    if outside:
        return Problem("layers", f"{outside} are not decoder layers (0..{shape.num_layers - 1})")
    if len(layers) >= shape.num_layers:
        return Problem("layers", f"dropping all {shape.num_layers} decoder layers leaves none")
    return None


METHODS = (
    # measures layer similarity with full forward passes and renumbers the layers
    Method("drop_layers", drop_layers, frozenset({DECODER_LAYERS}), any_decoder=True,
           check_options=lambda step: exactly_one_of(step, "count", "layers"), check_shape=_drop_shape,
           whole_model=lambda step: "drop_layers works on the whole model",
           inspect=lambda adapter: "whole decoder layers; stock"),
    Method("dtype", cast_dtype, frozenset({DTYPE}), last=True, any_decoder=True,
           whole_model=lambda step: "dtype works on the whole model (it also casts the embeddings and the head)",
           inspect=lambda adapter: "the storage dtype; stock"),
)
