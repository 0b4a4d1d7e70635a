"""Expert frequency table from the router cache."""

from moe_compress.capture import read_router_cache
from moe_compress.io import atomic_path
from moe_compress.stats import expert_frequency
from moe_compress.workflow import start_job

log = start_job(snakemake)
table = expert_frequency(read_router_cache(snakemake.input.router))
with atomic_path(snakemake.output.parquet) as tmp:
    table.to_parquet(tmp, index=False)
with atomic_path(snakemake.output.csv) as tmp:
    table.to_csv(tmp, index=False)
log.info("statistics for %d layers x %d experts", table["layer"].nunique(), table.groupby("layer").size().max())
