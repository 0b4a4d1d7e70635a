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


def quality_vs_parameters(table: pd.DataFrame, path: str | Path) -> None:
    """Mean benchmark accuracy (where measured) and held-out C4 perplexity against parameters."""
    panels = [(column, label) for column, label in (("acc_mean", "mean benchmark accuracy"),
                                                    ("ppl_c4_heldout", "perplexity, held-out C4 (lower is better)"))
              if column in table.columns and table[column].notna().any()]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    families = table["method"].map(method_family)
    colours = plt.get_cmap("tab20")
    for axis, (column, label) in zip(axes[0], panels):
        for index, (family, rows) in enumerate(table.assign(family=families).groupby("family", sort=False)):
            rows = rows[rows[column].notna()]
            axis.scatter(rows["parameters"] / 1e6, rows[column], label=family, s=36, color=colours(index % 20),
                         marker="os^Dv"[index // 4 % 5])
            for row in rows.itertuples():
                axis.annotate(row.variant, (row.parameters / 1e6, getattr(row, column)), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("parameters (M)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95), title="method family")
    _save(figure, path)


def _heatmap(matrix: pd.DataFrame, title: str, colorbar: str, path: str | Path, fmt: str) -> None:
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * matrix.shape[1], 0.8 + 0.32 * matrix.shape[0]))
    image = axis.imshow(matrix.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    axis.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    axis.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
    axis.set_xlabel("layer")
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
