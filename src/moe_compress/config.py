"""Config validation, defaults and variant normalisation.

A variant is an ordered list of steps. The short form ``{method: ..., ...}`` is normalised to
``{steps: [{method: ..., ...}]}`` before validation, so every error points at a concrete key.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from moe_compress.errors import ConfigError
from moe_compress.integrity import record_path
from moe_compress.methods.registry import ModelShape, method, shape_problem, variant_problems

BASE_VARIANT = "base"
# the demo's experiment: what a run without --configfile does
DEFAULT_CONFIG_FILE = "config/config.yaml"


def _is_strict_integer(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# JSON Schema counts 32.0 as an integer; a job then fails on it (a slice, a range), so only real integers pass.
SchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)

_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "array": "a list", "object": "a mapping", "null": "null"}


def load_schema() -> dict:
    return json.loads(resources.files("moe_compress.schemas").joinpath("config.schema.json").read_text())


def step_defaults(method: str) -> dict:
    """The default value of each option of ``method`` (what validate_config fills in)."""
    return {key: spec["default"] for key, spec in method_schema(load_schema(), method)["properties"].items()
            if "default" in spec}


def method_schema(schema: dict, method: str) -> dict:
    """The entry of ``method`` in the schema: its options, their types and defaults."""
    return schema["$defs"]["methods"][method]


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


def _yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    """One line: the file, the line and column, and what the parser found there."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return f"{path}: not valid YAML ({' '.join(str(err).split())})"
    mark = err.problem_mark
    message = f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {err.problem}"
    if err.context and err.context_mark is not None and err.context_mark.line != mark.line:
        message += f" ({err.context} that starts on line {err.context_mark.line + 1})"
    if "'\\t'" in (err.problem or "") or "tab character" in (err.problem or ""):
        message += "; YAML indents with spaces only, replace the tab"
    return message


def read_config_file(path: str | Path) -> dict:
    """The config file as a dict; a duplicated key, invalid YAML or a non-mapping is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(path, err)) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys")
    return data


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Read each existing config file strictly: Snakemake's own reader names neither the file nor the line of a
    YAML error, and keeps the last of two equal keys silently. A path that is no file is left to Snakemake."""
    for path in paths:
        if Path(path).is_file():
            read_config_file(path)


def describe_config_files(command_line_files: Iterable[str | Path], overrides: bool = False) -> str:
    """The line a run prints first: which config files it reads. A ``--configfile`` names the whole experiment:
    the demo's ``config/config.yaml`` is read only without one (merged into it, the demo's variants would run
    beside the user's and be checked against the user's model)."""
    given = [str(path) for path in command_line_files]
    cwd = Path.cwd()
    shown = [str(Path(path).relative_to(cwd)) if Path(path).is_relative_to(cwd) else path for path in given]
    extra = "; --config values on top" if overrides else ""
    if not given:
        return (f"moe-compress: config from {DEFAULT_CONFIG_FILE} (the demo){extra}; "
                f"--configfile FILE runs your own experiment instead")
    merged = " merged in this order" if len(shown) > 1 else ""
    return (f"moe-compress: config from {', '.join(shown)}{merged}{extra}; {DEFAULT_CONFIG_FILE} (the demo) is "
            f"not read, keys not set take the schema's defaults")


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
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        hint = (" (a config names the whole experiment: at least the model and its variants; keys it does not set "
                "take the schema's defaults)" if not error.absolute_path else "")
        return f"config key '{_key_path([*error.absolute_path, missing])}': missing, and required{hint}"
    if error.validator == "enum":
        return f"config key '{where}': {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"config key '{where}': {error.instance!r} is not {' or '.join(_TYPE_NAMES[name] for name in expected)}"
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
            # the calibration weights belong to the variant, not to its one step
            step = {key: value for key, value in variant.items() if key != "weights"}
            variant = {"steps": [step], **({"weights": variant["weights"]} if "weights" in variant else {})}
        normalised[name] = copy.deepcopy(variant)
    return normalised


