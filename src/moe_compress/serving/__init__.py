"""Serving compressed checkpoints in an inference engine (vLLM): the vLLM plugin that serves per-layer expert
counts and widths (``vllm_plugin``), the engine-side check that a checkpoint loads and agrees with transformers
(``check``), and the serving report (``report``).

The modules that import vLLM run in the serving environment (``make setup-serve``: vLLM pins its own
transformers); the rest of the package never imports vLLM."""
