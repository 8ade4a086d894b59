"""Co-activation: how strongly one emotion's features fire on the other emotions' items, chosen and measured apart."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emolib.methods.common import Codes, EmotionSets, FeatureError, as_array, finite_interval
from emolib.methods.selectivity import encode_labels
from emolib.stats import Estimate


@dataclass(frozen=True)
class HeldOutCoactivation:
    """Co-activation with features chosen on one set of items and measured on another (see `heldout_coactivation`).

    `matrix` (rows: features of, columns: items of) holds point values, `draws` `[n_boot, E, E]` the bootstrap
    resamples of the measuring items; `n_features` the features chosen per row, `n_measured` those with a
    positive mean on the row emotion's measuring items (the others cannot be normalised and are left out).
    """

    matrix: pd.DataFrame
    draws: np.ndarray
    n_features: dict[str, int]
    n_measured: dict[str, int]
    level: float

    @property
    def emotions(self) -> list[str]:
        return list(self.matrix.index)

    def _off(self, values: np.ndarray) -> np.ndarray:
        """Mean off-diagonal value of each row, `[..., E]` (NaN for rows without features)."""
        n = values.shape[-1]
        off = ~np.eye(n, dtype=bool)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.where(off, values, np.nan), axis=-1)

    def excess(self, emotion: str) -> Estimate:
        """How much more `emotion`'s features fire on the other emotions' items than the other emotions' features
        do: its row's mean off-diagonal value minus the mean of the other rows' (rows without features skipped)."""
        if emotion not in self.emotions:
            raise FeatureError(f"{emotion!r} is not among {self.emotions}")
        a = self.emotions.index(emotion)

        def excess_of(values: np.ndarray) -> np.ndarray:
            off = self._off(values)
            others = np.delete(off, a, axis=-1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return off[..., a] - np.nanmean(others, axis=-1)

        return finite_interval(float(excess_of(self.matrix.to_numpy())), excess_of(self.draws), self.level)

    def table(self) -> pd.DataFrame:
        """Per row emotion: features chosen and measured, mean off-diagonal co-activation with its interval, and
        the excess over the other rows with its interval."""
        off_point, off_draws = self._off(self.matrix.to_numpy()), self._off(self.draws)
        rows = {}
        for i, e in enumerate(self.emotions):
            off = finite_interval(off_point[i], off_draws[:, i], self.level)
            ex = self.excess(e)
            rows[e] = {
                "n_features": self.n_features[e],
                "n_measured": self.n_measured[e],
                "off_diagonal": off.value,
                "off_diagonal_low": off.low,
                "off_diagonal_high": off.high,
                "excess": ex.value,
                "excess_low": ex.low,
                "excess_high": ex.high,
            }
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = "features of"
        return frame


def _coactivation_matrix(means: np.ndarray, members: Sequence[np.ndarray]) -> np.ndarray:
    """`means` `[..., d, E]` class means -> `[..., E, E]`: row A the median over A's features of mean_B / mean_A."""
    n = means.shape[-1]
    out = np.full((*means.shape[:-2], n, n), np.nan)
    for a, features in enumerate(members):
        if features.size == 0:
            continue
        own = means[..., features, a : a + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(own > 0, means[..., features, :] / np.where(own > 0, own, 1.0), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[..., a, :] = np.nanmedian(ratio, axis=-2)
    return out


def heldout_coactivation(
    sets: EmotionSets,
    codes: Codes,
    labels: Sequence[str],
    emotions: Sequence[str] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> HeldOutCoactivation:
    """Row A, column B: how strongly A's features fire on B's items relative to A's own, on items that did not
    choose them.

    `sets` are each emotion's features chosen on other items (e.g. `selectivity(dev codes).sets()`); `codes`
    `[n_items, d_sae]` and `labels` are the measuring items (e.g. the test split). For each feature of A, its mean
    activation on B's measuring items over its mean on A's (features silent on A's measuring items cannot be
    normalised and are dropped, see `n_measured`); the row is the median over A's features, robust to the few
    features whose mean on A is tiny. The diagonal is 1. Choosing and measuring on the same items would bias
    every off-diagonal value down (a feature is chosen partly because its mean on A happened to be high), so
    the split keeps the comparison between rows fair. Intervals resample the measuring items within each label.
    """
    emotions = list(emotions) if emotions is not None else list(sets)
    missing = [e for e in emotions if e not in sets]
    if missing:
        raise FeatureError(f"no feature set for emotions {missing}")
    acts = as_array(codes, "codes", 2)
    y = encode_labels(labels, emotions, acts.shape[0], 1)
    if n_boot < 2:
        raise FeatureError(f"n_boot must be at least 2, not {n_boot}")
    union = np.array(sorted({int(f) for e in emotions for f in sets[e]}), dtype=np.int64)
    if union.size and (union.min() < 0 or union.max() >= acts.shape[1]):
        raise FeatureError(f"feature ids must be in 0..{acts.shape[1] - 1}")
    position = {int(f): i for i, f in enumerate(union)}
    members = [np.array([position[int(f)] for f in sorted(set(sets[e]))], dtype=np.int64) for e in emotions]
    sub = acts[:, union]
    classes = [np.flatnonzero(y == e) for e in range(len(emotions))]

    def class_means(index_of: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([sub[i].mean(axis=0) for i in index_of], axis=-1)  # [d_union, E]

    point_means = class_means(classes)
    rng = np.random.default_rng(seed)
    boot_means = np.stack(
        [class_means([c[rng.integers(0, len(c), len(c))] for c in classes]) for _ in range(n_boot)]
    )
    matrix = pd.DataFrame(
        _coactivation_matrix(point_means, members),
        index=pd.Index(emotions, name="features of"),
        columns=pd.Index(emotions, name="items of"),
    )
    return HeldOutCoactivation(
        matrix=matrix,
        draws=_coactivation_matrix(boot_means, members),
        n_features={e: int(m.size) for e, m in zip(emotions, members, strict=True)},
        n_measured={
            e: int((point_means[m, a] > 0).sum())
            for a, (e, m) in enumerate(zip(emotions, members, strict=True))
        },
        level=level,
    )
