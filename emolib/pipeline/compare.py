"""Compare two builds' results files number by number: the check that a refactoring changed no result.

Each results file is flattened into leaves (`models.gemma-3-270m.subsets.all.per_layer[3].probe_resid` -> 0.41).
Leaves at the same path are compared (numbers within a tolerance, everything else exactly). A leaf that moved to
another path counts as *relocated* when the other file has a leaf with the same name and value that no path
matched; what is left is *missing* (only in the old file) or *added* (only in the new one). Run-time facts
(provenance, timings) are not results and are skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Leaves whose path matches one of these are run-time facts, not results.
SKIPPED_PATHS = (r"(^|\.)provenance(\.|$)", r"seconds", r"(^|\.)runtime", r"timings", r"created_utc")


@dataclass
class Comparison:
    """What differs between two results files (or folders of them)."""

    compared: int = 0
    relocated: int = 0
    changed: list[tuple[str, Any, Any]] = field(default_factory=list)
    missing: list[tuple[str, Any]] = field(default_factory=list)
    added: list[tuple[str, Any]] = field(default_factory=list)
    #: How the two builds' machines differ (provenance, not results: reported beside them, never a difference).
    machines: set[str] = field(default_factory=set)

    @property
    def same(self) -> bool:
        """No value changed and nothing of the old results is missing (added leaves are allowed)."""
        return not self.changed and not self.missing

    def merge(self, other: Comparison, prefix: str) -> None:
        self.compared += other.compared
        self.relocated += other.relocated
        self.changed += [(f"{prefix}:{p}", a, b) for p, a, b in other.changed]
        self.missing += [(f"{prefix}:{p}", a) for p, a in other.missing]
        self.added += [(f"{prefix}:{p}", b) for p, b in other.added]
        self.machines |= other.machines

    def report(self, limit: int = 30) -> str:
        lines = [
            f"{self.compared} leaves at the same path, {self.relocated} relocated, {len(self.changed)} changed, "
            f"{len(self.missing)} missing, {len(self.added)} added: "
            + ("the same results" if self.same else "RESULTS DIFFER")
        ]
        lines += [f"  note: {line}" for line in sorted(self.machines)]
        for title, rows in (("changed", self.changed), ("missing", self.missing), ("added", self.added)):
            for row in rows[:limit]:
                lines.append(f"  {title}: " + " -> ".join(map(repr, row[1:])) + f"  at {row[0]}")
            if len(rows) > limit:
                lines.append(f"  ... {len(rows) - limit} more {title}")
        return "\n".join(lines)


def leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every scalar in nested dicts and lists (list items as `[i]`)."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


def _skipped(path: str) -> bool:
    return any(re.search(pattern, path) for pattern in SKIPPED_PATHS)


def _leaf_name(path: str) -> str:
    return re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]


def values_equal(a: Any, b: Any, rtol: float, atol: float) -> bool:
    """Numbers within `atol + rtol * |a|` (None, NaN and infinities equal only themselves); others exactly."""
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if not (isinstance(a, numbers) and isinstance(b, numbers)):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol + rtol * abs(a)


def _rounded(value: Any, digits: int = 6) -> Any:
    return float(f"{value:.{digits}g}") if isinstance(value, float) and math.isfinite(value) else value


def machine_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> set[str]:
    """How the machines that wrote two results records differ (their provenance's `machine`), in words: bf16
    products run through other kernels on another CPU, so last digits may move with no change of code."""
    found = [record.get("provenance", {}).get("machine") for record in (old, new)]
    if found[0] is None or found[1] is None:
        missing = " and ".join(w for w, m in zip(("old", "new"), found, strict=True) if m is None)
        return {f"the {missing} results do not record their machine (written before it was recorded)"}
    return {
        f"the builds ran on different machines: {key} {found[0].get(key)!r} -> {found[1].get(key)!r}"
        for key in sorted(set(found[0]) | set(found[1]))
        if found[0].get(key) != found[1].get(key)
    }


def compare_records(
    old: Mapping[str, Any], new: Mapping[str, Any], *, rtol: float = 1e-6, atol: float = 1e-9
) -> Comparison:
    """Compare two results records (the JSON of one chapter) leaf by leaf, see the module docstring."""
    old_leaves = {p: v for p, v in leaves(old) if not _skipped(p)}
    new_leaves = {p: v for p, v in leaves(new) if not _skipped(p)}
    out = Comparison(machines=machine_differences(old, new))
    unmatched_new = {p: v for p, v in new_leaves.items() if p not in old_leaves}
    lost = []
    for path, value in old_leaves.items():
        if path in new_leaves:
            out.compared += 1
            if not values_equal(value, new_leaves[path], rtol, atol):
                out.changed.append((path, value, new_leaves[path]))
        else:
            lost.append((path, value))
    pool = Counter((_leaf_name(p), _rounded(v)) for p, v in unmatched_new.items() if v is not None)
    for path, value in lost:
        key = (_leaf_name(path), _rounded(value))
        if value is not None and pool[key] > 0:
            pool[key] -= 1
            out.relocated += 1
        else:
            out.missing.append((path, value))
    found = Counter((_leaf_name(p), _rounded(v)) for p, v in lost if v is not None)
    for path, value in unmatched_new.items():
        key = (_leaf_name(path), _rounded(value))
        if value is not None and found[key] > 0:
            found[key] -= 1
        else:
            out.added.append((path, value))
    return out


def compare_results(
    old: Path, new: Path, *, chapters: Sequence[str] | None = None, rtol: float = 1e-6, atol: float = 1e-9
) -> Comparison:
    """Compare two results files, or every `<chapter>.json` of two results folders (a chapter missing from the
    new folder counts all its leaves as missing)."""
    old, new = Path(old), Path(new)
    for path in (old, new):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (run the chapters that write it first)")
    if old.is_file() and new.is_file():
        return compare_records(json.loads(old.read_text()), json.loads(new.read_text()), rtol=rtol, atol=atol)
    if not old.is_dir() or not new.is_dir():
        raise FileNotFoundError(f"compare two results files or two folders of them, not {old} and {new}")
    out = Comparison()
    for path in sorted(old.glob("*.json")):
        if chapters and path.stem not in chapters:
            continue
        other = new / path.name
        record = json.loads(path.read_text())
        if not other.is_file():
            out.missing += [(f"{path.stem}:{p}", v) for p, v in leaves(record) if not _skipped(p)]
            continue
        out.merge(compare_records(record, json.loads(other.read_text()), rtol=rtol, atol=atol), path.stem)
    return out