def _sweep_axes(name: str, steps: list, schema: dict) -> list[tuple[tuple, list]]:
    """(path into the steps, values) of every option of its method given as a list where the method takes one
    value (also inside a mapping such as ``target``). Only a method's options sweep: a list of methods is
    refused, naming the key; a list under an unknown key is left for validation to name."""
    axes = []
    methods = schema["$defs"]["methods"]
    for index, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        if isinstance(step.get("method"), (list, dict)):
            raise ConfigError(f"config key 'variants.{name}.steps[{index}].method': {step['method']!r} is not one "
                              f"method; a sweep runs over the options of one method: write one variant per method")
        if step.get("method") not in methods:
            continue
        options = methods[step["method"]]["properties"]
        for key, value in step.items():
            if key not in options:
                continue
            if isinstance(value, list) and options[key].get("type") != "array":
                axes.append(((index, key), value))
            elif isinstance(value, dict):
                axes += [((index, key, inner), values) for inner, values in value.items() if isinstance(values, list)]
    return axes


def _value_label(value) -> str:
    if isinstance(value, dict):  # a mapping such as a target names itself: experts16
        return "-".join(f"{_value_label(key)}{_value_label(inner)}" for key, inner in value.items())
    if isinstance(value, bool):
        text = json.dumps(value)
    else:
        text = format(value, "g") if isinstance(value, float) else str(value)
    return "".join(char if char.isalnum() or char in "._" else "_" for char in text)


def _member_part(label: str, value) -> str:
    """A swept value in its variant's name: a number or switch with its option (min_fraction0.01), a word
    or a mapping on its own (global, experts16)."""
    return _value_label(value) if isinstance(value, (str, dict)) else f"{label}{_value_label(value)}"


def expand_sweeps(variants: dict, schema: dict) -> tuple[dict, dict[str, list[str]]]:
    """A variant listing several values for options expands into one variant per combination, named
    ``<variant>-<option><value>[-...]`` in the order written (a word value stands alone: ``-global``, a mapping
    names itself: ``-experts16``), each
    with its own jobs and a ``sweep``: the line the plots draw it on, which runs along the first numeric
    option and is named by the other options' values (``reap-global``). Returns (variants, {each variant
    written as a sweep: the variants it expanded into})."""
    expanded, sweeps = {}, {}
    for name, variant in variants.items():
        steps = variant.get("steps") if isinstance(variant, dict) else None
        axes = _sweep_axes(name, steps, schema) if isinstance(steps, list) else []
        if not axes:
            expanded[name] = variant
            continue
        for path, values in axes:
            if not values:
                raise ConfigError(f"config key 'variants.{name}.steps[{path[0]}].{'.'.join(map(str, path[1:]))}': "
                                  "an empty list of values to sweep")
        leaves = [path[-1] for path, _ in axes]
        labels = [leaf if leaves.count(leaf) == 1 else f"s{path[0]}{leaf}" for (path, _), leaf in zip(axes, leaves)]
        # a line in the plots runs along the first numeric option; the other options' values name the line
        along = next((index for index, (_, values) in enumerate(axes)
                      if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)), None)
        sweeps[name] = []
        for combination in itertools.product(*(values for _, values in axes)):
            member = copy.deepcopy(variant)
            for (path, _), value in zip(axes, combination):
                holder = member["steps"]
                for part in path[:-1]:
                    holder = holder[part]
                holder[path[-1]] = value
            parts = [_member_part(label, value) for label, value in zip(labels, combination)]
            member_name = "-".join([name, *parts])
            _check_name_length(name, member_name)
            member["sweep"] = "-".join([name, *(part for index, part in enumerate(parts) if index != along)])
            if member_name in sweeps[name]:
                raise ConfigError(f"config key 'variants.{name}': a value is listed twice (variant {member_name!r})")
            if member_name in variants or member_name in expanded:
                raise ConfigError(f"config key 'variants.{name}': the sweep's variant {member_name!r} is also "
                                  "written as a variant; rename one")
            expanded[member_name] = member
            sweeps[name].append(member_name)
    return expanded, sweeps


def _step_errors(config: dict, schema: dict) -> list[str]:
    """Each step against its method's schema entry (the schema's ``step`` only requires a method name)."""
    known = schema["$defs"]["methods"]
    for name, variant in config["variants"].items():
        for index, step in enumerate(variant["steps"]):
            path = ["variants", name, "steps", index]
            if step["method"] not in known:
                return [f"config key '{_key_path([*path, 'method'])}': {step['method']!r} is not one of {sorted(known)}"]
            # the method's entry with the shared definitions its options may refer to (e.g. target)
            validator = SchemaValidator({**known[step["method"]], "$defs": schema["$defs"]})
            errors = sorted(validator.iter_errors(step), key=lambda e: _key_path(e.absolute_path))
            if errors:
                error = max(errors, key=lambda e: len(e.absolute_path))
                error.path.extendleft(reversed(path))
                return [_describe(error, schema)]
    return []


