"""Load and save models: stock checkpoints, and checkpoints with a per-layer expert count that carry
their own small modeling file (loaded with ``trust_remote_code=True``)."""

from __future__ import annotations

import json
import logging
import platform
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_compress.architectures import ARCHITECTURES, adapter_for
from moe_compress.atomic import atomic_directory, write_json
from moe_compress.checkpoint_files import (  # noqa: F401 (also imported from here)
    COMPRESSION_RECORD,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    TOKENIZER_CHOICES,
    TOKENIZER_READS,
    check_model_dir,
    context_length,
    read_compression_record,
)
from moe_compress.errors import ModelError
from moe_compress.pruning_plan import PLAN_FILE, pruning_plan
from moe_compress.quantized import check_source_quantization
from moe_compress.remote_code.moe_compress_layers import STORED_FORMS

if TYPE_CHECKING:  # pandas is imported by the step report tables that use it: most jobs need none
    import pandas as pd

log = logging.getLogger(__name__)

REMOTE_CODE_FILE = "modeling_moe_compress.py"
REMOTE_CODE_CLASS = "MoeCompressForCausalLM"
LAYERS_FILE = "moe_compress_layers.py"  # imported by the modeling file; also the library's own code
LOADER_STOCK = "stock"
LOADER_REMOTE_CODE = "remote_code"
# compression.json's record of the source checkpoint's quantization (null for an unquantized source); a model
# loaded from a quantized source carries it as this attribute (not saved with the model)
SOURCE_QUANTIZATION = "source_quantization"
SOURCE_QUANTIZATION_ATTRIBUTE = "moe_compress_source_quantization"
# a non-stock checkpoint's per-layer config fields and architecture name, read by the vLLM plugin
# (serving/vllm_plugin.py, which imports nothing of the package: the names are repeated there)
SERVING_LAYER_FIELDS = "moe_compress_layer_fields"
SERVING_ARCHITECTURE_PREFIX = "MoeCompress"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def needs_remote_code(path: str | Path) -> bool:
    """True only for checkpoints this pipeline wrote with its own modeling file."""
    record = read_compression_record(path)
    return bool(record and record.get("loader") == LOADER_REMOTE_CODE)


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load a causal LM for inference. Remote code is trusted only when asked for, or for our own checkpoints.
    A quantized source (block-scaled FP8, MXFP4) loads dequantized into ``dtype`` (``load_dequantized``)."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path, weights=True)
    trust = trust_remote_code or needs_remote_code(path)
    load_checkpoint_config(path, trust)
    if check_source_quantization(path) is not None:
        model = load_dequantized(path, dtype, device, trust)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust,
                                                     use_safetensors=True)
    return model.to(resolve_device(device)).eval()


def load_dequantized(path: Path, dtype: str, device: str, trust: bool) -> nn.Module:
    """A quantized source, whole, dequantized on ``device`` into ``dtype`` by the layer stream's own code: the
    plain model's skeleton, then every tensor read, dequantized and converted as ``LayerStream`` does, so each
    weight is bitwise the one the calibration cache pass and a per-layer job load. (transformers' own
    ``dequantize=True`` load computes the same products, but refuses FP8 blocks that are partial at a matrix's
    edge, as DeepSeek-V3's are, and an FP8 model it loads does not save: the reverse of its conversion
    quantizes again.) Peak memory: the model + one layer."""
    from itertools import chain

    from moe_compress.streaming import LayerStream, load_into

    stream = LayerStream(path, dtype, device, trust, read_ahead=False)
    model, layers = stream.model, stream.adapter.layers + "."
    outer = [name for name in stream.tensors.weight_map if not name.startswith(layers)]
    load_into(model, stream.tensors.read(outer), stream.device)
    for index in range(len(stream.layers)):
        stream.load_layer(index)
    model.tie_weights()
    unloaded = sorted(name for name, tensor in chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta)
    if unloaded:
        raise ModelError(f"model path {path}: the checkpoint has no tensors for {unloaded[:5]}")
    if model.can_generate() and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)  # as from_pretrained attaches it
    return model


def source_quantization_of(model: nn.Module) -> dict | None:
    """What compression.json records of the quantization of the checkpoint ``model`` was loaded from."""
    return getattr(model, SOURCE_QUANTIZATION_ATTRIBUTE, None)


