"""Tests for emolib.lm.baselines: run label sets, the evaluation sample, and a baseline run end to end on a tiny model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_loaded
from sklearn.metrics import f1_score

from emolib import data
from emolib.lm.baselines import (
    BaselineConfig,
    check_subset,
    evaluation_items,
    label_order_check,
    make_classifier,
    run_baseline,
    run_labels,
    scoring_check,
)
from emolib.lm.classify import ClassifierConfig, EmotionClassifier
from emolib.lm.prompts import shuffled_order
from emolib.studies.presets import PresetError, get_preset

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data" / "good"


# -------------------------------------------------------------------------------------------- label sets


def test_run_labels_native_and_ekman():
    assert run_labels("builtin", "native") == data.EKMAN7
    assert run_labels("builtin", "ekman") == data.EKMAN7
    assert run_labels("isear", "native") == ("joy", "fear", "anger", "sadness", "disgust", "shame", "guilt")
    assert run_labels("isear", "ekman") == ("joy", "fear", "anger", "sadness", "disgust")  # native order kept
    assert run_labels("carer_emotion", "ekman") == ("sadness", "joy", "anger", "fear", "surprise")  # no love


def test_run_labels_rejects_unknown_label_sets_and_datasets():
    with pytest.raises(ValueError, match="label_set must be 'native' or 'ekman'"):
        run_labels("builtin", "plutchik")
    with pytest.raises(data.EmolibDataError, match="unknown dataset"):
        run_labels("nope", "native")


def test_presets_hold_baseline_configs():
    quick, full = get_preset("quick").setup.baseline, get_preset("full").setup.baseline
    assert isinstance(quick, BaselineConfig) and isinstance(full, BaselineConfig)
    assert quick.n_per_label < full.n_per_label
    with pytest.raises(PresetError, match="unknown preset"):
        get_preset("medium")


# -------------------------------------------------------------------------------------- evaluation items


def test_evaluation_items_are_a_stratified_deterministic_test_sample():
    config = BaselineConfig(n_per_label=3, sample_seed=0)
    items = evaluation_items("builtin", config)
    assert items.dataset == "builtin" and items.labels == data.EKMAN7
    assert len(items.ids) == len(items.texts) == len(items.gold) == 3 * 7
    assert {label: items.gold.count(label) for label in data.EKMAN7} == dict.fromkeys(data.EKMAN7, 3)
    assert list(items.sampled["taken"]) == [3] * 7 and set(items.sampled["split"]) == {"test"}
    assert items.excluded.empty
    # every item is a test item of the dataset, with its own text and label
    full = data.load("builtin")
    rows = {
        row_id: (text, label, split)
        for row_id, text, label, split in zip(
            full["id"], full["text"], full["label"], full["split"], strict=True
        )
    }
    for row_id, text, label in zip(items.ids, items.texts, items.gold, strict=True):
        assert rows[row_id] == (text, label, "test")
    assert len(set(items.ids)) == len(items.ids)
    # deterministic per seed, different across seeds
    again = evaluation_items("builtin", config)
    assert again.ids == items.ids and again.texts == items.texts
    other = evaluation_items("builtin", BaselineConfig(n_per_label=3, sample_seed=1))
    assert other.ids != items.ids and len(other.ids) == len(items.ids)


def test_larger_samples_contain_smaller_ones():
    small = set(evaluation_items("builtin", BaselineConfig(n_per_label=2)).ids)
    large = set(evaluation_items("builtin", BaselineConfig(n_per_label=5)).ids)
    assert small < large


def test_whole_split_and_other_splits():
    whole = evaluation_items("builtin", BaselineConfig(n_per_label=None))
    assert len(whole.ids) == 70  # 50 per label, 20% test
    assert list(whole.sampled["taken"]) == [10] * 7
    dev = evaluation_items("builtin", BaselineConfig(n_per_label=4, split="dev"))
    assert not set(dev.ids) & set(whole.ids)
    with pytest.raises(ValueError, match="split must be one of"):
        evaluation_items("builtin", BaselineConfig(split="validation"))


def test_asking_for_more_than_there_is_keeps_everything_and_says_so():
    items = evaluation_items("builtin", BaselineConfig(n_per_label=25))
    assert len(items.ids) == 70
    assert items.sampled["short"].all() and list(items.sampled["available"]) == [10] * 7


def test_ekman_label_set_excludes_and_counts_other_labels(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(FIXTURE_DATA))
    native = evaluation_items("isear", BaselineConfig(n_per_label=None, split="train", label_set="native"))
    ekman = evaluation_items("isear", BaselineConfig(n_per_label=None, split="train", label_set="ekman"))
    assert ekman.labels == ("joy", "fear", "anger", "sadness", "disgust")
    assert set(ekman.gold) <= set(ekman.labels)
    assert set(native.gold) - set(ekman.labels)  # the fixture has shame or guilt items in train
    assert set(ekman.ids) == {i for i, g in zip(native.ids, native.gold, strict=True) if g in ekman.labels}
    assert native.excluded.empty
    assert set(ekman.excluded.index) <= {"shame", "guilt"}
    full = data.load("isear", data_dir=FIXTURE_DATA)
    n_other = sum(label in ("shame", "guilt") for label in full["label"])
    assert int(ekman.excluded.to_numpy().sum()) == n_other > 0


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(params=[("llama", False), ("gemma", True)], ids=["llama-base", "gemma-chat"])
def tiny_lm(request, tiny_model, tiny_gemma, tiny_tokenizer):
    family, chat = request.param
    model = {"llama": tiny_model, "gemma": tiny_gemma}[family]
    return tiny_loaded(model, tiny_tokenizer, name=f"tiny-{family}", chat=chat)


RUN = BaselineConfig(
    n_per_label=1,
    n_boot=200,
    order_seeds=(1, 2),
    classifier=ClassifierConfig(batch_size=4, max_new_tokens=3, progress=False),
)


def test_run_baseline_end_to_end(tiny_lm, tmp_cache, monkeypatch):
    items = evaluation_items("builtin", RUN)
    assert len(items.ids) == 7
    result = run_baseline(tiny_lm, items, RUN)
    p = result.predictions
    assert result.model == tiny_lm.info.name and result.dataset == "builtin"
    assert p.label_logprobs.shape == (7, 7) and p.labels == items.labels
    # the numbers are those of a direct run of the same classifier
    direct = make_classifier(tiny_lm, items.labels, "builtin", RUN.classifier).predict(items.texts)
    np.testing.assert_allclose(p.label_logprobs, direct.label_logprobs, atol=1e-6, rtol=0)
    assert p.generations == direct.generations
    # ... with the dataset's template ("Text:" for builtin) and the model's prompt format
    classifier = make_classifier(tiny_lm, items.labels, "builtin", RUN.classifier)
    assert classifier.parts.suffix("x").startswith("Text: x") and classifier.parts.chat == tiny_lm.info.chat
    # summaries
    summary = result.summary
    assert summary.n == 7
    assert summary.accuracy.value == pytest.approx(
        np.mean([a == b for a, b in zip(p.predicted, items.gold, strict=True)])
    )
    generated = [g if g is not None else "<unparsed>" for g in p.generated_labels]
    gen = result.generated_summary
    assert gen.labels == items.labels
    assert gen.accuracy.value == pytest.approx(
        np.mean([g == y for g, y in zip(generated, items.gold, strict=True)])
    )
    expected_f1 = f1_score(items.gold, generated, labels=list(items.labels), average="macro", zero_division=0)
    assert gen.macro_f1.value == pytest.approx(expected_f1)
    assert gen.chance_uniform == pytest.approx(1 / 7)
    assert sum(gen.prediction_shares.values()) == pytest.approx(1.0)
    assert result.agreement.value == pytest.approx(
        np.mean([g == q for g, q in zip(p.generated_labels, p.predicted, strict=True)])
    )
    assert result.parsed_share == p.agreement()["parsed"]
    row = result.row()
    assert row["n"] == 7 and row["labels"] == 7 and row["chance"] == pytest.approx(1 / 7)
    assert row["accuracy"] == summary.accuracy.value and row["generated_accuracy"] == gen.accuracy.value
    assert row["top_prediction_share"] == max(summary.prediction_shares.values())
    # the run is cached: a second one does not classify again
    assert len(list((tmp_cache / "predictions").iterdir())) == 1
    monkeypatch.setattr(
        EmotionClassifier, "predict", lambda self, texts, *_: pytest.fail("predict() ran again")
    )
    again = run_baseline(tiny_lm, items, RUN)
    np.testing.assert_array_equal(again.predictions.label_logprobs, p.label_logprobs)
    assert again.summary.accuracy == summary.accuracy


def test_label_order_check(tiny_lm, tmp_cache):
    items = evaluation_items("builtin", RUN)
    reference = run_baseline(tiny_lm, items, RUN)
    table = label_order_check(tiny_lm, items, RUN, reference)
    assert list(table["order_seed"]) == ["listed order", 1, 2]
    listed = table.iloc[0]
    assert listed["delta_accuracy"] == 0.0 and listed["delta_low"] == 0.0 and listed["delta_high"] == 0.0
    assert listed["flipped"] == 0.0
    assert listed["accuracy"] == reference.summary.accuracy.value
    assert listed["order"] == ", ".join(items.labels)
    first = items.labels[0]
    assert listed["first_listed_share"] == pytest.approx(
        np.mean([q == first for q in reference.predictions.predicted])
    )
    for _, row in table.iloc[1:].iterrows():
        order = shuffled_order(items.labels, row["order_seed"])
        assert row["order"] == ", ".join(order)
        # the shuffled run scores the same labels with the instruction listing them in another order
        config = ClassifierConfig(**{**RUN.classifier.__dict__, "generate": False})
        shuffled = make_classifier(tiny_lm, items.labels, "builtin", config, label_order=order)
        assert f"list: {', '.join(order)}." in shuffled.parts.prefix
        predicted = shuffled.predict(items.texts).predicted
        assert row["flipped"] == pytest.approx(
            np.mean([a != b for a, b in zip(predicted, reference.predictions.predicted, strict=True)])
        )
        accuracy = np.mean([a == g for a, g in zip(predicted, items.gold, strict=True)])
        assert row["accuracy"] == pytest.approx(accuracy)
        assert row["delta_accuracy"] == pytest.approx(accuracy - reference.summary.accuracy.value)
        assert row["delta_low"] <= row["delta_accuracy"] <= row["delta_high"]
        assert row["first_listed_share"] == pytest.approx(np.mean([q == order[0] for q in predicted]))
    assert set(table["model"]) == {tiny_lm.info.name} and set(table["dataset"]) == {"builtin"}
    # one cache entry for the reference and one per shuffled order (without generation)
    assert len(list((tmp_cache / "predictions").iterdir())) == 1 + len(RUN.order_seeds)


# ------------------------------------------------------------------------------------- checks on a subset


def test_check_subsets_are_the_items_a_smaller_sample_draws():
    items = evaluation_items("builtin", BaselineConfig(n_per_label=6))
    subset = check_subset(items, 2)
    assert subset.ids == evaluation_items("builtin", BaselineConfig(n_per_label=2)).ids
    assert len(subset.ids) == 14 and set(subset.ids) < set(items.ids)
    assert [subset.gold.count(label) for label in items.labels] == [2] * 7
    assert check_subset(items, None) is items
    assert (
        check_subset(items, 6) is items and check_subset(items, 100) is items
    )  # no label has more: every item
    with pytest.raises(ValueError, match="check_per_label must be at least 1"):
        BaselineConfig(check_per_label=0)


def test_checks_run_on_the_subset_and_compare_like_with_like(tiny_lm, tmp_cache):
    config = BaselineConfig(
        n_per_label=3,
        n_boot=100,
        order_seeds=(1,),
        check_per_label=1,
        classifier=ClassifierConfig(max_new_tokens=2, progress=False),
    )
    items = evaluation_items("builtin", config)
    subset = check_subset(items, 1)
    result = run_baseline(tiny_lm, items, config)
    assert (
        result.summary.n == 21 and len(result.predictions.generated_labels) == 21
    )  # everything on all items
    rows = [items.ids.index(i) for i in subset.ids]
    table = label_order_check(tiny_lm, items, config, result)
    listed, shuffled = table.iloc[0], table.iloc[1]
    # the reference row is the reference run restricted to the 7 checked items
    assert listed["accuracy"] == pytest.approx(
        np.mean([result.predictions.predicted[k] == items.gold[k] for k in rows])
    )
    assert listed["flipped"] == 0.0
    order = shuffled_order(items.labels, 1)
    classifier = make_classifier(tiny_lm, items.labels, "builtin", ClassifierConfig(generate=False), order)
    again = classifier.predict(subset.texts).predicted
    expected = np.mean([a != result.predictions.predicted[k] for a, k in zip(again, rows, strict=True)])
    assert shuffled["flipped"] == pytest.approx(expected)
    check = scoring_check(tiny_lm, items, config, result)
    assert check["dataset"] == "builtin" and 0 <= check["agreement with sequence scoring"] <= 1
    whole = scoring_check(tiny_lm, items, dataclasses.replace(config, check_per_label=None), result)
    assert whole["dataset"] == "builtin"