def _check_steps(variants: dict) -> None:
    """The rules between a variant's steps and between a step's options, from each method's record."""
    for name, variant in variants.items():
        for index, problem in variant_problems(variant["steps"]):
            option = f".{problem.option}" if problem.option else ""
            raise ConfigError(f"config key 'variants.{name}.steps[{index}]{option}': {problem.message}")


# the longest file name a variant's outputs are given: its checkpoint's checksum record, .<variant>.checksums.json
# (a temporary, .<variant>.<8 random characters>.tmp, is shorter)
_LONGEST_NAME_AROUND_A_VARIANT = len(record_path("x").name) - 1
# file names longer than this many bytes are refused by the common filesystems (ext4, XFS, Lustre, NFS, APFS)
FILE_NAME_MAX_BYTES = 255
VARIANT_NAME_MAX_BYTES = FILE_NAME_MAX_BYTES - _LONGEST_NAME_AROUND_A_VARIANT


def _check_name_length(written: str, name: str) -> None:
    """``name``: a variant's name, ``written``: the variant it comes from (itself, or the sweep it expands)."""
    size = len(name.encode())
    if size > VARIANT_NAME_MAX_BYTES:
        what = "the name" if written == name else f"the sweep's variant {name[:60]}..."
        shown = written if len(written) <= 60 else f"{written[:60]}..."
        raise ConfigError(f"config key 'variants.{shown}': {what} is {size} bytes; its outputs' file names "
                          f"(.<variant>.checksums.json) would pass the filesystem's limit of {FILE_NAME_MAX_BYTES} "
                          f"bytes: use a name of at most {VARIANT_NAME_MAX_BYTES}")


def _check_variant_names(variants: dict) -> None:
    """Each variant gets results/checkpoints/<name>/ and results/eval/<name>/: a name too long for a file name
    would stop the run mid-way, and names that differ only in case would share their folders on a
    case-insensitive filesystem."""
    for name in variants:
        _check_name_length(name, name)
    by_folded: dict[str, str] = {}
    for name in variants:
        other = by_folded.setdefault(name.casefold(), name)
        if other != name:
            raise ConfigError(f"config key 'variants.{name}': same output folder as variant {other!r} on a "
                              f"case-insensitive filesystem (results/checkpoints/<name>); rename one")


def check_variants_against_model(variants: dict, **shape) -> None:
    """What only the model can tell: a step asking for more experts, layers or heads than the model has, for
    a top-k its router cannot take, or for MoE layers a dense decoder lacks, fails here, when the workflow is
    parsed, not hours later in its job. ``shape``: the ``ModelShape`` fields (``modelio.model_shape``)."""
    shape = ModelShape(**shape)
    for name, variant in variants.items():
        for index, step in enumerate(variant["steps"]):
            problem = shape_problem(step, shape)
            if problem:
                option = f".{problem.option}" if problem.option else ""
                raise ConfigError(f"config key 'variants.{name}.steps[{index}]{option}': {problem.message} "
                                  f"({describe_shape(shape)})")


def check_targets_against_model(variants: dict, budget, parameters_known: bool = True) -> None:
    """A whole-model ``target`` (experts, a fraction of them, a parameter budget) the model cannot meet fails
    here: more than the model has (a variant that prunes nothing), or less than its top-k floors. ``budget``: the
    model's ``methods.allocation.ExpertBudget`` (from a weightless skeleton). Each bound is checked where the
    model's shape still decides it: the floors only before any step that changes the top-k (or, for parameters,
    any step at all); parameter counts only where ``parameters_known``."""
    from moe_compress.methods.allocation import target_above_model, target_below_floor
    from moe_compress.methods.registry import ROUTING

    for name, variant in variants.items():
        for index, step in enumerate(variant["steps"]):
            target = step.get("target")
            if not target:
                continue
            (kind, _), = target.items()
            earlier = variant["steps"][:index]
            if kind == "parameters":
                checks = [target_above_model, target_below_floor] if not earlier else [target_above_model]
                checks = checks if parameters_known else []
            else:
                routed_before = any(ROUTING in method(other["method"]).edits for other in earlier)
                checks = [target_above_model] + ([] if routed_before else [target_below_floor])
            for check in checks:
                problem = check(target, budget)
                if problem:
                    raise ConfigError(f"config key 'variants.{name}.steps[{index}].target.{kind}': {problem}")


