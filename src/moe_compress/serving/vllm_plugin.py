"""A vLLM plugin (entry point ``vllm.general_plugins``) that serves checkpoints whose MoE layers differ from each
other: per-layer expert counts, expert widths and routing settings (top-k, renormalisation).

A stock vLLM model reads one expert count, one width and one top-k from the config when it builds its decoder
layers. A non-uniform checkpoint written by moe-compress names the architecture ``MoeCompress<stock name>``
(e.g. ``MoeCompressQwen3MoeForCausalLM``) and lists, per MoE layer, the values those config fields would hold if
the layer were a stock one (``moe_compress_layer_fields``, written from the adapter table). The plugin registers
``MoeCompress<arch>`` for every architecture vLLM knows: a subclass of the stock class that builds each decoder
layer while the config holds that layer's values, so each layer allocates its own experts, and the stock weight
loader fills them from the checkpoint (which holds only the kept experts). Nothing is copied per architecture:
any vLLM model that builds its decoder layers through ``make_layers`` from its config is served; after building,
every MoE layer's expert tensors are checked against the checkpoint's record, so a model that builds another way
fails loudly instead of serving wrong shapes.

Not served (refused with the layer named): experts stored as low-rank factors or dictionary codes, and routers
that skip experts dynamically: vLLM's fused-MoE kernels take dense expert tensors and a fixed top-k.
"""

from __future__ import annotations

import contextlib
import sys

ARCHITECTURE_PREFIX = "MoeCompress"
LAYER_FIELDS = "moe_compress_layer_fields"
EXPERTS_PER_LAYER = "moe_compress_experts_per_layer"
EXPERT_WIDTH = "moe_compress_expert_width"
# set by the writer where the per-layer fields cannot describe the checkpoint (the reason)
UNSERVABLE = "moe_compress_unservable"
# config fields of the layouts vLLM's fused-MoE kernels cannot run, and why
UNSERVED_LAYOUTS = {
    "moe_compress_low_rank": "low-rank experts (factored expert tensors)",
    "moe_compress_dictionary": "dictionary-coded experts (sparse codes over a shared dictionary)",
    "moe_compress_dynamic_skip": "dynamic expert skipping (a top-k that varies per token)",
    "moe_compress_novice": "MoNE novice experts (constants answering for experts the router still chooses; "
                           "vLLM's fused-MoE kernels run every chosen expert)",
}


