"""House style and the helpers every figure module shares: model colours, panel grids, error bars, heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from emolib.lm.models import model_colour

#: Colours of phases (or other unordered groups) within a figure.
GROUP_COLOURS = tuple(plt.rcParams["axes.prop_cycle"].by_key()["color"])


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
    """The model's colour from the registry (`ModelSpec.colour`); other models get one of a fixed cycle."""
    return model_colour(model, index)


def errors(value, low, high) -> np.ndarray:
    """Error bar lengths `[2, n]` from an interval; a percentile interval can miss its point estimate (a count
    whose resamples all lie on one side of it), and the bar on that side is then drawn with length zero."""
    value, low, high = (np.asarray(v, dtype=float) for v in (value, low, high))
    return np.clip(np.stack([value - low, high - value]), 0, None)


def model_panels(n: int, width: float, height: float, ncols: int | None = None):
    ncols = ncols or n
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for k in range(n, nrows * ncols):
        axes.flat[k].axis("off")
    return fig, list(axes.flat)[:n]


def annotated_heatmap(ax, values: np.ndarray, labels: Sequence[str], vmax: float, fmt: str, cmap: str):
    colours = plt.get_cmap(cmap).with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=vmax, cmap=colours)
    short = [str(x)[:5] for x in labels]
    ax.set_xticks(range(len(short)), short, rotation=90, fontsize=8)
    ax.set_yticks(range(len(short)), short, fontsize=8)
    ax.grid(False)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "-" if not np.isfinite(v) else format(v, fmt)
            dark = np.isfinite(v) and v > 0.6 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return image