def check_variants_against_model_class(variants: dict, model_dir, trust_remote_code: bool = False) -> None:
    """The steps' checks that need the model class (on weightless skeletons), e.g. whether its attention
    projections hold whole heads."""
    from moe_compress.modelio import load_checkpoint_config, needs_remote_code

    checked = [(name, index, step) for name, variant in variants.items()
               for index, step in enumerate(variant["steps"]) if method(step["method"]).check_model is not None]
    if not checked:
        return
    model_config = load_checkpoint_config(Path(model_dir), trust_remote_code or needs_remote_code(model_dir))
    for name, index, step in checked:
        problem = method(step["method"]).check_model(step, model_config)
        if problem:
            option = f".{problem.option}" if problem.option else ""
            raise ConfigError(f"config key 'variants.{name}.steps[{index}]{option}': {problem.message}")


def describe_shape(shape: ModelShape) -> str:
    heads = (f", {shape.num_attention_heads} query / {shape.num_key_value_heads} key-value heads"
             if shape.num_attention_heads else "")
    hidden = f", hidden size {shape.hidden_size}" if shape.hidden_size else ""
    if not shape.moe:
        return f"the model: a dense {shape.model_type} decoder, {shape.num_layers} layers{heads}{hidden}"
    width = f", {shape.expert_width} neurons per expert" if shape.expert_width else ""
    return (f"the model: {shape.num_experts} experts per layer, {shape.describe_top_k()}, {shape.num_layers} "
            f"layers{heads}{hidden}{width}")


def check_lengths_against_model(config: dict, max_positions: int, limit_source: str) -> None:
    """Windows longer than the model's context (``max_positions``, from ``limit_source``) would run without an
    error and measure a model outside the positions it was trained on."""
    for key in ("calibration.seq_len", "perplexity.seq_len"):
        section, name = key.split(".")
        value = config[section][name]
        if value > max_positions:
            raise ConfigError(f"config key '{key}': {value} is more than the model's context of {max_positions} "
                              f"tokens ({limit_source}); set it to at most {max_positions}")
    prompt, decode = config["speed"]["prompt_tokens"], config["speed"]["decode_tokens"]
    if prompt + decode > max_positions:
        raise ConfigError(f"config keys 'speed.prompt_tokens' + 'speed.decode_tokens': {prompt} + {decode} = "
                          f"{prompt + decode} tokens is more than the model's context of {max_positions} tokens "
                          f"({limit_source}); make the two add up to at most {max_positions}")


def check_reference(config: dict) -> None:
    """score.reference is the variant every ratio of the final table is relative to: it must be a variant, and
    ``base`` must be the uncompressed model. Another variant named there may have steps: the user chose it."""
    reference, variants = config["score"]["reference"], config["variants"]
    if reference not in variants:
        if reference == BASE_VARIANT:
            raise ConfigError(f"config key 'score.reference': there is no variant '{BASE_VARIANT}' to compare against "
                              f"(variants: {', '.join(variants)}); add `{BASE_VARIANT}: {{steps: []}}` under variants, "
                              f"or set score.reference to the variant every ratio is relative to")
        raise ConfigError(f"config key 'score.reference': {reference!r} is not a variant "
                          f"(variants: {', '.join(variants)})")
    steps = variants[reference]["steps"]
    if steps and reference == BASE_VARIANT:
        methods = ", ".join(step["method"] for step in steps)
        raise ConfigError(f"config key 'variants.{BASE_VARIANT}': the reference variant has steps ({methods}), so "
                          f"every ratio in the final table would be relative to a compressed model; make it "
                          f"`{BASE_VARIANT}: {{steps: []}}`, or set score.reference to the variant to compare against")


def _check_evaluation(config: dict) -> None:
    evaluation = config["evaluation"]
    listed = evaluation["variants"] or []
    unknown = [name for name in listed if name not in config["variants"]]
    if unknown:
        raise ConfigError(f"config key 'evaluation.variants': {unknown} are not variants "
                          f"(variants: {', '.join(config['variants'])})")
    reference = config["score"]["reference"]
    if evaluation["tasks"] and listed and reference not in listed and reference in config["variants"]:
        raise ConfigError(f"config key 'evaluation.variants': must include the reference variant '{reference}' "
                          f"(score.reference: PerfNorm is relative to it)")
    if evaluation["source"] == "bundled":
        from moe_compress.evaluate.lm_eval import bundled_tasks

        missing = [task for task in evaluation["tasks"] if task not in bundled_tasks()]
        if missing:
            raise ConfigError(f"config key 'evaluation.tasks': {missing} have no bundled data (bundled: "
                              f"{', '.join(bundled_tasks())}); set evaluation.source: hub to run them from the hub")


