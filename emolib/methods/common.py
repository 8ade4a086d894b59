"""Errors, input checks and interval helpers shared by the analysis methods."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from threadpoolctl import threadpool_limits
from torch import Tensor

from emolib.stats import Estimate, interval_from_draws


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run numpy/scipy linear algebra on one BLAS thread inside the block.

    A probe's solver (scikit-learn's L-BFGS) multiplies a few hundred rows by a few hundred columns thousands of
    times; OpenBLAS splitting each small product across threads costs more than it saves. On the book's 2-core
    machine one thread fits a 576-wide, 7-class probe about five times faster (`benchmarks/probe_speed.py`).
    Threads split a product's sums differently, so coefficients move in the ninth digit (predictions agree).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class FlowError(ValueError):
    """Inputs that cannot be probed, compared or segmented (shapes, lengths, classes, phase counts)."""


def as_matrix(X, what: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise FlowError(f"{what} must be 2-D [n_items, n_features], got shape {X.shape}")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise FlowError(f"{what} needs at least 2 items and 1 feature, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise FlowError(f"{what} contains NaN or infinite values")
    return X


# Shapes of what the feature methods take (aliases, so that linters do not read jaxtyping's shape strings as forward
# annotations). `items` are the analysed items, `features` an SAE's features (or several layers' pooled).
#: SAE codes: each item's feature activations, numpy or torch.
Codes = Float[np.ndarray, "items features"] | Float[Tensor, "items features"]
#: The same as a float numpy array, after `as_array`.
CodeArray = Float[np.ndarray, "items features"]
#: One feature's activations over the items (a column of `Codes`).
FeatureColumn = Float[np.ndarray, " items"] | Float[Tensor, " items"]
#: Per feature: whether it passes a label-blind filter or a rule.
FeatureMask = Bool[np.ndarray, " features"]

#: A set of feature ids per emotion (what `Selectivity.sets` returns).
EmotionSets = Mapping[str, Collection[int]]


class FeatureError(ValueError):
    """Inputs that do not fit: unknown labels, mismatched shapes, classes too small to test, bad options."""


def as_array(values, name: str, ndim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise FeatureError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FeatureError(f"{name} contains NaN or infinite values")
    return array


def check_choice(value: str, allowed: Sequence[str], name: str) -> None:
    if value not in allowed:
        raise FeatureError(f"{name} must be one of {list(allowed)}, not {value!r}")


def finite_interval(value: float, resampled: np.ndarray, level: float) -> Estimate:
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Estimate(float(value), float("nan"), float("nan"), level)
    return interval_from_draws(value, finite, level)


def with_intervals(points: pd.DataFrame, resampled: Mapping[str, np.ndarray], level: float) -> pd.DataFrame:
    """`points` (rows x measures) with `<measure>_low` / `_high` columns from `resampled[measure]` `[n_boot, rows]`."""
    out = {}
    for measure in points.columns:
        out[measure] = points[measure]
        if measure in resampled:
            bounds = [
                finite_interval(v, resampled[measure][:, i], level) for i, v in enumerate(points[measure])
            ]
            out[f"{measure}_low"] = [b.low for b in bounds]
            out[f"{measure}_high"] = [b.high for b in bounds]
    frame = pd.DataFrame(out, index=points.index)
    frame.attrs["level"] = level
    return frame
