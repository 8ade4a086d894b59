"""The one registry of presets: what `quick` (the CI smoke run) and `full` (the book) mean for every study.

A preset is a `Preset` of frozen study configs; a chapter reads its config with `get_preset(preset).<study>` and
overrides a field with `dataclasses.replace`. The items the analysis chapters read (`items`) and the SAEs
(`saes`) are shared by every study of a preset, so they are built once and keyed by the preset's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from emolib.lm.baselines import BaselineConfig
from emolib.sae.suite import SUITE_PRESETS, SuiteConfig
from emolib.studies.items import AnalysisConfig
from emolib.studies.saes import SaesConfig
from emolib.studies.setup import SetupConfig


class PresetError(KeyError):
    """An unknown preset name."""


@dataclass(frozen=True)
class Preset:
    """Every study's config for one preset (`name` keys the artefacts the studies build: items, SAEs)."""

    name: str
    items: AnalysisConfig
    saes: SaesConfig
    setup: SetupConfig

    @property
    def suite(self) -> SuiteConfig:
        """The SAE suite every analysis study of this preset reads."""
        return self.saes.suite


def _preset(name: str, *, items: AnalysisConfig, baseline: BaselineConfig) -> Preset:
    return Preset(
        name=name,
        items=items,
        saes=SaesConfig(preset=name, suite=SUITE_PRESETS[name]),
        setup=SetupConfig(preset=name, baseline=baseline),
    )


PRESETS: dict[str, Preset] = {
    # quick: a smoke run of the whole pipeline (few items, SAEs trained for seconds; not evidence)
    "quick": _preset(
        "quick",
        items=AnalysisConfig(n_per_label=6),
        baseline=BaselineConfig(n_per_label=15, order_seeds=(1,), n_boot=1000),
    ),
    "full": _preset(
        "full",
        items=AnalysisConfig(n_per_label=40),
        baseline=BaselineConfig(n_per_label=100, order_seeds=(1, 2, 3), n_boot=2000),
    ),
}


def get_preset(name: str) -> Preset:
    """The configs of preset `name` ("quick" or "full")."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
