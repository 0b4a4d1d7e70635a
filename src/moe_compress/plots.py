"""Figures for the report: quality vs size per method family, experts kept per layer, and per-layer
reconstruction error. Each function writes one PNG (atomically) from the final table / records."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from moe_compress.atomic import atomic_path  # noqa: E402


def method_family(method: str) -> str:
    """The final table's method description -> the family of its steps ("base" for none)."""
    if method == "none":
        return "base"
    return " + ".join(dict.fromkeys(step.split("(")[0].strip() for step in method.split("->")))


def _save(figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both axes (smaller x and smaller y are better),
    ordered by x."""
    order = np.lexsort((y, x))
    front, best = [], np.inf
    for index in order:
        if y[index] < best:
            front.append(index)
            best = y[index]
    return np.array(front, dtype=int)


def _series(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per sweep in table order: a sweep's variants together, single variants alone."""
    sweeps = table["sweep"] if "sweep" in table.columns else table["variant"]
    return [(name, table[sweeps == name]) for name in dict.fromkeys(sweeps)]


def primary_perplexity(table: pd.DataFrame) -> str:
    """The perplexity dataset the quality plot draws: the first calibration source's held-out documents."""
    return next(column.removeprefix("ppl_") for column in table.columns
                if column.startswith("ppl_") and column.endswith("_heldout"))


def quality_vs_parameters(table: pd.DataFrame, path: str | Path) -> None:
    """Quality against size, one line per sweep (a method family over its settings), single variants as
    points; a legend keyed by colour and marker instead of labels on the points.

    Panels: perplexity on the first calibration source's held-out documents (held-out C4 by default) as a
    ratio to the reference (the Pareto front over all variants dashed), the mean benchmark accuracy with each point's standard error and the reference's band
    (where benchmarks ran), and the perplexity ratio against the mean active experts per token (which
    separates routing changes that keep every parameter)."""
    table = table.copy()
    reference = table.iloc[0]
    primary = primary_perplexity(table)
    ratio = f"ppl_{primary}_ratio"
    if ratio not in table.columns:
        table[ratio] = table[f"ppl_{primary}"] / reference[f"ppl_{primary}"]
    table["params_m"] = table["parameters"] / 1e6
    where = f"held-out {primary.removesuffix('_heldout')}"
    panels = [("params_m", ratio, "parameters (M)", f"perplexity / reference, {where} (lower is better)")]
    if "acc_mean" in table.columns and table["acc_mean"].notna().any():
        panels.append(("params_m", "acc_mean", "parameters (M)", "mean benchmark accuracy (± standard error)"))
    if "active_experts" in table.columns and table["active_experts"].nunique() > 1:
        panels.append(("active_experts", ratio, "active experts per token (mean over layers)",
                       f"perplexity / reference, {where}"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    series = _series(table)
    colours = plt.get_cmap("tab20")
    markers = "os^Dv<>pXh"
    for axis, (x_column, y_column, x_label, y_label) in zip(axes[0], panels):
        rows_with = table[table[y_column].notna() & table[x_column].notna()]
        if y_column == ratio and len(rows_with) > 1:
            front = rows_with.iloc[pareto_front(rows_with[x_column].to_numpy(float),
                                                rows_with[y_column].to_numpy(float))]
            axis.plot(front[x_column], front[y_column], ls="--", color="black", lw=1, alpha=0.6, label="Pareto front",
                      zorder=1)
        if y_column == "acc_mean" and pd.notna(reference.get("acc_mean")):
            error = reference.get("acc_mean_stderr", np.nan)
            axis.axhline(reference["acc_mean"], color="grey", lw=1)
            if pd.notna(error):
                axis.axhspan(reference["acc_mean"] - error, reference["acc_mean"] + error, color="grey", alpha=0.15,
                             label="reference ± standard error")
        for index, (label, rows) in enumerate(series):
            rows = rows[rows[y_column].notna() & rows[x_column].notna()].sort_values(x_column)
            if rows.empty:
                continue
            style = dict(color=colours(index % 20), marker=markers[index // 20 % len(markers)], label=label)
            if y_column == "acc_mean" and "acc_mean_stderr" in rows.columns:
                axis.errorbar(rows[x_column], rows[y_column], yerr=rows["acc_mean_stderr"], capsize=2, ms=5,
                              lw=1 if len(rows) > 1 else 0, elinewidth=0.8, **style)
            else:
                axis.plot(rows[x_column], rows[y_column], ms=5, lw=1.2 if len(rows) > 1 else 0, **style)
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
    handles, labels = {}, []
    for axis in axes[0]:  # one legend entry per series over all panels
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    figure.legend([handles[label] for label in labels], labels, fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, 0.0), title="variant or sweep", ncol=min(len(labels), 2 * len(panels) + 1))
    _save(figure, path)


def _heatmap(matrix: pd.DataFrame, title: str, colorbar: str, path: str | Path, fmt: str,
             x_label: str = "layer") -> None:
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * matrix.shape[1], 0.8 + 0.32 * matrix.shape[0]))
    image = axis.imshow(matrix.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    axis.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    axis.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
    axis.set_xlabel(x_label)
    axis.set_title(title)
    for (i, j), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
        if not np.isnan(value):
            axis.text(j, i, format(value, fmt), ha="center", va="center", fontsize=6, color="white")
    figure.colorbar(image, ax=axis, label=colorbar)
    _save(figure, path)


def experts_per_layer(records: dict[str, dict], path: str | Path) -> None:
    matrix = pd.DataFrame({name: {int(layer): count for layer, count in record["experts_per_layer"].items()}
                           for name, record in records.items()}).T.sort_index(axis=1)
    _heatmap(matrix, "experts kept per MoE layer", "experts", path, ".0f")


def reconstruction_error(records: dict[str, dict], path: str | Path) -> None:
    """The error after each variant's last step, per layer (variants without cached measurements left out)."""
    rows = {}
    for name, record in records.items():
        reports = record.get("step_reports") or []
        errors = reports[-1].get("reconstruction_error", {}) if reports else {}
        if errors:
            rows[name] = {int(layer): error for layer, error in errors.items()}
    matrix = pd.DataFrame(rows).T.sort_index(axis=1) if rows else pd.DataFrame([[np.nan]], index=["(none)"])
    _heatmap(matrix, "MoE-block reconstruction error on held-out tokens", "relative error", path, ".2f")


def domain_retention(table: pd.DataFrame, path: str | Path) -> None:
    """Each variant's retention per perplexity dataset (each calibration source's held-out documents, then
    WikiText-2): the reference's perplexity over the variant's, 1 for no loss."""
    columns = [column for column in table.columns if column.startswith("retention_")]
    matrix = table.set_index("variant")[columns]
    matrix.columns = [column.removeprefix("retention_").removesuffix("_heldout") for column in columns]
    _heatmap(matrix, "retention per domain: reference perplexity / variant perplexity", "retention", path, ".2f",
             x_label="held-out text")
