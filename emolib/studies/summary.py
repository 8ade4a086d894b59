"""The verdict summary: each of the paper's claims x each book model, read from the chapters' results files.

Nothing here computes a verdict: every cell is the verdict its chapter's rule gave (the chapter's results file, the
same preset), with the one number behind it and a pointer to the section that explains it. A claim whose chapter
has not run, or has no result for a model, is "inconclusive" with the reason "not run": what the book cannot
measure counts against the claim, never silently for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from emolib.pipeline.results import ResultsMissingError, ResultsPresetError, read_results
from emolib.stats import format_interval
from emolib.studies.base import results_from_record
from emolib.verdicts import VERDICTS, Verdict

#: How a result file's verdict becomes the summary's one number: `(verdict, typed result or None) -> text`.
Evidence = Callable[[Verdict, Any], str]


@dataclass(frozen=True)
class PaperClaim:
    """One claim of the paper, where the book tests it: the results file (`chapter`), the chapter's own claim key
    and scope, and the MyST target (`section`) of the chapter's findings."""

    key: str
    wording: str
    chapter: str
    claim: str
    section: str
    scope: str = ""


#: The paper's claims in the order the paper makes them, each with the chapter that tests it.
PAPER_CLAIMS: tuple[PaperClaim, ...] = (
    PaperClaim(
        "three_phases", "Information flows in three phases", "flow", "three_phases", "flow-findings", "all"
    ),
    PaperClaim(
        "late_emotion",
        "Emotion features emerge only in the last phase",
        "flow",
        "late_emotion",
        "flow-findings",
        "all",
    ),
    PaperClaim(
        "shared_and_specific",
        "Emotion representations mix shared and specific features",
        "features",
        "shared_and_specific",
        "features-findings",
    ),
    PaperClaim(
        "small_set",
        "A small set of causal features drives predictions",
        "tracing",
        "small_set",
        "tracing-findings",
    ),
    PaperClaim(
        "varies_by_emotion",
        "Their number and impact vary by emotion",
        "tracing",
        "varies_by_emotion",
        "tracing-findings",
    ),
    PaperClaim(
        "disgust_weaker_diffuse",
        "Disgust is weaker and more diffuse",
        "tracing",
        "disgust_weaker_diffuse",
        "tracing-findings",
    ),
    PaperClaim(
        "steering_helps",
        "Steering a few causal features improves recognition and keeps language modelling",
        "steering",
        "steering_helps",
        "steering-findings",
    ),
    PaperClaim(
        "across_datasets",
        "The gains hold across datasets",
        "generalisation",
        "across_datasets",
        "generalisation-findings",
    ),
    PaperClaim(
        "across_models",
        "The gains hold across models",
        "generalisation",
        "across_models",
        "generalisation-findings",
    ),
)


class SummaryError(ValueError):
    """A results file whose verdicts cannot be read (not a missing file: that is "not run")."""


# ------------------------------------------------------------------------------------------------ evidence


