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

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from datasets import Dataset, Features, Value

from emolib.cache import project_root

DATA_DIR_ENV = "EMOLIB_DATA_DIR"
COLUMNS = ("text", "label", "dataset", "split", "id")
SPLITS = ("train", "dev", "test")
DEFAULT_DATASET = "builtin"
#: Where `builtin` lives (a module attribute so tests can point it at a fixture).
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
BUILTIN_FILE = "builtin_emotions.csv"
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


# --------------------------------------------------------------------------------------------------- labels

EKMAN6 = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
EKMAN7 = (*EKMAN6, "neutral")
#: Non-Ekman labels stay labels of their own: merging shame/guilt/love into an Ekman class would change the task.
CANONICAL_LABELS = (*EKMAN7, "shame", "guilt", "love")

#: The one harmonisation table: native spelling (lowercase, `_`/`-` read as spaces) -> canonical label.
LABEL_ALIASES: dict[str, str] = {
    **{label: label for label in CANONICAL_LABELS},
    "happiness": "joy",
    "happy": "joy",
    "joyful": "joy",
    "sad": "sadness",
    "angry": "anger",
    "fearful": "fear",
    "scared": "fear",
    "afraid": "fear",
    "disgusted": "disgust",
    "surprised": "surprise",
    "no emotion": "neutral",
    "ashamed": "shame",
    "guilty": "guilt",
}


def canonical_label(raw: str) -> str | None:
    """The canonical label for a native spelling (`"Happy"`, `"no_emotion"`), or None if the table lacks it."""
    key = " ".join(raw.replace("_", " ").replace("-", " ").lower().split())
    return LABEL_ALIASES.get(key)


def _canonical_labels(labels: Sequence[str]) -> tuple[str, ...]:
    out = []
    for label in labels:
        canonical = canonical_label(label)
        if canonical is None:
            raise EmolibDataError(f"unknown label {label!r}; known spellings: {sorted(LABEL_ALIASES)}")
        out.append(canonical)
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitConfig:
    """Fractions and seed of the seeded split used for datasets without an official one (see module docstring)."""

    train: float = 0.6
    dev: float = 0.2
    test: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.fractions) < 0 or not math.isclose(sum(self.fractions), 1.0, abs_tol=1e-9):
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self.fractions}")

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.dev, self.test)


ISEAR_SPLIT = SplitConfig()
WIKITEXT_SPLIT = SplitConfig(train=0.7, dev=0.15, test=0.15)


