"""Who produced a result or an executed chapter: commit, work-tree state, library and runtime versions, time."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
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


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of Linux's /proc/cpuinfo (empty elsewhere)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """What ran a result: CPU model, logical cores, torch's threads and the CPU kernels it dispatches to, and
    whether the CPU has AMX (bf16 matrix tiles). Two machines can give different last digits (bf16 products run
    through other kernels), so a numbers' comparison across builds needs to know whether the machine changed."""
    import torch  # lazily: writing a results file should not be what imports torch

    info = _cpuinfo(cpuinfo)
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags if flags else None,
    }


def provenance(chapter: str, preset: str) -> dict[str, Any]:
    """Who produced a result: chapter, preset, commit, library and runtime versions, the machine, UTC time."""
    return {
        "chapter": chapter,
        "preset": preset,
        "git": git_state(),
        "emolib_version": __version__,
        "python_version": platform.python_version(),
        "torch_version": _package_version("torch"),
        "machine": machine(),
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
