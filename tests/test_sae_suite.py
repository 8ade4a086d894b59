"""The book's SAE suite end to end on a tiny model: every layer gets an SAE and a quality row, a second call
reuses every stage, and the evaluation batch leaves out what training leaves out."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pandas as pd
import pytest
import torch
from conftest import tiny_loaded
from test_models import empty_hub, fake_gpt2  # noqa: F401, F811 (fixtures)

from emolib.lm.batching import right_padded
from emolib.sae import suite as suite_module
from emolib.sae import training as saes_module  # noqa: F401
from emolib.sae.activations import ExtractionConfig
from emolib.sae.corpus import CorpusConfig, build_corpus
from emolib.sae.suite import SuiteConfig, evaluation_batch, sae_suite
from emolib.studies.presets import QUICK_TRAINING

TINY_SUITE = SuiteConfig(
    corpus=CorpusConfig(emotion_per_label=2, general_tokens=500, max_length=64),
    eval_corpus=CorpusConfig(split="dev", emotion_per_label=1, general_tokens=200, max_length=64),
    extraction=ExtractionConfig(mode="all", outlier_factor=5.0, progress=False),
    training=dataclasses.replace(QUICK_TRAINING, expansion_factor=2, k=4, train_batch_size=32),
    epochs=2,
    loss_sequences=3,
    eval_batch_size=2,
)


@pytest.fixture
def builtin_only(monkeypatch):
    monkeypatch.delenv("EMOLIB_DATA_DIR", raising=False)


@pytest.fixture
def tiny_lm(tiny_model, tiny_tokenizer):
    return tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-suite", chat=True)


def test_every_layer_gets_an_sae_and_a_quality_row(tiny_lm, tmp_cache, builtin_only):
    suite = sae_suite(tiny_lm, "test", TINY_SUITE)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(tiny_lm.info.n_layers)]
    assert suite.hooks == hooks and list(suite.saes) == hooks
    assert list(suite.quality.index) == hooks
    assert suite.quality["layer"].tolist() == list(range(tiny_lm.info.n_layers))
    assert suite.quality.attrs["n_loss_sequences"] == 3
    # TopK at inference: exactly k active features on every measured token
    assert (suite.quality["l0"] == TINY_SUITE.training.k).all()
    assert suite.training.total_training_samples == (suite.extraction["n_rows"] * 2 // 32 * 32), (
        "the token budget is epochs x the stored rows, in whole batches"
    )
    assert set(suite.timings) == {"extract", "train", "evaluate"}
    assert all(seconds > 0 for seconds in suite.timings.values())
    assert suite.corpus.table["source"].tolist() == ["builtin"]
    assert suite.corpus.notes and "no general text" in suite.corpus.notes[0]
    missed = suite.missed["missed"]
    for layer, hook in enumerate(hooks):
        assert suite.flag(layer) == (missed[hook] if hook in missed.index else "")


def test_a_second_call_reuses_every_stage(tiny_lm, tmp_cache, builtin_only, monkeypatch):
    first = sae_suite(tiny_lm, "test", TINY_SUITE)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached stage was rebuilt")

    monkeypatch.setattr(saes_module, "train_saes", refuse)
    monkeypatch.setattr(suite_module, "evaluate_saes", refuse)
    monkeypatch.setattr("emolib.sae.activations._build", refuse)
    again = sae_suite(tiny_lm, "test", TINY_SUITE)
    assert again.folder == first.folder
    assert again.timings == first.timings, "timings come from the cache entries, not from this call"
    assert again.quality.equals(first.quality)
    x = torch.randn(5, tiny_lm.info.d_model)
    for hook in first.hooks:
        torch.testing.assert_close(again.saes[hook].encode(x), first.saes[hook].encode(x))


def test_a_changed_training_config_retrains(tiny_lm, tmp_cache, builtin_only):
    first = sae_suite(tiny_lm, "test", TINY_SUITE)
    other = dataclasses.replace(TINY_SUITE, training=dataclasses.replace(TINY_SUITE.training, seed=1))
    second = sae_suite(tiny_lm, "test", other)
    assert second.folder != first.folder
    assert second.extraction["key"] == first.extraction["key"], "the activations are reused"


def test_seed_saes_retrain_some_layers_with_another_seed(tiny_lm, tmp_cache, builtin_only):
    """The suite's own seed on one layer gives that layer's suite SAE exactly (an SAE does not depend on which
    other layers train beside it); another seed gives another SAE, trained on the same activations."""
    suite = sae_suite(tiny_lm, "test", TINY_SUITE)
    hook = "blocks.1.hook_resid_post"
    same = suite_module.seed_saes(tiny_lm, "test", TINY_SUITE, [1], seed=TINY_SUITE.training.seed)
    assert list(same) == [hook]
    torch.testing.assert_close(same[hook].W_dec, suite.saes[hook].W_dec, rtol=0, atol=0)
    other = suite_module.seed_saes(tiny_lm, "test", TINY_SUITE, [1], seed=7)
    assert list(other) == [hook] and not torch.equal(other[hook].W_dec, suite.saes[hook].W_dec)
    assert other[hook].cfg.d_sae == suite.saes[hook].cfg.d_sae
    # the seed's SAEs are measured as the suite's: the suite's own seed misses the suite layer's goals
    assert suite_module.seed_flags(tiny_lm, suite, same, TINY_SUITE.training.seed) == {1: suite.flag(1)}
    assert set(suite_module.seed_flags(tiny_lm, suite, other, 7)) == {1}


def test_a_seeds_run_of_every_layer_gives_each_layer_and_is_read_for_a_few(tiny_lm, tmp_cache, builtin_only):
    """Chapter 1 retrains every layer with a seed; chapters 2 and 3 ask for the final phase's layers with the same
    seed and read them from that run: the same SAEs a run of those layers alone gives, bit for bit."""
    hook = "blocks.1.hook_resid_post"
    alone = suite_module.seed_saes(tiny_lm, "test", TINY_SUITE, [1], seed=7)
    every_layer = list(range(tiny_lm.info.n_layers))
    every = suite_module.seed_saes(tiny_lm, "test", TINY_SUITE, every_layer, seed=7)
    assert len(every) == tiny_lm.info.n_layers > 1
    torch.testing.assert_close(every[hook].W_dec, alone[hook].W_dec, rtol=0, atol=0)
    trained = sorted((tmp_cache / "saes").iterdir())
    for folder in trained:  # drop the one-layer run: the next call must read the run of every layer
        if (folder / hook).is_dir() and not (folder / "blocks.0.hook_resid_post").is_dir():
            shutil.rmtree(folder)
    assert len(list((tmp_cache / "saes").iterdir())) == len(trained) - 1
    again = suite_module.seed_saes(tiny_lm, "test", TINY_SUITE, [1], seed=7)
    assert list(again) == [hook] and len(list((tmp_cache / "saes").iterdir())) == len(trained) - 1
    torch.testing.assert_close(again[hook].W_dec, alone[hook].W_dec, rtol=0, atol=0)
    # each set is measured on its own layers: a measurement of the one layer is not read back for all of them
    suite = sae_suite(tiny_lm, "test", TINY_SUITE)
    assert list(suite_module.seed_flags(tiny_lm, suite, alone, 7)) == [1]
    assert list(suite_module.seed_flags(tiny_lm, suite, every, 7)) == every_layer
    # once every layer is measured, a few layers read their rows of it instead of being measured again
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(suite_module, "measure_saes", lambda *a, **k: pytest.fail("measured again"))
        for folder in (tmp_cache / "sae_quality").iterdir():
            if len(json.loads((folder / "quality.json").read_text())["hooks"]) == 1:
                shutil.rmtree(folder)
        assert suite_module.seed_flags(tiny_lm, suite, alone, 7) == {
            1: suite_module.seed_flags(tiny_lm, suite, every, 7)[1]
        }
    # ... and on the tokens their training saw, so one layer's numbers are those of the run of every layer
    strict = dataclasses.replace(
        TINY_SUITE, extraction=dataclasses.replace(TINY_SUITE.extraction, outlier_factor=1.3)
    )
    eval_corpus = build_corpus(tiny_lm.tokenizer, True, TINY_SUITE.eval_corpus)
    few = suite_module.measure_saes(tiny_lm, alone, eval_corpus, strict, progress=False)
    whole = suite_module.measure_saes(tiny_lm, every, eval_corpus, strict, progress=False)
    assert few.attrs["n_outlier_tokens"] == whole.attrs["n_outlier_tokens"] > 0
    pd.testing.assert_series_equal(few.loc[hook], whole.loc[hook])


def test_evaluation_batch_leaves_out_what_training_leaves_out(tiny_lm, builtin_only):
    corpus = build_corpus(tiny_lm.tokenizer, True, TINY_SUITE.corpus)
    tokens, mask, keep = evaluation_batch(corpus, skip_first=1, pad=0, seed=3)
    again = evaluation_batch(corpus, skip_first=1, pad=0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((tokens, mask, keep), again, strict=True))
    rows = {
        tuple(row[: int(m.sum())].tolist()): (row, k) for row, m, k in zip(tokens, mask, keep, strict=True)
    }
    assert len(rows) == len(corpus.sequences)
    stored = 0
    for sequence, start in zip(corpus.sequences, corpus.starts, strict=True):
        row, kept = rows[tuple(sequence)]
        first = max(start, 1)
        assert kept[:first].all() and not kept[first : len(sequence)].any()
        stored += len(sequence) - first
    assert stored == int((mask.bool() & ~keep).sum())
    assert stored == corpus.n_stored - corpus.starts.count(0), (
        "only the first position more than the corpus drops"
    )


def test_padded_right_pads():
    tokens, mask = right_padded([[5, 6, 7], [8]], pad=0)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------------- a pretrained release instead of training


def publish_release(lm, trained, hub, monkeypatch, name: str) -> None:
    """Publish `trained`'s SAEs as sae-lens' registry and the hub cache serve a release (offline): saved in the
    SAELens layout under a hub snapshot, with an entry in sae-lens' directory and one in `PRETRAINED` (as `name`)."""
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory
    from test_saes import hub_snapshot

    from emolib.sae.loading import PRETRAINED, PretrainedSpec, save_saes

    repo_id = f"emolib-tests/{name}"
    save_saes(trained.saes, hub_snapshot(hub, repo_id) / "resid")
    ids = {hook: f"layer_{layer}" for layer, hook in enumerate(trained.hooks)}
    lookup = PretrainedSAELookup(
        release=f"{name}-release",
        repo_id=repo_id,
        model=lm.info.name,
        conversion_func=None,
        saes_map={ids[hook]: f"resid/{hook}" for hook in trained.hooks},
        expected_var_explained={},
        expected_l0={},
        neuronpedia_id={},
        norm_scaling_factor={},
        config_overrides=None,
    )
    monkeypatch.setitem(get_pretrained_saes_directory(), f"{name}-release", lookup)
    spec = PretrainedSpec(
        model=lm.info.name, release=f"{name}-release", sae_id="layer_{layer}", n_layers=lm.info.n_layers
    )
    monkeypatch.setitem(PRETRAINED, name, spec)


