"""Matching one SAE's features to another's by decoder direction: planted partners are found, chance is not."""

import numpy as np
import pytest
import torch

from emolib.methods.common import FeatureError
from emolib.sae.matching import match_features, unit_rows


def planted_pair(d_model: int = 64, d_sae: int = 256, kept: int = 100, seed: int = 0):
    """A decoder and a second one that keeps the first `kept` directions (shuffled, rescaled, slightly noised) and
    draws the rest afresh; returns both and where each kept feature went."""
    rng = np.random.default_rng(seed)
    first = rng.standard_normal((d_sae, d_model))
    second = rng.standard_normal((d_sae, d_model))
    where = rng.permutation(d_sae)[:kept]
    second[where] = 3.0 * first[:kept] + 0.05 * rng.standard_normal((kept, d_model))
    return torch.from_numpy(first).float(), torch.from_numpy(second).float(), where


def test_kept_directions_are_found_at_their_new_place_and_fresh_ones_are_not():
    first, second, where = planted_pair()
    match = match_features(first, second, np.arange(256), np.random.default_rng(1))
    assert match.found[:100].all() and not match.found[100:].any()
    np.testing.assert_array_equal(match.partner[:100], where)
    assert match.n_found == 100 and match.n == 256
    # chance: the best cosine with a random dictionary is far below the threshold, like the fresh features'
    assert match.chance_cosine.max() < 0.7 and match.median_chance == pytest.approx(
        np.median(match.best_cosine[100:]), abs=0.1
    )


def test_a_subset_of_features_keeps_its_order_and_the_random_draw_is_reproducible():
    first, second, where = planted_pair()
    asked = np.array([150, 3, 99])
    a = match_features(first, second, asked, np.random.default_rng(5))
    b = match_features(first.numpy(), second.numpy(), asked, np.random.default_rng(5))
    np.testing.assert_array_equal(a.features, asked)
    np.testing.assert_array_equal(a.found, [False, True, True])
    assert a.partner[1] == where[3] and a.partner[2] == where[99]
    np.testing.assert_array_equal(a.chance_cosine, b.chance_cosine)  # same generator state, same chance
    np.testing.assert_allclose(a.best_cosine, b.best_cosine, rtol=1e-6)


def test_matching_an_sae_with_itself_finds_every_feature_at_cosine_one():
    first, _, _ = planted_pair()
    match = match_features(first, first, np.arange(256), np.random.default_rng(0), match_cosine=0.999)
    assert match.found.all()
    np.testing.assert_array_equal(match.partner, np.arange(256))
    np.testing.assert_allclose(match.best_cosine, 1.0, atol=1e-5)


def test_no_features_gives_empty_counts_and_nan_medians():
    first, second, _ = planted_pair()
    match = match_features(first, second, [], np.random.default_rng(0))
    assert match.n == match.n_found == 0 and np.isnan(match.median_best) and np.isnan(match.median_chance)


def test_unit_rows_leave_a_zero_row_at_zero():
    rows = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])


def test_bad_inputs_name_the_problem():
    first, second, _ = planted_pair()
    with pytest.raises(FeatureError, match="one d_model"):
        match_features(first, second[:, :10], [0], np.random.default_rng(0))
    with pytest.raises(FeatureError, match="feature ids"):
        match_features(first, second, [256], np.random.default_rng(0))
    with pytest.raises(FeatureError, match="match_cosine"):
        match_features(first, second, [0], np.random.default_rng(0), match_cosine=1.5)
