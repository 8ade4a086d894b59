"""Shared and specific selective features, their shuffled-label null, and how the emotions' feature sets overlap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emolib.methods.common import Codes, EmotionSets, FeatureError, check_choice, with_intervals
from emolib.methods.selectivity import (
    COUNT_RULES,
    SETS,
    Selectivity,
    SelectivityConfig,
    SelectivityDraws,
    check_draws,
    permuted_selectivities,
)


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
    sel: Selectivity,
    draws: SelectivityDraws | None = None,
    among: Sequence[str] | None = None,
    criterion: str | None = None,
) -> pd.DataFrame:
    """Per emotion: selective features, specific ones (selective for this emotion only) and shared ones (also for
    at least one other emotion); a last row `any` counts features over all emotions.

    `among` restricts the emotions considered (e.g. without neutral: a feature shared only with neutral then counts
    as specific). `criterion` is the rule (`COUNT_RULES`; default: the draws' criterion, or the full rule without
    draws); "sets" counts each feature for the emotion set it separates (`selectivity.emotion_sets`). With
    `draws`, `_low` / `_high` columns give bootstrap intervals by the same rule.
    """
    names = list(among) if among is not None else list(sel.emotions)
    if criterion is None:
        criterion = draws.config.criterion if draws is not None else "full"
    check_choice(criterion, COUNT_RULES, "criterion")
    points = pd.DataFrame(_shared_specific_counts(sel.matrix(criterion, names)), index=[*names, "any"])
    points.index.name = "emotion"
    if draws is None:
        return points
    check_draws(sel, draws)
    columns = sel._columns(names)
    resampled = draws.matrix(criterion)[..., columns]
    return with_intervals(points, _shared_specific_counts(resampled), draws.config.level)


def set_size_counts(members: np.ndarray, largest: int) -> np.ndarray:
    """`[d, E]` emotion-set membership -> how many features have a set of 1, 2, ..., `largest` emotions."""
    return np.bincount(members.sum(axis=-1), minlength=largest + 1)[1 : largest + 1]


@dataclass(frozen=True)
class NullSharedSpecific:
    """`shared_specific` counts on label permutations, for each criterion of the selectivity rule.

    `counts` has one row per (criterion, shuffle) and columns (measure, emotion), measures `n_selective`,
    `n_specific`, `n_shared`, emotions as in `shared_specific` (with the row `any`). `set_sizes` has one row per
    shuffle: how many features the emotion-set rule gives a set of 1, 2, ... emotions (`set_size_counts`).
    """

    emotions: tuple[str, ...]
    counts: pd.DataFrame
    seed: int
    set_sizes: pd.DataFrame | None = None

    @property
    def n_shuffles(self) -> int:
        return int(self.counts.index.get_level_values("shuffle").nunique())

    def set_size_summary(self, sel: Selectivity) -> pd.DataFrame:
        """Features whose emotion set has 1, 2, ... emotions (rows), observed beside this null: mean, 95th
        percentile and permutation p-value. A feature shared by many emotions, which one-vs-rest misses, shows
        as an excess in the large sets."""
        if self.set_sizes is None:
            raise FeatureError("this null was built without emotion-set sizes")
        null = self.set_sizes.to_numpy()
        members = sel.matrix(SETS, list(self.emotions))
        observed = set_size_counts(members, null.shape[1])
        frame = pd.DataFrame(
            {
                "observed": observed,
                "null_mean": null.mean(axis=0),
                "null_q95": np.quantile(null, 0.95, axis=0),
                "p_value": (1 + (null >= observed).sum(axis=0)) / (1 + len(null)),
                "most common set": [
                    _most_common_set(members, size, self.emotions) for size in range(1, len(observed) + 1)
                ],
            },
            index=pd.Index(range(1, len(observed) + 1), name="emotions in the set"),
        )
        return frame

    def summary(self, observed: pd.DataFrame, criterion: str = "full") -> pd.DataFrame:
        """`observed` (a `shared_specific` table by the same `criterion`) beside the null: for each measure its
        null mean, 95th percentile, and permutation p-value (1 + #shuffles with at least as many) / (1 + #shuffles).
        Rows are emotions (and `any`); columns are (measure, statistic)."""
        check_choice(criterion, COUNT_RULES, "criterion")
        null = self.counts.xs(criterion, level="criterion")
        rows = list(observed.index)
        unknown = [r for r in rows if r not in null["n_selective"].columns]
        if unknown:
            raise FeatureError(
                f"observed rows {unknown} are not among the null's {list(null['n_selective'])}"
            )
        out = {}
        for measure in ("n_selective", "n_specific", "n_shared"):
            seen = observed[measure].reindex(rows)
            values = null[measure][rows]
            out[(measure, "observed")] = seen
            out[(measure, "null_mean")] = values.mean()
            out[(measure, "null_q95")] = values.quantile(0.95)
            out[(measure, "p_value")] = (1 + (values >= seen).sum()) / (1 + len(values))
        frame = pd.DataFrame(out)
        frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["measure", "statistic"])
        frame.index.name = "emotion"
        return frame


def _most_common_set(members: np.ndarray, size: int, emotions: Sequence[str]) -> str:
    """The emotion set of `size` that most features have, with their number ("all but X" past half the
    emotions); "-" when no feature has a set of that size."""
    rows = members[members.sum(axis=1) == size]
    if len(rows) == 0:
        return "-"
    patterns, counts = np.unique(rows, axis=0, return_counts=True)
    best = patterns[np.argmax(counts)]  # np.unique sorts, so ties go to the same pattern every run
    inside = [e for e, m in zip(emotions, best, strict=True) if m]
    outside = [e for e, m in zip(emotions, best, strict=True) if not m]
    named = ", ".join(inside) if 2 * size <= len(emotions) else "all but " + ", ".join(outside)
    return f"{named} ({int(counts.max())})"


def shuffled_shared_specific(
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    n_shuffles: int = 20,
    seed: int = 0,
    among: Sequence[str] | None = None,
) -> NullSharedSpecific:
    """`shared_specific` per emotion on `n_shuffles` seeded label permutations, by every rule ("full", "auroc"
    and "sets") from the same permutations, with the emotion-set sizes: the control for every count of specific
    and shared features.

    The permutations are those of `shuffled_control` with the same seed (its `any` counts are this null's
    `n_selective` / `any` under the full rule). `among` restricts the emotions counted, as in `shared_specific`.
    """
    emotions, results = permuted_selectivities(codes, labels, emotions, config, n_shuffles, seed)
    names = list(among) if among is not None else list(emotions)
    unknown = [e for e in names if e not in emotions]
    if unknown:
        raise FeatureError(f"emotions {unknown} are not among {list(emotions)}")
    columns = [emotions.index(e) for e in names]
    largest = min(len(names), len(emotions) - 1)  # a set never holds every emotion
    rows, index, sizes = [], [], []
    for shuffle, result in enumerate(results):
        sizes.append(set_size_counts(result.matrix(SETS, names), largest))
        for criterion in COUNT_RULES:
            counts = _shared_specific_counts(result.matrix(criterion)[:, columns])
            rows.append(
                {
                    (m, e): int(v)
                    for m, values in counts.items()
                    for e, v in zip([*names, "any"], values, strict=True)
                }
            )
            index.append((criterion, shuffle))
    frame = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["criterion", "shuffle"]))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["measure", "emotion"])
    set_sizes = pd.DataFrame(sizes, columns=range(1, largest + 1)).rename_axis("shuffle")
    return NullSharedSpecific(emotions=tuple(names), counts=frame, seed=seed, set_sizes=set_sizes)


def specific_sets(sets: EmotionSets) -> dict[str, frozenset[int]]:
    """Each emotion's features that belong to no other emotion's set."""
    counts: dict[int, int] = {}
    for members in sets.values():
        for feature in set(members):
            counts[feature] = counts.get(feature, 0) + 1
    return {e: frozenset(f for f in set(members) if counts[f] == 1) for e, members in sets.items()}


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