def load_checkpoint_config(path: Path, trust: bool):
    """The checkpoint's config, refusing custom code unless trusted, an architecture we do not support and a
    quantization we do not read. A quantized checkpoint's config comes without its ``quantization_config``:
    the model is built, used and saved unquantized, its tensors dequantized as they are read."""
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"model path {path}: config.json is not valid JSON ({err})") from err
    # A release of a type transformers implements often still names its own code (DeepSeek-V3, Phi-3.5-MoE,
    # MiniMax-M2 ship an auto_map): untrusted, transformers' own class loads it, the one the adapter describes.
    native = raw.get("model_type") in ARCHITECTURES
    if native or not raw.get("auto_map"):
        adapter_for(raw.get("model_type"))  # before transformers: one line listing the supported types
    if raw.get("auto_map") and not trust and not native:
        raise ModelError(f"model path {path}: its config.json asks to run the checkpoint's own code (auto_map); "
                         f"set model.trust_remote_code: true only if you trust that code")
    quantization = check_source_quantization(path)  # one line naming a format not read, and what to do
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    adapter_for(config)  # fail early, listing the supported types
    if quantization is not None:
        del config.quantization_config
    return config


def model_shape(path: str | Path, trust_remote_code: bool = False) -> dict[str, int | None]:
    """Experts per layer, top-k (and whether it is fixed), decoder layers and the decoder's widths, from the
    checkpoint's config alone (no weights)."""
    path = check_model_dir(path)
    config = load_checkpoint_config(path, trust_remote_code or needs_remote_code(path))
    adapter = adapter_for(config)
    shape = {"num_experts": adapter.num_experts(config), "top_k": 0, "num_layers": config.num_hidden_layers,
             "fixed_top_k": adapter.fixed_top_k, "model_type": config.model_type, "moe": adapter.moe,
             "hidden_size": config.hidden_size, "num_attention_heads": getattr(config, "num_attention_heads", None),
             "num_key_value_heads": getattr(config, "num_key_value_heads", None)
             or getattr(config, "num_attention_heads", None), "expert_width": None}
    if adapter.moe:
        # per-layer fields (a list per decoder layer): the largest top-k, each layer's where they differ, and
        # the narrowest expert width (what a cut must fit in every layer)
        top_k = list(adapter.top_k_per_layer(config).values())
        shape.update(top_k=max(top_k), expert_width=min(adapter.per_layer_values(config, adapter.config_expert_width)))
        if len(set(top_k)) > 1:
            shape["top_k_per_layer"] = tuple(top_k)
    return shape


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_model_dir(path))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was requested but CUDA is not available on this machine")
    return torch.device(device)


def count_parameters(model: nn.Module) -> int:
    """The weights the checkpoint stores: distinct parameters (tied weights once) plus persistent floating-point
    buffers (e.g. DeepSeek-V3's routing correction bias). Integer buffers are bookkeeping, not weights
    (dictionary-coded experts' atom indices: their bytes are in the step report and the analysis); rotary
    tables and other derived buffers are not saved."""
    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(buffer.numel() for module in model.modules() for name, buffer in module._buffers.items()
                  if buffer is not None and name not in module._non_persistent_buffers_set
                  and buffer.is_floating_point())
    return parameters + buffers




def environment_versions() -> dict:
    """The versions that decide a checkpoint's numbers, for compression.json."""
    from importlib.metadata import version

    packages = ("moe-compress", "torch", "transformers", "safetensors", "numpy")
    return {"python": platform.python_version(), **{name: version(name) for name in packages}}


def stock_class(model_class: type) -> type:
    """The stock transformers class of a model: itself, or where it was loaded through our remote class,
    its stock parent."""
    stock = model_class
    while stock.__module__.startswith("transformers_modules") or stock.__name__ == REMOTE_CODE_CLASS:
        stock = stock.__bases__[0]
    return stock


def _render_remote_code(model_class: type) -> str:
    # the stock class is the base of the remote class
    stock = stock_class(model_class)
    template = resources.files("moe_compress.remote_code").joinpath(REMOTE_CODE_FILE).read_text()
    return template.replace("__BASE_MODULE__", stock.__module__).replace("__BASE_CLASS__", stock.__name__)


def block_facts(adapter, block: nn.Module) -> dict:
    """What the checkpoint's config and record say about one MoE block: its expert count, routing
    settings, dynamic-skip settings and its experts' stored form ({form name: specs}; None where they are
    dense, or skipping is off)."""
    return {"experts": adapter.block_num_experts(block), "router_settings": adapter.router_settings(block),
            "expert_width": adapter.block_expert_width(block), "dynamic_skip": adapter.block_dynamic_skip(block),
            "stored_form": adapter.block_stored_form(block)}


