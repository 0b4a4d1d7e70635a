"""The configuration reference (``docs/configuration.md``), generated from the schema: every config key and
every method's options with its type, allowed values, default and description. The schema is the one source,
so the page cannot drift from what the configuration check accepts; ``tests/test_reference.py`` keeps the
page equal to this module's output (``moe-compress config-reference --write docs/configuration.md``)."""

from __future__ import annotations

import json
from pathlib import Path

from moe_compress.atomic import atomic_path
from moe_compress.config import load_schema
from moe_compress.errors import DataError

CONFIG_START, CONFIG_END = "<!-- configuration:start -->", "<!-- configuration:end -->"
CONFIG_PAGE = "docs/configuration.md"

_TYPE_NAMES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
               "null": "null", "array": "list", "object": "mapping"}


def _resolve(spec: dict, root: dict) -> tuple[dict, str | None]:
    """The schema a ``$ref`` points at (its siblings, such as a description, kept) and the definition's name."""
    ref = spec.get("$ref")
    if not ref:
        return spec, None
    node = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return {**node, **{key: value for key, value in spec.items() if key != "$ref"}}, ref.rsplit("/", 1)[-1]


def _code(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`"


def _bounds(spec: dict) -> str:
    """' in (0, 1]', ' ≥ 1', ' < 1' or '': the numeric range the schema allows."""
    low = high = None
    if "minimum" in spec:
        low = ("[", "≥", spec["minimum"])
    elif "exclusiveMinimum" in spec:
        low = ("(", ">", spec["exclusiveMinimum"])
    if "maximum" in spec:
        high = ("]", "≤", spec["maximum"])
    elif "exclusiveMaximum" in spec:
        high = (")", "<", spec["exclusiveMaximum"])
    if low and high:
        return f" in {low[0]}{low[2]}, {high[2]}{high[0]}"
    bound = low or high
    return f" {bound[1]} {bound[2]}" if bound else ""


def _plural(text: str) -> str:
    """'integer ≥ 0' -> 'integers ≥ 0': the first type word of an item's description, in the plural."""
    for word in ("mapping", "string", "integer", "number", "boolean", "step"):
        if word in text:
            return text.replace(word, word + "s", 1)
    return text


def type_text(spec: dict, root: dict) -> str:
    """What a value may be, in a few words: its type and bounds, or the values allowed."""
    spec, definition = _resolve(spec, root)
    if definition == "target":
        return "mapping ([`target`](#target))"
    if definition:
        return definition
    if "const" in spec:
        return _code(spec["const"])
    if "enum" in spec:
        return " | ".join(_code(value) for value in spec["enum"])
    if "oneOf" in spec:
        return " or ".join(type_text(option, root) for option in spec["oneOf"])
    types = spec.get("type", [])
    types = types if isinstance(types, list) else [types]
    words = []
    for name in types:
        if name == "array":
            items = spec.get("items")
            word = f"list of {_plural(type_text(items, root))}" if items else "list"
            words.append(word + (", distinct" if spec.get("uniqueItems") else ""))
        elif name in ("integer", "number"):
            words.append(_TYPE_NAMES[name] + _bounds(spec))
        elif name == "string":
            word = "non-empty string" if spec.get("minLength") == 1 else "string"
            words.append(word + (f" matching {_code(spec['pattern'])}" if "pattern" in spec else ""))
        else:
            words.append(_TYPE_NAMES[name])
    return " or ".join(words)


def _default_text(key: str, spec: dict, required: list[str]) -> str:
    if "default" in spec and not isinstance(spec["default"], dict):
        return _code(spec["default"])
    return "required" if key in required else ""


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, and angle brackets outside code spans written as
    entities (a bare <name> would be read as an HTML tag and vanish)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if index % 2 else part.replace("<", "&lt;").replace(">", "&gt;")
                    for index, part in enumerate(parts))


def _sentence(text: str) -> str:
    """A description as a sentence of its own: capitalised, ending in a full stop."""
    return _cell(text[:1].upper() + text[1:].rstrip(".") + ".")


def option_rows(node: dict, root: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """(key, type, default, description) of every leaf key below ``node``, nested mappings flattened to
    dotted keys."""
    rows = []
    required = node.get("required", [])
    for key, spec in node.get("properties", {}).items():
        if key in skip:
            continue
        resolved, _ = _resolve(spec, root)
        if resolved.get("type") == "object" and "properties" in resolved and "$ref" not in spec:
            rows += option_rows(resolved, root, f"{prefix}{key}.")
            continue
        rows.append((f"{prefix}{key}", type_text(spec, root), _default_text(key, resolved, required),
                     spec.get("description", "")))
    return rows


def _options_table(node: dict, root: dict, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    rows = [f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(description)} |"
            for key, kind, default, description in option_rows(node, root, prefix, skip)]
    return ["| key | type | default | meaning |", "|---|---|---|---|", *rows] if rows else []


def configuration_keys(schema: dict | None = None) -> str:
    """Every config key and method option with its default, one per line (the command's plain answer)."""
    schema = schema or load_schema()
    rows = option_rows(schema, schema)
    for name, method in schema["$defs"]["methods"].items():
        rows += option_rows(method, schema, f"{name}: ", skip=("method",)) or [(f"{name}: (no options)", "", "", "")]
    width = max(len(key) for key, *_ in rows)
    lines = [f"{key:{width}}  {default or '-':14} {kind}".rstrip() for key, kind, default, _ in rows]
    return "\n".join(lines).replace("`", "")


def configuration_reference(schema: dict | None = None) -> str:
    """The generated part of docs/configuration.md: every config key, the variant and step entries, the
    whole-model target, and every method's options."""
    schema = schema or load_schema()
    defs = schema["$defs"]
    required = " and ".join(f"`{key}`" for key in schema.get("required", []))
    lines = ["## Keys", "",
             f"Every top-level key but {required} may be left out: what a config does not set takes the default "
             "below.", ""]
    for key, spec in schema["properties"].items():
        lines += [f"### `{key}`", ""]
        if key == "variants":
            lines += [_sentence(spec["description"]), "",
                      "#### A variant: `variants.<name>`", "", _sentence(defs["variant"]["description"]), "",
                      *_options_table(defs["variant"], schema, "variants.<name>."), "",
                      "#### A step: `variants.<name>.steps[]`", "", _sentence(defs["step"]["description"]), "",
                      *_options_table(defs["step"], schema, "variants.<name>.steps[]."), ""]
            continue
        if spec.get("type") == "object" and "properties" in spec:
            if spec.get("description"):
                lines += [_sentence(spec["description"]), ""]
            lines += [*_options_table(spec, schema, f"{key}."), ""]
        else:
            lines += _options_table({"properties": {key: spec}, "required": schema.get("required", [])}, schema)
            lines.append("")
    lines += ["### `target`", "", _sentence(defs["target"]["description"]).rstrip(".") + ":", "",
              *_options_table(defs["target"], schema, "target."), "",
              "## Methods", "",
              "Each step names its `method`; the options below are the only keys it may have (besides `method`).",
              ""]
    for name, method in defs["methods"].items():
        lines += [f"### `{name}`", ""]
        if method.get("description"):
            lines += [_sentence(method["description"]), ""]
        table = _options_table(method, schema, skip=("method",))
        lines += [*table, ""] if table else ["No options.", ""]
    return "\n".join(lines).rstrip("\n")


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced by ``block``."""
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"


def generated_block(text: str, start: str, end: str) -> str:
    """What lies between the markers ``start`` and ``end`` of a page."""
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def write_block(page: str | Path, start: str, end: str, block: str) -> None:
    """Put ``block`` between the markers ``start`` and ``end`` of ``page``, the rest of the page kept."""
    page = Path(page)
    text = page.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise DataError(f"{page}: needs exactly one {start} followed by one {end}, where the generated part goes")
    with atomic_path(page) as tmp:
        tmp.write_text(replace_block(text, start, end, block))
