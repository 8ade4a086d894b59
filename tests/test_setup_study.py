"""The baselines study (chapter 0) and the SAE appendix's report on a tiny model: quick runs, JSON round trips,
cache reuse, and the chapter's summary lines computed from the result."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
from conftest import tiny_loaded

from emolib.lm.baselines import BaselineConfig
from emolib.lm.classify import ClassifierConfig, EmotionClassifier
from emolib.lm.models import BOOK_MODELS, MODELS
from emolib.pipeline.book import PRESETS as BOOK_PRESETS
from emolib.sae.suite import SuiteConfig
from emolib.studies import setup as setup_study
from emolib.studies.base import combined, plain, write_study_results
from emolib.studies.features import FeaturesConfig
from emolib.studies.flow import FlowConfig
from emolib.studies.items import AnalysisConfig
from emolib.studies.presets import PRESETS, QUICK_MODELS, get_preset
from emolib.studies.saes import SAEReport, cost_table, run_saes
from emolib.studies.setup import SetupConfig, dataset_items, dataset_overview, run_setup
from emolib.studies.tracing import TracingConfig

#: The quick preset's setup study, on the built-in dataset.
QUICK_SETUP = dataclasses.replace(get_preset("quick").setup, datasets=("builtin",))
#: A smaller run for the tests that only need some result.
TINY_SETUP = SetupConfig(
    preset="test",
    baseline=BaselineConfig(
        n_per_label=2,
        order_seeds=(1,),
        n_boot=50,
        classifier=ClassifierConfig(max_new_tokens=2, progress=False),
    ),
    datasets=("builtin",),
)


@pytest.fixture
def builtin_only(monkeypatch):
    monkeypatch.delenv("EMOLIB_DATA_DIR", raising=False)


@pytest.fixture
def tiny_lm(tiny_model, tiny_tokenizer):
    return tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-setup", chat=True)


def round_trip(result):
    return type(result).from_json(json.loads(json.dumps(plain(result.to_json()))))


def test_setup_study_in_its_quick_preset_round_trips_through_json(tiny_lm, tmp_cache, builtin_only):
    result = run_setup(tiny_lm, QUICK_SETUP)
    again = round_trip(result)
    assert plain(again.to_json()) == plain(result.to_json())
    pd.testing.assert_frame_equal(again.baselines, result.baselines)
    pd.testing.assert_frame_equal(again.label_order, result.label_order)
    pd.testing.assert_frame_equal(again.confusions["builtin"], result.confusions["builtin"])
    assert (
        list(result.baselines["dataset"]) == ["builtin"] and result.baselines["n"].iloc[0] == 10 * 7
    )  # 15 asked, 10 per label in its test split
    assert list(result.label_order["order_seed"]) == ["listed order", 1]
    assert result.facts["model"] == "tiny-setup" and result.facts["kind"] == "chat"
    assert result.example_prompt.startswith("<|bos|>")
    rows = result.readme_rows()
    assert rows[0]["model"] == "tiny-setup" and rows[0]["accuracy [95% CI]"].count("[") == 1


def test_setup_study_is_cached_and_its_summary_reads_the_result(
    tiny_lm, tmp_cache, builtin_only, monkeypatch
):
    first = run_setup(tiny_lm, TINY_SETUP)
    monkeypatch.setattr(EmotionClassifier, "predict", lambda self, texts, *_: pytest.fail("predicted again"))
    monkeypatch.setattr(setup_study, "_run", lambda *args: pytest.fail("the study ran again"))
    again = run_setup(tiny_lm, TINY_SETUP)
    assert again.to_json() == first.to_json()
    lines = first.findings("builtin")
    accuracy = first.baselines["accuracy"].iloc[0]
    assert f"with accuracy {accuracy:.3f} [" in lines[0]
    assert lines[1].startswith("  Removing the label prior") and "Emotions recognised on builtin" in lines[2]
    assert "Shuffling the label list" in lines[-1] and "on builtin" in lines[-1]
    text = setup_study.setup_findings({"tiny-setup": first}, TINY_SETUP)
    assert "Preset `test`" in text, "a run that is not the full preset says it is not evidence"


def test_another_item_sample_is_another_result(tiny_lm, tmp_cache, builtin_only):
    first = run_setup(tiny_lm, TINY_SETUP)
    more = dataclasses.replace(TINY_SETUP, baseline=dataclasses.replace(TINY_SETUP.baseline, n_per_label=3))
    assert run_setup(tiny_lm, more).baselines["n"].iloc[0] == 21 != first.baselines["n"].iloc[0]


def test_dataset_overview_counts_every_split(builtin_only):
    overview = dataset_overview(dataset_items(TINY_SETUP), TINY_SETUP)
    assert (
        overview.loc["builtin", "rows kept"] == overview.loc["builtin", ["train", "dev", "test"]].sum() == 350
    )
    assert overview.loc["builtin", "evaluated (test sample)"] == 14


def test_sae_report_in_its_quick_preset_round_trips_and_reads_the_suite(tiny_lm, tmp_cache, builtin_only):
    report = run_saes(tiny_lm, get_preset("quick").saes)
    again = round_trip(report)
    assert plain(again.to_json()) == plain(report.to_json())
    pd.testing.assert_frame_equal(again.quality, report.quality)
    assert again.quality.attrs == report.quality.attrs
    quick = get_preset("quick").suite
    assert (
        report.k == quick.training.k
        and report.d_sae == quick.training.expansion_factor * tiny_lm.info.d_model
    )
    assert report.range_row()["layers"] == tiny_lm.info.n_layers
    assert list(report.layer_table().index.get_level_values("layer")) == list(range(tiny_lm.info.n_layers))
    cost = cost_table({"tiny": report})
    assert cost.loc["tiny", "total"] == pytest.approx(sum(report.timings.values()) / 60)
    assert isinstance(SAEReport.from_json(report.to_json()), SAEReport)


def test_the_presets_registry_holds_every_study():
    for name, preset in PRESETS.items():
        assert get_preset(name) is preset and preset.name == name
        assert preset.setup.preset == preset.saes.preset == name
        for study in (preset.flow, preset.features, preset.tracing):
            # every analysis study of a preset reads the same items and SAEs, cached under the preset's name
            assert study.preset == name and study.items == preset.items and study.saes == preset.suite
        assert (
            preset.generalisation.flow == preset.flow
        )  # chapter 5 cuts other datasets as chapter 1 cuts ISEAR
    # the study configs' defaults are the full preset, so a config built by hand is the book's
    full = get_preset("full")
    assert (full.flow, full.features, full.tracing) == (FlowConfig(), FeaturesConfig(), TracingConfig())
    assert full.suite == SuiteConfig() and full.items == AnalysisConfig()
    assert set(PRESETS) == set(BOOK_PRESETS)
    # a chapter's models: its parameter, else the preset's (quick: the two smallest), else the book's
    assert full.model_names() == list(BOOK_MODELS) and full.model_names(["m"]) == ["m"]
    assert get_preset("quick").model_names() == list(QUICK_MODELS) and set(QUICK_MODELS) <= set(MODELS)
    assert (
        get_preset("quick").suite.training.total_training_samples
        < get_preset("full").suite.training.total_training_samples
    )


def test_every_public_name_resolves():
    import emolib

    for name in emolib.__all__:
        assert getattr(emolib, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'run_everything'"):
        emolib.run_everything  # noqa: B018


class _Tables:
    """A result with one table attribute and one table method, as the studies' results have."""

    def __init__(self, rows: int) -> None:
        self.table = pd.DataFrame({"x": range(rows)})

    def doubled(self) -> pd.DataFrame:
        return self.table * 2


