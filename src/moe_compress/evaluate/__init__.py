"""Evaluation of checkpoints: perplexity (and, later, benchmarks and speed)."""
