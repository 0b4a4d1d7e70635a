"""Download a hub model snapshot (a local rule: runs on the submit host, which has the network)."""

from huggingface_hub import snapshot_download

from moe_compress.io import atomic_directory
from moe_compress.workflow import start_job

log = start_job(snakemake)
with atomic_directory(snakemake.output[0]) as tmp:
    snapshot_download(repo_id=snakemake.params.repo_id, local_dir=tmp,
                      allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken"])
log.info("downloaded %s", snakemake.params.repo_id)
