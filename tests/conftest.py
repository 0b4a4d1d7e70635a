"""Fixtures built on tests/helpers.py."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from moe_compress.workflow import set_openmp_waiting

set_openmp_waiting()  # before torch loads OpenMP: the suite's own threads wait as the workflow's jobs do

import torch  # noqa: E402

from helpers import DEVICES, make_tokenizer, model_cache_and_stats, run_tiny_dag, tiny_qwen3_moe  # noqa: E402

# `make test-fast` runs the tests parametrised over the architectures on this one; `make test` on all
FAST_ARCHITECTURE = "qwen3_moe"


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("model_type", FAST_ARCHITECTURE) != FAST_ARCHITECTURE:
            item.add_marker(pytest.mark.other_architectures)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist hands the first half of this order to one worker, the rest to the other, and a worker that
        # runs out takes over the tail of the other's: the Snakemake runs first (the shared tiny DAG's users
        # first of all, so it is built while the other worker runs unit tests), the short tests last, so that
        # neither worker ends with a long test while the other idles
        items.sort(key=lambda item: (0 if "tiny_dag" in item.fixturenames else 1 if item.get_closest_marker("slow")
                                     else 2))


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return tiny_qwen3_moe()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, tokenizer) -> Path:
    path = tmp_path / "tiny_model"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def prepared(tmp_path):
    """``prepared(model_type)``: a saved tiny model, its calibration cache and its statistics table."""
    return lambda model_type: model_cache_and_stats(model_type, tmp_path)


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 300, (6, 24), generator=generator)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache under tmp_path/hf_home, with the hub client switched off."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the client read these at import; point them at this cache for the test
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory) -> Path:
    """The TINY DAG run to its final table (helpers.run_tiny_dag), once for the whole session; under pytest-xdist
    once for all workers: the first to ask builds it, the others wait for it. Tests read it in place and never
    change it: one that runs Snakemake on it works on a copy (helpers.copy_of_run)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the base every worker's own folder is in
    workdir, failed = shared / "tiny_dag", shared / "tiny_dag.failed"
    with open(shared / "tiny_dag.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():  # another worker's build failed: the same failure, not a second wait for it
            pytest.fail(failed.read_text())
        if not (workdir / "results/final_table.csv").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            try:
                run_tiny_dag(workdir)
            except AssertionError as error:
                failed.write_text(str(error))
                raise
    return workdir