@pytest.fixture
def tiny_release(tiny_lm, tmp_cache, builtin_only, tmp_path, monkeypatch):
    """The tiny model's trained SAEs, published as the release "tiny-saes"."""
    from huggingface_hub import constants

    trained = sae_suite(tiny_lm, "test", TINY_SUITE)
    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    publish_release(tiny_lm, trained, hub, monkeypatch, "tiny-saes")
    return trained


def test_a_pretrained_release_replaces_training(tiny_lm, tiny_release, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained suite must not extract or train")

    monkeypatch.setattr(suite_module, "train_saes_cached", refuse)
    monkeypatch.setattr(suite_module, "extract_activations", refuse)
    config = dataclasses.replace(TINY_SUITE, pretrained=("tiny-saes",))
    suite = sae_suite(tiny_lm, "test", config)
    assert (suite.release, suite.key, suite.folder, suite.corpus, suite.training) == (
        "tiny-saes", "pretrained-tiny-saes", None, None, None
    )  # fmt: skip
    assert suite.hooks == tiny_release.hooks
    x = torch.randn(5, tiny_lm.info.d_model)
    for hook in suite.hooks:
        torch.testing.assert_close(suite.saes[hook].encode(x), tiny_release.saes[hook].encode(x))
    # measured by the same code on the same corpus: the same numbers as the trained suite's
    assert suite.quality.equals(tiny_release.quality)
    assert set(suite.timings) == {"evaluate"}
    assert suite.k is None  # no L0 goal for SAEs not trained for a k (`missed_goals`)
    assert (
        suite_module.seed_saes(tiny_lm, "test", config, [0], seed=1) == {}
    )  # one set of SAEs, no retraining
    from emolib.studies.saes import SAEReport

    report = SAEReport.of(suite)
    assert report.release == "tiny-saes" and report.corpus.empty and report.training == {}
    again = SAEReport.from_json(report.to_json())
    assert again.release == "tiny-saes" and again.quality.equals(report.quality)


def test_pretrained_releases_are_checked(tiny_lm, tiny_release, monkeypatch):
    from emolib.sae.loading import PRETRAINED, PretrainedSpec, SAEError

    with pytest.raises(SAEError, match="unknown pretrained SAE release"):
        SuiteConfig(pretrained=("no-such-release",))
    wrong = dataclasses.replace(PRETRAINED["tiny-saes"], n_layers=tiny_lm.info.n_layers + 1)
    monkeypatch.setitem(PRETRAINED, "tiny-saes-wrong", wrong)
    with pytest.raises(SAEError, match="has SAEs for 3 layers"):
        sae_suite(tiny_lm, "test", dataclasses.replace(TINY_SUITE, pretrained=("tiny-saes-wrong",)))
    twice = dataclasses.replace(TINY_SUITE, pretrained=("tiny-saes", "tiny-saes-wrong"))
    with pytest.raises(SAEError, match="several pretrained releases"):
        sae_suite(tiny_lm, "test", twice)
    other = PretrainedSpec(model="another-model", release="r", sae_id="l{layer}", n_layers=2)
    monkeypatch.setitem(PRETRAINED, "other-model-saes", other)
    trained = sae_suite(tiny_lm, "test", dataclasses.replace(TINY_SUITE, pretrained=("other-model-saes",)))
    assert trained.release is None, "a release for another model leaves this one training its own"


def test_missed_goals_without_k_has_no_l0_goal():
    from emolib.sae.quality import missed_goals

    table = pd.DataFrame(
        {"fve": [0.9, 0.1], "loss_recovered": [0.95, 0.95], "dead_fraction": [0.0, 0.0], "l0": [500.0, 32.0]},
        index=["a", "b"],
    )
    assert missed_goals(table, None)["missed"].to_dict() == {"b": "fve"}
    assert missed_goals(table, 32)["missed"].to_dict() == {"a": "l0", "b": "fve"}


def test_the_paper_scale_path_offline(fake_gpt2, empty_hub, tmp_cache, builtin_only, monkeypatch):  # noqa: F811
    """A hub model by name and a pretrained release from the hub, both from locally written files, through the code
    a chapter runs with `-p models=[...] -p saes=[...]`: `load_model`, `Preset.with_pretrained`, `sae_suite`."""
    from emolib.lm.models import load_model
    from emolib.studies.presets import get_preset

    lm = load_model("gpt2")  # the fake gpt2 in the local hub cache
    trained = sae_suite(lm, "test", TINY_SUITE)
    publish_release(lm, trained, empty_hub, monkeypatch, "gpt2-saes")
    preset = dataclasses.replace(
        get_preset("quick"), saes=dataclasses.replace(get_preset("quick").saes, suite=TINY_SUITE)
    )
    pretrained = preset.with_pretrained(["gpt2-saes"])
    suite_config = pretrained.flow.saes
    assert suite_config.pretrained == ("gpt2-saes",)
    every_study = (
        pretrained.features,
        pretrained.tracing,
        pretrained.steering,
        pretrained.generalisation.source,
    )
    assert all(study.saes == suite_config for study in (*every_study, pretrained.generalisation.flow))
    monkeypatch.setattr(
        suite_module, "train_saes_cached", lambda *a, **k: pytest.fail("trained instead of reading")
    )
    suite = sae_suite(lm, "test", suite_config)
    assert suite.release == "gpt2-saes" and suite.quality.equals(trained.quality)
