"""Tests for label-blind steering (emolib.methods.steering) and the steering chapter's study
(emolib.studies.steering): plans and their hooks, the scorer's skipped blocks against full forwards and the
classifier, the baselines' arithmetic, paired draw-and-item bootstraps, Holm, the verdict rule (including cases where
it must fail), and the quick study on a tiny model, whose test predictions must not move when test labels are
permuted."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_loaded
from matplotlib import pyplot as plt
from test_sae_suite import TINY_SUITE
from test_tracing import LABELS, TEXTS, F, planted  # noqa: F401 (the fixture)

from emolib import plots
from emolib.lm import baselines
from emolib.methods.steering import (
    SteeredScorer,
    SteeringError,
    SteeringPlan,
    bootstrap_p,
    diffmean_subspace,
    draw_bootstrap,
    fit_label_bias,
    holm,
    subspace_hook,
)
from emolib.studies import steering
from emolib.studies.presets import PRESETS
from emolib.studies.steering import SteeringResult, SteeringRule, steering_verdict

matplotlib.use("Agg")

TINY_LABELS = ("anger", "fear", "joy")


def gain_plan(strength: float, features=(F,), layer: int = 1, variant: str = "gain") -> SteeringPlan:
    return SteeringPlan(
        model="tiny",
        method="causal",
        variant=variant,
        strength=strength,
        sae_source="suite-a",
        features={layer: tuple(features)},
        typical={layer: tuple(1.0 for _ in features)},
    )


def by_layer(saes: dict) -> dict:
    return {int(hook.split(".")[1]): sae for hook, sae in saes.items()}


# ------------------------------------------------------------------------------------------------ the scorer


@pytest.mark.parametrize("variant", ["gain", "clamp", "add"])
def test_skipping_clean_blocks_equals_running_every_block_and_the_classifier(planted, variant):  # noqa: F811
    classifier, saes = planted
    saes = by_layer(saes)
    plan = gain_plan(2.0, features=(F, 1, 2), variant=variant)
    fast = SteeredScorer(classifier, TEXTS, from_block=1, batch_size=3)
    full = SteeredScorer(classifier, TEXTS, resume=False, batch_size=4)
    steered = fast.plan_scores(plan, saes)
    np.testing.assert_allclose(steered, full.plan_scores(plan, saes), atol=1e-4)
    with classifier.model.hooks(fwd_hooks=plan.hooks(saes)):  # the classifier's own path, hooks everywhere
        reference = classifier.predict(TEXTS).label_logprobs
    np.testing.assert_allclose(steered, reference, atol=1e-4)
    np.testing.assert_allclose(fast.clean(), classifier.predict(TEXTS).label_logprobs, atol=1e-4)
    assert not np.allclose(steered, fast.clean(), atol=1e-3)  # the plan does something
    np.testing.assert_allclose(fast.plan_scores(plan.with_strength(0.0), saes), fast.clean())


def test_gain_on_the_planted_feature_pushes_towards_its_label(planted):  # noqa: F811
    classifier, saes = planted
    scorer = SteeredScorer(classifier, TEXTS, from_block=1)
    joy = LABELS.index("joy")
    clean = scorer.clean()
    up = scorer.plan_scores(gain_plan(1.0), by_layer(saes))
    down = scorer.plan_scores(gain_plan(-1.0), by_layer(saes))  # alpha = -1 is zero-ablation
    gap = lambda s: s[:, joy] - np.delete(s, joy, axis=1).mean(1)  # noqa: E731
    assert (gap(up) > gap(clean)).all() and (gap(down) < gap(clean)).all()


def test_a_plan_starting_before_the_kept_blocks_is_refused(planted):  # noqa: F811
    classifier, saes = planted
    scorer = SteeredScorer(classifier, TEXTS[:3], from_block=1)
    with pytest.raises(SteeringError, match="kept blocks from 1"):
        scorer.plan_scores(gain_plan(1.0, features=(0,), layer=0), by_layer(saes))


def test_residual_is_the_clean_last_position_residual(planted):  # noqa: F811
    classifier, _ = planted
    scorer = SteeredScorer(classifier, TEXTS[:4], resume=False)
    store = {}
    for i, text in enumerate(TEXTS[:4]):
        tokens = torch.tensor([classifier.prefix_ids + classifier_suffix(classifier, text)])
        _, cache = classifier.model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        store[i] = cache["blocks.0.hook_resid_post"][0, -1].numpy()
    np.testing.assert_allclose(scorer.residual(0), np.stack(list(store.values())), atol=1e-4)


def classifier_suffix(classifier, text: str) -> list[int]:
    from emolib.lm.prompts import encode_suffix

    return encode_suffix(classifier.tokenizer, classifier.parts, text, classifier.config.max_text_tokens)[0]


# ------------------------------------------------------------------------------------------------ plans


def test_plans_round_trip_as_json_and_refuse_what_does_not_fit(planted, tmp_path):  # noqa: F811
    _, saes = planted
    saes = by_layer(saes)
    plan = gain_plan(1.5, features=(3, F))
    path = plan.save(tmp_path / "plan.json")
    assert SteeringPlan.load(path) == plan
    plan.check("tiny", 32, saes, "suite-a")
    with pytest.raises(SteeringError, match="made for model 'tiny', not 'other'"):
        plan.check("other", 32, saes, "suite-a")
    with pytest.raises(SteeringError, match="index the SAEs 'suite-a'"):
        plan.check("tiny", 32, saes, "suite-b")
    with pytest.raises(SteeringError, match=r"layers \[1\], which have no SAE"):
        plan.check("tiny", 32, {0: saes[0]}, "suite-a")
    with pytest.raises(SteeringError, match="out of range"):
        gain_plan(1.0, features=(99,)).check("tiny", 32, saes, "suite-a")
    with pytest.raises(SteeringError, match="no steering plan at"):
        SteeringPlan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SteeringError, match="bad.json is not JSON"):
        SteeringPlan.load(tmp_path / "bad.json")
    payload = plan.to_json()
    del payload["strength"]
    (tmp_path / "partial.json").write_text(json.dumps(payload))
    with pytest.raises(SteeringError, match="partial.json lacks the key 'strength'"):
        SteeringPlan.load(tmp_path / "partial.json")
    with pytest.raises(SteeringError, match="variant must be"):
        gain_plan(1.0, variant="boost")
    with pytest.raises(SteeringError, match="needs a layer, a basis"):
        SteeringPlan(model="tiny", method="diffmean", variant="subspace", strength=1.0)


def test_diffmean_subspace_spans_the_class_mean_differences():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 16)) * 5
    gold = ["a", "b", "c"] * 20
    resid = np.stack([means["abc".index(g)] for g in gold]) + rng.normal(size=(60, 16)) * 0.1
    basis, center = diffmean_subspace(resid, gold, ["a", "b", "c", "d"])
    assert basis.shape == (
        2,
        16,
    )  # three class means minus their mean span two dimensions; "d" has no examples
    np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-8)
    np.testing.assert_allclose(center, resid.mean(0))
    difference = resid[gold.index("a")] - center
    assert np.linalg.norm(basis @ difference) > 0.99 * np.linalg.norm(difference)
    # alpha = -1 removes the component in the subspace; alpha = 0 changes nothing
    x = torch.tensor(resid[None, :5], dtype=torch.float32)
    removed = subspace_hook(basis, center, -1.0)(x, None)
    assert torch.allclose(
        (removed - torch.tensor(center, dtype=torch.float32)) @ torch.tensor(basis, dtype=torch.float32).T,
        torch.zeros(1, 5, 2),
        atol=1e-4,
    )
    assert torch.equal(subspace_hook(basis, center, 0.0)(x, None), x)


def test_bias_correction_recovers_a_planted_label_prior():
    rng = np.random.default_rng(0)
    labels = ("a", "b", "c")
    truth = rng.integers(0, 3, size=3000)
    evidence = np.eye(3)[truth] * 2.0 + rng.normal(size=(3000, 3))
    prior = np.array([1.5, -0.5, -1.0])
    fitted = fit_label_bias(evidence + prior, [labels[t] for t in truth], labels, l2=1e-6)
    np.testing.assert_allclose(fitted, -(prior - prior.mean()), atol=0.15)
    with pytest.raises(SteeringError, match="not among"):
        fit_label_bias(evidence[:2], ["a", "z"], labels)


# ------------------------------------------------------------------------------------------------ statistics


def test_draw_bootstrap_pairs_methods_and_knows_perfect_and_constant_answers():
    gold = [0, 1, 2] * 20  # every resample holds every class (a class absent from a resample scores F1 0)
    perfect = np.array([gold, gold])
    constant = np.zeros((1, len(gold)), dtype=int)
    values = draw_bootstrap(gold, {"perfect": perfect, "constant": constant}, [0, 1, 2], n_boot=200)
    assert np.allclose(values["perfect"], 1.0)
    # a constant answer: F1 of the one class answered, 0 for the others; its mean F1 is below a half
    assert (values["constant"] < 0.5).all() and (values["constant"] > 0).all()
    accuracy = draw_bootstrap(gold, {"perfect": perfect}, [0, 1, 2], "accuracy", n_boot=50)
    assert np.allclose(accuracy["perfect"], 1.0)
    again = draw_bootstrap(gold, {"constant": constant}, [0, 1, 2], n_boot=200)
    np.testing.assert_array_equal(again["constant"], values["constant"])  # seeded
    assert bootstrap_p(values["perfect"] - values["constant"]) == pytest.approx(1 / 201)
    assert bootstrap_p(values["constant"] - values["perfect"]) == 1.0
    with pytest.raises(SteeringError, match="metric"):
        draw_bootstrap(gold, {"perfect": perfect}, [0, 1, 2], "auc")


def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"only": 0.2}) == {"only": 0.2} and holm({"x": 0.6, "y": 0.7})["y"] == 1.0


# ------------------------------------------------------------------------------------------------ verdicts


def verdict_result(ppl: float = 0.0, flags: dict | None = None) -> SteeringResult:
    runs = pd.DataFrame([{"method": "causal", "n": 5, "draw": 0, "test_ppl_change": ppl}])
    empty = pd.DataFrame()
    return SteeringResult(
        model="m", labels=("a", "b"), test_gold=["a"], rule=SteeringRule(n=5), facts={}, runs=runs,
        predictions=empty, summary=empty, versus=empty, recall=empty, shares=empty, tradeoff=empty,
        generation=empty, plan={}, sae_flags=flags or {}, meta={},
    )  # fmt: skip


def test_the_verdict_holds_only_when_every_baseline_is_beaten_within_the_tolerance():
    every = {v: 0.001 for v in ("zero-shot", *steering.REQUIRED_BASELINES)}
    assert steering_verdict(verdict_result(), every, 0.02).verdict == "holds"
    # a baseline that was not run counts as not beaten
    missing = {**every, "n-shot": None}
    verdict = steering_verdict(verdict_result(), missing, 0.02)
    assert verdict.verdict == "partly" and "not run, counted as not beaten: n-shot" in verdict.reason
    # one baseline not beaten after Holm
    assert steering_verdict(verdict_result(), {**every, "bias": 0.2}, 0.02).verdict == "partly"
    # beaten everything, but the language model pays more than the tolerance
    assert steering_verdict(verdict_result(ppl=0.05), every, 0.02).verdict == "partly"
    # no gain over zero-shot: fails
    failing = {**every, "zero-shot": 0.3}
    assert steering_verdict(verdict_result(), failing, 0.02).verdict == "does not hold"
    # read through SAEs that miss their goals: inconclusive
    flagged = verdict_result(flags={10: "fve", 11: "dead"})
    assert steering_verdict(flagged, every, 0.02).verdict == "inconclusive"


def test_the_variant_is_chosen_at_the_verdicts_n_and_kept_at_the_others():
    config = steering.SteeringConfig(
        n_examples=(1, 3), ks=(2,), strengths=(0.5,), variants=("gain", "add"), rule=SteeringRule(n=3)
    )
    dev_score = {"gain": 0.2, "add": 0.4}
    asked = []

    class Plan:
        def __init__(self, variant):
            self.variant = variant

        def with_strength(self, strength):
            return self

        def hooks(self, saes):
            return []

    def candidates(method, rows, draw, n, variants=None):
        asked.append((n, variants))
        return [(v, 2, Plan(v)) for v in variants or config.variants]

    study = object.__new__(steering._Study)  # only what `choose` reads
    study.config, study.variant_for, study.dev_clean, study.saes = config, {}, 0.1, {}
    study.items = SimpleNamespace(draws={0: {1: [0], 3: [0]}})
    study.candidates, study._tradeoff = candidates, lambda *args: None
    study.dev = SimpleNamespace(plan_scores=lambda plan, saes: plan.variant)
    study.dev_f1 = dev_score.get
    study.lm_dev = SimpleNamespace(ppl_change=lambda hooks: 0.0)
    assert study.choose("causal", 3)[0] == "add"
    assert study.choose("causal", 1)[0] == "add"
    assert asked == [(3, None), (1, ("add",))]
    # nothing beats the model at the verdict's n: the best dev variant is kept all the same
    study.variant_for, study.dev_clean = {}, 0.9
    assert study.choose("random", 3) is None and study.variant_for["random"] == "add"
    # without a choice at the verdict's n (another order), every variant is tried
    study.variant_for, study.dev_clean, asked[:] = {}, 0.1, []
    study.choose("selective", 1)
    assert asked == [(1, None)]


# ------------------------------------------------------------------------------------------------ the study


@pytest.fixture
def tiny_steering(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    """(model, config) of the quick preset on the tiny model and the built-in items restricted to three labels."""
    monkeypatch.delenv("EMOLIB_DATA_DIR", raising=False)
    monkeypatch.setattr(baselines, "run_labels", lambda dataset, label_set: TINY_LABELS)
    lm = tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-steering", chat=True)
    quick = PRESETS["quick"].steering
    config = dataclasses.replace(
        quick,
        preset="test",
        items=dataclasses.replace(quick.items, dataset="builtin"),
        saes=TINY_SUITE,
        n_phases=2,
        progress=False,
    )
    return lm, config


def test_the_quick_study_runs_and_its_test_predictions_never_see_test_labels(
    tiny_steering, monkeypatch, tmp_path
):
    lm, config = tiny_steering
    phases = {"early": [0], "late": [1]}
    result = steering.run_steering(lm, config, phases)
    skipped = result.facts["n-shot not run"] != "-"
    prompting = set() if skipped else {"n-shot"}
    assert set(result.summary["method"]) == set(steering.READOUTS) | set(steering.INTERVENTIONS) | prompting
    assert set(result.runs["n"]) == {0, *config.n_examples}
    for method in steering.INTERVENTIONS:
        rows = result.runs[result.runs["method"] == method]
        assert len(rows) == len(config.n_examples) * config.n_draws
        assert set(rows["strength"]) <= {0.0, *config.strengths}
    icl = result.runs[result.runs["method"] == "n-shot"]
    assert set(icl["n"]) == (set() if skipped else set(config.icl_ns)) and (
        skipped or len(icl) == config.n_draws
    )
    others = len(steering.READOUTS) + len(steering.INTERVENTIONS) - 1
    assert len(result.versus) == len(config.n_examples) * others + (0 if skipped else 1)
    assert result.facts["test items"] == 4 * len(TINY_LABELS)
    assert result.facts["items of chapters 1-3 excluded"] == 2 * 6 * len(TINY_LABELS)
    again = SteeringResult.from_json(json.loads(json.dumps(result.to_json())))
    pd.testing.assert_frame_equal(again.summary, result.summary)
    assert len(result.at()) == len(steering.READOUTS) + len(steering.INTERVENTIONS)

    # the chapter's tables, verdicts, plan files and figures
    results = {"a": result, "b": again}
    verdicts = steering.steering_verdicts(results, config.ppl_tolerance)
    assert set(verdicts) == {"a", "b"} and all(v.claim == "steering_helps" for v in verdicts.values())
    at_rule = not skipped and config.rule.n in config.icl_ns  # n-shot prompting at the verdict's n
    assert ("not run, counted as not beaten: n-shot" in verdicts["a"].reason) == (not at_rule)
    assert len(steering.versus_table(results, verdicts)) == 2 * (others + at_rule)
    for view in (steering.at_table, steering.recall_table, steering.generation_table, steering.timings_table):
        assert len(view(results))
    assert len(steering.settings_table(config)) and len(steering.facts_table(results).columns) == 2
    row = steering.readme_row(result, verdicts["a"])
    assert row[steering.CLAIM] == verdicts["a"].verdict and row["n per emotion"] == 3
    if result.plan:  # dev may prefer the model itself at every strength on so few items
        paths = steering.write_plans({"a": result}, tmp_path / "plans")
        assert SteeringPlan.load(paths[0]) == result.plan_object()
    # every method the study can report draws, also one the tiny model's context leaves out (n-shot) and one
    # the figures do not know
    extra = result.summary[result.summary["method"] == "bias"]
    summary = pd.concat([result.summary, extra.assign(method="n-shot"), extra.assign(method="new")])
    shares = pd.concat(
        [result.shares, result.shares[result.shares["method"] == "bias"].assign(method="n-shot")]
    )
    assert set(steering.METHODS) <= set(plots.steering.METHOD_STYLES)
    figures = [
        plots.data_efficiency({"a": summary, "b": result.summary}),
        plots.label_shares({"a": shares}),
        plots.strength_tradeoff({m: r.tradeoff for m, r in results.items()}, 0.02),
        plots.label_shares({m: r.shares for m, r in results.items()}),
    ]
    for figure in figures:
        figure.canvas.draw()
        plt.close(figure)

    # permuting the test items' labels changes no prediction (only the scores computed from them)
    original = steering.study_items

    def permuted(cfg):
        items = original(cfg)
        gold = list(np.random.default_rng(1).permutation(items.test.gold))
        return dataclasses.replace(items, test=dataclasses.replace(items.test, gold=gold))

    monkeypatch.setattr(steering, "study_items", permuted)
    shuffled = steering.steering_study(lm, config, [1])
    pd.testing.assert_frame_equal(
        shuffled.predictions.sort_values(["method", "n", "draw"], ignore_index=True),
        result.predictions.sort_values(["method", "n", "draw"], ignore_index=True),
    )
    assert shuffled.test_gold != result.test_gold


# ------------------------------------------------------------------------------------------------ emolib classify


def test_read_texts_names_the_file_the_column_and_the_empty_rows(tmp_path):
    from emolib.pipeline.classify import ClassifyError, read_texts

    (tmp_path / "a.csv").write_text("id,body\n1,I won\n2,  \n")
    with pytest.raises(ClassifyError, match=r"a.csv has no column 'text' \(columns: id, body\)"):
        read_texts(tmp_path / "a.csv")
    with pytest.raises(ClassifyError, match=r"rows \[2\]"):
        read_texts(tmp_path / "a.csv", "body")
    (tmp_path / "b.jsonl").write_text('{"text": "The cake was wonderful."}\n{"text": "I lost my keys."}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["The cake was wonderful.", "I lost my keys."]
    with pytest.raises(ClassifyError, match="no input file"):
        read_texts(tmp_path / "missing.csv")
    (tmp_path / "c.txt").write_text("text\n")
    with pytest.raises(ClassifyError, match="read .csv or .jsonl"):
        read_texts(tmp_path / "c.txt")


def test_classify_writes_predictions_with_and_without_a_plan(
    tiny_model, tiny_tokenizer, tmp_cache, tmp_path, monkeypatch
):
    from emolib.lm import models
    from emolib.pipeline import cli
    from emolib.sae.loading import save_saes
    from emolib.studies.steering import diffmean_plan

    lm = tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-classify", chat=True)
    monkeypatch.setattr(models, "load_model", lambda name, precision=None: lm)
    monkeypatch.delenv("EMOLIB_DATA_DIR", raising=False)
    (tmp_path / "texts.csv").write_text("text\n" + "\n".join(TEXTS) + "\n")
    args = ["classify", str(tmp_path / "texts.csv"), "--model", "tiny-classify", "--dataset", "builtin"]
    assert cli.main(args) == 0
    clean = pd.read_csv(tmp_path / "texts.predictions.csv")
    assert len(clean) == len(TEXTS) and (clean["steering"] == "none").all()
    probabilities = clean.filter(like="p_")
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)

    rng = np.random.default_rng(0)
    plan = diffmean_plan(
        "tiny-classify", rng.normal(size=(6, 32)), ["anger", "joy"] * 3, ("anger", "joy"), 1, {}
    )
    plan.with_strength(8.0).save(tmp_path / "plan.json")
    assert cli.main([*args, "--steer", str(tmp_path / "plan.json"), "--output", str(tmp_path / "s.csv")]) == 0
    steered = pd.read_csv(tmp_path / "s.csv")
    assert not np.allclose(steered.filter(like="p_"), probabilities, atol=1e-4)

    # a plan for another model, and a feature plan whose SAEs are not in the cache, are refused with the reason
    dataclasses.replace(plan, model="other").save(tmp_path / "other.json")
    assert cli.main([*args, "--steer", str(tmp_path / "other.json")]) == 1
    gain_plan(1.0).save(tmp_path / "gain.json")
    with pytest.raises(SteeringError, match="are not in the cache"):
        from emolib.pipeline.classify import plan_saes

        plan_saes(SteeringPlan.load(tmp_path / "gain.json"))
    # with the SAEs in the cache, the feature plan applies
    from test_tracing import make_sae

    from emolib.cache import cache_dir

    save_saes({"blocks.1.hook_resid_post": make_sae(1, seed=3)}, cache_dir("saes") / "suite-a")
    feature = dataclasses.replace(gain_plan(4.0, features=(0, 1, 2, 3)), model="tiny-classify")
    feature.save(tmp_path / "feature.json")
    assert (
        cli.main([*args, "--steer", str(tmp_path / "feature.json"), "--output", str(tmp_path / "f.csv")]) == 0
    )
    assert pd.read_csv(tmp_path / "f.csv")["steering"].iloc[0] == "causal gain alpha=4"


def test_norm_outlier_positions_are_left_alone():
    from emolib.sae.interventions import outside_norm_outliers

    resid = torch.ones(2, 6, 4)
    resid[0, 0] *= 50.0  # an attention sink: far above its row's median norm
    mask = outside_norm_outliers(5.0)(resid)
    assert not mask[0, 0] and mask[0, 1:].all() and mask[1].all()
    basis, center = np.eye(4)[:1], np.zeros(4)
    moved = subspace_hook(basis, center, 1.0, outside_norm_outliers(5.0))(resid, None)
    assert torch.equal(moved[0, 0], resid[0, 0]) and torch.allclose(moved[0, 1, 0], torch.tensor(2.0))
    plan = dataclasses.replace(gain_plan(1.0), outlier_factor=None)
    assert SteeringPlan.from_json(plan.to_json()).outlier_factor is None


def test_the_n_shot_prompt_lists_the_examples_in_a_seeded_order(tiny_tokenizer):
    from emolib.lm.prompts import PAPER_TEMPLATE, build_prompt

    examples = [
        ("I won {the} prize.", "joy"),
        ("The milk had gone bad.", "fear"),
        ("He lied to me.", "anger"),
    ]
    first = steering.icl_template(PAPER_TEMPLATE, examples, seed=0, max_words=40)
    again = steering.icl_template(PAPER_TEMPLATE, examples, seed=0, max_words=40)
    other = [steering.icl_template(PAPER_TEMPLATE, examples, seed=s, max_words=40) for s in range(1, 6)]
    assert first == again and any(o.instruction != first.instruction for o in other)
    parts = build_prompt(tiny_tokenizer, LABELS, chat=False, template=first)
    assert "Experience: I won {the} prize.\nAnswer: joy" in parts.prefix  # braces survive the formatting
    assert parts.prefix.count("Answer:") == 3 and "Experience: He lied to me." in parts.prefix
    short = steering.icl_template(PAPER_TEMPLATE, examples, seed=0, max_words=2)
    assert "Experience: I won ...\nAnswer: joy" in short.instruction.replace("{{", "{").replace("}}", "}")


def test_dev_and_test_leave_out_each_other_and_the_analysed_items(tiny_steering):
    from emolib.lm.baselines import BaselineConfig, evaluation_items

    _, config = tiny_steering
    items = steering.study_items(config)
    analysed = set()
    for split in config.items.splits:
        cfg = BaselineConfig(split=split, n_per_label=config.items.n_per_label, sample_seed=config.items.seed)
        analysed |= set(evaluation_items("builtin", cfg).ids)
    assert not (set(items.dev.ids) | set(items.test.ids)) & analysed
    assert not set(items.dev.ids) & set(items.test.ids) and not set(items.pool.ids) & set(items.test.ids)
    assert {items.test.gold.count(label) for label in TINY_LABELS} == {config.test_per_label}
    for by_n in items.draws.values():  # nested example sets, n per label
        small, large = (set(by_n[n]) for n in config.n_examples)
        assert small < large and len(large) == max(config.n_examples) * len(TINY_LABELS)
    too_many = dataclasses.replace(config, test_per_label=50)
    with pytest.raises(SteeringError, match="fewer than 50 items outside chapters 1-3's analysis set"):
        steering.study_items(too_many)


def test_a_chapter_protocol_changes_chapter_4_and_chapter_5s_source_alike():
    from emolib.studies.presets import PresetError, get_preset

    preset = get_preset("quick").with_protocol({"n_examples": [1, 2, 3], "n_draws": 3})
    assert preset.steering.n_examples == (1, 2, 3) and preset.steering.n_draws == 3
    assert preset.generalisation.source == preset.steering  # chapter 5 reads the run chapter 4 cached
    assert preset.generalisation.steering == get_preset("quick").generalisation.steering
    in_domain = preset.with_in_domain({"n_draws": 2}).generalisation
    assert in_domain.steering.n_draws == 2 and in_domain.source == preset.steering
    assert get_preset("quick").with_protocol(None) is get_preset("quick")
    with pytest.raises(PresetError, match="unknown steering protocol fields \\['n_draw'\\]"):
        get_preset("quick").with_protocol({"n_draw": 5})
    with pytest.raises(SteeringError, match="verdict's n=3 is not among"):
        get_preset("quick").with_protocol({"n_examples": [1, 2]})
