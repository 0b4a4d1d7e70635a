"""A job's failure lands in its own log file (where Snakemake points users), not only in stderr."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import types
from moe_compress.errors import DataError
from moe_compress.workflow import start_job
from snakemake.iocontainers import Namedlist

job = types.SimpleNamespace(log=[{log!r}], threads=1, rule="sample_calibration", wildcards={{}}, input=Namedlist())
start_job(job)
{failure}
"""


TORCH_ERROR_IN_A_STEP = """
import torch
from moe_compress.methods import CompressionContext, step_errors
context = CompressionContext()
with step_errors("step 0 (hc_merge)", context):
    context.current_layer = 3
    torch.zeros(2) + torch.zeros(3)
"""


@pytest.mark.parametrize("failure, expected", [
    ('raise DataError("the corpus yields 5 tokens")', "ERROR: DataError: the corpus yields 5 tokens"),
    ('{}["missing"]', "KeyError: 'missing'"),
    (TORCH_ERROR_IN_A_STEP, "ERROR: ModelError: step 0 (hc_merge), MoE layer 3 failed: The size of tensor a"),
])
def test_an_uncaught_error_is_written_to_the_job_log(tmp_path, failure, expected):
    log = tmp_path / "job.log"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT.format(log=str(log), failure=failure)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    text = log.read_text()
    assert "hub " in text and expected in text
    if "DataError" in expected:  # our errors: the message alone, no traceback to dig through
        assert "Traceback" not in text
    else:  # a library error, or ours naming one: where it arose
        assert "Traceback" in text


def test_warnings_progress_bars_and_native_writes_reach_the_job_log(tmp_path):
    """Not only logging: what libraries print to stderr (warnings, progress bars, C code, child processes)."""
    log = tmp_path / "job.log"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT.format(log=str(log), failure="""
import os, subprocess, sys, warnings
warnings.warn("a library warning")
sys.stderr.write("progress 50%\\r")
os.write(2, b"written by native code\\n")
subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('from a child process')"], check=True)
""")))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    for expected in ("a library warning", "progress 50%", "written by native code", "from a child process"):
        assert expected in text


def test_jobs_wait_with_a_short_openmp_spin_unless_the_user_chose_how():
    """The Snakefile gives every job the short spin (docs/benchmarks.md, "Threads that wait"); a wait policy or a
    spin count already in the environment is the user's and is kept."""
    from moe_compress.workflow import OPENMP_SPIN_COUNT, set_openmp_waiting

    environment = {"PATH": "/usr/bin"}
    set_openmp_waiting(environment)
    assert environment == {"PATH": "/usr/bin", "GOMP_SPINCOUNT": OPENMP_SPIN_COUNT}
    for users in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "0"}):
        environment = dict(users)
        set_openmp_waiting(environment)
        assert environment == users
