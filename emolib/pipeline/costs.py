"""What a build cost: each chapter's wall time and each cached artefact's build time per model (`emolib costs`).

Every cache entry records how long it took to build (`emolib.cache.BUILD_SECONDS`) and every executed chapter its
run time, so the costs of a build can be read after the fact, also from a build that was interrupted. Entries nest:
a study's time includes the predictions, activations or SAEs it built first, so kinds are reported side by side,
never summed across kinds. A manifest that cannot be read is listed with no time, not skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from emolib.cache import BUILD_SECONDS, MANIFEST

#: The hex key every cache entry's folder name ends with (`emolib.cache.config_key`).
_KEY_SUFFIX = re.compile(r"-[0-9a-f]{16}$")


def entry_model(folder_name: str, models: Sequence[str]) -> str:
    """The model an entry belongs to: the longest of `models` that starts its folder name, else the name without
    its key (`tiny-all-<key>` -> `tiny-all`)."""
    matches = [
        m
        for m in models
        if folder_name == m or folder_name.startswith(f"{m}-") or folder_name.startswith(f"{m}@")
    ]
    if matches:
        return max(matches, key=len)
    return _KEY_SUFFIX.sub("", folder_name)


def entry_costs(
    cache_root: Path, models: Sequence[str] | None = None, since: float | None = None
) -> pd.DataFrame:
    """One row per cache entry under `cache_root`: kind (its folder relative to the root, e.g. `studies/setup`),
    model, build seconds (NaN when the manifest cannot be read) and when it was written (Unix time). `since` keeps
    the entries written at or after that time (one build's entries in a shared cache)."""
    if models is None:
        from emolib.lm.models import MODELS

        models = list(MODELS)
    rows = []
    for manifest in sorted(Path(cache_root).rglob(MANIFEST)):
        folder = manifest.parent
        written = manifest.stat().st_mtime
        if since is not None and written < since:
            continue
        try:
            seconds = float(json.loads(manifest.read_text())["meta"][BUILD_SECONDS])
        except (OSError, ValueError, KeyError, TypeError):
            seconds = float("nan")
        rows.append(
            {
                "kind": folder.parent.relative_to(cache_root).as_posix(),
                "model": entry_model(folder.name, models),
                "seconds": seconds,
                "written": written,
                "entry": folder.name,
            }
        )
    return pd.DataFrame(rows, columns=["kind", "model", "seconds", "written", "entry"])


def cost_table(costs: pd.DataFrame) -> pd.DataFrame:
    """Build minutes per kind (rows) and model (columns), with the entry count per kind. A kind a model has no
    entry of is NaN; entries with no readable time add nothing here (`report` lists them)."""
    if costs.empty:
        return pd.DataFrame()
    minutes = costs.pivot_table(index="kind", columns="model", values="seconds", aggfunc="sum") / 60
    minutes[costs.pivot_table(index="kind", columns="model", values="entry", aggfunc="count").isna()] = float(
        "nan"
    )
    minutes["entries"] = costs.groupby("kind").size()
    return minutes.round(1)


def chapter_seconds(build_dir: Path) -> dict[str, float]:
    """Each executed chapter's run time in seconds, from the stamps `emolib book` writes (`executed/*.ipynb`)."""
    import nbformat

    from emolib.pipeline.book import METADATA_KEY

    out = {}
    for path in sorted((Path(build_dir) / "executed").glob("*.ipynb")):
        stamp = nbformat.read(path, as_version=4).metadata.get(METADATA_KEY, {})
        out[path.stem] = float(stamp.get("run_seconds", float("nan")))
    return out


def report(cache_root: Path, build_dir: Path | None = None, since: float | None = None) -> str:
    """The text `emolib costs` prints: chapter times (when a build folder is given), then the cache table."""
    lines = []
    if build_dir is not None:
        chapters = chapter_seconds(build_dir)
        lines.append(f"chapters ({build_dir / 'executed'}): minutes")
        lines += [f"  {name:<24} {seconds / 60:7.1f}" for name, seconds in chapters.items()]
        lines.append(
            f"  {'total':<24} {sum(chapters.values()) / 60:7.1f}" if chapters else "  (none executed)"
        )
    costs = entry_costs(cache_root, since=since)
    lines.append(
        f"cache entries ({cache_root}): build minutes per model; a study includes what it built first"
    )
    table = cost_table(costs)
    lines.append(table.to_string(na_rep="-") if not table.empty else "  (no entries)")
    unreadable = costs[costs["seconds"].isna()]
    if len(unreadable):
        lines.append(
            f"{len(unreadable)} entries have no readable build time: " + ", ".join(unreadable["entry"])
        )
    return "\n".join(lines)
