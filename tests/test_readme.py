"""Every command the README shows works as written: Snakemake parses it the way the README means it (a
target is a target, not a config file), what it names exists, and the commands for the user's own model and
for the cluster run from the root of a clone, where the user stands, with the demo's config/config.yaml there."""

from __future__ import annotations

import re
import shlex
import subprocess

import pandas as pd
import pytest
import yaml
from snakemake.cli import get_argument_parser

from helpers import REPO, make_tokenizer, offline_environment, planned_jobs, tiny_model_of, user_clone, write_config
from moe_compress.config import read_config_file, validate_config

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


def readme_config(first_line: str = f"# {PLACEHOLDER_CONFIG}") -> dict:
    """The README's ```yaml block that starts with ``first_line``: the minimal config it shows."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"the README shows no single ```yaml block starting with {first_line!r}"
    return yaml.safe_load(found[0])


def run_in(clone, command: str, *extra: str, env=None) -> subprocess.CompletedProcess:
    """A README command line, run from the clone's root as written (+ ``extra`` arguments)."""
    return subprocess.run([*shlex.split(command), *extra], cwd=clone, capture_output=True, text=True, timeout=1200,
                          env=env or offline_environment(), check=False)


# what the test changes of the README's config to run in a minute: sizes only, for the tiny model and CI
FAST = {"calibration": {"num_samples": 16, "seq_len": 32, "heldout_docs": 50},
        "cache": {"batch_size": 8},
        "perplexity": {"seq_len": 32, "batch_size": 8, "max_windows": 8},
        "speed": {"num_prompts": 2, "prompt_tokens": 16, "decode_tokens": 4, "repeats": 3, "warmup": 0}}


@pytest.mark.slow  # a whole Snakemake run on a tiny local model, from a clone's root
def test_the_own_model_command_runs_exactly_the_variants_of_the_users_config(tmp_path):
    """"Your own model" as a user does it: a clone with its demo config/config.yaml in place, the README's
    minimal config pointing at a local checkpoint, the README's command. Exactly the user's variants are
    planned and reach the final table; the demo's are not merged in. The checkpoint is a tiny Hunyuan with the
    release's per-layer fields (``moe_topk``, ``moe_intermediate_size``, ``num_shared_expert`` lists), its top-k
    different per layer: the whole DAG runs on what Hunyuan-A13B's config.json holds."""
    commands = [command for command in readme_commands() if PLACEHOLDER_CONFIG in shlex.split(command)]
    assert commands, f"the README shows no command with --configfile {PLACEHOLDER_CONFIG}"
    clone = user_clone(tmp_path / "moe-compress")
    assert (clone / "config/config.yaml").is_file()
    model_dir = tmp_path / "my-moe"
    tiny_model_of("hunyuan_v1_moe", moe_topk=[2, 1, 2]).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    config = readme_config()
    variants = list(config["variants"])
    assert len(variants) == 2 and config["variants"]["base"] == {"steps": []}
    config["model"].update(path=str(model_dir), device="cpu", dtype="float32")  # this machine's: CI has no GPU
    config.update({section: {**config.get(section, {}), **values} for section, values in FAST.items()})
    write_config(clone / PLACEHOLDER_CONFIG, config)

    result = run_in(clone, commands[0])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert (f"moe-compress: config from {PLACEHOLDER_CONFIG}; config/config.yaml (the demo) is not read, keys not "
            "set take the schema's defaults") in output
    jobs = planned_jobs(output)
    for rule in ("compress", "evaluate"):
        assert sorted(name for job, name in jobs if job == rule) == sorted(variants), rule
    table = pd.read_csv(clone / "results/final_table.csv").set_index("variant")
    assert sorted(table.index) == sorted(variants)
    assert table["parameters"].min() < table.loc["base", "parameters"]  # the other variant did compress
    for command in commands[1:]:  # the README's other lines with the user's config: nothing left to do
        result = run_in(clone, command, "-n")
        assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr, command


@pytest.mark.slow  # a Snakemake dry run from a clone's root, through the Slurm executor plugin
def test_the_slurm_line_plans_the_demo_from_a_clone(tmp_path):
    """``snakemake --profile profiles/slurm`` as the README shows it, without a --configfile: the demo's config.
    A dry run needs no cluster."""
    commands = [command for command in readme_commands() if shlex.split(command)[-2:] == ["--profile",
                                                                                          "profiles/slurm"]]
    assert commands, "the README shows no `snakemake --profile profiles/slurm` line"
    clone = user_clone(tmp_path / "moe-compress")
    result = run_in(clone, commands[0], "-n")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "moe-compress: config from config/config.yaml (the demo)" in output
    demo = validate_config(read_config_file(clone / "config/config.yaml"))
    assert {name for job, name in planned_jobs(output) if job == "compress"} == set(demo["variants"])
