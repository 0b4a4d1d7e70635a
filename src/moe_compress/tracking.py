"""Optional experiment tracking: each variant's steps and final-table metrics as one MLflow run.

Off unless ``tracking.mlflow_uri`` is set; a local ``file:`` store works offline. MLflow is imported
only here, so the pipeline does not need it otherwise (install it with ``pip install -e .[tracking]``).
"""

from __future__ import annotations

import math
import os

import pandas as pd

from moe_compress.errors import ConfigError


def flat_params(steps: list[dict]) -> dict[str, str]:
    """{"step0.method": "frequency_prune", "step0.keep": "12", ...} (MLflow params are strings)."""
    return {f"step{index}.{key}": str(value) for index, step in enumerate(steps) for key, value in step.items()}


def log_variants(table: pd.DataFrame, variants: dict[str, list[dict]], uri: str, experiment: str) -> list[str]:
    """One run per variant (named after it) with its steps as params and its numeric columns as metrics."""
    if uri.startswith("file:"):  # MLflow 3 refuses file stores unless asked; offline use is the point here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        import mlflow
    except ImportError:
        raise ConfigError("config key 'tracking.mlflow_uri' is set but MLflow is not installed "
                          "(pip install -e .[tracking])") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    run_ids = []
    for row in table.to_dict(orient="records"):
        name = row["variant"]
        metrics = {key: float(value) for key, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_params({"variant": name, "method": row.get("method", ""), **flat_params(variants[name])})
            mlflow.log_metrics(metrics)
            run_ids.append(run.info.run_id)
    return run_ids
