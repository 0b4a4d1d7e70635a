"""The conda environments pin the same versions as pyproject.toml and requirements.lock."""

import re
import tomllib

import yaml

from conftest import REPO


def pins(requirements) -> dict[str, str]:
    """{normalised name: version} of every `name[extras]==version` line."""
    found = {}
    for line in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;#]+).*", str(line))
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found


def test_conda_env_pins_agree_with_pyproject_and_the_lock():
    project = pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    lock = pins((REPO / "requirements.lock").read_text().splitlines())
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        spec = yaml.safe_load(env_file.read_text())
        pip_lines = next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict) and "pip" in item)
        env = pins(pip_lines)
        assert env, env_file
        for name, version in env.items():
            assert project.get(name) == version, f"{env_file.name}: {name}=={version}, pyproject: {project.get(name)}"
            if name != "torch":  # the lock leaves torch to the Makefile's own pinned line
                assert lock.get(name) == version, f"{env_file.name}: {name}=={version}, lock: {lock.get(name)}"
    for name, version in project.items():  # and pyproject agrees with the lock
        if name != "torch":
            assert lock.get(name) == version, f"pyproject: {name}=={version}, lock: {lock.get(name)}"
