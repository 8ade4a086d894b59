"""Tests for emolib.studies.flow: probes against planted and memorisable labels, CKA's invariances and a hand-computed
value, the logit lens against the tiny models' own logits, and phase segmentation, the phase-count test and the
item bootstrap on profiles with planted phases and on pure noise."""

from __future__ import annotations

import dataclasses
import functools
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from emolib.methods import lens, phases, probes, roles, selectivity, similarity
from emolib.methods.common import FlowError
from emolib.methods.probes import ProbeConfig
from emolib.methods.selectivity import SelectivityConfig
from emolib.stats import Estimate
from emolib.studies import flow
from emolib.studies.flow import FlowConfig

FAST = ProbeConfig(n_boot=300)


def blobs(n_per_class: int = 20, d: int = 5, separation: float = 6.0, seed: int = 0):
    """Three well-separated Gaussian classes."""
    rng = np.random.default_rng(seed)
    y = np.repeat(["anger", "fear", "joy"], n_per_class)
    centres = {"anger": 0.0, "fear": 1.0, "joy": 2.0}
    X = rng.normal(size=(len(y), d))
    X[:, 0] += separation * np.array([centres[label] for label in y])
    return X, y


# ------------------------------------------------------------------------------------------------ probes


def test_probe_reads_planted_labels_and_its_control_does_not():
    X, y = blobs()
    result = probes.probe_accuracy(X, y, FAST)
    assert result.labels == ("anger", "fear", "joy")
    assert result.correct.dtype == bool and result.correct.shape == (60,)
    assert result.accuracy.value == pytest.approx(result.correct.mean())
    np.testing.assert_array_equal(result.correct, result.predicted == y)
    assert result.accuracy.value >= 0.95
    assert result.accuracy.low <= result.accuracy.value <= result.accuracy.high
    assert result.control is not None and result.control.value < 0.6
    assert result.chance_majority == pytest.approx(1 / 3)
    assert result.folds == 5
    assert set(result.as_row()) >= {"accuracy", "control", "control_low", "folds"}


def test_probe_is_out_of_fold_so_memorisable_features_score_at_chance():
    # one indicator feature per item: a probe fitted on all items would be perfect; unseen items are unreadable
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat(["a", "b"], 30))
    result = probes.probe_accuracy(np.eye(60), y, ProbeConfig(n_boot=200, control=False))
    assert result.control is None
    assert result.accuracy.value <= 0.65


def test_probe_is_deterministic_given_the_seed():
    X, y = blobs(separation=1.0)
    a, b = probes.probe_accuracy(X, y, FAST), probes.probe_accuracy(X, y, FAST)
    np.testing.assert_array_equal(a.predicted, b.predicted)
    assert a.accuracy == b.accuracy and a.control == b.control


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_probes_fit_on_one_blas_thread_and_give_the_threads_back(monkeypatch):
    inside = []
    fit = probes.cross_val_predict

    def recording(*args, **kwargs):
        inside.append(blas_threads())
        return fit(*args, **kwargs)

    monkeypatch.setattr(probes, "cross_val_predict", recording)
    before = blas_threads()
    with threadpool_limits(limits=2, user_api="blas"):  # as on the book's 2-core machine
        X, y = blobs()
        probes.probe_accuracy(X, y, FAST)
        after = blas_threads()
    assert inside and all(threads == [1] * len(before) for threads in inside)
    assert after == [min(2, n) for n in before]


def test_probe_reduces_folds_for_a_small_class():
    X, y = blobs()
    keep = np.r_[0:20, 20:23, 40:60]  # "fear" keeps 3 items
    with pytest.warns(UserWarning, match="reduced from 5 to 3.*'fear' has only 3"):
        result = probes.probe_accuracy(X[keep], y[keep], FAST)
    assert result.folds == 3


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.zeros((6, 2)), ["a"] * 6, "at least 2 classes"),
        (np.zeros((6, 2)), ["a"] * 5 + ["b"], "single item"),
        (np.zeros((6, 2)), ["a", "b"] * 2, "one label per row"),
        (np.zeros(6), ["a", "b"] * 3, "2-D"),
        (np.full((6, 2), np.nan), ["a", "b"] * 3, "NaN"),
    ],
)
def test_probe_rejects_bad_inputs(X, y, match):
    with pytest.raises(FlowError, match=match):
        probes.probe_accuracy(X, y, FAST)


def test_probe_config_is_checked():
    with pytest.raises(FlowError, match="folds"):
        ProbeConfig(folds=1)
    with pytest.raises(FlowError, match="level"):
        ProbeConfig(level=1.0)


# --------------------------------------------------------------------------------------------------- CKA


def naive_cka(X, Y):
    """CKA from its definition with the centring matrix H (independent of flow's two code paths)."""
    n = len(X)
    H = np.eye(n) - 1 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.trace(K @ L) / np.sqrt(np.trace(K @ K) * np.trace(L @ L))


def test_cka_hand_computed():
    # one feature each: linear CKA is the squared correlation, (4 / sqrt(2 * 26/3))^2 = 12/13
    assert similarity.linear_cka([[0], [1], [2]], [[0], [1], [4]]) == pytest.approx(12 / 13)


@pytest.mark.parametrize("d", [5, 50])  # n = 20 items: feature form, then Gram form
def test_cka_matches_its_definition_and_is_one_on_itself(d):
    rng = np.random.default_rng(d)
    X = rng.normal(size=(20, d))
    Y = X[:, :3] @ rng.normal(size=(3, 7)) + rng.normal(size=(20, 7))
    assert similarity.linear_cka(X, X) == pytest.approx(1.0)
    assert similarity.linear_cka(X, Y) == pytest.approx(naive_cka(X, Y))
    assert similarity.linear_cka(X, Y) == pytest.approx(similarity.linear_cka(Y, X))


