"""On-disk cache for expensive artefacts (converted models, activations, SAEs, results).

Every entry lives under a key derived from its full config, is written atomically (temporary name, then rename),
and carries a manifest of checksums so that a truncated or corrupt entry is detected and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"

#: Key of an entry's build wall time (seconds) in its manifest meta.
BUILD_SECONDS = "build_seconds"


def project_root() -> Path:
    """The repository root (the folder holding `emolib/`)."""
    return Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    """`$EMOLIB_CACHE_DIR/<parts>` (default `<project>/.cache/emolib`), created on demand."""
    root = Path(os.environ.get("EMOLIB_CACHE_DIR", project_root() / ".cache" / "emolib"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_dir(*parts: str) -> Path:
    """`$EMOLIB_BUILD_DIR/<parts>` (default `<project>/_build`), created on demand."""
    root = Path(os.environ.get("EMOLIB_BUILD_DIR", project_root() / "_build"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def plain(obj: Any, *, finite: bool = False, unknown: Callable[[Any], Any] | None = None) -> Any:
    """JSON data from dataclasses, mappings, tuples, paths and numpy/pandas/torch values (the one converter of the
    project: cache keys, cached results, results files).

    `finite=True` writes non-finite floats as None (public results files; the caches keep inf and NaN, which
    Python's json reads back). An object of no JSON type goes to `unknown` (cache keys use `repr`), else raises.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: plain(getattr(obj, f.name), finite=finite, unknown=unknown)
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, Mapping):
        return {str(k): plain(v, finite=finite, unknown=unknown) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v, finite=finite, unknown=unknown) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return None if finite and not math.isfinite(obj) else float(obj)
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, np.generic | np.ndarray) or hasattr(obj, "tolist"):
        return plain(obj.tolist(), finite=finite, unknown=unknown)
    if obj is pd.NA or obj is pd.NaT:
        return None
    if unknown is not None:
        return unknown(obj)
    raise TypeError(
        f"results must be JSON data (dicts, lists, numbers, strings); got {type(obj).__name__}: {obj!r}"
    )


def config_key(*configs: Any, length: int = 16) -> str:
    """A stable hex digest of configs (dataclasses, dicts, scalars): equal configs give equal keys."""
    payload = json.dumps([plain(c, unknown=repr) for c in configs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def pairs_digest(firsts: Sequence[str], seconds: Sequence[str]) -> str:
    """SHA-256 of paired strings (e.g. item ids and texts) in order: one cache-key part for a list of items."""
    joined = "\x1f".join(f"{a}\x1e{b}" for a, b in zip(firsts, seconds, strict=True))
    return hashlib.sha256(joined.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"meta": meta, "files": files}, indent=2))


def entry_meta(folder: Path) -> dict[str, Any]:
    """The `meta` an entry was written with (including `BUILD_SECONDS`); verify the entry first."""
    return json.loads((Path(folder) / MANIFEST).read_text())["meta"]


def entry_digest(folder: Path) -> str:
    """A digest of an entry's content (its files' names and checksums from the manifest): two builds made the same
    artefact exactly when their digests are equal, whatever their keys or build times."""
    files = json.loads((Path(folder) / MANIFEST).read_text())["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_entry(folder: Path) -> bool:
    """True if `folder` holds a complete entry whose files match the checksums in its manifest."""
    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        for rel, info in manifest["files"].items():
            file = Path(folder) / rel
            if (
                not file.is_file()
                or file.stat().st_size != info["size"]
                or file_sha256(file) != info["sha256"]
            ):
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_abandoned_builds(folder: Path) -> list[Path]:
    """Remove the temporary folders of earlier builds of `folder` whose process has died (a killed build never
    reaches its clean-up, and an activation cache's leftovers hold gigabytes); return what was removed.

    A temporary folder is named `.<entry>.<pid>.<random>.tmp`; one without a readable pid (written before pids
    were part of the name) is removed too, since no running build of this version can own it."""
    folder = Path(folder)
    removed = []
    for tmp in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):
        owner = tmp.name[len(folder.name) + 2 :].split(".", 1)[0]
        if owner.isdigit() and _process_alive(int(owner)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        logger.warning("removed %d abandoned build folder(s) of %s", len(removed), folder.name)
    return removed


def cached_entry(folder: Path, build: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
    """Return `folder` if it verifies; otherwise run `build(tmp_folder)` and move the result into place atomically.

    The manifest records `meta` (as it stands after the build) and the build's wall time (`BUILD_SECONDS`), so a
    reused entry still tells how long it took to make (`entry_meta`).

    A folder that exists but fails verification (interrupted write, truncated or edited file) is removed and rebuilt.
    """
    folder = Path(folder)
    if verify_entry(folder):
        return folder
    if folder.exists():
        logger.warning("cache entry %s is incomplete or corrupt: rebuilding it", folder)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    try:
        began = time.perf_counter()
        build(tmp)
        # after build: build may add to meta (counts it learned while building)
        meta = {**(meta or {}), BUILD_SECONDS: time.perf_counter() - began}
        _write_manifest(tmp, meta)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process built the same entry meanwhile (a rename onto a non-empty folder fails): keep
            # theirs if it verifies, since equal keys mean equal content.
            if not verify_entry(folder):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
