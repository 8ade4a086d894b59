"""Tests for emolib.cache: stable config keys, atomic writes, and verified cache entries that rebuild when damaged."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from emolib import cache
from emolib.lm.baselines import BaselineConfig
from emolib.lm.classify import ClassifierConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 4
    name: str = "a"


@dataclasses.dataclass(frozen=True)
class Outer:
    rate: float = 0.5
    flag: bool = False
    seeds: tuple[int, ...] = (1, 2)
    path: Path = Path("x/y")
    inner: Inner = dataclasses.field(default_factory=Inner)
    table: dict = dataclasses.field(default_factory=lambda: {"b": 2, "a": 1})


def leftovers(folder: Path) -> list[str]:
    """Temporary names `atomic_file` and `cached_entry` use (dot-prefixed, `.tmp` suffix)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------ config_key


def test_config_key_is_stable_for_equal_configs():
    assert cache.config_key(Outer()) == cache.config_key(Outer())
    assert cache.config_key(BaselineConfig()) == cache.config_key(BaselineConfig())
    # dict order does not matter, nor whether the same values arrive as a fresh instance
    assert cache.config_key({"a": 1, "b": [1, 2]}) == cache.config_key({"b": [1, 2], "a": 1})
    assert cache.config_key(Outer(table={"a": 1, "b": 2})) == cache.config_key(Outer(table={"b": 2, "a": 1}))
    key = cache.config_key("x", 1)
    assert len(key) == 16 and int(key, 16) >= 0
    assert len(cache.config_key("x", length=40)) == 40


def test_config_key_is_a_fixed_digest():
    """Known answer: the digest of the canonical JSON, so keys survive across runs and machines."""
    import hashlib

    expected = hashlib.sha256(b'[{"a":1,"b":[1,2]},"s"]').hexdigest()[:16]
    assert cache.config_key({"b": (1, 2), "a": 1}, "s") == expected


@pytest.mark.parametrize(
    "change",
    [
        {"rate": 0.25},
        {"flag": True},
        {"seeds": (2, 1)},
        {"seeds": (1, 2, 3)},
        {"path": Path("x/z")},
        {"inner": Inner(width=5)},
        {"inner": Inner(name="b")},
        {"table": {"a": 1, "b": 3}},
        {"table": {"a": 1, "c": 2}},
    ],
)
def test_config_key_changes_when_any_field_changes(change):
    assert cache.config_key(Outer()) != cache.config_key(dataclasses.replace(Outer(), **change))


def test_config_key_sees_every_field_of_the_real_configs():
    base = BaselineConfig()
    keys = {cache.config_key(base)}
    for f in dataclasses.fields(ClassifierConfig):
        value = getattr(base.classifier, f.name)
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, str):
            new = value + "-changed"
        else:
            new = value + 1
        keys.add(
            cache.config_key(
                dataclasses.replace(base, classifier=dataclasses.replace(base.classifier, **{f.name: new}))
            )
        )
    for change in [
        {"split": "dev"},
        {"n_per_label": None},
        {"sample_seed": 1},
        {"label_set": "ekman"},
        {"n_boot": 10},
        {"order_seeds": (1,)},
    ]:
        keys.add(cache.config_key(dataclasses.replace(base, **change)))
    assert len(keys) == 1 + len(dataclasses.fields(ClassifierConfig)) + 6


def test_config_key_distinguishes_types_json_would_merge():
    assert cache.config_key(1) != cache.config_key(1.5)
    assert cache.config_key(True) != cache.config_key(1)
    assert cache.config_key(None) != cache.config_key("None")
    assert cache.config_key("a", "b") != cache.config_key("ab")


# ----------------------------------------------------------------------------------------------- atomic_file


def test_atomic_file_replaces_target_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with cache.atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    assert leftovers(target.parent) == []