@pytest.mark.parametrize("d", [4, 40])
def test_cka_is_invariant_to_rotation_scaling_and_translation(d):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, d))
    Y = X @ rng.normal(size=(d, 6)) + 0.5 * rng.normal(size=(30, 6))
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    moved = 3.7 * X @ Q + 5.0
    assert similarity.linear_cka(moved, Y) == pytest.approx(similarity.linear_cka(X, Y))
    assert similarity.linear_cka(X, Y) < 0.99  # not trivially one


def test_cka_of_independent_data_is_near_zero():
    rng = np.random.default_rng(0)
    assert similarity.linear_cka(rng.normal(size=(5000, 3)), rng.normal(size=(5000, 4))) < 0.01


def test_cka_rejects_bad_inputs():
    with pytest.raises(FlowError, match="same items"):
        similarity.linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(FlowError, match="constant"):
        similarity.linear_cka(np.ones((5, 2)), np.arange(10.0).reshape(5, 2))
    with pytest.raises(FlowError, match="2-D"):
        similarity.linear_cka(np.arange(5.0), np.arange(5.0))


# -------------------------------------------------------------------------------------------- logit lens

LABEL_IDS = [5, 17, 42, 250, 399]


def final_residual_and_probs(model, tokenizer):
    tokens = torch.tensor([tokenizer("Text: The cake was wonderful. Answer:").input_ids] * 2)
    tokens[1, 3] = 60  # two different sequences
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: "resid_post" in name)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].reshape(-1, model.cfg.d_model)
    probs = torch.softmax(logits.double(), dim=-1).reshape(-1, model.cfg.d_vocab)
    return resid, probs, cache


def test_lens_at_the_last_layer_is_the_models_own_output(any_tiny_model, tiny_tokenizer):
    resid, probs, _ = final_residual_and_probs(any_tiny_model, tiny_tokenizer)
    lensed = lens.logit_lens(any_tiny_model, resid, LABEL_IDS, batch_size=3)  # several batches
    expected = probs[:, LABEL_IDS].numpy()
    np.testing.assert_allclose(lensed.label_probs, expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(lensed.renormalised, expected / expected.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(lensed.mass, expected.sum(1), atol=1e-5)
    assert lensed.label_probs.shape == (len(resid), len(LABEL_IDS))


def test_lens_sums_a_labels_tokens_and_reads_numpy_and_earlier_layers(tiny_model, tiny_tokenizer):
    resid, _, cache = final_residual_and_probs(tiny_model, tiny_tokenizer)
    single = lens.logit_lens(tiny_model, resid, LABEL_IDS)
    grouped = lens.logit_lens(tiny_model, resid.numpy(), [[5, 17], 42])
    np.testing.assert_allclose(grouped.label_probs[:, 0], single.label_probs[:, :2].sum(1), rtol=1e-6)
    np.testing.assert_allclose(grouped.label_probs[:, 1], single.label_probs[:, 2], rtol=1e-6)
    early = lens.logit_lens(tiny_model, cache["blocks.0.hook_resid_post"].reshape(len(resid), -1), LABEL_IDS)
    assert not np.allclose(early.label_probs, single.label_probs)
    np.testing.assert_allclose(early.renormalised.sum(1), 1.0)


def test_lens_rejects_bad_inputs_and_readout_hooks(tiny_model, tiny_tokenizer):
    resid, _, _ = final_residual_and_probs(tiny_model, tiny_tokenizer)
    with pytest.raises(FlowError, match="d_model=32"):
        lens.logit_lens(tiny_model, resid[:, :10], LABEL_IDS)
    with pytest.raises(FlowError, match="d_model"):
        lens.logit_lens(tiny_model, resid[0], LABEL_IDS)
    with pytest.raises(FlowError, match="ambiguous"):
        lens.logit_lens(tiny_model, resid, [[5, 17], [17]])
    with pytest.raises(FlowError, match="must be in"):
        lens.logit_lens(tiny_model, resid, [5, 400])
    with (
        tiny_model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda t, hook: t)]),
        pytest.raises(FlowError, match="ln_final.hook_normalized"),
    ):
        lens.logit_lens(tiny_model, resid, LABEL_IDS)


def test_label_first_tokens_and_gold_column():
    sequences = [(0, (5,)), (0, (6, 7)), (1, (9, 3)), (0, (5, 8))]
    assert lens.label_first_tokens(sequences, 2) == [[5, 6], [9]]
    with pytest.raises(FlowError, match="ambiguous"):
        lens.label_first_tokens([(0, (5,)), (1, (5, 2))], 2)
    with pytest.raises(FlowError, match="no verbaliser"):
        lens.label_first_tokens(sequences, 3)
    values = np.array([[0.1, 0.9], [0.7, 0.3], [0.4, 0.6]])
    np.testing.assert_allclose(lens.at_gold(values, ["b", "a", "a"], ("a", "b")), [0.9, 0.7, 0.4])
    with pytest.raises(FlowError, match="not among"):
        lens.at_gold(values, ["b", "a", "c"], ("a", "b"))
    with pytest.raises(FlowError, match="n_items=2"):
        lens.at_gold(values, ["b", "a"], ("a", "b"))


# ------------------------------------------------------------------------------------------ segmentation


def planted(means: list[tuple[int, list[float]]], noise: float, seed: int, first_layer: int = 0):
    """A profile whose metrics are constant within planted phases: [(n_layers, [mean per metric]), ...]."""
    rng = np.random.default_rng(seed)
    signal = np.concatenate([np.tile(m, (n, 1)) for n, m in means])
    signal = signal + noise * rng.normal(size=signal.shape)
    layers = range(first_layer, first_layer + len(signal))
    return phases.layer_profile({f"m{j}": signal[:, j] for j in range(signal.shape[1])}, layers)


THREE = [(7, [0.0, 0.0]), (12, [1.0, -1.0]), (11, [3.0, 1.0])]  # 30 layers, phases start at 7 and 19


