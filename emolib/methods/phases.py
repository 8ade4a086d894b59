"""Phases of a layer profile: exact segmentation, a calibrated test of how many phases, item-bootstrap boundaries."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ruptures as rpt
from jaxtyping import Float

from emolib.methods.common import FlowError
from emolib.stats import Estimate


def layer_profile(
    metrics: Mapping[str, Sequence[float]], layers: Sequence[int] | None = None
) -> pd.DataFrame:
    """A layers x metrics table (index "layer") from `{metric: one value per layer}`, checked for the segmenter."""
    if not metrics:
        raise FlowError("a profile needs at least one metric")
    columns = {name: np.asarray(values, dtype=np.float64) for name, values in metrics.items()}
    shapes = {name: v.shape for name, v in columns.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise FlowError(f"every metric needs one value per layer (1-D, same length), got shapes {shapes}")
    n = len(next(iter(columns.values())))
    layers = list(range(n)) if layers is None else list(layers)
    if len(layers) != n:
        raise FlowError(f"{len(layers)} layers given for metrics of length {n}")
    return _checked_profile(pd.DataFrame(columns, index=pd.Index(layers, name="layer")))


def _checked_profile(profile: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(profile, pd.DataFrame) or profile.shape[0] < 1 or profile.shape[1] < 1:
        raise FlowError("a profile is a non-empty DataFrame with one row per layer and one column per metric")
    if not profile.index.is_unique:
        raise FlowError("the profile's layer index has repeated entries")
    values = profile.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise FlowError("the profile contains NaN or infinite values")
    return profile


def _scales(values: np.ndarray) -> np.ndarray:
    """Each column's standard deviation, 0 for a column constant up to rounding (which z-scoring would inflate)."""
    scale = values.std(axis=0)
    return np.where(scale > 1e-12 * np.maximum(1.0, np.abs(values).max(axis=0)), scale, 0.0)


def standardised(profile: pd.DataFrame) -> np.ndarray:
    """Z-scored columns, so metrics in different units weigh alike; a constant column becomes zeros (no cost)."""
    values = _checked_profile(profile).to_numpy(dtype=np.float64)
    scale = _scales(values)
    return np.divide(values - values.mean(axis=0), scale, out=np.zeros_like(values), where=scale > 0)


@dataclass(frozen=True)
class Segmentation:
    """The best cut of a profile into `n_phases` contiguous phases of layers.

    `boundaries` are the first layers of phases 2..n_phases; `cost` is the within-phase sum of squared deviations
    of the z-scored metrics (the l2 cost ruptures minimises).
    """

    n_phases: int
    boundaries: tuple
    phases: tuple[tuple, ...]
    cost: float

    def phase_of(self, layers: Sequence) -> pd.Series:
        """Phase number (1-based) of every layer, e.g. to colour a plot."""
        starts = [first for first, _ in self.phases]
        positions = {layer: i for i, layer in enumerate(layers)}
        numbers = np.searchsorted(
            [positions[s] for s in starts], [positions[x] for x in layers], side="right"
        )
        return pd.Series(numbers, index=pd.Index(layers, name="layer"), name="phase")


def _fit(signal: np.ndarray, min_size: int) -> rpt.Dynp:
    # jump=1: every layer may start a phase (ruptures' default only tries every 5th sample).
    return rpt.Dynp(model="l2", min_size=min_size, jump=1).fit(signal)


def _check_phases(n_layers: int, n_phases: int, min_size: int) -> None:
    if min_size < 1:
        raise FlowError(f"min_size must be at least 1, not {min_size}")
    if n_phases < 1:
        raise FlowError(f"n_phases must be at least 1, not {n_phases}")
    if n_phases * min_size > n_layers:
        raise FlowError(
            f"{n_phases} phases of at least {min_size} layers do not fit in a profile of {n_layers} layers"
        )


def _segmentation(algo: rpt.Dynp, index: pd.Index, n_phases: int) -> Segmentation:
    ends = algo.predict(n_bkps=n_phases - 1)
    starts = [0, *ends[:-1]]
    layers = index.tolist()  # Python scalars, not numpy ones
    return Segmentation(
        n_phases=n_phases,
        boundaries=tuple(layers[s] for s in starts[1:]),
        phases=tuple((layers[s], layers[e - 1]) for s, e in zip(starts, ends, strict=True)),
        cost=float(algo.cost.sum_of_costs(ends)),
    )


