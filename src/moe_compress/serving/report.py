"""The serving report of one variant (``results/serving/<variant>.json``) and what the final table shows of it.

Which engines load the checkpoint, and of those which serve it as the pipeline's transformers runs it (greedy
continuations equal, log-probabilities within ``agreement.LOGPROB_TOLERANCE``): ``serves_in``. The pipeline's
own transformers always does (it computed the reference). No torch, no vLLM: the final table reads this."""

from __future__ import annotations

import json
from pathlib import Path

from moe_compress.errors import DataError

PIPELINE_ENGINE = "transformers"


def engine_label(engine: dict) -> str:
    """``vllm`` or ``transformers-5.19.0`` (the serving environment's transformers, by its release)."""
    return engine["engine"] if "version" not in engine else f"{engine['engine']}-{engine['version']}"


def serving_report(variant: str, record: dict, reference: dict, result: dict) -> dict:
    """The report: the pipeline's transformers (the reference), then each engine of ``result``
    (``engine_job.run``), whether it loads, agrees and serves, its message where it refused, its speed."""
    engines = [{"engine": PIPELINE_ENGINE, "version": reference["transformers"], "loads": True, "serves": True,
                "reference": True}]
    for engine in result["engines"]:
        agreement = engine.get("agreement") or {}
        engines.append({**{key: value for key, value in engine.items() if key != "agreement"},
                        "agreement": {key: value for key, value in agreement.items() if key != "per_prompt"} or None,
                        "per_prompt": agreement.get("per_prompt"),
                        "serves": bool(engine["loads"] and not engine.get("error") and agreement.get("agrees"))})
    serves_in = [engine_label(engine) for engine in engines if engine["serves"]]
    unserved = {engine_label(engine): engine.get("error") or "loads, but its continuations disagree with the reference"
                for engine in engines if not engine["serves"]}
    return {"variant": variant, "loader": record["loader"], "architecture": record.get("architecture"),
            "versions": result.get("versions", {}), "engines": engines, "serves_in": serves_in,
            "not_served_by": unserved}


def read_serving_report(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"serving report {path}: {error}; rerun the serving job") from None
    if "serves_in" not in report or "engines" not in report:
        raise DataError(f"serving report {path}: no serves_in or engines; rerun the serving job")
    return report


def vllm_engine(report: dict) -> dict | None:
    return next((engine for engine in report["engines"] if engine["engine"] == "vllm"), None)


def table_columns(report: dict) -> dict:
    """The final table's serving columns of one variant: where it is served, and vLLM's agreement and speed."""
    columns = {"serves_in": " ".join(report["serves_in"])}
    engine = vllm_engine(report)
    if engine is None:
        return columns
    agreement = engine.get("agreement") or {}
    speed = engine.get("speed") or {}
    columns.update({"vllm_max_logprob_diff": agreement.get("max_logprob_difference"),
                    "vllm_prefill_tok_s": speed.get("prefill_tokens_per_s"),
                    "vllm_decode_tok_s": speed.get("decode_tokens_per_s"),
                    "vllm_ttft_ms": speed["ttft_s"] * 1000 if "ttft_s" in speed else None})
    return columns


def not_served_lines(reports: dict[str, dict]) -> list[str]:
    """One line per variant and engine that does not serve it, with the engine's message."""
    return [f"`{variant}` is not served by {engine}: {why}"
            for variant, report in reports.items() for engine, why in report["not_served_by"].items()]
