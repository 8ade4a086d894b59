"""Summaries of ablation curves: mean effects with intervals, k50, top against random features, cross-emotion matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from emolib.methods.tracing import METRICS, TracingError
from emolib.stats import interval_from_draws

_GROUP = ["emotion", "phase", "ablation", "condition", "k"]


def _per_item(group: pd.DataFrame, column: str) -> pd.Series:
    """One value per item: random conditions are averaged over seeds first (the bootstrap resamples items)."""
    return group.groupby("item", sort=True)[column].mean()


def summarize_effects(
    per_item: pd.DataFrame, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Mean effects per emotion, phase, ablation, condition and k, with percentile-bootstrap intervals over items.

    Columns: the group keys, n_items, n_features (mean over seeds for random), and per metric (`gap`, `prob`,
    `margin`, `accuracy`) the mean drop with `_low` / `_high` bounds and the mean clean value `clean_<metric>` (the
    drop's share of it is the share of the model's preference removed). Random controls are averaged over seeds
    per item.
    """
    rows = []
    rng = np.random.default_rng(seed)
    for keys, group in per_item.groupby(_GROUP, sort=False):
        row = dict(zip(_GROUP, keys, strict=True))
        n = group["item"].nunique()
        samples = rng.integers(0, n, size=(n_boot, n))
        row["n_items"] = n
        row["n_features"] = float(group["n_features"].mean())
        for metric, column in METRICS.items():
            if column not in group.columns:
                continue
            values = _per_item(group, column).to_numpy()
            estimate = interval_from_draws(values.mean(), values[samples].mean(axis=1), level)
            row[f"drop_{metric}"] = estimate.value
            row[f"drop_{metric}_low"] = estimate.low
            row[f"drop_{metric}_high"] = estimate.high
            if (
                _clean_column(column) in group.columns
            ):  # the drop as a share of the clean value reads off this
                row[f"clean_{metric}"] = float(_per_item(group, _clean_column(column)).mean())
        rows.append(row)
    return pd.DataFrame(rows)


#: What k50 is half of: the emotion's mean clean value of the metric (its clean gap, p(gold), margin or accuracy),
#: or the whole-phase drop.
K50_REFERENCES = ("clean", "whole")


def _k50(curves: np.ndarray, reference: np.ndarray, ks: np.ndarray, min_effect: float = 0.0) -> np.ndarray:
    """Smallest k with curve >= reference / 2, per row (`curves [m, n_k]`, `reference [m]`); inf if none, NaN if
    the reference is not above `min_effect`."""
    reached = curves >= 0.5 * reference[:, None]
    first = np.where(reached.any(axis=1), ks[reached.argmax(axis=1)].astype(float), np.inf)
    return np.where(reference > min_effect, first, np.nan)


def _clean_column(column: str) -> str:
    """The clean-value column of a drop column (`drop_gap` -> `clean_gap`)."""
    return "clean_" + column.removeprefix("drop_")


