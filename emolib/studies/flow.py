"""Chapter 1: how emotion information flows through the layers, whether it falls into phases, what each phase does.

`run_flow(model, config)` measures, at every layer and at the answer position of the analysis items, linear probes
(residual stream and SAE codes), emotion-selective SAE features, the logit lens and consecutive-layer CKA, each beside
its control; cuts the layer profile into phases (phase-count test, item-bootstrap boundaries); gives every SAE
feature a role (template, content, emotion, inactive) and measures each role's share per phase; picks a feature card
per phase and role; and states the verdicts on the paper's three claims. Everything is done for all items and for
the correctly classified items. The typed `FlowResult` holds it, writes the chapter's results entry, and gives the
tables the chapter shows; later chapters read its phases through `phases`, `final_phase` and `chosen_phase_count`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sae_lens.evals import ExplainedVarianceCalculator
from statsmodels.stats.multitest import multipletests
from tqdm.auto import tqdm

from emolib import data
from emolib.lm.models import LoadedModel, load_model
from emolib.methods.cards import promoted_tokens, top_activating
from emolib.methods.common import FlowError
from emolib.methods.lens import (
    above_permutation_chance,
    at_gold,
    label_first_tokens,
    logit_lens,
    permutation_chance,
)
from emolib.methods.phases import (
    BoundaryBootstrap,
    PhaseCountTest,
    bootstrap_boundaries,
    bootstrap_penalty,
    feasible_candidates,
    item_metric_profile,
    leave_one_metric_out,
    phase_count_test,
)
from emolib.methods.probes import ProbeConfig, ProbeResult, probe_accuracy
from emolib.methods.roles import (
    ROLES,
    RoleConfig,
    TokenCodes,
    feature_roles,
    role_mass_shares,
    token_codes,
    top_tokens,
)
from emolib.methods.selectivity import (
    TOP_AUROCS,
    SelectiveCount,
    SelectivityConfig,
    gold_or_answer,
    selective_with_null,
)
from emolib.methods.similarity import consecutive_cka
from emolib.sae.activations import (
    ActivationStore,
    ExtractionConfig,
    extract_activations,
    last_token_outliers,
    masked_mean_codes,
    resid_hooks,
)
from emolib.sae.matching import match_features
from emolib.sae.quality import goal_summary
from emolib.sae.suite import SAESuite, SuiteConfig, sae_suite, seed_flags, seed_saes
from emolib.stats import Estimate, format_interval, mean_interval
from emolib.studies.base import cached_result, records, table
from emolib.studies.items import AnalysisConfig, AnalysisSet, analysis_set
from emolib.verdicts import Verdict, capped_by_sae, goals_missed, stable_across_seeds

#: Bump when the study's computation changes, so cached results are rebuilt.
#: 2: enough shuffles per layer for a Holm correction across layers; 3: the share of answer positions the SAE
#: training's norm-outlier rule flags, per layer; 4: top-AUROC statistics beside their null, selectivity on
#: the text's own tokens, the late-emergence verdict reads both; the change-point price from item-bootstrap profiles;
#: 5: the late-emergence verdict again on SAEs of every layer retrained with other seeds; 6: the seed SAEs' quality
#: measured on every layer (5 read a cached measurement of the final phase's layers only); 7: the roles rule on
#: the seeds too; 8: how much of each layer's dictionary every seed learns again (decoder cosine)
STUDY_VERSION = "8"

#: The paper's claims this chapter tests (key: wording in the findings and the README row).
CLAIMS = {
    "three_phases": "three phases",
    "late_emotion": "emotion features only in the last phase",
    "phase_roles": "syntax, then content, then emotion",
}

#: The item subsets every measurement is made on, and how the chapter names them.
SUBSETS = {"all": "all items", "correct": "correctly classified items"}

#: The per-item metrics a phase profile can read (each averaged over items per layer), and their names.
PROFILE_METRICS = {
    "probe_resid": "probe accuracy, residual stream",
    "probe_sae": "probe accuracy, SAE codes",
    "lens_gold": "logit lens p(gold | labels)",
    "lens_log_mass": "logit lens log10 p(any label)",
}

#: The roles whose feature counts the per-phase role table shows, and the roles of the feature cards.
CARD_ROLES = ("template", "content", "emotion")

#: The claims whose rules read SAE features, applied again on SAEs retrained with other seeds.
SEED_CLAIMS = ("late_emotion", "phase_roles")


# ------------------------------------------------------------------------------------------------ verdict rules


def moved_boundaries(cut: PhaseCut, without: Mapping[str, Sequence[int]]) -> list[str]:
    """The dropped metrics whose leave-one-out cut puts a boundary outside the full cut's bootstrap interval."""
    moved = []
    for metric, boundaries in without.items():
        if any(not e.low <= b <= e.high for e, b in zip(cut.intervals, boundaries, strict=True)):
            moved.append(metric)
    return moved


def three_phase_verdict(
    chosen: int,
    at_largest: bool,
    share_three: float | None,
    beats_trend: bool | None = None,
    r2: tuple[float, float] | None = None,
    moved: Sequence[str] = (),
) -> Verdict:
    """Verdict on "three phases" from the phase-count test, its bootstrap and the smooth alternative.

    does not hold: a smooth trend (a cubic per metric) fits the profile at least as well as the best three-phase
    cut (`beats_trend` False; `r2` = (three phases, trend) for the reason); inconclusive: the largest candidate
    wins (more phases than tested: no count is supported); holds: the test chooses 3 and at least half of the item
    resamples do too; partly: it chooses 3 but fewer than half of the resamples do, or it chooses another count
    while at least a quarter of the resamples choose 3; does not hold: otherwise. `share_three` is the share of
    resamples choosing 3 (None: no bootstrap); `beats_trend` None means no trend was fitted. `moved` names the
    profile metrics without which a boundary leaves its bootstrap interval: a "holds" then becomes "partly" (the
    phases rest on one metric).
    """
    share = np.nan if share_three is None else float(share_three)
    numbers = {
        "chosen": int(chosen),
        "at_largest": bool(at_largest),
        "share_three": None if share_three is None else share,
        "three_beats_trend": beats_trend,
        "boundaries_move_without": ", ".join(moved),
    }
    if r2 is not None:
        numbers |= {"r2_three_phases": float(r2[0]), "r2_trend": float(r2[1])}

    def verdict(decision: str, reason: str) -> Verdict:
        return Verdict(decision, reason, numbers, rule="three_phase_verdict")

    boot = "no bootstrap" if share_three is None else f"{share:.0%} of item resamples choose three"
    if beats_trend is False:
        fit = "" if r2 is None else f" (R^2 {r2[1]:.2f} against {r2[0]:.2f})"
        return verdict(
            "does not hold",
            f"a smooth trend fits the profile at least as well as the best three phases{fit}: the profile is "
            f"not a few steps; the test chooses {chosen} phase(s), {boot}",
        )
    if at_largest:
        return verdict(
            "inconclusive",
            f"the largest candidate ({chosen} phases) wins: no small phase count fits ({boot})",
        )
    if chosen == 3:
        if (share_three is None or share >= 0.5) and moved:
            return verdict(
                "partly",
                f"the test chooses three phases ({boot}), but without {', '.join(moved)} a boundary leaves its "
                "bootstrap interval",
            )
        if share_three is None or share >= 0.5:
            return verdict("holds", f"the test chooses three phases ({boot})")
        return verdict("partly", f"the test chooses three phases, but only {boot}")
    if share_three is not None and share >= 0.25:
        return verdict("partly", f"the test chooses {chosen} phase(s); {boot}")
    return verdict("does not hold", f"the test chooses {chosen} phase(s), not three ({boot})")


def late_emergence_verdict(
    present: pd.Series, excess: pd.Series, phase: pd.Series, decodable: pd.Series | None = None
) -> Verdict:
    """Verdict on "emotion features emerge only in the last phase" from per-layer results.

    `present[layer]`: the layer has more emotion-selective features than the label permutations; `excess`:
    observed minus null-mean count (clipped at 0); `phase`: phase number per layer (1-based); `decodable[layer]`
    (optional): the layer's SAE features carry emotion beyond their shuffled-label control by a threshold-free
    measure (the top AUROCs, a probe on the codes), which a count at a fixed AUROC threshold can miss.
    inconclusive: no layer shows either; holds: every layer that shows either is in the last phase; partly:
    some are earlier, but the last phase shows emotion features and holds at least half of the summed excess;
    does not hold: otherwise (also when only earlier phases show emotion).
    """
    present, excess, phase = present.astype(bool), excess.clip(lower=0), phase.astype(int)
    decodable = pd.Series(False, index=present.index) if decodable is None else decodable.astype(bool)
    if not (
        present.index.equals(excess.index)
        and present.index.equals(phase.index)
        and present.index.equals(decodable.index)
    ):
        raise FlowError("present, excess, phase and decodable must be indexed by the same layers")
    last = int(phase.max())
    layers = present.index[present.to_numpy()]
    early_decodable = decodable.index[(decodable & (phase < last)).to_numpy()]
    numbers: dict[str, Any] = {
        "layers_beyond_control": len(layers),
        "last_phase": last,
        "layers_decodable": int(decodable.sum()),
        "layers_decodable_before_last_phase": len(early_decodable),
    }
    if len(layers) == 0 and not decodable.any():
        return Verdict(
            "inconclusive",
            "no layer has more emotion-selective features than the shuffled-label control, and no layer's "
            "features carry emotion beyond it",
            numbers,
            rule="late_emergence_verdict",
        )
    decoded = (
        f"; features of layers {_layer_list(early_decodable)} carry emotion beyond the control before the last "
        "phase (top AUROCs or a probe on the codes)"
        if len(early_decodable)
        else ""
    )
    if len(layers) == 0:
        late = bool((decodable & (phase == last)).any())
        return Verdict(
            "partly" if late and len(early_decodable) == 0 else "does not hold",
            "no layer has more emotion-selective features than the shuffled-label control"
            + (decoded or "; only last-phase features carry emotion beyond it"),
            numbers,
            rule="late_emergence_verdict",
        )
    in_last = phase[layers] == last
    total = float(excess[present].sum())
    share_last = float(excess[present & (phase == last)].sum()) / total if total > 0 else np.nan
    first = layers[0]
    numbers |= {
        "layers_in_last_phase": int(in_last.sum()),
        "first_layer": int(first),
        "first_phase": int(phase[first]),
        "share_of_excess_in_last_phase": None if np.isnan(share_last) else share_last,
    }
    where = f"first at layer {first} (phase {phase[first]} of {last}); {share_last:.0%} of the excess in the last phase"
    if in_last.all() and len(early_decodable) == 0:
        decision, reason = (
            "holds",
            f"emotion-selective features beyond the control only in the last phase: {where}",
        )
    elif in_last.all():
        decision = "partly"
        reason = f"emotion-selective features beyond the control only in the last phase: {where}{decoded}"
    elif in_last.any() and share_last >= 0.5:
        decision = "partly"
        reason = f"emotion-selective features beyond the control also before the last phase: {where}{decoded}"
    else:
        decision = "does not hold"
        reason = (
            f"emotion-selective features beyond the control mostly before the last phase: {where}{decoded}"
        )
    return Verdict(decision, reason, numbers, rule="late_emergence_verdict")