def test_a_planted_change_point_is_recovered_exactly():
    profile = planted([(8, [0.2, 5.0]), (12, [0.8, 2.0])], noise=0.1, seed=0, first_layer=10)
    segmentation = phases.segment_phases(profile, 2)
    assert segmentation.boundaries == (18,)
    assert segmentation.phases == ((10, 17), (18, 29))
    phase = segmentation.phase_of(profile.index)
    assert phase.loc[17] == 1 and phase.loc[18] == 2


def test_three_planted_phases_are_recovered_and_the_cost_is_the_z_scored_l2_cost():
    profile = planted(THREE, noise=0.3, seed=1)
    segmentation = phases.segment_phases(profile, 3)
    assert segmentation.boundaries == (7, 19)
    z = (profile - profile.mean()) / profile.std(ddof=0)
    cost = sum(((part - part.mean()) ** 2).to_numpy().sum() for part in (z[:7], z[7:19], z[19:]))
    assert segmentation.cost == pytest.approx(cost)
    assert phases.segment_phases(profile, 1).cost == pytest.approx(len(profile) * 2)  # z-scored: variance 1


def test_a_constant_metric_changes_nothing():
    profile = planted(THREE, noise=0.3, seed=1)
    rounded = 0.1 + 1e-16 * (np.arange(30) % 3)  # constant but for rounding: z-scoring must not inflate it
    with_constant = profile.assign(flat=7.0, rounded=rounded)
    assert not np.isnan(phases.standardised(with_constant)).any()
    a, b = phases.segment_phases(profile, 3), phases.segment_phases(with_constant, 3)
    assert a.boundaries == b.boundaries and a.cost == pytest.approx(b.cost)


def test_min_size_keeps_a_single_odd_layer_from_being_a_phase():
    profile = planted([(1, [9.0]), (9, [0.0]), (10, [2.0])], noise=0.05, seed=0)
    assert phases.segment_phases(profile, 3, min_size=1).boundaries == (1, 10)
    two_layers_at_least = phases.segment_phases(profile, 3, min_size=2)
    assert two_layers_at_least.boundaries == (2, 10)
    assert all(last > first for first, last in two_layers_at_least.phases)


@pytest.mark.parametrize(
    ("n_phases", "min_size", "match"),
    [(31, 1, "do not fit"), (16, 2, "do not fit"), (0, 2, "at least 1"), (2, 0, "min_size")],
)
def test_segmentation_rejects_impossible_phase_counts(n_phases, min_size, match):
    with pytest.raises(FlowError, match=match):
        phases.segment_phases(planted(THREE, 0.3, 0), n_phases, min_size=min_size)


def test_profiles_are_checked():
    with pytest.raises(FlowError, match="same length"):
        phases.layer_profile({"a": [1, 2, 3], "b": [1, 2]})
    with pytest.raises(FlowError, match="2 layers given"):
        phases.layer_profile({"a": [1, 2, 3]}, layers=[0, 1])
    with pytest.raises(FlowError, match="NaN"):
        phases.layer_profile({"a": [1, np.nan, 3]})
    with pytest.raises(FlowError, match="repeated"):
        phases.segment_phases(pd.DataFrame({"a": [1.0, 2.0, 3.0]}, index=[0, 1, 1]), 1)
    with pytest.raises(FlowError, match="non-empty"):
        phases.segment_phases(pd.DataFrame(), 1)


# --------------------------------------------------------------------------------- phase-count test


@pytest.mark.parametrize("penalty", ["calibrated", "bic"])
def test_three_planted_phases_choose_three_not_two_or_four(penalty):
    chosen = [
        phases.phase_count_test(planted(THREE, 0.3, seed), penalty=penalty).chosen for seed in range(10)
    ]
    assert chosen == [3] * 10
    test = phases.phase_count_test(planted(THREE, 0.3, 0), penalty=penalty)
    assert list(test.table.index) == [1, 2, 3, 4]
    assert test.table.loc[3, "reduction"] > test.penalty > test.table.loc[4, "reduction"]
    assert test.table.loc[3, "boundaries"] == (7, 19)
    assert test.table.loc[3, "paid"] > 1 > test.table.loc[4, "paid"] and not test.at_largest
    assert np.isnan(test.table.loc[1, "paid"])
    assert test.table["cost"].is_monotonic_decreasing and test.table.loc[3, "r2"] > 0.9


def test_pure_noise_rarely_gets_phases():
    noise = [planted([(30, [0.0, 0.0])], 1.0, seed) for seed in range(40)]
    chosen = [phases.phase_count_test(profile).chosen for profile in noise]
    assert chosen.count(1) >= 34  # the calibrated penalty allows ~5% false phases
    without_one = phases.phase_count_test(noise[0], candidates=(2, 3, 4))
    assert without_one.chosen == 2


def test_the_calibrated_penalty_lets_noise_buy_a_phase_about_five_percent_of_the_time():
    rng = np.random.default_rng(7)
    hits = []
    for _ in range(150):
        profile = phases.layer_profile({"a": rng.normal(size=20), "b": 3 * rng.normal(size=20)})
        penalty = phases.calibrated_penalty(profile, sd=[1.0, 3.0], n_sim=400)
        drop = phases.segment_phases(profile, 1).cost - phases.segment_phases(profile, 2).cost
        hits.append(drop > penalty)
    assert 0.01 <= np.mean(hits) <= 0.12


def walking_items(seed: int, n_items: int = 150, n_layers: int = 20, step_at: int | None = None) -> dict:
    """Per-item values `[layers, items]` of two metrics that random-walk across layers (an item's value at layer
    l + 1 is its value at l plus noise: the cross-layer correlation of real per-item outcomes), with no change of
    the mean unless `step_at` adds a step of 1.5 there."""
    rng = np.random.default_rng(seed)
    walks = np.cumsum(rng.normal(size=(2, n_layers, n_items)), axis=1)
    if step_at is not None:
        walks[:, step_at:] += 1.5
    return {"a": walks[0], "b": 3 * walks[1]}