def test_atomic_file_leaves_target_untouched_when_the_block_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), cache.atomic_file(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_write_json_round_trip(tmp_path):
    target = tmp_path / "a.json"
    cache.write_json(target, {"x": [1, 2], "y": None})
    assert json.loads(target.read_text()) == {"x": [1, 2], "y": None}
    assert leftovers(tmp_path) == []


def test_cache_and_build_dirs_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOLIB_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("EMOLIB_BUILD_DIR", str(tmp_path / "b"))
    assert cache.cache_dir("x", "y") == tmp_path / "c" / "x" / "y"
    assert cache.build_dir("z") == tmp_path / "b" / "z"
    assert (tmp_path / "c" / "x" / "y").is_dir() and (tmp_path / "b" / "z").is_dir()
    assert (cache.project_root() / "emolib" / "cache.py").is_file()


# ---------------------------------------------------------------------------------------------- cached_entry


class CountingBuild:
    """A build function that writes two files (one in a sub-folder) and counts its calls."""

    def __init__(self, content: str = "payload") -> None:
        self.calls = 0
        self.content = content

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        (folder / "data.txt").write_text(self.content)
        (folder / "nested").mkdir()
        (folder / "nested" / "more.bin").write_bytes(bytes(range(256)))


def test_cached_entry_builds_once(tmp_path):
    build = CountingBuild()
    folder = tmp_path / "entry"
    assert cache.cached_entry(folder, build, meta={"k": 1}) == folder
    assert cache.cached_entry(folder, build, meta={"k": 1}) == folder
    assert build.calls == 1
    assert cache.verify_entry(folder)
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    seconds = manifest["meta"].pop(cache.BUILD_SECONDS)
    assert manifest["meta"] == {"k": 1}
    assert seconds >= 0 and cache.entry_meta(folder)[cache.BUILD_SECONDS] == seconds
    assert set(manifest["files"]) == {"data.txt", "nested/more.bin"}
    assert manifest["files"]["data.txt"]["size"] == len("payload")
    assert leftovers(tmp_path) == []


def damage_truncate(folder: Path) -> None:
    path = folder / "nested" / "more.bin"
    path.write_bytes(path.read_bytes()[:100])


def damage_edit_same_size(folder: Path) -> None:
    (folder / "data.txt").write_text("PAYLOAD")  # same size: only the checksum can tell


def damage_delete_file(folder: Path) -> None:
    (folder / "data.txt").unlink()


def damage_delete_manifest(folder: Path) -> None:
    (folder / cache.MANIFEST).unlink()


def damage_truncate_manifest(folder: Path) -> None:
    path = folder / cache.MANIFEST
    path.write_text(path.read_text()[:20])


def damage_manifest_wrong_shape(folder: Path) -> None:
    (folder / cache.MANIFEST).write_text(json.dumps({"meta": {}, "files": ["data.txt"]}))


def damage_manifest_not_an_object(folder: Path) -> None:
    (folder / cache.MANIFEST).write_text("[1, 2]")


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncate,
        damage_edit_same_size,
        damage_delete_file,
        damage_delete_manifest,
        damage_truncate_manifest,
        damage_manifest_wrong_shape,
        damage_manifest_not_an_object,
    ],
)
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    build = CountingBuild()
    folder = cache.cached_entry(tmp_path / "entry", build)
    damage(folder)
    assert not cache.verify_entry(folder)
    cache.cached_entry(folder, build)
    assert build.calls == 2
    assert cache.verify_entry(folder)
    assert (folder / "data.txt").read_text() == "payload"
    assert (folder / "nested" / "more.bin").read_bytes() == bytes(range(256))


def test_stale_files_of_a_damaged_entry_do_not_survive_the_rebuild(tmp_path):
    folder = cache.cached_entry(tmp_path / "entry", CountingBuild())
    (folder / "stray.txt").write_text("left by an interrupted writer")
    damage_delete_manifest(folder)
    cache.cached_entry(folder, CountingBuild())
    assert not (folder / "stray.txt").exists()


def test_verify_entry_of_missing_folder_is_false(tmp_path):
    assert not cache.verify_entry(tmp_path / "nothing")


def test_build_that_raises_leaves_nothing_behind(tmp_path):
    def failing(folder: Path) -> None:
        (folder / "partial.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.cached_entry(tmp_path / "entry", failing)
    assert list(tmp_path.iterdir()) == []


def test_build_that_raises_after_corruption_leaves_nothing_behind(tmp_path):
    folder = cache.cached_entry(tmp_path / "entry", CountingBuild())
    damage_truncate(folder)

    def failing(folder: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached_entry(folder, failing)
    assert list(tmp_path.iterdir()) == []  # the corrupt entry is gone and no temporary folder is left


def test_an_entry_built_concurrently_by_another_process_is_kept(tmp_path):
    """Two builders of the same key: the second finds the folder already in place when it renames, and keeps it."""
    folder = tmp_path / "entry"

    def build_while_another_finishes(tmp: Path) -> None:
        CountingBuild("payload")(tmp)
        cache.cached_entry(folder, CountingBuild("payload"))  # the other process wins the race

    assert cache.cached_entry(folder, build_while_another_finishes) == folder
    assert cache.verify_entry(folder)
    assert leftovers(tmp_path) == []


def test_a_killed_builds_folder_is_removed_and_a_running_ones_kept(tmp_path):
    """A build killed by a signal never reaches its clean-up; the next build of the same entry removes what the dead
    process left (an old-style name without a pid too), and leaves a live process's folder and other entries alone."""
    import subprocess
    import sys

    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()  # its pid now names no process (pids are not reused this quickly)
    folder = tmp_path / "entry"
    dead = tmp_path / f".entry.{dead_pid.pid}.abc123.tmp"
    old_style = tmp_path / ".entry.k3j_x9ab.tmp"
    alive = tmp_path / f".entry.{os.getpid()}.def456.tmp"
    other = tmp_path / f".entry2.{dead_pid.pid}.ghi789.tmp"
    for leftover in (dead, old_style, alive, other):
        leftover.mkdir()
        (leftover / "shard.bin").write_bytes(b"x" * 10)
    cache.cached_entry(folder, CountingBuild())
    assert cache.verify_entry(folder)
    assert not dead.exists() and not old_style.exists()
    assert alive.exists() and other.exists()
