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


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
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
    _check_steps(config["variants"])
    _check_evaluation(config)
    if config["calibration"]["source"] == "hub" and config["calibration"]["hub_docs"] <= config["calibration"]["heldout_docs"]:
        raise ConfigError("config key 'calibration.hub_docs': must be larger than calibration.heldout_docs")
    return config


def load_config(path: str | Path) -> dict:
    return validate_config(read_config_file(path))