def apply_checkpoint_layout(config, adapter, facts: dict[int, dict], model_class: type) -> tuple[dict, dict[str, str]]:
    """Write into ``config`` how the MoE layers look after compression (``facts``: ``block_facts`` per
    MoE layer); return (the record's layout fields, remote-code files to add: none for a stock checkpoint).

    When every MoE layer has the same expert count and routing settings (or the config states a setting per
    layer, as Hunyuan's ``moe_topk`` list does) and no expert is factored or skipped dynamically, the
    checkpoint is the stock architecture (plain ``from_pretrained``, the hub tensor layout vLLM reads).
    Otherwise it carries ``modeling_moe_compress.py`` (+ the low-rank experts module) and an ``auto_map``, and
    loads with ``trust_remote_code=True``. Every config field keeps its form: a per-layer list stays a list."""
    counts = {index: fact["experts"] for index, fact in facts.items()}
    settings = {index: fact["router_settings"] for index, fact in facts.items()}
    # per stored form (moe_compress_layers.STORED_FORMS): {layer: specs} of the layers whose experts hold it
    forms = {form.name: {index: fact["stored_form"][form.name] for index, fact in facts.items()
                         if form.name in (fact.get("stored_form") or {})} for form in STORED_FORMS}
    dynamic_skip = {index: fact["dynamic_skip"] for index, fact in facts.items() if fact["dynamic_skip"] is not None}
    # a routing setting that differs between layers is stock where its config field is read per layer (a list)
    routing_stock = all(adapter.expresses_per_layer(config, field, {index: s[attr] for index, s in settings.items()})
                        for attr, field in adapter.routing_fields())
    uniform = len(set(counts.values())) <= 1 and routing_stock
    # a width the config's field does not state (a field that also sizes other MLPs)
    widths = {index: fact["expert_width"] for index, fact in facts.items()
              if fact["expert_width"] is not None and fact["expert_width"] != adapter.expert_width(config, index)}
    stock = uniform and not any(forms.values()) and not dynamic_skip and not widths
    for stale in ("moe_compress_experts_per_layer", "moe_compress_router_settings", "moe_compress_layout",
                  "moe_compress_dynamic_skip", "moe_compress_expert_width", *(form.config_field for form in STORED_FORMS),
                  SERVING_LAYER_FIELDS, "moe_compress_unservable", "auto_map"):
        if hasattr(config, stale):
            delattr(config, stale)
    if counts:
        # each field in its own form: a per-layer list gets each layer's value; a single value is the one all
        # layers share, or the largest (layers are resized from it by the remote-code loader)
        adapter.write_layer_values(config, adapter.config_num_experts, counts)
        for attr, field in adapter.routing_fields():
            adapter.write_layer_values(config, field, {index: s[attr] for index, s in settings.items()})
        # the fields that state the experts' width or the top-k beside the ones the stock class reads follow
        mirrored = {field: {index: fact["expert_width"] for index, fact in facts.items()
                            if fact["expert_width"] is not None} for field in adapter.config_width_mirrors}
        mirrored.update({field: {index: s["top_k"] for index, s in settings.items() if "top_k" in s}
                         for field in adapter.config_top_k_mirrors})
        for field, values in mirrored.items():
            if getattr(config, field, None) is not None:
                adapter.write_layer_values(config, field, values)
    remote_code = {}
    if not stock:
        config.moe_compress_experts_per_layer = {str(index): count for index, count in counts.items()}
        config.moe_compress_router_settings = {str(index): s for index, s in settings.items()}
        for form in STORED_FORMS:
            setattr(config, form.config_field, {str(index): specs for index, specs in forms[form.name].items()})
        config.moe_compress_dynamic_skip = {str(index): skip for index, skip in dynamic_skip.items()}
        config.moe_compress_expert_width = {str(index): fact["expert_width"] for index, fact in facts.items()}
        config.moe_compress_layout = adapter.layout()
        width_private = not widths or _width_field_is_private(config)
        setattr(config, SERVING_LAYER_FIELDS, {str(index): fields for index, fields in
                                               stock_layer_fields(config, adapter, counts, settings, facts,
                                                                  width_private).items()})
        if not width_private:
            # an engine building layers from the stock fields would resize the other MLPs with the experts
            config.moe_compress_unservable = (f"the routed experts' widths differ from config field "
                                              f"{adapter.config_expert_width!r}, which also sizes other MLPs")
        config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE.removesuffix('.py')}.{REMOTE_CODE_CLASS}"}
        code_files = resources.files("moe_compress.remote_code")
        remote_code = {REMOTE_CODE_FILE: _render_remote_code(model_class),
                       LAYERS_FILE: code_files.joinpath(LAYERS_FILE).read_text()}
    stock_name = stock_class(model_class).__name__
    record = {
        "model_type": config.model_type,
        "loader": LOADER_STOCK if stock else LOADER_REMOTE_CODE,
        # config.json's architecture: what vLLM resolves a model class by (the moe-compress plugin's for a
        # non-stock checkpoint)
        "architecture": stock_name if stock else SERVING_ARCHITECTURE_PREFIX + stock_name,
        "experts_per_layer": {str(index): count for index, count in counts.items()},
        "experts_total": sum(counts.values()),
        "active_experts": _active_experts(adapter, config, settings),
        "router_settings_per_layer": {str(index): s for index, s in settings.items()},
        **{f"{name}_per_layer": {str(index): specs for index, specs in per_layer.items()}
           for name, per_layer in forms.items()},
        "dynamic_skip_per_layer": {str(index): skip for index, skip in dynamic_skip.items()},
        "expert_width_per_layer": {str(index): fact["expert_width"] for index, fact in facts.items()},
    }
    return record, remote_code