def test_combined_stacks_every_models_view_in_order():
    results = {"b": _Tables(2), "a": _Tables(1)}
    stacked = combined(results, "table", ignore_index=True)
    assert stacked["x"].tolist() == [0, 1, 0] and list(stacked.index) == [0, 1, 2]
    by_model = combined(results, "doubled", by_model=True)
    assert by_model.index.names == ["model", None] and by_model.loc["b", "x"].tolist() == [0, 2]
    assert combined(results, lambda r: r.table.head(1))["x"].tolist() == [0, 0]


def test_a_run_without_checks_has_no_order_or_scoring_rows_and_still_summarises(
    tiny_lm, tmp_cache, builtin_only
):
    """The scale reference's form: restricted scoring only, no generation and no checks."""
    reference = dataclasses.replace(
        TINY_SETUP,
        checks=False,
        baseline=dataclasses.replace(
            TINY_SETUP.baseline, order_seeds=(), classifier=ClassifierConfig(generate=False, progress=False)
        ),
    )
    result = run_setup(tiny_lm, reference)
    assert result.label_order.empty and result.scoring == {}
    assert result.agreements == {"builtin": None} and "parsed" not in result.baselines
    lines = result.findings("builtin")
    assert len(lines) == 3 and "with accuracy" in lines[0]  # no generation or shuffling line to make up
    assert "calibration" in lines[1] and "recognised" in lines[2]
    again = round_trip(result)
    assert plain(again.to_json()) == plain(result.to_json())
    table = setup_study.scale_reference_table({"tiny-setup": result})
    row = table.loc[("tiny-setup", "builtin")]
    assert row["n"] == 14 and row["accuracy [95% CI]"].startswith(
        f"{result.baselines['accuracy'].iloc[0]:.3f} ["
    )
    assert result.readme_rows("00 scale reference")[0]["chapter"] == "00 scale reference"


