"""Tests for the feature tracer (emolib.methods.tracing) and its summaries (emolib.methods.ablation) on tiny models.

A "planted" model has one SAE feature that provably drives its predictions: a constant direction u is added to the
residual stream after the last block (a bias), feature F of that layer's SAE reads and writes exactly u, and the
unembedding of the label "joy" reads u. Removing F's contribution removes u, so the model stops answering "joy";
every other feature has a tiny decoder. Other tests compare the tracer's splice, ablations and attributions with
sae-lens' own error-term splice, with manual hooks on full unpadded sequences, and with finite differences.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import llama_like_config, make_tiny_model
from sae_lens import StandardSAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAEConfig

from emolib.lm.classify import ClassifierConfig, EmotionClassifier
from emolib.lm.prompts import build_prompt, encode_prefix, encode_suffix
from emolib.methods.ablation import confusion_shift, gold_drop_matrix, k50_table, summarize_effects
from emolib.methods.tracing import FeatureTracer, TracerConfig, TracingError

#: Labels whose first tokens are distinct in the tiny tokenizer (first-token scoring applies).
LABELS = ("anger", "joy", "fear")
TEXTS = [
    "I lost my keys on the way home.",
    "The cake was wonderful.",
    "My brother took my car without asking.",
    "The milk had gone bad.",
    "Our old dog died last winter.",
    "A friend knocked on the door.",
    "The bus arrives at nine.",
    "I could not stop smiling.",
    "The spider crawled across my pillow.",
    "I waited for hours and nobody called.",
]
GOLD = ["joy", "joy", "anger", "fear", "joy", "anger", "fear", "joy", "anger", "fear"]
PHASES = {"early": [0], "late": [1], "all": [0, 1]}
#: The planted feature (of layer 1's SAE) and its strength: about the norm of the residual it is added to.
F = 5
STRENGTH = 4.0
D_SAE = 16
FAST = TracerConfig(ks=(1, 2, 4, 8), random_seeds=(0, 1), batch_size=4)
#: k50 needs an effect to halve: below these whole-phase drops it is undefined.
MIN_EFFECT = {"prob": 0.01, "margin": 0.05, "accuracy": 0.0}


def make_sae(layer: int, seed: int, d_in: int = 32, decoder_norm: float = 0.05, planted=None) -> StandardSAE:
    """A ReLU SAE with unit-norm random encoders (no bias: about half the features fire) and small decoders;
    `planted = (feature, direction)` makes that feature read and write `direction`."""
    g = torch.Generator().manual_seed(seed)
    cfg = StandardSAEConfig(
        d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")
    )
    sae = StandardSAE(cfg)
    with torch.no_grad():
        enc = torch.randn(d_in, D_SAE, generator=g)
        dec = torch.randn(D_SAE, d_in, generator=g)
        sae.W_enc.copy_(enc / enc.norm(dim=0, keepdim=True))
        sae.W_dec.copy_(decoder_norm * dec / dec.norm(dim=1, keepdim=True))
        sae.b_enc.zero_()
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        if planted is not None:
            feature, direction = planted
            sae.W_enc[:, feature] = direction
            sae.W_dec[feature] = direction
    return sae


def make_classifier(model, tokenizer, **config) -> EmotionClassifier:
    parts = build_prompt(tokenizer, LABELS, chat=False)
    return EmotionClassifier(
        model, tokenizer, parts, ClassifierConfig(**{"generate": False, "progress": False, **config})
    )


def no_hooks_left(model) -> bool:
    return not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())


def full_tokens(classifier: EmotionClassifier, text: str) -> tuple[torch.Tensor, int]:
    """One unpadded prompt and the length of its shared prefix."""
    prefix = encode_prefix(classifier.tokenizer, classifier.parts)
    suffix = encode_suffix(classifier.tokenizer, classifier.parts, text, 256)[0]
    return torch.tensor([prefix + suffix]), len(prefix)


def label_scores(classifier: EmotionClassifier, logits: torch.Tensor) -> np.ndarray:
    """First-token label scores from the last position's logits, computed independently of emolib.studies.tracing."""
    logprobs = torch.log_softmax(logits[0, -1].double(), dim=-1)
    scores = []
    for label in classifier.parts.labels:
        firsts = {
            classifier.tokenizer(v, add_special_tokens=False).input_ids[0]
            for v in classifier.parts.verbalisers[label]
        }
        scores.append(torch.logsumexp(logprobs[sorted(firsts)], dim=0).item())
    return np.array(scores)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def planted(tiny_tokenizer):
    """(classifier, saes) of a fresh tiny model in which feature F of layer 1 drives the answer "joy"."""
    model = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)
    classifier = make_classifier(model, tiny_tokenizer, batch_size=4)
    u = torch.randn(32, generator=torch.Generator().manual_seed(1))
    u /= u.norm()
    with torch.no_grad():
        model.blocks[1].mlp.b_out += STRENGTH * u
        for verbaliser in classifier.parts.verbalisers["joy"]:
            token = tiny_tokenizer(verbaliser, add_special_tokens=False).input_ids[0]
            model.unembed.W_U[:, token] = 2.0 * u / model.ln_final.w  # reads u through the final RMSNorm
    saes = {
        "blocks.0.hook_resid_post": make_sae(0, seed=10),
        "blocks.1.hook_resid_post": make_sae(1, seed=11, planted=(F, u)),
    }
    return classifier, saes


@pytest.fixture(scope="module")
def traced(planted):
    """Attributions, curves, means and cross-emotion rows of the planted model (computed once)."""
    classifier, saes = planted
    tracer = FeatureTracer(classifier, saes, FAST)
    attributions = tracer.attribute(TEXTS, GOLD)
    means = tracer.feature_means(TEXTS)
    curves = tracer.ablation_curves(attributions, TEXTS, GOLD, PHASES, means=means)
    cross = tracer.cross_emotion(attributions, TEXTS, GOLD, PHASES, 1, means=means)
    return tracer, attributions, means, curves, cross


def random_saes(model, decoder_norm: float = 0.05) -> dict:
    d = model.cfg.d_model
    return {
        f"blocks.{layer}.hook_resid_post": make_sae(layer, 20 + layer, d, decoder_norm)
        for layer in range(model.cfg.n_layers)
    }


# ------------------------------------------------------------------------------------------ the planted model


def test_the_planted_model_answers_joy(planted):
    classifier, _ = planted
    predictions = classifier.predict(TEXTS)
    assert predictions.predicted == ["joy"] * len(TEXTS)
    assert predictions.label_probs[:, 1].min() > 0.99


def test_attribution_ranks_the_planted_feature_first(traced):
    _, attributions, *_ = traced
    for layers in ([0, 1], [1]):
        ranking = attributions.ranking("joy", layers)
        assert (ranking.loc[0, "layer"], ranking.loc[0, "feature"]) == (1, F)
        assert ranking.loc[0, "attribution"] > 20 * abs(ranking.loc[1, "attribution"])
    assert attributions.top_features("joy", [0, 1], 1) == {1: [F]}
    # F pushes every item towards joy: for items of other emotions it is the most harmful feature
    assert tuple(attributions.ranking("anger", [1]).iloc[-1][["layer", "feature"]]) == (1, F)
    assert len(attributions.ranking("joy", [0, 1])) == 2 * D_SAE
    table = attributions.table(PHASES, top=3)
    assert set(table["phase"]) == set(PHASES) and set(table["emotion"]) == set(LABELS)
    concentration = attributions.concentration({"late": [1]}, [1, 16])
    joy = concentration[concentration["emotion"] == "joy"].set_index("k")["share"]
    assert joy[1] > 0.95 and joy[16] == pytest.approx(1.0)


def test_ablating_the_planted_feature_removes_joy_and_random_features_do_nothing(traced):
    *_, curves, _ = traced
    summary = summarize_effects(curves, n_boot=200)
    joy = summary[summary["emotion"] == "joy"].set_index(["phase", "ablation", "condition", "k"]).sort_index()
    for phase in ("late", "all"):
        top1 = joy.loc[(phase, "zero", "top", 1)]
        assert top1["drop_prob"] > 0.5 and top1["drop_accuracy"] == 1.0 and top1["drop_margin"] > 3
        assert top1["drop_gap"] > 3 and top1["drop_gap"] > 0.5 * top1["clean_gap"]
        assert top1["drop_prob_low"] > 0.5
        whole = joy.loc[(phase, "zero", "whole")].iloc[0]
        assert whole["drop_prob"] == pytest.approx(top1["drop_prob"], abs=0.05)
    random = joy.xs("random", level="condition")
    assert random["drop_prob"].abs().max() < 0.01 and (random["drop_accuracy"] == 0).all()
    # layer 0 holds nothing that matters
    assert joy.xs("early", level="phase")["drop_prob"].abs().max() < 0.01
    # F is (nearly) constant across items, so replacing it by its mean changes nothing, unlike removing it
    assert abs(joy.loc[("late", "mean", "top", 1)]["drop_prob"]) < 0.01
    # random controls never draw the top k
    random_rows = curves[(curves["condition"] == "random") & (curves["emotion"] == "joy")]
    assert (random_rows["drop_prob"].abs() < 0.01).all()
    assert set(curves["condition"]) == {"top", "random", "whole"}
    assert set(curves.loc[curves["emotion"] == "joy", "item"]) == {
        i for i, g in enumerate(GOLD) if g == "joy"
    }


def test_k50_is_one_for_the_planted_emotion(traced):
    *_, curves, _ = traced
    keys = ["emotion", "phase", "ablation", "metric"]
    table = k50_table(curves, n_boot=200, min_effect=MIN_EFFECT, reference="whole").set_index(keys)
    for phase in ("late", "all"):
        for metric in ("prob", "margin", "accuracy"):
            row = table.loc[("joy", phase, "zero", metric)]
            assert (row["k50"], row["k50_low"], row["k50_high"]) == (1.0, 1.0, 1.0)
            assert row["whole_effect"] > 0 and row["undefined_share"] == 0
    # no whole-phase effect to halve: undefined
    assert np.isnan(table.loc[("joy", "early", "zero", "prob"), "k50"])
    assert np.isnan(table.loc[("joy", "late", "mean", "prob"), "k50"])
    # against the clean gap: one feature removes over half of joy's; layer 0 never does (not reached, not undefined)
    clean = k50_table(curves, n_boot=200).set_index(keys)
    assert clean.loc[("joy", "late", "zero", "gap"), "k50"] == 1.0
    assert clean.loc[("joy", "late", "zero", "gap"), "reference_value"] > 0
    assert clean.loc[("joy", "early", "zero", "gap"), "k50"] == np.inf


def test_cross_emotion_ablating_joy_features_moves_every_item_away_from_joy(traced):
    *_, cross = traced
    shift = confusion_shift(cross, phase="late", source="joy")
    assert list(shift.index) == list(LABELS) and list(shift.columns) == list(LABELS)
    np.testing.assert_allclose(shift["joy"], -1.0)  # every item was predicted joy, none is after
    np.testing.assert_allclose(shift.sum(axis=1), 0.0, atol=1e-12)
    drops = gold_drop_matrix(cross, phase="late")
    assert drops.loc["joy", "joy"] > 0.5
    assert drops.loc["joy", "anger"] < -0.1 and drops.loc["joy", "fear"] < -0.1  # the others gain
    assert drops.drop(index="joy").abs().to_numpy().max() < 0.01


def test_verification_attributions_predict_single_feature_effects(traced):
    tracer, attributions, *_ = traced
    per_feature, summary = tracer.verify(attributions, attributions, PHASES, n_top=6)
    joy = per_feature[(per_feature["emotion"] == "joy") & (per_feature["phase"] == "late")]
    assert (joy.iloc[0]["layer"], joy.iloc[0]["feature"]) == (1, F)
    assert joy.iloc[0]["measured"] > 3 and joy.iloc[0]["measured_prob"] > 0.5
    assert (per_feature["predicted"] != 0).all()  # inactive (tied) features are left out
    rho = summary.set_index(["emotion", "phase"])["spearman"]
    assert rho[("joy", "late")] > 0.8 and rho[("joy", "all")] > 0.8
    assert {"n_features", "p_value", "sign_agreement"} <= set(summary.columns)


# ------------------------------------------------------------------------------ splice and interventions


@pytest.mark.parametrize("positions", ["last", "suffix"])
def test_running_without_features_equals_the_classifier(planted, positions):
    classifier, saes = planted
    tracer = FeatureTracer(classifier, saes, TracerConfig(positions=positions, batch_size=3))
    expected = classifier.predict(TEXTS).label_logprobs
    np.testing.assert_allclose(tracer.run(TEXTS).label_logprobs, expected, atol=1e-5, rtol=0)
    assert no_hooks_left(classifier.model)


def test_splice_with_error_term_equals_clean_and_sae_lens(planted):
    """sae-lens' `use_error_term=True` splice leaves the logits unchanged, and zero-ablating F inside it (a hook on
    hook_sae_acts_post) gives the tracer's scores."""
    classifier, saes = planted
    model = classifier.model
    tracer = FeatureTracer(classifier, saes)
    ablated = tracer.run(TEXTS[:3], {1: [F], 0: [2, 3]}).label_logprobs

    def zero(features):
        def hook(acts, hook):
            acts = acts.clone()
            acts[:, -1, features] = 0.0
            return acts

        return hook

    for i, text in enumerate(TEXTS[:3]):
        tokens, _ = full_tokens(classifier, text)
        with torch.no_grad():
            clean = model(tokens)
            with model.saes(saes=list(saes.values()), use_error_term=True):
                spliced = model(tokens)
                edited = model.run_with_hooks(
                    tokens,
                    fwd_hooks=[
                        ("blocks.1.hook_resid_post.hook_sae_acts_post", zero([F])),
                        ("blocks.0.hook_resid_post.hook_sae_acts_post", zero([2, 3])),
                    ],
                )
        torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=0)
        np.testing.assert_allclose(ablated[i], label_scores(classifier, edited), atol=1e-4, rtol=0)
    assert not model.acts_to_saes and no_hooks_left(model)


@pytest.mark.parametrize("positions", ["last", "suffix"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablation_equals_a_manual_edit_of_the_residual(planted, positions, ablation):
    """Setting feature f to value v adds (v - a_f) W_dec[f] to the residual at each traced position; computed here
    by hand on one unpadded sequence at a time, against the tracer's batched, cached run."""
    classifier, saes = planted
    model = classifier.model
    tracer = FeatureTracer(classifier, saes, TracerConfig(positions=positions, batch_size=4))
    features = {0: [1, 7], 1: [F]}
    means = {layer: torch.rand(D_SAE, generator=torch.Generator().manual_seed(layer)) for layer in (0, 1)}
    got = tracer.run(TEXTS, features, ablation=ablation, means=means).label_logprobs
    for i, text in enumerate(TEXTS):
        tokens, n_prefix = full_tokens(classifier, text)
        traced_positions = slice(-1, None) if positions == "last" else slice(n_prefix, None)

        def edit(layer, traced_positions=traced_positions):
            sae = saes[f"blocks.{layer}.hook_resid_post"]

            def hook(resid, hook):
                resid = resid.clone()
                acts = sae.encode(resid[0, traced_positions])
                for f in features[layer]:
                    target = 0.0 if ablation == "zero" else means[layer][f]
                    resid[0, traced_positions] += (target - acts[:, f : f + 1]) * sae.W_dec[f]
                return resid

            return hook

        with torch.no_grad():
            logits = model.run_with_hooks(
                tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", edit(layer)) for layer in features]
            )
        np.testing.assert_allclose(got[i], label_scores(classifier, logits), atol=1e-4, rtol=0)
    assert np.abs(got - tracer.run(TEXTS).label_logprobs).max() > 0.1  # the edit did something


def test_whole_phase_zero_ablation_leaves_error_plus_decoder_bias(planted):
    classifier, saes = planted
    model = classifier.model
    tracer = FeatureTracer(classifier, saes)
    got = tracer.run(TEXTS[:2], {1: None}).label_logprobs
    sae = saes["blocks.1.hook_resid_post"]
    for i, text in enumerate(TEXTS[:2]):
        tokens, _ = full_tokens(classifier, text)

        def hook(resid, hook):
            resid = resid.clone()
            x = resid[0, -1]
            resid[0, -1] = x - sae.decode(sae.encode(x)) + sae.b_dec
            return resid

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", hook)])
        np.testing.assert_allclose(got[i], label_scores(classifier, logits), atol=1e-4, rtol=0)


def test_feature_means_are_mean_activations_at_the_last_position(planted):
    classifier, saes = planted
    model = classifier.model
    means = FeatureTracer(classifier, saes, TracerConfig(batch_size=3)).feature_means(TEXTS)
    for layer in (0, 1):
        sae = saes[f"blocks.{layer}.hook_resid_post"]
        rows = []
        for text in TEXTS:
            _, cache = model.run_with_cache(
                full_tokens(classifier, text)[0], names_filter=[sae.cfg.metadata.hook_name]
            )
            rows.append(sae.encode(cache[sae.cfg.metadata.hook_name][0, -1]))
        torch.testing.assert_close(means[layer], torch.stack(rows).mean(0), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ attributions


def gap_with_scaled_feature(classifier, sae, text, feature, scale, gold, positions="last") -> float:
    """Gold gap (gold score minus the mean of the others) when feature `feature`'s decoder contribution at the
    traced positions is multiplied by `scale`."""
    tokens, n_prefix = full_tokens(classifier, text)
    where = slice(-1, None) if positions == "last" else slice(n_prefix, None)

    def hook(resid, hook):
        resid = resid.clone()
        acts = sae.encode(resid[0, where])
        resid[0, where] += (scale - 1) * acts[:, feature : feature + 1] * sae.W_dec[feature]
        return resid

    with torch.no_grad():
        logits = classifier.model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.metadata.hook_name, hook)])
    scores = label_scores(classifier, logits)
    j = classifier.parts.labels.index(gold)
    return scores[j] - np.delete(scores, j).mean()


@pytest.mark.parametrize("positions", ["last", "suffix"])
def test_attribution_is_activation_times_gradient_of_the_true_model(tiny_model, tiny_tokenizer, positions):
    """Finite differences of the gold gap in a feature's scale equal its attribution, with both layers spliced: the
    gradient reaches layer 0 through the identity of layer 1's splice (sae-lens' detached error term would route
    it through layer 1's reconstruction instead). A tracer holding layer 0's SAE alone agrees."""
    classifier = make_classifier(tiny_model, tiny_tokenizer)
    saes = random_saes(tiny_model, decoder_norm=1.0)
    config = TracerConfig(positions=positions, batch_size=3)
    texts, gold = TEXTS[:4], GOLD[:4]
    attributions = FeatureTracer(classifier, saes, config).attribute(texts, gold)
    alone = FeatureTracer(classifier, {0: saes["blocks.0.hook_resid_post"]}, config).attribute(texts, gold)
    np.testing.assert_allclose(alone.values[0], attributions.values[0], atol=1e-5, rtol=1e-4)
    margins, gaps = _clean_margins_and_gaps(classifier, texts, gold)
    np.testing.assert_allclose(attributions.margin, margins, atol=1e-5)
    np.testing.assert_allclose(attributions.gap, gaps, atol=1e-5)
    eps = 1e-2
    for layer in (0, 1):
        sae = saes[f"blocks.{layer}.hook_resid_post"]
        for i, text in enumerate(texts):
            feature = int(np.abs(attributions.values[layer][i]).argmax())
            up = gap_with_scaled_feature(classifier, sae, text, feature, 1 + eps, gold[i], positions)
            down = gap_with_scaled_feature(classifier, sae, text, feature, 1 - eps, gold[i], positions)
            expected = (up - down) / (2 * eps)
            assert abs(expected) > 1e-3  # a feature that matters
            assert attributions.values[layer][i, feature] == pytest.approx(expected, rel=2e-2, abs=2e-4)
    assert no_hooks_left(tiny_model)


