"""The verdict summary reads each chapter's verdicts back and counts what did not run against the claim."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from emolib.pipeline.results import write_results
from emolib.studies import summary as S
from emolib.verdicts import Verdict


@dataclass
class FakeResult:
    """A chapter's typed result reduced to what the summary reads: its verdicts (and no phase cuts)."""

    model: str
    stored: list[Verdict]
    cuts: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, payload):
        return cls(payload["model"], [Verdict.from_dict(v) for v in payload["verdicts"]])

    def verdicts(self) -> list[Verdict]:
        return self.stored


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "result_types", lambda: {"flow": FakeResult, "features": FakeResult})
    return tmp_path / "results"


def flow_payload(model: str, verdict: str, correct_verdict: str) -> dict:
    numbers = {"chosen": 3, "share_three": 0.8}
    return {
        "model": model,
        "verdicts": [
            Verdict(verdict, "all items", numbers).about("three_phases", model, "all").as_dict(),
            Verdict(correct_verdict, "correct items", numbers)
            .about("three_phases", model, "correct")
            .as_dict(),
        ],
    }


def test_a_missing_chapter_or_model_is_inconclusive_not_run(results_dir):
    payload = {"models": {"a": flow_payload("a", "holds", "does not hold")}}
    write_results("flow", payload, preset="full", results_dir=results_dir)
    summary = S.summarise(["a", "b"], "full", results_dir)
    rows = summary.rows.set_index(["claim", "model"])
    three = S.PAPER_CLAIMS[0].wording
    assert rows.loc[(three, "a"), "verdict"] == "holds"  # the "all" scope, not the "correct" one
    assert "80% of item resamples choose 3" in rows.loc[(three, "a"), "evidence"]
    assert rows.loc[(three, "b"), "verdict"] == "inconclusive"
    assert rows.loc[(three, "b"), "reason"].startswith("not run") and "b" in rows.loc[(three, "b"), "reason"]
    # chapters that never ran (features, tracing, steering, generalisation): not run for every model
    others = summary.rows[summary.rows["chapter"] != "flow"]
    assert (others["verdict"] == "inconclusive").all() and (others["evidence"] == "not run").all()
    counts = summary.counts()
    assert (counts.sum(axis=1) == 2).all() and counts.loc[three, "holds"] == 1
    assert summary.table().shape == (len(S.PAPER_CLAIMS), 2)
    readme = summary.readme_rows()
    assert readme[0] == {"Claim of the paper": three, "a": "holds", "b": "inconclusive"}


def test_results_of_another_preset_are_not_used(results_dir):
    payload = {"models": {"a": flow_payload("a", "holds", "holds")}}
    write_results("flow", payload, preset="quick", results_dir=results_dir)
    rows = S.summarise(["a"], "full", results_dir).rows
    assert (rows["verdict"] == "inconclusive").all()
    assert "quick" in rows.iloc[0]["reason"] or "preset" in rows.iloc[0]["reason"]


def test_stored_verdicts_are_read_with_their_numbers(results_dir):
    steering = Verdict(
        "does not hold", "no gain", {"baselines_beaten": 0, "baselines": 7, "test_ppl_change": 0.01}
    ).about("steering_helps", "a", "final phase")
    write_results("steering", {"verdicts": {"a": steering.as_dict()}}, preset="full", results_dir=results_dir)
    row = S.summarise(["a"], "full", results_dir).rows.set_index("chapter").loc["steering"]
    assert row["verdict"] == "does not hold"
    assert row["evidence"] == "beats 0 of 7 baselines; perplexity +1.0%"


def test_an_unreadable_results_file_raises_naming_the_chapter(results_dir):
    write_results("features", {"models": {"a": {"model": "a"}}}, preset="full", results_dir=results_dir)
    with pytest.raises(S.SummaryError, match="chapter 'features'"):
        S.summarise(["a"], "full", results_dir)
