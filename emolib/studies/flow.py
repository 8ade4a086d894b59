"""Information flow across layers: linear probes, CKA, the logit lens, and a tested segmentation into phases.

The paper describes a three-phase flow with emotion features emerging only in the last phase. Here that is a
hypothesis, not a premise: every layer gets per-item measurements (out-of-fold probe correctness beside a
shuffled-label control, the logit-lens probability of the gold label), the layer-by-metric profile is cut into
piecewise-constant phases by exact dynamic programming (ruptures' `Dynp`), the number of phases is chosen by a
penalised cost among candidates that include "no phases at all", and boundaries get intervals by resampling items
(`item_metric_profile` averages stored per-item values, so a resample refits nothing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ruptures as rpt
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformer_lens import HookedTransformer

from emolib.lm.batching import final_logprobs
from emolib.stats import Estimate, summarize
from emolib.studies.features import Selectivity, SelectivityConfig, selectivity


class FlowError(ValueError):
    """Inputs that cannot be probed, compared or segmented (shapes, lengths, classes, phase counts)."""


def _matrix(X, what: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise FlowError(f"{what} must be 2-D [n_items, n_features], got shape {X.shape}")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise FlowError(f"{what} needs at least 2 items and 1 feature, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise FlowError(f"{what} contains NaN or infinite values")
    return X


# ------------------------------------------------------------------------------------------------ probes


@dataclass(frozen=True)
class ProbeConfig:
    """A cross-validated multinomial logistic-regression probe (standardised features, L2 penalty `C`).

    `folds` is an upper bound: it drops to the smallest class's size (at least 2) so every fold holds every
    class. `control` also fits the same pipeline on permuted labels, the accuracy a probe reaches by memorising
    noise in these features. Intervals are percentile bootstraps over items (`n_boot`, `level`).
    """

    folds: int = 5
    C: float = 1.0
    max_iter: int = 2000
    control: bool = True
    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise FlowError(f"folds must be at least 2, not {self.folds}")
        if self.C <= 0:
            raise FlowError(f"C must be positive, not {self.C}")
        if not 0 < self.level < 1:
            raise FlowError(f"level must be in (0, 1), not {self.level}")


@dataclass
class ProbeResult:
    """Out-of-fold predictions of one probe, its accuracy and macro-F1, and the shuffled-label control."""

    labels: tuple[str, ...]
    predicted: np.ndarray
    correct: np.ndarray
    accuracy: Estimate
    macro_f1: Estimate
    control: Estimate | None
    chance_majority: float
    folds: int

    def as_row(self) -> dict[str, float]:
        """Flat numbers for a per-layer table."""
        row = {"accuracy": self.accuracy.value, "accuracy_low": self.accuracy.low}
        row |= {"accuracy_high": self.accuracy.high, "macro_f1": self.macro_f1.value}
        if self.control is not None:
            row |= {"control": self.control.value, "control_low": self.control.low}
            row["control_high"] = self.control.high
        return row | {"chance_majority": self.chance_majority, "folds": self.folds}


def _fold_count(y: np.ndarray, folds: int) -> int:
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) < 2:
        raise FlowError(f"a probe needs at least 2 classes, got {labels.tolist()}")
    smallest = int(counts.min())
    if smallest < 2:
        rare = labels[counts < 2].tolist()
        raise FlowError(
            f"classes {rare} have a single item: cross-validation cannot both train and test on them; "
            "drop or merge them"
        )
    if smallest < folds:
        rare = labels[counts == smallest].tolist()
        warnings.warn(
            f"probe folds reduced from {folds} to {smallest}: class {rare[0]!r} has only {smallest} items",
            UserWarning,
            stacklevel=3,
        )
        return smallest
    return folds


def _oof_predictions(X: np.ndarray, y: np.ndarray, folds: int, config: ProbeConfig) -> np.ndarray:
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=config.C, max_iter=config.max_iter))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    return cross_val_predict(probe, X, y, cv=cv)


def probe_accuracy(X, y, config: ProbeConfig | None = None) -> ProbeResult:
    """How well a linear probe reads the labels `y` [n] from features `X` [n, d], out of fold, beside its control.

    Each item is predicted by a probe that never saw it, so `correct` is a per-item outcome that later
    bootstraps can average without refitting. The control uses the same folds' pipeline on permuted labels:
    with many features and few items a probe can exceed chance on noise, and the control shows how far.
    """
    config = config or ProbeConfig()
    X = _matrix(X)
    y = np.asarray(y).astype(str)
    if y.ndim != 1 or len(y) != len(X):
        raise FlowError(f"y must be 1-D with one label per row of X ({len(X)}), got shape {y.shape}")
    folds = _fold_count(y, config.folds)
    labels = tuple(np.unique(y).tolist())
    predicted = _oof_predictions(X, y, folds, config)
    summary = summarize(y, predicted, labels, n_boot=config.n_boot, seed=config.seed, level=config.level)
    control = None
    if config.control:
        shuffled = np.random.default_rng(config.seed).permutation(y)
        control_predicted = _oof_predictions(X, shuffled, folds, config)
        control = summarize(
            shuffled, control_predicted, labels, n_boot=config.n_boot, seed=config.seed, level=config.level
        ).accuracy
    return ProbeResult(
        labels=labels,
        predicted=predicted,
        correct=predicted == y,
        accuracy=summary.accuracy,
        macro_f1=summary.macro_f1,
        control=control,
        chance_majority=summary.chance_majority,
        folds=folds,
    )


@dataclass
class LayerProbes:
    """One probe per layer: a table indexed by layer and the per-item correctness `[n_layers, n_items]`."""

    table: pd.DataFrame
    correct: np.ndarray
    results: dict[int, ProbeResult]


def probe_layers(activations: Mapping[int, np.ndarray], y, config: ProbeConfig | None = None) -> LayerProbes:
    """`probe_accuracy` at every layer of `{layer: X [n_items, d]}` with the same labels, folds and seed."""
    if not activations:
        raise FlowError("no layers to probe")
    results = {layer: probe_accuracy(X, y, config) for layer, X in activations.items()}
    table = pd.DataFrame([r.as_row() for r in results.values()], index=pd.Index(list(results), name="layer"))
    correct = np.stack([r.correct for r in results.values()])
    return LayerProbes(table=table, correct=correct, results=results)


# --------------------------------------------------------------------------------------------------- CKA


def linear_cka(X, Y) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same items, in [0, 1].

    Invariant to orthogonal transforms, isotropic scaling and translation (features are centred), so layers of
    different width or basis can be compared. Uses the n x n Gram form when items are fewer than features.
    """
    X, Y = _matrix(X, "X"), _matrix(Y, "Y")
    if len(X) != len(Y):
        raise FlowError(f"X and Y must describe the same items: {len(X)} rows vs {len(Y)}")
    X, Y = X - X.mean(axis=0), Y - Y.mean(axis=0)
    if len(X) < max(X.shape[1], Y.shape[1]):
        K, L = X @ X.T, Y @ Y.T
        cross, norm_x, norm_y = np.vdot(K, L), np.linalg.norm(K), np.linalg.norm(L)
    else:
        cross = np.linalg.norm(Y.T @ X) ** 2
        norm_x, norm_y = np.linalg.norm(X.T @ X), np.linalg.norm(Y.T @ Y)
    if norm_x == 0 or norm_y == 0:
        raise FlowError("CKA is undefined for a representation that is constant across items")
    return float(cross / (norm_x * norm_y))


