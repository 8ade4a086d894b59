"""Figures of the flow chapter: layer profiles with phases, selective features per layer, feature roles, boundaries."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from emolib.plots.style import colour

_PHASE_SHADES = ("#f2f2f2", "#dbe9f6", "#fde9d9", "#e2f0d9")
ROLE_COLOURS = {"template": "#9e9e9e", "content": "#4c9be8", "emotion": "#d62728", "inactive": "#e0d8b0"}


def shade_phases(ax, phases: Sequence[tuple[int, int]], label: bool = False) -> None:
    """Shade each phase `(first layer, last layer)` in its own light colour; with `label`, write its number on top."""
    for i, (first, last) in enumerate(phases):
        ax.axvspan(first - 0.5, last + 0.5, color=_PHASE_SHADES[i % len(_PHASE_SHADES)], lw=0, zorder=0)
        if label:
            ax.text(
                (first + last) / 2, 1.0, f"phase {i + 1}", transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=8, color="#444444",
            )  # fmt: skip


def _band(ax, x, table: pd.DataFrame, column: str, colour: str, label: str, ls: str = "-") -> None:
    ax.plot(x, table[column], ls, marker="o", ms=2.5, color=colour, label=label)
    if f"{column}_low" in table and f"{column}_high" in table:
        ax.fill_between(x, table[f"{column}_low"], table[f"{column}_high"], color=colour, alpha=0.15, lw=0)


def flow_profiles(
    tables: dict[str, pd.DataFrame], phases: dict[str, Sequence[tuple[int, int]]], chance: dict[str, float]
) -> Figure:
    """Per-layer flow metrics, one column per model, with the phases shaded.

    `tables[model]` is indexed by layer with columns probe_resid, probe_sae (each with _low, _high, _control),
    selective, selective_null_max, lens_gold, lens_accuracy, lens_chance, lens_mass, cka, cka_control;
    `phases[model]` lists (first, last) layers; `chance[model]` is 1 / number of labels.
    """
    models = list(tables)
    rows = ["probe", "selective", "lens", "mass", "cka"]
    fig, axes = plt.subplots(
        len(rows),
        len(models),
        figsize=(5.2 * len(models), 2.0 * len(rows) + 0.6),
        squeeze=False,
        sharex="col",
    )
    for c, model in enumerate(models):
        t = tables[model]
        x = t.index.to_numpy()
        col = axes[:, c]
        for r, ax in enumerate(col):
            shade_phases(ax, phases[model], label=r == 0)
        ax = col[0]
        _band(ax, x, t, "probe_resid", "#1f77b4", "residual stream")
        _band(ax, x, t, "probe_sae", "#ff7f0e", "SAE codes", ls="--")
        ax.plot(x, t["probe_resid_control"], ":", color="#1f77b4", lw=1, label="shuffled-label control")
        ax.plot(x, t["probe_sae_control"], ":", color="#ff7f0e", lw=1)
        ax.axhline(chance[model], color="grey", lw=0.8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probe accuracy")
        ax.set_title(model, pad=14)
        ax = col[1]
        ax.plot(x, t["selective"], "o-", ms=2.5, color="#d62728", label="observed")
        ax.plot(x, t["selective_null_max"], ":", color="black", lw=1, label="max over label shuffles")
        ax.set_ylabel("selective features")
        ax = col[2]
        _band(ax, x, t, "lens_gold", "#2ca02c", "p(gold | labels)")
        ax.plot(x, t["lens_accuracy"], "s--", ms=2.5, color="#9467bd", label="lens accuracy")
        ax.plot(x, t["lens_chance"], ":", color="black", lw=1, label="permutation chance")
        ax.set_ylim(0, 1)
        ax.set_ylabel("logit lens")
        ax = col[3]
        ax.plot(x, t["lens_mass"], "o-", ms=2.5, color="#8c564b", label="all label tokens")
        ax.set_yscale("log")
        ax.set_ylabel("label-token prob.")
        ax = col[4]
        ax.plot(x, t["cka"], "o-", ms=2.5, color="#17becf", label="with previous layer")
        ax.plot(x, t["cka_control"], ":", color="black", lw=1, label="items permuted")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("linear CKA")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in col:
            ax.grid(axis="x", alpha=0)
    for r in range(len(rows)):
        axes[r][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def selective_heatmap(counts: dict[str, pd.DataFrame], boundaries: dict[str, Sequence[int]]) -> Figure:
    """Emotion-selective feature counts, emotions (rows) x layers (columns), one panel per model; phase
    boundaries as white lines. `counts[model]` is indexed by layer with one column per emotion."""
    models = list(counts)
    fig, axes = plt.subplots(
        len(models), 1, figsize=(11, 0.32 * sum(c.shape[1] for c in counts.values()) + 1.2 * len(models)),
        squeeze=False,
    )  # fmt: skip
    for ax, model in zip(axes[:, 0], models, strict=True):
        table = counts[model]
        values = table.to_numpy(dtype=float).T
        image = ax.imshow(values, aspect="auto", cmap="Reds", vmin=0, vmax=max(1.0, values.max()))
        ax.set_yticks(range(table.shape[1]), table.columns, fontsize=8)
        ax.set_xticks(range(table.shape[0]), table.index, fontsize=7)
        ax.grid(False)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if values[i, j] > 0:
                    ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if values[i, j] > 0.6 * values.max() else "black")  # fmt: skip
        positions = {layer: j for j, layer in enumerate(table.index)}
        for b in boundaries.get(model, ()):
            ax.axvline(positions[b] - 0.5, color="black", lw=1.5, ls="--")
        ax.set_title(model)
        ax.set_xlabel("layer")
        fig.colorbar(image, ax=ax, label="selective features", shrink=0.9)
    return fig


def role_shares(shares: dict[str, pd.DataFrame], phases: dict[str, Sequence[tuple[int, int]]]) -> Figure:
    """Share of last-token SAE activation carried by features of each role, per layer, stacked; phases shaded.

    `shares[model]` is indexed by layer with one column per role (template, content, emotion, inactive).
    """
    models = list(shares)
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        table = shares[model].fillna(0.0)
        x = table.index.to_numpy()
        bottom = np.zeros(len(table))
        for role in table.columns:
            ax.bar(
                x, table[role], bottom=bottom, width=0.85, color=ROLE_COLOURS.get(role, "#cccccc"), label=role
            )
            bottom += table[role].to_numpy()
        for first, _ in list(phases[model])[1:]:
            ax.axvline(first - 0.5, color="black", lw=1.2, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of last-token activation")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(model)
        ax.grid(axis="x", alpha=0)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def boundary_frequency(freqs: dict[str, pd.Series], layers: dict[str, Sequence[int]]) -> Figure:
    """Share of item resamples that start a phase at each layer (three-phase cuts), one panel per model."""
    models = list(freqs)
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 2.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        f = freqs[model].reindex(list(layers[model]), fill_value=0.0)
        ax.bar(f.index, f.to_numpy(), color=colour(model), width=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of resamples")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(model)
    return fig


_SEED_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


def seed_dictionary(
    tables: dict[str, pd.DataFrame], phases: dict[str, Sequence[tuple[int, int]]], match_cosine: float
) -> Figure:
    """Per layer, how near an SAE retrained with another seed comes to the book SAE's features: the median best
    decoder cosine (solid) beside a random dictionary's (dotted) and the match threshold (dashed), above the share
    of features found again at that threshold (all active features solid, emotion-selective ones as squares); one
    colour per seed, one column per model, phases shaded (`tables`: `FlowResult.seed_features_table(by_layer=True)`
    per model)."""
    models = [m for m in tables if len(tables[m])]
    width = max(len(models), 1)
    fig, axes = plt.subplots(2, width, figsize=(5.2 * width, 5.0), squeeze=False, sharex="col")
    for column, model in enumerate(models):
        table = tables[model].reset_index()
        top, bottom = axes[0][column], axes[1][column]
        shade_phases(top, phases[model], label=True)
        shade_phases(bottom, phases[model])
        top.axhline(match_cosine, color="#444444", ls="--", lw=0.8, label="match threshold")
        for i, seed in enumerate(sorted(table["seed"].unique())):
            rows = table[table["seed"] == seed].sort_values("layer")
            shade = _SEED_COLOURS[i % len(_SEED_COLOURS)]
            top.plot(rows["layer"], rows["median best cosine"], "-", marker="o", ms=2.5, color=shade,
                     label=f"seed {seed}: median best cosine")  # fmt: skip
            top.plot(
                rows["layer"],
                rows["random dictionary"],
                ":",
                color=shade,
                label=f"seed {seed}: random dictionary",
            )
            bottom.plot(rows["layer"], rows["found again"], "-", marker="o", ms=2.5, color=shade,
                        label=f"seed {seed}: active features")  # fmt: skip
            bottom.plot(rows["layer"], rows["selective found again"], "s", ms=4, mfc="none", color=shade,
                        label=f"seed {seed}: emotion-selective")  # fmt: skip
        top.set_ylim(0, 1)
        bottom.set_ylim(-0.02, 1)
        top.set_ylabel("decoder cosine")
        bottom.set_ylabel("share found again")
        bottom.set_xlabel("layer")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.set_title(model, pad=14)
    if models:
        for row in axes:
            row[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig
