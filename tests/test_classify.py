"""Tests for emolib.lm.classify on tiny random-weight models: batching, prefix reuse, scores and generations against
brute-force computations, answer parsing, and the on-disk prediction cache."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import gemma_like_config, llama_like_config, make_tiny_model

from emolib.lm.classify import ClassifierConfig, EmotionClassifier, Predictions, cached_predict, parse_label
from emolib.lm.models import has_interventions
from emolib.lm.prompts import build_prompt, encode_prefix, encode_suffix

#: Every verbaliser is one token of the tiny tokenizer (" joy", " Joy", " fear", " Fear").
SINGLE = ("joy", "fear")
#: "shame" and "guilt" never occur in the tokenizer's corpus: several tokens each.
MULTI = ("shame", "joy", "guilt")
EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")

TEXTS = [
    "I lost my keys.",
    "ok",
    "The cake was wonderful and everyone sang and danced all night long until the sun came up over the "
    "hills, and then we walked home through the quiet streets, tired and happy, talking about old friends.",
    "The spider crawled across my pillow in the dark.",
    "A {brace} text with }{ odd characters: \u00e9\u00e8 \U0001f600",
]

FAST = {"progress": False, "max_new_tokens": 4}


def classifier(model, tokenizer, labels, *, chat=False, **config) -> EmotionClassifier:
    parts = build_prompt(tokenizer, labels, chat=chat)
    return EmotionClassifier(model, tokenizer, parts, ClassifierConfig(**{**FAST, **config}))


# ------------------------------------------------------------------------------------------- brute force


@torch.inference_mode()
def brute_force_scores(model, tokenizer, parts, text: str, max_text_tokens: int = 256) -> np.ndarray:
    """log P(label) by running the model on `prefix + suffix + verbaliser` in full, one sequence at a time."""
    context = encode_prefix(tokenizer, parts) + encode_suffix(tokenizer, parts, text, max_text_tokens)[0]
    scores = []
    for label in parts.labels:
        per_verbaliser = []
        for verbaliser in parts.verbalisers[label]:
            ids = tokenizer(verbaliser, add_special_tokens=False).input_ids
            logits = model(torch.tensor([context + ids]))[0]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            total = sum(logprobs[len(context) - 1 + i, t] for i, t in enumerate(ids))
            per_verbaliser.append(total)
        scores.append(torch.logsumexp(torch.stack(per_verbaliser), dim=0).item())
    return np.array(scores)


@torch.inference_mode()
def brute_force_generation(model, tokenizer, parts, text: str, max_new_tokens: int, stop: set[int]):
    """Greedy decoding with a full forward pass per step (no cache, no padding); returns (text, new ids)."""
    tokens = encode_prefix(tokenizer, parts) + encode_suffix(tokenizer, parts, text, 256)[0]
    new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model(torch.tensor([tokens]))[0, -1].argmax())
        if next_id in stop:
            break
        new.append(next_id)
        tokens.append(next_id)
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new


def expected_stop_ids(tokenizer) -> set[int]:
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1
    return {tokenizer.eos_token_id, tokenizer.pad_token_id, newline[0]}


# ------------------------------------------------------------------------------------- batching and prefix


@pytest.mark.parametrize("chat", [False, True])
def test_batched_equals_one_by_one(any_tiny_model, tiny_tokenizer, chat):
    lengths = [len(tiny_tokenizer(t).input_ids) for t in TEXTS]
    assert max(lengths) > 10 * min(lengths)  # very different lengths: lots of padding in a batch
    one = classifier(any_tiny_model, tiny_tokenizer, EMOTIONS, chat=chat, batch_size=1).predict(TEXTS)
    five = classifier(any_tiny_model, tiny_tokenizer, EMOTIONS, chat=chat, batch_size=5).predict(TEXTS)
    two = classifier(any_tiny_model, tiny_tokenizer, EMOTIONS, chat=chat, batch_size=2).predict(TEXTS)
    for other in (five, two):
        np.testing.assert_allclose(other.label_logprobs, one.label_logprobs, atol=1e-5, rtol=0)
        assert other.predicted == one.predicted
        assert other.generations == one.generations
        assert other.generated_labels == one.generated_labels
    assert one.label_logprobs.shape == (len(TEXTS), len(EMOTIONS))
    assert np.isfinite(one.label_logprobs).all() and (one.label_logprobs < 0).all()


@pytest.mark.parametrize("chat", [False, True])
def test_reusing_the_prefix_cache_changes_nothing(any_tiny_model, tiny_tokenizer, chat):
    reuse = classifier(any_tiny_model, tiny_tokenizer, MULTI, chat=chat, batch_size=3, reuse_prefix=True)
    fresh = classifier(any_tiny_model, tiny_tokenizer, MULTI, chat=chat, batch_size=3, reuse_prefix=False)
    a, b = reuse.predict(TEXTS), fresh.predict(TEXTS)
    np.testing.assert_allclose(a.label_logprobs, b.label_logprobs, atol=1e-5, rtol=0)
    assert a.generations == b.generations


def test_prediction_order_does_not_depend_on_input_order(tiny_model, tiny_tokenizer):
    clf = classifier(tiny_model, tiny_tokenizer, EMOTIONS, batch_size=2, generate=False)
    forward = clf.predict(TEXTS)
    backward = clf.predict(TEXTS[::-1])
    np.testing.assert_allclose(backward.label_logprobs[::-1], forward.label_logprobs, atol=1e-5, rtol=0)


def test_local_attention_window_is_exact_when_padding_would_cross_it(tiny_tokenizer):
    """TransformerLens' sliding window counts cache slots, padding included: a batch whose padded length exceeds the
    window must still give the unpadded results (the classifier then runs those rows alone)."""
    parts = build_prompt(tiny_tokenizer, SINGLE, chat=False)
    prefix = len(encode_prefix(tiny_tokenizer, parts))
    texts = TEXTS[:3]
    suffixes = [len(encode_suffix(tiny_tokenizer, parts, t, 256)[0]) for t in texts]
    window = prefix + 20
    # the short prompts (and their 3 generated tokens) fit in the window; padded to the long one they would not
    assert prefix + max(suffixes[:2]) + 3 <= window < prefix + suffixes[2]
    model = make_tiny_model(gemma_like_config(len(tiny_tokenizer), window_size=window), tiny_tokenizer)
    one = classifier(model, tiny_tokenizer, SINGLE, batch_size=1).predict(texts)
    batched = classifier(model, tiny_tokenizer, SINGLE, batch_size=3)
    encoded = [encode_suffix(tiny_tokenizer, parts, t, 256)[0] for t in texts]
    assert batched._padding_reaches_window(encoded) and not batched._padding_reaches_window(encoded[:2])
    together = batched.predict(texts)
    # the two short prompts are padded but stay within the window: batched as usual
    pair = classifier(model, tiny_tokenizer, SINGLE, batch_size=2).predict(texts[:2])
    np.testing.assert_allclose(together.label_logprobs, one.label_logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(pair.label_logprobs, one.label_logprobs[:2], atol=1e-5, rtol=0)
    assert together.generations == one.generations and pair.generations == one.generations[:2]
    for i, text in enumerate(texts):
        expected = brute_force_scores(model, tiny_tokenizer, parts, text)
        np.testing.assert_allclose(one.label_logprobs[i], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ known answers


@pytest.mark.parametrize(
    ("labels", "mode"), [(SINGLE, "first-token"), (MULTI, "sequence"), (EMOTIONS, "sequence")]
)
@pytest.mark.parametrize("chat", [False, True])
def test_restricted_scores_equal_brute_force(any_tiny_model, tiny_tokenizer, labels, mode, chat):
    clf = classifier(any_tiny_model, tiny_tokenizer, labels, chat=chat, batch_size=4, generate=False)
    assert clf.scoring_mode == mode
    lengths = {
        label: [
            len(tiny_tokenizer(v, add_special_tokens=False).input_ids) for v in clf.parts.verbalisers[label]
        ]
        for label in labels
    }
    if mode == "first-token":
        assert all(n == 1 for ns in lengths.values() for n in ns)
    else:
        assert any(n > 1 for ns in lengths.values() for n in ns)
    texts = TEXTS[:3] if labels == EMOTIONS else TEXTS
    predictions = clf.predict(texts)
    assert predictions.scoring_mode == mode
    for i, text in enumerate(texts):
        expected = brute_force_scores(any_tiny_model, tiny_tokenizer, clf.parts, text)
        np.testing.assert_allclose(predictions.label_logprobs[i], expected, atol=1e-5, rtol=0)


def test_truncated_texts_are_scored_as_truncated_and_counted(tiny_model, tiny_tokenizer):
    clf = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False, max_text_tokens=5)
    predictions = clf.predict(TEXTS)
    n_long = sum(len(tiny_tokenizer(t, add_special_tokens=False).input_ids) > 5 for t in TEXTS)
    assert 0 < n_long < len(TEXTS)
    assert predictions.n_truncated == n_long
    expected = brute_force_scores(tiny_model, tiny_tokenizer, clf.parts, TEXTS[2], max_text_tokens=5)
    np.testing.assert_allclose(predictions.label_logprobs[2], expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def stopping_model(tiny_tokenizer):
    """The tiny model with the newline's logit raised so that some prompts stop at once, some midway, some never
    (a weight edit to build the fixture, not an intervention under test)."""
    model = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)
    newline = tiny_tokenizer("\n", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        model.unembed.b_U[newline] += 2.5
    return model


GENERATION_TEXTS = [
    "I lost my keys.",
    "ok",
    "The cake was wonderful and everyone sang and danced all night long.",
    "The spider crawled across my pillow in the dark.",
    "Nobody called me back.",
    "A {brace} text",
]


@pytest.mark.parametrize("batch_size", [1, 6])
def test_generation_equals_a_greedy_loop_of_full_forward_passes(stopping_model, tiny_tokenizer, batch_size):
    max_new = 8
    clf = classifier(stopping_model, tiny_tokenizer, SINGLE, batch_size=batch_size, max_new_tokens=max_new)
    assert clf.stop_ids == expected_stop_ids(tiny_tokenizer)
    predictions = clf.predict(GENERATION_TEXTS)
    produced = []
    for i, text in enumerate(GENERATION_TEXTS):
        expected, new_ids = brute_force_generation(
            stopping_model, tiny_tokenizer, clf.parts, text, max_new, clf.stop_ids
        )
        assert predictions.generations[i] == expected
        produced.append(len(new_ids))
    # the texts exercise every way decoding can end: stop at once, stop midway, run out of tokens
    assert 0 in produced and max_new in produced and any(0 < n < max_new for n in produced), produced


def test_generation_of_an_untouched_random_model(any_tiny_model, tiny_tokenizer):
    clf = classifier(any_tiny_model, tiny_tokenizer, EMOTIONS, chat=True, batch_size=5, max_new_tokens=3)
    predictions = clf.predict(TEXTS)
    for i, text in enumerate(TEXTS):
        expected, _ = brute_force_generation(any_tiny_model, tiny_tokenizer, clf.parts, text, 3, clf.stop_ids)
        assert predictions.generations[i] == expected
    assert predictions.generated_labels == [parse_label(g, EMOTIONS) for g in predictions.generations]


# ---------------------------------------------------------------------------------------------- hooks


def test_hooks_on_the_residual_stream_change_scores_and_generations(tiny_model, tiny_tokenizer):
    clf = classifier(tiny_model, tiny_tokenizer, MULTI, batch_size=5)
    before = clf.predict(TEXTS)

    def scramble(resid, hook):
        return resid + 3.0 * torch.sin(torch.arange(resid.shape[-1], dtype=resid.dtype))

    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", scramble)]):
        hooked = clf.predict(TEXTS)
    after = clf.predict(TEXTS)
    assert np.abs(hooked.label_logprobs - before.label_logprobs).min() > 1e-3  # every score moved
    assert hooked.generations != before.generations
    np.testing.assert_array_equal(after.label_logprobs, before.label_logprobs)  # and the hook is gone again


def test_a_hook_on_the_final_norm_reaches_the_scoring_head(tiny_model, tiny_tokenizer):
    """Scores are read through `ln_final` and `unembed` directly; their hook points must still fire."""
    clf = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False)
    before = clf.predict(TEXTS[:2])
    with tiny_model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: torch.zeros_like(x))]):
        hooked = clf.predict(TEXTS[:2])
    # a zero residual gives uniform logits (the random unembedding has no bias): log P = -log(d_vocab)
    expected = -np.log(tiny_model.cfg.d_vocab)
    np.testing.assert_allclose(hooked.label_logprobs, np.logaddexp(expected, expected), atol=1e-5)
    assert not np.allclose(before.label_logprobs, hooked.label_logprobs)


# -------------------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("texts", "positions"), [(["ok", "", "fine"], "[1]"), (["  \n\t", "ok", " "], "[0, 2]")]
)
def test_empty_texts_raise_naming_their_positions(tiny_model, tiny_tokenizer, texts, positions):
    clf = classifier(tiny_model, tiny_tokenizer, SINGLE)
    with pytest.raises(ValueError, match=rf"positions {re.escape(positions)} are empty"):
        clf.predict(texts)
    # contextual calibration scores content-free inputs such as "" on purpose
    assert clf.predict(texts, allow_empty=True).label_logprobs.shape == (3, 2)


def test_no_texts_is_an_error(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one text"):
        classifier(tiny_model, tiny_tokenizer, SINGLE).predict([])


def test_verbaliser_that_tokenises_to_nothing_is_an_error(tiny_model, tiny_tokenizer):
    parts = build_prompt(tiny_tokenizer, SINGLE, chat=False)
    broken = type(parts)(**{**parts.__dict__, "verbalisers": {"joy": (" joy",), "fear": ("",)}})
    with pytest.raises(ValueError, match="tokenises to nothing"):
        EmotionClassifier(tiny_model, tiny_tokenizer, broken)


# ------------------------------------------------------------------------------------------ parse_label


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("joy", "joy"),
        (" Joy.", "joy"),
        ("ANGER", "anger"),
        ("I am happy", "joy"),  # synonym
        ("They were scared.", "fear"),
        ("no emotion", "neutral"),  # multi-word synonym
        ("sad, not angry", "sadness"),  # the first mentioned label wins
        ("angry, then sad", "anger"),
        ("The answer is: Surprise! Or maybe joy.", "surprise"),
        ("fearless", None),  # whole words only: no label inside another word
        ("unhappy", None),
        ("joyride", None),
        ("enjoy", None),
        ("", None),
        ("The weather is mild.", None),
        ("shame", None),  # a label outside the scored set is not a match
    ],
)
def test_parse_label(generation, expected):
    assert parse_label(generation, EMOTIONS) == expected


def test_parse_label_only_knows_the_given_labels():
    assert parse_label("I felt happy and scared", ("fear", "sadness")) == "fear"
    assert parse_label("guilty", ("shame", "guilt")) == "guilt"
    assert parse_label("mystery", ("mystery", "joy")) == "mystery"  # labels without synonyms match themselves


# ------------------------------------------------------------------------------------------ Predictions


def make_predictions(generated_labels=None) -> Predictions:
    logprobs = np.log(
        np.array(
            [
                [0.5, 0.25, 0.05],  # -> a
                [0.1, 0.2, 0.3],  # -> c
                [0.02, 0.06, 0.02],  # -> b
                [0.6, 0.1, 0.1],  # -> a
            ]
        )
    )
    generations = None if generated_labels is None else ["x"] * 4
    return Predictions(
        labels=("a", "b", "c"),
        label_logprobs=logprobs,
        scoring_mode="first-token",
        n_truncated=0,
        generations=generations,
        generated_labels=generated_labels,
    )


def test_predictions_known_values():
    p = make_predictions()
    assert p.predicted == ["a", "c", "b", "a"]
    np.testing.assert_allclose(p.label_probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(p.label_probs[0], [0.5 / 0.8, 0.25 / 0.8, 0.05 / 0.8])
    np.testing.assert_allclose(p.label_probs[2], [0.2, 0.6, 0.2])
    np.testing.assert_allclose(p.label_mass, [0.8, 0.6, 0.1, 0.8])
    frame = p.to_frame()
    assert list(frame.columns) == ["predicted", "p_a", "p_b", "p_c", "label_mass"]
    assert list(frame["predicted"]) == p.predicted


def test_label_probs_are_stable_for_very_small_logprobs():
    p = Predictions(("a", "b"), np.array([[-2000.0, -2001.0]]), "sequence", 0)
    np.testing.assert_allclose(p.label_probs, [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))]])


def test_agreement_known_values():
    p = make_predictions(generated_labels=["a", None, "c", "b"])  # agree, unparsed, disagree, disagree
    assert p.agreement() == {"parsed": 0.75, "agree_all": 0.25, "agree_parsed": pytest.approx(1 / 3)}
    none = make_predictions(generated_labels=[None] * 4)
    agreement = none.agreement()
    assert agreement["parsed"] == 0 and agreement["agree_all"] == 0 and np.isnan(agreement["agree_parsed"])
    frame = p.to_frame()
    assert list(frame["generated_label"].fillna("-")) == ["a", "-", "c", "b"]


def test_agreement_needs_generations():
    with pytest.raises(ValueError, match="without generation"):
        make_predictions().agreement()


def test_without_generation_there_are_no_generations(tiny_model, tiny_tokenizer):
    predictions = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False).predict(TEXTS[:2])
    assert predictions.generations is None and predictions.generated_labels is None


# ----------------------------------------------------------------------------------------- cached runs


def prediction_entries(cache_root) -> list:
    folder = cache_root / "predictions"
    return sorted(p for p in folder.iterdir() if not p.name.endswith(".tmp")) if folder.exists() else []


IDS = [f"item-{i}" for i in range(len(TEXTS))]


def test_cached_predict_is_served_from_disk_the_second_time(
    tiny_model, tiny_tokenizer, tmp_cache, monkeypatch
):
    clf = classifier(tiny_model, tiny_tokenizer, MULTI, batch_size=5)
    first = cached_predict(clf, "tiny", IDS, TEXTS)
    direct = clf.predict(TEXTS)
    np.testing.assert_array_equal(first.label_logprobs, direct.label_logprobs)
    assert first.generations == direct.generations and first.scoring_mode == "sequence"
    assert len(prediction_entries(tmp_cache)) == 1

    def refuse(self, texts):
        raise AssertionError("predict() ran although the result is cached")

    monkeypatch.setattr(EmotionClassifier, "predict", refuse)
    second = cached_predict(clf, "tiny", IDS, TEXTS)
    np.testing.assert_array_equal(second.label_logprobs, first.label_logprobs)
    assert second.labels == first.labels and second.generated_labels == first.generated_labels
    assert second.n_truncated == first.n_truncated
    # batch size and prefix reuse do not change results, so they share the entry
    other = classifier(tiny_model, tiny_tokenizer, MULTI, batch_size=2, reuse_prefix=False)
    np.testing.assert_array_equal(
        cached_predict(other, "tiny", IDS, TEXTS).label_logprobs, first.label_logprobs
    )


def test_cached_predict_keys_on_everything_that_changes_the_result(tiny_model, tiny_tokenizer, tmp_cache):
    base = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False)
    cached_predict(base, "tiny", IDS, TEXTS)
    variants = [
        (base, "other-model", IDS, TEXTS),
        (classifier(tiny_model, tiny_tokenizer, ("fear", "joy"), generate=False), "tiny", IDS, TEXTS),
        (classifier(tiny_model, tiny_tokenizer, SINGLE, chat=True, generate=False), "tiny", IDS, TEXTS),
        (
            classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False, max_text_tokens=5),
            "tiny",
            IDS,
            TEXTS,
        ),
        (classifier(tiny_model, tiny_tokenizer, SINGLE, generate=True), "tiny", IDS, TEXTS),
        (base, "tiny", IDS[::-1], TEXTS),
        (base, "tiny", IDS, TEXTS[:-1] + ["changed"]),
    ]
    for clf, name, ids, texts in variants:
        cached_predict(clf, name, ids, texts)
    assert len(prediction_entries(tmp_cache)) == 1 + len(variants)


def test_corrupted_cached_predictions_are_recomputed(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    clf = classifier(tiny_model, tiny_tokenizer, SINGLE)
    first = cached_predict(clf, "tiny", IDS, TEXTS)
    (entry,) = prediction_entries(tmp_cache)
    path = entry / "predictions.json"
    payload = json.loads(path.read_text())
    payload["label_logprobs"][0] = [0.0, -100.0]  # a plausible-looking edit
    path.write_text(json.dumps(payload))
    calls = []
    real = EmotionClassifier.predict

    def counting(self, texts, allow_empty=False):
        calls.append(len(texts))
        return real(self, texts, allow_empty)

    monkeypatch.setattr(EmotionClassifier, "predict", counting)
    again = cached_predict(clf, "tiny", IDS, TEXTS)
    assert calls == [len(TEXTS)]
    np.testing.assert_array_equal(again.label_logprobs, first.label_logprobs)


def test_runs_with_hooks_are_never_cached(tiny_model, tiny_tokenizer, tmp_cache):
    clf = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False)
    plain = clf.predict(TEXTS)
    tiny_model.add_hook("blocks.0.hook_resid_post", lambda resid, hook: resid * 2.0)
    try:
        assert has_interventions(tiny_model)
        hooked = cached_predict(clf, "tiny", IDS, TEXTS)
        hooked_again = cached_predict(clf, "tiny", IDS, TEXTS)
    finally:
        tiny_model.reset_hooks()
    assert not has_interventions(tiny_model)
    assert prediction_entries(tmp_cache) == []
    np.testing.assert_array_equal(hooked.label_logprobs, hooked_again.label_logprobs)
    assert not np.allclose(hooked.label_logprobs, plain.label_logprobs)
    # without the hook the run is cached, and the cache holds the unhooked result
    np.testing.assert_allclose(cached_predict(clf, "tiny", IDS, TEXTS).label_logprobs, plain.label_logprobs)
    assert len(prediction_entries(tmp_cache)) == 1


def test_runs_with_an_sae_attached_are_never_cached(tiny_model, tiny_tokenizer, tmp_cache):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = StandardSAE(
        StandardSAEConfig(d_in=32, d_sae=16, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"))
    )
    clf = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False)
    tiny_model.add_sae(sae)
    try:
        assert has_interventions(tiny_model)
        cached_predict(clf, "tiny", IDS, TEXTS)
    finally:
        tiny_model.reset_saes()
    assert prediction_entries(tmp_cache) == []
    assert not has_interventions(tiny_model)


# ------------------------------------------------------------------------------------------ scoring modes

#: " Anger" is several tokens (" An", "g", "er"), but no first token is shared between these labels.
UNIQUE_FIRST = ("anger", "joy", "fear")


@torch.inference_mode()
def brute_force_first_token_scores(model, tokenizer, parts, text: str) -> np.ndarray:
    """log sum of P(first token of each verbaliser) after the prompt, from one full forward pass."""
    context = encode_prefix(tokenizer, parts) + encode_suffix(tokenizer, parts, text, 256)[0]
    logprobs = torch.log_softmax(model(torch.tensor([context]))[0, -1].double(), dim=-1)
    scores = []
    for label in parts.labels:
        firsts = {tokenizer(v, add_special_tokens=False).input_ids[0] for v in parts.verbalisers[label]}
        scores.append(torch.logsumexp(logprobs[sorted(firsts)], dim=0).item())
    return np.array(scores)


def test_auto_scoring_uses_first_tokens_when_each_label_owns_them(tiny_model, tiny_tokenizer):
    clf = classifier(tiny_model, tiny_tokenizer, UNIQUE_FIRST, generate=False)
    lengths = [
        len(tiny_tokenizer(v, add_special_tokens=False).input_ids) for v in clf.parts.verbalisers["anger"]
    ]
    assert max(lengths) > 1  # a multi-token verbaliser, yet first-token scoring is valid
    assert clf.scoring_mode == "first-token"
    predictions = clf.predict(TEXTS)
    for i, text in enumerate(TEXTS):
        expected = brute_force_first_token_scores(tiny_model, tiny_tokenizer, clf.parts, text)
        np.testing.assert_allclose(predictions.label_logprobs[i], expected, atol=1e-5, rtol=0)


def test_sequence_scoring_can_be_forced(tiny_model, tiny_tokenizer):
    clf = classifier(tiny_model, tiny_tokenizer, UNIQUE_FIRST, generate=False, scoring="sequence")
    assert clf.scoring_mode == "sequence"
    predictions = clf.predict(TEXTS[:3])
    for i, text in enumerate(TEXTS[:3]):
        expected = brute_force_scores(tiny_model, tiny_tokenizer, clf.parts, text)
        np.testing.assert_allclose(predictions.label_logprobs[i], expected, atol=1e-5, rtol=0)


def test_first_token_scoring_refuses_shared_first_tokens(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="ambiguous"):
        classifier(tiny_model, tiny_tokenizer, EMOTIONS, scoring="first-token")
    with pytest.raises(ValueError, match="scoring must be one of"):
        classifier(tiny_model, tiny_tokenizer, SINGLE, scoring="best")


def test_scores_read_from_the_last_residual_equal_predict(tiny_model, tiny_tokenizer):
    """One pass that stores the last block's residual gives the classifier's answers (first-token scoring)."""
    clf = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False)
    expected = clf.predict(TEXTS)
    resid = []
    for text in TEXTS:
        ids = clf.prefix_ids + encode_suffix(tiny_tokenizer, clf.parts, text, 256)[0]
        _, cache = tiny_model.run_with_cache(
            torch.tensor([ids]), names_filter=lambda n: n.endswith("resid_post")
        )
        resid.append(cache[f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"][0, -1])
    read = clf.predictions_from_residual(torch.stack(resid))
    np.testing.assert_allclose(read.label_logprobs, expected.label_logprobs, atol=1e-4)
    assert read.predicted == expected.predicted and read.scoring_mode == "first-token"
    sequence = classifier(tiny_model, tiny_tokenizer, SINGLE, generate=False, scoring="sequence")
    with pytest.raises(ValueError, match="first-token scoring only"):
        sequence.predictions_from_residual(torch.stack(resid))
