"""Figures of the features chapter: UpSet overlaps, Jaccard heatmaps, counts against the null, diffuseness, co-activation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure, SubFigure

from emolib.plots.style import annotated_heatmap, errors, model_panels


def upset_figure(
    table: pd.DataFrame, top_n: int = 15, title: str | None = None, figure: Figure | SubFigure | None = None
) -> Figure | SubFigure:
    """UpSet-style figure of `intersections(...)`: bars of the `top_n` largest combinations over a dot matrix
    (a filled dot per emotion in the combination); rows are labelled with each emotion's set size.

    Draws into `figure` (e.g. one of `Figure.subfigures`, as `upset_grid` does) when given, else a new figure."""
    emotions = list(table.attrs.get("emotions") or dict.fromkeys(e for c in table["emotions"] for e in c))
    sizes = table.attrs.get("set_sizes", {})
    shown = table.head(top_n)
    n = max(len(shown), 1)
    layout = {"sharex": True, "gridspec_kw": {"height_ratios": [2.2, 0.25 * len(emotions) + 0.3]}}
    if figure is None:
        fig, (bars, dots) = plt.subplots(
            2, 1, figsize=(max(5.5, 0.45 * n + 2.0), 2.8 + 0.28 * len(emotions)), **layout
        )
    else:
        fig = figure
        bars, dots = fig.subplots(2, 1, **layout)
    x = np.arange(len(shown))
    bars.bar(x, shown["n_features"], color="#444444", width=0.6)
    for xi, value in zip(x, shown["n_features"], strict=True):
        bars.text(xi, value, str(value), ha="center", va="bottom", fontsize=7)
    bars.set_ylabel("features")
    bars.grid(axis="x", visible=False)
    omitted = len(table) - len(shown)
    heading = title or "Features by exact combination of emotions"
    bars.set_title(heading + (f"\n(top {len(shown)} of {len(table)} combinations)" if omitted > 0 else ""))
    for xi, combo in zip(x, shown["emotions"], strict=True):
        rows = [emotions.index(e) for e in combo]
        dots.scatter([xi] * len(emotions), range(len(emotions)), s=30, color="#dddddd", zorder=1)
        dots.scatter([xi] * len(rows), rows, s=30, color="#222222", zorder=3)
        if len(rows) > 1:
            dots.plot([xi, xi], [min(rows), max(rows)], color="#222222", linewidth=1.5, zorder=2)
    dots.set_yticks(range(len(emotions)), [f"{e} ({sizes[e]})" if e in sizes else e for e in emotions])
    dots.set_ylim(len(emotions) - 0.5, -0.5)
    dots.set_xticks(x, [""] * len(x))
    dots.tick_params(axis="x", length=0)
    dots.set_xlim(-0.6, n - 0.4)
    dots.grid(False)
    for side in ("top", "right", "bottom"):
        dots.spines[side].set_visible(False)
    return fig


def upset_grid(tables: Mapping[str, pd.DataFrame], top_n: int = 12) -> Figure:
    """`upset_figure` of each model's `intersections(...)`, stacked in one figure (one caption, one image)."""
    if not tables:
        raise ValueError("no tables to draw")
    heights = []
    for table in tables.values():
        n_emotions = len(table.attrs.get("emotions") or ())
        heights.append(2.8 + 0.28 * max(n_emotions, 1))
    widest = max(min(len(t), top_n) for t in tables.values())
    fig = plt.figure(figsize=(max(6.0, 0.45 * widest + 2.5), sum(heights)))
    subfigures = fig.subfigures(len(tables), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, (name, table) in zip(subfigures, tables.items(), strict=True):
        upset_figure(table, top_n=top_n, title=name, figure=sub)
    return fig


def jaccard_figure(frames: Mapping[str, pd.DataFrame]) -> Figure:
    """Jaccard overlap of the emotions' selective sets (`jaccard(...)`), one heatmap per model; the diagonal is
    blanked (always 1) and the colour scale runs to the largest off-diagonal value."""
    fig, axes = model_panels(len(frames), 3.6, 3.4)
    for ax, (name, frame) in zip(axes, frames.items(), strict=True):
        values = frame.to_numpy(dtype=float).copy()
        np.fill_diagonal(values, np.nan)
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        image = annotated_heatmap(ax, values, list(frame.index), max(top, 1e-6), ".2f", "Purples")
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7, label="Jaccard")
    return fig