def bootstrap_choice(values: dict, n_resamples: int = 300, seed: int = 0) -> tuple[int, float]:
    n_items = next(iter(values.values())).shape[1]
    profile_fn = functools.partial(phases.item_metric_profile, values)
    rng = np.random.default_rng(seed)
    resamples = [profile_fn(rng.integers(0, n_items, size=n_items)) for _ in range(n_resamples)]
    profile = profile_fn()
    penalty = phases.bootstrap_penalty(profile, resamples)
    return phases.phase_count_test(profile, penalty=penalty).chosen, penalty


def test_a_penalty_from_item_bootstraps_keeps_correlated_noise_from_buying_phases():
    """Item outcomes correlated across layers make the mean profile a smooth random walk: noise that independent
    per-layer noise prices too low (the calibrated penalty with its neighbour-difference noise level buys phases
    in nearly every walk; given the true per-layer standard error, still more often than it should), while the
    bootstrap's deviations carry the correlation and rarely do. A real step is still found."""
    from_bootstrap, from_neighbours, from_independent = [], [], []
    for seed in range(30):
        values = walking_items(seed)
        from_bootstrap.append(bootstrap_choice(values)[0])
        profile = phases.item_metric_profile(values)
        from_neighbours.append(phases.phase_count_test(profile).chosen)
        se = [v.std(axis=1).mean() / np.sqrt(v.shape[1]) for v in values.values()]
        from_independent.append(phases.phase_count_test(profile, sd=se).chosen)
    false_phases = {
        name: sum(k > 1 for k in chosen)
        for name, chosen in (
            ("bootstrap", from_bootstrap),
            ("neighbours", from_neighbours),
            ("independent", from_independent),
        )
    }
    assert false_phases["bootstrap"] <= 4  # about 5% by construction, 13% allowed
    assert false_phases["neighbours"] >= 25  # the price the flow study used before fails here
    assert false_phases["independent"] > false_phases["bootstrap"]
    stepped = [bootstrap_choice(walking_items(seed, n_items=600, step_at=10))[0] for seed in range(5)]
    assert all(k >= 2 for k in stepped)


def test_bootstrap_penalty_checks_its_resamples():
    values = walking_items(0)
    profile = phases.item_metric_profile(values)
    with pytest.raises(FlowError, match="at least one resampled"):
        phases.bootstrap_penalty(profile, [])
    with pytest.raises(FlowError, match="layers and metrics"):
        phases.bootstrap_penalty(profile, [profile.iloc[1:]])
    assert phases.bootstrap_penalty(profile, [profile]) == 0.0  # no deviation: no price


def test_penalty_extremes_and_smooth_trends():
    profile = planted(THREE, 0.3, 0)
    assert phases.phase_count_test(profile, penalty=0.0).chosen == 4
    assert phases.phase_count_test(profile, penalty=1e6).chosen == 1
    x = np.linspace(-3, 3, 30)
    ramp = phases.layer_profile({"s": 1 / (1 + np.exp(-2 * x)), "r": x})
    assert phases.phase_count_test(ramp).at_largest  # a trend is not a few steps: no count is supported


def test_noiseless_steps_choose_the_fewest_exact_phases():
    profile = planted(THREE, 0.0, 0)
    assert phases.phase_count_test(profile).chosen == 3


def test_phase_count_test_rejects_bad_settings():
    profile = planted(THREE, 0.3, 0)
    with pytest.raises(FlowError, match="do not fit"):
        phases.phase_count_test(profile, candidates=(2, 16))
    with pytest.raises(FlowError, match="one of"):
        phases.phase_count_test(profile, penalty="aic")
    with pytest.raises(FlowError, match="non-negative"):
        phases.phase_count_test(profile, penalty=-1.0)
    with pytest.raises(FlowError, match="one non-negative value per metric"):
        phases.phase_count_test(profile, sd=[1.0])
    with pytest.raises(FlowError, match="no candidate"):
        phases.phase_count_test(profile, candidates=())


# ------------------------------------------------------------------------------------- item bootstraps


