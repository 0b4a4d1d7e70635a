"""Evaluation of checkpoints: perplexity (``perplexity``), lm-eval tasks (``lm_eval``) and speed (``speed``)."""
