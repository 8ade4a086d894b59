"""How diffuse an emotion's selectivity is (k50, k80, entropy), with bootstrap intervals and paired comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.special import entr
from torch import Tensor

from emolib.methods.common import FeatureError, check_choice, finite_interval, with_intervals
from emolib.methods.selectivity import Selectivity, SelectivityDraws, check_draws

MASSES = ("auroc", "mean_diff")


SUPPORTS = ("selective", "all")


MEASURES = ("k50", "k80", "entropy", "effective_n")


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
        check_choice(self.mass, MASSES, "mass")
        check_choice(self.support, SUPPORTS, "support")


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


def concentration(
    mass: Float[np.ndarray, " features"] | Float[Tensor, " features"], n_reference: int | None = None
) -> dict[str, float]:
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
    check_draws(sel, draws)
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
    return with_intervals(points, resampled, draws.config.level)


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
    check_choice(measure, MEASURES, "measure")
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
        estimate = finite_interval(point[measure][a] - p_other, diff, draws.config.level)
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
