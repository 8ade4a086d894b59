"""Who produced a result or an executed chapter: commit, work-tree state, library and runtime versions, time."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
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


#: What `bf16_matmul_kernel` records when no oneDNN kernel takes a bfloat16 product (ATen's own code runs it).
NOT_ONEDNN = "not oneDNN"


@functools.cache
def bf16_matmul_kernel() -> str:
    """The oneDNN implementation a bfloat16 matrix product runs on here (e.g. `brg_matmul:avx10_1_512_amx`),
    `NOT_ONEDNN`, or "unknown (why)" where it cannot be read (a torch without oneDNN, no file descriptor 1).
    bfloat16 numbers depend on it: SmolLM2's 560 analysis-set answers computed through the AMX, AVX-512 bf16 and
    AVX2 kernels of one machine differ in 17-25 answers, where float32 forwards are bitwise equal (README,
    Reproducibility). Read from oneDNN's verbose lines, which it prints to file descriptor 1."""
    try:
        lines = _onednn_verbose_of_a_bf16_product()
    except (OSError, RuntimeError, AttributeError) as error:
        return f"unknown ({type(error).__name__}: {error})"
    kernels = [_implementation(line.split(",")) for line in lines if line.startswith("onednn_verbose")]
    kernels = [kernel for kernel in kernels if kernel]
    return kernels[0] if kernels else NOT_ONEDNN


def _implementation(fields: list[str]) -> str | None:
    """The implementation field of an `exec` line (`...,exec,cpu,matmul,<implementation>,...`)."""
    if "exec" not in fields:
        return None
    at = fields.index("exec") + 3
    return fields[at] if at < len(fields) and fields[at - 2] == "cpu" else None


def _onednn_verbose_of_a_bf16_product() -> list[str]:
    import torch

    sys.stdout.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(1)
        try:
            os.dup2(sink.fileno(), 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                square = torch.ones(32, 32, dtype=torch.bfloat16)
                torch.nn.functional.linear(square, square)
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).fflush(None)  # C stdio may still hold verbose lines (not on Windows)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace").splitlines()


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """What ran a result: CPU model, logical cores, torch's threads and the CPU kernels it dispatches to (its
    vector level and the oneDNN kernel of a bfloat16 product), and whether the CPU has AMX (bf16 matrix tiles).
    Two machines, or one machine whose oneDNN takes another kernel, give different bfloat16 numbers, so a numbers'
    comparison across builds needs to know whether the machine changed."""
    import torch  # lazily: writing a results file should not be what imports torch

    info = _cpuinfo(cpuinfo)
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags if flags else None,
        "bf16_matmul_kernel": bf16_matmul_kernel(),
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
