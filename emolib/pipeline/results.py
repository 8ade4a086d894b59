"""Results as data: each chapter writes its numbers to `_build/results/<chapter>.json`, and nothing is retyped.

Later chapters and the README table read these files, so a number shown anywhere traces back to one executed
chapter, with the preset, commit and library versions that produced it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from emolib.cache import build_dir, plain, project_root, write_json
from emolib.pipeline.provenance import provenance
from emolib.pipeline.toc import toc_docnames

PROVENANCE = "provenance"
README_ROWS = "readme_rows"
START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
MODELS_START = "<!-- models:start -->"
MODELS_END = "<!-- models:end -->"


class ResultsMissingError(FileNotFoundError):
    """A chapter's results file is absent: the chapter that writes it has not been run (with this build dir)."""


class ResultsPresetError(ValueError):
    """A chapter's results were computed with another preset than the one asked for."""


def results_path(chapter: str, results_dir: Path | None = None) -> Path:
    return Path(results_dir or build_dir("results")) / f"{chapter}.json"


def write_results(
    chapter: str, payload: Mapping[str, Any], *, preset: str, results_dir: Path | None = None
) -> Path:
    """Write `payload` plus provenance to `_build/results/<chapter>.json` atomically; return the path.

    `payload` is the chapter's own dictionary of numbers (non-finite floats become null). An optional
    `"readme_rows"` list of flat dicts is what `emolib readme` shows in the README table.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", chapter):
        raise ValueError(f"chapter name {chapter!r} must be a plain file stem such as '00_setup'")
    if PROVENANCE in payload:
        raise ValueError(f"'{PROVENANCE}' is reserved in results payloads (chapter {chapter})")
    rows = payload.get(README_ROWS)
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, Mapping) for r in rows)):
        raise TypeError(f"'{README_ROWS}' must be a list of dicts (chapter {chapter})")
    record = {**plain(payload, finite=True), PROVENANCE: provenance(chapter, preset)}
    path = results_path(chapter, results_dir)
    write_json(path, record)
    return path


def read_results(
    chapter: str, *, preset: str | None = None, results_dir: Path | None = None
) -> dict[str, Any]:
    """The payload written by `chapter` (with its `"provenance"`); optionally insist on the preset it used."""
    path = results_path(chapter, results_dir)
    if not path.is_file():
        source = project_root() / "book" / f"{chapter}.md"
        producer = (
            f"the chapter {source.relative_to(project_root())}"
            if source.is_file()
            else f"chapter {chapter!r}"
        )
        raise ResultsMissingError(
            f"no results for chapter {chapter!r}: {path} does not exist. It is written by {producer}; "
            f"run `emolib book --chapters {chapter}` (or `make build`) first."
        )
    record = json.loads(path.read_text())
    if preset is not None and record.get(PROVENANCE, {}).get("preset") != preset:
        found = record.get(PROVENANCE, {}).get("preset")
        raise ResultsPresetError(
            f"{path} was computed with preset {found!r}, not {preset!r}: "
            f"re-run `emolib book --chapters {chapter} --preset {preset}`."
        )
    return record


def load_all_results(results_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every chapter's record under the results folder, keyed by chapter, in file-name order."""
    folder = Path(results_dir or build_dir("results"))
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def in_reading_order(
    records: Mapping[str, Mapping[str, Any]], docnames: Sequence[str]
) -> dict[str, Mapping[str, Any]]:
    """`records` in the book's reading order: a record named `flow` belongs to the page `book/01_flow` (the page's
    name, or its name after a `NN_`-style prefix, equals the record's); records of no page come last, by name."""

    def rank(chapter: str) -> int:
        for i, docname in enumerate(docnames):
            page = docname.rsplit("/", 1)[-1]
            if page == chapter or page.split("_", 1)[-1] == chapter:
                return i
        return len(docnames)

    return {ch: records[ch] for ch in sorted(records, key=lambda ch: (rank(ch), ch))}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.3g}"
    elif isinstance(value, list | tuple):
        text = ", ".join(_cell(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A markdown table whose columns are the union of the rows' keys, in order of first appearance."""
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [str(k) for k in row if str(k) not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _describe_runs(records: Mapping[str, Mapping[str, Any]]) -> str:
    """One line saying which preset and commit produced the numbers (grouped when chapters differ)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for chapter, record in records.items():
        prov = record.get(PROVENANCE, {})
        git = prov.get("git") or {}
        commit = (git.get("commit") or "unknown")[:10] + (
            " (uncommitted changes)" if git.get("dirty") else ""
        )
        groups.setdefault((str(prov.get("preset")), commit), []).append(chapter)
    parts = [
        f"preset `{p}`, commit `{c}`" + (f" ({', '.join(chs)})" if len(groups) > 1 else "")
        for (p, c), chs in groups.items()
    ]
    return "; ".join(parts)


def readme_block(records: Mapping[str, Mapping[str, Any]]) -> str:
    """The text that goes between the README markers: one table per chapter (each has its own columns)."""
    with_rows = {ch: rec for ch, rec in records.items() if rec.get(README_ROWS)}
    if not with_rows:
        return "_No results yet: `make build` runs the book and fills this table._"
    tables = "\n\n".join(render_table(rec[README_ROWS]) for rec in with_rows.values())
    return (
        tables
        + f"\n\n<sub>Generated by `emolib readme` from `_build/results/*.json`: {_describe_runs(with_rows)}.</sub>"
    )


def replace_block(text: str, block: str, markers: tuple[str, str] = (START_MARKER, END_MARKER)) -> str:
    """`text` with everything between the markers (default: the results markers) replaced by `block`; the markers
    stay."""
    first, last = markers
    start, end = text.find(first), text.find(last)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"README needs a '{first}' line followed by a '{last}' line")
    return text[: start + len(first)] + "\n" + block.strip("\n") + "\n" + text[end:]


def models_block() -> str:
    """The README's models table, from the model registry (so a new registry entry appears without an edit)."""
    from emolib.lm.models import models_table  # the registry imports torch: only when the README is rewritten

    return (
        render_table(models_table())
        + "\n\n<sub>Generated by `emolib readme` from `emolib/lm/models.py`.</sub>"
    )


def update_readme(readme: Path | None = None, results_dir: Path | None = None) -> bool:
    """Rewrite the README results block from the results files, in the book's reading order, and the models block
    (if the README has one) from the registry; return whether the file changed."""

    readme = Path(readme or project_root() / "README.md")
    text = readme.read_text()
    toc = project_root() / "_toc.yml"
    records = load_all_results(results_dir)
    if toc.exists():
        records = in_reading_order(records, toc_docnames(toc))
    new = replace_block(text, readme_block(records))
    if MODELS_START in new:
        new = replace_block(new, models_block(), (MODELS_START, MODELS_END))
    if new == text:
        return False
    readme.write_text(new)
    return True