def item_values(step: float, n_items: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-item values [20 layers, n_items] whose layer means step at layers 6 and 14."""
    rng = np.random.default_rng(seed)
    means = np.r_[np.zeros(6), np.ones(8), 2 * np.ones(6)] * step
    return {
        "probe": means[:, None] + rng.normal(size=(20, n_items)),
        "lens": -means[:, None] + rng.normal(size=(20, n_items)),
    }


def test_item_metric_profile_averages_the_chosen_items():
    values = {"a": np.arange(12.0).reshape(3, 4), "b": np.ones((3, 4))}
    profile = phases.item_metric_profile(values, [0, 0, 3], layers=[4, 5, 6])
    assert list(profile.index) == [4, 5, 6] and list(profile.columns) == ["a", "b"]
    np.testing.assert_allclose(profile["a"], [1.0, 5.0, 9.0])  # (0 + 0 + 3) / 3, ...
    np.testing.assert_allclose(phases.item_metric_profile(values)["a"], [1.5, 5.5, 9.5])
    with pytest.raises(FlowError, match="same"):
        phases.item_metric_profile({"a": np.ones((3, 4)), "b": np.ones((3, 5))})
    with pytest.raises(FlowError, match="integer positions"):
        phases.item_metric_profile(values, [0, 4])
    with pytest.raises(FlowError, match="integer positions"):
        phases.item_metric_profile(values, [0.0, 1.0])


def test_bootstrap_intervals_contain_planted_boundaries_and_are_narrow_for_a_strong_signal():
    profile_fn = functools.partial(phases.item_metric_profile, item_values(step=1.5))
    boot = phases.bootstrap_boundaries(profile_fn, 60, 3, n_boot=40, seed=0, candidates=(1, 2, 3, 4))
    assert boot.point.boundaries == (6, 14)
    for interval, planted_at in zip(boot.intervals, (6, 14), strict=True):
        assert interval.low <= planted_at <= interval.high
        assert interval.high - interval.low <= 2
    assert boot.draws.shape == (40, 2)
    assert boot.counts is not None and boot.counts.loc[3] >= 0.9
    assert boot.boundary_frequency().sum() == pytest.approx(2.0)
    again = phases.bootstrap_boundaries(profile_fn, 60, 3, n_boot=40, seed=0)
    pd.testing.assert_frame_equal(boot.draws, again.draws)
    assert again.counts is None


def test_bootstrap_intervals_widen_for_a_weak_signal():
    def width(step):
        fn = functools.partial(phases.item_metric_profile, item_values(step=step, n_items=30))
        boot = phases.bootstrap_boundaries(fn, 30, 3, n_boot=40, seed=1)
        return sum(i.high - i.low for i in boot.intervals)

    assert width(0.15) > width(1.5) + 4


def test_bootstrap_rejects_inconsistent_profiles():
    values = item_values(step=1.0)
    calls = []

    def shifting(indices):
        calls.append(indices)
        return phases.item_metric_profile(values, indices, layers=range(len(calls), len(calls) + 20))

    with pytest.raises(FlowError, match="same layers"):
        phases.bootstrap_boundaries(shifting, 60, 2, n_boot=5)
    with pytest.raises(FlowError, match="at least 2 items"):
        phases.bootstrap_boundaries(shifting, 1, 2)


# ------------------------------------------------------------------------------------ per-layer controls


def test_permutation_chance_is_the_expected_accuracy_under_shuffled_gold():
    gold = np.array(["a", "b", "c", "a", "b", "c"])
    assert lens.permutation_chance(gold, gold) == pytest.approx(1 / 3)  # balanced: 1 / L
    assert lens.permutation_chance(["a"] * 6, gold) == pytest.approx(1 / 3)  # always one label
    skewed = np.array(["a", "a", "a", "a", "b", "c"])
    assert lens.permutation_chance(skewed, skewed) == pytest.approx((4 / 6) ** 2 + 2 * (1 / 6) ** 2)
    rng = np.random.default_rng(0)
    simulated = np.mean([(skewed == rng.permutation(skewed)).mean() for _ in range(4000)])
    assert simulated == pytest.approx(lens.permutation_chance(skewed, skewed), abs=0.01)
    with pytest.raises(FlowError, match="same non-empty"):
        lens.permutation_chance(["a"], ["a", "b"])


def test_consecutive_cka_tracks_identity_and_its_control_is_low():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6))
    acts = {0: X, 1: 2 * X + 1, 2: rng.normal(size=(80, 6))}
    table = similarity.consecutive_cka(acts, seed=0)
    assert list(table.index) == [0, 1, 2] and np.isnan(table.loc[0, "cka"])
    assert table.loc[1, "cka"] == pytest.approx(1.0)
    assert table.loc[1, "control"] < 0.3 and table.loc[2, "cka"] < 0.3
    with pytest.raises(FlowError, match="two layers"):
        similarity.consecutive_cka({0: X})


def coded_items(n_per: int = 15, d: int = 12, seed: int = 0):
    """Non-negative codes where feature 0 fires on "joy" items only and the rest is label-blind noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(["joy", "fear", "anger"], n_per)
    codes = np.maximum(rng.normal(size=(len(y), d)), 0)
    codes[:, 0] = np.where(y == "joy", 3 + rng.random(len(y)), 0.0)
    return codes, y


def test_selective_with_null_finds_the_planted_feature_and_the_null_does_not():
    codes, y = coded_items()
    result = selectivity.selective_with_null(codes, y, ("joy", "fear", "anger"), n_shuffles=10, seed=0)
    assert result.count >= 1 and result.selectivity.selective[0, 0]
    assert result.null_counts.shape == (10,) and result.null_counts.max() == 0
    assert result.exceeds_null and result.p_value == pytest.approx(1 / 11)
    chosen = result.selectivity.selective.any(axis=1)
    assert result.mass_share == pytest.approx(codes[:, chosen].sum() / codes.sum())
    assert (result.null_shares == 0).all()
    row = result.row()
    assert row["selective"] == result.count and row["selective_null_max"] == 0
    again = selectivity.selective_with_null(codes, y, ("joy", "fear", "anger"), n_shuffles=10, seed=0)
    np.testing.assert_array_equal(result.null_counts, again.null_counts)
    with pytest.raises(FlowError, match="non-negative"):
        selectivity.selective_with_null(-codes, y, ("joy", "fear", "anger"))


def test_shuffled_selectivity_reuses_ranks_and_equals_selectivity_of_the_shuffled_labels():
    """The permutation path ranks the codes once; each permutation gives what `selectivity` gives on it."""
    codes, y = coded_items(n_per=20, d=30, seed=2)
    emotions = ("joy", "fear", "anger")
    _, results = selectivity.permuted_selectivities(
        codes, y, emotions, SelectivityConfig(min_items=5), 4, seed=7
    )
    rng = np.random.default_rng(7)
    for result in results:
        direct = selectivity.selectivity(codes, rng.permutation(y), emotions, SelectivityConfig(min_items=5))
        for name in ("auroc", "p_value", "q_value", "mean_in", "rate_in", "selective"):
            np.testing.assert_allclose(
                getattr(result, name), getattr(direct, name), rtol=1e-12, equal_nan=True
            )


def test_selective_with_null_stops_early_where_the_null_reaches_the_count():
    """Besag-Clifford: a layer whose count and top AUROCs the permutations reach stops at the first permutation
    by which `stop_after` of them have reached each statistic; a layer with a planted feature the null never
    reaches runs them all, and its p-value is 1 / (1 + n)."""
    rng = np.random.default_rng(3)
    noise = np.maximum(rng.normal(size=(45, 20)), 0)
    y = np.repeat(["joy", "fear", "anger"], 15)
    emotions = ("joy", "fear", "anger")
    stopped = selectivity.selective_with_null(noise, y, emotions, n_shuffles=500, stop_after=4)
    n = len(stopped.null_counts)
    assert stopped.count == 0 and n < 500 and stopped.p_value == 1.0
    reached = np.minimum.reduce(
        [
            np.cumsum(stopped.null_counts >= stopped.count),
            np.cumsum(stopped.null_max >= stopped.auroc_max),
            np.cumsum(stopped.null_top >= stopped.auroc_top),
        ]
    )
    assert reached[-1] == 4 and (n == 1 or reached[-2] < 4)
    assert stopped.row()["auroc_top_p"] > 0.05 and stopped.row()["auroc_max_p"] > 0.05
    codes, y = coded_items()
    full = selectivity.selective_with_null(codes, y, emotions, n_shuffles=60, stop_after=4)
    assert len(full.null_counts) == 60 and full.p_value == pytest.approx(1 / 61)


def test_top_aurocs_see_a_feature_too_weak_for_the_count():
    """A feature whose activation on one emotion is 1.9 times larger (AUROC about 0.66, under the count's 0.7):
    no selective feature, but its AUROC beats every permutation's largest; on noise it does not."""
    rng = np.random.default_rng(5)
    y = np.repeat(["joy", "fear", "anger"], 100)
    codes = rng.exponential(size=(300, 20))
    weak = codes.copy()
    weak[:, 0] = np.where(y == "joy", 1.9, 1.0) * codes[:, 0]
    emotions = ("joy", "fear", "anger")
    planted = selectivity.selective_with_null(weak, y, emotions, n_shuffles=60, stop_after=4)
    row = planted.row()
    assert planted.count == 0 and 0.6 < planted.auroc_max < 0.7
    assert planted.auroc_max == pytest.approx(planted.selectivity.auroc[0, 0])
    assert len(planted.null_max) == 60 and row["auroc_max_p"] == pytest.approx(1 / 61)
    assert row["auroc_max"] > row["auroc_max_null_max"]
    top = np.sort(planted.selectivity.auroc[planted.selectivity.tested].ravel())[-10:]
    assert planted.auroc_top == pytest.approx(top.mean())
    noise = selectivity.selective_with_null(codes, y, emotions, n_shuffles=60, stop_after=4)
    assert noise.row()["auroc_max_p"] > 0.05 and noise.row()["auroc_top_p"] > 0.05


def test_enough_shuffles_for_a_holm_correction_across_layers():
    config = FlowConfig()
    for n_layers in (18, 24, 30):
        n = config.shuffles_for(n_layers)
        threshold = Fraction(str(config.layer_alpha)) / n_layers  # Holm's first (strictest) threshold
        assert (
            Fraction(1, 1 + n) < threshold <= Fraction(1, n)
        )  # the smallest p passes it; one fewer would not
    assert dataclasses.replace(config, n_shuffles=7).shuffles_for(30) == 7
    with pytest.raises(FlowError, match="layer_alpha"):
        FlowConfig(layer_alpha=1.5)


def test_selective_with_null_on_noise_does_not_exceed_its_null():
    rng = np.random.default_rng(3)
    codes = np.maximum(rng.normal(size=(45, 20)), 0)
    y = np.repeat(["joy", "fear", "anger"], 15)
    result = selectivity.selective_with_null(codes, y, ("joy", "fear", "anger"), n_shuffles=5)
    assert result.count == 0 and not result.exceeds_null and result.p_value == 1.0


class FakeStore:
    """The three index arrays and one hook's rows of an all-token ActivationStore."""

    def __init__(self, sequence, position, token_ids, rows):
        self._s, self._p, self._t, self._rows = sequence, position, token_ids, rows

    def sequence_index(self):
        return torch.tensor(self._s)

    def positions(self):
        return torch.tensor(self._p)

    def token_ids(self):
        return torch.tensor(self._t)

    def load(self, hook):
        return torch.tensor(self._rows, dtype=torch.float32)


def test_token_codes_marks_template_rows_and_top_tokens_shows_context():
    prompts = [[10, 11, 12, 13], [10, 11, 14]]
    masks = [np.array([False, False, True, False]), np.array([False, False, True])]
    rows = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 5.0]])
    store = FakeStore([0, 0, 0, 1], [1, 2, 3, 2], [11, 12, 13, 14], rows)
    tokens = roles.token_codes(store, "h", lambda x: x * 2, masks)
    np.testing.assert_array_equal(tokens.is_template, [True, False, True, False])
    np.testing.assert_allclose(tokens.codes, rows * 2)
    table = roles.top_tokens(
        tokens.codes[:, 1], tokens, prompts, lambda ids: "".join(f"<{i}>" for i in ids), k=5
    )
    assert list(table["token"]) == ["<14>", "<12>"]  # only active rows, strongest first
    assert table.loc[0, "context"] == "<10><11>[[<14>]]" and not table.loc[0, "template"]
    with pytest.raises(FlowError, match="beyond"):
        roles.token_codes(FakeStore([1], [3], [1], rows[:1]), "h", lambda x: x, masks)
    with pytest.raises(FlowError, match="one entry per stored token"):
        roles.top_tokens(np.ones(2), tokens, prompts, str)