def k50_table(
    per_item: pd.DataFrame,
    *,
    metrics: Sequence[str] = ("gap", "prob", "margin", "accuracy"),
    reference: str = "clean",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_effect: float | Mapping[str, float] = 0.0,
) -> pd.DataFrame:
    """k50 per emotion, phase, ablation and metric from `ablation_curves` rows, with bootstrap intervals.

    k50 is the smallest k in the curve whose mean drop reaches half of the `reference`: "clean" (default) the mean
    clean value of the emotion's items (half of its clean gap: defined for every emotion the model prefers at all,
    whatever the whole phase does), "whole" the whole-phase drop. `inf` if no k does, NaN if the reference is not
    above `min_effect` (one value, or one per metric). Items are resampled with the same resamples for every k and
    the reference; the interval takes the lower / upper order statistics of the resampled k50s (discrete values),
    over resamples where the reference exceeds `min_effect` (`undefined_share` is the share where not).
    Columns: emotion, phase, ablation, metric, reference (its kind), n_items, reference_value (+ `_low`, `_high`),
    whole_effect (+ `_low`, `_high`), k50, k50_low, k50_high, undefined_share, effect_at_k50 (the mean drop at k50,
    NaN if none).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise TracingError(f"metrics must be among {list(METRICS)}, not {unknown}")
    if reference not in K50_REFERENCES:
        raise TracingError(f"reference must be one of {K50_REFERENCES}, not {reference!r}")
    tail = (1 - level) / 2
    rows = []
    for (emotion, phase, ablation), group in per_item.groupby(["emotion", "phase", "ablation"], sort=False):
        top = group[group["condition"] == "top"]
        whole = group[group["condition"] == "whole"]
        if top.empty or whole.empty:
            raise TracingError(f"{emotion}/{phase}/{ablation}: k50 needs both top-k and whole-phase rows")
        rng = np.random.default_rng(seed)
        for metric in metrics:
            column = METRICS[metric]
            curve = top.pivot_table(index="item", columns="k", values=column, aggfunc="mean").sort_index()
            full = _per_item(whole, column).reindex(curve.index).to_numpy()
            if reference == "clean":
                clean = _clean_column(column)
                if clean not in top.columns:
                    raise TracingError(f"k50 against the clean value needs a {clean!r} column")
                base = _per_item(top, clean).reindex(curve.index).to_numpy()
            else:
                base = full
            ks = curve.columns.to_numpy()
            values = curve.to_numpy()
            n = len(values)
            samples = rng.integers(0, n, size=(n_boot, n))
            floor = float(min_effect.get(metric, 0.0) if isinstance(min_effect, Mapping) else min_effect)
            point = _k50(values.mean(0)[None], np.array([base.mean()]), ks, floor)[0]
            boot = _k50(values[samples].mean(1), base[samples].mean(1), ks, floor)
            defined = boot[~np.isnan(boot)]
            if len(defined):
                low = float(np.quantile(defined, tail, method="lower"))
                high = float(np.quantile(defined, 1 - tail, method="higher"))
            else:
                low = high = float("nan")
            base_estimate = interval_from_draws(base.mean(), base[samples].mean(1), level)
            whole_estimate = interval_from_draws(full.mean(), full[samples].mean(1), level)
            at = values.mean(0)[list(ks).index(point)] if np.isfinite(point) else float("nan")
            rows.append(
                {
                    "emotion": emotion,
                    "phase": phase,
                    "ablation": ablation,
                    "metric": metric,
                    "reference": reference,
                    "n_items": n,
                    "reference_value": base_estimate.value,
                    "reference_value_low": base_estimate.low,
                    "reference_value_high": base_estimate.high,
                    "whole_effect": whole_estimate.value,
                    "whole_effect_low": whole_estimate.low,
                    "whole_effect_high": whole_estimate.high,
                    "k50": float(point),
                    "k50_low": low,
                    "k50_high": high,
                    "undefined_share": float(np.isnan(boot).mean()),
                    "effect_at_k50": float(at),
                }
            )
    return pd.DataFrame(rows)


def confusion_shift(
    cross: pd.DataFrame, *, phase: str, source: str, ablation: str = "zero", value: str = "share_shift"
) -> pd.DataFrame:
    """Target (gold) x label matrix of one source emotion's ablation from `cross_emotion` rows.

    `value` "share_shift" gives the change of the row-normalised confusion matrix; "prob_shift" the change of the
    mean label probabilities.
    """
    rows = cross[(cross["phase"] == phase) & (cross["source"] == source) & (cross["ablation"] == ablation)]
    if rows.empty:
        raise TracingError(
            f"no cross-emotion rows for phase={phase!r}, source={source!r}, ablation={ablation!r}"
        )
    matrix = rows.pivot(index="target", columns="label", values=value)
    return matrix.reindex(
        index=list(dict.fromkeys(rows["target"])), columns=list(dict.fromkeys(rows["label"]))
    )


def gold_drop_matrix(cross: pd.DataFrame, *, phase: str, ablation: str = "zero") -> pd.DataFrame:
    """Source x target matrix: the drop in the target items' gold probability when the source's features are
    ablated (the diagonal is each emotion's own effect; off-diagonal positive values are collateral damage)."""
    rows = cross[
        (cross["phase"] == phase) & (cross["ablation"] == ablation) & (cross["label"] == cross["target"])
    ]
    if rows.empty:
        raise TracingError(f"no cross-emotion rows for phase={phase!r}, ablation={ablation!r}")
    matrix = -rows.pivot(index="source", columns="target", values="prob_shift")
    return matrix.reindex(
        index=list(dict.fromkeys(rows["source"])), columns=list(dict.fromkeys(rows["target"]))
    )


def per_label_sample(gold: Sequence[str], n_per_label: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded sample of at most `n_per_label` items per label (all items when None)."""
    gold = np.asarray(gold)
    if n_per_label is None:
        return np.arange(len(gold))
    if n_per_label < 1:
        raise TracingError(f"n_per_label must be at least 1, not {n_per_label}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in dict.fromkeys(gold.tolist()):
        rows = np.flatnonzero(gold == label)
        chosen.append(rng.choice(rows, size=min(n_per_label, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))


def top_vs_random(
    curves: pd.DataFrame,
    *,
    metric: str = "gap",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    control: str = "random",
) -> pd.DataFrame:
    """Paired per-item excess of the top-k drop over the `control` condition's k-feature drop ("random": averaged
    over seeds; "shuffled": the shuffled-label ranking's top k), with intervals. Groups without `control` rows
    are left out.

    Columns: emotion, phase, ablation, k, n_items, excess, excess_low, excess_high (bootstrap over items).
    """
    column = METRICS[metric]
    rng = np.random.default_rng(seed)
    rows = []
    keys = ["emotion", "phase", "ablation"]
    for (emotion, phase, ablation), group in curves.groupby(keys, sort=False):
        if not (group["condition"] == control).any():
            continue
        top = group[group["condition"] == "top"].pivot_table(index="item", columns="k", values=column)
        rand = group[group["condition"] == control].pivot_table(
            index="item", columns="k", values=column, aggfunc="mean"
        )
        diff = (top - rand.reindex(index=top.index, columns=top.columns)).sort_index()
        values = diff.to_numpy()
        samples = rng.integers(0, len(values), size=(n_boot, len(values)))
        for j, k in enumerate(diff.columns):
            estimate = interval_from_draws(values[:, j].mean(), values[samples, j].mean(axis=1), level)
            rows.append(
                {
                    "emotion": emotion,
                    "phase": phase,
                    "ablation": ablation,
                    "k": int(k),
                    "n_items": len(values),
                    "excess": estimate.value,
                    "excess_low": estimate.low,
                    "excess_high": estimate.high,
                }
            )
    return pd.DataFrame(rows)
