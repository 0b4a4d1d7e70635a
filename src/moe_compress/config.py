"""Config validation, defaults and variant normalisation.

A variant is an ordered list of steps. The short form ``{method: ..., ...}`` is normalised to
``{steps: [{method: ..., ...}]}`` before validation, so every error points at a concrete key.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from moe_compress.errors import ConfigError

BASE_VARIANT = "base"


def load_schema() -> dict:
    return json.loads(resources.files("moe_compress.schemas").joinpath("config.schema.json").read_text())


def step_defaults(method: str) -> dict:
    """The default value of each option of ``method`` (what validate_config fills in)."""
    schema = load_schema()
    return {key: spec["default"] for key, spec in schema["$defs"][method]["properties"].items() if "default" in spec}


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping (plain YAML keeps the last one silently: two
    variants with the same name would become one)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} is written twice in the same "
                                    f"mapping (first on line {seen[key]}); the second would silently replace the first")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict:
    """The config file as a dict; a duplicated key, invalid YAML or a non-mapping is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys")
    return data


def _key_path(path) -> str:
    parts = []
    for part in path:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "<top level>"


def _schema_at(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    if ref:
        node = root
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return _schema_at(node, root)
    return schema


def _describe(error: jsonschema.ValidationError, root: dict) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(_schema_at(error.schema, root).get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"'{_key_path([*error.absolute_path, key])}'" for key in unexpected)
        return f"config key {keys}: unknown key (allowed here: {', '.join(allowed)})"
    if error.validator == "enum":
        return f"config key '{where}': {error.instance!r} is not one of {error.validator_value}"
    return f"config key '{where}': {error.message}"


def _fill_defaults(instance, schema: dict, root: dict):
    """Insert schema defaults for missing keys, recursively (jsonschema validates but never fills)."""
    schema = _schema_at(schema, root)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            sub = _schema_at(sub, root)
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                _fill_defaults(instance[key], sub, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance:
                if key not in schema.get("properties", {}):
                    _fill_defaults(instance[key], extra, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"], root)


def normalise_variants(variants) -> dict:
    if not isinstance(variants, dict):
        return variants
    normalised = {}
    for name, variant in variants.items():
        if isinstance(variant, dict) and "method" in variant and "steps" not in variant:
            variant = {"steps": [variant]}
        normalised[name] = copy.deepcopy(variant)
    return normalised


# steps that change the experts' weight tensors; they need dense experts, so they cannot follow svd_experts
EXPERT_EDITING_METHODS = ("frequency_prune", "reap_prune", "hc_merge", "svd_experts")
# one-of option groups: a step names exactly one option of each group
EXCLUSIVE_OPTIONS = {"svd_experts": ("rank", "energy"), "reap_prune": ("keep", "min_fraction"),
                     "drop_layers": ("count", "layers")}


def _check_steps(variants: dict) -> None:
    for name, variant in variants.items():
        factored_at = None
        for index, step in enumerate(variant["steps"]):
            where = f"variants.{name}.steps[{index}]"
            if factored_at is not None and step["method"] in EXPERT_EDITING_METHODS:
                raise ConfigError(f"config key '{where}.method': {step['method']} cannot follow svd_experts "
                                  f"(steps[{factored_at}]); put pruning and merging before the low-rank step")
            if step["method"] == "svd_experts":
                factored_at = index
            options = EXCLUSIVE_OPTIONS.get(step["method"])
            if options and sum(option in step for option in options) != 1:
                raise ConfigError(f"config key '{where}': {step['method']} needs exactly one of {' or '.join(options)}")
            if step["method"] == "dtype" and index != len(variant["steps"]) - 1:
                raise ConfigError(f"config key '{where}.method': dtype must be the last step of variant {name!r}")
            if step["method"] == "dynamic_skip" and step["beta"] == "auto" and step.get("target_active") is None:
                raise ConfigError(f"config key '{where}.target_active': required with beta: auto")
            if step["method"] == "frequency_prune":
                thresholds = [key for key in ("min_count", "min_fraction", "keep") if key in step]
                if "keep" in step and not step.get("uniform"):
                    raise ConfigError(f"config key '{where}.keep': only valid with uniform: true")
                if len(thresholds) != 1:
                    raise ConfigError(
                        f"config key '{where}': frequency_prune needs exactly one of min_count, min_fraction "
                        f"or (with uniform: true) keep; got {thresholds or 'none'}"
                    )


def _check_variant_names(variants: dict) -> None:
    """Each variant gets results/checkpoints/<name>/ and results/eval/<name>/: names that differ only in case
    would share them on a case-insensitive filesystem."""
    by_folded: dict[str, str] = {}
    for name in variants:
        other = by_folded.setdefault(name.casefold(), name)
        if other != name:
            raise ConfigError(f"config key 'variants.{name}': same output folder as variant {other!r} on a "
                              f"case-insensitive filesystem (results/checkpoints/<name>); rename one")


def check_variants_against_model(variants: dict, num_experts: int, top_k: int, num_layers: int) -> None:
    """What only the model can tell: a step asking for more experts or layers than the model has fails here,
    when the workflow is parsed, not hours later in its job."""
    for name, variant in variants.items():
        for index, step in enumerate(variant["steps"]):
            where = f"config key 'variants.{name}.steps[{index}]"
            method = step["method"]
            if method == "active_experts" and step["k"] > num_experts:
                raise ConfigError(f"{where}.k': {step['k']} is more than the model's {num_experts} experts per layer")
            if method == "frequency_prune" and step.get("top_k") is not None and step["top_k"] > top_k:
                raise ConfigError(f"{where}.top_k': {step['top_k']} is more than the model's top-k ({top_k})")
            if method in ("frequency_prune", "reap_prune") and step.get("keep") is not None and step["keep"] > num_experts:
                raise ConfigError(f"{where}.keep': {step['keep']} is more than the model's {num_experts} experts per layer")
            if method == "hc_merge" and num_experts - step["merges_per_layer"] < top_k:
                raise ConfigError(f"{where}.merges_per_layer': {step['merges_per_layer']} leaves "
                                  f"{num_experts - step['merges_per_layer']} of the model's {num_experts} experts, "
                                  f"fewer than the {top_k} each token is routed to")
            if method == "dynamic_skip" and step.get("target_active") is not None and step["target_active"] > top_k:
                raise ConfigError(f"{where}.target_active': {step['target_active']} is more than the model's top-k ({top_k})")
            if method == "drop_layers":
                if step.get("count") is not None and step["count"] >= num_layers:
                    raise ConfigError(f"{where}.count': dropping {step['count']} of the model's {num_layers} layers "
                                      f"leaves none")
                outside = [layer for layer in step.get("layers") or [] if layer >= num_layers]
                if outside:
                    raise ConfigError(f"{where}.layers': {outside} are not layers of the model (0..{num_layers - 1})")


def _check_evaluation(config: dict) -> None:
    evaluation = config["evaluation"]
    listed = evaluation["variants"] or []
    unknown = [name for name in listed if name not in config["variants"]]
    if unknown:
        raise ConfigError(f"config key 'evaluation.variants': {unknown} are not variants "
                          f"(variants: {', '.join(config['variants'])})")
    if evaluation["tasks"] and listed and BASE_VARIANT not in listed and BASE_VARIANT in config["variants"]:
        raise ConfigError(f"config key 'evaluation.variants': must include '{BASE_VARIANT}' (PerfNorm is relative to it)")
    if evaluation["source"] == "bundled":
        from moe_compress.evaluate.benchmarks import bundled_tasks

        missing = [task for task in evaluation["tasks"] if task not in bundled_tasks()]
        if missing:
            raise ConfigError(f"config key 'evaluation.tasks': {missing} have no bundled data (bundled: "
                              f"{', '.join(bundled_tasks())}); set evaluation.source: hub to run them from the hub")


def validate_config(raw: dict) -> dict:
    """Return a validated copy of ``raw`` with defaults filled and variants normalised.

    Raises ``ConfigError`` naming the offending key and, where the schema lists them, the allowed values.
    """
    config = copy.deepcopy(raw)
    if "variants" in config:
        config["variants"] = normalise_variants(config["variants"])
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key_path(e.absolute_path)))
    if errors:
        # The deepest error is the most specific; 'if/then' wrappers add a less useful parent error.
        error = max(errors, key=lambda e: len(e.absolute_path))
        raise ConfigError(_describe(error, schema))
    _fill_defaults(config, schema, schema)
    for variant in config["variants"].values():
        for step in variant["steps"]:  # each method's own defaults, so params show every value used
            _fill_defaults(step, schema["$defs"][step["method"]], schema)
    _check_variant_names(config["variants"])
    _check_steps(config["variants"])
    _check_evaluation(config)
    if config["calibration"]["source"] == "hub" and config["calibration"]["hub_docs"] <= config["calibration"]["heldout_docs"]:
        raise ConfigError("config key 'calibration.hub_docs': must be larger than calibration.heldout_docs")
    return config


def load_config(path: str | Path) -> dict:
    return validate_config(read_config_file(path))
