"""The SAE appendix: what each model's SAEs learned from, how they were trained, how good they are per layer, and
what they cost, as a typed report of the cached SAE suite."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from emolib.lm.models import LoadedModel, load_model
from emolib.sae.loading import load_saes
from emolib.sae.quality import (
    GOALS,
    QualityGoals,
    goal_summary,
    missed_goals,
    quality_dict,
    quality_table,
)
from emolib.sae.suite import SAESuite, SuiteConfig, measure_saes, sae_suite
from emolib.studies.base import records, table

#: The issue's budget for the whole SAE stage (every book model), in minutes.
BUDGET_MINUTES = {"quick": 5, "full": 60}  # issue 13: three book models in 60 minutes


@dataclass(frozen=True)
class SaesConfig:
    """One preset's SAE suite (`suite`, built and keyed under `preset`) and the quality goals it is held to."""

    preset: str = "full"
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    goals: QualityGoals = field(default_factory=QualityGoals)


@dataclass
class SAEReport:
    """One model's SAEs: corpus table and notes, extraction counts, training config and steps, per-layer quality
    (with the run's attributes in `quality.attrs`), the goals each layer misses, stage times in seconds."""

    study: ClassVar[str] = "saes"

    model: str
    k: int | None
    d_in: int
    d_sae: int
    training: dict[str, Any]
    epochs: int
    training_steps: int
    corpus: pd.DataFrame
    corpus_notes: list[str]
    corpus_description: str
    extraction: dict[str, Any]
    timings: dict[str, float]
    quality: pd.DataFrame
    folder: str
    suite_config: dict[str, Any]
    goals: QualityGoals = GOALS
    #: The pretrained release read instead of training (then corpus, extraction and training are empty).
    release: str | None = None

    @classmethod
    def of(cls, suite: SAESuite, goals: QualityGoals = GOALS) -> SAEReport:
        first = suite.saes[suite.hooks[0]].cfg
        trained = suite.training is not None and suite.corpus is not None
        return cls(
            model=suite.model,
            k=suite.k,
            d_in=first.d_in,
            d_sae=first.d_sae,
            training=dataclasses.asdict(suite.training) if trained else {},
            epochs=suite.config.epochs if trained else 0,
            training_steps=suite.training.n_steps if trained else 0,
            corpus=suite.corpus.table if trained else pd.DataFrame(),
            corpus_notes=list(suite.corpus.notes) if trained else [],
            corpus_description=suite.corpus.description if trained else f"pretrained release {suite.release}",
            extraction=dict(suite.extraction),
            timings=dict(suite.timings),
            quality=suite.quality,
            folder=suite.key,
            suite_config=dataclasses.asdict(suite.config),
            goals=goals,
            release=suite.release,
        )

    @property
    def missed(self) -> pd.DataFrame:
        """Layers that miss at least one goal, with a `missed` column naming the goals."""
        return missed_goals(self.quality, self.k, self.goals)

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "training": self.training,
            "epochs": self.epochs,
            "training_steps": self.training_steps,
            "corpus": records(self.corpus, index=False),
            "corpus_notes": self.corpus_notes,
            "corpus_description": self.corpus_description,
            "extraction": self.extraction,
            "timings_seconds": self.timings,
            "quality": quality_dict(self.quality),
            "missed": self.missed["missed"].to_dict(),
            "folder": self.folder,
            "suite_config": self.suite_config,
            "goals": dataclasses.asdict(self.goals),
            "model": self.model,
            "release": self.release,
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> SAEReport:
        return cls(
            model=payload["model"],
            k=payload["k"],
            d_in=payload["d_in"],
            d_sae=payload["d_sae"],
            training=dict(payload["training"]),
            epochs=payload["epochs"],
            training_steps=payload["training_steps"],
            corpus=table(payload["corpus"]),
            corpus_notes=list(payload["corpus_notes"]),
            corpus_description=payload["corpus_description"],
            extraction=dict(payload["extraction"]),
            timings=dict(payload["timings_seconds"]),
            quality=quality_table(payload["quality"]),
            folder=payload["folder"],
            suite_config=dict(payload["suite_config"]),
            goals=QualityGoals(**payload["goals"]),
            release=payload.get("release"),
        )

    # ------------------------------------------------------------------------------------------- views

    def goal_line(self) -> str:
        return goal_summary(self.quality, self.k, self.goals)

    def extraction_row(self) -> dict[str, Any]:
        ex = self.extraction
        return {
            "model": self.model,
            "tokens through the model": ex["n_tokens"],
            "stored (training rows)": ex["n_rows"],
            **{f"dropped: {reason}": n for reason, n in ex["dropped"].items()},
            "storage": ex["storage_dtype"],
        }

    def training_column(self) -> dict[str, Any]:
        return {
            **self.training,
            "width (d_sae)": self.d_sae,
            "epochs over the stored tokens": self.epochs,
            "training steps": self.training_steps,
        }

    def layer_table(self) -> pd.DataFrame:
        """Per-layer quality numbers with the goals each layer misses."""
        columns = [
            "fve",
            "loss_recovered",
            "l0",
            "dead_fraction",
            "dense_fraction",
            "loss_clean",
            "loss_sae",
            "loss_zero",
        ]
        out = self.quality[["layer", *columns]].copy()
        out["misses"] = self.missed["missed"].reindex(out.index).fillna("")
        out.insert(0, "model", self.model)
        return out.set_index(["model", "layer"])

    def range_row(self) -> dict[str, Any]:
        """Each quality number's range over layers (the README row of the appendix)."""
        q = self.quality
        return {
            "layers": len(q),
            "meeting every goal": len(q) - len(self.missed),
            "FVE (min-max)": f"{q.fve.min():.2f}-{q.fve.max():.2f}",
            "loss recovered (min-max)": f"{q.loss_recovered.min():.3f}-{q.loss_recovered.max():.3f}",
            "L0 (min-max)": f"{q.l0.min():.1f}-{q.l0.max():.1f}",
            "dead (max)": f"{q.dead_fraction.max():.3f}",
            "evaluation tokens": int(q.n_tokens.iloc[0]),
            "tokens in the losses": q.attrs["n_predicted_tokens"],
        }

    def finding(self) -> str:
        q = self.quality
        return (
            f"- **{self.model}**: {len(q) - len(self.missed)} of {len(q)} layers meet every goal. Variance explained "
            f"ranges from {q.fve.min():.2f} (layer {int(q.loc[q.fve.idxmin(), 'layer'])}) to {q.fve.max():.2f}; "
            f"loss recovered from {q.loss_recovered.min():.3f} to {q.loss_recovered.max():.3f}."
        )


def run_saes(model: str | LoadedModel, config: SaesConfig) -> SAEReport:
    """Train (or reuse) the SAEs of every layer of `model` and report on them; every stage is cached by the suite."""
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    return SAEReport.of(sae_suite(lm, config.preset, config.suite), config.goals)


def pretrained_quality(model: str | LoadedModel, config: SaesConfig, release: str) -> pd.DataFrame:
    """A pretrained release's SAEs (e.g. Gemma Scope 2, through sae-lens' registry: needs the hub) measured on the
    same held-out corpus, with the same code and settings, as the project's own SAEs."""
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    suite = sae_suite(lm, config.preset, config.suite)
    return measure_saes(lm, load_saes(release), suite.eval_corpus, suite.config)


def cost_table(reports: Mapping[str, SAEReport]) -> pd.DataFrame:
    """Each model's stage times in minutes with their total."""
    cost = pd.DataFrame({name: report.timings for name, report in reports.items()}).T / 60
    cost["total"] = cost.sum(axis=1)
    return cost
