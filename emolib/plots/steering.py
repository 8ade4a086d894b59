"""Figures of the steering chapter: test macro-F1 against the number of examples, and recognition against the
language model's perplexity along the strength grid."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from emolib.plots.style import GROUP_COLOURS, errors, model_panels

#: Drawing order and line style per method: interventions solid, readouts dashed, the probe (a ceiling) dotted.
METHOD_STYLES = {
    "causal": {"ls": "-", "marker": "o", "lw": 2.2},
    "random": {"ls": "-", "marker": "x"},
    "selective": {"ls": "-", "marker": "s"},
    "diffmean": {"ls": "-", "marker": "^"},
    "bias": {"ls": "--", "marker": "v"},
    "n-shot": {"ls": "--", "marker": "P"},
    "probe": {"ls": ":", "marker": "D"},
    "zero-shot": {"ls": "-"},
    "contextual": {"ls": "--"},
    "batch": {"ls": "-."},
}


#: Methods that use no examples: drawn as horizontal bands.
NO_EXAMPLES = ("zero-shot", "contextual", "batch")


def _method_colour(method: str) -> str:
    """A fixed colour per known method; a method the figures do not know yet gets grey, never an error."""
    known = list(METHOD_STYLES)
    return GROUP_COLOURS[known.index(method) % len(GROUP_COLOURS)] if method in known else "0.3"


def data_efficiency(summaries: Mapping[str, pd.DataFrame]) -> Figure:
    """One panel per model: test macro-F1 (mean over example draws, 95% interval over draws and items) against the
    examples per emotion, for every method; methods without examples (zero-shot, calibration) are horizontal
    lines with a band.

    `summaries[model]` is `SteeringResult.summary`.
    """
    fig, axes = model_panels(len(summaries), 4.6, 3.6, ncols=min(3, len(summaries)))
    for ax, (model, summary) in zip(axes, summaries.items(), strict=True):
        for method, rows in summary.groupby("method", sort=False):
            rows = rows.sort_values("n")
            style_ = {**METHOD_STYLES.get(method, {}), "color": _method_colour(method)}
            if method in NO_EXAMPLES:
                first = rows.iloc[0]
                ax.axhline(
                    first["macro_f1"], label=method, **{k: v for k, v in style_.items() if k != "marker"}
                )
                ax.axhspan(first["macro_f1_low"], first["macro_f1_high"], color=style_["color"], alpha=0.08)
                continue
            rank = list(METHOD_STYLES).index(method) if method in METHOD_STYLES else len(METHOD_STYLES)
            shift = (rank - 4) * 0.015  # keep the bars apart on a log axis
            x = rows["n"].to_numpy() * (1 + shift)
            ax.errorbar(
                x,
                rows["macro_f1"],
                yerr=errors(rows["macro_f1"], rows["macro_f1_low"], rows["macro_f1_high"]),
                capsize=2,
                ms=4,
                label=method,
                **style_,
            )
        ax.set_xscale("log")
        ns = sorted(summary["n"].unique())
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("labelled examples per emotion")
        ax.set_ylabel("test macro-F1")
        ax.set_title(model)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, frameon=False)
    return fig


def strength_tradeoff(tradeoffs: Mapping[str, pd.DataFrame], tolerance: float | None = None) -> Figure:
    """One panel per model: dev macro-F1 against the relative perplexity change on WikiText dev articles along
    each intervention's strength grid (labels: strengths), with the tolerance as a vertical line.

    `tradeoffs[model]` is `SteeringResult.tradeoff`.
    """
    fig, axes = model_panels(len(tradeoffs), 4.6, 3.6, ncols=min(3, len(tradeoffs)))
    for ax, (model, rows) in zip(axes, tradeoffs.items(), strict=True):
        for method, line in rows.groupby("method", sort=False):
            line = line.sort_values("strength")
            style_ = {**METHOD_STYLES.get(method, {}), "color": _method_colour(method)}
            change = 100 * line["dev_ppl_change"].to_numpy(dtype=float)
            ax.plot(change, line["dev_macro_f1"], label=method, ms=4, **style_)
            for x, y, s in zip(change, line["dev_macro_f1"], line["strength"], strict=True):
                if np.isfinite(x):
                    ax.annotate(f"{s:g}", (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        if tolerance is not None:
            ax.axvline(100 * tolerance, color="0.4", ls=":", lw=1)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("perplexity change on WikiText dev (%)")
        ax.set_ylabel("dev macro-F1")
        ax.set_title(model)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
    return fig


def label_shares(shares: Mapping[str, pd.DataFrame]) -> Figure:
    """One panel per model: the share of test answers per label under each method (at the verdict's n), so that
    a gain that only re-weights labels shows as shares moving towards uniform."""
    fig, axes = model_panels(len(shares), 5.0, 3.4, ncols=min(3, len(shares)))
    for ax, (model, table) in zip(axes, shares.items(), strict=True):
        matrix = table.pivot(index="method", columns="label", values="share")
        known = [m for m in METHOD_STYLES if m in matrix.index]
        matrix = matrix.reindex(known + [m for m in matrix.index if m not in known])  # unknown methods last
        left = np.zeros(len(matrix))
        for j, label in enumerate(matrix.columns):
            ax.barh(
                matrix.index,
                matrix[label],
                left=left,
                color=GROUP_COLOURS[j % len(GROUP_COLOURS)],
                label=label,
            )
            left += matrix[label].to_numpy()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of test answers")
        ax.invert_yaxis()
        ax.grid(False)
        ax.set_title(model)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(7, len(labels)), frameon=False)
    return fig


#: The methods chapter 5's figure shows per dataset (others are in its tables).
TRANSFER_METHODS = ("zero-shot", "contextual", "batch", "bias", "random", "diffmean", "causal")


def transfer_panels(summaries: Mapping[str, Mapping[str, pd.DataFrame]], title: str) -> Figure:
    """One panel per model: test macro-F1 with 95% intervals per dataset (x) for the methods of
    `TRANSFER_METHODS` (side by side), from one regime of chapter 5.

    `summaries[model][dataset]` has columns method, macro_f1, macro_f1_low, macro_f1_high (one row per method).
    """
    fig, axes = model_panels(len(summaries), 5.2, 3.6, ncols=min(3, len(summaries)))
    for ax, (model, by_dataset) in zip(axes, summaries.items(), strict=True):
        datasets = list(by_dataset)
        width = 0.8 / len(TRANSFER_METHODS)
        for j, method in enumerate(TRANSFER_METHODS):
            rows = [by_dataset[d].set_index("method").loc[method] if method in set(by_dataset[d]["method"]) else None
                    for d in datasets]  # fmt: skip
            x = [
                i + (j - (len(TRANSFER_METHODS) - 1) / 2) * width for i, r in enumerate(rows) if r is not None
            ]
            kept = [r for r in rows if r is not None]
            if not kept:
                continue
            values = np.array([r["macro_f1"] for r in kept])
            low = np.array([r["macro_f1_low"] for r in kept])
            high = np.array([r["macro_f1_high"] for r in kept])
            ax.bar(x, values, width, color=_method_colour(method), label=method,
                   yerr=errors(values, low, high), capsize=2, error_kw={"lw": 0.8})  # fmt: skip
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_ylabel("test macro-F1")
        ax.set_title(f"{model}: {title}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(TRANSFER_METHODS), frameon=False)
    return fig
