"""Which features of one SAE another SAE of the same layer learns again, by decoder direction.

Two SAEs trained on the same activations with different seeds learn partly different dictionaries; a finding
about a feature means more when other seeds learn that feature too. A feature is *found again* when some decoder
direction of the other SAE has cosine at least `match_cosine` with it; the median best cosine says how near the
rest come, beside the same median against a random dictionary of the other SAE's shape (what chance gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emolib.methods.common import FeatureError

#: Rows of the cosine matrix computed at once (a 16k x 16k float32 matrix would need 1 GB).
_CHUNK = 2048


@dataclass(frozen=True)
class DictionaryMatch:
    """Per feature of the first SAE (in the order asked): its best partner in the other SAE, that cosine, and the
    best cosine with a random dictionary of the other SAE's shape."""

    features: np.ndarray
    partner: np.ndarray
    best_cosine: np.ndarray
    chance_cosine: np.ndarray
    match_cosine: float

    @property
    def n(self) -> int:
        return len(self.features)

    @property
    def found(self) -> np.ndarray:
        """Boolean per feature: a partner at cosine `match_cosine` or more."""
        return self.best_cosine >= self.match_cosine

    @property
    def n_found(self) -> int:
        return int(self.found.sum())

    @property
    def median_best(self) -> float:
        return float(np.median(self.best_cosine)) if self.n else np.nan

    @property
    def median_chance(self) -> float:
        return float(np.median(self.chance_cosine)) if self.n else np.nan


def unit_rows(weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (float32 numpy); an all-zero row stays zero."""
    w = (
        weights.detach().float().cpu().numpy()
        if isinstance(weights, torch.Tensor)
        else np.asarray(weights, "f4")
    )
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def _best(directions: np.ndarray, dictionary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    partner = np.empty(len(directions), dtype=np.int64)
    best = np.empty(len(directions), dtype=np.float32)
    for start in range(0, len(directions), _CHUNK):
        cosine = directions[start : start + _CHUNK] @ dictionary.T
        partner[start : start + _CHUNK] = cosine.argmax(axis=1)
        best[start : start + _CHUNK] = cosine.max(axis=1)
    return partner, best


def match_features(
    decoder: torch.Tensor | np.ndarray,
    other_decoder: torch.Tensor | np.ndarray,
    features: np.ndarray | list[int],
    rng: np.random.Generator,
    match_cosine: float = 0.9,
) -> DictionaryMatch:
    """Match `features` (rows of `decoder`, `[d_sae, d_model]`) to `other_decoder`'s rows by cosine. The random
    dictionary is drawn from `rng` (standard normal, the other decoder's shape) once per call, so a caller that
    matches several layers with one generator gets the same chance values in the same order."""
    decoder_shape, other_shape = tuple(decoder.shape), tuple(other_decoder.shape)
    if len(decoder_shape) != 2 or len(other_shape) != 2 or decoder_shape[1] != other_shape[1]:
        raise FeatureError(
            f"decoders must be [d_sae, d_model] matrices of one d_model; got {decoder_shape} and {other_shape}"
        )
    if not 0 < match_cosine <= 1:
        raise FeatureError(f"match_cosine must lie in (0, 1], got {match_cosine}")
    features = np.asarray(features, dtype=np.int64).reshape(-1)
    if len(features) and (features.min() < 0 or features.max() >= decoder_shape[0]):
        raise FeatureError(
            f"feature ids must lie in [0, {decoder_shape[0]}), got {features.min()}..{features.max()}"
        )
    directions = unit_rows(
        decoder[torch.as_tensor(features)] if isinstance(decoder, torch.Tensor) else decoder[features]
    )
    partner, best = _best(directions, unit_rows(other_decoder))
    _, chance = _best(directions, unit_rows(rng.standard_normal(other_shape)))
    return DictionaryMatch(features, partner, best, chance, match_cosine)
