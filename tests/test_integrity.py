"""Integrity of every workflow output: checksums recorded by the writer and checked by each reader, damaged
outputs removed so the next run rebuilds them, and outputs others can read (the umask's mode)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from helpers import copy_of_run, snakemake
from moe_compress.atomic import atomic_directory, atomic_path, current_umask, write_json
from moe_compress.integrity import DamagedOutput, record_path, verify_output, write_record


def damage_in_place(path: Path, offset: int) -> None:
    """Flip one byte, keeping the size and the modification time (what a bad disk or a stray write does)."""
    times = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def truncate_in_place(path: Path, keep: int) -> None:
    times = path.stat()
    path.write_bytes(path.read_bytes()[:keep])
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


def checkpoint_like(tmp_path: Path) -> Path:
    out = tmp_path / "checkpoints" / "v"
    with atomic_directory(out) as tmp:
        (tmp / "model-00001-of-00002.safetensors").write_bytes(bytes(range(256)) * 64)
        (tmp / "model-00002-of-00002.safetensors").write_bytes(bytes(range(255, -1, -1)) * 64)
        (tmp / "compression.json").write_text('{"variant": "v"}\n')
        (tmp / "tables").mkdir()
        (tmp / "tables" / "clusters.csv").write_text("layer,expert\n0,1\n")
    write_record(out)
    return out


def test_an_untouched_output_passes_and_its_record_lists_every_file(tmp_path):
    out = checkpoint_like(tmp_path)
    verify_output(out)
    verify_output(out, read=["compression.json"])
    (out / ".snakemake_timestamp").touch()  # what Snakemake adds to a directory output after the job
    verify_output(out)
    table = tmp_path / "stats.csv"
    table.write_text("a,b\n1,2\n")
    write_record(table)
    verify_output(table)
    assert record_path(table).name == ".stats.csv.checksums.json"


@pytest.mark.parametrize("damage, problem", [
    (lambda out: damage_in_place(out / "model-00002-of-00002.safetensors", 5000),
     r"model-00002-of-00002.safetensors has changed on disk since it was written \(CRC-32 [0-9a-f]{8}, recorded"),
    (lambda out: truncate_in_place(out / "model-00001-of-00002.safetensors", 1000),
     r"model-00001-of-00002.safetensors has 1000 bytes, 16384 when it was written \(truncated or replaced\)"),
    (lambda out: (out / "tables" / "clusters.csv").unlink(), r"tables/clusters.csv is missing"),
    (lambda out: record_path(out).write_text("{"), r"checksum record .* is unreadable"),
], ids=["bit flip", "truncated shard", "deleted file", "broken record"])
def test_a_damaged_directory_output_is_named_and_removed_so_the_next_run_rebuilds_it(tmp_path, damage, problem):
    out = checkpoint_like(tmp_path)
    damage(out)
    with pytest.raises(DamagedOutput, match=rf"{out} is not the output its job wrote: .*{problem}.*It was removed, "
                                            r"so running the workflow again rebuilds it"):
        verify_output(out)
    assert not out.exists() and not record_path(out).exists()


def test_an_output_without_a_record_is_recorded_as_it_is_with_a_warning_then_checked(tmp_path, caplog):
    out = checkpoint_like(tmp_path)
    record_path(out).unlink()  # as an older moe-compress left it: complete, as every output is moved in whole
    verify_output(out)
    assert "has no checksum record" in caplog.text and record_path(out).is_file()
    damage_in_place(out / "compression.json", 3)
    with pytest.raises(DamagedOutput, match="compression.json has changed on disk"):
        verify_output(out)


def test_a_partial_reader_checksums_what_it_reads_and_sizes_the_rest(tmp_path):
    out = checkpoint_like(tmp_path)
    damage_in_place(out / "model-00001-of-00002.safetensors", 10)
    verify_output(out, read=["compression.json"])  # the table job reads only the record: not its concern
    damage_in_place(out / "compression.json", 3)
    with pytest.raises(DamagedOutput, match="compression.json has changed on disk"):
        verify_output(out, read=["compression.json"])

    out = checkpoint_like(tmp_path)
    truncate_in_place(out / "model-00001-of-00002.safetensors", 10)
    with pytest.raises(DamagedOutput, match="has 10 bytes"):
        verify_output(out, read=[])  # a reader that checks contents itself (the cache) still gets sizes


def test_a_damaged_file_output_is_named_and_removed(tmp_path):
    table = tmp_path / "expert_frequency.parquet"
    table.write_bytes(b"PAR1" + bytes(2000) + b"PAR1")
    write_record(table)
    truncate_in_place(table, 1500)
    with pytest.raises(DamagedOutput, match="expert_frequency.parquet has 1500 bytes, 2008 when it was written"):
        verify_output(table)
    assert not table.exists() and not record_path(table).exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_of_the_umask_not_owner_only(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json({"a": 1}, tmp_path / "record.json")
        with atomic_path(tmp_path / "table.csv") as tmp:
            tmp.write_text("a\n1\n")
        with atomic_directory(tmp_path / "checkpoint") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            (tmp / "tables").mkdir(mode=0o700)
            (tmp / "tables" / "written_owner_only.csv").write_text("a\n")
            (tmp / "tables" / "written_owner_only.csv").chmod(0o600)  # as a library writing via mkstemp leaves it
        write_record(tmp_path / "checkpoint")
    finally:
        os.umask(previous)
    for name in ("record.json", "table.csv", "checkpoint/model.safetensors", "checkpoint/tables/written_owner_only.csv",
                 ".checkpoint.checksums.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    for name in ("checkpoint", "checkpoint/tables"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o777 & ~umask, name


# ---- the workflow: a reader finds the damage, the next run rebuilds exactly what was there ---------------

CHECKPOINT = "results/checkpoints/uniform4"
PERPLEXITY = "results/eval/uniform4/perplexity.csv"
STATS = "results/stats/expert_frequency.parquet"


@pytest.mark.slow  # Snakemake runs
def test_damaged_checkpoints_and_tables_are_found_by_their_readers_and_rebuilt(tiny_dag, tmp_path):
    """On a copy of the session's tiny DAG, run under umask 022 (helpers.run_tiny_dag)."""
    # a colleague's account (or a model server) can read what the workflow wrote
    assert stat.S_IMODE((tiny_dag / CHECKPOINT).stat().st_mode) == 0o755
    shards = sorted((tiny_dag / CHECKPOINT).glob("*.safetensors"))
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o644 for path in [*shards, tiny_dag / STATS, tiny_dag / PERPLEXITY])
    copy_of_run(tiny_dag, tmp_path)
    configfile = tmp_path / "config.yaml"
    shards = sorted((tmp_path / CHECKPOINT).glob("*.safetensors"))
    written = {path: path.read_bytes() for path in [*shards, tmp_path / STATS, tmp_path / PERPLEXITY]}

    # bits flipped inside the weights, size and time kept: Snakemake sees nothing; the next reader does
    damage_in_place(shards[0], shards[0].stat().st_size // 2)
    (tmp_path / PERPLEXITY).unlink()
    result = snakemake(tmp_path, configfile, PERPLEXITY)
    assert result.returncode != 0
    log = (tmp_path / "results/logs/evaluate/uniform4.log").read_text()
    assert f"{shards[0].name} has changed on disk since it was written" in log, log[-3000:]
    assert not (tmp_path / CHECKPOINT).exists()
    result = snakemake(tmp_path, configfile, PERPLEXITY)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule compress:" in result.stdout + result.stderr

    # a truncated statistics table: the compress job names it; the next run rebuilds the statistics
    truncate_in_place(tmp_path / STATS, 100)
    result = snakemake(tmp_path, configfile, "--forcerun", "compress", PERPLEXITY)
    assert result.returncode != 0
    # every compress job is forced; whichever runs first names the table (and the run stops there)
    logs = [path.read_text() for path in (tmp_path / "results/logs/compress").glob("*.log")]
    assert any("expert_frequency.parquet has 100 bytes" in log for log in logs), result.stderr[-3000:]
    # (the failed forced job took its checkpoint with it; perplexity.csv, made from the sound one, stands)
    result = snakemake(tmp_path, configfile, STATS, CHECKPOINT, PERPLEXITY)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rule expert_stats:" in result.stdout + result.stderr
    assert {path: path.read_bytes() for path in written} == written  # rebuilt to the same bytes
