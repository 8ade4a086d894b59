"""Figures of the baselines chapter: metrics with intervals, confusion matrices, per-emotion F1, label order."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from emolib.plots.style import colour


def metric_intervals(
    table: pd.DataFrame, metric: str, chance: str | None = "chance", title: str | None = None
) -> Figure:
    """Point and 95% interval of `metric` per dataset (rows) and model (colours), with chance as a grey tick.

    `table` has columns model, dataset, `metric`, `metric_low`, `metric_high` (and `chance`).
    """
    datasets = list(dict.fromkeys(table["dataset"]))
    models = list(dict.fromkeys(table["model"]))
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(datasets) * max(1, len(models)) + 1.2))
    step = 0.8 / max(1, len(models))
    for m, model in enumerate(models):
        sub = table[table["model"] == model].set_index("dataset")
        y = np.array([datasets.index(d) for d in sub.index]) + (m - (len(models) - 1) / 2) * step
        ax.errorbar(
            sub[metric],
            y,
            xerr=[sub[metric] - sub[f"{metric}_low"], sub[f"{metric}_high"] - sub[metric]],
            fmt="o",
            capsize=3,
            color=colour(model, m),
            label=model,
        )
    if chance is not None and chance in table:
        levels = table.groupby("dataset")[chance].first()
        for d, level in levels.items():
            i = datasets.index(d)
            ax.plot([level, level], [i - 0.45, i + 0.45], color="grey", lw=2, alpha=0.7)
        ax.plot([], [], color="grey", lw=2, alpha=0.7, label="chance (uniform)")
    ax.set_yticks(range(len(datasets)), datasets)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(metric.replace("_", " "))
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def confusion_grid(
    matrices: dict[tuple[str, str], pd.DataFrame], columns: Sequence[str] | None = None
) -> Figure:
    """Row-normalised confusion matrices (recall per gold label), one panel per (model, dataset).

    Panels are arranged with models as rows and datasets as columns; cells show percentages.
    """
    models = list(dict.fromkeys(m for m, _ in matrices))
    datasets = list(columns or dict.fromkeys(d for _, d in matrices))
    fig, axes = plt.subplots(
        len(models), len(datasets), figsize=(3.1 * len(datasets), 3.0 * len(models)), squeeze=False
    )
    for r, model in enumerate(models):
        for c, dataset in enumerate(datasets):
            ax = axes[r][c]
            matrix = matrices.get((model, dataset))
            if matrix is None:
                ax.axis("off")
                continue
            values = matrix.to_numpy(dtype=float)
            ax.imshow(values, vmin=0, vmax=1, cmap="Blues")
            labels = [str(x)[:4] for x in matrix.columns]
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(labels)), [str(x)[:4] for x in matrix.index], fontsize=7)
            ax.grid(False)
            for i in range(values.shape[0]):
                for j in range(values.shape[1]):
                    ax.text(
                        j,
                        i,
                        f"{100 * values[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if values[i, j] > 0.5 else "black",
                    )
            ax.set_title(f"{dataset}\n{model}", fontsize=8)
            if c == 0:
                ax.set_ylabel("gold")
            if r == len(models) - 1:
                ax.set_xlabel("predicted")
    return fig


def per_class_f1(table: pd.DataFrame) -> Figure:
    """Per-emotion F1 with 95% intervals; one panel per dataset, bars per model.

    `table` has columns model, dataset, label, f1, low, high.
    """
    datasets = list(dict.fromkeys(table["dataset"]))
    models = list(dict.fromkeys(table["model"]))
    ncols = min(3, len(datasets))
    nrows = int(np.ceil(len(datasets) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    width = 0.8 / max(1, len(models))
    for k, dataset in enumerate(datasets):
        ax = axes[k // ncols][k % ncols]
        sub = table[table["dataset"] == dataset]
        labels = list(dict.fromkeys(sub["label"]))
        for m, model in enumerate(models):
            rows = sub[sub["model"] == model].set_index("label").reindex(labels)
            x = np.arange(len(labels)) + (m - (len(models) - 1) / 2) * width
            ax.bar(
                x,
                rows["f1"],
                width,
                yerr=[rows["f1"] - rows["low"], rows["high"] - rows["f1"]],
                capsize=2,
                color=colour(model, m),
                label=model,
                alpha=0.85,
            )
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(dataset)
        ax.set_ylabel("F1")
    for k in range(len(datasets), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    axes[0][0].legend(fontsize=7, loc="upper right")
    return fig


def label_order_effects(table: pd.DataFrame) -> Figure:
    """Accuracy change when the label list is shuffled (paired 95% interval), per model and order seed."""
    shuffled = table[table["order_seed"] != "listed order"].copy()
    shuffled["run"] = (
        shuffled["model"] + " / " + shuffled["dataset"] + " / seed " + shuffled["order_seed"].astype(str)
    )
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(shuffled) + 1.2))
    y = np.arange(len(shuffled))
    for i, (_, row) in enumerate(shuffled.iterrows()):
        ax.errorbar(
            row["delta_accuracy"],
            y[i],
            xerr=[[row["delta_accuracy"] - row["delta_low"]], [row["delta_high"] - row["delta_accuracy"]]],
            fmt="o",
            capsize=3,
            color=colour(row["model"], i),
        )
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, shuffled["run"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (shuffled order) - accuracy (listed order)")
    return fig


def calibration_effects(table: pd.DataFrame) -> Figure:
    """Macro-F1 change from removing the label prior (paired 95% interval): one row per model and dataset, one
    marker per calibration (circle: contextual, square: batch), coloured by model.

    `table` has columns model, dataset, method, delta_macro_f1, delta_low, delta_high (`calibration_rows`); the
    zero-shot rows (no change) are left out.
    """
    shown = table[table["method"] != "zero-shot"]
    runs = list(dict.fromkeys(zip(shown["model"], shown["dataset"], strict=True)))
    methods = list(dict.fromkeys(shown["method"]))
    markers = dict(zip(methods, "osD^v", strict=False))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(runs) + 1.4))
    step = 0.5 / max(1, len(methods))
    for k, method in enumerate(methods):
        for i, (model, dataset) in enumerate(runs):
            row = shown[
                (shown["model"] == model) & (shown["dataset"] == dataset) & (shown["method"] == method)
            ]
            if row.empty:
                continue
            row = row.iloc[0]
            ax.errorbar(
                row["delta_macro_f1"],
                i + (k - (len(methods) - 1) / 2) * step,
                xerr=[
                    [row["delta_macro_f1"] - row["delta_low"]],
                    [row["delta_high"] - row["delta_macro_f1"]],
                ],
                fmt=markers[method],
                capsize=3,
                color=colour(model, i),
                label=method if i == 0 else None,
            )
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(np.arange(len(runs)), [f"{m} / {d}" for m, d in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("macro-F1 (calibrated) - macro-F1 (zero-shot)")
    ax.legend(title="calibration", fontsize=8, loc="best")
    return fig
