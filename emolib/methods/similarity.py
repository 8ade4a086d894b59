"""Representational similarity across layers: linear CKA, with a permuted-items control."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from jaxtyping import Float

from emolib.methods.common import FlowError, as_matrix


def linear_cka(X: Float[np.ndarray, "items d_x"], Y: Float[np.ndarray, "items d_y"]) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same items, in [0, 1].

    Invariant to orthogonal transforms, isotropic scaling and translation (features are centred), so layers of
    different width or basis can be compared. Uses the n x n Gram form when items are fewer than features.
    """
    X, Y = as_matrix(X, "X"), as_matrix(Y, "Y")
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


def consecutive_cka(
    activations: Mapping[int, Float[np.ndarray, "items d_model"]], seed: int = 0
) -> pd.DataFrame:
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
