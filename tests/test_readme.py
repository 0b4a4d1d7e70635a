"""Every command the README shows works as written: Snakemake parses it the way the README means it (a
target is a target, not a config file), what it names exists, and the real-model command plans the
workflow (on a tiny config standing in for the user's)."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess

import pytest
from snakemake.cli import get_argument_parser

from helpers import REPO, SNAKEMAKE, TINY, write_config

README = REPO / "README.md"
PLACEHOLDER_CONFIG = "my_config.yaml"  # the README's stand-in for the user's config file


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks (comments and continuation lines joined)."""
    commands, in_block = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh")
            continue
        if in_block:
            command = line.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def snakemake_commands() -> list[list[str]]:
    return [shlex.split(command)[1:] for command in readme_commands()
            if shlex.split(command)[0] in ("snakemake", ".venv/bin/snakemake")]


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))


def test_the_readme_shows_commands_at_all():
    assert len(snakemake_commands()) >= 5
    assert {"demo", "test"} <= {shlex.split(c)[1] for c in readme_commands() if c.startswith("make ")}


@pytest.mark.parametrize("args", snakemake_commands(), ids=shlex.join)
def test_each_snakemake_command_means_what_the_readme_says(args):
    parsed = get_argument_parser().parse_args(args)
    for configfile in parsed.configfile or []:
        # --configfile takes several files: a target written after it would be read as a config file
        assert str(configfile).endswith((".yaml", ".yml", ".json")), f"{shlex.join(args)}: {configfile} is taken " \
                                                                      f"as a config file"
        assert configfile.name == PLACEHOLDER_CONFIG or (REPO / configfile).is_file()
    for profile in [parsed.profile] if isinstance(parsed.profile, str) else parsed.profile or []:
        assert (REPO / profile / "config.yaml").is_file(), profile
    for target in parsed.targets or []:
        assert target.startswith("results/"), f"{target}: not an output of the workflow"


def test_each_make_and_python_command_names_something_that_exists():
    for command in readme_commands():
        words = shlex.split(command)
        if words[0] == "make":
            assert words[1] in make_targets(), command
        elif words[0] == ".venv/bin/python" and words[1].startswith("bench/"):
            assert list((REPO / "bench").glob("*.py")), command


@pytest.mark.slow  # a Snakemake dry run
def test_the_real_model_command_plans_the_workflow(tmp_path):
    """The commands of "Pointing it at a real model", with a tiny config in place of the user's."""
    commands = [args for args in snakemake_commands() if PLACEHOLDER_CONFIG in args]
    assert commands
    config = write_config(tmp_path / PLACEHOLDER_CONFIG, {**copy.deepcopy(TINY), "evaluation": {"tasks": []}})
    for args in commands:
        args = [str(config) if arg == PLACEHOLDER_CONFIG else arg for arg in args]
        result = subprocess.run([str(SNAKEMAKE), *args, "--snakefile", str(REPO / "Snakefile"), "--directory",
                                 str(tmp_path), "-n"], capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "rule final_table:" in result.stdout + result.stderr
