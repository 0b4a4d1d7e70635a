"""Compression methods. A method is a record (``registry.Method``) whose ``apply(model, step, context)``
edits the in-memory model and returns a per-step report; a variant applies its steps in order
(``runner.apply_steps``). Methods know nothing of Snakemake or file paths."""

from moe_compress.methods.context import CompressionContext
from moe_compress.methods.registry import Method, ModelShape, Problem, method, methods, whole_model_reason
from moe_compress.methods.runner import apply_steps, merge_layer_reports, step_errors

__all__ = ["CompressionContext", "Method", "ModelShape", "Problem", "apply_steps", "merge_layer_reports", "method",
           "methods", "step_errors", "whole_model_reason"]