def segment_phases(profile: pd.DataFrame, n_phases: int, *, min_size: int = 2) -> Segmentation:
    """The exact least-squares cut of the layer profile into `n_phases` piecewise-constant phases.

    Dynamic programming (ruptures' `Dynp`, l2 cost) is exact for a fixed number of phases, so the boundaries are
    the best ones, not a greedy approximation. Metrics are z-scored first. `min_size` (default 2 layers) keeps a
    single odd layer, such as the embedding layer, from becoming a phase of its own.
    """
    signal = standardised(profile)
    _check_phases(len(signal), n_phases, min_size)
    try:
        return _segmentation(_fit(signal, min_size), profile.index, n_phases)
    finally:
        rpt.Dynp.seg.cache_clear()  # ruptures memoises on the class: free it (only a speed cache)


def noise_sd(profile: pd.DataFrame) -> np.ndarray:
    """Noise standard deviation of each z-scored metric, from differences of neighbouring layers.

    median |x[l+1] - x[l]| / (0.6745 sqrt 2) estimates the standard deviation of independent Gaussian noise;
    the median ignores the few differences that straddle a phase boundary. A smooth trend barely raises it.
    """
    signal = standardised(profile)
    if len(signal) < 2:
        return np.zeros(signal.shape[1])
    return _diff_sd(signal, axis=0)


def _diff_sd(values: np.ndarray, axis: int) -> np.ndarray:
    return np.median(np.abs(np.diff(values, axis=axis)), axis=axis) / (0.6745 * math.sqrt(2))


def _z_noise_sd(profile: pd.DataFrame, sd: Sequence[float] | None) -> np.ndarray:
    """Per-metric noise sd in z-scored units: estimated, or `sd` (profile units) divided by each column's std."""
    if sd is None:
        return noise_sd(profile)
    sd = np.asarray(sd, dtype=np.float64)
    if sd.shape != (profile.shape[1],) or not np.isfinite(sd).all() or (sd < 0).any():
        raise FlowError(f"sd needs one non-negative value per metric ({profile.shape[1]}), got {sd}")
    scale = _scales(profile.to_numpy(dtype=np.float64))
    return np.divide(sd, scale, out=np.zeros_like(sd), where=scale > 0)


def bic_penalty(profile: pd.DataFrame, sd: Sequence[float] | None = None) -> float:
    """BIC price of one change point in z-scored cost units: log(n_layers) (sum_m s_m^2 + mean_m s_m^2).

    A change point adds one mean per metric (each worth a cost drop of about s_m^2 in pure noise) and a
    location (priced as one more parameter). `sd`: known noise sd per metric in the profile's units (e.g. the
    standard error of each metric from its items); by default `noise_sd` estimates it. BIC ignores that the
    location is the best of many, so it finds a spurious phase in 10-20% of pure-noise profiles of 20-30 layers.
    """
    variance = _z_noise_sd(_checked_profile(profile), sd) ** 2
    return float(math.log(len(profile)) * (variance.sum() + variance.mean()))


def calibrated_penalty(
    profile: pd.DataFrame,
    sd: Sequence[float] | None = None,
    *,
    level: float = 0.95,
    n_sim: int = 1000,
    min_size: int = 2,
    seed: int = 0,
) -> float:
    """Price of one change point such that pure noise buys a second phase with probability `1 - level`.

    Simulates `n_sim` profiles of Gaussian noise with the profile's shape and per-metric noise levels, takes the
    largest cost drop one change point achieves in each (the best split, computed from cumulative sums) relative
    to that simulation's own noise estimate, and scales that ratio's `level` quantile by the profile's noise
    variance. Re-estimating the noise in every simulation accounts for the estimate's own error. Further change
    points search shorter segments, so for them the same price is conservative.
    """
    profile = _checked_profile(profile)
    if not 0 < level < 1 or n_sim < 1:
        raise FlowError(f"need 0 < level < 1 and n_sim >= 1, got level={level}, n_sim={n_sim}")
    n, d = profile.shape
    _check_phases(n, 2, min_size)
    s = _z_noise_sd(profile, sd)
    noise = np.random.default_rng(seed).normal(size=(n_sim, n, d)) * s
    s_sim = np.broadcast_to(s, (n_sim, d)) if sd is not None else _diff_sd(noise, axis=1)
    ratio = best_split_drops(noise, min_size) / np.maximum((s_sim**2).sum(axis=1), np.finfo(float).tiny)
    return float(np.quantile(ratio, level) * (s**2).sum())


