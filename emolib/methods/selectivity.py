"""Which SAE features are selective for an emotion: one-vs-rest AUROC and FDR-corrected tests, shuffled-label nulls, bootstraps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Int
from scipy.special import ndtr
from scipy.stats import false_discovery_control, rankdata

from emolib.methods.common import (
    CodeArray,
    Codes,
    FeatureError,
    FeatureMask,
    FlowError,
    as_array,
    as_matrix,
    check_choice,
)

#: How many of a layer's strongest feature x emotion AUROCs the `top` statistic of `SelectiveCount` averages.
TOP_AUROCS = 10


@dataclass
class SelectiveCount:
    """Emotion-selective SAE features of one layer (features selective for at least one emotion) beside the
    same rule applied to permuted labels, and two threshold-free statistics beside theirs.

    `mass_share` is the share of all feature activation (summed over items and features) that the selective
    features carry; `null_counts` and `null_shares` are the same numbers for each label permutation.
    `auroc_max` and `auroc_top` are the largest one-vs-rest AUROC of any tested feature x emotion and the mean of
    the `TOP_AUROCS` largest: they see emotion information too weak for the count's AUROC threshold (a count of
    zero says nothing about a layer whose best feature reaches 0.68 where permutations reach 0.60);
    `null_max` and `null_top` hold them per permutation.
    """

    selectivity: Selectivity
    count: int
    mass_share: float
    null_counts: np.ndarray
    null_shares: np.ndarray
    auroc_max: float = np.nan
    auroc_top: float = np.nan
    null_max: np.ndarray = field(default_factory=lambda: np.empty(0))
    null_top: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def p_value(self) -> float:
        """Permutation p-value of the count: (1 + #permutations with at least as many) / (1 + #permutations)."""
        return permutation_p(self.count, self.null_counts)

    @property
    def exceeds_null(self) -> bool:
        """More selective features than every permutation found (and at least one)."""
        return self.count > 0 and self.count > self.null_counts.max(initial=0)

    def row(self) -> dict[str, float]:
        return {
            "selective": self.count,
            "selective_null_mean": _mean(self.null_counts),
            "selective_null_max": _max(self.null_counts),
            "selective_p": self.p_value,
            "selective_exceeds_null": self.exceeds_null,
            "mass_share": self.mass_share,
            "mass_share_null_mean": _mean(self.null_shares),
            "mass_share_null_max": _max(self.null_shares),
            "auroc_max": self.auroc_max,
            "auroc_max_null_max": _max(self.null_max),
            "auroc_max_p": permutation_p(self.auroc_max, self.null_max),
            "auroc_top": self.auroc_top,
            "auroc_top_null_mean": _mean(self.null_top),
            "auroc_top_null_max": _max(self.null_top),
            "auroc_top_p": permutation_p(self.auroc_top, self.null_top),
        }


def permutation_p(observed: float, null: np.ndarray) -> float:
    """(1 + #permutations at least as large) / (1 + #permutations): the observed labels count as one
    permutation, so the p-value is never 0 and stays valid for a sequentially stopped null (NaN without one)."""
    if len(null) == 0 or np.isnan(observed):
        return np.nan
    return float((1 + (np.asarray(null) >= observed).sum()) / (1 + len(null)))


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else np.nan


def _max(values: np.ndarray) -> float:
    return float(np.max(values)) if len(values) else np.nan


def top_aurocs(result: Selectivity, top: int = TOP_AUROCS) -> tuple[float, float]:
    """The largest one-vs-rest AUROC of any tested feature x emotion and the mean of the `top` largest (NaN when
    nothing was tested)."""
    values = result.auroc[result.tested].ravel()
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return np.nan, np.nan
    k = min(top, len(values))
    best = np.partition(values, len(values) - k)[-k:]
    return float(best.max()), float(best.mean())


def _mass_share(codes: np.ndarray, chosen: np.ndarray) -> float:
    total = float(codes.sum())
    return float(codes[:, chosen].sum()) / total if total > 0 else np.nan


def selective_with_null(
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig | None = None,
    *,
    n_shuffles: int = 20,
    seed: int = 0,
    stop_after: int | None = None,
) -> SelectiveCount:
    """`features.selectivity` of SAE codes `[n_items, d_sae]` and, on up to `n_shuffles` seeded label
    permutations, how many features the same rule finds by chance, how much activation they carry, and the
    largest AUROCs (`top_aurocs`).

    Permuting keeps the codes, class sizes and the label-blind feature filter, as `features.shuffled_control`
    does; this also returns each permutation's selective set's mass share, so the share has a control too.
    `stop_after` h stops once h permutations have reached the observed value of every statistic (count, largest
    AUROC, top-AUROC mean; Besag and Clifford's sequential test): their p-values are then large anyway, and
    only layers where some statistic beats the null pay for every permutation. The p-values stay valid
    (conservative) either way.
    """
    config = config or SelectivityConfig()
    if n_shuffles < 1:
        raise FlowError(f"n_shuffles must be at least 1, not {n_shuffles}")
    codes = as_matrix(codes, "codes")
    if (codes < 0).any():
        raise FlowError("SAE codes must be non-negative (feature activations)")
    labels = np.asarray(labels).astype(str)
    observed = selectivity(codes, labels, emotions, config)
    chosen = observed.selective.any(axis=1)
    auroc_max, auroc_top = top_aurocs(observed)
    counts, shares, maxima, tops = [], [], [], []
    reached = np.zeros(3, dtype=int)
    for result in permuted_selectivities(codes, labels, emotions, config, n_shuffles, seed)[1]:
        null = result.selective.any(axis=1)
        counts.append(int(null.sum()))
        shares.append(_mass_share(codes, null))
        best, top = top_aurocs(result)
        maxima.append(best)
        tops.append(top)
        reached += [counts[-1] >= int(chosen.sum()), not best < auroc_max, not top < auroc_top]
        if stop_after is not None and (reached >= stop_after).all():
            break
    return SelectiveCount(
        selectivity=observed,
        count=int(chosen.sum()),
        mass_share=_mass_share(codes, chosen),
        null_counts=np.array(counts),
        null_shares=np.array(shares),
        auroc_max=auroc_max,
        auroc_top=auroc_top,
        null_max=np.array(maxima),
        null_top=np.array(tops),
    )


#: Label of the pooled emotional items in `contrast_labels` (any emotion vs neutral).
EMOTIONAL = "emotional"


#: Rows added to per-emotion counts: features selective for any emotion, for exactly one, for two or more.
TOTALS = ("any", "specific", "shared")


CRITERIA = ("full", "auroc")

#: The emotion-set rule (`emotion_sets`): a feature counts for the set of emotions it best separates from the rest.
SETS = "sets"

#: Every rule a count of shared and specific features can use: the one-vs-rest criteria and the emotion-set rule.
COUNT_RULES = (*CRITERIA, SETS)


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
        """Boolean `[d_sae, len(among)]`: selective by the full rule, by the AUROC-only rule ("auroc"), or member
        of the emotion set the feature separates ("sets", `emotion_sets`)."""
        check_choice(criterion, COUNT_RULES, "criterion")
        if criterion == "full":
            chosen = self.selective
        elif criterion == SETS:
            chosen = (
                emotion_sets(
                    self.auroc, self.mean_in - self.mean_out, self.class_sizes, self.config.auroc_threshold
                )
                & self.tested[:, None]
            )
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


def emotion_sets(
    auroc: np.ndarray, mean_diff: np.ndarray, class_sizes: Sequence[int], threshold: float
) -> np.ndarray:
    """Boolean `[..., E]`: for each feature, the set of emotions it separates from all other emotions, when it does.

    One-vs-rest cannot see a feature shared by many emotions: on balanced classes a feature that fires on m of E
    emotions has one-vs-rest AUROC (2E - 1 - m) / (2E - 2) for each of them (0.67 for 5 of 7, below a 0.7
    threshold). Here each feature's emotions are ordered by the mean rank of their items (on balanced classes, by
    their one-vs-rest AUROC), and among the sets of the top 1 to E - 1 the one whose items best separate from the
    other items (set-vs-rest AUROC, the smallest set on ties) is the feature's set; the feature counts when that
    AUROC is at least `threshold` and its mean activation is higher in the set than outside. A set of one emotion
    is specific, of two or more shared. The ordered prefixes are the best sets of each size when classes are
    balanced.

    Everything comes from per-emotion statistics (the set's rank sum is the sum of its emotions' rank sums; its
    mean difference a weighted sum of theirs), so label permutations and bootstrap draws get it for free.
    `auroc` and `mean_diff` (emotion's mean minus the other items' mean) are `[..., E]`; NaN AUROC (an untested
    feature) gives no set. No multiple-testing correction is applied: the shuffled-label null is the yardstick.
    """
    sizes = np.asarray(class_sizes, dtype=np.float64)
    auroc, mean_diff = np.asarray(auroc, dtype=np.float64), np.asarray(mean_diff, dtype=np.float64)
    if auroc.shape != mean_diff.shape or auroc.shape[-1:] != sizes.shape:
        raise FeatureError(
            f"auroc {auroc.shape} and mean_diff {mean_diff.shape} must both end in one column per class "
            f"({len(sizes)} class sizes)"
        )
    n = sizes.sum()
    rank_sums = auroc * sizes * (n - sizes) + sizes * (sizes + 1) / 2
    weights = sizes * (n - sizes) * mean_diff  # sums to zero over emotions (see the docstring's derivation)
    order = np.argsort(-(rank_sums / sizes), axis=-1, kind="stable")
    in_set = np.cumsum(sizes[order], axis=-1)[..., :-1]
    set_rank = np.cumsum(np.take_along_axis(rank_sums, order, axis=-1), axis=-1)[..., :-1]
    set_weight = np.cumsum(np.take_along_axis(weights, order, axis=-1), axis=-1)[..., :-1]
    with np.errstate(invalid="ignore"):
        set_auroc = (set_rank - in_set * (in_set + 1) / 2) / (in_set * (n - in_set))
    best = np.argmax(np.nan_to_num(set_auroc, nan=-1.0), axis=-1)[..., None]
    separates = np.take_along_axis(set_auroc, best, axis=-1) >= threshold
    higher = np.take_along_axis(set_weight, best, axis=-1) > 0
    position = np.argsort(order, axis=-1)  # each emotion's place in the feature's order
    return (position <= best) & separates & higher


def _count_row(selective: np.ndarray, emotions: Sequence[str]) -> dict[str, int]:
    per_feature = selective.sum(axis=1)
    row = {e: int(n) for e, n in zip(emotions, selective.sum(axis=0), strict=True)}
    row.update(
        any=int((per_feature >= 1).sum()),
        specific=int((per_feature == 1).sum()),
        shared=int((per_feature >= 2).sum()),
    )
    return row


def encode_labels(labels: Sequence[str], emotions: Sequence[str], n_items: int, min_items: int) -> np.ndarray:
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


def prepare_codes(
    codes: Codes, labels: Sequence[str], emotions: Sequence[str], config: SelectivityConfig
) -> tuple[CodeArray, np.ndarray, tuple[str, ...]]:
    acts = as_array(codes, "codes", 2)
    y = encode_labels(labels, emotions, acts.shape[0], config.min_items)
    return acts, y, tuple(emotions)


def testable_features(acts: CodeArray, config: SelectivityConfig) -> FeatureMask:
    """Label-blind filter: active on enough items and not constant."""
    n_active = (acts > config.active_threshold).sum(axis=0)
    return (n_active >= config.min_active_items) & (acts.max(axis=0) > acts.min(axis=0))


def _tie_term(acts: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per column, the sum over groups of equal values of t^3 - t (t: the group's size), `[d]`."""
    n, d = acts.shape
    out = np.empty(d)
    for start in range(0, d, chunk):
        ordered = np.sort(acts[:, start : start + chunk], axis=0)
        width = ordered.shape[1]
        new_group = np.ones(ordered.shape, dtype=bool)
        new_group[1:] = ordered[1:] != ordered[:-1]
        group = np.cumsum(new_group, axis=0) - 1 + np.arange(width)[None, :] * n
        t = np.bincount(group.ravel(), minlength=n * width).reshape(width, n).astype(np.float64)
        out[start : start + width] = (t**3 - t).sum(axis=1)
    return out


@dataclass(frozen=True)
class RankedCodes:
    """The label-blind half of `compute_selectivity` for one code matrix: which features are tested, each
    feature's active indicator `[n, d]` and frequency, and the tested columns' midranks and tie terms.

    None of it depends on the labels, so every label permutation of the same codes reuses it (what makes
    hundreds of shuffles per layer affordable)."""

    tested: FeatureMask
    active: np.ndarray
    frequency: np.ndarray
    cols: np.ndarray
    ranks: np.ndarray
    tie: np.ndarray

    @classmethod
    def of(
        cls, acts: np.ndarray, config: SelectivityConfig, allowed: FeatureMask | None = None
    ) -> RankedCodes:
        """From codes `[n, d]`: tested are `allowed` (default: `testable_features`) features that are not
        constant."""
        nonconstant = acts.max(axis=0) > acts.min(axis=0)
        tested = testable_features(acts, config) if allowed is None else allowed & nonconstant
        active = (acts > config.active_threshold).astype(acts.dtype)
        cols = np.flatnonzero(tested)
        chosen = acts[:, cols]
        return cls(
            tested=tested,
            active=active,
            frequency=active.mean(axis=0, dtype=np.float64),
            cols=cols,
            ranks=rankdata(chosen, axis=0),
            tie=_tie_term(chosen),
        )


def _one_vs_rest_tests(
    ranked: RankedCodes, onehot: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U of each class against all other items, and its two-sided p-value, for every ranked column.

    The same numbers as `scipy.stats.mannwhitneyu(inside, outside, method="asymptotic")` (tie-corrected normal
    approximation with continuity correction) class by class, from a single ranking of all items: one-vs-rest
    always ranks the same pooled sample, so ranks and ties are shared by every class. Returns `[d, E]` arrays.
    """
    n = ranked.ranks.shape[0]
    u1 = (onehot.T @ ranked.ranks).T - sizes * (sizes + 1) / 2  # class-major: the fast product order
    n1, n2 = sizes, n - sizes
    u = np.maximum(u1, n1 * n2 - u1)
    spread = np.sqrt(n1 * n2 / 12 * ((n + 1) - ranked.tie[:, None] / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2 - 0.5) / spread
    return u1, np.clip(2 * ndtr(-z), 0.0, 1.0)


def compute_selectivity(
    acts: CodeArray,
    y: np.ndarray,
    emotions: tuple[str, ...],
    config: SelectivityConfig,
    allowed: FeatureMask | None,
    ranked: RankedCodes | None = None,
) -> Selectivity:
    """`selectivity` of encoded labels `y`; `allowed` replaces the label-blind filter, `ranked` (made from the
    same `acts` and filter) skips ranking (label permutations share it)."""
    n, d = acts.shape
    n_emotions = len(emotions)
    if ranked is None:
        ranked = RankedCodes.of(acts, config, allowed)
    elif ranked.active.shape != acts.shape:
        raise FeatureError(f"ranked codes of shape {ranked.active.shape} for codes of shape {acts.shape}")
    tested = ranked.tested
    onehot = np.eye(n_emotions, dtype=acts.dtype)[y]
    sizes = onehot.sum(axis=0, dtype=np.float64)
    sums = (onehot.T @ acts).T.astype(np.float64)
    mean_in = sums / sizes
    mean_out = (sums.sum(axis=1, keepdims=True) - sums) / (n - sizes)
    rate_in = (onehot.T @ ranked.active).T.astype(np.float64) / sizes
    auroc = np.full((d, n_emotions), np.nan)
    p_value = np.full((d, n_emotions), np.nan)
    q_value = np.full((d, n_emotions), np.nan)
    cols = ranked.cols
    if cols.size:
        # U of each emotion's items; midranks handle the many ties at zero; AUROC = U / (n_pos n_neg).
        u1, p = _one_vs_rest_tests(ranked, onehot, sizes)
        auroc[cols] = u1 / (sizes * (n - sizes))
        p_value[cols] = p
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
        frequency=ranked.frequency,
        tested=tested,
        selective=selective,
    )


def selectivity(
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
) -> Selectivity:
    """One-vs-rest selectivity of every feature for every emotion (see `SelectivityConfig` for the rule).

    `codes` is `[n_items, d_sae]` (numpy or torch), `labels` the gold emotion of each item, all in `emotions`.
    """
    acts, y, emotions = prepare_codes(codes, labels, emotions, config)
    return compute_selectivity(acts, y, emotions, config, allowed=None)


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
    codes: Codes,
    labels: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    neutral: str = "neutral",
) -> Selectivity:
    """Selectivity of emotional items (any emotion) against neutral ones; `.sets()["emotional"]` are the features
    of general emotional content. With two classes the two columns are mirror tests (AUROCs add to 1, same
    p-value), so BH counts each feature twice: slightly conservative."""
    return selectivity(codes, *contrast_labels(labels, neutral), config)


@dataclass(frozen=True)
class PooledCodes:
    """Codes of several layers' SAEs side by side: column `j` is feature `feature[j]` of layer `layer[j]`.

    Only features that `selectivity` would test are kept (active on at least `min_active_items` items and not
    constant: a label-blind filter, so selectivity, its controls and its BH correction are unchanged, only
    cheaper). `n_features` counts every feature of the pooled layers, kept or not.
    """

    codes: CodeArray
    layer: Int[np.ndarray, " features"]
    feature: Int[np.ndarray, " features"]
    n_features: int

    def name(self, column: int) -> str:
        """`L<layer>/<feature>`: how a pooled feature is named in tables and figures."""
        return f"L{int(self.layer[column])}/{int(self.feature[column])}"


def pool_layers(
    codes_by_layer: Mapping[int, Codes], config: SelectivityConfig = SelectivityConfig()
) -> PooledCodes:
    """Pool per-layer codes `[n_items, d_sae]` into one `PooledCodes` (features identified as (layer, feature))."""
    if not codes_by_layer:
        raise FeatureError("no layers to pool")
    blocks, layers, ids, total, n_items = [], [], [], 0, None
    for layer, codes in codes_by_layer.items():
        acts = as_array(codes, f"codes of layer {layer}", 2)
        if n_items is not None and acts.shape[0] != n_items:
            raise FeatureError(f"layer {layer} has {acts.shape[0]} items, the others {n_items}")
        n_items = acts.shape[0]
        keep = np.flatnonzero(testable_features(acts, config))
        blocks.append(acts[:, keep])
        layers.append(np.full(len(keep), int(layer)))
        ids.append(keep)
        total += acts.shape[1]
    return PooledCodes(
        codes=np.concatenate(blocks, axis=1),
        layer=np.concatenate(layers),
        feature=np.concatenate(ids),
        n_features=total,
    )


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
    codes: Codes,
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
    emotions, results = permuted_selectivities(codes, labels, emotions, config, n_shuffles, seed)
    rows = [_count_row(result.selective, emotions) for result in results]
    return NullCounts(emotions=emotions, counts=pd.DataFrame(rows), seed=seed)


def permuted_selectivities(
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig,
    n_shuffles: int,
    seed: int,
) -> tuple[tuple[str, ...], Iterator[Selectivity]]:
    """The emotions tested and the selectivity of each of `n_shuffles` seeded label permutations, lazily: every
    null of a selectivity count draws the same permutations for the same seed."""
    if n_shuffles < 1:
        raise FeatureError(f"n_shuffles must be at least 1, not {n_shuffles}")
    acts, y, emotions = prepare_codes(codes, labels, emotions, config)
    ranked = RankedCodes.of(acts, config)
    rng = np.random.default_rng(seed)
    results = (
        compute_selectivity(acts, rng.permutation(y), emotions, config, ranked.tested, ranked)
        for _ in range(n_shuffles)
    )
    return emotions, results


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
        check_choice(self.criterion, CRITERIA, "criterion")
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
    class_sizes: tuple[int, ...] = ()
    auroc_threshold: float = SelectivityConfig.auroc_threshold

    def matrix(self, criterion: str | None = None) -> np.ndarray:
        """Boolean `[n_boot, d_sae, n_emotions]`: the draws' own criterion (None) or the emotion-set rule
        ("sets"; the resamples keep every class's size, so each draw's sets come from its AUROCs and means)."""
        if criterion in (None, self.config.criterion):
            return self.selective
        if criterion != SETS:
            raise FeatureError(
                f"these draws decide selectivity by the {self.config.criterion!r} criterion; they can also give "
                f"{SETS!r}, not {criterion!r}"
            )
        return np.stack(
            [
                emotion_sets(auroc, diff, self.class_sizes, self.auroc_threshold)
                for auroc, diff in zip(self.auroc, self.mean_diff, strict=True)
            ]
        )


def bootstrap_selectivity(
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    boot: BootstrapConfig = BootstrapConfig(),
) -> SelectivityDraws:
    """Selectivity on `boot.n_boot` item resamples stratified by label (see `BootstrapConfig` for the criterion).

    One set of draws serves `shared_specific`, `diffuseness` and `compare_diffuseness`, so their intervals come
    from the same resamples.
    """
    acts, y, emotions = prepare_codes(codes, labels, emotions, config)
    n, d = acts.shape
    n_emotions = len(emotions)
    allowed = testable_features(acts, config)
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
            result = compute_selectivity(acts_b, y_sorted, emotions, config, allowed)
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
        emotions=emotions,
        config=boot,
        auroc=auroc,
        mean_diff=mean_diff,
        selective=selective,
        class_sizes=tuple(int(v) for v in sizes),
        auroc_threshold=config.auroc_threshold,
    )


def check_draws(sel: Selectivity, draws: SelectivityDraws) -> None:
    if draws.emotions != sel.emotions or draws.auroc.shape[1] != sel.n_features:
        raise FeatureError(
            f"draws ({draws.emotions}, {draws.auroc.shape[1]} features) do not match the selectivity "
            f"({sel.emotions}, {sel.n_features} features)"
        )


def split_halves(labels: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Item indices of two halves, each label's items split as evenly as possible (seeded)."""
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for label in dict.fromkeys(labels.tolist()):
        rows = rng.permutation(np.flatnonzero(labels == label))
        first.append(rows[: len(rows) // 2])
        second.append(rows[len(rows) // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def split_half_replication(
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    seed: int = 0,
) -> pd.DataFrame:
    """Do the selective features found on half of the items replicate on the other half?

    Features are selected on one half by the full rule and checked on the other by its effect-size half (AUROC at
    least the threshold and more active on the emotion: the other half has half the items, so its q-values say
    less), in both directions; a label shuffle of the selecting half is the chance rate. Halves split each
    label's items evenly (seeded); `min_items` is halved with them. Rows per emotion and `all` (every emotion's
    feature-emotion pairs pooled): selected (both directions summed), replicated, rate, and
    chance_rate (the same on shuffled selecting labels; NaN when nothing was selected by chance).
    """
    acts = as_array(codes, "codes", 2)
    labels = np.asarray(labels).astype(str)
    half_rule = replace(config, min_items=max(1, config.min_items // 2))
    halves = split_halves(labels, seed)
    rng = np.random.default_rng(seed)
    totals = {
        e: np.zeros(4) for e in [*emotions, "all"]
    }  # selected, replicated, selected by chance, replicated
    for pick, check in (halves, halves[::-1]):
        kept = selectivity(acts[check], labels[check], emotions, half_rule).matrix("auroc")
        for offset, chosen_labels in ((0, labels[pick]), (2, rng.permutation(labels[pick]))):
            chosen = selectivity(acts[pick], chosen_labels, emotions, half_rule).matrix("full")
            for j, emotion in enumerate(emotions):
                totals[emotion][offset] += chosen[:, j].sum()
                totals[emotion][offset + 1] += (chosen[:, j] & kept[:, j]).sum()
            totals["all"][offset] += chosen.sum()
            totals["all"][offset + 1] += (chosen & kept).sum()
    rows = []
    for emotion, (n, hit, n_null, hit_null) in totals.items():
        rows.append(
            {
                "emotion": emotion,
                "selected": int(n),
                "replicated": int(hit),
                "rate": hit / n if n else np.nan,
                "chance_rate": hit_null / n_null if n_null else np.nan,
            }
        )
    return pd.DataFrame(rows).set_index("emotion")


def gold_or_answer(
    codes: Codes,
    gold: Sequence[str],
    predicted: Sequence[str],
    selective: Mapping[str, Iterable[int]],
    min_items: int = 3,
) -> pd.DataFrame:
    """Do an emotion's selective features follow the gold label or the model's answer? Misclassified items only.

    For a feature selective for emotion e, the AUROC of its activation between misclassified items of gold e (the
    model answered something else) and misclassified items the model answered e (their gold is another emotion):
    above 0.5 the feature follows the text's emotion, below 0.5 the answer (an answer feature). Rows per emotion
    with at least `min_items` items on both sides (others are counted as not testable): emotion, n_gold, n_answer,
    n_features, follow_gold, follow_answer (features with AUROC above / below 0.5), median_auroc.
    """
    acts = as_array(codes, "codes", 2)
    gold, predicted = np.asarray(gold).astype(str), np.asarray(predicted).astype(str)
    wrong = gold != predicted
    rows = []
    for emotion, features in selective.items():
        features = np.asarray(sorted(features), dtype=np.int64)
        inside = wrong & (gold == emotion)
        outside = wrong & (predicted == emotion)
        row: dict[str, Any] = {
            "emotion": emotion,
            "n_gold": int(inside.sum()),
            "n_answer": int(outside.sum()),
            "n_features": len(features),
        }
        if len(features) == 0 or min(inside.sum(), outside.sum()) < min_items:
            rows.append(row | {"follow_gold": np.nan, "follow_answer": np.nan, "median_auroc": np.nan})
            continue
        pair = np.concatenate([acts[inside][:, features], acts[outside][:, features]])
        n1, n2 = int(inside.sum()), int(outside.sum())
        u1 = rankdata(pair, axis=0)[:n1].sum(axis=0) - n1 * (n1 + 1) / 2
        auroc = u1 / (n1 * n2)
        rows.append(
            row
            | {
                "follow_gold": int((auroc > 0.5).sum()),
                "follow_answer": int((auroc < 0.5).sum()),
                "median_auroc": float(np.median(auroc)),
            }
        )
    return pd.DataFrame(rows).set_index("emotion")