def test_scale_reference_findings_compare_with_the_best_book_model(tiny_lm, tmp_cache, builtin_only):
    result = run_setup(tiny_lm, TINY_SETUP)
    book = dataclasses.replace(result, model="book", baselines=result.baselines.assign(model="book"))
    weaker = result.baselines.assign(model="weak", macro_f1=0.0, macro_f1_low=0.0, macro_f1_high=0.0)
    strong = result.baselines.assign(model="big", macro_f1=0.9, macro_f1_low=0.85, macro_f1_high=0.95)
    results = {
        "book": book,
        "weak": dataclasses.replace(result, model="weak", baselines=weaker),
        "big": dataclasses.replace(result, model="big", baselines=strong),
    }
    (line,) = setup_study.scale_reference_findings(results, ["big"])
    f1 = result.baselines["macro_f1"].iloc[0]
    assert "**big** reaches macro-F1 0.900 [0.850, 0.950] on 14 builtin items" in line
    assert f"against {f1:.3f} [" in line and "(book)" in line
    assert line.endswith("do not overlap.") == (result.baselines["macro_f1_high"].iloc[0] < 0.85)
    overlapping = {**results, "big": dataclasses.replace(result, model="big")}
    assert setup_study.scale_reference_findings(overlapping, ["big"])[0].endswith("the intervals overlap.")


def test_the_scale_reference_runs_in_the_full_preset_on_a_subset_of_the_books_items():
    full, quick = get_preset("full"), get_preset("quick")
    assert quick.scale_reference is None
    reference = full.scale_reference
    assert reference.dataset_names() == ["isear"] and not reference.checks
    assert not reference.baseline.classifier.generate and reference.baseline.order_seeds == ()
    # the same split and seed with fewer per label: the first items of the book's own sample
    assert (reference.baseline.split, reference.baseline.sample_seed) == (
        full.setup.baseline.split,
        full.setup.baseline.sample_seed,
    )
    assert reference.baseline.n_per_label < full.setup.baseline.n_per_label


def test_setup_calibrates_every_dataset_without_labels(tiny_lm, tmp_cache, builtin_only):
    """Zero-shot, contextual and batch rows per dataset; their changes are paired with zero-shot on the same items."""
    result = run_setup(tiny_lm, TINY_SETUP)
    methods = result.calibration["builtin"]
    assert list(methods) == ["zero-shot", "contextual", "batch"]
    assert methods["zero-shot"]["summary"] == result.summaries["builtin"]["summary"]
    assert methods["zero-shot"]["delta_macro_f1"] is None and methods["zero-shot"]["prior"] is None
    for method in ("contextual", "batch"):
        c = methods[method]
        change = c["summary"]["macro_f1"]["value"] - methods["zero-shot"]["summary"]["macro_f1"]["value"]
        assert c["delta_macro_f1"]["value"] == pytest.approx(change)
        assert c["delta_macro_f1"]["low"] <= c["delta_macro_f1"]["value"] <= c["delta_macro_f1"]["high"]
        assert sum(c["prior"].values()) == pytest.approx(1) and len(c["recognition"]) == 7
    table = result.calibration_rows()
    assert list(table["method"]) == ["zero-shot", "contextual", "batch"]
    assert table["recognised"].str.endswith("of 7").all()
    recognition = result.recognition_rows()
    assert (
        len(recognition) == 3 * 7
        and recognition["share"].groupby(recognition["method"]).sum().round(6).eq(1).all()
    )
    row = result.readme_rows()[0]
    assert row["macro-F1, contextual calibration"].count("[") == 1 and row["recognised (zero-shot)"].endswith(
        "of 7"
    )


def test_later_chapters_say_how_many_of_their_emotions_the_model_recognises(
    tiny_lm, tmp_cache, builtin_only, tmp_path, monkeypatch
):
    """Each model's verdict notes count the recognised emotions from chapter 0's results file; a model or file
    chapter 0 did not produce is said to be unknown, never left out."""
    monkeypatch.setenv("EMOLIB_BUILD_DIR", str(tmp_path / "build"))
    missing = setup_study.recognition_notes(["tiny"], "builtin", preset="quick")
    assert list(missing) == ["tiny"] and "unknown" in missing["tiny"][0]
    result = run_setup(tiny_lm, TINY_SETUP)
    write_study_results("00_setup", {"tiny": result}, preset="quick", config={})
    notes = setup_study.recognition_notes(["tiny", "other"], "builtin", preset="quick")
    recognised = result.recognised("builtin")
    assert (
        f"recognises {len(recognised)} of them" in notes["tiny"][0]
        and "7 emotions of builtin" in notes["tiny"][0]
    )
    for label in result.summaries["builtin"]["summary"]["labels"]:
        assert label in notes["tiny"][0]  # named as recognised or as not
    assert "unknown" in notes["other"][0]
    assert "unknown" in setup_study.recognition_notes(["tiny"], "isear", preset="quick")["tiny"][0]
    assert "unknown" in setup_study.recognition_notes(["tiny"], "builtin", preset="full")["tiny"][0]