def _number(numbers: Mapping[str, Any], key: str, spec: str = ".3g") -> str:
    value = numbers.get(key)
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _three_phases(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    share = n.get("share_three")
    text = f"the test chooses {n.get('chosen', 'n/a')} phase(s)"
    if share is not None:
        text += f", {share:.0%} of item resamples choose 3"
    if result is not None and 3 in result.cuts.get("all", {}):
        text = f"3-phase boundaries {result.cut(3).boundaries_text()}; " + text
    return text


def _late_emotion(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    early = n.get("layers_decodable_before_last_phase")
    carried = (
        "" if early is None else f"; {early} layer(s) before the last phase carry emotion (top AUROCs, probe)"
    )
    if not n.get("layers_beyond_control"):
        return "no layer beyond the shuffled-label control" + carried
    share = n.get("share_of_excess_in_last_phase")
    where = "n/a" if share is None else f"{share:.0%}"
    return (
        f"first layer beyond the control L{n.get('first_layer')} (phase {n.get('first_phase')} of "
        f"{n.get('last_phase')}); {where} of the excess in the last phase{carried}"
    )


def _shared_and_specific(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    return (
        f"{n.get('n_specific', 'n/a')} specific (p = {_number(n, 'p_specific')}), "
        f"{n.get('n_shared', 'n/a')} shared (p = {_number(n, 'p_shared')})"
    )


def _small_set(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    text = (
        f"{n.get('n_small', 'n/a')} of {n.get('n_emotions', 'n/a')} emotions lose half their margin with "
        f"<= {n.get('small_k', 'n/a')} features that beat the controls"
    )
    if result is not None:
        text += f" (k50: {result.readme_row()['k50 per emotion']})"
    return text


def _varies(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    return (
        f"Kruskal-Wallis p = {_number(n, 'kruskal_p')}; {n.get('n_separated_pairs', 'n/a')} separated pairs"
    )


def _disgust(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    return (
        f"excess drop {_number(n, 'drop', '.3f')} vs the others' {_number(n, 'others_drop', '.3f')} "
        f"(one-sided p = {_number(n, 'mannwhitney_p')})"
    )


def _steering(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    ppl = n.get("test_ppl_change")
    tail = "" if ppl is None or not np.isfinite(ppl) else f"; perplexity {ppl:+.1%}"
    if result is None:
        return f"beats {n.get('baselines_beaten', 'n/a')} of {n.get('baselines', 'n/a')} baselines" + tail
    best = result.best_baseline()
    versus = result.versus[result.versus["n"] == result.rule.n].set_index("versus")
    if best is None or best not in versus.index:  # versus rows exist only where causal steering ran
        return "no causal or baseline run at the rule's n" + tail
    row = versus.loc[best]
    difference = format_interval(row["difference"], row["low"], row["high"], signed=True)
    return f"macro-F1 causal minus the best baseline ({best}) at n = {result.rule.n}: {difference}{tail}"


def _across_datasets(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    return (
        f"{n.get('cells_holding', 'n/a')} of {n.get('cells', 'n/a')} datasets hold; zero-shot beaten on "
        f"{n.get('cells_beating_zero_shot', 'n/a')}"
    )


def _across_models(verdict: Verdict, result: Any) -> str:
    n = verdict.numbers
    return f"'across datasets' holds for {n.get('models_holding', 'n/a')} of {n.get('models', 'n/a')} models"


def _generic(verdict: Verdict, result: Any) -> str:
    return "; ".join(f"{k} = {_number(verdict.numbers, k)}" for k in list(verdict.numbers)[:3]) or "-"


EVIDENCE: dict[str, Evidence] = {
    "three_phases": _three_phases,
    "late_emotion": _late_emotion,
    "shared_and_specific": _shared_and_specific,
    "small_set": _small_set,
    "varies_by_emotion": _varies,
    "disgust_weaker_diffuse": _disgust,
    "steering_helps": _steering,
    "across_datasets": _across_datasets,
    "across_models": _across_models,
}


# ------------------------------------------------------------------------------------------------ reading


def result_types() -> dict[str, type]:
    """The typed result of each chapter whose results file holds `models` (the evidence reads them)."""
    from emolib.studies.features import FeaturesResult
    from emolib.studies.flow import FlowResult
    from emolib.studies.generalisation import GeneralisationResult
    from emolib.studies.steering import SteeringResult
    from emolib.studies.tracing import TracingResult

    return {
        "flow": FlowResult,
        "features": FeaturesResult,
        "tracing": TracingResult,
        "steering": SteeringResult,
        "generalisation": GeneralisationResult,
    }


def _typed_results(chapter: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """Each model's typed result of a chapter ({} for a chapter without a known result type or models)."""
    cls = result_types().get(chapter)
    if cls is None or not isinstance(record.get("models"), Mapping):
        return {}
    return results_from_record(chapter, record, cls)


def _stored_verdicts(chapter: str, record: Mapping[str, Any], typed: Mapping[str, Any]) -> list[Verdict]:
    """Every verdict a chapter's results hold, with claim, model and scope set."""
    if "verdicts" in record and isinstance(
        record["verdicts"], Mapping
    ):  # chapters that store them (steering)
        return [Verdict.from_dict(v) for v in record["verdicts"].values()]
    out: list[Verdict] = []
    for result in typed.values():
        out += result.verdicts()
    return out


@dataclass
class ChapterVerdicts:
    """What one results file says: its verdicts and typed results, or why it could not be read."""

    chapter: str
    verdicts: list[Verdict]
    results: dict[str, Any]
    missing: str = ""


def read_chapter(chapter: str, preset: str, results_dir=None) -> ChapterVerdicts:
    """A chapter's verdicts (from the results file of `preset`); a missing or other-preset file gives none and
    the reason."""
    try:
        record = read_results(chapter, preset=preset, results_dir=results_dir)
    except (ResultsMissingError, ResultsPresetError) as err:
        return ChapterVerdicts(chapter, [], {}, missing=str(err).split(":")[0])
    try:
        typed = _typed_results(chapter, record)
        return ChapterVerdicts(chapter, _stored_verdicts(chapter, record, typed), typed)
    except (KeyError, TypeError, ValueError) as err:
        raise SummaryError(
            f"the results of chapter {chapter!r} ({preset}) cannot be read ({type(err).__name__}: {err}); "
            f"re-run `emolib book --preset {preset} --chapters` for that chapter"
        ) from err


# ------------------------------------------------------------------------------------------------ summary


@dataclass
class Summary:
    """One row per (claim, model): the verdict, the one number behind it, the reason, the section."""

    rows: pd.DataFrame
    models: tuple[str, ...]

    def table(self) -> pd.DataFrame:
        """Claims (rows, the paper's wording) x models (columns): "verdict: evidence"."""
        cells = self.rows.assign(cell=self.rows["verdict"] + ": " + self.rows["evidence"])
        wide = cells.pivot(index="claim", columns="model", values="cell")
        order = list(dict.fromkeys(self.rows["claim"]))
        return wide.loc[order, list(self.models)]

    def counts(self) -> pd.DataFrame:
        """Per claim, how many models each verdict has (columns: `VERDICTS`)."""
        counts = pd.crosstab(self.rows["claim"], self.rows["verdict"]).reindex(
            columns=list(VERDICTS), fill_value=0
        )
        return counts.loc[list(dict.fromkeys(self.rows["claim"]))]

    def readme_rows(self) -> list[dict[str, Any]]:
        """The README's summary table: one row per claim, a column per model with the verdict."""
        out = []
        for claim, group in self.rows.groupby("claim", sort=False):
            by_model = dict(zip(group["model"], group["verdict"], strict=True))
            out.append({"Claim of the paper": claim, **{m: by_model.get(m, "-") for m in self.models}})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"models": list(self.models), "rows": self.rows.to_dict(orient="records")}


def summarise(models: Sequence[str], preset: str, results_dir=None) -> Summary:
    """Every `PAPER_CLAIMS` claim for every model in `models` from the results files of `preset`."""
    chapters = {c.chapter: read_chapter(c.chapter, preset, results_dir) for c in PAPER_CLAIMS}
    rows = []
    for claim in PAPER_CLAIMS:
        found = chapters[claim.chapter]
        for model in models:
            verdict = next(
                (
                    v
                    for v in found.verdicts
                    if v.claim == claim.claim
                    and v.model == model
                    and (not claim.scope or v.scope == claim.scope)
                ),
                None,
            )
            if verdict is None:
                why = found.missing or f"the {claim.chapter} results have no verdict for {model}"
                verdict = Verdict("inconclusive", f"not run: {why}", rule="not run")
                evidence = "not run"
            else:
                evidence = EVIDENCE.get(claim.key, _generic)(verdict, found.results.get(model))
            rows.append(
                {
                    "claim": claim.wording,
                    "model": model,
                    "verdict": verdict.verdict,
                    "evidence": evidence,
                    "reason": verdict.reason,
                    "chapter": claim.chapter,
                    "section": claim.section,
                }
            )
    return Summary(pd.DataFrame(rows), tuple(models))
