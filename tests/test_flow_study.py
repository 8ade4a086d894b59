"""The flow study (emolib.studies.flow) end to end on a tiny model in its quick preset: its result's tables, views,
verdicts and README row, a JSON round trip (also through the public results file and the earlier layout), cache
reuse; and known values of the rules moved out of the chapter (item subsets, the lens emergence rule, phase cuts,
the verdict rules with their failing cases)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import (
    CHAT_TEMPLATE,
    CORPUS,
    EMOTIONS,
    SPECIALS,
    llama_like_config,
    make_tiny_model,
    tiny_loaded,
)
from threadpoolctl import threadpool_limits
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from emolib.methods.common import FlowError
from emolib.methods.lens import above_permutation_chance
from emolib.methods.phases import feasible_candidates
from emolib.sae.activations import ExtractionConfig
from emolib.sae.corpus import CorpusConfig
from emolib.sae.suite import SuiteConfig
from emolib.stats import Estimate
from emolib.studies import flow
from emolib.studies.base import read_study_results, write_study_results
from emolib.studies.flow import (
    CLAIMS,
    SUBSETS,
    FlowResult,
    PhaseCut,
    SkippedSubset,
    decodable_layers,
    emergence_row,
    item_subset,
    late_emergence_verdict,
    phase_roles_verdict,
    run_flow,
    three_phase_verdict,
)
from emolib.studies.items import analysis_set
from emolib.studies.presets import PRESETS
from emolib.verdicts import VERDICTS, Verdict

N_LAYERS = 8  # four phases of at least two layers must fit

#: SAEs small enough to train in seconds on the tiny model (the built-in dataset has no general text).
TINY_SAES = SuiteConfig(
    corpus=CorpusConfig(emotion_per_label=1, general_tokens=0, max_length=48),
    eval_corpus=CorpusConfig(split="dev", emotion_per_label=1, general_tokens=0, max_length=48),
    extraction=ExtractionConfig(mode="all", outlier_factor=5.0, progress=False),
    training=dataclasses.replace(
        PRESETS["quick"].suite.training, expansion_factor=2, k=4, train_batch_size=64
    ),
    epochs=1,
    loss_sequences=1,
    eval_batch_size=2,
)

#: The quick preset, on the built-in dataset and with the tiny SAEs.
CONFIG = dataclasses.replace(
    PRESETS["quick"].flow,
    preset="test",
    items=dataclasses.replace(PRESETS["quick"].items, dataset="builtin"),
    saes=TINY_SAES,
)


def planted_answers(lm, preset, config):
    """The analysis set with the tiny model's answers replaced: the gold label on two items of three, the first
    label on the others, so the correctly classified items cover every emotion (a random model answers all alike)."""
    aset = analysis_set(lm, preset, config)
    predicted = aset.gold.copy()
    predicted[::3] = aset.labels[0]
    return dataclasses.replace(aset, predicted=predicted)


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """A fresh cache and build folder for the module, only the built-in dataset, and planted answers."""
    root = tmp_path_factory.mktemp("flow-study")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMOLIB_CACHE_DIR", str(root / "cache"))
        patch.setenv("EMOLIB_BUILD_DIR", str(root / "build"))
        patch.delenv("EMOLIB_DATA_DIR", raising=False)
        patch.setattr(flow, "analysis_set", planted_answers)
        yield root


def label_tokenizer(folder):
    """The tests' tiny tokenizer, trained with every emotion word (" joy", " Joy", ...) frequent enough to be one
    token: the logit lens reads labels by their first token, which must not be shared (a leading space) by two."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        min_frequency=1,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = " ".join(f"{e} {e.capitalize()}" for e in EMOTIONS)
    tokenizer.train_from_iterator((CORPUS + [words] * 4) * 3, trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        add_bos_token=True,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tokenizer = label_tokenizer(tmp_path_factory.mktemp("flow-tokenizer"))
    cfg = dataclasses.replace(llama_like_config(len(tokenizer)), n_layers=N_LAYERS)
    return tiny_loaded(make_tiny_model(cfg, tokenizer), tokenizer, name="tiny-flow", chat=True)


@pytest.fixture(scope="module")
def result(lm, environment) -> FlowResult:
    with threadpool_limits(1):  # tiny matrices: one BLAS thread is fastest, above all on a busy machine
        return run_flow(lm, CONFIG)


def assert_same(a: FlowResult, b: FlowResult) -> None:
    """Every table, cut, verdict and fact of two results agree."""
    assert (a.model, a.dataset, a.labels, a.facts, a.sae_summary) == (
        b.model,
        b.dataset,
        b.labels,
        b.facts,
        b.sae_summary,
    )
    assert list(a.subsets) == list(b.subsets)
    for s, part in a.subsets.items():
        other = b.subsets[s]
        assert type(part) is type(other)
        if isinstance(part, SkippedSubset):
            assert part == other
            continue
        for name in (
            "per_layer",
            "per_emotion",
            "test",
            "role_shares",
            "role_shares_per_phase",
            "role_counts",
        ):
            pd.testing.assert_frame_equal(getattr(part, name), getattr(other, name), check_dtype=False)
        pd.testing.assert_frame_equal(
            part.role_counts_per_phase, other.role_counts_per_phase, check_dtype=False
        )
        pd.testing.assert_series_equal(part.choice_shares, other.choice_shares, check_dtype=False)
        pd.testing.assert_series_equal(part.boundary_frequency, other.boundary_frequency, check_dtype=False)
        assert part.cuts == other.cuts and part.verdicts == other.verdicts
        assert (part.chosen, part.penalty, part.chance, part.final_agreement) == (
            other.chosen,
            other.penalty,
            other.chance,
            other.final_agreement,
        )
    pd.testing.assert_frame_equal(a.feature_cards, b.feature_cards, check_dtype=False)
    pd.testing.assert_frame_equal(a.seeds_table(), b.seeds_table(), check_dtype=False)
    pd.testing.assert_frame_equal(a.seed_features_table(), b.seed_features_table(), check_dtype=False)
    assert a.verdicts() == b.verdicts() and a.readme_row() == b.readme_row()


# ------------------------------------------------------------------------------------------------ the study


def test_quick_study_on_a_tiny_model(result, lm):
    assert result.model == "tiny-flow" and result.dataset == "builtin"
    assert list(result.subsets) == ["all", "correct"]
    part = result.subset("all")
    assert part.per_layer.index.tolist() == list(range(N_LAYERS))
    assert {"probe_resid", "probe_sae_control_high", "selective", "lens_chance", "cka", "sae_misses"} <= set(
        part.per_layer.columns
    )
    assert np.isnan(part.per_layer.loc[0, "cka"]) and part.per_layer["cka"].iloc[1:].between(0, 1).all()
    headroom = result.headroom_row()
    best = headroom["best probe layer"]
    assert part.per_layer.loc[best, "probe_resid"] == part.per_layer["probe_resid"].max()
    assert headroom["model accuracy (zero-shot)"] == result.facts["model accuracy"]
    adequacy = result.adequacy_table()
    assert adequacy.index.tolist() == list(range(N_LAYERS)) and "probe: error term" in adequacy.columns
    assert (adequacy["FVE at the answer"] <= 1).all()
    for column in ("probe: reconstruction", "probe: error term", "answers a norm outlier"):
        assert adequacy[column].between(0, 1).all()
    aurocs = result.auroc_table()
    assert aurocs.index.tolist() == list(range(N_LAYERS)) and "text: selective (null max)" in aurocs.columns
    for prefix in ("", "text_"):  # the top-10 mean never exceeds the largest; both are AUROCs
        assert part.per_layer[f"{prefix}auroc_top"].between(0, 1).all()
        assert (part.per_layer[f"{prefix}auroc_max"] >= part.per_layer[f"{prefix}auroc_top"]).all()
    assert "text codes" in result.timings
    answers = result.answer_feature_table()
    assert answers.index.tolist() == [1, 2, 3] and "follow the answer" in answers.columns
    layers = part.per_layer  # Holm across layers: adjusted p-values never below the raw ones
    assert (layers["selective_p_holm"] >= layers["selective_p"]).all()
    assert (layers["selective_beyond_control"] == (layers["selective_p_holm"] < CONFIG.layer_alpha)).all()
    assert part.n_items == result.facts["items"] and part.chance == pytest.approx(1 / len(result.labels))
    assert set(part.per_emotion.columns) == {*result.labels, "any", "specific", "shared"}
    feasible = feasible_candidates(CONFIG.candidates, N_LAYERS)  # phases of two layers or more
    assert part.test.index.tolist() == list(feasible) == [1, 2, 3, 4] and part.chosen in feasible
    assert set(part.boundaries_without) == {m for m, _ in CONFIG.profile_metrics}
    assert all(len(b) == 2 for b in part.boundaries_without.values())
    assert len(result.leave_one_out_table()) == len(result.analysed) * (1 + len(CONFIG.profile_metrics))
    assert part.choice_shares.sum() == pytest.approx(1.0)
    three = result.cut(3)
    assert len(three.phases) == 3 and len(three.intervals) == 2
    assert [layer for layers in result.phases().values() for layer in layers] == list(range(N_LAYERS))
    assert result.final_phase() == result.phases()["phase 3"]
    assert result.chosen_phase_count() == part.chosen
    assert set(part.role_shares.columns) == set(flow.ROLES)
    assert part.role_shares.sum(axis=1).to_numpy() == pytest.approx(1.0)
    assert part.role_counts.sum(axis=1).eq(lm.model.cfg.d_model * 2).all(), "every feature gets one role"
    assert part.role_shares_per_phase.index.tolist() == [1, 2, 3]
    assert part.boundary_frequency.sum() == pytest.approx(2.0), "two boundaries per resample"
    assert 0 <= part.final_agreement <= 1
    assert result.feature_cards.index.names == ["phase", "layer", "role"]
    assert result.feature_cards.index.get_level_values("phase").unique().tolist() == [1, 2, 3]
    assert set(result.timings) >= {"all", "roles"}
    verdicts = result.verdicts()
    assert len(verdicts) == len(CLAIMS) * len(result.subsets)
    assert all(v.verdict in VERDICTS and v.model == "tiny-flow" and v.claim in CLAIMS for v in verdicts)
    assert [v.scope for v in verdicts[:2]] == ["all", "correct"]
    row = result.readme_row()
    assert row["Flow (ch. 1)"] == "tiny-flow" and row["items"] == "all items"
    assert row["3-phase boundaries [95% CI]"] == three.boundaries_text()
    assert set(row) >= set(CLAIMS.values())


def test_every_layer_is_retrained_with_each_seed_and_the_feature_verdicts_read_them(result):
    """The seed table has the book SAEs' row and one per retrained seed for every analysed subset, and the
    late-emergence and roles verdicts list exactly those outcomes (and are inconclusive when they differ)."""
    seeds = result.seeds_table()
    book = CONFIG.saes.training.seed
    for s, part in result.analysed.items():
        rows = seeds.xs(("tiny-flow", SUBSETS[s]), level=["model", "items"])
        assert rows.index.tolist() == [book, *CONFIG.sae_seeds]
        for claim in ("late_emotion", "phase_roles"):  # the rules that read SAE features
            outcomes = rows[CLAIMS[claim]]
            verdict = part.verdicts[claim]
            listed = "; ".join(f"seed {k}: {v}" for k, v in outcomes.items())
            assert verdict.numbers["seed_verdicts"] == listed
            if outcomes.nunique() > 1:
                assert verdict.verdict == "inconclusive" and "seeds disagree" in verdict.reason
    assert {"SAE seed 1"} <= set(result.timings)


def test_each_seed_reports_how_much_of_every_layers_dictionary_it_learns_again(result):
    """Per seed and layer: the book SAE's active features (those the selectivity test could test), how many the
    seed learns again, never more than exist; the phase view pools the counts of the book cut's phases. (The tiny
    model's quick SAEs barely beat chance: matching itself is tested on planted dictionaries.)"""
    by_layer = result.seed_features_table(by_layer=True).loc["tiny-flow"]
    layers = result.subset("all").per_layer.index.tolist()
    assert sorted(by_layer.index.get_level_values("seed").unique()) == list(CONFIG.sae_seeds)
    for seed in CONFIG.sae_seeds:
        assert by_layer.loc[seed].index.tolist() == layers
    assert (by_layer["found again"].between(0, 1)).all()
    assert (
        by_layer["median best cosine"].between(-1, 1).all()
        and by_layer["random dictionary"].between(0, 1).all()
    )
    raw = result.seed_features.reset_index()
    assert (raw["found again"] <= raw["active features"]).all()
    assert (raw["same emotions"] <= raw["selective found again"]).all()
    assert (raw["selective found again"] <= raw["selective features"]).all()
    phases = result.seed_features_table().loc["tiny-flow"]
    assert phases.index.get_level_values("phase").unique().tolist() == [1, 2, 3]
    pooled = phases["active features"].groupby("seed").sum()
    assert pooled.to_dict() == raw.groupby("seed")["active features"].sum().to_dict()


def test_the_views_cover_every_subset(result):
    analysed = list(result.analysed)
    assert result.items_table().index.get_level_values("items").tolist() == [
        flow.SUBSETS[s] for s in result.subsets
    ]
    assert len(result.phase_table()) == len(analysed)
    assert len(result.test_table()) == len(analysed) * len(feasible_candidates(CONFIG.candidates, N_LAYERS))
    assert len(result.emergence_table()) == len(analysed)
    assert len(result.role_table()) == 3 * len(analysed)
    layers = result.layer_table("all")
    assert layers.index.tolist() == list(range(N_LAYERS)) and layers["CKA (control)"].iloc[0] == ""
    assert "[" in layers["probe, residual [95% CI]"].iloc[0]
    assert "The best three-phase cut on all items" in result.boundary_note()
    cards = result.cards_table()
    assert cards.index.equals(result.feature_cards.index) and not cards.isna().any().any()


def test_both_subsets_are_analysed(result):
    correct = result.subset("correct")
    n = result.facts["items"]
    assert n * 2 / 3 <= correct.n_items < n and correct.n_items == round(result.facts["model accuracy"] * n)
    assert correct.labels == result.labels and correct.left_out == {}
    assert result.items_table()["left out (label: correct items)"].tolist() == ["none", "none"]
    assert result.subset("correct").final_agreement < 1  # the planted answers are not the lens's
    assert [v.scope for v in result.verdicts()[:2]] == ["all", "correct"]


def test_a_subset_with_too_few_items_is_skipped_with_its_reason(result):
    reason = "fewer than two emotions have 4 or more correctly classified items"
    skipped = SkippedSubset(
        items="correctly classified items", reason=reason, n_items=5, labels=("joy",), left_out={"fear": 1}
    )
    partial = dataclasses.replace(result, subsets={"all": result.subsets["all"], "correct": skipped})
    assert [v.verdict for v in partial.verdicts() if v.scope == "correct"] == ["inconclusive"] * len(CLAIMS)
    assert all(v.reason == reason for v in partial.verdicts() if v.scope == "correct")
    assert partial.items_table()["left out (label: correct items)"].tolist() == ["none", "fear: 1"]
    assert len(partial.phase_table()) == 1 and len(partial.emergence_table()) == 1
    with pytest.raises(FlowError, match="no analysed subset 'correct'.*fewer than two"):
        partial.subset("correct")
    with pytest.raises(FlowError, match="no subset 'correct'"):
        partial.phases(subset="correct")
    assert_same(partial, FlowResult.from_json(json.loads(json.dumps(partial.to_json()))))
    assert partial.to_json()["subsets"]["correct"]["not_analysed"] == reason


def test_json_round_trip(result):
    again = FlowResult.from_json(json.loads(json.dumps(result.to_json())))
    assert_same(result, again)


def test_the_public_results_file_round_trips(result, environment):
    path = write_study_results(
        "flow",
        {result.model: result},
        preset="test",
        config=CONFIG.summary(),
        readme_rows=[result.readme_row()],
    )
    record = json.loads(path.read_text())
    assert record["config"]["n_shuffles"] == 3 and record["readme_rows"] == [result.readme_row()]
    assert (
        record["models"]["tiny-flow"]["subsets"]["all"]["per_layer"][0]["cka"] is None
    )  # NaN written as null
    assert_same(result, read_study_results("flow", FlowResult, preset="test")["tiny-flow"])


def test_the_earlier_results_layout_is_read(result):
    entry = json.loads(json.dumps(result.to_json()))
    for key in ("model", "facts", "sae_summary", "role_prompts", "timings_seconds"):
        del entry[key]
    for part in entry["subsets"].values():
        for key in (
            "items",
            "left_out",
            "boundary_frequency",
            "role_counts_per_layer",
            "role_counts_per_phase",
        ):
            part.pop(key, None)
        for row in part.get("per_layer", []):  # before the Holm-corrected test
            row.pop("selective_beyond_control")
        for key in ("final_agreement", "chance", "n_items", "labels"):
            if "not_analysed" in part or key in ("final_agreement", "chance"):
                part.pop(key, None)
        if "verdicts" in part:  # the earlier layout: verdict and reason only
            part["verdicts"] = {
                k: {"verdict": v["verdict"], "reason": v["reason"]} for k, v in part["verdicts"].items()
            }
    old = FlowResult.from_json(entry)
    assert old.phases() == result.phases() and old.final_phase() == result.final_phase()
    assert old.chosen_phase_count() == result.chosen_phase_count()
    assert old.subset("all").chance == result.subset("all").chance
    assert [v.verdict for v in old.verdicts()] == [v.verdict for v in result.verdicts()]
    assert old.readme_row() == {**result.readme_row(), "Flow (ch. 1)": ""}
    roles = old.role_table()  # without the role counts, which the earlier layout lacks
    assert len(roles) == 6 and not any(c.endswith(" features") for c in roles.columns)


def test_a_second_run_reuses_the_cache(result, lm, environment, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cached study should be reused")

    monkeypatch.setattr(flow, "_build", refuse)
    assert_same(result, run_flow(lm, CONFIG))
    with pytest.raises(AssertionError, match="should be reused"):
        run_flow(lm, dataclasses.replace(CONFIG, n_boot=CONFIG.n_boot + 1))  # another config: another entry


# ------------------------------------------------------------------------------------------------ config


def test_presets_and_config_checks():
    quick, full = PRESETS["quick"].flow, PRESETS["full"].flow
    assert (
        quick.n_shuffles,
        quick.n_boot,
        quick.probe.n_boot,
        quick.role_prompts,
        quick.selectivity.min_items,
    ) == (
        3,
        40,
        200,
        8,
        4,
    )
    assert (
        full.n_shuffles,
        full.n_boot,
        full.probe.n_boot,
        full.role_prompts,
        full.selectivity.min_items,
    ) == (
        None,
        200,
        1000,
        40,
        10,
    )
    assert full == flow.FlowConfig() and (quick.probe.C, quick.probe.max_iter) == (0.1, 3000)
    assert quick.with_overrides(n_boot=None, n_shuffles=7).n_shuffles == 7
    assert quick.summary()["candidates"] == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(FlowError, match="profile metrics"):
        flow.FlowConfig(profile_metrics=(("cka", "CKA"),))
    with pytest.raises(FlowError, match="subsets"):
        flow.FlowConfig(subsets=(("wrong", "wrong items"),))
    with pytest.raises(FlowError, match="three phases"):
        flow.FlowConfig(candidates=(1, 2))
    with pytest.raises(FlowError, match="match_cosine"):
        flow.FlowConfig(match_cosine=0.0)


# ------------------------------------------------------------------------------------------------ moved rules


def test_item_subsets_leave_out_emotions_with_too_few_correct_items():
    gold = np.array(["joy"] * 5 + ["fear"] * 5 + ["anger"] * 5)
    predicted = np.array(["joy"] * 5 + ["fear"] * 3 + ["joy"] * 2 + ["anger"] * 1 + ["joy"] * 4)
    aset = SimpleNamespace(
        n=15, labels=("joy", "fear", "anger"), gold=gold, correct=predicted == gold, predicted=predicted
    )
    idx, labels, dropped = item_subset(aset, "all", 3)
    assert idx.tolist() == list(range(15)) and labels == aset.labels and dropped == {}
    idx, labels, dropped = item_subset(aset, "correct", 3)
    assert labels == ("joy", "fear") and dropped == {"anger": 1}
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(FlowError, match="unknown item subset"):
        item_subset(aset, "wrong", 3)


def test_the_lens_is_above_chance_beyond_two_standard_errors():
    # n = 100 at chance 0.2: se = 0.04, so the bar is 0.28 (strictly above)
    chance = pd.Series([0.2, 0.2, 0.2, 0.5])
    accuracy = pd.Series([0.28, 0.2801, 0.9, 0.59])
    above = above_permutation_chance(accuracy, chance, 100)
    assert above.tolist() == [False, True, True, False]  # at 0.5: se 0.05, bar 0.6
    assert above_permutation_chance(np.array([0.25]), np.array([0.2]), 100, n_se=1.0).tolist() == [True]
    with pytest.raises(FlowError, match="n_items"):
        above_permutation_chance(accuracy, chance, 0)


def per_layer_table(**columns) -> pd.DataFrame:
    base = {
        "selective": [0, 0, 1, 4, 9, 12],
        "selective_beyond_control": [False, False, False, True, True, True],
        "probe_resid_low": [0.1, 0.3, 0.5, 0.6, 0.7, 0.8],
        "probe_resid_control_high": [0.3] * 6,
        "probe_sae_low": [0.1, 0.1, 0.1, 0.2, 0.5, 0.7],
        "probe_sae_control_high": [0.3] * 6,
        "lens_accuracy": [0.2, 0.2, 0.25, 0.29, 0.5, 0.9],
        "lens_chance": [0.2] * 6,
        "sae_misses": ["", "", "", "dead", "", ""],
    }
    return pd.DataFrame(base | columns, index=pd.Index(range(6), name="layer"))


def test_emergence_row_on_a_hand_made_profile():
    cut = PhaseCut(phases=((0, 1), (2, 3), (4, 5)), intervals=())
    row = emergence_row(per_layer_table(), cut, n_items=100)
    assert row == {
        "layers with features beyond control": 3,
        "first such layer (phase)": "3 (2)",
        "SAE misses there": "dead",
        "peak count (layer)": "12 (5)",
        "first layer, residual probe above control (phase)": "2 (2)",
        "first layer, SAE probe above control (phase)": "4 (3)",
        "first layer, lens above chance (phase)": "3 (2)",  # 0.29 > 0.2 + 2 x 0.04; 0.25 is not
        "first layer, top-10 AUROC beyond null (phase)": "not measured",  # a results file before version 4
        "first layer, text-token features beyond control (phase)": "not measured",
        "first layer, text-token top-10 AUROC beyond null (phase)": "not measured",
    }
    measured = per_layer_table(
        auroc_top_beyond_control=[False, True, True, True, True, True],
        text_selective_beyond_control=[True] * 6,
        text_auroc_top_beyond_control=[False] * 6,
    )
    row = emergence_row(measured, cut, n_items=100)
    assert row["first layer, top-10 AUROC beyond null (phase)"] == "1 (1)"
    assert row["first layer, text-token features beyond control (phase)"] == "0 (1)"
    assert row["first layer, text-token top-10 AUROC beyond null (phase)"] == "none"
    # the top AUROCs beyond their null at layer 1 make the features decodable there; the probe only from layer 4
    assert decodable_layers(measured).tolist() == [False, True, True, True, True, True]
    assert decodable_layers(per_layer_table()).tolist() == [False] * 4 + [True, True]
    never = emergence_row(
        per_layer_table(selective_beyond_control=[False] * 6, lens_chance=[0.9] * 6), cut, 100
    )
    assert never["first such layer (phase)"] == "none" and never["SAE misses there"] == ""
    assert never["first layer, lens above chance (phase)"] == "none"


def test_phase_cut_numbers_layers_and_formats_boundaries():
    cut = PhaseCut(
        phases=((0, 3), (4, 8), (9, 11)),
        intervals=(Estimate(4.0, 3.0, 6.0), Estimate(9.0, 8.0, 10.0)),
    )
    assert cut.boundaries == (4, 9)
    assert cut.phase_of(range(12)).tolist() == [1] * 4 + [2] * 5 + [3] * 3
    assert cut.boundaries_text() == "4 [3, 6], 9 [8, 10]"
    assert PhaseCut(phases=((0, 11),), intervals=()).boundaries_text() == "none"
    assert PhaseCut.from_json(cut.to_json()) == cut
    with pytest.raises(FlowError, match="contiguous"):
        PhaseCut(phases=((0, 3), (5, 8)), intervals=()).layers()


def test_verdicts_carry_their_rule_and_numbers():
    verdict = three_phase_verdict(2, False, 0.1)
    assert isinstance(verdict, Verdict) and verdict.verdict == "does not hold"
    assert verdict.rule == "three_phase_verdict" and verdict.numbers == {
        "chosen": 2,
        "at_largest": False,
        "share_three": 0.1,
        "three_beats_trend": None,
        "boundaries_move_without": "",
    }
    assert verdict.reason == "the test chooses 2 phase(s), not three (10% of item resamples choose three)"
    layers = pd.Index(range(6), name="layer")
    late = late_emergence_verdict(
        pd.Series([True, False, False, False, True, True], index=layers),
        pd.Series([6.0, 0, 0, 0, 2, 2], index=layers),
        pd.Series([1, 1, 2, 2, 3, 3], index=layers),
    )
    assert late.verdict == "does not hold" and late.rule == "late_emergence_verdict"
    assert late.numbers["first_layer"] == 0 and late.numbers[
        "share_of_excess_in_last_phase"
    ] == pytest.approx(0.4)
    assert late.reason == (
        "emotion-selective features beyond the control mostly before the last phase: first at layer 0 "
        "(phase 1 of 3); 40% of the excess in the last phase"
    )
    shares = pd.DataFrame(
        {"template": [0.1, 0.3, 0.6], "content": [0.6, 0.5, 0.3], "emotion": [0.4, 0.1, 0.0]}, index=[1, 2, 3]
    )
    roles = phase_roles_verdict(shares)
    assert roles.verdict == "does not hold" and roles.numbers["as_expected"] == 0
    assert roles.numbers["template_peak_phase"] == 3 and roles.rule == "phase_roles_verdict"


def test_the_final_phase_carries_its_first_layers_bootstrap_interval(result):
    from emolib.studies.features import FinalPhase

    phase = FinalPhase.from_flow(result, "tiny-flow")
    interval = result.subset("all").cut(3).intervals[-1]
    assert phase.first == result.final_phase()[0]
    assert phase.first_range == (int(interval.low), int(interval.high))
    assert interval.low <= phase.first <= interval.high


def test_the_phases_on_another_dataset_repeat_chapter_1s_on_the_same_items(result, lm, environment):
    """Chapter 5's phase analysis of another dataset is chapter 1's profile and cut: on chapter 1's own items it
    gives chapter 1's phase-count test and three-phase cut (without chapter 1's other measurements), cached."""
    with threadpool_limits(1):
        again = flow.dataset_phases(lm, "builtin", CONFIG)
    chapter1 = result.subset("all")
    assert again.cut == chapter1.cut(3)
    assert again.chosen == chapter1.chosen and again.n_items == chapter1.n_items
    pd.testing.assert_frame_equal(again.test, chapter1.test, check_dtype=False)
    back = flow.DatasetPhases.from_json(json.loads(json.dumps(again.to_json())))
    assert back.cut == again.cut and (back.chosen, back.labels, back.trend_r2) == (
        again.chosen,
        again.labels,
        again.trend_r2,
    )
    pd.testing.assert_frame_equal(back.test, again.test)
    with pytest.raises(FlowError, match="'isear' is not available here"):
        flow.dataset_phases(lm, "isear", CONFIG)
    with pytest.MonkeyPatch.context() as patch:  # a second call reads the cache
        patch.setattr(flow, "_dataset_phases", lambda *args: pytest.fail("recomputed a cached analysis"))
        assert flow.dataset_phases(lm, "builtin", CONFIG).cut == again.cut


def test_phases_reappear_rule_with_its_failing_cases():
    def cut(*boundaries):  # three phases of twelve layers, boundaries as (value, low, high)
        (a, *_), (b, *_) = boundaries
        return PhaseCut(
            phases=((0, a - 1), (a, b - 1), (b, 11)), intervals=tuple(Estimate(*e) for e in boundaries)
        )

    isear = cut((4, 3, 5), (9, 8, 10))
    rule = flow.phases_reappear_verdict
    assert rule(isear, cut((5, 4, 6), (9, 9, 10)), "isear", "carer").verdict == "holds"
    partly = rule(isear, cut((4, 4, 4), (6, 5, 7)), "isear", "carer")
    assert partly.verdict == "partly" and partly.numbers["agree"] == 1 and partly.numbers["differ"] == 1
    assert rule(isear, cut((7, 6, 8), (11, 11, 11)), "isear", "carer").verdict == "does not hold"
    unclear = rule(isear, cut((6, 5, 7), (11, 10, 11)), "isear", "carer")  # overlapping, outside each other
    assert unclear.verdict == "inconclusive" and unclear.numbers["differ"] == 0
    # inside each other's intervals, but one of them spans half the layers: it locates no boundary
    wide = rule(isear, cut((4, 1, 7), (9, 8, 10)), "isear", "carer")
    assert wide.verdict == "partly" and wide.numbers["max_interval_width"] == 3
    with pytest.raises(FlowError, match="over 12 and 9 layers"):
        rule(isear, PhaseCut(phases=((0, 2), (3, 5), (6, 8)), intervals=isear.intervals), "isear", "carer")
    with pytest.raises(FlowError, match="cannot be compared"):
        rule(isear, PhaseCut(phases=((0, 5), (6, 11)), intervals=(Estimate(6, 5, 7),)), "isear", "carer")