def _split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding: sizes sum to `n` and each is within one of `n * fraction`."""
    exact = [round(n * f, 9) for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _seeded_key(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def seeded_split(ids: Sequence[str], groups: Sequence[str], config: SplitConfig) -> list[str]:
    """Split name per row: within each group (label), rows ordered by sha256(seed:id) are cut at the fractions.

    Depends only on the (id, group) pairs and the config, not on row order, so it is stable across runs and machines.
    """
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    out = [""] * len(ids)
    for rows in members.values():
        rows.sort(key=lambda i: _seeded_key(config.seed, ids[i]))
        start = 0
        for name, size in zip(SPLITS, _split_sizes(len(rows), config.fractions), strict=True):
            for i in rows[start : start + size]:
                out[i] = name
            start += size
    return out


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


# --------------------------------------------------------------------------------------------------- reading


def _read_text(path: Path, missing_hint: str = "") -> str:
    """The file decoded as UTF-8 (a BOM is dropped); undecodable bytes raise with their line number."""
    if not path.is_file():
        raise EmolibDataError(f"{path.resolve()} is missing. {missing_hint}".strip())
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise EmolibDataError(
            f"{path}, line {line}: cannot decode byte {raw[error.start : error.start + 1]!r} as UTF-8 "
            "(expected a UTF-8 text file, as distributed)."
        ) from error


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its `\\n` or `\\r\\n`); only `\\n` ends a line (unlike `splitlines`)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        yield number, line.removesuffix("\r")


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number where the record ends, fields) of a quoted CSV; broken quoting raises with the line."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise EmolibDataError(f"{path}, line {reader.line_num}: malformed CSV ({error}).") from error
        yield reader.line_num, record


def _header_index(
    path: Path, header: Sequence[str] | None, required: Sequence[str], layout: str
) -> list[int]:
    if header is None:
        raise EmolibDataError(f"{path} is empty; expected a header row ({layout}).")
    missing = [name for name in required if name not in header]
    if missing:
        raise EmolibDataError(f"{path}, line 1: header lacks column(s) {missing}; expected {layout}.")
    return [list(header).index(name) for name in required]


class _Sink:
    """Collects one load's rows, applying the shared checks (empty text, label, duplicate id) and counting skips."""

    def __init__(
        self, spec: DatasetSpec, on_bad_row: OnBadRow, report: LoadReport, missing_hint: str
    ) -> None:
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
        self.spec = spec
        self.on_bad_row = on_bad_row
        self.report = report
        self.missing_hint = missing_hint
        self.texts: list[str] = []
        self.labels: list[str] = []
        self.splits: list[str] = []
        self.ids: list[str] = []
        self._seen: dict[str, tuple[Path, int]] = {}
        self._label_cache: dict[str, str | None] = {}

    def read_text(self, path: Path) -> str:
        """A file's text, recorded in the report; a missing file raises with the hint on what the folder needs."""
        self.report.files.append(str(path))
        return _read_text(path, self.missing_hint)

    def skip(self, reason: str, split: str | None, path: Path, line: int) -> None:
        """A row that is never loaded (blank line, multi-label): counted, not an error."""
        self.report.read[split or ""] += 1
        self.report.skipped[(split or "", reason)] += 1
        if len(self.report.examples) < MAX_EXAMPLES:
            self.report.examples.append(f"{path}, line {line}: {reason}")

    def bad(self, reason: str, split: str | None, path: Path, line: int, detail: str) -> None:
        """A row that breaks the dataset's contract: raise, or skip and count with `on_bad_row="skip"`."""
        if self.on_bad_row == "raise":
            raise EmolibDataError(
                f"{path}, line {line}: {detail} (load with on_bad_row='skip' to skip and count it)."
            )
        self.skip(reason, split, path, line)

    def add(self, text: str, label: str, split: str | None, row_id: str, path: Path, line: int) -> None:
        text = text.strip()
        if not text:
            self.bad(EMPTY_TEXT, split, path, line, "empty text")
            return
        if self.spec.kind == "emotion":
            if label not in self._label_cache:
                canonical = canonical_label(label)
                self._label_cache[label] = canonical if canonical in self.spec.labels else None
            canonical = self._label_cache[label]
            if canonical is None:
                expected = ", ".join(self.spec.labels)
                self.bad(
                    UNKNOWN_LABEL, split, path, line, f"unknown label {label!r}, expected one of {expected}"
                )
                return
            label = canonical
        if row_id in self._seen:
            first_path, first_line = self._seen[row_id]
            raise EmolibDataError(
                f"{path}, line {line}: id {row_id!r} already used at {first_path.name}, line {first_line}; "
                "expected unique ids."
            )
        self._seen[row_id] = (path, line)
        self.report.read[split or ""] += 1
        self.texts.append(text)
        self.labels.append(label)
        self.splits.append(split or "")
        self.ids.append(row_id)


# --------------------------------------------------------------------------------------------------- loaders


def _load_builtin(folder: Path, sink: _Sink) -> None:
    """`id,label,text` CSV (csv-module quoting, header row) shipped in `emolib/resources/`."""
    path = folder / BUILTIN_FILE
    records = _csv_records(path, sink.read_text(path))
    header = next(records, (1, None))[1]
    i_id, i_label, i_text = _header_index(path, header, ["id", "label", "text"], "columns id,label,text")
    assert header is not None
    for line, record in records:
        if not any(f.strip() for f in record):
            sink.skip(BLANK_LINE, None, path, line)
            continue
        if len(record) != len(header):
            raise EmolibDataError(
                f"{path}, line {line}: expected {len(header)} fields (id,label,text), got {len(record)}."
            )
        sink.add(record[i_text], record[i_label], None, record[i_id], path, line)


ISEAR_FILE = "isear.csv"


def _load_isear(folder: Path, sink: _Sink) -> None:
    """`|`-separated, unquoted, header row; a `|` inside SIT splits the text, so it is re-joined between the
    columns before SIT and the STATE + trailing-empty columns after it (`'|'.join(fields[40:-2])`)."""
    path = folder / ISEAR_FILE
    lines = _lines(sink.read_text(path))
    header = next(lines, (1, None))[1]
    names = header.split("|") if header is not None else None
    i_label, i_key, i_text = _header_index(
        path, names, ["Field1", "MYKEY", "SIT"], "the ISEAR header ID|CITY|...|SIT|STATE|"
    )
    assert names is not None
    n_after = len(names) - i_text - 1
    for line, content in lines:
        if not content.strip():
            sink.skip(BLANK_LINE, None, path, line)
            continue
        fields = content.split("|")
        if len(fields) < len(names):
            raise EmolibDataError(
                f"{path}, line {line}: expected at least {len(names)} '|'-separated fields (as in the header), "
                f"got {len(fields)}."
            )
        text = "|".join(fields[i_text : len(fields) - n_after])
        sink.add(text, fields[i_label], None, fields[i_key], path, line)


MELD_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}