def cka_matrix(activations: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """Linear CKA between every pair of layers of `{layer: X [n_items, d]}` (symmetric, ones on the diagonal)."""
    layers = list(activations)
    out = np.eye(len(layers))
    for i, a in enumerate(layers):
        for j in range(i + 1, len(layers)):
            out[i, j] = out[j, i] = linear_cka(activations[a], activations[layers[j]])
    index = pd.Index(layers, name="layer")
    return pd.DataFrame(out, index=index, columns=index.rename("layer_b"))


# -------------------------------------------------------------------------------------------- logit lens


@dataclass
class LensResult:
    """Logit-lens scores of label answers: `label_logprobs[i, j]` is log p(first token of label j) under the
    full vocabulary (summed over the label's tokens when it has several), not renormalised."""

    label_logprobs: np.ndarray

    @property
    def label_probs(self) -> np.ndarray:
        return np.exp(self.label_logprobs)

    @property
    def renormalised(self) -> np.ndarray:
        """The distribution over labels only, `[n, n_labels]`: which label the layer prefers, whatever its mass."""
        return softmax(self.label_logprobs, axis=1)

    @property
    def mass(self) -> np.ndarray:
        """Total probability of all label answers per item: how much the layer answers within the label set."""
        return self.label_probs.sum(axis=1)


def _token_groups(label_token_ids: Sequence[int | Sequence[int]]) -> list[list[int]]:
    groups = [[int(t)] if np.isscalar(t) else list(dict.fromkeys(int(i) for i in t)) for t in label_token_ids]
    if not groups or any(not g for g in groups):
        raise FlowError("label_token_ids needs at least one token id per label")
    seen: dict[int, int] = {}
    for j, group in enumerate(groups):
        for token in group:
            if seen.setdefault(token, j) != j:
                raise FlowError(
                    f"token {token} belongs to labels {seen[token]} and {j}: scores would be ambiguous"
                )
    return groups


def _readout_interventions(model: HookedTransformer) -> list[str]:
    hooked = [
        name
        for name, hook in model.hook_dict.items()
        if name.startswith(("ln_final.", "unembed.")) and (hook.fwd_hooks or hook.bwd_hooks)
    ]
    saes = [name for name in getattr(model, "acts_to_saes", {}) if name.startswith(("ln_final.", "unembed."))]
    return hooked + saes


def logit_lens(
    model: HookedTransformer,
    resid,
    label_token_ids: Sequence[int | Sequence[int]],
    *,
    batch_size: int = 64,
) -> LensResult:
    """Read residual vectors `resid` [n, d_model] of any layer through the model's final norm and unembedding.

    This is what the model would answer if the computation stopped at that layer (nostalgebraist's logit lens),
    with the same readout as the classifier (final norm, unembedding, logit soft cap, softmax over the whole
    vocabulary), so at the last layer it reproduces the model's own next-token probabilities. Each label is
    scored by its first token id (or the summed probability of several ids). Rows go through in batches so a
    large vocabulary is never materialised for all items at once.
    """
    groups = _token_groups(label_token_ids)
    ids = torch.tensor([t for g in groups for t in g])
    if int(ids.max()) >= model.cfg.d_vocab or int(ids.min()) < 0:
        raise FlowError(
            f"label token ids must be in [0, {model.cfg.d_vocab}), got {sorted(set(ids.tolist()))}"
        )
    intervened = _readout_interventions(model)
    if intervened:
        raise FlowError(f"hooks or SAEs are attached to the readout ({intervened}); remove them for the lens")
    resid = torch.as_tensor(np.asarray(resid) if not torch.is_tensor(resid) else resid)
    if resid.ndim != 2 or resid.shape[1] != model.cfg.d_model or resid.shape[0] == 0:
        raise FlowError(f"resid must be [n_items, d_model={model.cfg.d_model}], got {tuple(resid.shape)}")
    dtype = next(model.parameters()).dtype
    owner = torch.tensor([j for j, g in enumerate(groups) for _ in g])
    out = []
    with torch.inference_mode():
        for start in range(0, resid.shape[0], batch_size):
            chunk = resid[start : start + batch_size].to(device=model.cfg.device, dtype=dtype)
            picked = final_logprobs(model, chunk)[:, ids.to(chunk.device)].double().cpu()
            scores = torch.full((len(chunk), len(groups)), -torch.inf, dtype=torch.float64)
            for j in range(len(groups)):
                scores[:, j] = torch.logsumexp(picked[:, owner == j], dim=1)
            out.append(scores)
    return LensResult(label_logprobs=torch.cat(out).numpy())


def label_first_tokens(sequences: Sequence[tuple[int, Sequence[int]]], n_labels: int) -> list[list[int]]:
    """First token ids per label from `(label index, token ids)` pairs, e.g. an `EmotionClassifier.sequences`."""
    groups: list[list[int]] = [[] for _ in range(n_labels)]
    for j, ids in sequences:
        if not 0 <= j < n_labels or not ids:
            raise FlowError(f"bad verbaliser entry ({j}, {ids}) for {n_labels} labels")
        if ids[0] not in groups[j]:
            groups[j].append(int(ids[0]))
    missing = [j for j, g in enumerate(groups) if not g]
    if missing:
        raise FlowError(f"labels {missing} have no verbaliser")
    _token_groups(groups)  # a first token shared by two labels makes the lens ambiguous
    return groups


def at_gold(values, y, labels: Sequence[str]) -> np.ndarray:
    """Each item's value in its gold label's column: `values` [n, n_labels], `y` [n] -> [n]."""
    values = np.asarray(values)
    position = {label: j for j, label in enumerate(labels)}
    unknown = sorted({v for v in y if v not in position})
    if unknown:
        raise FlowError(f"gold labels {unknown} are not among {list(labels)}")
    if values.ndim != 2 or values.shape != (len(y), len(labels)):
        raise FlowError(f"values must be [n_items={len(y)}, n_labels={len(labels)}], got {values.shape}")
    return values[np.arange(len(y)), [position[v] for v in y]]


# ------------------------------------------------------------------------------------------------ phases


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
    sums = np.cumsum(noise, axis=1)
    t = np.arange(min_size, n - min_size + 1)  # first position of the second phase
    left = sums[:, t - 1] / t[:, None]
    right = (sums[:, -1:] - sums[:, t - 1]) / (n - t)[:, None]
    drop = ((t * (n - t) / n)[:, None] * (left - right) ** 2).sum(axis=2).max(axis=1)
    ratio = drop / np.maximum((s_sim**2).sum(axis=1), np.finfo(float).tiny)
    return float(np.quantile(ratio, level) * (s**2).sum())


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
) -> PhaseCountTest:
    """Which number of phases the profile supports, among `candidates`, by penalised least squares.

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
    return PhaseCountTest(
        table=table, chosen=candidates[chosen_at], penalty=penalty, segmentations=segmentations
    )


# ------------------------------------------------------------------------------------- item bootstraps


def item_metric_profile(values: Mapping[str, np.ndarray], indices=None, layers=None) -> pd.DataFrame:
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


# ------------------------------------------------------------------------------------- per-layer controls


def permutation_chance(predicted, gold) -> float:
    """Expected accuracy of fixed predictions against a random permutation of the gold labels.

    sum_j share(predicted = j) x share(gold = j): the control for a readout that is not fitted (such as the
    logit lens), where refitting on shuffled labels is impossible. It equals 1 / L for balanced gold labels and
    rises when the predictions collapse onto a frequent label.
    """
    predicted, gold = np.asarray(predicted).astype(str), np.asarray(gold).astype(str)
    if predicted.shape != gold.shape or predicted.ndim != 1 or len(gold) == 0:
        raise FlowError(
            f"predicted and gold need the same non-empty 1-D shape, got {predicted.shape}, {gold.shape}"
        )
    labels, inverse = np.unique(np.r_[predicted, gold], return_inverse=True)
    n = len(gold)
    share_pred = np.bincount(inverse[:n], minlength=len(labels)) / n
    share_gold = np.bincount(inverse[n:], minlength=len(labels)) / n
    return float(share_pred @ share_gold)


def consecutive_cka(activations: Mapping[int, np.ndarray], seed: int = 0) -> pd.DataFrame:
    """Linear CKA of each layer with the previous one (`cka`), beside a control with the previous layer's items
    permuted (`control`: the similarity two unrelated sets of the same representations reach by chance).

    The first layer has no predecessor and gets NaN.
    """
    layers = list(activations)
    if len(layers) < 2:
        raise FlowError("consecutive CKA needs at least two layers")
    rng = np.random.default_rng(seed)
    rows = [{"layer": layers[0], "cka": np.nan, "control": np.nan}]
    for before, layer in zip(layers, layers[1:], strict=False):
        X, Y = activations[before], activations[layer]
        rows.append(
            {
                "layer": layer,
                "cka": linear_cka(X, Y),
                "control": linear_cka(np.asarray(X)[rng.permutation(len(X))], Y),
            }
        )
    return pd.DataFrame(rows).set_index("layer")


@dataclass
class SelectiveCount:
    """Emotion-selective SAE features of one layer (features selective for at least one emotion) beside the
    same rule applied to permuted labels.

    `mass_share` is the share of all feature activation (summed over items and features) that the selective
    features carry; `null_counts` and `null_shares` are the same numbers for each label permutation.
    """

    selectivity: Selectivity
    count: int
    mass_share: float
    null_counts: np.ndarray
    null_shares: np.ndarray

    @property
    def p_value(self) -> float:
        """Permutation p-value of the count: (1 + #permutations with at least as many) / (1 + #permutations)."""
        return float((1 + (self.null_counts >= self.count).sum()) / (1 + len(self.null_counts)))

    @property
    def exceeds_null(self) -> bool:
        """More selective features than every permutation found (and at least one)."""
        return self.count > 0 and self.count > self.null_counts.max(initial=0)

    def row(self) -> dict[str, float]:
        return {
            "selective": self.count,
            "selective_null_mean": float(self.null_counts.mean()) if len(self.null_counts) else np.nan,
            "selective_null_max": float(self.null_counts.max()) if len(self.null_counts) else np.nan,
            "selective_p": self.p_value,
            "selective_exceeds_null": self.exceeds_null,
            "mass_share": self.mass_share,
            "mass_share_null_mean": float(self.null_shares.mean()) if len(self.null_shares) else np.nan,
            "mass_share_null_max": float(self.null_shares.max()) if len(self.null_shares) else np.nan,
        }


def _mass_share(codes: np.ndarray, chosen: np.ndarray) -> float:
    total = float(codes.sum())
    return float(codes[:, chosen].sum()) / total if total > 0 else np.nan


def selective_with_null(
    codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig | None = None,
    *,
    n_shuffles: int = 20,
    seed: int = 0,
) -> SelectiveCount:
    """`features.selectivity` of SAE codes `[n_items, d_sae]` and, on `n_shuffles` seeded label permutations, how
    many features the same rule finds by chance and how much activation they carry.

    Permuting keeps the codes, class sizes and the label-blind feature filter, as `features.shuffled_control`
    does; this also returns each permutation's selective set's mass share, so the share has a control too.
    """
    config = config or SelectivityConfig()
    if n_shuffles < 1:
        raise FlowError(f"n_shuffles must be at least 1, not {n_shuffles}")
    codes = _matrix(codes, "codes")
    if (codes < 0).any():
        raise FlowError("SAE codes must be non-negative (feature activations)")
    labels = np.asarray(labels).astype(str)
    observed = selectivity(codes, labels, emotions, config)
    chosen = observed.selective.any(axis=1)
    rng = np.random.default_rng(seed)
    counts, shares = [], []
    for _ in range(n_shuffles):
        null = selectivity(codes, rng.permutation(labels), emotions, config).selective.any(axis=1)
        counts.append(int(null.sum()))
        shares.append(_mass_share(codes, null))
    return SelectiveCount(
        selectivity=observed,
        count=int(chosen.sum()),
        mass_share=_mass_share(codes, chosen),
        null_counts=np.array(counts),
        null_shares=np.array(shares),
    )


# ------------------------------------------------------------------------------------ features over tokens


@dataclass
class TokenCodes:
    """SAE codes of every stored token of some prompts at one layer, with where each row comes from."""

    codes: np.ndarray
    is_template: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    token_ids: np.ndarray


def token_codes(store, hook: str, encode: Callable, text_masks: Sequence[np.ndarray]) -> TokenCodes:
    """All-token SAE codes of one hook of an `ActivationStore` (mode "all"), each row marked template or text.

    `encode` maps a `[rows, d_model]` float tensor to codes (e.g. `sae.encode`); `text_masks[s][p]` is True when
    token `p` of sequence `s` belongs to the text (False: template), as `AnalysisSet.text_masks` gives them.
    """
    sequence = np.asarray(store.sequence_index())
    position = np.asarray(store.positions())
    if len(sequence) == 0:
        raise FlowError("the store holds no rows")
    if sequence.max() >= len(text_masks):
        raise FlowError(f"the store has sequence {sequence.max()} but only {len(text_masks)} text masks")
    lengths = np.array([len(m) for m in text_masks])
    if (position >= lengths[sequence]).any():
        raise FlowError("a stored position lies beyond its sequence's text mask")
    is_text = np.array([bool(text_masks[s][p]) for s, p in zip(sequence, position, strict=True)])
    with torch.no_grad():
        codes = encode(store.load(hook).float())
    codes = codes.detach().cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
    return TokenCodes(
        codes=codes,
        is_template=~is_text,
        sequence=sequence,
        position=position,
        token_ids=np.asarray(store.token_ids()),
    )


def top_tokens(
    values,
    tokens: TokenCodes,
    prompts: Sequence[Sequence[int]],
    decode: Callable,
    k: int = 5,
    window: int = 6,
) -> pd.DataFrame:
    """The `k` stored tokens on which one feature fires most (`values`: its codes over `tokens`' rows), each with
    up to `window` tokens of left context and the firing token in [[brackets]]; only active rows are listed."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(tokens.sequence),):
        raise FlowError(
            f"values need one entry per stored token ({len(tokens.sequence)}), got {values.shape}"
        )
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0][:k]
    rows = []
    for rank, r in enumerate(order, start=1):
        s, p = int(tokens.sequence[r]), int(tokens.position[r])
        left = decode(list(prompts[s][max(0, p - window) : p]))
        rows.append(
            {
                "rank": rank,
                "activation": float(values[r]),
                "token": decode([int(tokens.token_ids[r])]),
                "context": f"{left}[[{decode([int(tokens.token_ids[r])])}]]".replace("\n", "⏎"),
                "template": bool(tokens.is_template[r]),
            }
        )
    return pd.DataFrame(rows, columns=["rank", "activation", "token", "context", "template"])


def role_mass_shares(codes, roles: Sequence[str], categories: Sequence[str]) -> dict[str, float]:
    """Share of the total activation of `codes` `[n_items, d_sae]` carried by the features of each role."""
    codes = _matrix(codes, "codes")
    roles = np.asarray(roles).astype(str)
    if roles.shape != (codes.shape[1],):
        raise FlowError(f"roles need one entry per feature ({codes.shape[1]}), got {roles.shape}")
    per_feature = codes.sum(axis=0)
    total = float(per_feature.sum())
    return {c: (float(per_feature[roles == c].sum()) / total if total > 0 else np.nan) for c in categories}


# --------------------------------------------------------------------------------------------- verdicts

VERDICTS = ("holds", "partly", "does not hold", "inconclusive")


def three_phase_verdict(chosen: int, at_largest: bool, share_three: float | None) -> tuple[str, str]:
    """Verdict on "three phases" from the phase-count test and its bootstrap.

    holds: the test chooses 3 and at least half of the item resamples do too; partly: it chooses 3 but fewer
    than half of the resamples do, or it chooses another count while at least a quarter of the resamples choose
    3; inconclusive: the largest candidate wins (a smooth trend or more phases than tested: no count is
    supported); does not hold: otherwise. `share_three` is the share of resamples choosing 3 (None: no bootstrap).
    """
    share = np.nan if share_three is None else float(share_three)
    boot = "no bootstrap" if share_three is None else f"{share:.0%} of item resamples choose three"
    if at_largest:
        return (
            "inconclusive",
            f"the largest candidate ({chosen} phases) wins: no small phase count fits ({boot})",
        )
    if chosen == 3:
        if share_three is None or share >= 0.5:
            return "holds", f"the test chooses three phases ({boot})"
        return "partly", f"the test chooses three phases, but only {boot}"
    if share_three is not None and share >= 0.25:
        return "partly", f"the test chooses {chosen} phase(s); {boot}"
    return "does not hold", f"the test chooses {chosen} phase(s), not three ({boot})"


def late_emergence_verdict(present: pd.Series, excess: pd.Series, phase: pd.Series) -> tuple[str, str]:
    """Verdict on "emotion features emerge only in the last phase" from per-layer results.

    `present[layer]`: the layer has more emotion-selective features than every label permutation; `excess`:
    observed minus null-mean count (clipped at 0); `phase`: phase number per layer (1-based). inconclusive: no
    layer has features beyond the null; holds: every such layer is in the last phase; partly: some are earlier,
    but the last phase holds at least half of the summed excess; does not hold: otherwise.
    """
    present, excess, phase = present.astype(bool), excess.clip(lower=0), phase.astype(int)
    if not (present.index.equals(excess.index) and present.index.equals(phase.index)):
        raise FlowError("present, excess and phase must be indexed by the same layers")
    last = int(phase.max())
    layers = present.index[present.to_numpy()]
    if len(layers) == 0:
        return "inconclusive", "no layer has more emotion-selective features than the shuffled-label control"
    in_last = phase[layers] == last
    total = float(excess[present].sum())
    share_last = float(excess[present & (phase == last)].sum()) / total if total > 0 else np.nan
    first = layers[0]
    where = f"first at layer {first} (phase {phase[first]} of {last}); {share_last:.0%} of the excess in the last phase"
    if in_last.all():
        return "holds", f"emotion-selective features beyond the control only in the last phase: {where}"
    if in_last.any() and share_last >= 0.5:
        return "partly", f"emotion-selective features beyond the control also before the last phase: {where}"
    return (
        "does not hold",
        f"emotion-selective features beyond the control mostly before the last phase: {where}",
    )


def phase_roles_verdict(shares: pd.DataFrame) -> tuple[str, str]:
    """Verdict on "syntax, then content, then emotion": `shares` (index: phase 1..3, columns template, content,
    emotion) holds each role's mean share of last-token activation per phase.

    Counts which of three expectations hold: template share highest in phase 1, content share highest in phase
    2, emotion share highest in phase 3. holds: 3 of 3; partly: 2; does not hold: 0 or 1; inconclusive: no
    emotion-feature activation anywhere or not three phases.
    """
    if len(shares) != 3 or not {"template", "content", "emotion"} <= set(shares.columns):
        return "inconclusive", "needs three phases with template, content and emotion shares"
    if not np.nansum(shares["emotion"].to_numpy()) > 0:
        return "inconclusive", "no emotion-selective feature is active at the last token"
    peaks = {role: int(shares[role].astype(float).idxmax()) for role in ("template", "content", "emotion")}
    met = [
        role
        for role, want in zip(("template", "content", "emotion"), (1, 2, 3), strict=True)
        if peaks[role] == want
    ]
    reason = ", ".join(f"{role} peaks in phase {p}" for role, p in peaks.items())
    verdict = {3: "holds", 2: "partly"}.get(len(met), "does not hold")
    return verdict, f"{reason} (expected 1, 2, 3: {len(met)} of 3 as expected)"


def mean_interval(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-item `values` with a percentile-bootstrap interval over items."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise FlowError(f"values must be a non-empty finite 1-D array, got shape {values.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise FlowError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    draws = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    means = values[draws].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(float(values.mean()), float(low), float(high), level)


# ------------------------------------------------------------------------------------- phases for later chapters


def phases_from_results(
    record: Mapping, model: str, *, n_phases: int = 3, subset: str = "all"
) -> dict[str, tuple[int, ...]]:
    """The layers of each phase of `model`'s best `n_phases`-phase cut, from the flow chapter's results.

    Reads `record["models"][model]["subsets"][subset]["boundaries"][str(n_phases)]["phases"]` (a list of
    [first, last] layers) as `read_results("flow")` returns it, and gives `{"phase 1": (0, 1, ...), ...}`, so
    later chapters stratify by the same phases chapter 1 found. Missing keys raise, naming what is there.
    """
    models = record.get("models", {})
    if model not in models:
        raise FlowError(
            f"the flow results have no model {model!r} (have {sorted(models)}): run chapter 01_flow with it"
        )
    subsets = models[model].get("subsets", {})
    if subset not in subsets or "boundaries" not in subsets[subset]:
        raise FlowError(
            f"the flow results for {model!r} have no boundaries for the subset {subset!r} "
            f"(subsets: {sorted(subsets)})"
        )
    cuts = subsets[subset]["boundaries"]
    if str(n_phases) not in cuts:
        raise FlowError(
            f"the flow results for {model!r} ({subset}) have no {n_phases}-phase cut (have {sorted(cuts)})"
        )
    bounds = cuts[str(n_phases)]["phases"]
    phases = {
        f"phase {i}": tuple(range(int(first), int(last) + 1)) for i, (first, last) in enumerate(bounds, 1)
    }
    layers = [layer for members in phases.values() for layer in members]
    if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
        raise FlowError(f"the {n_phases}-phase cut of {model!r} is not contiguous: {bounds}")
    return phases
