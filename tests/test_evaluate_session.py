"""One load of the model per evaluation job, and results remembered by what they were computed from."""

import numpy as np
import pytest

from helpers import REPO
from moe_compress.calibration import TokenSamples, write_samples
from moe_compress.evaluate.lm_eval import bundled_data_files, run_benchmark, tidy_results
from moe_compress.evaluate.perplexity import perplexity
from moe_compress.evaluate.session import EvaluationSession
from moe_compress.integrity import write_record
from moe_compress.modelio import load_model

DATA = REPO / "data/eval"
LM_EVAL = {"source": "bundled", "data_dir": str(DATA), "num_fewshot": 0, "limit": 2, "batch_size": 4,
           "backend": "hf", "seed": 0}
SPEED = {"num_prompts": 2, "prompt_tokens": 8, "decode_tokens": 3, "repeats": 3, "warmup": 0}


@pytest.fixture
def recorded_inputs(tmp_path, tiny_model_dir):
    """A checkpoint and a windows file as the workflow leaves them: each with its checksum record."""
    windows = tmp_path / "ppl_c4_heldout.parquet"
    write_samples(TokenSamples(np.random.default_rng(0).integers(0, 300, size=(4, 16)), "random tokens"), windows)
    for output in (tiny_model_dir, windows):
        write_record(output)
    return tiny_model_dir, windows


def evaluate_all(checkpoint, windows, memo_dir, tasks):
    session = EvaluationSession(checkpoint, dtype="float32", device="cpu", memo_dir=memo_dir)
    results = {"speed": session.speed(windows, **SPEED),
               "perplexity": session.perplexity("c4_heldout", windows, batch_size=2)}
    for task in tasks:
        results[task] = session.benchmark(task, inputs=bundled_data_files(task, DATA), **LM_EVAL)
    return session, results


@pytest.mark.slow
def test_one_load_serves_every_evaluation_and_a_rerun_computes_only_what_changed(tmp_path, recorded_inputs):
    """Speed, perplexity and a benchmark share one load of the model; a rerun reads back what it computed before
    and loads nothing when nothing changed; a task added is the only thing computed; every number is the one a
    measurement on its own load gives."""
    checkpoint, windows = recorded_inputs
    memo = tmp_path / "memo"
    session, first = evaluate_all(checkpoint, windows, memo, ["winogrande"])
    assert session.model_loads == 1 and session.reused == []
    assert sorted(session.computed) == ["lm_eval_winogrande", "perplexity_c4_heldout", "speed"]

    session, again = evaluate_all(checkpoint, windows, memo, [])  # a task removed: nothing to compute
    assert session.model_loads == 0 and sorted(session.reused) == ["perplexity_c4_heldout", "speed"]
    # read back, not measured again, in the order computed: the tables written from it keep their bytes
    assert list(again["speed"].items()) == list(first["speed"].items())
    assert list(again["perplexity"].items()) == list(first["perplexity"].items())

    session, added = evaluate_all(checkpoint, windows, memo, ["winogrande", "mmlu"])  # a task added
    assert session.model_loads == 1 and session.computed == ["lm_eval_mmlu"]
    assert added["winogrande"] == first["winogrande"]

    session = EvaluationSession(checkpoint, dtype="float32", device="cpu", memo_dir=memo)
    session.perplexity("c4_heldout", windows, batch_size=4)  # a changed setting
    assert session.computed == ["perplexity_c4_heldout"]

    # the same numbers as each measurement on its own load, lm-eval loading the checkpoint itself
    from moe_compress.calibration import read_samples

    assert first["perplexity"] == perplexity(load_model(checkpoint), read_samples(windows), 2)
    for task in ("mmlu", "winogrande"):
        separate = run_benchmark(checkpoint, task, work_dir=tmp_path / f"tasks_{task}", **LM_EVAL)
        assert tidy_results(added[task], 0).equals(tidy_results(separate, 0)), task


def test_a_rewritten_checkpoint_is_never_answered_from_the_memo(tmp_path, recorded_inputs):
    checkpoint, windows = recorded_inputs
    memo = tmp_path / "memo"
    session = EvaluationSession(checkpoint, dtype="float32", device="cpu", memo_dir=memo)
    before = session.perplexity("c4_heldout", windows, batch_size=2)

    from safetensors.torch import load_file, save_file

    weights_file = checkpoint / "model.safetensors"
    tensors = load_file(weights_file)
    name = next(key for key in tensors if key.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, weights_file, metadata={"format": "pt"})
    write_record(checkpoint)  # as the job that rewrote it would

    session = EvaluationSession(checkpoint, dtype="float32", device="cpu", memo_dir=memo)
    after = session.perplexity("c4_heldout", windows, batch_size=2)
    assert session.computed == ["perplexity_c4_heldout"] and after != before
    # a damaged memo entry is recomputed, not trusted
    for entry in memo.glob("perplexity_*.json"):
        entry.write_text(entry.read_text()[:20])
    session = EvaluationSession(checkpoint, dtype="float32", device="cpu", memo_dir=memo)
    assert session.perplexity("c4_heldout", windows, batch_size=2) == after
    assert session.reused == [] and session.computed == ["perplexity_c4_heldout"]