def validate_config(raw: dict) -> dict:
    """Return a validated copy of ``raw`` with defaults filled and variants normalised.

    Raises ``ConfigError`` naming the offending key and, where the schema lists them, the allowed values.
    """
    config = copy.deepcopy(raw)
    schema = load_schema()
    if "variants" in config:
        config["variants"] = normalise_variants(config["variants"])
        if isinstance(config["variants"], dict):
            config["variants"], sweeps = expand_sweeps(config["variants"], schema)
            evaluation = config.get("evaluation")
            if sweeps and isinstance(evaluation, dict) and isinstance(evaluation.get("variants"), list):
                # a sweep's name in evaluation.variants stands for all of its variants
                evaluation["variants"] = [member for name in evaluation["variants"]
                                          for member in sweeps.get(name, [name])]
    validator = SchemaValidator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key_path(e.absolute_path)))
    if errors:
        # The deepest error is the most specific; 'if/then' wrappers add a less useful parent error.
        error = max(errors, key=lambda e: len(e.absolute_path))
        raise ConfigError(_describe(error, schema))
    step_errors = _step_errors(config, schema)
    if step_errors:
        raise ConfigError(step_errors[0])
    _fill_defaults(config, schema, schema)
    for variant in config["variants"].values():
        for step in variant["steps"]:  # each method's own defaults, so params show every value used
            _fill_defaults(step, method_schema(schema, step["method"]), schema)
    _check_variant_names(config["variants"])
    _check_steps(config["variants"])
    _check_evaluation(config)
    if config["calibration"]["source"] == "hub" and config["calibration"]["hub_docs"] <= config["calibration"]["heldout_docs"]:
        raise ConfigError("config key 'calibration.hub_docs': must be larger than calibration.heldout_docs")
    normalise_calibration(config, raw.get("calibration") or {}, schema)
    _check_variant_weights(config)
    return config


# the keys that describe the one corpus of a calibration without sources
SINGLE_CORPUS_KEYS = ("source", "path", "text_field", "hub_docs", "hub_file", "heldout_docs")
# the name of the one source a calibration without sources is (its held-out perplexity: c4_heldout)
SINGLE_SOURCE_NAME = "c4"
# where fetch_calibration_corpus writes the C4 documents of calibration.source: hub
HUB_CALIBRATION_CORPUS = "results/calibration/hub_corpus.jsonl.gz"
# where fetch_calibration_source writes the records of a source with a hub dataset
HUB_SOURCE_CORPUS = "results/calibration/hub/{name}.jsonl.gz"
SHARE_TOLERANCE = 1e-6


