"""Who produced a result or an executed chapter: commit, work-tree state, library and runtime versions, time."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from emolib import __version__
from emolib.cache import project_root


def git_state(root: Path | None = None) -> dict[str, Any]:
    """The commit checked out at `root` (default: the project) and whether the work tree differs from it.

    Read-only (`--no-optional-locks`, so it never takes the index lock from a concurrent commit); both fields are
    None outside a git checkout or without git.
    """
    root = Path(root or project_root())

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(chapter: str, preset: str) -> dict[str, Any]:
    """Who produced a result: chapter, preset, commit, library and runtime versions, UTC time."""
    return {
        "chapter": chapter,
        "preset": preset,
        "git": git_state(),
        "emolib_version": __version__,
        "python_version": platform.python_version(),
        "torch_version": _package_version("torch"),
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
