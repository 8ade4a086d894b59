"""Figures of the SAE appendix: per-layer quality against the goals."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from emolib.plots.style import colour


def sae_quality(tables: dict[str, pd.DataFrame], k: dict[str, float | None], goals) -> Figure:
    """Per-layer SAE quality for each model (colours) against the goals (dashed lines; the good side shaded).

    `tables` maps model to an `emolib.sae.training.evaluate_saes` table; `k` maps model to its SAEs' k (L0 is shown as
    L0 / k, whose goal band is 1 +- `goals.l0_tolerance`; a pretrained release has no k and no L0 / k line);
    `goals` is an `emolib.sae.training.QualityGoals`.
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
            if column == "l0_over_k" and k[model] is None:
                continue
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
