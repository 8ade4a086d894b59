"""Verdicts on the paper's claims: one type for every chapter, and one renderer of a chapter's "What we found".

A verdict rule is a function of a study's numbers that returns a `Verdict`: one of `VERDICTS`, the reason in words,
the numbers that decided it and the rule's name. Studies attach the claim and the model; chapters render a list of
verdicts with `findings_markdown` and never word them by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

VERDICTS = ("holds", "partly", "does not hold", "inconclusive")

#: Shown under the findings of a run that is not the full preset.
PRESET_NOTE = (
    "*Preset `{preset}`: a handful of items per label and SAEs trained for seconds, to check that the pipeline "
    "runs. These verdicts are not evidence either way.*"
)


class VerdictError(ValueError):
    """A verdict outside `VERDICTS`, or findings that cannot be rendered (unknown claim)."""


@dataclass(frozen=True)
class Verdict:
    """One claim's verdict for one model (and scope, e.g. a subset of items), with what decided it.

    `numbers` are the quantities the rule compared (plain floats, ints or strings); `rule` names the rule function,
    so a reader can find its statement; `claim`, `model` and `scope` say what the verdict is about (set by the study
    with `about`).
    """

    verdict: str
    reason: str
    numbers: Mapping[str, Any] = field(default_factory=dict)
    rule: str = ""
    claim: str = ""
    model: str = ""
    scope: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise VerdictError(f"verdict must be one of {list(VERDICTS)}, not {self.verdict!r}")
        object.__setattr__(self, "numbers", dict(self.numbers))

    def about(self, claim: str, model: str, scope: str = "") -> Verdict:
        """This verdict, stated for `claim` of `model` (and `scope`)."""
        return replace(self, claim=claim, model=model, scope=scope)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "numbers": dict(self.numbers),
            "rule": self.rule,
            "claim": self.claim,
            "model": self.model,
            "scope": self.scope,
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Verdict:
        return cls(
            verdict=payload["verdict"],
            reason=payload["reason"],
            numbers=payload.get("numbers") or {},
            rule=payload.get("rule", ""),
            claim=payload.get("claim", ""),
            model=payload.get("model", ""),
            scope=payload.get("scope", ""),
        )


def capped_by_sae(verdict: Verdict, flags: Mapping[int, str]) -> Verdict:
    """`verdict` of a feature-level claim read through the SAEs of the layers in `flags` (layer -> the quality
    goals its SAE misses, "" for none). When more than half of those layers miss a goal, the features mostly come
    from SAEs that fail their goals: the verdict is capped at "inconclusive" and says so; when some do, the reason
    names them."""
    missed = {layer: goals for layer, goals in flags.items() if goals}
    if not missed:
        return verdict
    listed = "; ".join(f"L{layer}: {goals}" for layer, goals in sorted(missed.items()))
    numbers = {**verdict.numbers, "layers_missing_sae_goals": len(missed), "layers_read": len(flags)}
    if 2 * len(missed) > len(flags):
        reason = (
            f"{len(missed)} of the {len(flags)} layers read have SAEs that miss a quality goal ({listed}), so the "
            f"features are not a reliable reading; uncapped, the rule says {verdict.verdict}: {verdict.reason}"
        )
        return replace(verdict, verdict="inconclusive", reason=reason, numbers=numbers)
    note = f"; {len(missed)} of the {len(flags)} layers read have SAEs that miss a goal ({listed})"
    return replace(verdict, reason=verdict.reason + note, numbers=numbers)


def goals_missed(flags: Mapping[int, str]) -> str:
    """How many of the layers in `flags` (layer -> the goals its SAE misses) have SAEs that miss a quality goal,
    naming the goals: a table cell beside a verdict read through those SAEs."""
    missed = {layer: goals for layer, goals in flags.items() if goals}
    listed = "; ".join(f"L{layer}: {goals}" for layer, goals in sorted(missed.items()))
    return f"{len(missed)} of {len(flags)}" + (f" ({listed})" if missed else "")


def stable_across_seeds(
    verdict: Verdict, others: Mapping[int, Verdict], seed: int = 0, book: str | None = None
) -> Verdict:
    """`verdict` from the book's SAEs (training `seed`) read against the same rule on SAEs of the same layers
    retrained with other seeds (`others`, by seed): where any seed's verdict differs, the finding rests on one
    training run and the verdict is "inconclusive", every seed's verdict in the reason (as `seed_verdicts` in its
    numbers); where all agree, it stands. Without other seeds it is returned as it is. `book` is the rule's own
    outcome on the book's SAEs where another check has already moved `verdict` (a fragile "holds" read as
    "partly"): the seeds are compared with what the rule said, not with what the other check made of it."""
    if not others:
        return verdict
    outcomes = {seed: book or verdict.verdict, **{s: v.verdict for s, v in others.items()}}
    listed = "; ".join(f"seed {s}: {outcome}" for s, outcome in outcomes.items())
    stable = len(set(outcomes.values())) == 1
    numbers = {**verdict.numbers, "seed_verdicts": listed, "stable_across_seeds": stable}
    if stable:
        return replace(verdict, numbers=numbers)
    reason = (
        f"SAE training seeds disagree ({listed}), so the finding rests on one training run; seed {seed}: "
    )
    return replace(verdict, verdict="inconclusive", reason=reason + verdict.reason, numbers=numbers)


def preset_note(preset: str) -> str:
    """The note under a quick run's findings ("" for the full preset)."""
    return "" if preset == "full" else PRESET_NOTE.format(preset=preset)


def findings_markdown(
    verdicts: Sequence[Verdict],
    claims: Mapping[str, str],
    *,
    preset: str,
    headings: Mapping[str, str] | None = None,
    notes: Mapping[str, Sequence[str]] | None = None,
    scopes: Mapping[str, str] | None = None,
) -> str:
    """The "What we found" block: per model a heading, then per claim its verdict(s) and reasons.

    `claims` maps claim keys to their wording (and sets their order); `headings[model]` replaces the bold model name;
    `notes[model]` are extra bullet lines after the claims; `scopes` maps a verdict's scope to its wording (a claim
    with several scopes is one line, scope by scope). Claims where some model's verdict is "does not hold" are listed
    as disagreements with the paper, and a quick run gets the preset note.
    """
    unknown = sorted({v.claim for v in verdicts} - set(claims))
    if unknown:
        raise VerdictError(f"verdicts for claims {unknown} that the chapter does not name ({list(claims)})")
    headings, notes, scopes = dict(headings or {}), dict(notes or {}), dict(scopes or {})
    lines: list[str] = []
    for model in dict.fromkeys(v.model for v in verdicts):
        lines += [headings.get(model, f"**{model}**"), ""]
        for key, claim in claims.items():
            found = [v for v in verdicts if v.model == model and v.claim == key]
            if not found:
                continue
            if len(found) == 1 and not found[0].scope:
                lines.append(f"- {claim}: **{found[0].verdict}** ({found[0].reason}).")
            else:
                parts = [f"{scopes.get(v.scope, v.scope)}: **{v.verdict}** ({v.reason})" for v in found]
                lines.append(f"- *{claim}*: " + "; ".join(parts) + ".")
        lines += [f"- {note}" for note in notes.get(model, ())]
        lines.append("")
    disagree = [
        claims[k] for k in claims if any(v.claim == k and v.verdict == "does not hold" for v in verdicts)
    ]
    if disagree:
        lines.append(
            f"Where the data disagree with the paper: {', '.join(disagree)} (see the reasons above)."
        )
    if note := preset_note(preset):
        lines += ["", note]
    return "\n".join(lines).strip() + "\n"