def best_split_drops(noise: Float[np.ndarray, "draws layers metrics"], min_size: int = 2) -> np.ndarray:
    """Per draw, the largest drop of the within-phase sum of squares that one change point buys (phases of at
    least `min_size` layers), from cumulative sums: the statistic a change-point price must exceed."""
    n = noise.shape[1]
    sums = np.cumsum(noise, axis=1)
    t = np.arange(min_size, n - min_size + 1)  # first position of the second phase
    left = sums[:, t - 1] / t[:, None]
    right = (sums[:, -1:] - sums[:, t - 1]) / (n - t)[:, None]
    return ((t * (n - t) / n)[:, None] * (left - right) ** 2).sum(axis=2).max(axis=1)


def bootstrap_penalty(
    profile: pd.DataFrame, resamples: Sequence[pd.DataFrame], *, level: float = 0.95, min_size: int = 2
) -> float:
    """Price of one change point from item-bootstrap profiles: the `level` quantile, over resamples, of the
    largest cost drop one change point buys in the resample's deviation from `profile` (z-scored by the
    profile's own scales, as the cost is).

    The deviations are the profile's sampling noise with its real structure: a per-item metric averaged over
    the same items is correlated across layers (an item that is hard at layer 10 is hard at 11) and across
    metrics, which Gaussian noise independent per layer (`calibrated_penalty`) does not have, and smooth
    correlated noise buys larger drops. Noise alone then adds a phase with probability about `1 - level`.
    """
    profile = _checked_profile(profile)
    if not 0 < level < 1:
        raise FlowError(f"level must be in (0, 1), not {level}")
    if len(resamples) < 1:
        raise FlowError("bootstrap_penalty needs at least one resampled profile")
    _check_phases(len(profile), 2, min_size)
    values = profile.to_numpy(dtype=np.float64)
    for r in resamples:
        if not (r.index.equals(profile.index) and list(r.columns) == list(profile.columns)):
            raise FlowError("every resampled profile needs the profile's layers and metrics")
    scale = _scales(values)
    deviations = np.stack([r.to_numpy(dtype=np.float64) - values for r in resamples])
    noise = np.divide(deviations, scale, out=np.zeros_like(deviations), where=scale > 0)
    return float(np.quantile(best_split_drops(noise, min_size), level))


def trend_cost(profile: pd.DataFrame, degree: int = 3) -> float:
    """Residual cost of the smooth alternative to phases: a polynomial of `degree` in layer position fitted to
    each z-scored metric (least squares), in the units of `Segmentation.cost`.

    A cubic per metric has 4 free values per metric; three phases have 3 means per metric and 2 shared boundary
    positions, so for more than two metrics the trend has the more parameters: three phases that fit worse than
    it are not a better description than "a trend"."""
    signal = standardised(profile)
    if degree < 0 or degree + 1 > len(signal):
        raise FlowError(f"a degree-{degree} trend needs more than {degree} layers, got {len(signal)}")
    basis = np.vander(np.linspace(-1.0, 1.0, len(signal)), degree + 1)
    coef, *_ = np.linalg.lstsq(basis, signal, rcond=None)
    return float(((signal - basis @ coef) ** 2).sum())


def leave_one_metric_out(profile: pd.DataFrame, n_phases: int = 3, min_size: int = 2) -> dict[str, tuple]:
    """The best `n_phases` cut's boundaries when each metric is dropped in turn, by dropped metric: a boundary
    that only one metric draws (e.g. a logit-lens quantity that rises mechanically at the end) moves or vanishes.
    """
    profile = _checked_profile(profile)
    if profile.shape[1] < 2:
        return {}
    return {
        str(metric): segment_phases(profile.drop(columns=metric), n_phases, min_size=min_size).boundaries
        for metric in profile.columns
    }


def feasible_candidates(candidates: Sequence[int], n_layers: int, min_size: int = 2) -> tuple[int, ...]:
    """The candidate phase counts whose phases of at least `min_size` layers fit in `n_layers`."""
    return tuple(k for k in sorted(set(candidates)) if k * min_size <= n_layers)