def _load_meld(folder: Path, sink: _Sink) -> None:
    """Quoted CSV per split; text `Utterance`, label `Emotion`, id `<split>-dia<Dialogue_ID>-utt<Utterance_ID>`."""
    for split, name in MELD_FILES.items():
        path = folder / name
        records = _csv_records(path, sink.read_text(path))
        header = next(records, (1, None))[1]
        required = ["Utterance", "Emotion", "Dialogue_ID", "Utterance_ID"]
        i_text, i_label, i_dialogue, i_utterance = _header_index(
            path, header, required, "MELD's columns Sr No.,Utterance,..."
        )
        assert header is not None
        for line, record in records:
            if not any(f.strip() for f in record):
                sink.skip(BLANK_LINE, split, path, line)
                continue
            if len(record) != len(header):
                raise EmolibDataError(
                    f"{path}, line {line}: expected {len(header)} comma-separated fields (as in the header), "
                    f"got {len(record)}."
                )
            row_id = f"{split}-dia{record[i_dialogue].strip()}-utt{record[i_utterance].strip()}"
            sink.add(record[i_text], record[i_label], split, row_id, path, line)


def _load_goemotions(folder: Path, sink: _Sink) -> None:
    """`ekman/<split>.tsv`: text, comma-separated ids into `ekman/labels.txt`, comment id; multi-label rows skipped."""
    labels_path = folder / "ekman" / "labels.txt"
    names = [line.strip() for _, line in _lines(sink.read_text(labels_path)) if line.strip()]
    for split in SPLITS:
        path = folder / "ekman" / f"{split}.tsv"
        for line, content in _lines(sink.read_text(path)):
            if not content.strip():
                sink.skip(BLANK_LINE, split, path, line)
                continue
            fields = content.split("\t")
            if len(fields) != 3:
                raise EmolibDataError(
                    f"{path}, line {line}: expected 3 tab-separated fields (text, label ids, comment id), "
                    f"got {len(fields)}."
                )
            text, label_ids, comment_id = fields
            try:
                ids = {int(x) for x in label_ids.split(",")}
            except ValueError:
                ids = set()
            if not ids or not all(0 <= i < len(names) for i in ids):
                detail = f"label ids {label_ids!r} are not comma-separated indices into {labels_path} (0..{len(names) - 1})"
                sink.bad(UNKNOWN_LABEL, split, path, line, detail)
                continue
            if len(ids) > 1:
                sink.skip(MULTI_LABEL, split, path, line)
                continue
            sink.add(text, names[ids.pop()], split, comment_id, path, line)


CARER_FILES = {"train": "train.txt", "dev": "val.txt", "test": "test.txt"}


def _load_carer(folder: Path, sink: _Sink) -> None:
    """`text;label` lines, no header; `val` is `dev`; ids are `<split>-line<n>` (the files carry none)."""
    for split, name in CARER_FILES.items():
        path = folder / name
        for line, content in _lines(sink.read_text(path)):
            if not content.strip():
                sink.skip(BLANK_LINE, split, path, line)
                continue
            fields = content.split(";")
            if len(fields) != 2:
                raise EmolibDataError(
                    f"{path}, line {line}: expected `text;label` (exactly one ';'), got {len(fields)} fields."
                )
            sink.add(fields[0], fields[1], split, f"{split}-line{line}", path, line)


WIKITEXT_FILE = "test.txt"
_TITLE = re.compile(r"= (?!=)(.*?)(?<!=) =")
_SECTION = re.compile(r"= =.*= =")
_ESCAPES = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def _slug(title: str) -> str:
    for escape, char in _ESCAPES.items():
        title = title.replace(escape, char)
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_title.lower()).strip("-") or "article"


def _blank_run_after(lines: Sequence[str], index: int) -> int:
    run = 0
    while index + 1 + run < len(lines) and not lines[index + 1 + run].strip():
        run += 1
    return run


def _article_starts(lines: Sequence[str]) -> list[int]:
    """Indices of article titles: ` = Title = ` (one `=` each side) followed by a heading-sized blank gap.

    Section headings (` = = H = = `) and lines like ` = Qualified for the next round ` are not titles. Two formula
    fragments in "Constant k filter" (` = 1 henry and capacitance C = `) have the title shape but the blank gap of
    body text; requiring a gap at least as wide as the narrowest after a section heading rejects them (a file with
    uniform gaps, or without sections, keeps every title-shaped line).
    """
    candidates = [i for i, line in enumerate(lines) if _TITLE.fullmatch(line.strip())]
    section_gaps = [
        _blank_run_after(lines, i) for i, line in enumerate(lines) if _SECTION.fullmatch(line.strip())
    ]
    heading_gap = min(section_gaps, default=0)
    return [i for i in candidates if _blank_run_after(lines, i) >= heading_gap]


