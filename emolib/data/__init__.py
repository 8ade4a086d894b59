"""Load every project dataset into one schema (`text, label, dataset, split, id`, all strings) as a `Dataset`.

Emotion datasets are read from their original files under `$EMOLIB_DATA_DIR/<name>/` (never downloaded, never copied
into the repository); `builtin` ships inside the package and is the default. Native label spellings are mapped to one
canonical lowercase set by the single table `LABEL_ALIASES`, so runs can compare datasets label by label, and labels
outside a run's label set are excluded with counts (`restrict_labels`), never silently.

Splits are named exactly `train`, `dev`, `test`. MELD, GoEmotions and CARER keep their official splits (CARER's `val` is
`dev`). ISEAR and `builtin` have none: within each label, rows are ordered by sha256(f"{seed}:{id}") and cut at the
`SplitConfig` fractions (default 60/20/20, seed 0) with largest-remainder rounding. The split is therefore stratified
(each label's count per split is within one row of exact), identical run to run, and independent of row order and of
every other dataset. WikiText-2 (the raw test file only) is cut into whole articles that are assigned to splits the
same way by title slug (default 70/15/15), so no article spans two splits; the shared copy holds 60 articles, since
two title-shaped formula lines are not titles (see `_article_starts`).

Texts are stripped of surrounding whitespace and otherwise kept as distributed (ISEAR's `á` line-break marks and
`\\"` escapes, MELD's typographic quotes, WikiText's ` @-@ ` escapes).

Bad input raises `EmolibDataError` naming the path (and line) and what was expected. Blank lines and GoEmotions'
multi-label rows are always skipped and counted; empty texts and unknown labels raise unless `on_bad_row="skip"`,
which skips and counts them instead. Every load can return a `LoadReport` with those counts.
"""

from emolib.data.labels import (
    CANONICAL_LABELS,
    EKMAN6,
    EKMAN7,
    LABEL_ALIASES,
    canonical_label,
    canonical_labels,
)
from emolib.data.registry import (
    DATASETS,
    DatasetSpec,
    available_datasets,
    data_dir,
    dataset_folder,
    dataset_table,
    get_spec,
    label_table,
    load,
    load_with_report,
    wikitext_articles,
)
from emolib.data.schema import (
    BLANK_LINE,
    COLUMNS,
    DATA_DIR_ENV,
    DEFAULT_DATASET,
    EMPTY_TEXT,
    MULTI_LABEL,
    SPLITS,
    UNKNOWN_LABEL,
    EmolibDataError,
    LoadReport,
)
from emolib.data.splits import (
    ISEAR_SPLIT,
    WIKITEXT_SPLIT,
    SplitConfig,
    column,
    restrict_labels,
    seeded_split,
    select_split,
    stratified_subsample,
)

__all__ = [
    "BLANK_LINE",
    "CANONICAL_LABELS",
    "COLUMNS",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_DATASET",
    "EKMAN6",
    "EKMAN7",
    "EMPTY_TEXT",
    "ISEAR_SPLIT",
    "LABEL_ALIASES",
    "MULTI_LABEL",
    "SPLITS",
    "UNKNOWN_LABEL",
    "WIKITEXT_SPLIT",
    "DatasetSpec",
    "EmolibDataError",
    "LoadReport",
    "SplitConfig",
    "available_datasets",
    "canonical_label",
    "canonical_labels",
    "data_dir",
    "dataset_folder",
    "dataset_table",
    "get_spec",
    "label_table",
    "load",
    "load_with_report",
    "restrict_labels",
    "column",
    "seeded_split",
    "select_split",
    "stratified_subsample",
    "wikitext_articles",
]
