"""Report figures: written as real PNGs from a final table and compression records."""

import pandas as pd

from moe_compress import plots


def test_plots_are_written_for_every_variant(tmp_path):
    table = pd.DataFrame({"variant": ["base", "pruned", "merged"], "parameters": [100, 80, 80],
                          "method": ["none", "frequency_prune(keep=6)", "hc_merge(merges_per_layer=2) -> dtype(dtype=bfloat16)"],
                          "acc_mean": [0.5, 0.45, None], "ppl_c4_heldout": [10.0, 11.0, 12.0],
                          "retention_c4_heldout": [1.0, 0.91, 0.83], "retention_code_heldout": [1.0, 0.5, 0.97],
                          "retention_wikitext2": [1.0, 0.95, 0.9]})
    records = {"base": {"experts_per_layer": {"0": 8, "2": 8}, "step_reports": []},
               "pruned": {"experts_per_layer": {"0": 6, "2": 5},
                          "step_reports": [{"reconstruction_error": {"0": 0.1, "2": 0.2}}]},
               "merged": {"experts_per_layer": {"0": 6, "2": 6},
                          "step_reports": [{"reconstruction_error": {"0": 0.15, "2": 0.1}}]}}
    paths = {name: tmp_path / f"{name}.png" for name in ("quality", "experts", "reconstruction", "retention")}
    plots.quality_vs_parameters(table, paths["quality"])
    plots.experts_per_layer(records, paths["experts"])
    plots.reconstruction_error(records, paths["reconstruction"])
    plots.domain_retention(table, paths["retention"])
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert plots.method_family("hc_merge(merges_per_layer=2) -> dtype(dtype=bfloat16)") == "hc_merge + dtype"
    assert plots.method_family("none") == "base"
    # the quality plot draws the first calibration source's held-out perplexity, whichever source that is
    assert plots.primary_perplexity(table.rename(columns={"ppl_c4_heldout": "ppl_code_heldout"})) == "code_heldout"


def test_the_table_names_each_sources_domain_specific_experts():
    from moe_compress.final_table import domain_expert_notes

    experts = pd.DataFrame({"layer": [1, 3, 0], "expert": [7, 11, 2], "source": ["korean", "korean", "c4"],
                            "frequency_c4": [0.02, 0.04, 0.3], "frequency_korean": [0.62, 0.39, 0.2],
                            "specificity": [0.97, 0.9, 0.6], "domain_specific": [True, True, False]})
    (note,) = domain_expert_notes(experts)
    assert "- `c4`: none" in note
    assert "- `korean`: 2 experts: L1E7 (0.62, specificity 0.97), L3E11 (0.39, specificity 0.90)" in note
    # one source: nothing is specific to it
    assert domain_expert_notes(experts.drop(columns="frequency_korean")) == []


def test_mlflow_tracking_logs_one_run_per_variant(tmp_path):
    mlflow = __import__("pytest").importorskip("mlflow")
    from moe_compress.tracking import log_variants

    table = pd.DataFrame({"variant": ["base", "pruned"], "method": ["none", "frequency_prune(keep=6)"],
                          "parameters": [100, 80], "ppl_c4_heldout": [10.0, 11.5], "score": [0.5, float("nan")]})
    variants = {"base": [], "pruned": [{"method": "frequency_prune", "uniform": True, "keep": 6}]}
    uri = (tmp_path / "mlruns").as_uri()
    run_ids = log_variants(table, variants, uri, "test")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = {run.info.run_name: run for run in (client.get_run(run_id) for run_id in run_ids)}
    assert set(runs) == {"base", "pruned"}
    assert runs["pruned"].data.params["step0.keep"] == "6"
    assert runs["pruned"].data.metrics["ppl_c4_heldout"] == 11.5 and "score" not in runs["pruned"].data.metrics