def counts_figure(tables: Mapping[str, pd.DataFrame], nulls: Mapping[str, pd.DataFrame]) -> Figure:
    """Specific and shared features per emotion with bootstrap intervals (bars), each beside the 95th percentile
    of the same count on shuffled labels (black ticks). `tables[model]` is a `shared_specific(sel, draws)` table,
    `nulls[model]` its `NullSharedSpecific.summary(..., criterion)` by the draws' criterion."""
    fig, axes = model_panels(len(tables), 5.2, 3.2)
    styles = {"n_specific": ("specific", "#4c72b0"), "n_shared": ("shared", "#dd8452")}
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        emotions = [e for e in table.index if e != "any"]
        x = np.arange(len(emotions))
        for k, (measure, (label, colour)) in enumerate(styles.items()):
            rows = table.loc[emotions]
            xs = x + (k - 0.5) * 0.38
            ax.bar(
                xs,
                rows[measure],
                0.36,
                yerr=errors(rows[measure], rows[f"{measure}_low"], rows[f"{measure}_high"]),
                capsize=2,
                color=colour,
                label=label,
                alpha=0.85,
            )
            q95 = nulls[name].loc[emotions, (measure, "null_q95")]
            ax.scatter(
                xs, q95, marker="_", s=160, color="black", zorder=3, label=None if k else "null 95th pct"
            )
        ax.set_xticks(x, emotions, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("features")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def layer_counts_figure(frames: Mapping[str, pd.DataFrame], phases: Mapping[str, tuple[int, int]]) -> Figure:
    """Selective features per layer (each layer's SAE on its own): any, specific and shared counts beside the
    shuffled-label null of the `any` count (mean and 95th percentile); the final phase is shaded.

    `frames[model]` has columns layer, any, specific, shared, null_mean, null_q95."""
    fig, axes = model_panels(len(frames), 4.6, 3.0)
    for ax, (name, frame) in zip(axes, frames.items(), strict=True):
        first, last = phases[name]
        ax.axvspan(first - 0.5, last + 0.5, color="#2ca02c", alpha=0.1, lw=0, label="final phase")
        for column, colour in (("any", "black"), ("specific", "#4c72b0"), ("shared", "#dd8452")):
            ax.plot(frame["layer"], frame[column], "o-", ms=3, color=colour, label=column)
        ax.fill_between(frame["layer"], 0, frame["null_q95"], color="grey", alpha=0.25, lw=0,
                        label="null (any), 95th pct")  # fmt: skip
        ax.set_xlabel("layer")
        ax.set_ylabel("selective features")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    return fig


def diffuseness_figure(
    frames: Mapping[str, pd.DataFrame],
    measures: Sequence[str] = ("k50", "k80", "entropy"),
    highlight: str = "disgust",
) -> Figure:
    """Each emotion's diffuseness (`diffuseness(sel, draws)`) with bootstrap intervals: one row of panels per
    model, one column per measure; `highlight` is drawn in red."""
    n_rows, n_cols = len(frames), len(measures)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for r, (name, frame) in enumerate(frames.items()):
        emotions = list(frame.index)
        for c, measure in enumerate(measures):
            ax = axes[r][c]
            for i, e in enumerate(emotions):
                value = frame.loc[e, measure]
                low, high = frame.loc[e, f"{measure}_low"], frame.loc[e, f"{measure}_high"]
                colour = "#d62728" if e == highlight else "#444444"
                ax.errorbar(i, value, yerr=errors([value], [low], [high]), fmt="o", capsize=3, color=colour)
            ax.set_xticks(range(len(emotions)), [e[:5] for e in emotions], rotation=90, fontsize=8)
            ax.set_title(f"{name}: {measure}" if n_cols > 1 else name, fontsize=8)
    return fig


def coactivation_figure(
    matrices: Mapping[str, pd.DataFrame], missing: str = "no co-activation was measured"
) -> Figure:
    """Held-out co-activation matrices (`HeldOutCoactivation.matrix`: rows features of, columns items of), one
    heatmap per model; rows without features are blank. Without any matrix, a figure that says `missing`."""
    if not matrices:
        fig, ax = plt.subplots(figsize=(5, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, missing, ha="center")
        return fig
    fig, axes = model_panels(len(matrices), 3.8, 3.5)
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=True):
        values = matrix.to_numpy(dtype=float)
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        image = annotated_heatmap(ax, values, list(matrix.index), max(top, 1.0), ".2f", "Oranges")
        ax.set_ylabel("features of")
        ax.set_xlabel("items of")
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7, label="mean on column / mean on row emotion")
    return fig