def test_role_mass_shares_sum_to_one():
    codes = np.array([[1.0, 2.0, 0.0], [1.0, 0.0, 4.0]])
    shares = roles.role_mass_shares(
        codes, ["template", "emotion", "template"], ("template", "content", "emotion")
    )
    assert shares == pytest.approx({"template": 0.75, "content": 0.0, "emotion": 0.25})


# --------------------------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("chosen", "at_largest", "share", "expected"),
    [
        (3, False, 0.8, "holds"),
        (3, False, 0.3, "partly"),
        (2, False, 0.3, "partly"),
        (2, False, 0.1, "does not hold"),
        (1, False, 0.0, "does not hold"),
        (4, True, 0.1, "inconclusive"),
        (3, False, None, "holds"),
    ],
)
def test_three_phase_verdict(chosen, at_largest, share, expected):
    verdict = flow.three_phase_verdict(chosen, at_largest, share)
    assert verdict.verdict == expected and verdict.reason and verdict.rule == "three_phase_verdict"
    # a smooth trend that fits at least as well as three phases overrules whatever the count test chose
    trend = flow.three_phase_verdict(chosen, at_largest, share, beats_trend=False, r2=(0.80, 0.85))
    assert trend.verdict == "does not hold" and "smooth trend" in trend.reason and "0.85" in trend.reason
    assert flow.three_phase_verdict(chosen, at_largest, share, beats_trend=True).verdict == expected


