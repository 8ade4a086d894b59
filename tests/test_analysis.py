"""The analysis set on a tiny model: held-out items only, rows aligned with items, residuals equal to a plain
forward pass, answers equal to the classifier's, text masks covering exactly the texts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_loaded

from emolib.data import get_spec
from emolib.studies.items import analysis_set
from emolib.studies.presets import PRESETS

CONFIG = dataclasses.replace(PRESETS["quick"].items, n_per_label=2, dataset="builtin")


@pytest.fixture
def aset(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    monkeypatch.delenv("EMOLIB_DATA_DIR", raising=False)
    lm = tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-analysis", chat=True)
    return analysis_set(lm, "test", CONFIG)


def test_items_are_held_out_and_balanced(aset):
    labels = get_spec("builtin").labels
    assert aset.labels == labels
    assert aset.n == 2 * 2 * len(labels)
    assert set(aset.splits) == {"dev", "test"}
    for split in ("dev", "test"):
        gold = aset.gold[aset.splits == split]
        assert sorted(gold) == sorted(np.repeat(labels, 2))
    assert len(set(aset.ids)) == aset.n


def test_rows_are_the_items_last_token_residuals(aset, tiny_model):
    for i in (0, aset.n - 1):
        _, cache = tiny_model.run_with_cache(torch.tensor([aset.prompts[i]]))
        for layer in aset.layers:
            expected = cache[f"blocks.{layer}.hook_resid_post"][0, -1].numpy()
            np.testing.assert_allclose(aset.resid(layer)[i], expected, atol=1e-4)


def test_answers_are_the_classifiers(aset):
    predictions = aset.classifier.predict(aset.texts)
    assert list(aset.predicted) == predictions.predicted
    np.testing.assert_array_equal(aset.correct, aset.predicted == aset.gold)
    np.testing.assert_allclose(aset.label_probs, predictions.label_probs, atol=1e-6)


def test_text_masks_cover_exactly_the_text(aset, tiny_tokenizer):
    for prompt, mask, text in zip(aset.prompts, aset.text_masks, aset.texts, strict=True):
        assert len(mask) == len(prompt)
        assert not mask[: aset.prefix_length].any()
        inside = [t for t, m in zip(prompt, mask, strict=True) if m]
        assert tiny_tokenizer.decode(inside).strip() == text.strip()