def _load_wikitext(folder: Path, sink: _Sink) -> None:
    """One row per article: its non-blank lines, stripped, joined by newlines (title line first); id = title slug."""
    path = folder / WIKITEXT_FILE
    lines = [line for _, line in _lines(sink.read_text(path))]
    starts = _article_starts(lines)
    first_text = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first_text is None or not starts or first_text != starts[0]:
        where = 1 if first_text is None else first_text + 1
        raise EmolibDataError(
            f"{path}, line {where}: expected the file to start with an article title ` = Title = `."
        )
    slugs: Counter[str] = Counter()
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        title = _TITLE.fullmatch(lines[start].strip())
        assert title is not None
        slug = _slug(title.group(1))
        slugs[slug] += 1
        row_id = slug if slugs[slug] == 1 else f"{slug}-{slugs[slug]}"
        text = "\n".join(line.strip() for line in lines[start:end] if line.strip())
        sink.add(text, "", None, row_id, path, start + 1)


# --------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of the dataset registry. `labels` is the native label set in canonical spelling; `folder` is the
    sub-folder of `$EMOLIB_DATA_DIR` (None = packaged in `emolib/resources/`); `files` says what it must contain."""

    name: str
    kind: Kind
    loader: Callable[[Path, _Sink], None]
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
            loader=_load_builtin,
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
            loader=_load_isear,
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
            loader=_load_meld,
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
            loader=_load_goemotions,
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
            loader=_load_carer,
            folder="carer_emotion",
            files=tuple(CARER_FILES.values()),
            labels=("sadness", "joy", "love", "anger", "fear", "surprise"),
            official_splits=True,
            description="English tweets (CARER); six labels incl. love, no disgust, no neutral.",
            bibtex="saravia2018carer",
        ),
        DatasetSpec(
            name="wikitext-2-raw",
            kind="lm",
            loader=_load_wikitext,
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
    sink = _Sink(spec, on_bad_row, report, hint)
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
    return Dataset.from_dict(columns, features=FEATURES), report


def load(
    name: str = DEFAULT_DATASET,
    *,
    split: SplitConfig | None = None,
    on_bad_row: OnBadRow = "raise",
    data_dir: Path | str | None = None,
) -> Dataset:
    """`load_with_report` without the report."""
    return load_with_report(name, split=split, on_bad_row=on_bad_row, data_dir=data_dir)[0]


def select_split(dataset: Dataset, split: str) -> Dataset:
    """Rows of one split (`train`, `dev` or `test`), in their original order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return dataset.select([i for i, s in enumerate(dataset["split"]) if s == split])


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
    return list(select_split(load(name, split=config, data_dir=data_dir), split)["text"])


# --------------------------------------------------------------------------------------------------- runs


def restrict_labels(dataset: Dataset, labels: Sequence[str]) -> tuple[Dataset, pd.DataFrame]:
    """Keep rows whose label is in a run's label set; also return excluded rows as a (label x split) count table.

    Labels may be given in any spelling of `LABEL_ALIASES`. The table is empty when nothing was excluded.
    """
    keep = set(_canonical_labels(labels))
    frame = dataset.select_columns(["label", "split"]).to_pandas()
    mask = frame["label"].isin(keep)
    excluded = frame[~mask].groupby(["label", "split"]).size().unstack(fill_value=0)
    excluded = excluded.reindex(columns=[s for s in SPLITS if s in set(frame["split"])], fill_value=0)
    excluded.columns.name = "split"
    return dataset.select(mask.to_numpy().nonzero()[0].tolist()), excluded.astype(int)


def stratified_subsample(dataset: Dataset, n_per_label: int, seed: int = 0) -> tuple[Dataset, pd.DataFrame]:
    """At most `n_per_label` rows per (split, label), chosen by sha256(seed:id); also return the counts.

    A label with fewer rows than asked keeps them all: the counts (split, label, requested, available, taken, short)
    say so. Rows keep their original order, and the choice does not depend on it.
    """
    if n_per_label < 1:
        raise ValueError(f"n_per_label must be >= 1, got {n_per_label}")
    frame = dataset.select_columns(["label", "split", "id"]).to_pandas()
    keys = [_seeded_key(seed, row_id) for row_id in frame["id"]]
    chosen: list[int] = []
    counts = []
    for (split, label), group in frame.groupby(["split", "label"], sort=False):
        ranked = sorted(group.index, key=keys.__getitem__)
        taken = ranked[:n_per_label]
        chosen.extend(taken)
        counts.append(
            {
                "split": split,
                "label": label,
                "requested": n_per_label,
                "available": len(group),
                "taken": len(taken),
                "short": len(group) < n_per_label,
            }
        )
    table = pd.DataFrame(counts, columns=["split", "label", "requested", "available", "taken", "short"])
    order = {s: i for i, s in enumerate(SPLITS)}
    table = table.sort_values(["split", "label"], key=lambda c: c.map(order) if c.name == "split" else c)
    return dataset.select(sorted(chosen)), table.reset_index(drop=True)