def test_boundaries_that_rest_on_one_metric_make_three_phases_partly():
    """Three metrics step at layers 8 and 16; a fourth (a lens quantity, say) steps only at 20. The full cut's
    second boundary sits between 16 and 20; without the odd metric it returns to 16: if that leaves the
    bootstrap interval, "holds" becomes "partly"."""
    rng = np.random.default_rng(1)
    steps = {m: np.repeat([0.0, 1.0, 2.0], 8) + rng.normal(0, 0.01, 24) for m in ("a", "b", "c")}
    odd = np.r_[np.zeros(20), np.full(4, 8.0)]
    profile = phases.layer_profile({**steps, "lens": odd})
    without = phases.leave_one_metric_out(profile, 3)
    assert without["lens"] == (8, 16) and set(without) == {"a", "b", "c", "lens"}
    full = phases.segment_phases(profile, 3).boundaries
    cut = flow.PhaseCut(
        phases=((0, full[0] - 1), (full[0], full[1] - 1), (full[1], 23)),
        intervals=tuple(Estimate(float(b), float(b), float(b)) for b in full),
    )
    moved = flow.moved_boundaries(cut, without)
    assert full != (8, 16) and moved and "lens" in moved
    verdict = flow.three_phase_verdict(3, False, 0.9, beats_trend=True, moved=moved)
    assert verdict.verdict == "partly" and "lens" in verdict.reason
    assert flow.three_phase_verdict(3, False, 0.9, beats_trend=True).verdict == "holds"
    assert phases.leave_one_metric_out(phases.layer_profile({"a": steps["a"]})) == {}


def test_a_smooth_trend_beats_three_phases_on_a_ramp_and_loses_on_steps():
    """The alternative can win: a linear ramp across 24 layers is fitted better by a cubic than by three steps;
    three clean steps are not."""
    layers = np.arange(24)
    rng = np.random.default_rng(0)
    ramp = phases.layer_profile({m: layers / 23 + rng.normal(0, 0.02, 24) for m in ("a", "b", "c")})
    steps = phases.layer_profile(
        {m: np.repeat([0.0, 1.0, 3.0], 8) + rng.normal(0, 0.02, 24) for m in ("a", "b", "c")}
    )
    on_ramp = phases.phase_count_test(ramp, (1, 2, 3, 4))
    on_steps = phases.phase_count_test(steps, (1, 2, 3, 4))
    assert on_ramp.three_beats_trend is False and on_ramp.trend_r2 > on_ramp.table.loc[3, "r2"]
    assert on_steps.three_beats_trend is True and on_steps.chosen == 3
    assert phases.phase_count_test(steps, (1, 2)).three_beats_trend is None
    assert phases.feasible_candidates(range(1, 9), 13) == (1, 2, 3, 4, 5, 6)
    with pytest.raises(FlowError, match="degree-3 trend"):
        phases.trend_cost(steps.iloc[:3])


def test_late_emergence_verdict():
    layers = pd.Index(range(6), name="layer")
    phase = pd.Series([1, 1, 2, 2, 3, 3], index=layers)

    def verdict(present, excess):
        return flow.late_emergence_verdict(
            pd.Series(present, index=layers), pd.Series(excess, index=layers), phase
        ).verdict

    none = [False] * 6
    assert verdict(none, [0.0] * 6) == "inconclusive"
    assert verdict([False] * 4 + [True, True], [0, 0, 0, 0, 5, 9]) == "holds"
    assert verdict([False, False, True, False, True, True], [0, 0, 2, 0, 5, 9]) == "partly"
    assert verdict([True, True, True, True, True, False], [9, 9, 9, 9, 1, 0]) == "does not hold"
    assert verdict([True, False, False, False, False, False], [3, 0, 0, 0, 0, 0]) == "does not hold"
    with pytest.raises(FlowError, match="same layers"):
        flow.late_emergence_verdict(pd.Series(none), pd.Series([0.0] * 5), phase)

    def with_decodable(present, excess, decodable):
        return flow.late_emergence_verdict(
            pd.Series(present, index=layers),
            pd.Series(excess, index=layers),
            phase,
            pd.Series(decodable, index=layers),
        )

    late = [False] * 4 + [True, True]
    # counted features only late, but earlier features carry emotion beyond the control: the claim fails in part
    found = with_decodable(late, [0, 0, 0, 0, 5, 9], [False, True, True, False, True, True])
    assert found.verdict == "partly" and "layers 1-2 carry emotion" in found.reason
    assert found.numbers["layers_decodable_before_last_phase"] == 2
    assert with_decodable(late, [0, 0, 0, 0, 5, 9], [False] * 4 + [True, True]).verdict == "holds"
    # nothing counted: emotion carried only by earlier features, or only by late ones, or by none
    assert with_decodable(none, [0.0] * 6, [True] + [False] * 5).verdict == "does not hold"
    assert with_decodable(none, [0.0] * 6, [True] * 6).verdict == "does not hold"
    assert with_decodable(none, [0.0] * 6, [False] * 5 + [True]).verdict == "partly"
    assert with_decodable(none, [0.0] * 6, none).verdict == "inconclusive"
    mostly_early = with_decodable([True, True, True, True, True, False], [9, 9, 9, 9, 1, 0], [True] * 6)
    assert mostly_early.verdict == "does not hold"


