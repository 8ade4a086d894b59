"""Figures of the tracing chapter: effect against k, k50 intervals, matrices, predicted against measured effects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from emolib.plots.style import GROUP_COLOURS


def effect_curves(effects: Mapping[str, pd.DataFrame], metric: str = "gap", ablation: str = "zero") -> Figure:
    """One panel per model (side by side), each small multiples of emotions (rows) x phases (columns): the drop
    when the top-k attributed features are ablated (solid, 95% band) against k random features (grey, dashed), and
    the whole phase (dotted line).

    `effects[model]` is `emolib.methods.ablation.summarize_effects` output for that model.
    """
    tables = {model: table[table["ablation"] == ablation] for model, table in effects.items()}
    shapes = {
        model: (list(dict.fromkeys(rows["emotion"])), list(dict.fromkeys(rows["phase"])))
        for model, rows in tables.items()
    }
    widths = [2.2 * len(phases) + 0.7 for _, phases in shapes.values()]
    height = max(1.3 * len(emotions) + 1.0 for emotions, _ in shapes.values())
    fig = plt.figure(figsize=(sum(widths), height))
    panels = fig.subfigures(1, len(tables), squeeze=False, width_ratios=widths)[0]
    column = f"drop_{metric}"
    for panel, (model, rows) in zip(panels, tables.items(), strict=True):
        emotions, phases = shapes[model]
        axes = panel.subplots(len(emotions), len(phases), sharex=True, sharey=True, squeeze=False)
        for r, emotion in enumerate(emotions):
            for c, phase in enumerate(phases):
                _effect_cell(
                    axes[r, c], rows[(rows["emotion"] == emotion) & (rows["phase"] == phase)], column
                )
                if r == 0:
                    axes[r, c].set_title(phase)
                if c == 0:
                    axes[r, c].set_ylabel(emotion)
        for ax in axes[-1]:
            ax.set_xlabel("k (features ablated)")
        panel.suptitle(model)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    return fig


def _effect_cell(ax, cell: pd.DataFrame, column: str) -> None:
    """One emotion in one phase: top-k and random-k curves with their bands, the whole-phase drop."""
    for condition, style_ in (("top", {"color": "#1f77b4"}), ("random", {"color": "0.5", "ls": "--"})):
        line = cell[cell["condition"] == condition].sort_values("k")
        ax.plot(line["k"], line[column], marker="o", ms=2.5, label=f"{condition} k", **style_)
        ax.fill_between(
            line["k"], line[f"{column}_low"], line[f"{column}_high"], alpha=0.2, color=style_["color"]
        )
    whole = cell[cell["condition"] == "whole"]
    if not whole.empty:
        ax.axhline(whole[column].iloc[0], color="#d62728", ls=":", lw=1.2, label="whole phase")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xscale("log", base=2)


def k50_intervals(k50: dict[str, pd.DataFrame], ks: Sequence[int], small_k: int | None = None) -> Figure:
    """k50 per emotion (y) and phase (marker colour) for each model (panels), with bootstrap intervals; an
    unreached k50 (inf) is drawn beyond the largest k, an undefined one (no whole-phase effect) is left out."""
    fig, axes = plt.subplots(1, len(k50), figsize=(5.2 * len(k50), 3.6), sharey=True, squeeze=False)
    beyond = 2 * max(ks)
    for ax, (model, table) in zip(axes[0], k50.items(), strict=True):
        emotions = list(dict.fromkeys(table["emotion"]))
        phases = list(dict.fromkeys(table["phase"]))
        step = 0.7 / max(1, len(phases))
        for p, phase in enumerate(phases):
            sub = table[(table["phase"] == phase) & table["k50"].notna()]
            y = np.array([emotions.index(e) for e in sub["emotion"]]) + (p - (len(phases) - 1) / 2) * step
            point = sub["k50"].replace(np.inf, beyond)
            low = sub["k50_low"].replace(np.inf, beyond)
            high = sub["k50_high"].replace(np.inf, beyond)
            ax.errorbar(point, y, xerr=[point - low, high - point], fmt="o", capsize=2, label=phase,
                        color=GROUP_COLOURS[p % len(GROUP_COLOURS)])  # fmt: skip
        ax.axvline(beyond, color="0.6", lw=0.8)
        ax.text(beyond, -0.9, "not\nreached", ha="center", va="bottom", fontsize=8, color="0.4")
        if small_k:
            ax.axvline(small_k, color="0.3", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yticks(range(len(emotions)), emotions)
        ax.set_ylim(-1, len(emotions))
        ax.invert_yaxis()
        ax.set_xlabel("k50 (top features for half the whole-phase drop)")
        ax.set_title(model)
    axes[0, -1].legend(loc="lower right", fontsize=8)
    return fig


def matrix_heatmap(
    matrices: dict[str, pd.DataFrame], xlabel: str, ylabel: str, cbar: str, centre: bool = True
) -> Figure:
    """One annotated heatmap per model of a labelled matrix (e.g. sources x targets); diverging around 0."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.0 * len(matrices), 4.4), squeeze=False)
    scale = max(float(np.nanmax(np.abs(m.to_numpy()))) for m in matrices.values()) or 1.0
    for ax, (model, matrix) in zip(axes[0], matrices.items(), strict=True):
        values = matrix.to_numpy(dtype=float)
        image = ax.imshow(values, cmap="RdBu_r" if centre else "viridis", vmin=-scale if centre else None,
                          vmax=scale if centre else None, aspect="auto")  # fmt: skip
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=45, ha="right")
        ax.set_yticks(range(matrix.shape[0]), matrix.index)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(model)
        ax.grid(False)
        fig.colorbar(image, ax=ax, label=cbar, shrink=0.8)
    return fig


def predicted_vs_measured(tables: dict[str, pd.DataFrame]) -> Figure:
    """Attribution-predicted vs measured gap drop of single-feature ablations, per model, coloured by phase."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.8 * len(tables), 4.0), squeeze=False)
    for ax, (model, table) in zip(axes[0], tables.items(), strict=True):
        for p, (phase, group) in enumerate(table.groupby("phase", sort=False)):
            ax.scatter(group["predicted"], group["measured"], s=10, alpha=0.6, label=phase,
                       color=GROUP_COLOURS[p % len(GROUP_COLOURS)])  # fmt: skip
        if len(table):
            lo = float(min(table["predicted"].min(), table["measured"].min()))
            hi = float(max(table["predicted"].max(), table["measured"].max()))
            ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("predicted drop (activation x gradient)")
        ax.set_ylabel("measured gap drop")
        ax.set_title(model)
        ax.legend(fontsize=8)
    return fig
