"""Glue shared by the thin scripts in workflow/scripts/: logging into the rule's log file, threads."""

from __future__ import annotations

import json
import logging
import sys

import torch


def start_job(snakemake) -> logging.Logger:
    """Send this job's logging (ours and the libraries') to its ``log:`` file; set torch's thread count."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        handlers=handlers, force=True)
    torch.set_num_threads(max(1, int(snakemake.threads)))
    logger = logging.getLogger(f"moe_compress.rule.{snakemake.rule}")
    logger.info("rule %s, wildcards %s, threads %s", snakemake.rule, dict(snakemake.wildcards), snakemake.threads)
    return logger


def json_param(snakemake, name: str):
    """Structured params travel as JSON strings so that Snakemake's change detection sees every value."""
    return json.loads(getattr(snakemake.params, name))