def _width_field_is_private(config) -> bool:
    from moe_compress.methods.expert_width import width_field_is_private_in

    return width_field_is_private_in(config)


def stock_layer_fields(config, adapter, counts: dict[int, int], settings: dict[int, dict],
                       facts: dict[int, dict], width_private: bool = True) -> dict[int, dict]:
    """{MoE layer: {config field: value}}: what the stock config fields (expert count, routing settings, expert
    width and their mirrors) would hold if the layer were a stock one. An inference engine builds each layer
    from them (the vLLM plugin, ``serving.vllm_plugin``); a field the config already states per layer (a list)
    is left out, the stock class reads it per layer, and so is a width field that also sizes other MLPs
    (``width_private`` False)."""
    per_layer = {}
    for index in counts:
        values = {adapter.config_num_experts: counts[index]}
        values.update({field: settings[index][attr] for attr, field in adapter.routing_fields() if attr in settings[index]})
        width = facts[index]["expert_width"]
        if width is not None and width_private:
            values[adapter.config_expert_width] = width
            values.update(dict.fromkeys((field for field in adapter.config_width_mirrors
                                         if getattr(config, field, None) is not None), width))
        if "top_k" in settings[index]:
            values.update(dict.fromkeys((field for field in adapter.config_top_k_mirrors
                                         if getattr(config, field, None) is not None), settings[index]["top_k"]))
        per_layer[index] = {field: value for field, value in values.items() if not adapter.is_per_layer(config, field)}
    return per_layer


def _active_experts(adapter, config, settings: dict[int, dict]) -> int | float:
    """The experts each token is routed to: the MoE layers' common top-k, or where they differ their mean."""
    top_k = [s["top_k"] for s in settings.values() if "top_k" in s]
    if not top_k:
        return adapter.top_k(config, next(iter(settings), None))
    return top_k[0] if len(set(top_k)) == 1 else round(sum(top_k) / len(top_k), 6)


def save_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path, record: dict) -> dict:
    """Save ``model`` + ``tokenizer`` + ``compression.json`` atomically; return the completed record.
    The checkpoint is stock or carries its own modeling file: see ``apply_checkpoint_layout``."""
    adapter = adapter_for(model.config)
    facts = {index: block_facts(adapter, block) for index, block in adapter.moe_blocks(model).items()}
    layout, remote_code = apply_checkpoint_layout(model.config, adapter, facts, type(model))
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return write_checkpoint_record(tmp, {**record, SOURCE_QUANTIZATION: source_quantization_of(model)}, layout,
                                       remote_code, len(adapter.decoder_layers(model)), count_parameters(model))


