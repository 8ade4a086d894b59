"""Which SAE features carry emotion: selectivity with its controls, shared and specific sets, overlap,
diffuseness, co-activation, feature roles over the prompt, and feature cards.

The paper claims that emotion representations mix shared and emotion-specific features, that Disgust is more
diffuse, and that Surprise co-activates across emotions. Each function turns SAE codes (`[n_items, d_sae]`
feature activations, non-negative and mostly zero) and gold labels into the numbers behind one of those claims,
together with the control or interval needed to believe them:

- `selectivity`: one-vs-rest AUROC, Mann-Whitney p-values and Benjamini-Hochberg q-values per feature x emotion;
  `shuffled_control` runs the same procedure on permuted labels, so every count stands beside its null.
- `bootstrap_selectivity` resamples items within each label; `shared_specific`, `diffuseness` and
  `compare_diffuseness` turn the draws into intervals and paired differences.
- `jaccard`, `intersections` and `upset_figure`: how the emotions' selective sets overlap.
- `coactivation`: how strongly one emotion's features fire on the items of the others.
- `feature_roles`: template / emotion / content / inactive features over all tokens of the prompts.
- `top_activating` and `promoted_tokens`: the two halves of a feature card.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.special import entr
from scipy.stats import false_discovery_control, mannwhitneyu, rankdata

from emolib.stats import Estimate, _interval

#: Label of the pooled emotional items in `contrast_labels` (any emotion vs neutral).
EMOTIONAL = "emotional"

#: Rows added to per-emotion counts: features selective for any emotion, for exactly one, for two or more.
TOTALS = ("any", "specific", "shared")

CRITERIA = ("full", "auroc")
MASSES = ("auroc", "mean_diff")
SUPPORTS = ("selective", "all")
MEASURES = ("k50", "k80", "entropy", "effective_n")
ROLES = ("emotion", "template", "content", "inactive")

#: A set of feature ids per emotion (what `Selectivity.sets` returns).
EmotionSets = Mapping[str, Collection[int]]


class FeatureError(ValueError):
    """Inputs that do not fit: unknown labels, mismatched shapes, classes too small to test, bad options."""


def _array(values, name: str, ndim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise FeatureError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{name} contains NaN or infinite values")
    return array


def _choice(value: str, allowed: Sequence[str], name: str) -> None:
    if value not in allowed:
        raise FeatureError(f"{name} must be one of {list(allowed)}, not {value!r}")


# ------------------------------------------------------------------------------------------------ selectivity


@dataclass(frozen=True)
class SelectivityConfig:
    """When a feature counts as selective for an emotion (one emotion's items against all other items).

    Selective means all three of: AUROC >= `auroc_threshold` (an effect size: at 0.7 a random item of the
    emotion out-activates a random other item 70% of the time, ties counting half); Benjamini-Hochberg q < `alpha`
    over every feature x emotion test (two-sided Mann-Whitney p-values, so a count of selective features is a
    discovery count with controlled false-discovery rate); and a higher mean activation on the emotion's items
    than on the others (AUROC alone ranks high a feature that fires weakly but often on the emotion while firing
    rarely but strongly elsewhere). BH bounds the false share among all rejected tests, in either direction;
    among the features kept as more active it can be higher, which is one reason for the AUROC threshold (and for
    `shuffled_control`, which measures what the whole rule finds by chance).

    A feature is active on an item when its code exceeds `active_threshold`. Features active on fewer than
    `min_active_items` items, or constant, are not tested (a label-blind filter, so BH stays valid) and are
    counted. An emotion with fewer than `min_items` items raises.
    """

    auroc_threshold: float = 0.7
    alpha: float = 0.05
    active_threshold: float = 0.0
    min_active_items: int = 1
    min_items: int = 10

    def __post_init__(self) -> None:
        if not 0.5 <= self.auroc_threshold <= 1:
            raise FeatureError(f"auroc_threshold must be in [0.5, 1], not {self.auroc_threshold}")
        if not 0 < self.alpha < 1:
            raise FeatureError(f"alpha must be in (0, 1), not {self.alpha}")
        if self.min_items < 1 or self.min_active_items < 1:
            raise FeatureError("min_items and min_active_items must be at least 1")


@dataclass(frozen=True)
class Selectivity:
    """Per feature x emotion statistics (arrays `[d_sae, n_emotions]`; NaN where a feature was not tested).

    `mean_in` is the mean activation on the emotion's items (so also the per-emotion class mean), `mean_out` on
    all other items; `rate_in` the share of the emotion's items on which the feature is active; `frequency` the
    share of all items. `selective` applies the full rule of `SelectivityConfig`; `matrix("auroc")` the
    effect-size half only (what `bootstrap_selectivity` uses by default).
    """

    emotions: tuple[str, ...]
    class_sizes: tuple[int, ...]
    config: SelectivityConfig
    auroc: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray
    rate_in: np.ndarray
    frequency: np.ndarray
    tested: np.ndarray
    selective: np.ndarray

    @property
    def n_features(self) -> int:
        return self.auroc.shape[0]

    @property
    def n_tested(self) -> int:
        return int(self.tested.sum())

    @property
    def n_never_active(self) -> int:
        """Features active on no item at all (dead for this data); excluded from testing."""
        return int((self.frequency == 0).sum())

    @property
    def n_untested(self) -> int:
        """Features not tested: never active, active on fewer than `min_active_items` items, or constant."""
        return self.n_features - self.n_tested

    def _columns(self, among: Sequence[str] | None) -> list[int]:
        if among is None:
            return list(range(len(self.emotions)))
        unknown = [e for e in among if e not in self.emotions]
        if unknown:
            raise FeatureError(f"emotions {unknown} are not among this selectivity's {list(self.emotions)}")
        return [self.emotions.index(e) for e in among]

    def matrix(self, criterion: str = "full", among: Sequence[str] | None = None) -> np.ndarray:
        """Boolean `[d_sae, len(among)]`: selective by the full rule, or by the AUROC-only rule ("auroc")."""
        _choice(criterion, CRITERIA, "criterion")
        if criterion == "full":
            chosen = self.selective
        else:
            chosen = _effect_rule(self.auroc, self.mean_in, self.mean_out, self.config) & self.tested[:, None]
        return chosen[:, self._columns(among)]

    def sets(self, criterion: str = "full", among: Sequence[str] | None = None) -> dict[str, frozenset[int]]:
        """The selective feature ids of each emotion."""
        names = list(among) if among is not None else list(self.emotions)
        chosen = self.matrix(criterion, names)
        return {e: frozenset(np.flatnonzero(chosen[:, j]).tolist()) for j, e in enumerate(names)}

    def counts(self, criterion: str = "full") -> dict[str, int]:
        """Selective features per emotion, then `any`, `specific` (exactly one emotion), `shared` (two or more)."""
        return _count_row(self.matrix(criterion), self.emotions)

    def table(self, emotion: str | None = None, only_selective: bool = True) -> pd.DataFrame:
        """A long table (feature, emotion, auroc, q, means, rate, selective), strongest AUROC first."""
        features, cols = np.nonzero(
            self.selective if only_selective else self.tested[:, None] & ~np.isnan(self.auroc)
        )
        frame = pd.DataFrame(
            {
                "feature": features,
                "emotion": [self.emotions[c] for c in cols],
                "auroc": self.auroc[features, cols],
                "p_value": self.p_value[features, cols],
                "q_value": self.q_value[features, cols],
                "mean_in": self.mean_in[features, cols],
                "mean_out": self.mean_out[features, cols],
                "rate_in": self.rate_in[features, cols],
                "selective": self.selective[features, cols],
            }
        )
        if emotion is not None:
            self._columns([emotion])
            frame = frame[frame["emotion"] == emotion]
        return frame.sort_values(["auroc", "feature"], ascending=[False, True], ignore_index=True)


def _effect_rule(auroc: np.ndarray, mean_in: np.ndarray, mean_out: np.ndarray, config: SelectivityConfig):
    with np.errstate(invalid="ignore"):
        return (np.nan_to_num(auroc, nan=0.0) >= config.auroc_threshold) & (mean_in > mean_out)


def _count_row(selective: np.ndarray, emotions: Sequence[str]) -> dict[str, int]:
    per_feature = selective.sum(axis=1)
    row = {e: int(n) for e, n in zip(emotions, selective.sum(axis=0), strict=True)}
    row.update(
        any=int((per_feature >= 1).sum()),
        specific=int((per_feature == 1).sum()),
        shared=int((per_feature >= 2).sum()),
    )
    return row


def _encode(labels: Sequence[str], emotions: Sequence[str], n_items: int, min_items: int) -> np.ndarray:
    """Label indices into `emotions`, after checking labels, counts and class sizes (with errors naming them)."""
    emotions = tuple(emotions)
    if len(emotions) < 2:
        raise FeatureError(f"one-vs-rest needs at least two emotions, got {list(emotions)}")
    if len(set(emotions)) != len(emotions):
        raise FeatureError(f"emotions are repeated: {list(emotions)}")
    labels = list(labels)
    if len(labels) != n_items:
        raise FeatureError(f"codes have {n_items} rows (items) but there are {len(labels)} labels")
    position = {e: i for i, e in enumerate(emotions)}
    unknown = sorted({str(v) for v in labels if v not in position})
    if unknown:
        raise FeatureError(f"labels {unknown} are not in emotions {list(emotions)}")
    y = np.fromiter((position[v] for v in labels), dtype=np.int64, count=n_items)
    sizes = np.bincount(y, minlength=len(emotions))
    small = {e: int(n) for e, n in zip(emotions, sizes, strict=True) if n < min_items}
    if small:
        raise FeatureError(
            f"too few items for emotions {small}: each needs at least {min_items} (SelectivityConfig.min_items)"
        )
    return y


def _prepare(
    codes, labels, emotions, config: SelectivityConfig
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    acts = _array(codes, "codes", 2)
    y = _encode(labels, emotions, acts.shape[0], config.min_items)
    return acts, y, tuple(emotions)


def _testable(acts: np.ndarray, config: SelectivityConfig) -> np.ndarray:
    """Label-blind filter: active on enough items and not constant."""
    n_active = (acts > config.active_threshold).sum(axis=0)
    return (n_active >= config.min_active_items) & (acts.max(axis=0) > acts.min(axis=0))


def _compute(
    acts: np.ndarray,
    y: np.ndarray,
    emotions: tuple[str, ...],
    config: SelectivityConfig,
    allowed: np.ndarray | None,
) -> Selectivity:
    n, d = acts.shape
    n_emotions = len(emotions)
    onehot = np.eye(n_emotions)[y]
    sizes = onehot.sum(axis=0)
    active = acts > config.active_threshold
    sums = acts.T @ onehot
    mean_in = sums / sizes
    mean_out = (sums.sum(axis=1, keepdims=True) - sums) / (n - sizes)
    rate_in = active.T.astype(np.float64) @ onehot / sizes
    tested = _testable(acts, config) if allowed is None else allowed & (acts.max(axis=0) > acts.min(axis=0))
    auroc = np.full((d, n_emotions), np.nan)
    p_value = np.full((d, n_emotions), np.nan)
    q_value = np.full((d, n_emotions), np.nan)
    cols = np.flatnonzero(tested)
    if cols.size:
        acts_t = acts[:, cols]
        for e in range(n_emotions):
            inside = y == e
            # U of the emotion's items; midranks handle the many ties at zero; AUROC = U / (n_pos n_neg).
            result = mannwhitneyu(acts_t[inside], acts_t[~inside], axis=0, method="asymptotic")
            auroc[cols, e] = result.statistic / (sizes[e] * (n - sizes[e]))
            p_value[cols, e] = result.pvalue
        q_value[cols] = false_discovery_control(p_value[cols].ravel(), method="bh").reshape(-1, n_emotions)
    with np.errstate(invalid="ignore"):
        significant = np.nan_to_num(q_value, nan=1.0) < config.alpha
    selective = tested[:, None] & significant & _effect_rule(auroc, mean_in, mean_out, config)
    return Selectivity(
        emotions=emotions,
        class_sizes=tuple(int(s) for s in sizes),
        config=config,
        auroc=auroc,
        p_value=p_value,
        q_value=q_value,
        mean_in=mean_in,
        mean_out=mean_out,
        rate_in=rate_in,
        frequency=active.mean(axis=0),
        tested=tested,
        selective=selective,
    )


def selectivity(
    codes, labels: Sequence[str], emotions: Sequence[str], config: SelectivityConfig = SelectivityConfig()
) -> Selectivity:
    """One-vs-rest selectivity of every feature for every emotion (see `SelectivityConfig` for the rule).

    `codes` is `[n_items, d_sae]` (numpy or torch), `labels` the gold emotion of each item, all in `emotions`.
    """
    acts, y, emotions = _prepare(codes, labels, emotions, config)
    return _compute(acts, y, emotions, config, allowed=None)


def contrast_labels(labels: Sequence[str], neutral: str = "neutral") -> tuple[list[str], tuple[str, str]]:
    """Labels recoded as `emotional` / `neutral`, with the two-class emotion list, for `selectivity` and its
    controls: features selective for `emotional` carry general emotional content rather than one emotion."""
    labels = list(labels)
    if neutral not in labels:
        raise FeatureError(f"no item is labelled {neutral!r}: general emotional features need neutral items")
    if all(v == neutral for v in labels):
        raise FeatureError("every item is neutral: general emotional features need emotional items")
    return [neutral if v == neutral else EMOTIONAL for v in labels], (EMOTIONAL, neutral)


def emotional_vs_neutral(
    codes, labels: Sequence[str], config: SelectivityConfig = SelectivityConfig(), neutral: str = "neutral"
) -> Selectivity:
    """Selectivity of emotional items (any emotion) against neutral ones; `.sets()["emotional"]` are the features
    of general emotional content. With two classes the two columns are mirror tests (AUROCs add to 1, same
    p-value), so BH counts each feature twice: slightly conservative."""
    return selectivity(codes, *contrast_labels(labels, neutral), config)


# ------------------------------------------------------------------------------------------ shuffled control


@dataclass(frozen=True)
class NullCounts:
    """Selective-feature counts on label permutations: one row per shuffle, one column per emotion and `TOTALS`."""

    emotions: tuple[str, ...]
    counts: pd.DataFrame
    seed: int

    def summary(self, observed: Selectivity) -> pd.DataFrame:
        """Observed counts beside the null: mean, 95th percentile, maximum, and the permutation p-value
        (1 + #shuffles with at least as many) / (1 + #shuffles)."""
        if observed.emotions != self.emotions:
            raise FeatureError(
                f"observed emotions {observed.emotions} differ from the null's {self.emotions}"
            )
        seen = pd.Series(observed.counts())
        n = len(self.counts)
        return pd.DataFrame(
            {
                "observed": seen,
                "null_mean": self.counts.mean(),
                "null_q95": self.counts.quantile(0.95),
                "null_max": self.counts.max(),
                "p_value": (1 + (self.counts >= seen).sum()) / (1 + n),
            }
        )


def shuffled_control(
    codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    n_shuffles: int = 20,
    seed: int = 0,
) -> NullCounts:
    """The full selectivity procedure on `n_shuffles` seeded permutations of the labels.

    Permuting keeps the codes, the class sizes and the feature filter and breaks only the link to the labels, so
    the counts are what the procedure finds by chance on this very data (a check of the FDR control, and the
    yardstick for every observed count). Costs `n_shuffles` calls of `selectivity`.
    """
    if n_shuffles < 1:
        raise FeatureError(f"n_shuffles must be at least 1, not {n_shuffles}")
    acts, y, emotions = _prepare(codes, labels, emotions, config)
    allowed = _testable(acts, config)
    rng = np.random.default_rng(seed)
    rows = [
        _count_row(_compute(acts, rng.permutation(y), emotions, config, allowed).selective, emotions)
        for _ in range(n_shuffles)
    ]
    return NullCounts(emotions=emotions, counts=pd.DataFrame(rows), seed=seed)


# ------------------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapConfig:
    """Resampling items with replacement within each label (class sizes stay as in the data), seeded.

    `criterion="auroc"` (default) re-decides selectivity in each resample by the effect-size half of the rule
    (AUROC >= threshold and more active on the emotion), from a single ranking of all items per resample instead
    of one Mann-Whitney test per emotion plus a BH pass: several times cheaper. At this project's class sizes a
    feature with AUROC >= 0.7 has a p-value far below the BH cut-off, so the dropped q-condition rarely binds;
    the point estimates reported beside these intervals use the same criterion, so value and interval agree.
    `criterion="full"` reruns `selectivity` on every resample (exact, `n_boot` times its cost).
    """

    n_boot: int = 200
    seed: int = 0
    level: float = 0.95
    criterion: str = "auroc"

    def __post_init__(self) -> None:
        _choice(self.criterion, CRITERIA, "criterion")
        if self.n_boot < 2:
            raise FeatureError(f"n_boot must be at least 2, not {self.n_boot}")
        if not 0 < self.level < 1:
            raise FeatureError(f"level must be in (0, 1), not {self.level}")


@dataclass(frozen=True)
class SelectivityDraws:
    """Bootstrap resamples of selectivity: arrays `[n_boot, d_sae, n_emotions]` (AUROC NaN where untested)."""

    emotions: tuple[str, ...]
    config: BootstrapConfig
    auroc: np.ndarray
    mean_diff: np.ndarray
    selective: np.ndarray


def bootstrap_selectivity(
    codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    boot: BootstrapConfig = BootstrapConfig(),
) -> SelectivityDraws:
    """Selectivity on `boot.n_boot` item resamples stratified by label (see `BootstrapConfig` for the criterion).

    One set of draws serves `shared_specific`, `diffuseness` and `compare_diffuseness`, so their intervals come
    from the same resamples.
    """
    acts, y, emotions = _prepare(codes, labels, emotions, config)
    n, d = acts.shape
    n_emotions = len(emotions)
    allowed = _testable(acts, config)
    cols = np.flatnonzero(allowed)
    members = [np.flatnonzero(y == e) for e in range(n_emotions)]
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    y_sorted = np.repeat(np.arange(n_emotions), sizes.astype(int))  # resamples are laid out class by class
    onehot = np.eye(n_emotions)[y_sorted]
    shape = (boot.n_boot, d, n_emotions)
    auroc = np.full(shape, np.nan, dtype=np.float32)
    mean_diff = np.zeros(shape, dtype=np.float32)
    selective = np.zeros(shape, dtype=bool)
    rng = np.random.default_rng(boot.seed)
    for b in range(boot.n_boot):
        index = np.concatenate([m[rng.integers(0, len(m), size=len(m))] for m in members])
        acts_b = acts[index]
        if boot.criterion == "full":
            result = _compute(acts_b, y_sorted, emotions, config, allowed)
            auroc[b], mean_diff[b], selective[b] = (
                result.auroc,
                result.mean_in - result.mean_out,
                result.selective,
            )
            continue
        acts_t = acts_b[:, cols]
        rank_sums = rankdata(acts_t, axis=0).T @ onehot  # [n_tested, n_emotions]; midranks for ties
        u = rank_sums - sizes * (sizes + 1) / 2
        sums = acts_t.T @ onehot
        diff = sums / sizes - (sums.sum(axis=1, keepdims=True) - sums) / (n - sizes)
        auroc[b, cols] = u / (sizes * (n - sizes))
        mean_diff[b, cols] = diff
        selective[b, cols] = (auroc[b, cols] >= config.auroc_threshold) & (diff > 0)
    return SelectivityDraws(
        emotions=emotions, config=boot, auroc=auroc, mean_diff=mean_diff, selective=selective
    )


def _check_draws(sel: Selectivity, draws: SelectivityDraws) -> None:
    if draws.emotions != sel.emotions or draws.auroc.shape[1] != sel.n_features:
        raise FeatureError(
            f"draws ({draws.emotions}, {draws.auroc.shape[1]} features) do not match the selectivity "
            f"({sel.emotions}, {sel.n_features} features)"
        )


def _bounds(value: float, resampled: np.ndarray, level: float) -> Estimate:
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Estimate(float(value), float("nan"), float("nan"), level)
    return _interval(value, finite, level)


def _with_intervals(points: pd.DataFrame, resampled: Mapping[str, np.ndarray], level: float) -> pd.DataFrame:
    """`points` (rows x measures) with `<measure>_low` / `_high` columns from `resampled[measure]` `[n_boot, rows]`."""
    out = {}
    for measure in points.columns:
        out[measure] = points[measure]
        if measure in resampled:
            bounds = [_bounds(v, resampled[measure][:, i], level) for i, v in enumerate(points[measure])]
            out[f"{measure}_low"] = [b.low for b in bounds]
            out[f"{measure}_high"] = [b.high for b in bounds]
    frame = pd.DataFrame(out, index=points.index)
    frame.attrs["level"] = level
    return frame


# ------------------------------------------------------------------------------------------ shared / specific


def _shared_specific_counts(selective: np.ndarray) -> dict[str, np.ndarray]:
    """`[..., d, E]` -> per-emotion counts `[..., E + 1]` (last entry: over all emotions)."""
    per_feature = selective.sum(axis=-1, keepdims=True)
    specific = selective & (per_feature == 1)
    shared = selective & (per_feature >= 2)

    def with_total(per_emotion: np.ndarray, total: np.ndarray) -> np.ndarray:
        return np.concatenate([per_emotion, total[..., None]], axis=-1)

    return {
        "n_selective": with_total(selective.sum(axis=-2), (per_feature[..., 0] >= 1).sum(axis=-1)),
        "n_specific": with_total(specific.sum(axis=-2), (per_feature[..., 0] == 1).sum(axis=-1)),
        "n_shared": with_total(shared.sum(axis=-2), (per_feature[..., 0] >= 2).sum(axis=-1)),
    }


def shared_specific(
    sel: Selectivity, draws: SelectivityDraws | None = None, among: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per emotion: selective features, specific ones (selective for this emotion only) and shared ones (also for
    at least one other emotion); a last row `any` counts features over all emotions.

    `among` restricts the emotions considered (e.g. without neutral: a feature shared only with neutral then counts
    as specific). With `draws`, `_low` / `_high` columns give bootstrap intervals and the point values use the
    draws' criterion; without, the full rule.
    """
    names = list(among) if among is not None else list(sel.emotions)
    criterion = draws.config.criterion if draws is not None else "full"
    points = pd.DataFrame(_shared_specific_counts(sel.matrix(criterion, names)), index=[*names, "any"])
    points.index.name = "emotion"
    if draws is None:
        return points
    _check_draws(sel, draws)
    columns = sel._columns(names)
    return _with_intervals(points, _shared_specific_counts(draws.selective[..., columns]), draws.config.level)


# --------------------------------------------------------------------------------------------------- overlap


def jaccard(sets: EmotionSets) -> pd.DataFrame:
    """|A & B| / |A | B| between every two emotions' feature sets (NaN when both are empty)."""
    names = list(sets)
    as_sets = {e: set(sets[e]) for e in names}
    values = [
        [
            len(as_sets[a] & as_sets[b]) / len(union) if (union := as_sets[a] | as_sets[b]) else np.nan
            for b in names
        ]
        for a in names
    ]
    return pd.DataFrame(
        values, index=pd.Index(names, name="emotion"), columns=pd.Index(names, name="emotion")
    )


def intersections(sets: EmotionSets) -> pd.DataFrame:
    """UpSet data: every exact combination of emotions that some feature is selective for, with its features.

    Each feature is counted once, in the combination of all the emotions it belongs to (so the sizes add up to the
    number of features in any set). Columns: `combination` ("anger & disgust"), `emotions` (tuple), `degree`,
    `n_features`, `features`; largest first. `attrs` hold the emotions and their set sizes, for `upset_figure`.
    """
    names = list(sets)
    membership: dict[int, list[str]] = {}
    for name in names:
        for feature in sorted(set(sets[name])):
            membership.setdefault(int(feature), []).append(name)
    groups: dict[tuple[str, ...], list[int]] = {}
    for feature, combo in sorted(membership.items()):
        groups.setdefault(tuple(combo), []).append(feature)
    rows = [
        {"combination": " & ".join(c), "emotions": c, "degree": len(c), "n_features": len(f), "features": f}
        for c, f in groups.items()
    ]
    frame = pd.DataFrame(rows, columns=["combination", "emotions", "degree", "n_features", "features"])
    if rows:
        order = [tuple(names.index(e) for e in c) for c in frame["emotions"]]
        frame = frame.assign(_order=order).sort_values(
            ["n_features", "degree", "_order"], ascending=[False, True, True]
        )
        frame = frame.drop(columns="_order").reset_index(drop=True)
    frame.attrs.update(emotions=tuple(names), set_sizes={e: len(set(sets[e])) for e in names})
    return frame


def upset_figure(table: pd.DataFrame, top_n: int = 15, title: str | None = None) -> Figure:
    """UpSet-style figure of `intersections(...)`: bars of the `top_n` largest combinations over a dot matrix
    (a filled dot per emotion in the combination); rows are labelled with each emotion's set size."""
    emotions = list(table.attrs.get("emotions") or dict.fromkeys(e for c in table["emotions"] for e in c))
    sizes = table.attrs.get("set_sizes", {})
    shown = table.head(top_n)
    n = max(len(shown), 1)
    fig, (bars, dots) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(max(5.5, 0.45 * n + 2.0), 2.8 + 0.28 * len(emotions)),
        gridspec_kw={"height_ratios": [2.2, 0.25 * len(emotions) + 0.3]},
    )
    x = np.arange(len(shown))
    bars.bar(x, shown["n_features"], color="#444444", width=0.6)
    for xi, value in zip(x, shown["n_features"], strict=True):
        bars.text(xi, value, str(value), ha="center", va="bottom", fontsize=7)
    bars.set_ylabel("features")
    bars.grid(axis="x", visible=False)
    omitted = len(table) - len(shown)
    heading = title or "Features by exact combination of emotions"
    bars.set_title(heading + (f"\n(top {len(shown)} of {len(table)} combinations)" if omitted > 0 else ""))
    for xi, combo in zip(x, shown["emotions"], strict=True):
        rows = [emotions.index(e) for e in combo]
        dots.scatter([xi] * len(emotions), range(len(emotions)), s=30, color="#dddddd", zorder=1)
        dots.scatter([xi] * len(rows), rows, s=30, color="#222222", zorder=3)
        if len(rows) > 1:
            dots.plot([xi, xi], [min(rows), max(rows)], color="#222222", linewidth=1.5, zorder=2)
    dots.set_yticks(range(len(emotions)), [f"{e} ({sizes[e]})" if e in sizes else e for e in emotions])
    dots.set_ylim(len(emotions) - 0.5, -0.5)
    dots.set_xticks(x, [""] * len(x))
    dots.tick_params(axis="x", length=0)
    dots.set_xlim(-0.6, n - 0.4)
    dots.grid(False)
    for side in ("top", "right", "bottom"):
        dots.spines[side].set_visible(False)
    return fig


# ----------------------------------------------------------------------------------------------- diffuseness


@dataclass(frozen=True)
class DiffusenessConfig:
    """How an emotion's selectivity mass is defined and which features carry it.

    `mass="auroc"`: max(AUROC - 0.5, 0), a rank effect size comparable across features whatever their activation
    scale (SAE features differ in scale a lot, so with `"mean_diff"`, max(mean_in - mean_out, 0), a few
    large-norm features can hold most of the mass). `support="selective"`: only the emotion's selective features
    carry mass. With `"all"` every tested feature does, and thousands of null features each add sampling noise
    (|AUROC - 0.5| of a few hundredths at a hundred items) that can outweigh the signal and grows as classes
    shrink, making small classes look diffuse.
    """

    mass: str = "auroc"
    support: str = "selective"

    def __post_init__(self) -> None:
        _choice(self.mass, MASSES, "mass")
        _choice(self.support, SUPPORTS, "support")


def _concentration(mass: np.ndarray, n_reference: int) -> dict[str, np.ndarray]:
    """Vectorised `concentration` over the last axis."""
    mass = np.clip(np.nan_to_num(mass, nan=0.0), 0, None)
    total = mass.sum(axis=-1)
    has_mass = total > 0
    ordered = -np.sort(-mass, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.cumsum(ordered, axis=-1) / total[..., None]
        p = mass / total[..., None]
    out = {}
    for name, fraction in (("k50", 0.5), ("k80", 0.8)):
        k = (share < fraction - 1e-9).sum(axis=-1) + 1  # fewest largest features reaching the fraction
        out[name] = np.where(has_mass, k, 0).astype(np.float64)
    entropy = np.where(has_mass, entr(np.nan_to_num(p)).sum(axis=-1), np.nan)
    out["entropy"] = entropy / np.log(n_reference) if n_reference > 1 else np.full_like(entropy, np.nan)
    out["effective_n"] = np.exp(entropy)
    return out


def concentration(mass, n_reference: int | None = None) -> dict[str, float]:
    """How concentrated a mass vector is (negative entries and NaN count as zero).

    `k50` / `k80`: the fewest features, largest first, holding 50% / 80% of the mass (0 when there is no mass);
    `entropy`: Shannon entropy of the mass shares over log(`n_reference`) (default: the vector's length), 0 when
    one feature holds everything and 1 when all `n_reference` hold equal shares; `effective_n`: exp(entropy in
    nats), the number of equal features with the same entropy. Entropy is NaN without mass.
    """
    values = np.asarray(mass.detach().cpu() if isinstance(mass, torch.Tensor) else mass, dtype=np.float64)
    if values.ndim != 1:
        raise FeatureError(f"mass must be 1-D, got shape {values.shape}")
    n_reference = len(values) if n_reference is None else n_reference
    if n_reference < len(values):
        raise FeatureError(
            f"n_reference ({n_reference}) is smaller than the number of masses ({len(values)})"
        )
    return {name: float(v) for name, v in _concentration(values, n_reference).items()}


def _masses(
    auroc: np.ndarray,
    mean_diff: np.ndarray,
    selective: np.ndarray,
    tested: np.ndarray,
    config: DiffusenessConfig,
) -> np.ndarray:
    """`[..., d, E]` -> mass `[..., E, n_tested]` over the tested features."""
    base = auroc - 0.5 if config.mass == "auroc" else mean_diff
    mass = np.clip(np.nan_to_num(base, nan=0.0), 0, None)
    if config.support == "selective":
        mass = np.where(selective, mass, 0.0)
    return np.swapaxes(mass[..., tested, :], -1, -2)


def _diffuseness_arrays(
    sel: Selectivity, draws: SelectivityDraws | None, config: DiffusenessConfig, criterion: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    n_reference = max(sel.n_tested, 1)
    mass = _masses(sel.auroc, sel.mean_in - sel.mean_out, sel.matrix(criterion), sel.tested, config)
    point = {"n_support": (mass > 0).sum(axis=-1).astype(np.float64), **_concentration(mass, n_reference)}
    if draws is None:
        return point, None
    _check_draws(sel, draws)
    mass = _masses(draws.auroc, draws.mean_diff, draws.selective, sel.tested, config)
    return point, {
        "n_support": (mass > 0).sum(axis=-1).astype(np.float64),
        **_concentration(mass, n_reference),
    }


def diffuseness(
    sel: Selectivity, draws: SelectivityDraws | None = None, config: DiffusenessConfig = DiffusenessConfig()
) -> pd.DataFrame:
    """Per emotion: `n_support` (features with mass), `k50`, `k80`, `entropy` (normalised by log of the number of
    tested features) and `effective_n` of its selectivity mass (see `concentration`, `DiffusenessConfig`).

    A diffuse emotion spreads its mass over many features (large k50, k80, entropy). With `draws`, `_low` / `_high`
    columns give bootstrap intervals and point values use the draws' criterion; without, the full rule.
    """
    criterion = draws.config.criterion if draws is not None else "full"
    point, resampled = _diffuseness_arrays(sel, draws, config, criterion)
    points = pd.DataFrame(
        {m: point[m] for m in ("n_support", *MEASURES)}, index=pd.Index(sel.emotions, name="emotion")
    )
    if resampled is None:
        return points
    return _with_intervals(points, resampled, draws.config.level)


def compare_diffuseness(
    sel: Selectivity,
    draws: SelectivityDraws,
    emotion: str,
    measure: str = "k80",
    others: Sequence[str] | None = None,
    config: DiffusenessConfig = DiffusenessConfig(),
) -> pd.DataFrame:
    """Is `emotion` more diffuse than the others? Paired bootstrap differences of `measure` (emotion minus other,
    same resamples) against each other emotion and against the others' mean (row `others (mean)`).

    Columns: `difference` with `low` / `high`, and `share_more` (share of resamples where `emotion` is the more
    diffuse). An interval above zero says more diffuse. `others` defaults to every other emotion (pass the list
    without neutral to compare among emotions only).
    """
    _choice(measure, MEASURES, "measure")
    sel._columns([emotion])
    others = [e for e in sel.emotions if e != emotion] if others is None else list(others)
    sel._columns(others)
    if not others or emotion in others:
        raise FeatureError(
            f"others must be a non-empty list of emotions other than {emotion!r}, not {others}"
        )
    point, resampled = _diffuseness_arrays(sel, draws, config, draws.config.criterion)
    a = sel.emotions.index(emotion)
    columns = sel._columns(others)
    rows = {}
    for name, p_other, r_other in [
        *((o, point[measure][c], resampled[measure][:, c]) for o, c in zip(others, columns, strict=True)),
        ("others (mean)", point[measure][columns].mean(), resampled[measure][:, columns].mean(axis=1)),
    ]:
        diff = resampled[measure][:, a] - r_other
        estimate = _bounds(point[measure][a] - p_other, diff, draws.config.level)
        finite = diff[np.isfinite(diff)]
        share = float((finite > 0).mean()) if finite.size else float("nan")
        rows[name] = {
            "difference": estimate.value,
            "low": estimate.low,
            "high": estimate.high,
            "share_more": share,
        }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "versus"
    frame.attrs.update(emotion=emotion, measure=measure, level=draws.config.level)
    return frame


# ----------------------------------------------------------------------------------------------- coactivation


def coactivation(
    sel: Selectivity, specific_only: bool = False, among: Sequence[str] | None = None
) -> pd.DataFrame:
    """Row A, column B: how strongly A's selective features fire on B's items, relative to A's own items.

    For each feature selective for A, its mean activation on B's items over its mean on A's items, averaged over
    A's features (each feature normalised on its own, so a few large-scale features cannot dominate). The diagonal
    is 1; an off-diagonal row well above the others' (e.g. Surprise features firing on every emotion) is
    co-activation. `specific_only` keeps features selective for A alone, so overlap between selective sets does
    not count as co-activation. Rows without features are NaN; `attrs["n_features"]` gives each row's count.
    """
    names = list(among) if among is not None else list(sel.emotions)
    columns = sel._columns(names)
    chosen = sel.matrix("full", names)
    if specific_only:
        chosen = chosen & (chosen.sum(axis=1, keepdims=True) == 1)
    means = sel.mean_in[:, columns]
    values = np.full((len(names), len(names)), np.nan)
    for a in range(len(names)):
        features = np.flatnonzero(chosen[:, a])
        if features.size:
            values[a] = (means[features] / means[features, a : a + 1]).mean(axis=0)
    frame = pd.DataFrame(
        values, index=pd.Index(names, name="features of"), columns=pd.Index(names, name="items of")
    )
    frame.attrs["n_features"] = {e: int(chosen[:, j].sum()) for j, e in enumerate(names)}
    return frame


# ------------------------------------------------------------------------------------------------ token roles


@dataclass(frozen=True)
class RoleConfig:
    """Thresholds of `feature_roles`.

    `min_rate`: a feature active (code > `active_threshold`) on fewer than this share of all tokens, and not
    emotion-selective, is inactive. `template_share`: a feature is a template feature when its mean activation per
    template token is at least this share of (mean per template token + mean per content token); 0.8 means at
    least 4x as strong on the template. Means per token, not totals, because a prompt holds many more template
    tokens (instruction, label list, "Answer:") than text tokens.
    """

    min_rate: float = 1e-3
    template_share: float = 0.8
    active_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.template_share <= 1:
            raise FeatureError(f"template_share must be in [0.5, 1], not {self.template_share}")
        if not 0 <= self.min_rate < 1:
            raise FeatureError(f"min_rate must be in [0, 1), not {self.min_rate}")


def _token_chunks(token_codes, is_template) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    if isinstance(token_codes, np.ndarray | torch.Tensor):
        token_codes, is_template = [token_codes], [is_template]
    if len(token_codes) != len(is_template):
        raise FeatureError(f"{len(token_codes)} arrays of token codes but {len(is_template)} template masks")
    for i, (codes, mask) in enumerate(zip(token_codes, is_template, strict=True)):
        acts = _array(codes, f"token codes [{i}]", 2)
        m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        if m.dtype != bool:
            raise FeatureError(f"template mask [{i}] must be boolean, got {m.dtype}")
        if m.shape != (acts.shape[0],):
            raise FeatureError(
                f"template mask [{i}] has shape {m.shape}, expected ({acts.shape[0]},) (one per token)"
            )
        yield acts, m


def feature_roles(
    token_codes, is_template, emotion_selective, config: RoleConfig = RoleConfig()
) -> pd.DataFrame:
    """Classify every feature as "emotion", "template", "content" or "inactive" over all tokens of the prompts.

    `token_codes` is `[n_tokens, d_sae]` with `is_template` `[n_tokens]` (True on the prompt's fixed tokens:
    instruction, field name, "Answer:", chat markup; False on the text), or lists of such arrays per prompt.
    `emotion_selective` is a `Selectivity` of last-token codes or a boolean `[d_sae]` / `[d_sae, n_emotions]`.
    The first rule that applies wins: emotion (selective at the last token; it comes first because the last token
    is itself a template token), inactive (see `RoleConfig.min_rate`), template (fires mostly on template tokens,
    see `RoleConfig.template_share`; it is not emotion-selective, so it fires whatever the emotion), content
    (everything else that is active: it fires on the text, possibly on the template too).
    """
    sums = {True: 0.0, False: 0.0}
    actives = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    width = None
    for acts, m in _token_chunks(token_codes, is_template):
        if width is not None and acts.shape[1] != width:
            raise FeatureError(
                f"token codes have {acts.shape[1]} features in one array and {width} in another"
            )
        width = acts.shape[1]
        for part in (True, False):
            rows = acts[m == part]
            sums[part] = sums[part] + rows.sum(axis=0)
            actives[part] = actives[part] + (rows > config.active_threshold).sum(axis=0)
            counts[part] += len(rows)
    if width is None:
        raise FeatureError("no token codes given")
    if counts[True] == 0 or counts[False] == 0:
        raise FeatureError(f"need both template and content tokens, got {counts[True]} and {counts[False]}")
    if isinstance(emotion_selective, Selectivity):
        emotion = emotion_selective.selective.any(axis=1)
    else:
        emotion = np.asarray(emotion_selective, dtype=bool)
        emotion = emotion.any(axis=1) if emotion.ndim == 2 else emotion
    if emotion.shape != (width,):
        raise FeatureError(f"emotion_selective covers {emotion.shape[0]} features, the token codes {width}")
    mean_template, mean_content = sums[True] / counts[True], sums[False] / counts[False]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = mean_template / (mean_template + mean_content)
    rate = (actives[True] + actives[False]) / (counts[True] + counts[False])
    role = np.select(
        [emotion, rate < config.min_rate, np.nan_to_num(share) >= config.template_share],
        ["emotion", "inactive", "template"],
        default="content",
    )
    frame = pd.DataFrame(
        {
            "role": pd.Categorical(role, categories=ROLES),
            "rate": rate,
            "rate_template": actives[True] / counts[True],
            "rate_content": actives[False] / counts[False],
            "mean_template": mean_template,
            "mean_content": mean_content,
            "template_share": share,
            "emotion_selective": emotion,
        }
    )
    frame.index.name = "feature"
    frame.attrs.update(n_template_tokens=counts[True], n_content_tokens=counts[False])
    return frame


# ------------------------------------------------------------------------------------------------ feature cards


def top_activating(
    activations, texts: Sequence[str], k: int = 10, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """The `k` items on which one feature fires most: rank, item index, activation, text (and label).

    `activations` is one feature's codes over items (`codes[:, f]`). Only active items (> 0) are listed, so a
    rarely active feature shows fewer than `k` rows instead of arbitrary zeros; ties keep item order.
    """
    values = _array(activations, "activations", 1)
    texts = list(texts)
    labels = None if labels is None else list(labels)
    if len(texts) != len(values):
        raise FeatureError(f"{len(values)} activations but {len(texts)} texts")
    if labels is not None and len(labels) != len(values):
        raise FeatureError(f"{len(values)} activations but {len(labels)} labels")
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0][:k]
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "item": order,
            "activation": values[order],
            "text": [texts[i] for i in order],
        }
    )
    if labels is not None:
        frame["label"] = [labels[i] for i in order]
    return frame


def promoted_tokens(
    decoder_row, model, tokenizer=None, k: int = 10, ln_scale: bool = True, suppressed: bool = False
) -> pd.DataFrame:
    """The tokens a feature's decoder direction pushes up (or, with `suppressed`, down) in the logits.

    Scores are `(d * w) @ W_U` for the decoder row `d` (`sae.W_dec[f]`), with `w = model.ln_final.w` when
    `ln_scale` and the model has one (models here are loaded unfolded, and TransformerLens stores Gemma's norm
    weight with its +1 already added, so `w` is the effective per-dimension scale), else `d @ W_U`. Ignored on
    purpose: the final norm's division by the residual's RMS (a positive factor per token: it rescales, never
    reorders), the unembedding bias (the same for every feature) and Gemma's logit soft cap (monotone).
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    W_U = model.W_U
    with torch.no_grad():
        row = torch.as_tensor(
            np.asarray(decoder_row) if not isinstance(decoder_row, torch.Tensor) else decoder_row
        )
        row = row.detach().to(device=W_U.device, dtype=W_U.dtype).flatten()
        if row.shape[0] != W_U.shape[0]:
            raise FeatureError(
                f"decoder row has {row.shape[0]} dimensions, the model's residual stream {W_U.shape[0]}"
            )
        ln_final = getattr(model, "ln_final", None)
        if ln_scale and ln_final is not None and hasattr(ln_final, "w"):
            row = row * ln_final.w
        scores = row @ W_U
        top = torch.topk(-scores if suppressed else scores, min(k, scores.shape[0]))
    ids = top.indices.tolist()
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(ids) + 1),
            "token_id": ids,
            "token": [tokenizer.decode([i]) for i in ids],
            "score": scores[top.indices].cpu().numpy(),
        }
    )
