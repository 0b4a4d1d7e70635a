"""The reference pages stay true: docs/configuration.md is the schema's generated reference, every schema key
has a description to generate it from, and every link and repository path the README and the docs name
exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import REPO
from moe_compress.cli import main
from moe_compress.config import load_schema
from moe_compress.reference import CONFIG_END, CONFIG_PAGE, CONFIG_START, configuration_reference, generated_block

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# what the docs may name that a clone does not hold: outputs of a run, the environment, Snakemake's state
NOT_IN_A_CLONE = ("results/", ".venv/", ".snakemake/")


def schema_leaves(node: dict, prefix: str = ""):
    """(dotted key, schema) of every key below ``node`` that is not itself a mapping with keys of its own."""
    for key, spec in node.get("properties", {}).items():
        if spec.get("type") == "object" and "properties" in spec:
            yield from schema_leaves(spec, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", spec


def described_nodes(schema: dict):
    """(where, schema) of every property in the schema, every definition and every method."""
    def walk(node, where):
        for key, spec in node.get("properties", {}).items():
            yield f"{where}.{key}", spec
            yield from walk(spec, f"{where}.{key}")
    yield from walk(schema, "config")
    for name, definition in schema["$defs"].items():
        entries = definition.items() if name == "methods" else [(name, definition)]
        for entry, spec in entries:
            yield f"$defs.{name}" if name != "methods" else f"$defs.methods.{entry}", spec
            yield from walk(spec, f"$defs.{name}" if name != "methods" else f"$defs.methods.{entry}")


def test_the_configuration_page_is_generated_from_the_schema():
    page = (REPO / CONFIG_PAGE).read_text()
    assert generated_block(page, CONFIG_START, CONFIG_END) == configuration_reference(), \
        f"run `moe-compress config-reference --write {CONFIG_PAGE}`"


def test_every_key_and_method_of_the_schema_has_a_description():
    missing = [where for where, spec in described_nodes(load_schema()) if not spec.get("description")]
    assert not missing, f"give these a description in config.schema.json: {missing}"


def test_the_reference_lists_every_key_and_option_with_its_default():
    schema = load_schema()
    block = configuration_reference(schema)
    assert "### `variants`" in block and "#### A step: `variants.<name>.steps[]`" in block
    for key, spec in schema_leaves(schema):
        if key == "variants":
            continue  # a mapping of the user's names: its section describes a variant and a step
        row = next((line for line in block.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        if "default" in spec and not isinstance(spec["default"], dict):
            default = "null" if spec["default"] is None else str(spec["default"]).lower() \
                if isinstance(spec["default"], bool) else str(spec["default"])
            assert f"`{default}`" in row.split(" | ")[2], (key, row)
    methods = block.split("## Methods", 1)[1].split("\n### ")[1:]
    assert [section.split("`")[1] for section in methods] == list(schema["$defs"]["methods"])
    for section in methods:
        name = section.split("`")[1]
        options = set(schema["$defs"]["methods"][name]["properties"]) - {"method"}
        assert set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)) == options, name


def test_the_command_prints_the_reference(capsys):
    assert main(["config-reference", "--markdown"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == configuration_reference()
    assert main(["config-reference"]) == 0
    assert "model.device" in capsys.readouterr().out


def test_the_command_writes_the_reference_between_the_markers_only(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text(f"# Written by hand\n\n{CONFIG_START}\nstale\n{CONFIG_END}\n\nMore by hand.\n")
    assert main(["config-reference", "--write", str(page)]) == 0
    assert page.read_text() == (f"# Written by hand\n\n{CONFIG_START}\n{configuration_reference()}\n{CONFIG_END}\n\n"
                                "More by hand.\n")
    page.write_text("no markers\n")
    assert main(["config-reference", "--write", str(page)]) == 2 and page.read_text() == "no markers\n"


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated heading numbered."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code_blocks(page.read_text()), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        number = 0
        while (f"{slug}-{number}" if number else slug) in anchors:
            number += 1
        anchors.add(f"{slug}-{number}" if number else slug)
    return anchors


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file, or heading anchor, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_leads_somewhere(page):
    assert not broken_links(page)


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## Running on a GPU node: `make test-gpu`\n\n## Running\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#running-on-a-gpu-node-make-test-gpu) [b](other.md#running-1) [c](gone.md) "
                    "[d](other.md#gpu) [e](https://example.org/x) [f](#title)\n\n# Title\n")
    assert broken_links(page) == ["other.md#running-1: no heading with that anchor", "gone.md: no such file",
                                  "other.md#gpu: no heading with that anchor"]


def repository_paths(text: str) -> list[str]:
    """The inline code spans that name a path in the repository: they start with one of its top-level
    entries."""
    top_level = {entry.name for entry in REPO.iterdir() if not entry.name.startswith(".") and entry.name != "results"}
    spans = re.findall(r"`([^`\s]+)`", without_code_blocks(text))
    return [span for span in spans if span.split("/")[0] in top_level and (span in top_level or "/" in span)]


def exists_in_repository(path: str) -> bool:
    """A path, its placeholders (<name>, …, *, {a,b}) matching at least one file or folder."""
    alternatives = [path]
    braces = re.search(r"\{([^}]*)\}", path)
    if braces:
        alternatives = [path[:braces.start()] + choice + path[braces.end():] for choice in braces.group(1).split(",")]
    return all(any(REPO.glob(re.sub(r"<[^>]+>|…", "*", alternative).rstrip("/"))) for alternative in alternatives)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_repository_path_the_page_names_exists(page):
    missing = [path for path in repository_paths(page.read_text())
               if not path.startswith(NOT_IN_A_CLONE) and not exists_in_repository(path)]
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


def test_the_docs_index_lists_every_page():
    index = (REPO / "docs/README.md").read_text()
    unlisted = [page.name for page in PAGES[1:] if page.name != "README.md" and f"]({page.name})" not in index]
    assert not unlisted, f"add these to the table of docs/README.md: {unlisted}"


def test_the_path_check_sees_a_stale_path():
    assert repository_paths("see `config/config.schema.json`, `src/moe_compress/nothing.py` and `path/to/model`") \
        == ["config/config.schema.json", "src/moe_compress/nothing.py"]
    assert exists_in_repository("rules/<stage>.smk") and exists_in_repository("config/presets/*.yaml")
    assert not exists_in_repository("src/moe_compress/nothing.py")
