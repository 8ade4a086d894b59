"""Readers of each dataset's original files into rows, with the shared row checks and skip counting."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from emolib.data.labels import canonical_label
from emolib.data.schema import (
    BLANK_LINE,
    EMPTY_TEXT,
    MAX_EXAMPLES,
    MULTI_LABEL,
    SPLITS,
    UNKNOWN_LABEL,
    EmolibDataError,
    LoadReport,
    OnBadRow,
)

if TYPE_CHECKING:
    from emolib.data.registry import DatasetSpec

BUILTIN_FILE = "builtin_emotions.csv"


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


class Sink:
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


def load_builtin(folder: Path, sink: Sink) -> None:
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


def load_isear(folder: Path, sink: Sink) -> None:
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


def load_meld(folder: Path, sink: Sink) -> None:
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


def load_goemotions(folder: Path, sink: Sink) -> None:
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


def load_carer(folder: Path, sink: Sink) -> None:
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


CROWD_ENVENT_FILE = "crowd-enVent_generation.tsv"
#: The columns read from Crowd-enVENT's generation file (the authors' own reader uses the same names).
CROWD_ENVENT_COLUMNS = ("text_id", "generated_text", "emotion")


def load_crowd_envent(folder: Path, sink: Sink) -> None:
    """`crowd-enVent_generation.tsv`: tab-separated with a header, one event description per row written by the
    person who experienced the emotion; text `generated_text` (as written, emotion words kept), label `emotion`,
    id `text_id`. Other columns (appraisals, demographics) are ignored."""
    path = folder / CROWD_ENVENT_FILE
    records = csv.reader(io.StringIO(sink.read_text(path), newline=""), delimiter="\t", strict=True)
    try:
        header = next(records, None)
        i_id, i_text, i_label = _header_index(
            path,
            header,
            CROWD_ENVENT_COLUMNS,
            "Crowd-enVENT's tab-separated columns text_id, generated_text, emotion, ...",
        )
        assert header is not None
        for record in records:
            line = records.line_num
            if not any(f.strip() for f in record):
                sink.skip(BLANK_LINE, None, path, line)
                continue
            if len(record) != len(header):
                raise EmolibDataError(
                    f"{path}, line {line}: expected {len(header)} tab-separated fields (as in the header), "
                    f"got {len(record)}."
                )
            sink.add(record[i_text], record[i_label], None, record[i_id].strip(), path, line)
    except csv.Error as error:
        raise EmolibDataError(f"{path}, line {records.line_num}: malformed TSV ({error}).") from error


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


def load_wikitext(folder: Path, sink: Sink) -> None:
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
