"""moe-compress: compress Mixture-of-Experts language models, one stage per module."""

__version__ = "0.1.0"
