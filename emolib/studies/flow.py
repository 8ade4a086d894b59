"""Chapter 1: information flow across layers, its phases, and where emotion features appear."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from emolib.methods.common import FlowError
from emolib.stats import Estimate


def three_phase_verdict(chosen: int, at_largest: bool, share_three: float | None) -> tuple[str, str]:
    """Verdict on "three phases" from the phase-count test and its bootstrap.

    holds: the test chooses 3 and at least half of the item resamples do too; partly: it chooses 3 but fewer
    than half of the resamples do, or it chooses another count while at least a quarter of the resamples choose
    3; inconclusive: the largest candidate wins (a smooth trend or more phases than tested: no count is
    supported); does not hold: otherwise. `share_three` is the share of resamples choosing 3 (None: no bootstrap).
    """
    share = np.nan if share_three is None else float(share_three)
    boot = "no bootstrap" if share_three is None else f"{share:.0%} of item resamples choose three"
    if at_largest:
        return (
            "inconclusive",
            f"the largest candidate ({chosen} phases) wins: no small phase count fits ({boot})",
        )
    if chosen == 3:
        if share_three is None or share >= 0.5:
            return "holds", f"the test chooses three phases ({boot})"
        return "partly", f"the test chooses three phases, but only {boot}"
    if share_three is not None and share >= 0.25:
        return "partly", f"the test chooses {chosen} phase(s); {boot}"
    return "does not hold", f"the test chooses {chosen} phase(s), not three ({boot})"


def late_emergence_verdict(present: pd.Series, excess: pd.Series, phase: pd.Series) -> tuple[str, str]:
    """Verdict on "emotion features emerge only in the last phase" from per-layer results.

    `present[layer]`: the layer has more emotion-selective features than every label permutation; `excess`:
    observed minus null-mean count (clipped at 0); `phase`: phase number per layer (1-based). inconclusive: no
    layer has features beyond the null; holds: every such layer is in the last phase; partly: some are earlier,
    but the last phase holds at least half of the summed excess; does not hold: otherwise.
    """
    present, excess, phase = present.astype(bool), excess.clip(lower=0), phase.astype(int)
    if not (present.index.equals(excess.index) and present.index.equals(phase.index)):
        raise FlowError("present, excess and phase must be indexed by the same layers")
    last = int(phase.max())
    layers = present.index[present.to_numpy()]
    if len(layers) == 0:
        return "inconclusive", "no layer has more emotion-selective features than the shuffled-label control"
    in_last = phase[layers] == last
    total = float(excess[present].sum())
    share_last = float(excess[present & (phase == last)].sum()) / total if total > 0 else np.nan
    first = layers[0]
    where = f"first at layer {first} (phase {phase[first]} of {last}); {share_last:.0%} of the excess in the last phase"
    if in_last.all():
        return "holds", f"emotion-selective features beyond the control only in the last phase: {where}"
    if in_last.any() and share_last >= 0.5:
        return "partly", f"emotion-selective features beyond the control also before the last phase: {where}"
    return (
        "does not hold",
        f"emotion-selective features beyond the control mostly before the last phase: {where}",
    )


def phase_roles_verdict(shares: pd.DataFrame) -> tuple[str, str]:
    """Verdict on "syntax, then content, then emotion": `shares` (index: phase 1..3, columns template, content,
    emotion) holds each role's mean share of last-token activation per phase.

    Counts which of three expectations hold: template share highest in phase 1, content share highest in phase
    2, emotion share highest in phase 3. holds: 3 of 3; partly: 2; does not hold: 0 or 1; inconclusive: no
    emotion-feature activation anywhere or not three phases.
    """
    if len(shares) != 3 or not {"template", "content", "emotion"} <= set(shares.columns):
        return "inconclusive", "needs three phases with template, content and emotion shares"
    if not np.nansum(shares["emotion"].to_numpy()) > 0:
        return "inconclusive", "no emotion-selective feature is active at the last token"
    peaks = {role: int(shares[role].astype(float).idxmax()) for role in ("template", "content", "emotion")}
    met = [
        role
        for role, want in zip(("template", "content", "emotion"), (1, 2, 3), strict=True)
        if peaks[role] == want
    ]
    reason = ", ".join(f"{role} peaks in phase {p}" for role, p in peaks.items())
    verdict = {3: "holds", 2: "partly"}.get(len(met), "does not hold")
    return verdict, f"{reason} (expected 1, 2, 3: {len(met)} of 3 as expected)"


# ------------------------------------------------------------------------------------------------ result
# The interface later chapters use (phases of a cut, the final phase, the chosen phase count) is fixed here; the
# rest of the result is filled in by the flow study (`run_flow`).


@dataclass(frozen=True)
class PhaseCut:
    """The best cut of one subset's layer profile into `len(phases)` phases: `phases` as (first, last) layers,
    `intervals` the item-bootstrap intervals of the boundaries (first layers of phases 2..n)."""

    phases: tuple[tuple[int, int], ...]
    intervals: tuple[Estimate, ...]

    def layers(self) -> dict[str, tuple[int, ...]]:
        """`{"phase 1": (0, 1, ...), ...}`: every layer of each phase, contiguous and in order."""
        out = {f"phase {i}": tuple(range(first, last + 1)) for i, (first, last) in enumerate(self.phases, 1)}
        flat = [layer for members in out.values() for layer in members]
        if not flat or flat != list(range(flat[0], flat[0] + len(flat))):
            raise FlowError(f"the cut {self.phases} is not a contiguous range of layers")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"phases": [list(p) for p in self.phases], "intervals": [e.as_dict() for e in self.intervals]}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> PhaseCut:
        return cls(
            phases=tuple((int(a), int(b)) for a, b in payload["phases"]),
            intervals=tuple(
                Estimate(e["value"], e["low"], e["high"], e.get("level", 0.95)) for e in payload["intervals"]
            ),
        )


def phase_cuts(result: Mapping[str, Any], model: str, subset: str) -> dict[int, PhaseCut]:
    """The cuts stored for one subset of a flow result's JSON (`subsets.<subset>.boundaries`), by phase count."""
    subsets = result.get("subsets", {})
    if subset not in subsets or "boundaries" not in subsets[subset]:
        raise FlowError(
            f"the flow results for {model!r} have no boundaries for the subset {subset!r} (subsets: {sorted(subsets)})"
        )
    return {int(k): PhaseCut.from_json(v) for k, v in subsets[subset]["boundaries"].items()}


