"""What every study shares: a typed result that writes and reads JSON, its on-disk cache, and a chapter's results file.

A study is `run_x(model, config) -> XResult`. The result holds everything the chapter shows (tables as DataFrames,
verdicts as `Verdict`s), writes itself as plain JSON (`to_json`) and reads itself back (`from_json`). `cached_result`
stores that JSON under a key of everything that determines it and always returns the result read back from disk,
so a chapter sees the same object whether it was computed now or before. A chapter writes its models' results to
`_build/results/<chapter>.json` with `write_study_results`; a later chapter reads them with `read_study_results`,
through the result type's own accessors, never by dictionary paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

import numpy as np
import pandas as pd

from emolib.cache import cache_dir, cached_entry, config_key, plain
from emolib.pipeline.results import read_results, write_results

#: Bump when the layout of cached study results changes, so every cached result is recomputed.
RESULT_FORMAT = "1"
RESULT_FILE = "result.json"


class StudyError(ValueError):
    """A study's inputs or results do not fit: unknown model in a results file, missing upstream results."""


class StudyResult(Protocol):
    """A study's typed result: `to_json()` gives plain JSON data, `from_json(to_json())` the same result."""

    study: ClassVar[str]

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Self: ...


R = TypeVar("R", bound=StudyResult)


# ------------------------------------------------------------------------------------------------ JSON helpers


def records(frame: pd.DataFrame, *, index: bool = True) -> list[dict[str, Any]]:
    """A table as a list of row dicts (its index as columns first, unless `index=False`)."""
    out = frame.reset_index() if index else frame.reset_index(drop=True)
    return plain(out.to_dict(orient="records"))


def table(rows: Sequence[Mapping[str, Any]], index: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The inverse of `records`: a table from row dicts, indexed by `index` (column names) when given. A null
    read from a results file is NaN."""
    frame = pd.DataFrame.from_records(list(rows))
    frame = frame.fillna(np.nan) if len(frame) else frame
    if index is not None and len(frame):
        frame = frame.set_index(index if isinstance(index, str) else list(index))
    return frame


# ------------------------------------------------------------------------------------------------ caching


def cached_result(
    cls: type[R], model: str, key_parts: Sequence[Any], build: Callable[[], R], *, meta: Mapping | None = None
) -> R:
    """`build()`'s result, stored as JSON under `cache_dir("studies", cls.study)` with a key of `key_parts`
    (everything that determines it: config, model, the keys of the items and SAEs it read), and always read back
    from disk. A corrupt entry is rebuilt (`emolib.cache.cached_entry`)."""
    key = config_key(RESULT_FORMAT, cls.study, model, *key_parts)
    folder = cache_dir("studies", cls.study) / f"{model}-{key}"

    def write(tmp: Path) -> None:
        (tmp / RESULT_FILE).write_text(json.dumps(plain(build().to_json())))

    entry = cached_entry(folder, write, meta={"study": cls.study, "model": model, **dict(meta or {})})
    return cls.from_json(json.loads((entry / RESULT_FILE).read_text()))


# ------------------------------------------------------------------------------------------------ results files


def write_study_results(
    chapter: str,
    results: Mapping[str, StudyResult],
    *,
    preset: str,
    config: Any,
    readme_rows: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a chapter's results file: `{"config", "models": {model: result.to_json()}, **extra, "readme_rows"}`."""
    payload = {
        "config": plain(config),
        "models": {model: plain(result.to_json()) for model, result in results.items()},
        **plain(dict(extra or {})),
        "readme_rows": [dict(row) for row in readme_rows],
    }
    return write_results(chapter, payload, preset=preset)


def read_study_results(chapter: str, cls: type[R], *, preset: str | None = None) -> dict[str, R]:
    """Every model's typed result from a chapter's results file (written by `write_study_results`)."""
    return results_from_record(chapter, read_results(chapter, preset=preset), cls)


def results_from_record(chapter: str, record: Mapping[str, Any], cls: type[R]) -> dict[str, R]:
    """Every model's typed result from a results record already read (`read_results`)."""
    models = record.get("models")
    if not isinstance(models, Mapping):
        raise StudyError(f"the results of chapter {chapter!r} hold no 'models' entry: re-run the chapter")
    return {model: cls.from_json(payload) for model, payload in models.items()}


def result_for(results: Mapping[str, R], model: str, chapter: str) -> R:
    """One model's result, with an error that says which chapter to run when it is missing."""
    if model not in results:
        raise StudyError(
            f"the results of chapter {chapter!r} have no model {model!r} (they have {sorted(results)}): "
            f"run `emolib book --chapters {chapter}` with that model"
        )
    return results[model]


def combined(
    results: Mapping[str, Any],
    view: str | Callable[[Any], pd.DataFrame],
    *,
    by_model: bool = False,
    ignore_index: bool = False,
) -> pd.DataFrame:
    """One table of every model's `view` (the name of a result's table attribute or method, or a function of the
    result), models in order: stacked as they are, or under an outer "model" index (`by_model`)."""
    tables = {name: _view_of(result, view) for name, result in results.items()}
    if by_model:
        return pd.concat(tables, names=["model"])
    return pd.concat(list(tables.values()), ignore_index=ignore_index)


def _view_of(result: Any, view: str | Callable[[Any], pd.DataFrame]) -> pd.DataFrame:
    if callable(view):
        return view(result)
    value = getattr(result, view)
    return value() if callable(value) else value