def _field(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def unserved_layouts(config) -> list[str]:
    """Why the plugin cannot serve a checkpoint with this config (a dict or a config object): one line per
    layer whose layout the fused-MoE kernels cannot run, and what the writer found no stock field for; empty
    when it can."""
    problems = [_field(config, UNSERVABLE)] if _field(config, UNSERVABLE) else []
    for field, what in UNSERVED_LAYOUTS.items():
        for layer in sorted(_field(config, field) or {}, key=int):
            problems.append(f"layer {layer}: {what}")
    return problems


def layer_fields(config) -> dict[int, dict]:
    """{decoder layer: {config field: value}} of a non-uniform checkpoint's config (a dict or config object)."""
    return {int(layer): dict(fields) for layer, fields in (_field(config, LAYER_FIELDS) or {}).items()}


def base_architecture(architecture: str) -> str | None:
    """The stock architecture a plugin architecture name wraps (None for a name that is not the plugin's)."""
    if architecture.startswith(ARCHITECTURE_PREFIX) and len(architecture) > len(ARCHITECTURE_PREFIX):
        return architecture[len(ARCHITECTURE_PREFIX):]
    return None


@contextlib.contextmanager
def fields_set(config, fields: dict):
    """``config`` with ``fields`` set (through the config class's own attribute aliases), restored after."""
    missing = object()
    saved = {name: getattr(config, name, missing) for name in fields}
    try:
        for name, value in fields.items():
            setattr(config, name, value)
        yield config
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(config, name)
            else:
                setattr(config, name, value)


def layer_index(prefix: str) -> int:
    """The decoder-layer index at the end of a module prefix such as ``model.layers.3``."""
    return int(prefix.rsplit(".", 1)[-1])


def expert_shapes(layer) -> tuple[int, int] | None:
    """(experts, width) of the routed experts of a built vLLM decoder layer, from its fused-MoE tensors
    (``w13_weight`` [E, 2I, H] and ``w2_weight`` [E, H, I]); None for a layer without routed experts."""
    for module in layer.modules():
        down = getattr(module, "w2_weight", None)
        if down is not None and getattr(module, "w13_weight", None) is not None:
            return int(down.shape[0]), int(down.shape[2])
    return None


def built_expert_layout(model) -> dict[str, list[int]]:
    """{decoder layer: [experts, width]} of the routed experts a built vLLM model holds (``LLM.apply_model``):
    what the engine allocated, to compare with the checkpoint's record."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    return {str(index): list(shapes) for index, layer in enumerate(layers)
            if (shapes := expert_shapes(layer)) is not None}


def check_built_layers(layers, config) -> None:
    """Every MoE layer the checkpoint lists has the expert count and width it records; raise naming the layer."""
    counts = {int(layer): count for layer, count in (_field(config, EXPERTS_PER_LAYER) or {}).items()}
    widths = {int(layer): width for layer, width in (_field(config, EXPERT_WIDTH) or {}).items()}
    for layer, count in sorted(counts.items()):
        shapes = expert_shapes(layers[layer]) if layer < len(layers) else None
        if shapes is None:
            raise ValueError(f"moe-compress plugin: decoder layer {layer} was built without routed experts; "
                             f"the checkpoint records {count}")
        expected = (count, widths.get(layer, shapes[1]))
        if shapes != expected:
            raise ValueError(f"moe-compress plugin: decoder layer {layer} was built with {shapes[0]} experts of width "
                             f"{shapes[1]}, the checkpoint records {expected[0]} of width {expected[1]}: this "
                             "architecture does not build its layers from the config the plugin sets")


def _model_modules():
    """The imported vLLM model modules that build decoder layers through ``make_layers``."""
    from vllm.model_executor.models import utils

    return [module for name, module in list(sys.modules.items())
            if name.startswith("vllm.model_executor.models.") and getattr(module, "make_layers", None) is utils.make_layers]


@contextlib.contextmanager
def per_layer_construction(config, fields: dict[int, dict]):
    """While active, every decoder layer built through ``make_layers`` is built with ``config`` holding that
    layer's ``fields``."""
    from vllm.model_executor.models import utils

    stock_make_layers = utils.make_layers

    def make_layers(num_hidden_layers, layer_fn, prefix):
        def build(prefix):
            with fields_set(config, fields.get(layer_index(prefix), {})):
                return layer_fn(prefix=prefix)
        return stock_make_layers(num_hidden_layers, build, prefix)

    modules = _model_modules()
    for module in modules:
        module.make_layers = make_layers
    try:
        yield
    finally:
        for module in modules:
            module.make_layers = stock_make_layers


def per_layer_class(base: type) -> type:
    """``base`` (a vLLM model class) building each decoder layer from its own config fields."""

    class PerLayerModel(base):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            config = vllm_config.model_config.hf_text_config
            problems = unserved_layouts(config)
            if problems:
                raise ValueError("moe-compress plugin: vLLM cannot serve this checkpoint: " + "; ".join(problems))
            with per_layer_construction(config, layer_fields(config)):
                super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            layers = getattr(getattr(self, "model", None), "layers", None)
            if layers is None:
                raise ValueError(f"moe-compress plugin: {base.__name__} keeps no decoder layers at model.layers")
            check_built_layers(layers, config)

    PerLayerModel.__name__ = PerLayerModel.__qualname__ = ARCHITECTURE_PREFIX + base.__name__
    PerLayerModel.__module__ = __name__
    return PerLayerModel


_classes: dict[str, type] = {}


def __getattr__(name: str):
    # vLLM's registry imports "moe_compress.serving.vllm_plugin:MoeCompress<arch>" lazily (also in the
    # subprocess that inspects a model class): build the class on first use
    base_name = base_architecture(name)
    if base_name is None:
        raise AttributeError(name)
    if name not in _classes:
        from vllm import ModelRegistry

        base = ModelRegistry._try_load_model_cls(base_name)
        if base is None:
            raise AttributeError(f"vLLM has no model class for architecture {base_name!r}")
        _classes[name] = per_layer_class(base)
    return _classes[name]


def register() -> None:
    """The plugin's entry point: ``MoeCompress<arch>`` for every architecture vLLM knows. Loaded by vLLM in
    every process it starts; registering again is harmless."""
    from vllm import ModelRegistry

    for architecture in sorted(ModelRegistry.get_supported_archs()):
        if base_architecture(architecture) is None:
            ModelRegistry.register_model(ARCHITECTURE_PREFIX + architecture, f"{__name__}:{ARCHITECTURE_PREFIX}{architecture}")
