"""Shared and specific selective features, their shuffled-label null, and how the emotions' feature sets overlap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emolib.methods.common import Codes, EmotionSets, FeatureError, check_choice, with_intervals
from emolib.methods.selectivity import (
    CRITERIA,
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
    check_draws(sel, draws)
    columns = sel._columns(names)
    return with_intervals(points, _shared_specific_counts(draws.selective[..., columns]), draws.config.level)


@dataclass(frozen=True)
class NullSharedSpecific:
    """`shared_specific` counts on label permutations, for each criterion of the selectivity rule.

    `counts` has one row per (criterion, shuffle) and columns (measure, emotion), measures `n_selective`,
    `n_specific`, `n_shared`, emotions as in `shared_specific` (with the row `any`).
    """

    emotions: tuple[str, ...]
    counts: pd.DataFrame
    seed: int

    @property
    def n_shuffles(self) -> int:
        return int(self.counts.index.get_level_values("shuffle").nunique())

    def summary(self, observed: pd.DataFrame, criterion: str = "full") -> pd.DataFrame:
        """`observed` (a `shared_specific` table by the same `criterion`) beside the null: for each measure its
        null mean, 95th percentile, and permutation p-value (1 + #shuffles with at least as many) / (1 + #shuffles).
        Rows are emotions (and `any`); columns are (measure, statistic)."""
        check_choice(criterion, CRITERIA, "criterion")
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


def shuffled_shared_specific(
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str],
    config: SelectivityConfig = SelectivityConfig(),
    n_shuffles: int = 20,
    seed: int = 0,
    among: Sequence[str] | None = None,
) -> NullSharedSpecific:
    """`shared_specific` per emotion on `n_shuffles` seeded label permutations, by both criteria ("full" and
    "auroc") from the same permutations: the control for every count of specific and shared features.

    The permutations are those of `shuffled_control` with the same seed (its `any` counts are this null's
    `n_selective` / `any` under the full rule). `among` restricts the emotions counted, as in `shared_specific`.
    """
    emotions, results = permuted_selectivities(codes, labels, emotions, config, n_shuffles, seed)
    names = list(among) if among is not None else list(emotions)
    unknown = [e for e in names if e not in emotions]
    if unknown:
        raise FeatureError(f"emotions {unknown} are not among {list(emotions)}")
    columns = [emotions.index(e) for e in names]
    rows, index = [], []
    for shuffle, result in enumerate(results):
        for criterion in CRITERIA:
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
    return NullSharedSpecific(emotions=tuple(names), counts=frame, seed=seed)


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
