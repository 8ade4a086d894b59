"""Figures for the book: one function per figure type, readable at page width, no styling left to chapters."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MODEL_COLOURS = {"smollm2-135m-instruct": "#1f77b4", "gemma-3-270m": "#d62728"}
_FALLBACK = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def style() -> None:
    """House style for every chapter: larger fonts, light grid, tight layout, high resolution."""
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "figure.constrained_layout.use": True,
        }
    )


def colour(model: str, index: int = 0) -> str:
    return MODEL_COLOURS.get(model, _FALLBACK[index % len(_FALLBACK)])


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


def sae_quality(tables: dict[str, pd.DataFrame], k: dict[str, float], goals) -> Figure:
    """Per-layer SAE quality for each model (colours) against the goals (dashed lines; the good side shaded).

    `tables` maps model to an `emolib.sae.training.evaluate_saes` table; `k` maps model to its SAEs' k (L0 is shown as
    L0 / k, whose goal band is 1 +- `goals.l0_tolerance`); `goals` is an `emolib.sae.training.QualityGoals`.
    """
    panels = [
        ("fve", "variance explained", (goals.min_fve, None)),
        ("loss_recovered", "next-token loss recovered", (goals.min_loss_recovered, None)),
        ("dead_fraction", "dead features (fraction)", (None, goals.max_dead_fraction)),
        ("l0_over_k", "L0 / k", (1 - goals.l0_tolerance, 1 + goals.l0_tolerance)),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5), sharex=True)
    for ax, (column, title, (low, high)) in zip(axes.flat, panels, strict=True):
        for i, (model, table) in enumerate(tables.items()):
            values = table["l0"] / k[model] if column == "l0_over_k" else table[column]
            ax.plot(table["layer"], values, "o-", ms=3, color=colour(model, i), label=model)
        for bound in (low, high):
            if bound is not None:
                ax.axhline(bound, color="grey", ls="--", lw=1)
        bottom, top = ax.get_ylim()
        ax.axhspan(low if low is not None else bottom, high if high is not None else top, color="green",
                   alpha=0.06, lw=0)  # fmt: skip
        ax.set_ylim(bottom, top)
        ax.set_title(title)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    axes[0][0].legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------ flow chapter

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


# ---------------------------------------------------------------------------------------------- tracing


def effect_curves(
    effects: pd.DataFrame, metric: str = "prob", ablation: str = "zero", title: str = ""
) -> Figure:
    """Small multiples, emotions (rows) x phases (columns): the drop when the top-k attributed features are
    ablated (solid, 95% band) against k random features (grey, dashed), and the whole phase (dotted line).

    `effects` is `emolib.studies.tracing.summarize_effects` output for one model.
    """
    rows = effects[effects["ablation"] == ablation]
    emotions = list(dict.fromkeys(rows["emotion"]))
    phases = list(dict.fromkeys(rows["phase"]))
    column = f"drop_{metric}"
    fig, axes = plt.subplots(
        len(emotions),
        len(phases),
        figsize=(2.6 * len(phases) + 1, 1.35 * len(emotions) + 0.8),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for r, emotion in enumerate(emotions):
        for c, phase in enumerate(phases):
            ax = axes[r, c]
            cell = rows[(rows["emotion"] == emotion) & (rows["phase"] == phase)]
            for condition, style_ in (
                ("top", {"color": "#1f77b4"}),
                ("random", {"color": "0.5", "ls": "--"}),
            ):
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
            if r == 0:
                ax.set_title(phase)
            if c == 0:
                ax.set_ylabel(emotion)
    for ax in axes[-1]:
        ax.set_xlabel("k (features ablated)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


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
                        color=_FALLBACK[p % len(_FALLBACK)])  # fmt: skip
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
    """Attribution-predicted vs measured margin drop of single-feature ablations, per model, coloured by phase."""
    fig, axes = plt.subplots(1, len(tables), figsize=(4.8 * len(tables), 4.0), squeeze=False)
    for ax, (model, table) in zip(axes[0], tables.items(), strict=True):
        for p, (phase, group) in enumerate(table.groupby("phase", sort=False)):
            ax.scatter(group["predicted"], group["measured"], s=10, alpha=0.6, label=phase,
                       color=_FALLBACK[p % len(_FALLBACK)])  # fmt: skip
        if len(table):
            lo = float(min(table["predicted"].min(), table["measured"].min()))
            hi = float(max(table["predicted"].max(), table["measured"].max()))
            ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("predicted drop (activation x gradient)")
        ax.set_ylabel("measured margin drop")
        ax.set_title(model)
        ax.legend(fontsize=8)
    return fig