def _clean_margins_and_gaps(classifier, texts, gold) -> tuple[np.ndarray, np.ndarray]:
    scores = classifier.predict(texts).label_logprobs
    margins, gaps = [], []
    for s, g in zip(scores, gold, strict=True):
        j = classifier.parts.labels.index(g)
        margins.append(s[j] - np.delete(s, j).max())
        gaps.append(s[j] - np.delete(s, j).mean())
    return np.array(margins), np.array(gaps)


@pytest.mark.parametrize("positions", ["last", "suffix"])
def test_reusing_cached_context_and_batching_change_nothing(any_tiny_model, tiny_tokenizer, positions):
    classifier = make_classifier(any_tiny_model, tiny_tokenizer)
    saes = random_saes(any_tiny_model, decoder_norm=1.0)
    results = []
    for reuse, batch_size in [(True, 4), (False, 4), (True, 1)]:
        tracer = FeatureTracer(
            classifier, saes, TracerConfig(positions=positions, reuse_cache=reuse, batch_size=batch_size)
        )
        attributions = tracer.attribute(TEXTS, GOLD)
        ablated = tracer.run(TEXTS, {0: [0, 3, 5], 1: None}).label_logprobs
        # an edit of layer 1 only: with the reused cache, the forward starts at block 1
        late = tracer.run(TEXTS, {1: [0, 3, 5]}).label_logprobs
        results.append((attributions, np.concatenate([ablated, late], axis=1), tracer.feature_means(TEXTS)))
    reference = results[0]
    for attributions, ablated, means in results[1:]:
        for layer in (0, 1):
            np.testing.assert_allclose(
                attributions.values[layer], reference[0].values[layer], atol=1e-5, rtol=1e-4
            )
            np.testing.assert_allclose(
                attributions.activations[layer], reference[0].activations[layer], atol=1e-5
            )
            torch.testing.assert_close(means[layer], reference[2][layer], atol=1e-5, rtol=0)
        np.testing.assert_allclose(ablated, reference[1], atol=1e-5, rtol=0)
    assert np.abs(reference[0].values[0]).max() > 1e-3


# ----------------------------------------------------------------------------------------------- summaries


def curve_row(emotion: str, condition: str, k: int, seed: int, item, drop: float, clean: float = 1.0) -> dict:
    """One per-item row as `ablation_curves` writes it (phase "p", zero-ablation), every metric dropping `drop`
    from the clean value `clean`."""
    row = {"emotion": emotion, "phase": "p", "ablation": "zero", "condition": condition, "k": k, "seed": seed,
           "n_features": k, "item": item}  # fmt: skip
    for name in ("gap", "prob", "margin", "correct"):
        row |= {f"clean_{name}": clean, f"drop_{name}": drop}
    return row


def synthetic_curves(
    top: dict[int, list[float]], whole: list[float], emotion="joy", clean: float = 1.0
) -> pd.DataFrame:
    """Per-item rows with given drops per k (all metrics equal), the whole-phase drops and one clean value."""
    return pd.DataFrame(
        [
            curve_row(emotion, condition, k, -1, item, drop, clean)
            for condition, per_k in [("top", top), ("whole", {99: whole})]
            for k, drops in per_k.items()
            for item, drop in enumerate(drops)
        ]
    )


def test_k50_known_values():
    # against the whole phase: means k=1 0.2, k=2 0.5, k=4 0.9; whole 1.0 -> k50 = 2
    curves = synthetic_curves({1: [0.2, 0.2], 2: [0.5, 0.5], 4: [0.9, 0.9]}, [1.0, 1.0])
    whole = functools.partial(k50_table, metrics=("prob",), reference="whole")
    row = whole(curves, n_boot=50).iloc[0]
    assert (row["k50"], row["k50_low"], row["k50_high"], row["n_items"]) == (2.0, 2.0, 2.0, 2)
    assert row["effect_at_k50"] == pytest.approx(0.5) and row["whole_effect"] == pytest.approx(1.0)
    never = whole(synthetic_curves({1: [0.1], 2: [0.2]}, [1.0]), n_boot=20).iloc[0]
    assert never["k50"] == np.inf and np.isnan(never["effect_at_k50"])
    none = whole(synthetic_curves({1: [0.1], 2: [0.2]}, [-0.3]), n_boot=20).iloc[0]
    assert np.isnan(none["k50"]) and none["undefined_share"] == 1.0
    floor = whole(synthetic_curves({1: [0.01]}, [0.02]), n_boot=20, min_effect=0.05)
    assert np.isnan(floor.iloc[0]["k50"])