def per_layer_frame(present: list[bool], misses: list[str] | None = None) -> pd.DataFrame:
    """What the late-emergence verdict reads per layer: counted features where `present` (excess 5), nothing
    carried otherwise, and each layer's SAE misses."""
    frame = pd.DataFrame(
        {
            "selective_beyond_control": present,
            "selective": [5.0 if p else 0.0 for p in present],
            "selective_null_mean": 0.0,
            "auroc_top_beyond_control": False,
            "probe_sae_low": 0.2,
            "probe_sae_control_high": 0.3,
            "sae_misses": misses or [""] * len(present),
        },
        index=pd.Index(range(len(present)), name="layer"),
    )
    return frame


def test_the_late_emotion_finding_must_survive_retrained_saes_and_adequate_ones():
    phase = pd.Series([1, 1, 2, 2, 3, 3], index=pd.Index(range(6), name="layer"))
    late = per_layer_frame([False] * 4 + [True, True])
    early = per_layer_frame([False, True, False, False, True, True])
    rule = functools.partial(flow.late_emergence_verdict, phase=phase)

    def seed_verdict(frame):
        return rule(
            frame["selective_beyond_control"], frame["selective"], decodable=flow.decodable_layers(frame)
        )

    # every seed agrees: the book's verdict stands, with the seeds' outcomes in its numbers
    agreed = flow.late_emotion_finding(late, phase, {1: seed_verdict(late), 2: seed_verdict(late)}, 0)
    assert agreed.verdict == "holds" and agreed.numbers["stable_across_seeds"]
    # a seed whose SAEs show counted features in phase 1 too: the finding rests on one training run
    split = flow.late_emotion_finding(late, phase, {1: seed_verdict(late), 2: seed_verdict(early)}, 0)
    assert split.verdict == "inconclusive"
    assert "seed 0: holds; seed 1: holds; seed 2: partly" in split.reason
    # without seeds the rule's own outcome; most layers read miss an SAE goal: capped, and it says the rule's outcome
    assert flow.late_emotion_finding(late, phase, {}, 0).verdict == "holds"
    missing = per_layer_frame([False] * 4 + [True, True], misses=[""] * 4 + ["fve", "fve"])
    capped = flow.late_emotion_finding(missing, phase, {1: seed_verdict(late)}, 0)
    assert capped.verdict == "inconclusive" and "uncapped, the rule says holds" in capped.reason
    # a seed row lists the layers read and those before the last phase
    verdicts = {"late_emotion": seed_verdict(early)}
    row = flow.seed_row("all items", 2, early, phase, verdicts, {1: "fve", 4: "", 5: ""})
    assert row["layers showing emotion"] == "1, 4-5" and row["of them before the last phase"] == "1"
    assert row["SAEs missing a goal"] == "1 of 3 (L1: fve)"
    unmeasured = flow.seed_row("all items", 2, early, phase, verdicts, {1: "fve", 4: ""})
    assert unmeasured["SAEs missing a goal"] == "2 of 3 (L1: fve; L5: not measured)"
    assert row[flow.CLAIMS["late_emotion"]] == "partly"


def test_flow_config_rejects_seeds_that_repeat_the_book_saes():
    with pytest.raises(FlowError, match="sae_seeds must be distinct"):
        FlowConfig(sae_seeds=(0, 1))
    with pytest.raises(FlowError, match="sae_seeds must be distinct"):
        FlowConfig(sae_seeds=(1, 1))


def test_phase_roles_verdict():
    def frame(template, content, emotion):
        return pd.DataFrame({"template": template, "content": content, "emotion": emotion}, index=[1, 2, 3])

    assert (
        flow.phase_roles_verdict(frame([0.6, 0.3, 0.2], [0.2, 0.5, 0.3], [0.0, 0.1, 0.4])).verdict == "holds"
    )
    assert (
        flow.phase_roles_verdict(frame([0.6, 0.3, 0.2], [0.6, 0.5, 0.3], [0.0, 0.1, 0.4])).verdict == "partly"
    )
    assert (
        flow.phase_roles_verdict(frame([0.1, 0.3, 0.6], [0.6, 0.5, 0.3], [0.4, 0.1, 0.0])).verdict
        == "does not hold"
    )
    assert (
        flow.phase_roles_verdict(frame([0.6, 0.3, 0.2], [0.2, 0.5, 0.3], [0.0, 0.0, 0.0])).verdict
        == "inconclusive"
    )
    assert flow.phase_roles_verdict(
        frame([0.6, 0.3, 0.2], [0.2, 0.5, 0.3], [0.0, 0.1, 0.4]).iloc[:2]
    ).verdict == ("inconclusive")


def test_features_that_follow_the_answer_are_told_from_those_that_follow_the_gold_label():
    """Feature 0 fires on joy texts, feature 1 on items the model answers joy: on misclassified items the first
    follows the gold label, the second the answer."""
    rng = np.random.default_rng(0)
    gold = np.array(["joy"] * 30 + ["fear"] * 30)
    predicted = gold.copy()
    predicted[:10] = "fear"  # joy texts answered fear
    predicted[30:40] = "joy"  # fear texts answered joy
    codes = rng.random((60, 3)) * 0.1
    codes[:, 0] += np.where(gold == "joy", 2.0, 0.0)
    codes[:, 1] += np.where(predicted == "joy", 2.0, 0.0)
    table = selectivity.gold_or_answer(codes, gold, predicted, {"joy": [0, 1], "fear": []})
    joy = table.loc["joy"]
    assert (joy["n_gold"], joy["n_answer"], joy["follow_gold"], joy["follow_answer"]) == (10, 10, 1, 1)
    alone = selectivity.gold_or_answer(codes, gold, predicted, {"joy": [1]})
    assert alone.loc["joy", "follow_answer"] == 1 and alone.loc["joy", "median_auroc"] == 0.0
    assert np.isnan(table.loc["fear", "follow_gold"])  # no features to test
    right = selectivity.gold_or_answer(codes, gold, gold, {"joy": [0]})  # nothing misclassified
    assert np.isnan(right.loc["joy", "follow_gold"]) and right.loc["joy", "n_gold"] == 0
