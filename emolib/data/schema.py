"""The one row schema every dataset is loaded into, the skip reasons, the load report and the data error."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
from datasets import Features, Value

DATA_DIR_ENV = "EMOLIB_DATA_DIR"
COLUMNS = ("text", "label", "dataset", "split", "id")
SPLITS = ("train", "dev", "test")
DEFAULT_DATASET = "builtin"
FEATURES = Features({column: Value("string") for column in COLUMNS})

OnBadRow = Literal["raise", "skip"]
Kind = Literal["emotion", "lm"]

# Skip reasons, as they appear in reports.
BLANK_LINE = "blank line"
MULTI_LABEL = "multi-label"
EMPTY_TEXT = "empty text"
UNKNOWN_LABEL = "unknown label"
#: A skipped row is listed in the report's examples up to this many times.
MAX_EXAMPLES = 20


class EmolibDataError(ValueError):
    """A dataset is missing or malformed; the message names the path (and line) and what was expected."""


# --------------------------------------------------------------------------------------------------- report


@dataclass
class LoadReport:
    """What one load read, kept and skipped (by reason), and the kept label counts per split.

    `read` and `skipped` are keyed by split; the key `""` holds lines of a file without an official split, read
    before the seeded split assigned one.
    """

    dataset: str
    files: list[str] = field(default_factory=list)
    read: Counter[str] = field(default_factory=Counter)
    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)
    label_counts: dict[str, Counter[str]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        """Data lines (or WikiText articles) read, blank lines included: `rows_kept + sum(skips.values())`."""
        return sum(self.read.values())

    @property
    def rows_kept(self) -> int:
        return sum(sum(counts.values()) for counts in self.label_counts.values())

    @property
    def skips(self) -> dict[str, int]:
        """Skipped rows by reason."""
        out: Counter[str] = Counter()
        for (_, reason), count in self.skipped.items():
            out[reason] += count
        return dict(out)

    def as_frame(self) -> pd.DataFrame:
        """Rows (rows read/kept, skipped by reason, label counts) x columns (splits, total); <NA> = split unknown."""
        splits = [s for s in SPLITS if s in self.label_counts or self.read.get(s)]
        columns = [*splits, "total"]
        labels = sorted({label for counts in self.label_counts.values() for label in counts})
        reasons = sorted({reason for _, reason in self.skipped})

        def by_split(counts: Callable[[str], int], known: bool) -> list[object]:
            values: list[object] = [counts(s) if known else pd.NA for s in splits]
            return [*values, sum(counts(s) for s in ["", *splits])]

        has_unsplit = bool(self.read.get(""))
        rows: dict[tuple[str, str], list[object]] = {
            ("rows", "read"): by_split(lambda s: self.read.get(s, 0), not has_unsplit),
            ("rows", "kept"): by_split(lambda s: sum(self.label_counts.get(s, Counter()).values()), True),
        }
        for reason in reasons:
            rows[("skipped", reason)] = by_split(
                lambda s, r=reason: self.skipped.get((s, r), 0), not has_unsplit
            )
        for label in labels:
            rows[("label", label or "(no label)")] = by_split(
                lambda s, lab=label: self.label_counts.get(s, Counter())[lab], True
            )
        index = pd.MultiIndex.from_tuples(list(rows), names=["what", "name"])
        return pd.DataFrame(list(rows.values()), index=index, columns=columns).astype("Int64")
