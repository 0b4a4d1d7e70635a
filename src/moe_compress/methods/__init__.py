"""Compression methods. A method is a record (``registry.Method``) whose ``apply(model, step, context)``
edits the in-memory model and returns a per-step report; a variant applies its steps in order
(``runner.apply_steps``). Methods know nothing of Snakemake or file paths."""

import importlib

from moe_compress.methods.registry import Method, ModelShape, Problem, method, methods, whole_model_reason

# imported when first used, not with the package: the config check imports the registry, and a job that only
# reads the config (the final table) needs neither torch nor pandas
_LAZY = {"CompressionContext": "context", "apply_steps": "runner", "merge_layer_reports": "runner",
         "step_errors": "runner"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CompressionContext", "Method", "ModelShape", "Problem", "apply_steps", "merge_layer_reports", "method",
           "methods", "step_errors", "whole_model_reason"]
