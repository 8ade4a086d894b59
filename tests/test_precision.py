"""Tests for emolib.lm.precision: the hardware check and its fallback, the environment override, bfloat16 forwards
against float32 ones within stated tolerances (logits, label scores, predictions, activations, SAE training on
planted features), and cache keys that keep the two precisions apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CORPUS, llama_like_config, make_tiny_model
from test_classify import EMOTIONS, TEXTS, classifier
from test_saes import HOOKS, PLANTED, PlantedStream, mean_best_cosine, to_inference

from emolib.lm import precision as P
from emolib.lm.classify import cached_predict
from emolib.sae.activations import ExtractionConfig, extract_activations, token_chunks
from emolib.sae.training import saes_key, train_saes

#: bfloat16 keeps 8 bits of mantissa: products of the tiny models' O(1) activations differ by about 1e-2.
LOGIT_TOLERANCE = 0.1
#: Label log-probabilities (differences of logits, then log-softmax) move by a few hundredths of a nat.
SCORE_TOLERANCE = 0.1


@pytest.fixture
def fresh_model(tiny_tokenizer):
    """A tiny model of its own: `set_compute_dtype` changes the model it is given."""
    return make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)


def tokens(tokenizer) -> torch.Tensor:
    ids = tokenizer(CORPUS[0]).input_ids[:24]
    return torch.tensor([ids])


# ------------------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize(("fast", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_uses_bfloat16_only_where_the_hardware_is_fast(monkeypatch, fast, expected):
    monkeypatch.delenv(P.PRECISION_ENV, raising=False)
    monkeypatch.setattr(P, "bf16_is_fast", lambda device="cpu": fast)
    assert P.resolve_precision("auto") == expected
    assert P.resolve_precision() == expected
    assert P.resolve_precision("float32") == torch.float32
    assert P.resolve_precision("bfloat16") == torch.bfloat16


def test_the_hardware_check_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not P.bf16_is_fast("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert P.bf16_is_fast("cpu")
    assert not P.bf16_is_fast("meta")


def test_the_environment_overrides_auto_and_bad_names_raise(monkeypatch):
    monkeypatch.setattr(P, "bf16_is_fast", lambda device="cpu": True)
    monkeypatch.setenv(P.PRECISION_ENV, "float32")
    assert P.resolve_precision() == torch.float32
    assert P.resolve_precision("bfloat16") == torch.bfloat16  # an explicit argument wins
    monkeypatch.setenv(P.PRECISION_ENV, "fp8")
    with pytest.raises(P.PrecisionError, match=r"'fp8' \(from \$EMOLIB_PRECISION\).*auto.*float32.*bfloat16"):
        P.resolve_precision()
    with pytest.raises(P.PrecisionError, match="half"):
        P.resolve_precision("half")


def test_keyed_names_keep_float32_keys_and_separate_bfloat16():
    assert P.keyed_name("m", torch.float32) == "m" == P.keyed_name("m", "float32")
    assert P.keyed_name("m", torch.bfloat16) == "m@bfloat16" == P.keyed_name("m", "bfloat16")


# ------------------------------------------------------------------------------------------- forwards


def test_bfloat16_forwards_agree_with_float32_within_tolerance(fresh_model, tiny_tokenizer):
    batch = tokens(tiny_tokenizer)
    with torch.inference_mode():
        reference = fresh_model(batch)
        P.set_compute_dtype(fresh_model, torch.bfloat16)
        assert P.compute_dtype(fresh_model) == torch.bfloat16
        low = fresh_model(batch)
        _, cache = fresh_model.run_with_cache(batch, names_filter="blocks.1.hook_resid_post")
        P.set_compute_dtype(fresh_model, torch.float32)
        back = fresh_model(batch)
    assert low.dtype == torch.float32 and low.shape == reference.shape
    difference = (low - reference).abs().max().item()
    assert 0 < difference < LOGIT_TOLERANCE  # autocast ran (not bit-equal) and stayed close
    assert (low.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    assert torch.equal(back, reference)  # float32 again is the untouched forward
    assert cache["blocks.1.hook_resid_post"].shape[-1] == fresh_model.cfg.d_model


def test_bfloat16_label_scores_and_clear_predictions_agree(fresh_model, tiny_tokenizer):
    reference = classifier(fresh_model, tiny_tokenizer, EMOTIONS).predict(TEXTS)
    P.set_compute_dtype(fresh_model, torch.bfloat16)
    low = classifier(fresh_model, tiny_tokenizer, EMOTIONS).predict(TEXTS)
    scores, low_scores = reference.label_logprobs, low.label_logprobs
    assert np.abs(scores - low_scores).max() < SCORE_TOLERANCE
    top2 = np.sort(scores, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * SCORE_TOLERANCE  # a margin bf16 cannot overturn
    assert [a for a, c in zip(reference.predicted, clear, strict=True) if c] == [
        b for b, c in zip(low.predicted, clear, strict=True) if c
    ]


def test_the_tolerance_test_can_fail(fresh_model, tiny_tokenizer):
    """The same comparison flags a real change: a perturbed weight moves the logits beyond the tolerance."""
    batch = tokens(tiny_tokenizer)
    with torch.inference_mode():
        reference = fresh_model(batch)
        fresh_model.blocks[1].mlp.W_out.mul_(3.0)
        P.set_compute_dtype(fresh_model, torch.bfloat16)
        changed = fresh_model(batch)
    assert (changed - reference).abs().max().item() > LOGIT_TOLERANCE


# ------------------------------------------------------------------------------------------- cache keys


def test_predictions_and_activations_of_two_precisions_are_cached_apart(
    fresh_model, tiny_tokenizer, tmp_cache
):
    ids = [f"t{i}" for i in range(len(TEXTS))]
    reference = cached_predict(classifier(fresh_model, tiny_tokenizer, EMOTIONS), "tiny", ids, TEXTS)
    config = ExtractionConfig(hooks=("blocks.1.hook_resid_post",), progress=False)
    sequences = token_chunks(tiny_tokenizer, CORPUS * 2, 16)
    store = extract_activations(fresh_model, "tiny", sequences, config, description="t", preset="t")
    P.set_compute_dtype(fresh_model, torch.bfloat16)
    low = cached_predict(classifier(fresh_model, tiny_tokenizer, EMOTIONS), "tiny", ids, TEXTS)
    low_store = extract_activations(fresh_model, "tiny", sequences, config, description="t", preset="t")
    folders = sorted(p.name for p in (tmp_cache / "predictions").iterdir())
    assert len(folders) == 2 and folders[1].startswith("tiny@bfloat16-")
    assert not np.array_equal(reference.label_logprobs, low.label_logprobs)  # really recomputed
    assert low_store.key != store.key and low_store.folder.name.startswith("tiny-bfloat16-")
    hook = "blocks.1.hook_resid_post"
    a, b = store.load(hook), low_store.load(hook)
    assert (a - b).abs().max() < LOGIT_TOLERANCE * a.abs().max()
    assert saes_key(PLANTED, activation_key="k", hooks=HOOKS, d_in=4) != saes_key(
        PLANTED, activation_key="k", hooks=HOOKS, d_in=4, precision=torch.bfloat16
    )


# ------------------------------------------------------------------------------------------- SAE training


def test_bfloat16_sae_training_recovers_the_planted_features():
    stream = PlantedStream()
    trained = train_saes(stream, PLANTED, hooks=HOOKS, d_in=stream.dim, precision=torch.bfloat16)
    inference = to_inference(trained)
    for hook in HOOKS:
        planted = stream.dicts[hook].feature_vectors.detach()
        assert inference[hook].W_dec.dtype == torch.float32  # master weights stay float32
        assert mean_best_cosine(planted, inference[hook].W_dec.detach()) >= 0.9, hook
