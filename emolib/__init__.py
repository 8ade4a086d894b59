"""emolib: the library behind the book that re-derives 'From Syntax to Emotion' on real models.

Chapters call this package; it holds the algorithms, the book holds the argument. The layout, by concern:

- `emolib.lm`: language models (registry and loading), prompts, batched forward passes, classification, baselines.
- `emolib.data`: every dataset read from its original files into one schema, with splits and label harmonisation.
- `emolib.sae`: activation caches, SAE training corpora, training, loading, quality, the per-model suite and the
  interventions (feature edits and steering hooks) every causal experiment uses.
- `emolib.methods`: analysis methods (probes, CKA, logit lens, phases, selectivity, diffuseness, tracing, ...).
- `emolib.studies`: one study per chapter (config with presets, cached run, typed result) and the preset registry.
- `emolib.plots`: one module of figures per chapter; `emolib.verdicts`, `emolib.stats`: verdicts and statistics.
- `emolib.pipeline`: executing and rendering the book, results files, the README table, `emolib compare`.

What a chapter needs is importable from here (`from emolib import run_flow, get_preset`); the names load lazily,
so `import emolib` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "BOOK_MODELS": "emolib.lm.models",
    "book_models": "emolib.lm.models",
    "load_model": "emolib.lm.models",
    "PRESETS": "emolib.studies.presets",
    "get_preset": "emolib.studies.presets",
    "Preset": "emolib.studies.presets",
    "SetupConfig": "emolib.studies.setup",
    "SetupResult": "emolib.studies.setup",
    "run_setup": "emolib.studies.setup",
    "SaesConfig": "emolib.studies.saes",
    "SAEReport": "emolib.studies.saes",
    "run_saes": "emolib.studies.saes",
    "FlowConfig": "emolib.studies.flow",
    "FlowResult": "emolib.studies.flow",
    "run_flow": "emolib.studies.flow",
    "FeaturesConfig": "emolib.studies.features",
    "FeaturesResult": "emolib.studies.features",
    "run_features": "emolib.studies.features",
    "TracingConfig": "emolib.studies.tracing",
    "TracingResult": "emolib.studies.tracing",
    "run_tracing": "emolib.studies.tracing",
    "read_study_results": "emolib.studies.base",
    "write_study_results": "emolib.studies.base",
    "Verdict": "emolib.verdicts",
    "findings_markdown": "emolib.verdicts",
    "format_interval": "emolib.stats",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emolib' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
