"""Chapter 1: information flow across layers, its phases, and where emotion features appear."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from emolib.methods.common import FlowError


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


def phases_from_results(
    record: Mapping, model: str, *, n_phases: int = 3, subset: str = "all"
) -> dict[str, tuple[int, ...]]:
    """The layers of each phase of `model`'s best `n_phases`-phase cut, from the flow chapter's results.

    Reads `record["models"][model]["subsets"][subset]["boundaries"][str(n_phases)]["phases"]` (a list of
    [first, last] layers) as `read_results("flow")` returns it, and gives `{"phase 1": (0, 1, ...), ...}`, so
    later chapters stratify by the same phases chapter 1 found. Missing keys raise, naming what is there.
    """
    models = record.get("models", {})
    if model not in models:
        raise FlowError(
            f"the flow results have no model {model!r} (have {sorted(models)}): run chapter 01_flow with it"
        )
    subsets = models[model].get("subsets", {})
    if subset not in subsets or "boundaries" not in subsets[subset]:
        raise FlowError(
            f"the flow results for {model!r} have no boundaries for the subset {subset!r} "
            f"(subsets: {sorted(subsets)})"
        )
    cuts = subsets[subset]["boundaries"]
    if str(n_phases) not in cuts:
        raise FlowError(
            f"the flow results for {model!r} ({subset}) have no {n_phases}-phase cut (have {sorted(cuts)})"
        )
    bounds = cuts[str(n_phases)]["phases"]
    phases = {
        f"phase {i}": tuple(range(int(first), int(last) + 1)) for i, (first, last) in enumerate(bounds, 1)
    }
    layers = [layer for members in phases.values() for layer in members]
    if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
        raise FlowError(f"the {n_phases}-phase cut of {model!r} is not contiguous: {bounds}")
    return phases
