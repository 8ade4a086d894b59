"""The dataset registry (one entry per dataset), where each is read from, and loading by name."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
from datasets import Dataset
from datasets.table import InMemoryTable

from emolib.cache import project_root
from emolib.data.labels import EKMAN6, EKMAN7, LABEL_ALIASES
from emolib.data.readers import (
    BUILTIN_FILE,
    CARER_FILES,
    CROWD_ENVENT_FILE,
    ISEAR_FILE,
    MELD_FILES,
    WIKITEXT_FILE,
    Sink,
    load_builtin,
    load_carer,
    load_crowd_envent,
    load_goemotions,
    load_isear,
    load_meld,
    load_wikitext,
)
from emolib.data.schema import (
    DATA_DIR_ENV,
    DEFAULT_DATASET,
    FEATURES,
    EmolibDataError,
    Kind,
    LoadReport,
    OnBadRow,
)
from emolib.data.splits import ISEAR_SPLIT, WIKITEXT_SPLIT, SplitConfig, column, seeded_split, select_split

#: Where `builtin` lives (a module attribute so tests can point it at a fixture).
RESOURCES_DIR = Path(__file__).resolve().parent.parent / "resources"


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of the dataset registry. `labels` is the native label set in canonical spelling; `folder` is the
    sub-folder of `$EMOLIB_DATA_DIR` (None = packaged in `emolib/resources/`); `files` says what it must contain."""

    name: str
    kind: Kind
    loader: Callable[[Path, Sink], None]
    folder: str | None
    files: tuple[str, ...]
    labels: tuple[str, ...]
    official_splits: bool
    description: str
    bibtex: str | None
    default_split: SplitConfig | None = None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="builtin",
            kind="emotion",
            loader=load_builtin,
            folder=None,
            files=(BUILTIN_FILE,),
            labels=EKMAN7,
            official_splits=False,
            description="Hand-written short texts, 50 per label, shipped with emolib (the default).",
            bibtex=None,
            default_split=ISEAR_SPLIT,
        ),
        DatasetSpec(
            name="isear",
            kind="emotion",
            loader=load_isear,
            folder="isear",
            files=(ISEAR_FILE,),
            labels=("joy", "fear", "anger", "sadness", "disgust", "shame", "guilt"),
            official_splits=False,
            description="Situations that made students feel an emotion, self-reported in a cross-cultural survey.",
            bibtex="scherer1994isear",
            default_split=ISEAR_SPLIT,
        ),
        DatasetSpec(
            name="meld",
            kind="emotion",
            loader=load_meld,
            folder="meld",
            files=tuple(MELD_FILES.values()),
            labels=EKMAN7,
            official_splits=True,
            description="Utterances from the TV series Friends, labelled in conversational context.",
            bibtex="poria2019meld",
        ),
        DatasetSpec(
            name="goemotions",
            kind="emotion",
            loader=load_goemotions,
            folder="goemotions",
            files=("ekman/labels.txt", "ekman/train.tsv", "ekman/dev.tsv", "ekman/test.tsv"),
            labels=EKMAN7,
            official_splits=True,
            description="Reddit comments with GoEmotions' Ekman grouping; single-label rows only.",
            bibtex="demszky2020goemotions",
        ),
        DatasetSpec(
            name="carer_emotion",
            kind="emotion",
            loader=load_carer,
            folder="carer_emotion",
            files=tuple(CARER_FILES.values()),
            labels=("sadness", "joy", "love", "anger", "fear", "surprise"),
            official_splits=True,
            description="English tweets (CARER); six labels incl. love, no disgust, no neutral.",
            bibtex="saravia2018carer",
        ),
        DatasetSpec(
            name="crowd_envent",
            kind="emotion",
            loader=load_crowd_envent,
            folder="crowd_envent",
            files=(CROWD_ENVENT_FILE,),
            labels=(
                "anger",
                "boredom",
                "disgust",
                "fear",
                "guilt",
                "joy",
                "neutral",
                "pride",
                "relief",
                "sadness",
                "shame",
                "surprise",
                "trust",
            ),  # fmt: skip
            official_splits=False,
            description=(
                "Event descriptions written by crowd workers who felt the emotion, with appraisal ratings "
                "(Crowd-enVENT generation file; no public copy ships with emolib: place it yourself). "
                "'no-emotion' reads as neutral."
            ),
            bibtex="troiano2023crowdenvent",
            default_split=SplitConfig(),
        ),
        DatasetSpec(
            name="wikitext-2-raw",
            kind="lm",
            loader=load_wikitext,
            folder="wikitext-2-raw",
            files=(WIKITEXT_FILE,),
            labels=(),
            official_splits=False,
            description="General English Wikipedia text (WikiText-2 raw test file), split by article; no labels.",
            bibtex="merity2016wikitext",
            default_split=WIKITEXT_SPLIT,
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise EmolibDataError(f"unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_table() -> pd.DataFrame:
    """The registry as a table for the book (one row per dataset)."""
    return pd.DataFrame(
        [
            {
                "name": s.name,
                "kind": s.kind,
                "labels": ", ".join(s.labels),
                "official splits": s.official_splits,
                "folder": s.folder or f"(packaged) emolib/resources/{BUILTIN_FILE}",
                "description": s.description,
                "bibtex": s.bibtex or "",
            }
            for s in DATASETS.values()
        ]
    ).set_index("name")


def label_table() -> pd.DataFrame:
    """`LABEL_ALIASES` as a table for the book: spelling, canonical label, and the datasets that carry the label."""
    rows = []
    for spelling, canonical in LABEL_ALIASES.items():
        used_by = [s.name for s in DATASETS.values() if canonical in s.labels]
        rows.append(
            {
                "spelling": spelling,
                "canonical": canonical,
                "ekman": canonical in EKMAN6,
                "datasets": ", ".join(used_by),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------- locations


def data_dir() -> Path | None:
    """`$EMOLIB_DATA_DIR` (relative paths are taken from the project root, so chapters run from any folder), or None."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else project_root() / path


_env_data_dir = data_dir  # the loaders' `data_dir` parameter shadows the function


def _contents(spec: DatasetSpec) -> str:
    return f"{spec.folder}/ with {', '.join(spec.files)}"


def dataset_folder(name: str, data_dir: Path | str | None = None) -> Path:
    """The folder a dataset is read from (`data_dir` overrides `$EMOLIB_DATA_DIR`); missing folders raise."""
    spec = get_spec(name)
    if spec.folder is None:
        return RESOURCES_DIR
    root = Path(data_dir) if data_dir is not None else _env_data_dir()
    if root is None:
        raise EmolibDataError(
            f"dataset {name!r} is read from ${DATA_DIR_ENV}/{spec.folder}/, but {DATA_DIR_ENV} is not set. Set "
            f"{DATA_DIR_ENV} to the folder that contains {_contents(spec)} (e.g. `export {DATA_DIR_ENV}=../shared/data`)."
        )
    folder = root / spec.folder
    if not folder.is_dir():
        raise EmolibDataError(
            f"{folder.resolve()} does not exist. Set {DATA_DIR_ENV} (now {str(root)!r}) to the folder that contains "
            f"{_contents(spec)}."
        )
    return folder


def available_datasets(data_dir: Path | str | None = None) -> list[str]:
    """`builtin` plus every registered dataset whose folder exists under the data dir (registry order)."""
    root = Path(data_dir) if data_dir is not None else _env_data_dir()
    return [
        s.name
        for s in DATASETS.values()
        if s.folder is None or (root is not None and (root / s.folder).is_dir())
    ]


# --------------------------------------------------------------------------------------------------- loading


def load_with_report(
    name: str = DEFAULT_DATASET,
    *,
    split: SplitConfig | None = None,
    on_bad_row: OnBadRow = "raise",
    data_dir: Path | str | None = None,
) -> tuple[Dataset, LoadReport]:
    """Read a registered dataset from its original files: rows (text, label, dataset, split, id) and the report.

    `split` sets fractions/seed for datasets without an official split (passing one for the others is an error);
    `on_bad_row="skip"` counts empty texts and unknown labels instead of raising.
    """
    spec = get_spec(name)
    if split is not None and spec.official_splits:
        raise ValueError(f"{name!r} has official splits; a SplitConfig only applies to datasets without one")
    folder = dataset_folder(name, data_dir)
    if spec.folder is None:
        hint = "It ships with emolib: reinstall the package."
    else:
        hint = f"Set {DATA_DIR_ENV} to the folder that contains {_contents(spec)}."
    report = LoadReport(dataset=name)
    sink = Sink(spec, on_bad_row, report, hint)
    spec.loader(folder, sink)
    splits = sink.splits
    if not spec.official_splits:
        splits = seeded_split(sink.ids, sink.labels, split or spec.default_split or SplitConfig())
    for row_split, label in zip(splits, sink.labels, strict=True):
        report.label_counts.setdefault(row_split, Counter())[label] += 1
    columns = {
        "text": sink.texts,
        "label": sink.labels,
        "dataset": [name] * len(sink.texts),
        "split": splits,
        "id": sink.ids,
    }
    # Built from an Arrow table of the schema: `Dataset.from_dict(..., features=...)` encodes every value in Python
    # (11 s of a chapter's 19 s of loading in a profile)
    return Dataset(InMemoryTable(pa.table(columns, schema=FEATURES.arrow_schema))), report


def load(
    name: str = DEFAULT_DATASET,
    *,
    split: SplitConfig | None = None,
    on_bad_row: OnBadRow = "raise",
    data_dir: Path | str | None = None,
) -> Dataset:
    """`load_with_report` without the report."""
    return load_with_report(name, split=split, on_bad_row=on_bad_row, data_dir=data_dir)[0]


def wikitext_articles(
    split: str = "test",
    *,
    name: str = "wikitext-2-raw",
    config: SplitConfig | None = None,
    data_dir: Path | str | None = None,
) -> list[str]:
    """The articles of one split of an LM dataset as a list of strings (title line first), in file order."""
    if get_spec(name).kind != "lm":
        raise ValueError(f"{name!r} is not a language-modelling dataset")
    return column(select_split(load(name, split=config, data_dir=data_dir), split), "text")
