"""Smoke tests for the flow chapter's figures: they draw from tables shaped like the chapter's, without errors."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from emolib import plots  # noqa: E402


def flow_table(n_layers: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = pd.DataFrame(index=pd.Index(range(n_layers), name="layer"))
    for m in ("probe_resid", "probe_sae", "lens_gold"):
        t[m] = rng.random(n_layers)
        t[f"{m}_low"], t[f"{m}_high"] = t[m] - 0.05, t[m] + 0.05
        t[f"{m}_control"] = 0.15
    t["selective"] = rng.integers(0, 20, n_layers)
    t["selective_null_max"] = 2
    t["lens_accuracy"], t["lens_chance"] = rng.random(n_layers), 1 / 7
    t["lens_mass"] = 10.0 ** rng.uniform(-6, 0, n_layers)
    t["cka"], t["cka_control"] = rng.random(n_layers), 0.1
    t.loc[0, "cka"] = np.nan
    return t


def test_flow_figures_draw():
    models = {"smollm2-135m-instruct": 30, "gemma-3-270m": 18}
    tables = {m: flow_table(n, i) for i, (m, n) in enumerate(models.items())}
    phases = {m: [(0, 4), (5, n - 6), (n - 5, n - 1)] for m, n in models.items()}
    figs = [plots.flow_profiles(tables, phases, {m: 1 / 7 for m in models})]
    counts = {
        m: pd.DataFrame(np.arange(n * 7).reshape(n, 7) % 5, columns=list("abcdefg")).rename_axis("layer")
        for m, n in models.items()
    }
    figs.append(plots.selective_heatmap(counts, {m: [p[1][0], p[2][0]] for m, p in phases.items()}))
    shares = {
        m: pd.DataFrame(
            np.full((n, 4), 0.25), columns=["emotion", "template", "content", "inactive"]
        ).rename_axis("layer")
        for m, n in models.items()
    }
    figs.append(plots.role_shares(shares, phases))
    freqs = {m: pd.Series({5: 0.9, n - 5: 0.8, n - 4: 0.3}) for m, n in models.items()}
    figs.append(plots.boundary_frequency(freqs, {m: range(n) for m, n in models.items()}))
    for fig in figs:
        fig.canvas.draw()
        assert fig.axes
        plt.close(fig)


def test_seed_dictionary_draws_one_line_per_seed_and_measure():
    rows = []
    for seed in (1, 2):
        for layer in range(6):
            rows.append({"model": "m", "seed": seed, "layer": layer, "median best cosine": 0.5,
                         "random dictionary": 0.14, "found again": 0.1 * layer,
                         "selective found again": np.nan if layer < 4 else 0.5})  # fmt: skip
    table = pd.DataFrame(rows).set_index(["model", "seed", "layer"])
    fig = plots.seed_dictionary({"m": table}, {"m": [(0, 1), (2, 3), (4, 5)]}, 0.9)
    top, bottom = fig.axes[0], fig.axes[1]
    assert len(top.get_lines()) == 1 + 2 * 2  # the threshold, then per seed the median and chance
    assert len(bottom.get_lines()) == 2 * 2
    np.testing.assert_allclose(bottom.get_lines()[0].get_ydata(), [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    plt.close(fig)