def normalise_calibration(config: dict, raw_calibration: dict, schema: dict) -> None:
    """Fill ``calibration.sources``: a calibration without it becomes a one-source mix named ``c4`` from the
    single-corpus keys (``path``: the local file, or where fetch_calibration_corpus writes the C4 documents);
    with it, each source gets its defaults and the shares or counts are checked. ``raw_calibration``: as written, to
    refuse a single-corpus key set beside the sources (it would be ignored)."""
    calibration = config["calibration"]
    properties = schema["properties"]["calibration"]["properties"]
    if "sources" not in raw_calibration:
        calibration["sources"] = [single_corpus_source(calibration)]
        return
    ignored = [key for key in SINGLE_CORPUS_KEYS
               if key in raw_calibration and raw_calibration[key] != properties[key].get("default")]
    if ignored:
        raise ConfigError(f"config key 'calibration.{ignored[0]}': set beside calibration.sources, where each source "
                          f"has its own; move it into the sources (or drop sources for a one-corpus calibration)")
    sources = calibration["sources"]
    names = [source["name"] for source in sources]
    for index, source in enumerate(sources):
        key = f"calibration.sources[{index}]"
        if names.index(source["name"]) != index:
            raise ConfigError(f"config key '{key}.name': {source['name']!r} names two sources")
        if ("path" in source) == ("hub" in source):
            raise ConfigError(f"config key '{key}': give either path (a local file) or hub (a hub dataset), not "
                              f"{'both' if 'path' in source else 'neither'}")
        source.setdefault("text_field", "messages" if source["format"] == "chat" else "text")
        if "hub" in source and source["hub"]["docs"] <= source["heldout_docs"]:
            raise ConfigError(f"config key '{key}.hub.docs': {source['hub']['docs']} records leave nothing beside "
                              f"the {source['heldout_docs']} held-out documents (heldout_docs); take more")
    with_share = [source["name"] for source in sources if "share" in source]
    with_count = [source["name"] for source in sources if "samples" in source]
    if with_share and with_count:
        raise ConfigError(f"config key 'calibration.sources': {with_share} give a share and {with_count} a count "
                          f"(samples); give every source the same kind")
    if not with_share and not with_count:
        if len(sources) > 1:
            raise ConfigError("config key 'calibration.sources': give each source its share (share, summing to 1) "
                              "or its number of windows (samples)")
        sources[0]["share"] = 1.0
    elif with_share:
        total = sum(source["share"] for source in sources)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            shares = ", ".join(f"{source['name']} {source['share']:g}" for source in sources)
            raise ConfigError(f"config key 'calibration.sources': the shares ({shares}) sum to {total:g}, not 1")
    else:
        total = sum(source["samples"] for source in sources)
        if "num_samples" in raw_calibration and raw_calibration["num_samples"] != total:
            raise ConfigError(f"config key 'calibration.num_samples': {raw_calibration['num_samples']}, but the "
                              f"sources' samples add up to {total}; drop one of the two")
        calibration["num_samples"] = total
    windows = source_windows(calibration)
    for index, source in enumerate(sources):
        if windows[source["name"]] < 1:
            raise ConfigError(f"config key 'calibration.sources[{index}].share': {source['share']:g} of "
                              f"{calibration['num_samples']} windows (calibration.num_samples) is none; raise the "
                              f"share or num_samples")


def single_corpus_source(calibration: dict) -> dict:
    """The one source a calibration written with the single-corpus keys is."""
    return {"name": SINGLE_SOURCE_NAME, "format": "text", "documents": "paragraphs", "share": 1.0,
            "text_field": calibration["text_field"], "heldout_docs": calibration["heldout_docs"],
            "path": calibration["path"] if calibration["source"] == "local" else HUB_CALIBRATION_CORPUS}


def source_corpus(source: dict) -> str:
    """The file a calibration source is read from: its local path, or where fetch_calibration_source writes
    the records of its hub dataset."""
    return source["path"] if "path" in source else HUB_SOURCE_CORPUS.format(name=source["name"])


def source_windows(calibration: dict) -> dict[str, int]:
    """How many calibration windows each source gives: its count, or its share of ``num_samples`` rounded by the
    largest remainder, so the counts add up to ``num_samples`` exactly."""
    sources, total = calibration["sources"], calibration["num_samples"]
    if all("samples" in source for source in sources):
        return {source["name"]: source["samples"] for source in sources}
    exact = [source["share"] * total for source in sources]
    counts = [int(value) for value in exact]
    # ties go to the earlier source: the counts depend on the config alone
    by_remainder = sorted(range(len(sources)), key=lambda index: (-(exact[index] - counts[index]), index))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return {source["name"]: count for source, count in zip(sources, counts)}


def _check_variant_weights(config: dict) -> None:
    """A variant's weights name calibration sources and sum to 1."""
    names = [source["name"] for source in config["calibration"]["sources"]]
    for name, variant in config["variants"].items():
        weights = variant.get("weights")
        if weights is None:
            continue
        key = f"variants.{name}.weights"
        unknown = [source for source in weights if source not in names]
        if unknown:
            raise ConfigError(f"config key '{key}.{unknown[0]}': not a calibration source (calibration.sources: "
                              f"{', '.join(names)})")
        total = sum(weights.values())
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ConfigError(f"config key '{key}': the weights sum to {total:g}, not 1")
        if not any(method(step["method"]).reads_statistics(step) for step in variant["steps"]):
            raise ConfigError(f"config key '{key}': no step of this variant reads the expert statistics the weights "
                              f"re-weight (frequency_prune, reap_prune and svd_experts with basis: most_used_expert "
                              f"do), so they would change nothing")


def load_config(path: str | Path) -> dict:
    return validate_config(read_config_file(path))