def test_k50_against_the_clean_value_is_defined_whatever_the_whole_phase_does():
    # clean gap 2.0: half is 1.0, first reached at k=4 (mean 1.1), though the whole phase removes almost nothing
    curves = synthetic_curves({1: [0.2, 0.2], 2: [0.5, 0.5], 4: [1.1, 1.1]}, [0.01, 0.01], clean=2.0)
    row = k50_table(curves, metrics=("gap",), n_boot=50).iloc[0]
    assert (row["reference"], row["reference_value"], row["k50"]) == ("clean", pytest.approx(2.0), 4.0)
    assert row["whole_effect"] == pytest.approx(0.01)
    # a model with no clean preference for the gold label: nothing to halve, k50 undefined
    against = k50_table(synthetic_curves({1: [0.5]}, [1.0], clean=-0.4), metrics=("gap",), n_boot=20)
    assert np.isnan(against.iloc[0]["k50"]) and against.iloc[0]["undefined_share"] == 1.0
    with pytest.raises(TracingError, match="reference must be one of"):
        k50_table(curves, reference="half")
    with pytest.raises(TracingError, match="'clean_prob' column"):
        k50_table(curves.drop(columns="clean_prob"), metrics=("prob",))
    # items disagree: one item needs k=1, the other k=4; the interval spans both
    mixed = synthetic_curves({1: [1.0, 0.0], 4: [1.0, 1.0]}, [1.0, 1.0])
    row = k50_table(mixed, metrics=("prob",), n_boot=500).iloc[0]
    assert row["k50"] == 1.0 and (row["k50_low"], row["k50_high"]) == (1.0, 4.0)
    with pytest.raises(TracingError, match="metrics"):
        k50_table(curves, metrics=("f1",))


def test_summarize_effects_known_values():
    curves = synthetic_curves({1: [0.0, 1.0], 2: [1.0, 1.0]}, [1.0, 1.0])
    summary = summarize_effects(curves, n_boot=100).set_index(["condition", "k"])
    assert summary.loc[("top", 1), "drop_prob"] == pytest.approx(0.5)
    assert (
        summary.loc[("top", 1), "drop_prob_low"] == 0.0 and summary.loc[("top", 1), "drop_prob_high"] == 1.0
    )
    assert summary.loc[("top", 2), "drop_accuracy"] == 1.0 and summary.loc[("top", 2), "n_items"] == 2