@dataclass
class PhaseCountTest:
    """Best segmentation per candidate phase count, and the count the penalised cost prefers.

    `table` (index n_phases) holds `cost`, `r2` (share of the z-scored profile's variance the phases explain),
    `reduction` (cost removed relative to the previous candidate), `paid` (that reduction over the price of the
    change points it took: above 1 the extra phases pay for themselves), `criterion` (cost + penalty x change
    points) and the boundaries. When the largest candidate wins, the profile is not a few steps (a smooth trend
    is not: every extra step fits it better), so no phase count is supported.
    """

    table: pd.DataFrame
    chosen: int
    penalty: float
    segmentations: dict[int, Segmentation]
    trend_cost: float = float("nan")
    trend_degree: int = 3
    total_cost: float = float("nan")

    @property
    def trend_r2(self) -> float:
        """Share of the z-scored profile's variance the smooth trend explains (comparable with `table["r2"]`)."""
        return 1 - self.trend_cost / self.total_cost if self.total_cost > 0 else float("nan")

    @property
    def three_beats_trend(self) -> bool | None:
        """Three phases leave less residual than the smooth trend (None: three is not a candidate)."""
        if 3 not in self.table.index or not np.isfinite(self.trend_cost):
            return None
        return bool(self.table.loc[3, "cost"] < self.trend_cost)

    @property
    def at_largest(self) -> bool:
        return self.chosen == self.table.index.max() and len(self.table) > 1


PENALTIES = ("calibrated", "bic")


def phase_count_test(
    profile: pd.DataFrame,
    candidates: Sequence[int] = (1, 2, 3, 4),
    *,
    penalty: float | str = "calibrated",
    sd: Sequence[float] | None = None,
    min_size: int = 2,
    seed: int = 0,
    trend_degree: int = 3,
) -> PhaseCountTest:
    """Which number of phases the profile supports, among `candidates`, by penalised least squares, beside the
    residual of a smooth trend (`trend_cost` of `trend_degree`) that the phases must beat.

    More phases always fit better, so every change point must buy a cost drop larger than `penalty`: a number,
    or "calibrated" (`calibrated_penalty`: about a 5% chance that noise alone adds a phase) or "bic"
    (`bic_penalty`, more liberal); `sd` is passed to them. Candidate 1 (no boundary) is included by default,
    so "three phases" has to beat "no phases" as well as two and four. Ties go to fewer phases.
    """
    signal = standardised(profile)
    candidates = sorted({int(k) for k in candidates})
    if not candidates:
        raise FlowError("no candidate phase counts")
    for k in candidates:
        _check_phases(len(signal), k, min_size)
    if isinstance(penalty, str) and penalty not in PENALTIES:
        raise FlowError(f"penalty must be a number or one of {PENALTIES}, not {penalty!r}")
    if candidates == [1]:
        penalty = 0.0  # nothing to choose between
    elif penalty == "bic":
        penalty = bic_penalty(profile, sd)
    elif penalty == "calibrated":
        penalty = calibrated_penalty(profile, sd, min_size=min_size, seed=seed)
    penalty = float(penalty)
    if not penalty >= 0:
        raise FlowError(f"penalty must be non-negative, not {penalty}")
    algo = _fit(signal, min_size)
    try:
        segmentations = {k: _segmentation(algo, profile.index, k) for k in candidates}
    finally:
        rpt.Dynp.seg.cache_clear()
    costs = np.array([segmentations[k].cost for k in candidates])
    criterion = costs + penalty * (np.array(candidates) - 1)
    best = float(criterion.min())
    chosen_at = int(np.flatnonzero(criterion <= best + 1e-9 * (1 + abs(best)))[0])
    total = float((signal**2).sum())
    reduction = np.r_[np.nan, -np.diff(costs)]
    price = penalty * np.r_[np.nan, np.diff(candidates)]
    paid = np.divide(reduction, price, out=np.full_like(reduction, np.inf), where=price > 0)
    paid[0] = np.nan  # the first candidate is the baseline
    table = pd.DataFrame(
        {
            "cost": costs,
            "r2": 1 - costs / total if total > 0 else np.ones_like(costs),
            "reduction": reduction,
            "paid": paid,
            "criterion": criterion,
            "boundaries": [segmentations[k].boundaries for k in candidates],
        },
        index=pd.Index(candidates, name="n_phases"),
    )
    trend = trend_cost(profile, trend_degree) if trend_degree + 1 <= len(signal) else float("nan")
    return PhaseCountTest(
        table=table,
        chosen=candidates[chosen_at],
        penalty=penalty,
        segmentations=segmentations,
        trend_cost=trend,
        trend_degree=trend_degree,
        total_cost=total,
    )