def _layer_list(layers: Sequence[int]) -> str:
    """ "3-5, 9" for layers 3, 4, 5, 9: runs of consecutive layers as ranges."""
    runs: list[list[int]] = []
    for layer in sorted(int(x) for x in layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def phase_roles_verdict(shares: pd.DataFrame) -> Verdict:
    """Verdict on "syntax, then content, then emotion": `shares` (index: phase 1..3, columns template, content,
    emotion) holds each role's mean share of last-token activation per phase.

    Counts which of three expectations hold: template share highest in phase 1, content share highest in phase
    2, emotion share highest in phase 3. holds: 3 of 3; partly: 2; does not hold: 0 or 1; inconclusive: no
    emotion-feature activation anywhere or not three phases.
    """
    rule = "phase_roles_verdict"
    if len(shares) != 3 or not set(CARD_ROLES) <= set(shares.columns):
        return Verdict(
            "inconclusive",
            "needs three phases with template, content and emotion shares",
            {"phases": len(shares)},
            rule=rule,
        )
    emotion_total = float(np.nansum(shares["emotion"].to_numpy()))
    if not emotion_total > 0:
        return Verdict(
            "inconclusive",
            "no emotion-selective feature is active at the last token",
            {"emotion_share_total": emotion_total},
            rule=rule,
        )
    peaks = {role: int(shares[role].astype(float).idxmax()) for role in CARD_ROLES}
    met = [role for role, want in zip(CARD_ROLES, (1, 2, 3), strict=True) if peaks[role] == want]
    reason = ", ".join(f"{role} peaks in phase {p}" for role, p in peaks.items())
    verdict = {3: "holds", 2: "partly"}.get(len(met), "does not hold")
    numbers = {**{f"{role}_peak_phase": p for role, p in peaks.items()}, "as_expected": len(met)}
    return Verdict(verdict, f"{reason} (expected 1, 2, 3: {len(met)} of 3 as expected)", numbers, rule=rule)


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class FlowConfig:
    """Everything one model's flow study depends on (defaults: the full preset).

    `preset` keys the items and SAEs the study reads (`items`, `saes`). Per layer: `probe` reads the gold emotion
    from the residual stream and the SAE codes; `selectivity` decides which features are emotion-selective, beside
    label permutations (`n_shuffles`; None: enough that the smallest permutation p-value passes a Holm
    correction at `layer_alpha` across every layer, stopping a layer's shuffles once `shuffle_stop` of them reach
    its count); the phase profile averages `profile_metrics` over items and is cut into
    `candidates` phase counts, each change point priced by `penalty_resamples` item-bootstrap profiles
    (`bootstrap_penalty`), its boundaries resampled `n_boot` times. Feature roles come from every token of
    `role_prompts` analysis prompts (`roles` thresholds). `subsets` names the item subsets ("all", "correct");
    on correct items an emotion with fewer than `selectivity.min_items` items is left out. `sae_seeds` retrain
    every layer's SAE with other training seeds, on which the late-emergence rule is applied again under the same
    phase cut (a verdict the seeds disagree on is inconclusive).
    """

    preset: str = "full"
    items: AnalysisConfig = field(default_factory=AnalysisConfig)
    saes: SuiteConfig = field(default_factory=SuiteConfig)
    n_shuffles: int | None = None
    shuffle_stop: int = 10
    layer_alpha: float = 0.05
    n_boot: int = 200
    penalty_resamples: int = 1000
    role_prompts: int = 40
    probe: ProbeConfig = field(
        default_factory=lambda: ProbeConfig(folds=5, C=0.1, max_iter=3000, n_boot=1000, seed=0)
    )
    selectivity: SelectivityConfig = field(default_factory=lambda: SelectivityConfig(min_items=10))
    candidates: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    roles: RoleConfig = field(default_factory=RoleConfig)
    profile_metrics: tuple[tuple[str, str], ...] = tuple(PROFILE_METRICS.items())
    subsets: tuple[tuple[str, str], ...] = tuple(SUBSETS.items())
    sae_seeds: tuple[int, ...] = (1, 2)
    match_cosine: float = 0.9

    def __post_init__(self) -> None:
        unknown = [m for m, _ in self.profile_metrics if m not in PROFILE_METRICS]
        if unknown or not self.profile_metrics:
            raise FlowError(f"profile metrics must be among {list(PROFILE_METRICS)}, got {unknown or 'none'}")
        if not self.subsets or any(s not in SUBSETS for s, _ in self.subsets):
            raise FlowError(f"subsets must be among {list(SUBSETS)}, got {[s for s, _ in self.subsets]}")
        if 3 not in self.candidates:
            raise FlowError(
                f"the candidates must include three phases (the claim tested), got {self.candidates}"
            )
        if (
            min(
                self.n_shuffles or 1,
                self.shuffle_stop,
                self.n_boot,
                self.penalty_resamples,
                self.role_prompts,
            )
            < 1
        ):
            raise FlowError(
                "n_shuffles, shuffle_stop, n_boot, penalty_resamples and role_prompts must be at least 1"
            )
        if not 0 < self.layer_alpha < 1:
            raise FlowError(f"layer_alpha must be in (0, 1), not {self.layer_alpha}")
        if not 0 < self.match_cosine <= 1:
            raise FlowError(f"match_cosine must be in (0, 1], not {self.match_cosine}")
        if self.saes.training.seed in self.sae_seeds or len(set(self.sae_seeds)) < len(self.sae_seeds):
            raise FlowError(
                f"sae_seeds must be distinct and differ from the book SAEs' training seed "
                f"({self.saes.training.seed}), got {self.sae_seeds}"
            )

    def shuffles_for(self, n_layers: int) -> int:
        """Label permutations per layer: `n_shuffles`, or (None) the fewest whose smallest p-value, 1 / (1 + n),
        is below `layer_alpha / n_layers`, the first threshold of a Holm correction across the layers."""
        if self.n_shuffles is not None:
            return self.n_shuffles
        return math.floor(Fraction(n_layers) / Fraction(str(self.layer_alpha)))  # exact: 18 / 0.05 is 360

    def with_overrides(self, **overrides: Any) -> FlowConfig:
        """This config with the given fields replaced, ignoring those given as None (a chapter's optional
        parameters)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def summary(self) -> dict[str, Any]:
        """The settings as the chapter's results file records them (`config`)."""
        return {
            "preset": self.preset,
            "n_shuffles": self.n_shuffles,
            "shuffle_stop": self.shuffle_stop,
            "layer_alpha": self.layer_alpha,
            "n_boot": self.n_boot,
            "penalty_resamples": self.penalty_resamples,
            "role_prompts": self.role_prompts,
            "probe": {"folds": self.probe.folds, "C": self.probe.C, "n_boot": self.probe.n_boot},
            "selectivity": {
                "auroc_threshold": self.selectivity.auroc_threshold,
                "alpha": self.selectivity.alpha,
                "min_items": self.selectivity.min_items,
            },
            "profile_metrics": dict(self.profile_metrics),
            "candidates": list(self.candidates),
            "sae_seeds": list(self.sae_seeds),
            "match_cosine": self.match_cosine,
        }


# ------------------------------------------------------------------------------------------------ measurements


def item_subset(
    aset: AnalysisSet, subset: str, min_items: int
) -> tuple[np.ndarray, tuple[str, ...], dict[str, int]]:
    """Item indices and labels of a subset ("all" or "correct"), and the labels left out with their item counts.

    On correct items an emotion with fewer than `min_items` correct items is left out (with its items): the
    selectivity test needs that many per emotion.
    """
    if subset == "all":
        return np.arange(aset.n), tuple(aset.labels), {}
    if subset != "correct":
        raise FlowError(f"unknown item subset {subset!r}; choose one of {list(SUBSETS)}")
    correct = aset.correct
    counts = pd.Series(aset.gold[correct]).value_counts()
    kept = tuple(label for label in aset.labels if counts.get(label, 0) >= min_items)
    dropped = {label: int(counts.get(label, 0)) for label in aset.labels if label not in kept}
    return np.flatnonzero(correct & np.isin(aset.gold, kept)), kept, dropped


@dataclass
class _Measured:
    """One subset's per-layer measurements, with the in-memory pieces the roles and cards need."""

    table: pd.DataFrame
    values: dict[str, np.ndarray]
    selective: dict[int, SelectiveCount]
    per_emotion: pd.DataFrame
    codes: dict[int, np.ndarray]
    labels: tuple[str, ...]
    idx: np.ndarray
    final_agreement: float
    chance: float


def _hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class _Layer:
    """One layer's measurements on one subset: its table row, the per-item outcomes a phase profile averages,
    its selective features, its residuals and codes, and the lens's answers."""

    row: dict[str, Any]
    per_item: dict[str, np.ndarray]
    selective: SelectiveCount
    resid: Float[np.ndarray, "items d_model"]
    codes: Float[np.ndarray, "items features"]
    lens_pred: np.ndarray


def _measure_layer(
    lm: LoadedModel,
    aset: AnalysisSet,
    suite: SAESuite,
    layer: int,
    idx: np.ndarray,
    labels: tuple[str, ...],
    config: FlowConfig,
    text_codes: np.ndarray,
) -> _Layer:
    """Probes (residual and SAE codes), selective features with their null, the logit lens, at one layer; the
    same selectivity on the codes averaged over each text's own tokens (`text_codes`, rows `idx`)."""
    gold = aset.gold[idx]
    h = aset.resid(layer)[idx]
    sae = suite.saes[_hook(layer)]
    z = aset.codes(layer, sae)[idx]
    probe_h = probe_accuracy(h, gold, config.probe)
    probe_z = _codes_probe(z, gold, config.probe)
    # SAE adequacy at the answer position: what the reconstruction and the error term each carry
    with torch.no_grad():
        recon = sae.decode(torch.from_numpy(z).to(sae.W_dec.device)).cpu().numpy().astype(np.float64)
    error = h - recon
    no_control = dataclasses.replace(config.probe, control=False)
    probe_recon = probe_accuracy(recon, gold, no_control)
    probe_error = probe_accuracy(error, gold, no_control)
    variance = ExplainedVarianceCalculator()  # the appendix's FVE, restricted to the answer position
    variance.add_batch(torch.from_numpy(recon), torch.from_numpy(np.asarray(h, dtype=np.float64)))
    fve_answer = variance.compute()
    selective = _layer_selectivity(gold, labels, config, len(aset.layers), layer)
    sel, on_text = selective(z), selective(text_codes[idx])
    followed = gold_or_answer(z, gold, aset.predicted[idx], sel.selectivity.sets())
    lens, p_gold, log_mass = _lens_outcomes(lm, aset, h, gold)
    lens_pred = np.array(aset.labels)[lens.label_logprobs.argmax(axis=1)]
    lens_gold = mean_interval(p_gold, n_boot=config.probe.n_boot, seed=layer)
    row = {
        "layer": layer,
        "probe_resid": probe_h.accuracy.value,
        "probe_resid_low": probe_h.accuracy.low,
        "probe_resid_high": probe_h.accuracy.high,
        "probe_resid_control": probe_h.control.value,
        "probe_resid_control_high": probe_h.control.high,
        **_codes_probe_row(probe_z),
        "probe_folds": probe_h.folds,
        "probe_reconstruction": probe_recon.accuracy.value,
        "probe_reconstruction_low": probe_recon.accuracy.low,
        "probe_reconstruction_high": probe_recon.accuracy.high,
        "probe_error": probe_error.accuracy.value,
        "probe_error_low": probe_error.accuracy.low,
        "probe_error_high": probe_error.accuracy.high,
        "fve_answer": fve_answer,
        **sel.row(),
        **{f"text_{key}": value for key, value in on_text.row().items()},
        # on misclassified items: selective features that follow the gold label vs the model's answer
        "follow_gold": float(followed["follow_gold"].sum(min_count=1)),
        "follow_answer": float(followed["follow_answer"].sum(min_count=1)),
        "lens_gold": lens_gold.value,
        "lens_gold_low": lens_gold.low,
        "lens_gold_high": lens_gold.high,
        "lens_accuracy": float((lens_pred == gold).mean()),
        "lens_chance": permutation_chance(lens_pred, gold),
        "lens_mass": float(lens.mass.mean()),
        "lens_log_mass": float(log_mass.mean()),
        "sae_misses": suite.flag(layer),
    }
    per_item = {
        "probe_resid": probe_h.correct,
        "probe_sae": probe_z.correct,
        "lens_gold": p_gold,
        "lens_log_mass": log_mass,
    }
    return _Layer(row=row, per_item=per_item, selective=sel, resid=h, codes=z, lens_pred=lens_pred)


def _lens_outcomes(
    lm: LoadedModel, aset: AnalysisSet, h: np.ndarray, gold: np.ndarray
) -> tuple[Any, np.ndarray, np.ndarray]:
    """The logit lens at residuals `h`: the lens, p(gold | labels) and log10 p(any label) per item."""
    groups = label_first_tokens(aset.classifier.sequences, len(aset.labels))
    lens = logit_lens(lm.model, h, groups)
    p_gold = at_gold(lens.renormalised, gold, aset.labels)
    log_mass = np.logaddexp.reduce(lens.label_logprobs, axis=1) / np.log(10)  # log10 mass, no underflow
    return lens, p_gold, log_mass


def _layer_selectivity(
    gold: np.ndarray, labels: tuple[str, ...], config: FlowConfig, n_layers: int, layer: int
) -> functools.partial[SelectiveCount]:
    """The selectivity rule with its label permutations at one layer: the same at the answer, on the text's
    tokens and on a retrained seed's SAE, so their counts and p-values compare."""
    return functools.partial(
        selective_with_null,
        labels=gold,
        emotions=labels,
        config=config.selectivity,
        n_shuffles=config.shuffles_for(n_layers),
        seed=layer,
        stop_after=config.shuffle_stop,
    )


def _codes_probe(z: np.ndarray, gold: np.ndarray, probe: ProbeConfig) -> ProbeResult:
    """The emotion probe on SAE codes (beside its control if `probe` asks); constant columns carry nothing after
    standardising."""
    active = z.max(axis=0) > z.min(axis=0)
    return probe_accuracy(z[:, active], gold, probe)


def _codes_probe_row(probe: ProbeResult) -> dict[str, float]:
    return {
        "probe_sae": probe.accuracy.value,
        "probe_sae_low": probe.accuracy.low,
        "probe_sae_high": probe.accuracy.high,
        "probe_sae_control": probe.control.value,
        "probe_sae_control_high": probe.control.high,
    }


def _mark_beyond_control(frame: pd.DataFrame, config: FlowConfig, prefixes: Sequence[str]) -> None:
    """Add the Holm-corrected permutation p-values across layers and the "beyond control" flags the verdict reads
    (per prefix: "" for the answer position, "text_" for the text's tokens)."""
    for prefix in prefixes:
        frame[f"{prefix}selective_p_holm"] = holm_adjusted(frame[f"{prefix}selective_p"])
        frame[f"{prefix}selective_beyond_control"] = (
            frame[f"{prefix}selective_p_holm"] < config.layer_alpha
        ) & (frame[f"{prefix}selective"] > 0)
        frame[f"{prefix}auroc_top_beyond_control"] = (
            holm_adjusted(frame[f"{prefix}auroc_top_p"]) < config.layer_alpha
        )


def _measure(
    lm: LoadedModel,
    aset: AnalysisSet,
    suite: SAESuite,
    idx: np.ndarray,
    labels: tuple[str, ...],
    config: FlowConfig,
    text_codes: Mapping[int, np.ndarray],
) -> _Measured:
    """Every per-layer measurement of one model on one subset of its items, and consecutive-layer CKA."""
    layers = {
        layer: _measure_layer(lm, aset, suite, layer, idx, labels, config, text_codes[layer])
        for layer in aset.layers
    }
    last = layers[aset.layers[-1]]
    agreement = float(
        (last.lens_pred == aset.predicted[idx]).mean()
    )  # last layer: the lens is the classifier
    frame = pd.DataFrame([m.row for m in layers.values()]).set_index("layer")
    _mark_beyond_control(frame, config, ("", "text_"))
    frame["selective_shuffles"] = [len(m.selective.null_counts) for m in layers.values()]
    cka = consecutive_cka({layer: m.resid for layer, m in layers.items()}, seed=0)
    frame["cka"], frame["cka_control"] = cka["cka"], cka["control"]
    per_emotion = pd.DataFrame(
        {layer: m.selective.selectivity.counts() for layer, m in layers.items()}
    ).T.rename_axis("layer")
    return _Measured(
        table=frame,
        values={
            name: np.stack([m.per_item[name] for m in layers.values()]) for name, _ in config.profile_metrics
        },
        selective={layer: m.selective for layer, m in layers.items()},
        per_emotion=per_emotion,
        codes={layer: m.codes for layer, m in layers.items()},
        labels=labels,
        idx=idx,
        final_agreement=agreement,
        chance=1 / len(labels),
    )


def _phases(
    measured: _Measured, config: FlowConfig
) -> tuple[PhaseCountTest, dict[int, BoundaryBootstrap], dict[str, tuple[int, ...]]]:
    """Phase-count test, the three-phase cut and the chosen cut, with item-bootstrap intervals, and the
    three-phase boundaries with each profile metric left out."""
    return _cut_profile(measured.values, measured.table.index.tolist(), config)


def _cut_profile(
    values: Mapping[str, np.ndarray], layers: Sequence[int], config: FlowConfig
) -> tuple[PhaseCountTest, dict[int, BoundaryBootstrap], dict[str, tuple[int, ...]]]:
    """`_phases` of per-item outcomes `values` (metric -> [layers, items])."""
    profile_fn = functools.partial(item_metric_profile, values, layers=list(layers))
    n = next(iter(values.values())).shape[1]
    profile = profile_fn(np.arange(n))
    candidates = feasible_candidates(config.candidates, len(layers))
    rng = np.random.default_rng(1)  # not the boundary bootstrap's stream (seed 0)
    resamples = [profile_fn(rng.integers(0, n, size=n)) for _ in range(config.penalty_resamples)]
    penalty = bootstrap_penalty(profile, resamples) if len(candidates) > 1 else 0.0
    test = phase_count_test(profile, candidates, penalty=penalty)
    boots = {
        3: bootstrap_boundaries(
            profile_fn, n, 3, n_boot=config.n_boot, seed=0, candidates=candidates, penalty=penalty
        )
    }
    if test.chosen not in boots and test.chosen > 1:
        boots[test.chosen] = bootstrap_boundaries(profile_fn, n, test.chosen, n_boot=config.n_boot, seed=0)
    return test, boots, leave_one_metric_out(profile, 3)


@dataclass
class _Roles:
    """Feature roles per layer of one subset, their activation shares and counts."""

    roles: dict[int, pd.DataFrame]
    shares: pd.DataFrame
    counts: pd.DataFrame


def _role_prompts(
    lm: LoadedModel, aset: AnalysisSet, config: FlowConfig
) -> tuple[ActivationStore, list[np.ndarray], list[list[int]]]:
    """The `config.role_prompts` analysis prompts whose every token assigns feature roles: their stored residuals
    at every layer (cached), their text masks and their tokens."""
    chosen = np.sort(
        np.random.default_rng(0).choice(aset.n, size=min(config.role_prompts, aset.n), replace=False)
    )
    prompts = [aset.prompts[i] for i in chosen]
    store = extract_activations(
        lm,
        lm.info.name,
        prompts,
        ExtractionConfig(hooks=resid_hooks(lm.info.n_layers), mode="all", outlier_factor=5.0, progress=False),
        description=f"flow chapter role prompts: analysis items {chosen.tolist()} of {aset.dataset}",
        preset=config.preset,
        starts=[0] + [aset.prefix_length] * (len(prompts) - 1),  # the shared instruction prefix once
    )
    return store, [aset.text_masks[i] for i in chosen], prompts


def _roles(
    store: ActivationStore,
    masks: Sequence[np.ndarray],
    saes: Mapping[str, Any],
    layers: Sequence[int],
    selections: Mapping[str, tuple[Mapping[int, SelectiveCount], Mapping[int, np.ndarray]]],
    config: FlowConfig,
    keep_tokens: bool = False,
) -> tuple[dict[str, _Roles], dict[int, TokenCodes]]:
    """Feature roles per layer from the role prompts' all-token codes through `saes`, per subset (`selections`:
    its selective features and answer-position codes by layer); the token codes too when `keep_tokens` (the
    feature cards read them; they are large)."""
    roles: dict[str, dict[int, pd.DataFrame]] = {s: {} for s in selections}
    shares: dict[str, dict[int, dict[str, float]]] = {s: {} for s in selections}
    tokens_by_layer = {}
    for layer in layers:
        hook = _hook(layer)
        tokens = token_codes(store, hook, saes[hook].encode, masks)
        if keep_tokens:
            tokens_by_layer[layer] = tokens
        for s, (selective, codes) in selections.items():
            layer_roles = feature_roles(
                tokens.codes, tokens.is_template, selective[layer].selectivity, config.roles
            )
            roles[s][layer] = layer_roles
            shares[s][layer] = role_mass_shares(codes[layer], layer_roles["role"].astype(str), ROLES)
    out = {
        s: _Roles(
            roles=roles[s],
            shares=pd.DataFrame(shares[s]).T.rename_axis("layer"),
            counts=pd.DataFrame(
                {layer: r["role"].value_counts() for layer, r in roles[s].items()}
            ).T.rename_axis("layer")[list(ROLES)],
        )
        for s in selections
    }
    return out, tokens_by_layer


def _shares_per_phase(roles: _Roles, cut: BoundaryBootstrap) -> pd.DataFrame:
    """Each role's mean share of the answer position's activation per phase of `cut` (what the roles rule reads)."""
    return roles.shares.groupby(cut.point.phase_of(roles.shares.index.tolist())).mean()


def _short(text: str, n: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cards(
    lm: LoadedModel,
    aset: AnalysisSet,
    suite: SAESuite,
    measured: _Measured,
    cut: BoundaryBootstrap,
    roles: _Roles,
    tokens_by_layer: Mapping[int, TokenCodes],
    prompts: Sequence[Sequence[int]],
) -> pd.DataFrame:
    """Per phase of the three-phase cut, the layer with the most emotion-selective features (the phase's last layer
    if none has any), and per role the feature of that role carrying the most answer-position activation."""
    t = measured.table
    rows = []
    for p, (first, last) in enumerate(cut.point.phases, start=1):
        counts = t.loc[first:last, "selective"]
        layer = int(counts[::-1].idxmax()) if counts.max() > 0 else int(last)
        codes = measured.codes[layer]
        role = roles.roles[layer]["role"].astype(str).to_numpy()
        mass = codes.sum(axis=0)
        sel = measured.selective[layer].selectivity
        tokens = tokens_by_layer[layer]
        for wanted in CARD_ROLES:
            members = np.flatnonzero(role == wanted)
            if members.size == 0 or mass[members].max() <= 0:
                rows.append({"phase": p, "layer": layer, "role": wanted, "feature": "none active"})
                continue
            f = int(members[np.argmax(mass[members])])
            emotions = [
                f"{e} ({sel.auroc[f, j]:.2f})" for j, e in enumerate(sel.emotions) if sel.selective[f, j]
            ]
            top = top_activating(
                codes[:, f], [aset.texts[i] for i in measured.idx], k=3, labels=aset.gold[measured.idx]
            )
            tok = top_tokens(tokens.codes[:, f], tokens, prompts, lm.tokenizer.decode, k=3)
            promoted = promoted_tokens(suite.saes[_hook(layer)].W_dec[f], lm.model, lm.tokenizer, k=6)
            rows.append(
                {
                    "phase": p,
                    "layer": layer,
                    "role": wanted,
                    "feature": f,
                    "selective for (AUROC)": ", ".join(emotions),
                    "share of answer-position mass": mass[f] / mass.sum(),
                    "top items at the answer (gold: text)": " | ".join(
                        f"{row.label}: {_short(row.text, 50)}" for row in top.itertuples()
                    ),
                    "top prompt tokens": " | ".join(_short(c, 45) for c in tok["context"]),
                    "promotes": " ".join(repr(x) for x in promoted["token"]),
                    "SAE misses": suite.flag(layer),
                }
            )
    return pd.DataFrame(rows).set_index(["phase", "layer", "role"])


def _late_emotion(per_layer: pd.DataFrame, phase: pd.Series) -> Verdict:
    """The late-emergence rule (uncapped) on one set of SAEs' per-layer answer-position measurements."""
    present = per_layer["selective_beyond_control"].astype(bool)
    excess = per_layer["selective"] - per_layer["selective_null_mean"]
    return late_emergence_verdict(present, excess, phase, decodable_layers(per_layer))


def _layers_read(per_layer: pd.DataFrame) -> list[int]:
    """The layers whose features show emotion (counted or carried): those the late-emergence verdict rests on."""
    read = per_layer["selective_beyond_control"].astype(bool) | decodable_layers(per_layer)
    return [int(layer) for layer in per_layer.index[read.to_numpy()]]


def late_emotion_finding(
    per_layer: pd.DataFrame, phase: pd.Series, seeds: Mapping[int, Verdict], book_seed: int
) -> Verdict:
    """The chapter's late-emergence verdict on one subset: the rule on the book SAEs' per-layer measurements
    (`per_layer`, with each layer's `sae_misses`), read against the rule's outcomes on SAEs retrained with other
    seeds (`seeds`, by seed: any disagreement makes it inconclusive), then capped when most of the layers whose
    features show emotion read through SAEs that miss a quality goal."""
    late = stable_across_seeds(_late_emotion(per_layer, phase), seeds, book_seed)
    misses = {layer: str(per_layer.loc[layer, "sae_misses"] or "") for layer in _layers_read(per_layer)}
    return capped_by_sae(late, misses)


def _verdicts(
    measured: _Measured,
    test: PhaseCountTest,
    cut: BoundaryBootstrap,
    phase_shares: pd.DataFrame,
    without: Mapping[str, Sequence[int]],
    seeds: Mapping[int, Mapping[str, Verdict]],
    book_seed: int,
) -> dict[str, Verdict]:
    """The chapter's verdicts on one subset; `seeds` are the feature-level rules' outcomes on SAEs retrained with
    other seeds (by seed, then claim), against which the book SAEs' (`book_seed`) outcomes must stand."""
    t = measured.table
    other = {claim: {seed: v[claim] for seed, v in seeds.items()} for claim in SEED_CLAIMS}
    return {
        "three_phases": three_phase_verdict(
            test.chosen,
            test.at_largest,
            cut.counts.get(3, 0.0),
            test.three_beats_trend,
            _r2_pair(test),
            moved_boundaries(_phase_cut(cut), without),
        ),
        "late_emotion": late_emotion_finding(
            t, cut.point.phase_of(t.index.tolist()), other["late_emotion"], book_seed
        ),
        "phase_roles": stable_across_seeds(
            phase_roles_verdict(phase_shares[list(CARD_ROLES)]), other["phase_roles"], book_seed
        ),
    }


def _seed_layers(
    aset: AnalysisSet, saes: Mapping[str, Any], idx: np.ndarray, labels: tuple[str, ...], config: FlowConfig
) -> tuple[pd.DataFrame, dict[int, SelectiveCount], dict[int, np.ndarray]]:
    """Per layer, what the late-emergence rule reads at the answer position (the SAE-code probe and the selective
    features with their permutations, Holm-corrected across layers), through a retrained seed's SAEs; and the
    selective features and codes by layer, which the roles rule reads."""
    gold, rows, selective, codes = aset.gold[idx], [], {}, {}
    for layer in aset.layers:
        codes[layer] = aset.codes(layer, saes[_hook(layer)])[idx]
        selective[layer] = _layer_selectivity(gold, labels, config, len(aset.layers), layer)(codes[layer])
        probe = _codes_probe(codes[layer], gold, config.probe)
        rows.append({"layer": layer, **_codes_probe_row(probe), **selective[layer].row()})
    frame = pd.DataFrame(rows).set_index("layer")
    _mark_beyond_control(frame, config, ("",))
    return frame, selective, codes


def seed_row(
    items: str,
    seed: int,
    per_layer: pd.DataFrame,
    phase: pd.Series,
    verdicts: Mapping[str, Verdict],
    misses: Mapping[int, str],
) -> dict[str, Any]:
    """One SAE training seed's row of the seed table: the layers whose features show emotion (all, and those
    before the last phase), each feature-level rule's outcome before the SAE cap (`verdicts`, by claim), and how
    many of the layers read miss an SAE goal (`misses`: layer -> goals, for that seed's SAEs; a layer without a
    measurement counts as missing)."""
    read = _layers_read(per_layer)
    early = [layer for layer in read if phase[layer] < phase.max()]
    share = verdicts["late_emotion"].numbers.get("share_of_excess_in_last_phase")
    return {
        "items": items,
        "seed": seed,
        "layers showing emotion": _layer_list(read) if read else "none",
        "of them before the last phase": _layer_list(early) if early else "none",
        "share of the excess in the last phase": np.nan if share is None else share,
        "SAEs missing a goal": goals_missed({layer: misses.get(layer, "not measured") for layer in read}),
        **{CLAIMS[claim]: verdict.verdict for claim, verdict in verdicts.items()},
    }


def seed_feature_rows(
    seed: int,
    book_saes: Mapping[str, Any],
    seed_saes: Mapping[str, Any],
    book: Mapping[int, SelectiveCount],
    retrained: Mapping[int, SelectiveCount],
    match_cosine: float,
) -> list[dict[str, Any]]:
    """Per layer, how much of the book SAE's dictionary one seed's SAE learns again (`sae.matching`): among the
    features active on the analysis items, and among the emotion-selective ones, with the share of those whose
    partner the seed's own selectivity test finds selective for the same emotions. The random dictionary (seeded
    by `seed`) gives the median best cosine that chance reaches."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in sorted(book):
        sel, other = book[layer].selectivity, retrained[layer].selectivity
        hook = _hook(layer)
        match = match_features(
            book_saes[hook].W_dec, seed_saes[hook].W_dec, np.flatnonzero(sel.tested), rng, match_cosine
        )
        selective = sel.selective[match.features].any(axis=1)
        same = (sel.selective[match.features] == other.selective[match.partner]).all(axis=1)
        rows.append(
            {
                "seed": seed,
                "layer": layer,
                "active features": match.n,
                "found again": match.n_found,
                "median best cosine": match.median_best,
                "median best cosine, random dictionary": match.median_chance,
                "selective features": int(selective.sum()),
                "selective found again": int(match.found[selective].sum()),
                "same emotions": int((match.found & same)[selective].sum()),
            }
        )
    return rows


def _r2_pair(test: PhaseCountTest) -> tuple[float, float] | None:
    """(R^2 of the best three phases, R^2 of the smooth trend) on the z-scored profile."""
    if test.three_beats_trend is None:
        return None
    return float(test.table.loc[3, "r2"]), test.trend_r2


def _phase_cut(boot: BoundaryBootstrap) -> PhaseCut:
    return PhaseCut(phases=tuple(tuple(p) for p in boot.point.phases), intervals=tuple(boot.intervals))


def _answer_outliers(lm: LoadedModel, aset: AnalysisSet, suite: SAESuite) -> np.ndarray:
    """Per item and layer, 1.0 where the SAE-training outlier rule flags the answer position, else 0.0 (NaN when
    the suite drops no outliers or is a pretrained release, whose training rule we do not know)."""
    factor = suite.config.extraction.outlier_factor
    if factor is None or suite.release is not None:
        return np.full((aset.n, len(aset.layers)), np.nan)
    hooks = [_hook(layer) for layer in aset.layers]
    return last_token_outliers(
        lm.model, aset.prompts, hooks, factor, skip_first=suite.config.extraction.skip_first
    ).astype(float)


def _text_codes(lm: LoadedModel, aset: AnalysisSet, suite: SAESuite) -> dict[int, np.ndarray]:
    """Per layer, each analysis item's SAE codes averaged over its text's own tokens (not the template's): where
    emotion words sit, before any of it has to reach the answer position."""
    encoders = {_hook(layer): suite.saes[_hook(layer)].encode for layer in aset.layers}
    codes = masked_mean_codes(
        lm.model, aset.prompts, aset.text_masks, encoders, shared=aset.prefix_length, progress=True
    )
    return {layer: codes[_hook(layer)] for layer in aset.layers}


def holm_adjusted(p_values: pd.Series) -> pd.Series:
    """Per-layer permutation p-values after a Holm correction across layers (an untested layer, NaN, counts as
    p = 1)."""
    return pd.Series(multipletests(p_values.fillna(1.0), method="holm")[1], index=p_values.index)


def decodable_layers(per_layer: pd.DataFrame) -> pd.Series:
    """Layers whose SAE features carry emotion beyond their shuffled-label control without a count threshold:
    the mean of the top AUROCs beats its permutations (Holm-corrected), or a probe on the codes lies above its
    control (interval ends apart). False throughout for results files from before the AUROC statistics."""
    top = per_layer.get("auroc_top_beyond_control", pd.Series(False, index=per_layer.index))
    probe = per_layer["probe_sae_low"] > per_layer["probe_sae_control_high"]
    return top.astype(bool) | probe


def _build(lm: LoadedModel, aset: AnalysisSet, suite: SAESuite, config: FlowConfig) -> FlowResult:
    """The whole study of one model (uncached): measurements, phases, roles, cards and verdicts per subset."""
    names = dict(config.subsets)
    parts = {s: item_subset(aset, s, config.selectivity.min_items) for s in names}
    measured: dict[str, _Measured] = {}
    phases: dict[str, tuple[PhaseCountTest, dict[int, BoundaryBootstrap]]] = {}
    skipped: dict[str, str] = {}
    timings: dict[str, float] = {}
    answer_outliers = _answer_outliers(lm, aset, suite)
    began = time.time()
    text_codes = _text_codes(lm, aset, suite)
    timings["text codes"] = time.time() - began
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="probe folds reduced")  # the fold count is in the tables
        for s, (idx, labels, _) in parts.items():
            if len(labels) < 2:
                skipped[s] = f"fewer than two emotions have {config.selectivity.min_items} or more {names[s]}"
                continue
            began = time.time()
            measured[s] = _measure(lm, aset, suite, idx, labels, config, text_codes)
            measured[s].table["answer_outlier"] = answer_outliers[idx].mean(axis=0)
            phases[s] = _phases(measured[s], config)
            timings[s] = time.time() - began
    began = time.time()
    role_prompts = _role_prompts(lm, aset, config)
    store, masks, prompts = role_prompts
    selections = {s: (m.selective, m.codes) for s, m in measured.items()}
    roles, tokens_by_layer = _roles(
        store, masks, suite.saes, aset.layers, selections, config, keep_tokens=True
    )
    timings["roles"] = time.time() - began
    by_seed, seed_rows, feature_rows = _seed_verdicts(
        lm, aset, suite, measured, phases, roles, role_prompts, config, timings
    )
    subsets: dict[str, SubsetFlow | SkippedSubset] = {}
    for s, (idx, labels, dropped) in parts.items():
        if s in skipped:
            subsets[s] = SkippedSubset(
                items=names[s], reason=skipped[s], n_items=len(idx), labels=labels, left_out=dropped
            )
            continue
        m, (test, boots, without), r = measured[s], phases[s], roles[s]
        shares_per_phase = _shares_per_phase(r, boots[3])
        counts_per_phase = r.counts.groupby(boots[3].point.phase_of(r.counts.index.tolist())).mean()
        subsets[s] = SubsetFlow(
            items=names[s],
            n_items=len(m.idx),
            labels=m.labels,
            left_out=dropped,
            per_layer=m.table,
            per_emotion=m.per_emotion,
            test=test.table,
            chosen=test.chosen,
            penalty=test.penalty,
            trend_r2=test.trend_r2,
            choice_shares=boots[3].counts,
            cuts={k: _phase_cut(boot) for k, boot in boots.items()},
            boundary_frequency=boots[3].boundary_frequency(),
            role_shares=r.shares,
            role_shares_per_phase=shares_per_phase,
            role_counts=r.counts,
            role_counts_per_phase=counts_per_phase,
            final_agreement=m.final_agreement,
            chance=m.chance,
            verdicts=_verdicts(
                m, test, boots[3], shares_per_phase, without, by_seed[s], config.saes.training.seed
            ),
            boundaries_without={k: tuple(v) for k, v in without.items()},
        )
    cards = pd.DataFrame()
    if "all" in measured:
        cards = _cards(
            lm, aset, suite, measured["all"], phases["all"][1][3], roles["all"], tokens_by_layer, prompts
        )
    first_hook = suite.hooks[0]
    return FlowResult(
        model=lm.info.name,
        dataset=aset.dataset,
        labels=tuple(aset.labels),
        subsets=subsets,
        feature_cards=cards,
        facts={
            "dataset": aset.dataset,
            "labels": ", ".join(aset.labels),
            "items": aset.n,
            "model accuracy": float(aset.correct.mean()),
            "layers": len(aset.layers),
            "SAE width": int(suite.saes[first_hook].cfg.d_sae),
            "scoring": aset.classifier.scoring_mode,
        },
        sae_summary=goal_summary(suite.quality, suite.k),
        role_prompts=len(prompts),
        timings=timings,
        seeds=pd.DataFrame(seed_rows).set_index(["items", "seed"]) if seed_rows else None,
        seed_features=pd.DataFrame(feature_rows).set_index(["seed", "layer"]) if feature_rows else None,
    )


def _seed_verdicts(
    lm: LoadedModel,
    aset: AnalysisSet,
    suite: SAESuite,
    measured: Mapping[str, _Measured],
    phases: Mapping[str, tuple[PhaseCountTest, dict[int, BoundaryBootstrap], Any]],
    roles: Mapping[str, _Roles],
    role_prompts: tuple[ActivationStore, list[np.ndarray], Any],
    config: FlowConfig,
    timings: dict[str, float],
) -> tuple[dict[str, dict[int, dict[str, Verdict]]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Per subset, the feature-level rules' outcomes (`SEED_CLAIMS`) on every layer's SAE retrained with each of
    `config.sae_seeds` (under the book SAEs' phase cut: the seeds test the features, not the cut), the seed
    table's rows, the book SAEs' first, and per seed and layer how much of the book SAE's dictionary the seed
    learns again (`seed_feature_rows`, selectivity of the first item subset). None for a pretrained release: one
    set of SAEs."""
    by_seed: dict[str, dict[int, dict[str, Verdict]]] = {s: {} for s in measured}
    rows = []
    boots = {s: phases[s][1][3] for s in measured}
    cut = {s: boots[s].point.phase_of(list(aset.layers)) for s in measured}
    book_misses = {layer: suite.flag(layer) for layer in aset.layers}
    for s, m in measured.items():
        book = {
            "late_emotion": _late_emotion(m.table, cut[s]),
            "phase_roles": phase_roles_verdict(_shares_per_phase(roles[s], boots[s])[list(CARD_ROLES)]),
        }
        rows.append(seed_row(SUBSETS[s], config.saes.training.seed, m.table, cut[s], book, book_misses))
    store, masks, _ = role_prompts
    feature_rows: list[dict[str, Any]] = []
    for seed in config.sae_seeds:
        began = time.time()
        retrained = seed_saes(lm, config.preset, config.saes, aset.layers, seed)
        if not retrained:
            return {s: {} for s in measured}, [], []
        misses = seed_flags(lm, suite, retrained, seed)
        layers = {s: _seed_layers(aset, retrained, m.idx, m.labels, config) for s, m in measured.items()}
        selections = {s: (selective, codes) for s, (_, selective, codes) in layers.items()}
        seed_roles, _ = _roles(store, masks, retrained, aset.layers, selections, config)  # one encoding pass
        for s, (per_layer, _, _) in layers.items():
            shares = _shares_per_phase(seed_roles[s], boots[s])[list(CARD_ROLES)]
            by_seed[s][seed] = {
                "late_emotion": _late_emotion(per_layer, cut[s]),
                "phase_roles": phase_roles_verdict(shares),
            }
            rows.append(seed_row(SUBSETS[s], seed, per_layer, cut[s], by_seed[s][seed], misses))
        first = next(iter(measured))
        feature_rows += seed_feature_rows(
            seed, suite.saes, retrained, measured[first].selective, layers[first][1], config.match_cosine
        )
        timings[f"SAE seed {seed}"] = time.time() - began
    rows.sort(key=lambda row: list(SUBSETS.values()).index(row["items"]))
    return by_seed, rows, feature_rows


def run_flow(model: str | LoadedModel, config: FlowConfig | None = None) -> FlowResult:
    """The flow study of one model (a name, loaded with `load_model`, or a `LoadedModel`), cached under the
    config and the keys of the items and SAEs it reads."""
    config = config or FlowConfig()
    lm = load_model(model) if isinstance(model, str) else model
    aset = analysis_set(lm, config.preset, config.items)
    suite = sae_suite(lm, config.preset, config.saes)
    key_parts = (STUDY_VERSION, config, aset.store.key, suite.key)
    return cached_result(FlowResult, lm.info.cache_name, key_parts, lambda: _build(lm, aset, suite, config))


# ------------------------------------------------------------------------------------------------ result
# Later chapters read a flow result only through `FlowResult.cut`, `phases`, `final_phase` and `chosen_phase_count`.


@dataclass(frozen=True)
class PhaseCut:
    """The best cut of one subset's layer profile into `len(phases)` phases: `phases` as (first, last) layers,
    `intervals` the item-bootstrap intervals of the boundaries (first layers of phases 2..n)."""

    phases: tuple[tuple[int, int], ...]
    intervals: tuple[Estimate, ...]

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The first layer of every phase but the first."""
        return tuple(first for first, _ in self.phases[1:])

    def layers(self) -> dict[str, tuple[int, ...]]:
        """`{"phase 1": (0, 1, ...), ...}`: every layer of each phase, contiguous and in order."""
        out = {f"phase {i}": tuple(range(first, last + 1)) for i, (first, last) in enumerate(self.phases, 1)}
        flat = [layer for members in out.values() for layer in members]
        if not flat or flat != list(range(flat[0], flat[0] + len(flat))):
            raise FlowError(f"the cut {self.phases} is not a contiguous range of layers")
        return out

    def phase_of(self, layers: Sequence[int]) -> pd.Series:
        """Phase number (1-based) of every layer in `layers` (index "layer", name "phase")."""
        starts = [first for first, _ in self.phases]
        numbers = np.searchsorted(starts, list(layers), side="right")
        return pd.Series(numbers, index=pd.Index(list(layers), name="layer"), name="phase")

    def boundaries_text(self) -> str:
        """`4 [3, 6], 9 [8, 10]`: each boundary with its 95% bootstrap interval ("none" for one phase)."""
        return ", ".join(format_interval(e.value, e.low, e.high, digits=0) for e in self.intervals) or "none"

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


def _series(rows: Sequence[Mapping[str, Any]] | None, index: str, column: str) -> pd.Series | None:
    if rows is None:
        return None
    frame = pd.DataFrame.from_records(list(rows), columns=[index, column])
    return frame.set_index(index)[column]


def _optional_table(rows: Sequence[Mapping[str, Any]] | None, index: str) -> pd.DataFrame | None:
    return None if rows is None else table(rows, index)


@dataclass
class SkippedSubset:
    """An item subset with too few items to analyse: why, and (when recorded) its size and left-out labels."""

    items: str
    reason: str
    n_items: int | None = None
    labels: tuple[str, ...] | None = None
    left_out: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"not_analysed": self.reason, "items": self.items}
        if self.n_items is not None:
            out |= {
                "n_items": self.n_items,
                "labels": list(self.labels or ()),
                "left_out": dict(self.left_out or {}),
            }
        return out

    @classmethod
    def from_json(cls, subset: str, payload: Mapping[str, Any]) -> SkippedSubset:
        return cls(
            items=payload.get("items", SUBSETS.get(subset, subset)),
            reason=payload["not_analysed"],
            n_items=payload.get("n_items"),
            labels=None if "labels" not in payload else tuple(payload["labels"]),
            left_out=payload.get("left_out"),
        )


@dataclass
class SubsetFlow:
    """One item subset's flow analysis.

    `per_layer` (index layer) holds every per-layer measurement with its interval and control (columns as in the
    chapter's figures); `per_emotion` the selective-feature counts per emotion; `test` the phase-count test's table
    (index n_phases: cost, r2, reduction, paid, criterion, boundaries), `chosen` its choice, `penalty` its price
    per boundary, `choice_shares` the share of item resamples choosing each count; `cuts[n]` the best n-phase
    cut with bootstrap intervals (n = 3 and the chosen count); `boundary_frequency` the share of resamples that
    start a phase at each layer (three-phase cut); role shares and counts per layer and their means per phase;
    `final_agreement` how often the last layer's lens answers as the classifier; `chance` one over the labels.
    Fields a results file of the earlier layout lacks are None.
    """

    items: str
    n_items: int
    labels: tuple[str, ...]
    per_layer: pd.DataFrame
    per_emotion: pd.DataFrame
    test: pd.DataFrame
    chosen: int
    penalty: float
    choice_shares: pd.Series
    cuts: dict[int, PhaseCut]
    role_shares: pd.DataFrame
    role_shares_per_phase: pd.DataFrame
    verdicts: dict[str, Verdict]
    chance: float
    left_out: dict[str, int] | None = None
    boundary_frequency: pd.Series | None = None
    role_counts: pd.DataFrame | None = None
    role_counts_per_phase: pd.DataFrame | None = None
    final_agreement: float | None = None
    trend_r2: float | None = None  # share of the profile's variance the smooth (cubic) trend explains
    boundaries_without: dict[str, tuple[int, ...]] | None = (
        None  # three-phase boundaries, one metric left out
    )

    @property
    def at_largest(self) -> bool:
        """The largest candidate phase count won (no count is supported)."""
        return self.chosen == self.test.index.max() and len(self.test) > 1

    def cut(self, n_phases: int = 3) -> PhaseCut:
        if n_phases not in self.cuts:
            raise FlowError(f"no {n_phases}-phase cut of {self.items} (have {sorted(self.cuts)})")
        return self.cuts[n_phases]

    def to_json(self) -> dict[str, Any]:
        out = {
            "items": self.items,
            "n_items": self.n_items,
            "labels": list(self.labels),
            "per_layer": records(self.per_layer),
            "selective_per_emotion": records(self.per_emotion),
            "phase_count_test": {
                "table": records(self.test),
                "chosen": self.chosen,
                "penalty": self.penalty,
                "trend_r2": self.trend_r2,
                "bootstrap_choice_shares": {str(k): float(v) for k, v in self.choice_shares.items()},
            },
            "boundaries": {str(k): cut.to_json() for k, cut in self.cuts.items()},
            "role_shares_per_layer": records(self.role_shares),
            "role_shares_per_phase": records(self.role_shares_per_phase),
            "verdicts": {
                k: {"verdict": v.verdict, "reason": v.reason, "numbers": dict(v.numbers), "rule": v.rule}
                for k, v in self.verdicts.items()
            },
            "chance": self.chance,
        }
        optional = {
            "left_out": self.left_out,
            "boundary_frequency": None
            if self.boundary_frequency is None
            else records(self.boundary_frequency.rename_axis("layer").rename("share").to_frame()),
            "role_counts_per_layer": None if self.role_counts is None else records(self.role_counts),
            "role_counts_per_phase": None
            if self.role_counts_per_phase is None
            else records(self.role_counts_per_phase),
            "final_agreement": self.final_agreement,
            "boundaries_without": None
            if self.boundaries_without is None
            else {k: list(v) for k, v in self.boundaries_without.items()},
        }
        return out | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_json(cls, subset: str, payload: Mapping[str, Any]) -> SubsetFlow:
        test = payload["phase_count_test"]
        test_table = _test_table(test["table"])
        shares = test["bootstrap_choice_shares"]
        labels = tuple(payload["labels"])
        return cls(
            items=payload.get("items", SUBSETS.get(subset, subset)),
            n_items=int(payload["n_items"]),
            labels=labels,
            per_layer=_with_beyond_control(table(payload["per_layer"], "layer")),
            per_emotion=table(payload["selective_per_emotion"], "layer"),
            test=test_table,
            chosen=int(test["chosen"]),
            penalty=float(test["penalty"]),
            trend_r2=test.get("trend_r2"),
            boundaries_without=_without(payload.get("boundaries_without")),
            choice_shares=pd.Series(
                {int(k): float(v) for k, v in shares.items()}, dtype=float, name="proportion"
            ).rename_axis("n_phases"),
            cuts={int(k): PhaseCut.from_json(v) for k, v in payload["boundaries"].items()},
            role_shares=table(payload["role_shares_per_layer"], "layer"),
            role_shares_per_phase=table(payload["role_shares_per_phase"], "phase"),
            verdicts={k: Verdict.from_dict(v) for k, v in payload["verdicts"].items()},
            chance=float(payload.get("chance", 1 / len(labels))),
            left_out=payload.get("left_out"),
            boundary_frequency=_series(payload.get("boundary_frequency"), "layer", "share"),
            role_counts=_optional_table(payload.get("role_counts_per_layer"), "layer"),
            role_counts_per_phase=_optional_table(payload.get("role_counts_per_phase"), "phase"),
            final_agreement=payload.get("final_agreement"),
        )


def _test_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A phase-count test's table from its JSON rows (index n_phases, boundaries as tuples)."""
    test = table(rows, "n_phases")
    if "boundaries" in test:
        test["boundaries"] = [tuple(b) for b in test["boundaries"]]
    return test


def _without(payload: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]] | None:
    return None if payload is None else {k: tuple(int(b) for b in v) for k, v in payload.items()}


def _with_beyond_control(per_layer: pd.DataFrame) -> pd.DataFrame:
    """Results files written before the Holm-corrected test carry only "more than every permutation" (an
    uncorrected rule): read it as such, so earlier books still render."""
    if "selective_beyond_control" not in per_layer.columns:
        per_layer = per_layer.assign(selective_beyond_control=per_layer["selective_exceeds_null"])
    return per_layer


def first_layer(mask: pd.Series) -> int | None:
    """The first layer where `mask` (indexed by layer) is True, or None."""
    hits = mask[mask.astype(bool)].index
    return int(hits[0]) if len(hits) else None


def emergence_row(per_layer: pd.DataFrame, cut: PhaseCut, n_items: int) -> dict[str, Any]:
    """Where emotion information first appears in one subset's per-layer table, and in which phase of `cut`.

    Selective features: the first layer whose count beats the label permutations (Holm-corrected across layers,
    `selective_beyond_control`). A probe is above its
    control where the lower end of its accuracy interval lies above the upper end of the shuffled-label control's;
    the lens is above chance where its accuracy exceeds the permutation chance by more than two binomial standard
    errors (`emolib.methods.lens.above_permutation_chance`).
    """
    t = per_layer
    phase = cut.phase_of(t.index.tolist())
    first_sel = first_layer(t["selective_beyond_control"].astype(bool))
    first_probe = first_layer(t["probe_resid_low"] > t["probe_resid_control_high"])
    first_probe_sae = first_layer(t["probe_sae_low"] > t["probe_sae_control_high"])
    first_lens = first_layer(above_permutation_chance(t["lens_accuracy"], t["lens_chance"], n_items))

    def where(layer: int | None) -> str:
        return "none" if layer is None else f"{layer} ({phase[layer]})"

    def first_of(column: str) -> str:  # columns measured since flow STUDY_VERSION 4
        return where(first_layer(t[column].astype(bool))) if column in t.columns else "not measured"

    return {
        "layers with features beyond control": int(t["selective_beyond_control"].astype(bool).sum()),
        "first such layer (phase)": where(first_sel),
        "SAE misses there": "" if first_sel is None else t.loc[first_sel, "sae_misses"],
        "peak count (layer)": f"{t['selective'].max()} ({t['selective'].idxmax()})",
        "first layer, residual probe above control (phase)": where(first_probe),
        "first layer, SAE probe above control (phase)": where(first_probe_sae),
        "first layer, lens above chance (phase)": where(first_lens),
        f"first layer, top-{TOP_AUROCS} AUROC beyond null (phase)": first_of("auroc_top_beyond_control"),
        "first layer, text-token features beyond control (phase)": first_of("text_selective_beyond_control"),
        f"first layer, text-token top-{TOP_AUROCS} AUROC beyond null (phase)": first_of(
            "text_auroc_top_beyond_control"
        ),
    }


@dataclass
class FlowResult:
    """One model's flow study: per item subset (`subsets`, in order "all", "correct") a `SubsetFlow` or, when the
    subset has too few items, a `SkippedSubset`; the feature cards of the three-phase cut on all items; facts
    about the items and SAEs. Later chapters read only `cut`, `phases`, `final_phase` and `chosen_phase_count`.
    """

    study: ClassVar[str] = "flow"

    model: str
    dataset: str
    labels: tuple[str, ...]
    subsets: dict[str, SubsetFlow | SkippedSubset]
    feature_cards: pd.DataFrame = field(default_factory=pd.DataFrame)
    facts: dict[str, Any] = field(default_factory=dict)
    sae_summary: str = ""
    role_prompts: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: Per item subset and SAE training seed (the book's first): what the late-emergence rule reads, and the
    #: outcomes of the rules that read SAE features, late emergence before the SAE cap (None without retrained
    #: seeds, or for results written before they were).
    seeds: pd.DataFrame | None = None
    #: Per SAE seed and layer: how much of the book SAE's dictionary the seed's SAE learns again
    #: (`seed_feature_rows`; None without retrained seeds).
    seed_features: pd.DataFrame | None = None

    # ---------------------------------------------------------------- accessors (used by later chapters)

    @property
    def analysed(self) -> dict[str, SubsetFlow]:
        """The subsets with enough items to analyse."""
        return {s: part for s, part in self.subsets.items() if isinstance(part, SubsetFlow)}

    @property
    def cuts(self) -> dict[str, dict[int, PhaseCut]]:
        """`cuts[subset][n]`: the best n-phase cut of each analysed subset."""
        return {s: part.cuts for s, part in self.analysed.items()}

    @property
    def chosen(self) -> dict[str, int]:
        """`chosen[subset]`: the phase count the test prefers on each analysed subset."""
        return {s: part.chosen for s, part in self.analysed.items()}

    def subset(self, subset: str = "all") -> SubsetFlow:
        """One analysed subset, with an error naming the analysed ones."""
        if subset not in self.analysed:
            why = f": {self.subsets[subset].reason}" if subset in self.subsets else ""
            raise FlowError(
                f"the flow results for {self.model!r} have no analysed subset {subset!r} ({sorted(self.analysed)}){why}"
            )
        return self.analysed[subset]

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

    # ---------------------------------------------------------------- verdicts

    def verdicts(self) -> list[Verdict]:
        """Every claim's verdict per subset (scope: the subset), claim by claim; a skipped subset is inconclusive."""
        out = []
        for claim in CLAIMS:
            for s, part in self.subsets.items():
                if isinstance(part, SubsetFlow):
                    verdict = part.verdicts[claim]
                else:
                    verdict = Verdict("inconclusive", part.reason, rule="not analysed")
                out.append(verdict.about(claim, self.model, s))
        return out

    def boundary_note(self) -> str:
        """The sentence under the verdicts: where the three-phase cut on all items puts its boundaries."""
        part = self.subset("all")
        return (
            f"The best three-phase cut on all items starts phases 2 and 3 at layers {part.cut(3).boundaries_text()} "
            f"(95% bootstrap intervals); the test itself chooses {part.chosen} phase(s)."
        )

    def readme_row(self) -> dict[str, Any]:
        part = self.subset("all")
        return {
            "Flow (ch. 1)": self.model,
            "items": part.items,
            "phases chosen": part.chosen,
            "3-phase boundaries [95% CI]": part.cut(3).boundaries_text(),
            **{claim: part.verdicts[key].verdict for key, claim in CLAIMS.items()},
        }

    # ---------------------------------------------------------------- table views

    def items_table(self) -> pd.DataFrame:
        """Per subset: items, labels, and the labels left out with their correct-item counts."""
        rows = [
            {
                "model": self.model,
                "items": part.items,
                "n": part.n_items,
                "labels": None if part.labels is None else len(part.labels),
                "left out (label: correct items)": "; ".join(
                    f"{k}: {v}" for k, v in (part.left_out or {}).items()
                )
                or "none",
            }
            for part in self.subsets.values()
        ]
        return pd.DataFrame(rows).set_index(["model", "items"])

    def layer_table(self, subset: str = "all") -> pd.DataFrame:
        """The numbers behind the layer-profile figure, formatted: intervals, controls, SAE quality misses."""
        t = self.subset(subset).per_layer

        def interval(value: float, low: float, high: float) -> str:
            return format_interval(value, low, high, digits=2)

        return pd.DataFrame(
            {
                "probe, residual [95% CI]": [
                    interval(r.probe_resid, r.probe_resid_low, r.probe_resid_high) for r in t.itertuples()
                ],
                "control": t["probe_resid_control"],
                "probe, SAE [95% CI]": [
                    interval(r.probe_sae, r.probe_sae_low, r.probe_sae_high) for r in t.itertuples()
                ],
                "control ": t["probe_sae_control"],
                "selective (null max)": [
                    f"{r.selective} ({r.selective_null_max:.0f})" for r in t.itertuples()
                ],
                "mass share (null max)": [
                    f"{r.mass_share:.3f} ({r.mass_share_null_max:.3f})" for r in t.itertuples()
                ],
                "lens p(gold)": t["lens_gold"],
                "lens acc. (chance)": [
                    f"{r.lens_accuracy:.2f} ({r.lens_chance:.2f})" for r in t.itertuples()
                ],
                "label mass": t["lens_mass"].map("{:.2e}".format),
                "CKA (control)": [
                    f"{r.cka:.3f} ({r.cka_control:.3f})" if r.Index > t.index[0] else ""
                    for r in t.itertuples()
                ],
                "SAE misses": t["sae_misses"],
            },
            index=t.index,
        )

    def phase_table(self) -> pd.DataFrame:
        """Per analysed subset: the chosen phase count, its price, how often resamples choose each count, and the
        boundaries of the three-phase and chosen cuts."""
        rows = []
        for part in self.analysed.values():
            candidates = part.test.index.tolist()
            rows.append(
                {
                    "model": self.model,
                    "items": part.items,
                    "phases chosen": part.chosen,
                    "penalty per boundary": part.penalty,
                    "resamples choosing " + "/".join(map(str, candidates)): " / ".join(
                        f"{part.choice_shares.get(k, 0.0):.0%}" for k in candidates
                    ),
                    "3-phase boundaries [95% CI]": part.cut(3).boundaries_text(),
                    "chosen-count boundaries [95% CI]": part.cuts[part.chosen].boundaries_text()
                    if part.chosen in part.cuts
                    else "none (one phase)",
                    "variance explained by 3 phases": part.test.loc[3, "r2"],
                }
            )
        return pd.DataFrame(rows).set_index(["model", "items"])

    def test_table(self) -> pd.DataFrame:
        """The phase-count test in full, per analysed subset (index model, items, n_phases)."""
        tests = []
        for part in self.analysed.values():
            t = part.test.copy()
            if part.trend_r2 is not None:  # the smooth alternative three phases must beat
                t.insert(t.columns.get_loc("r2") + 1, "r2 of a cubic trend", part.trend_r2)
            t.insert(0, "items", part.items)
            t.insert(0, "model", self.model)
            tests.append(t.reset_index().set_index(["model", "items", "n_phases"]))
        return pd.concat(tests)

    def leave_one_out_table(self) -> pd.DataFrame:
        """Per analysed subset: the three-phase boundaries with all profile metrics, then with each left out."""
        rows = []
        for part in self.analysed.values():
            if part.boundaries_without is None:
                continue
            cut = part.cut(3)
            moved = moved_boundaries(cut, part.boundaries_without)
            rows.append({"model": self.model, "items": part.items, "left out": "none",
                         "boundaries": ", ".join(map(str, cut.boundaries)), "outside the interval": ""})  # fmt: skip
            for metric, boundaries in part.boundaries_without.items():
                rows.append(
                    {
                        "model": self.model,
                        "items": part.items,
                        "left out": PROFILE_METRICS.get(metric, metric),
                        "boundaries": ", ".join(map(str, boundaries)),
                        "outside the interval": "yes" if metric in moved else "",
                    }
                )
        return pd.DataFrame(rows).set_index(["model", "items", "left out"]) if rows else pd.DataFrame()

    def headroom_row(self) -> dict[str, Any]:
        """How much emotion the model's own answers leave unread: the best layer's residual probe (cross-validated
        on the analysis items, with its interval) beside the model's accuracy on the same items."""
        part = self.subsets.get("all")
        if not isinstance(part, SubsetFlow):
            return {"model": self.model}
        t = part.per_layer
        best = int(t["probe_resid"].idxmax())
        return {
            "model": self.model,
            "items": part.n_items,
            "model accuracy (zero-shot)": self.facts.get("model accuracy", np.nan),
            "best probe layer": best,
            "probe accuracy [95% CI]": format_interval(
                t.loc[best, "probe_resid"], t.loc[best, "probe_resid_low"], t.loc[best, "probe_resid_high"]
            ),
            "shuffled-label control": float(t.loc[best, "probe_resid_control"]),
        }

    def adequacy_table(self) -> pd.DataFrame:
        """Per layer (all items, answer position): the SAE's fraction of variance explained there, and emotion-probe
        accuracy on the residual, on the SAE's reconstruction, on its error term and on its codes (empty for
        results files written before it was measured)."""
        part = self.subsets.get("all")
        columns = [
            "fve_answer",
            "probe_resid",
            "probe_reconstruction",
            "probe_error",
            "probe_sae",
            "sae_misses",
        ]
        if not isinstance(part, SubsetFlow) or not set(columns) <= set(part.per_layer.columns):
            return pd.DataFrame()
        if "answer_outlier" in part.per_layer.columns:  # measured since STUDY_VERSION 3
            columns.insert(1, "answer_outlier")
        frame = part.per_layer[columns].copy()
        frame.insert(0, "model", self.model)
        return frame.rename(
            columns={
                "fve_answer": "FVE at the answer",
                "answer_outlier": "answers a norm outlier",
                "probe_resid": "probe: residual",
                "probe_reconstruction": "probe: reconstruction",
                "probe_error": "probe: error term",
                "probe_sae": "probe: SAE codes",
                "sae_misses": "SAE misses",
            }
        )

    def auroc_table(self) -> pd.DataFrame:
        """Per layer (all items), without a count threshold: the mean of the `TOP_AUROCS` largest and the largest
        one-vs-rest AUROC of the SAE features at the answer position and averaged over the text's own tokens, each with
        the largest value of its shuffled-label null, and the text tokens' selective-feature count beside its null's
        largest; a star where the permutation test passes after Holm correction across layers (empty for results files
        written before these were measured)."""
        part = self.subsets.get("all")
        if not isinstance(part, SubsetFlow) or "text_auroc_top" not in part.per_layer.columns:
            return pd.DataFrame()
        t = part.per_layer

        def cell(prefix: str, stat: str, digits: int = 3) -> list[str]:
            star = t.get(f"{prefix}{stat}_beyond_control")
            null = t[f"{prefix}{stat}_null_max"]
            return [
                f"{v:.{digits}f} ({n:.{digits}f}){' *' if star is not None and star[layer] else ''}"
                for layer, v, n in zip(t.index, t[f"{prefix}{stat}"], null, strict=True)
            ]

        return pd.DataFrame(
            {
                "model": self.model,
                f"answer: top-{TOP_AUROCS} AUROC (null max)": cell("", "auroc_top"),
                "answer: max AUROC (null max)": cell("", "auroc_max"),
                f"text: top-{TOP_AUROCS} AUROC (null max)": cell("text_", "auroc_top"),
                "text: max AUROC (null max)": cell("text_", "auroc_max"),
                "text: selective (null max)": cell("text_", "selective", digits=0),
                "SAE misses": t["sae_misses"],
            },
            index=t.index,
        )

    def answer_feature_table(self) -> pd.DataFrame:
        """Per phase of the three-phase cut (all items): selective features that, on misclassified items, follow
        the gold label and those that follow the model's answer (answer features), summed over the phase's layers
        (NaN where no emotion had enough misclassified items on both sides)."""
        part = self.subsets.get("all")
        if not isinstance(part, SubsetFlow) or "follow_gold" not in part.per_layer.columns:
            return pd.DataFrame()
        phase = part.cut(3).phase_of(part.per_layer.index.tolist())
        sums = part.per_layer[["follow_gold", "follow_answer"]].groupby(phase).sum(min_count=1)
        sums.insert(0, "model", self.model)
        return sums.rename(
            columns={"follow_gold": "follow the gold label", "follow_answer": "follow the answer"}
        )

    def emergence_table(self) -> pd.DataFrame:
        """Per analysed subset, where emotion information first appears (`emergence_row`)."""
        rows = [
            {
                "model": self.model,
                "items": part.items,
                **emergence_row(part.per_layer, part.cut(3), part.n_items),
            }
            for part in self.analysed.values()
        ]
        return pd.DataFrame(rows).set_index(["model", "items"])

    def role_table(self) -> pd.DataFrame:
        """Per analysed subset and phase of the three-phase cut: each role's mean share of the answer position's
        activation and (when recorded) the mean number of features per role."""
        rows = []
        for part in self.analysed.values():
            for p, row in part.role_shares_per_phase.iterrows():
                first, last = part.cut(3).phases[p - 1]
                counts = {}
                if part.role_counts_per_phase is not None:
                    counts = {
                        f"{role} features": part.role_counts_per_phase.loc[p, role]
                        for role in ("emotion", "template", "content")
                    }
                rows.append(
                    {
                        "model": self.model,
                        "items": part.items,
                        "phase": f"{p} (layers {first}-{last})",
                        **{f"{role} share": row[role] for role in ROLES},
                        **counts,
                    }
                )
        return pd.DataFrame(rows).set_index(["model", "items", "phase"])

    def seeds_table(self) -> pd.DataFrame:
        """Per item subset and SAE training seed: the layers whose features show emotion, the share of the excess
        count in the last phase, and the late-emergence (before the SAE cap) and roles rules' outcomes (empty
        without seeds)."""
        if self.seeds is None:
            return pd.DataFrame()
        frame = self.seeds.reset_index()
        frame.insert(0, "model", self.model)
        return frame.set_index(["model", "items", "seed"])

    def seed_features_table(self, by_layer: bool = False) -> pd.DataFrame:
        """Per SAE seed and phase of the book SAEs' three-phase cut (all items): the share of the book SAEs' active
        features, and of their emotion-selective ones, that the seed's SAEs learn again (pooled over the phase's
        layers; "same emotions": the partner is selective for the same emotions), and the median of the layers'
        median best cosines beside chance's. Per layer with `by_layer`. Empty without seeds."""
        if self.seed_features is None:
            return pd.DataFrame()
        frame = self.seed_features.reset_index()
        frame.insert(0, "model", self.model)
        frame["phase"] = self.cut(3).phase_of(frame["layer"].tolist()).to_numpy()
        keys = ["model", "seed", "layer"] if by_layer else ["model", "seed", "phase"]
        grouped = frame.groupby(keys)
        sums = grouped[["active features", "found again", "selective features", "selective found again",
                        "same emotions"]].sum()  # fmt: skip
        out = pd.DataFrame(index=sums.index)
        if not by_layer:
            out["layers"] = grouped["layer"].agg(lambda x: _layer_list(list(x)))
        out["active features"] = sums["active features"]
        out["found again"] = sums["found again"] / sums["active features"].where(sums["active features"] > 0)
        out["selective features"] = sums["selective features"]
        selective = sums["selective features"].where(sums["selective features"] > 0)
        out["selective found again"] = sums["selective found again"] / selective
        out["same emotions"] = sums["same emotions"] / selective
        out["median best cosine"] = grouped["median best cosine"].median()
        out["random dictionary"] = grouped["median best cosine, random dictionary"].median()
        return out

    def cards_table(self) -> pd.DataFrame:
        """The feature cards for display: a role without an active feature shows blanks."""
        return self.feature_cards.astype(object).fillna("")

    # ---------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "labels": list(self.labels),
            "subsets": {s: part.to_json() for s, part in self.subsets.items()},
            "feature_cards": records(self.feature_cards) if len(self.feature_cards) else [],
            "facts": dict(self.facts),
            "sae_summary": self.sae_summary,
            "role_prompts": self.role_prompts,
            "timings_seconds": dict(self.timings),
            "sae_seeds": None if self.seeds is None else records(self.seeds),
            "seed_features": None if self.seed_features is None else records(self.seed_features),
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> FlowResult:
        """A result from its JSON: this layout, or the per-model entry of an earlier chapter's results file."""
        subsets: dict[str, SubsetFlow | SkippedSubset] = {
            s: SkippedSubset.from_json(s, v) if "not_analysed" in v else SubsetFlow.from_json(s, v)
            for s, v in payload.get("subsets", {}).items()
        }
        cards = payload.get("feature_cards") or []
        return cls(
            model=str(payload.get("model", "")),
            dataset=str(payload.get("dataset", "")),
            labels=tuple(payload.get("labels", ())),
            subsets=subsets,
            feature_cards=table(cards, ["phase", "layer", "role"]) if cards else pd.DataFrame(),
            facts=dict(payload.get("facts") or {}),
            sae_summary=str(payload.get("sae_summary", "")),
            role_prompts=payload.get("role_prompts"),
            timings={k: float(v) for k, v in (payload.get("timings_seconds") or {}).items()},
            seeds=None
            if payload.get("sae_seeds") is None
            else table(payload["sae_seeds"], ["items", "seed"]),
            seed_features=None
            if payload.get("seed_features") is None
            else table(payload["seed_features"], ["seed", "layer"]),
        )


# ------------------------------------------------------------------------------------------------ another dataset
# Chapter 5 asks whether chapter 1's phases are the model's or the dataset's: the same profile, cut the same way, on
# another dataset's items, through the same SAEs.


@dataclass(frozen=True)
class DatasetPhases:
    """Chapter 1's phase analysis of one model on another dataset's items: the phase-count test over the same
    profile (`test`, its choice, the smooth trend's R^2) and the three-phase cut with item-bootstrap intervals."""

    study: ClassVar[str] = "dataset_phases"

    model: str
    dataset: str
    n_items: int
    labels: tuple[str, ...]
    accuracy: float
    test: pd.DataFrame
    chosen: int
    trend_r2: float
    cut: PhaseCut
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "n_items": self.n_items,
            "labels": list(self.labels),
            "accuracy": self.accuracy,
            "phase_count_test": records(self.test),
            "chosen": self.chosen,
            "trend_r2": self.trend_r2,
            "cut": self.cut.to_json(),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> DatasetPhases:
        return cls(
            model=payload["model"],
            dataset=payload["dataset"],
            n_items=int(payload["n_items"]),
            labels=tuple(payload["labels"]),
            accuracy=float(payload["accuracy"]),
            test=_test_table(payload["phase_count_test"]),
            chosen=int(payload["chosen"]),
            trend_r2=float(payload["trend_r2"]),
            cut=PhaseCut.from_json(payload["cut"]),
            seconds=float(payload["seconds"]),
        )


def _profile_outcomes(
    lm: LoadedModel, aset: AnalysisSet, suite: SAESuite, config: FlowConfig
) -> dict[str, np.ndarray]:
    """Per profile metric, every layer's per-item outcomes ([layers, items]) on all of `aset`'s items: what chapter
    1's profile averages, without its other measurements (nor the probes' shuffled-label controls)."""
    gold = aset.gold
    no_control = dataclasses.replace(config.probe, control=False)
    rows: dict[str, list[np.ndarray]] = {name: [] for name, _ in config.profile_metrics}
    for layer in tqdm(aset.layers, desc=f"phase profile, {aset.dataset}"):
        h = aset.resid(layer)
        z = aset.codes(layer, suite.saes[_hook(layer)])
        _, p_gold, log_mass = _lens_outcomes(lm, aset, h, gold)
        outcomes = {"lens_gold": p_gold, "lens_log_mass": log_mass}
        if "probe_resid" in rows:
            outcomes["probe_resid"] = probe_accuracy(h, gold, no_control).correct
        if "probe_sae" in rows:
            outcomes["probe_sae"] = _codes_probe(z, gold, no_control).correct
        for name in rows:
            rows[name].append(outcomes[name])
    return {name: np.stack(values) for name, values in rows.items()}


def _dataset_phases(lm: LoadedModel, aset: AnalysisSet, suite: SAESuite, config: FlowConfig) -> DatasetPhases:
    began = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="probe folds reduced")
        values = _profile_outcomes(lm, aset, suite, config)
    test, boots, _ = _cut_profile(values, aset.layers, config)
    return DatasetPhases(
        model=lm.info.name,
        dataset=aset.dataset,
        n_items=aset.n,
        labels=tuple(aset.labels),
        accuracy=float(aset.correct.mean()),
        test=test.table,
        chosen=test.chosen,
        trend_r2=test.trend_r2,
        cut=_phase_cut(boots[3]),
        seconds=time.time() - began,
    )


def dataset_phases(model: str | LoadedModel, dataset: str, config: FlowConfig | None = None) -> DatasetPhases:
    """Chapter 1's phase-count test and three-phase cut of `model` on `dataset`'s items (sampled as chapter 1's,
    per `config.items`, through the same SAEs), cached under the config and the items' and SAEs' keys."""
    config = config or FlowConfig()
    if dataset not in data.available_datasets():
        raise FlowError(f"dataset {dataset!r} is not available here (have {data.available_datasets()})")
    lm = load_model(model) if isinstance(model, str) else model
    aset = analysis_set(lm, config.preset, dataclasses.replace(config.items, dataset=dataset))
    suite = sae_suite(lm, config.preset, config.saes)
    profile_config = (
        config.probe,
        config.profile_metrics,
        config.candidates,
        config.n_boot,
        config.penalty_resamples,
    )
    key_parts = (STUDY_VERSION, profile_config, aset.store.key, suite.key)
    return cached_result(
        DatasetPhases, lm.info.cache_name, key_parts, lambda: _dataset_phases(lm, aset, suite, config)
    )


def _boundary_agreement(source: Estimate, target: Estimate, max_width: float) -> str:
    """ "agrees" when each boundary lies inside the other's bootstrap interval and neither interval is wider than
    `max_width` layers (a wider one does not locate its boundary), "differs" when the intervals are disjoint,
    "unclear" otherwise."""
    if source.high < target.low or target.high < source.low:
        return "differs"
    inside = source.low <= target.value <= source.high and target.low <= source.value <= target.high
    located = max(source.high - source.low, target.high - target.low) <= max_width
    return "agrees" if inside and located else "unclear"


#: A boundary is located when its bootstrap interval spans at most this share of the model's layers.
LOCATED_SHARE = 0.25


def phases_reappear_verdict(
    source: PhaseCut, target: PhaseCut, source_name: str, target_name: str
) -> Verdict:
    """Do the three-phase boundaries chapter 1 found on `source_name` reappear on `target_name`? Per boundary,
    `_boundary_agreement` of the two item-bootstrap intervals (located: at most `LOCATED_SHARE` of the layers wide):
    "holds" when every boundary agrees, "partly" when some do, "does not hold" when none agrees and one differs,
    "inconclusive" when every boundary is unclear."""
    n_layers = source.phases[-1][1] + 1
    if len(source.intervals) != len(target.intervals) or target.phases[-1][1] + 1 != n_layers:
        raise FlowError(
            f"cuts of {len(source.phases)} and {len(target.phases)} phases over {n_layers} and "
            f"{target.phases[-1][1] + 1} layers cannot be compared boundary by boundary"
        )
    max_width = LOCATED_SHARE * n_layers
    found = [
        _boundary_agreement(s, t, max_width) for s, t in zip(source.intervals, target.intervals, strict=True)
    ]
    agree, differ = found.count("agrees"), found.count("differs")
    numbers = {
        "boundaries": len(found),
        "agree": agree,
        "differ": differ,
        "max_interval_width": max_width,
        f"{source_name} cut": source.boundaries_text(),
        f"{target_name} cut": target.boundaries_text(),
    }
    reason = (
        f"boundaries {source.boundaries_text()} on {source_name} and {target.boundaries_text()} on {target_name}: "
        + ", ".join(found)
        + f" (an interval wider than {max_width:g} layers locates nothing)"
    )
    if agree == len(found):
        verdict = "holds"
    elif agree:
        verdict = "partly"
    elif differ:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return Verdict(verdict, reason, numbers, "phases_reappear_verdict")