# ---------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(planted, traced, tiny_model, tiny_tokenizer):
    classifier, saes = planted
    tracer, attributions, means, *_ = traced
    with pytest.raises(TracingError, match="not among the classifier's labels"):
        tracer.attribute(TEXTS[:2], ["joy", "shame"])
    with pytest.raises(TracingError, match="2 texts but 1 gold"):
        tracer.attribute(TEXTS[:2], ["joy"])
    with pytest.raises(TracingError, match="empty"):
        tracer.run(["fine", " "])
    only_late = FeatureTracer(classifier, {1: saes["blocks.1.hook_resid_post"]}, FAST)
    with pytest.raises(TracingError, match=r"phase 'all' has layers \[0\] without SAEs"):
        only_late.ablation_curves(attributions, TEXTS, GOLD, {"all": [0, 1]}, means=means)
    with pytest.raises(TracingError, match="contiguous"):
        tracer.ablation_curves(attributions, TEXTS, GOLD, {"odd": [1, 0]}, means=means)
    with pytest.raises(TracingError, match="no phases"):
        tracer.ablation_curves(attributions, TEXTS, GOLD, {}, means=means)
    too_many = FeatureTracer(classifier, saes, TracerConfig(ks=(1, 32)))
    with pytest.raises(TracingError, match="k=32 exceeds the 16 features of phase 'late'"):
        too_many.ablation_curves(attributions, TEXTS, GOLD, {"late": [1]}, means=means)
    with pytest.raises(TracingError, match="k=17 exceeds the 16 features"):
        attributions.top_features("joy", [1], 17)
    with pytest.raises(TracingError, match="outside 1..16"):
        tracer.cross_emotion(attributions, TEXTS, GOLD, {"late": [1]}, 17, means=means)
    with pytest.raises(TracingError, match="mean ablation needs the mean activations"):
        tracer.ablation_curves(attributions, TEXTS, GOLD, PHASES)
    with pytest.raises(TracingError, match="expected"):
        tracer.run(TEXTS[:1], {1: [F]}, ablation="mean", means={1: torch.zeros(3)})
    with pytest.raises(TracingError, match="out of range"):
        tracer.run(TEXTS[:1], {1: [D_SAE]})
    with pytest.raises(TracingError, match="no SAE for layer 5"):
        tracer.run(TEXTS[:1], {5: [0]})
    with pytest.raises(TracingError, match="ablation must be"):
        tracer.run(TEXTS[:1], {1: [0]}, ablation="resample")
    with pytest.raises(TracingError, match="unknown emotion"):
        attributions.ranking("shame")
    with pytest.raises(TracingError, match="positions"):
        FeatureTracer(classifier, saes, TracerConfig(positions="suffix")).ablation_curves(
            attributions, TEXTS, GOLD, PHASES, means=means
        )
    with pytest.raises(TracingError, match="positions must be"):
        TracerConfig(positions="first")
    with pytest.raises(TracingError, match="ks must be increasing"):
        TracerConfig(ks=(4, 2))
    with pytest.raises(TracingError, match="hook_resid_post"):
        FeatureTracer(classifier, {"blocks.0.hook_resid_pre": saes["blocks.0.hook_resid_post"]})
    with pytest.raises(TracingError, match="trained on blocks.1.hook_resid_post"):
        FeatureTracer(classifier, {0: saes["blocks.1.hook_resid_post"]})
    with pytest.raises(TracingError, match="beyond the model"):
        FeatureTracer(classifier, {"blocks.7.hook_resid_post": make_sae(7, 0)})
    sequence = make_classifier(tiny_model, tiny_tokenizer, scoring="sequence")
    with pytest.raises(TracingError, match="first-token scoring"):
        FeatureTracer(sequence, saes)
    with (
        pytest.raises(TracingError, match="SAEs attached"),
        classifier.model.saes(saes=[saes["blocks.1.hook_resid_post"]]),
    ):
        FeatureTracer(classifier, saes)
    assert not classifier.model.acts_to_saes


def test_matched_random_features_fire_like_the_top_ones():
    """Top features 0-3 fire often and strongly; of 200 others, twelve (100-111) fire like them and the rest rarely
    and weakly: matched controls come from those twelve (each draw is among the 8 nearest left)."""
    from emolib.methods.tracing import _activation_profile, matched_draw

    rng = np.random.default_rng(0)
    share = np.full(204, 0.02) + rng.uniform(0, 0.01, 204)
    mean_when_active = np.full(204, 0.1) + rng.uniform(0, 0.05, 204)
    like_top = np.r_[0:4, 100:112]
    share[like_top] = 0.9 + rng.uniform(0, 0.05, len(like_top))
    mean_when_active[like_top] = 5.0 + rng.uniform(0, 1, len(like_top))
    profile = _activation_profile({"active_share": share, "mean_activation": share * mean_when_active})
    pool = np.arange(4, 204)
    for seed in range(5):
        chosen = matched_draw(profile, 4, pool, np.random.default_rng(seed))
        assert len(chosen) == 4 == len(set(chosen.tolist())) and set(chosen.tolist()) <= set(range(100, 112))
    # more top features than matching candidates: still k distinct features from the pool, never a top one
    wide = matched_draw(profile, 40, np.arange(40, 204), np.random.default_rng(0))
    assert len(set(wide.tolist())) == 40 and wide.min() >= 40
    with pytest.raises(TracingError, match="random_pool"):
        TracerConfig(random_pool="nearby")