def item_metric_profile(
    values: Mapping[str, Float[np.ndarray, "layers items"]], indices=None, layers=None
) -> pd.DataFrame:
    """The layer profile of the items at `indices` (repeats allowed) from per-item values `[n_layers, n_items]`.

    Store per-item outcomes once (out-of-fold probe correctness, the gold label's lens probability), and a
    resample of items is just a mean over columns: `functools.partial(item_metric_profile, values)` is a
    `profile_fn` for `bootstrap_boundaries`. (Probes are not refitted, so fold-assignment noise is not resampled.)
    """
    if not values:
        raise FlowError("no metrics given")
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise FlowError(f"every metric needs the same [n_layers, n_items] shape, got {shapes}")
    n_layers, n_items = next(iter(shapes.values()))
    indices = np.arange(n_items) if indices is None else np.asarray(indices)
    if indices.ndim != 1 or len(indices) == 0:
        raise FlowError("indices must be a non-empty 1-D array of item positions")
    if indices.dtype.kind not in "iu" or indices.min() < 0 or indices.max() >= n_items:
        raise FlowError(f"indices must be integer positions in [0, {n_items})")
    return layer_profile({name: a[:, indices].mean(axis=1) for name, a in arrays.items()}, layers)


@dataclass
class BoundaryBootstrap:
    """Phase boundaries of the full data and of item resamples.

    `intervals[i]` is boundary i's percentile interval (value: the full data's boundary; low/high: layers).
    `draws` holds each resample's boundaries; `counts` (when candidates were tested) the share of resamples
    choosing each phase count.
    """

    point: Segmentation
    intervals: list[Estimate]
    draws: pd.DataFrame
    counts: pd.Series | None

    def boundary_frequency(self) -> pd.Series:
        """Share of resamples that start a phase at each layer."""
        return self.draws.stack().value_counts().sort_index() / len(self.draws)


def bootstrap_boundaries(
    profile_fn: Callable[[np.ndarray], pd.DataFrame],
    n_items: int,
    n_phases: int,
    *,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
    min_size: int = 2,
    candidates: Sequence[int] | None = None,
    penalty: float | str = "calibrated",
) -> BoundaryBootstrap:
    """How stable the phase boundaries are when the items are resampled with replacement.

    `profile_fn(indices)` returns the layer profile of those items. Each resample is cut into `n_phases` phases;
    interval ends are actual layers (lower/higher percentiles of the boundary positions). With `candidates`,
    each resample also runs `phase_count_test`, showing how often each phase count wins.
    """
    if n_items < 2 or n_boot < 1:
        raise FlowError(f"need at least 2 items and 1 resample, got n_items={n_items}, n_boot={n_boot}")
    if not 0 < level < 1:
        raise FlowError(f"level must be in (0, 1), not {level}")
    full = profile_fn(np.arange(n_items))
    point = segment_phases(full, n_phases, min_size=min_size)
    position = {layer: i for i, layer in enumerate(full.index)}
    rng = np.random.default_rng(seed)
    draws, chosen = [], []
    for _ in range(n_boot):
        profile = profile_fn(rng.integers(0, n_items, size=n_items))
        if not profile.index.equals(full.index):
            raise FlowError("profile_fn must return the same layers for every resample")
        draws.append(segment_phases(profile, n_phases, min_size=min_size).boundaries)
        if candidates is not None:
            chosen.append(phase_count_test(profile, candidates, penalty=penalty, min_size=min_size).chosen)
    tail = (1 - level) / 2
    intervals = []
    for i, value in enumerate(point.boundaries):
        at = np.array([position[d[i]] for d in draws])
        low = int(np.quantile(at, tail, method="lower"))
        high = int(np.quantile(at, 1 - tail, method="higher"))
        intervals.append(Estimate(float(value), float(full.index[low]), float(full.index[high]), level))
    counts = None
    if candidates is not None:
        counts = (
            pd.Series(chosen).value_counts(normalize=True).reindex(sorted(set(candidates)), fill_value=0.0)
        )
        counts.index.name = "n_phases"
    columns = [f"boundary_{i + 1}" for i in range(n_phases - 1)]
    return BoundaryBootstrap(
        point=point, intervals=intervals, draws=pd.DataFrame(draws, columns=columns), counts=counts
    )