def write_checkpoint_record(directory: Path, record: dict, layout: dict, remote_code: dict[str, str], num_layers: int,
                            parameters: int) -> dict:
    """Complete ``record`` (the layout, the size, the library versions), write it as ``compression.json``
    beside the remote-code files, the tables of its step reports and, where steps pruned experts, the
    pruning plan (or, in the record, why there is none); return it. Every checkpoint writer ends here."""
    record = {**record, **layout, "num_layers": num_layers, "parameters": parameters,
              "versions": environment_versions()}
    files = {**remote_code, **step_report_tables(record.get("step_reports", []))}
    plan, omitted = pruning_plan(record)
    if plan is not None:
        record["pruning_plan"] = PLAN_FILE
        files[PLAN_FILE] = json.dumps(plan, indent=2, sort_keys=True) + "\n"
    elif omitted is not None:
        record["pruning_plan_omitted"] = omitted
    for name, text in files.items():
        (directory / name).write_text(text)
    _write_architecture(directory, record["architecture"])
    write_json(record, directory / COMPRESSION_RECORD)
    return record


def _write_architecture(directory: Path, architecture: str) -> None:
    """Name ``architecture`` in config.json (``save_pretrained`` writes the in-memory class's name, which is our
    remote class for a model loaded through it): transformers loads by ``auto_map``, vLLM by this name."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("architectures") != [architecture]:
        config["architectures"] = [architecture]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def clusters_table(reports: list[dict]) -> pd.DataFrame:
    """One row per merged expert: its layer, the original experts it stands for, and their coefficients."""
    import pandas as pd

    rows = []
    for report in reports:
        for layer, clusters in report.get("clusters", {}).items():
            coefficients = report["layers"][layer]["coefficients"]
            for index, (members, weights) in enumerate(zip(clusters, coefficients)):
                rows.append({"step": report["step"], "layer": int(layer), "merged_expert": index,
                             "original_experts": " ".join(map(str, members)),
                             "coefficients": " ".join(f"{w:.4f}" for w in weights)})
    return pd.DataFrame(rows, columns=["step", "layer", "merged_expert", "original_experts", "coefficients"])


def low_rank_table(reports: list[dict]) -> pd.DataFrame:
    """One row per (layer, expert matrix) of each svd_experts step: rank, sharing, energy and error, and where
    the basis came from (the donor expert's original id with basis most_used_expert)."""
    import pandas as pd

    columns = ["rank", "shared", "energy_kept", "weight_error", "parameters_before", "parameters_after"]
    optional = ["basis", "basis_expert", "basis_expert_frequency"]  # absent from reports of older versions
    rows = [{"step": report["step"], "layer": int(layer), "matrix": name, **{key: facts[key] for key in columns},
             **{key: facts.get(key) for key in optional}}
            for report in reports if report["method"] == "svd_experts"
            for layer, matrices in report["layers"].items() for name, facts in matrices.items()]
    return pd.DataFrame(rows, columns=["step", "layer", "matrix", *columns, *optional])


def dictionary_table(reports: list[dict]) -> pd.DataFrame:
    """One row per (layer, expert matrix) of each ksvd_experts step: atoms, sparsity, iterations, error, size."""
    import pandas as pd

    columns = ["atoms", "sparsity", "iterations", "weight_error", "parameters_before", "parameters_after",
               "index_bytes"]
    rows = [{"step": report["step"], "layer": int(layer), "matrix": name, **{key: facts[key] for key in columns}}
            for report in reports if report["method"] == "ksvd_experts"
            for layer, matrices in report["layers"].items() for name, facts in matrices.items()]
    return pd.DataFrame(rows, columns=["step", "layer", "matrix", *columns])


def step_report_tables(reports: list[dict]) -> dict[str, str]:
    """The readable per-layer CSVs a checkpoint carries beside compression.json (only non-empty ones)."""
    tables = {"reconstruction_error.csv": reconstruction_table(reports), "merge_clusters.csv": clusters_table(reports),
              "low_rank.csv": low_rank_table(reports), "dictionary.csv": dictionary_table(reports)}
    return {name: table.to_csv(index=False) for name, table in tables.items()
            if name == "reconstruction_error.csv" or not table.empty}


def reconstruction_table(reports: list[dict]) -> pd.DataFrame:
    """One row per (step, layer): the MoE block's relative reconstruction error after that step."""
    import pandas as pd

    rows = [{"step": report["step"], "method": report["method"], "layer": int(layer), "relative_error": error}
            for report in reports for layer, error in report.get("reconstruction_error", {}).items()]
    return pd.DataFrame(rows, columns=["step", "method", "layer", "relative_error"])


def hub_dir_name(repo_id: str) -> str:
    """Folder name for a downloaded hub snapshot ("org/name" -> "org--name")."""
    return repo_id.replace("/", "--")


def hub_repo_id(dir_name: str) -> str:
    return dir_name.replace("--", "/", 1)