@dataclass
class FlowResult:
    """One model's flow study. Later chapters read it only through `phases`, `final_phase` and
    `chosen_phase_count` (from `read_study_results("flow", FlowResult)`).

    `cuts[subset][n]` is the best n-phase cut of the subset's profile; `chosen[subset]` the phase count its test
    prefers. The other fields hold what chapter 1 shows.
    """

    study: ClassVar[str] = "flow"

    model: str
    cuts: dict[str, dict[int, PhaseCut]]
    chosen: dict[str, int]
    payload: dict[str, Any] = field(default_factory=dict)

    def cut(self, n_phases: int = 3, subset: str = "all") -> PhaseCut:
        if subset not in self.cuts:
            raise FlowError(
                f"the flow results for {self.model!r} have no subset {subset!r} ({sorted(self.cuts)})"
            )
        if n_phases not in self.cuts[subset]:
            raise FlowError(
                f"the flow results for {self.model!r} ({subset}) have no {n_phases}-phase cut "
                f"(have {sorted(self.cuts[subset])})"
            )
        return self.cuts[subset][n_phases]

    def phases(self, n_phases: int = 3, subset: str = "all") -> dict[str, tuple[int, ...]]:
        """`{"phase 1": (layers...), ...}` of the best `n_phases`-phase cut of `subset`'s profile."""
        return self.cut(n_phases, subset).layers()

    def final_phase(self, n_phases: int = 3, subset: str = "all") -> tuple[int, ...]:
        """The layers of the last phase of that cut."""
        return list(self.phases(n_phases, subset).values())[-1]

    def chosen_phase_count(self, subset: str = "all") -> int:
        """The number of phases the phase-count test prefers on `subset`."""
        if subset not in self.chosen:
            raise FlowError(f"the flow results for {self.model!r} have no phase-count test for {subset!r}")
        return self.chosen[subset]

    def to_json(self) -> dict[str, Any]:
        return self.payload

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FlowResult:
        subsets = payload.get("subsets", {})
        model = str(payload.get("model", ""))
        analysed = [s for s, v in subsets.items() if "boundaries" in v]
        return cls(
            model=model,
            cuts={s: phase_cuts(payload, model, s) for s in analysed},
            chosen={s: int(subsets[s]["phase_count_test"]["chosen"]) for s in analysed},
            payload=dict(payload),
        )
