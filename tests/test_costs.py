"""`emolib costs`: a build's chapter times and per-model cache build times, read back from stamps and manifests."""

from __future__ import annotations

import math
import os

import nbformat
import pytest

from emolib.cache import MANIFEST, cached_entry, entry_meta
from emolib.pipeline.book import METADATA_KEY
from emolib.pipeline.cli import main
from emolib.pipeline.costs import chapter_seconds, cost_table, entry_costs, entry_model

MODELS = ["m", "m-large", "other"]


def _entry(root, kind, name):
    folder = cached_entry(root / kind / name, lambda tmp: (tmp / "x.txt").write_text(name))
    return entry_meta(folder)["build_seconds"]


def test_entry_model_takes_the_longest_registered_prefix():
    assert entry_model("m-large-0123456789abcdef", MODELS) == "m-large"
    assert entry_model("m-all-0123456789abcdef", MODELS) == "m"
    assert entry_model("m@bfloat16-0123456789abcdef", MODELS) == "m"
    assert entry_model("tiny-all-0123456789abcdef", MODELS) == "tiny-all", "unknown: the name without its key"
    assert entry_model("mx-0123456789abcdef", MODELS) == "mx", "a prefix must end at a separator"


def test_table_sums_build_times_per_kind_and_model(tmp_path):
    times = {
        ("predictions", "m-0000000000000001"): _entry(tmp_path, "predictions", "m-0000000000000001"),
        ("predictions", "m-0000000000000002"): _entry(tmp_path, "predictions", "m-0000000000000002"),
        ("predictions", "m-large-0000000000000003"): _entry(
            tmp_path, "predictions", "m-large-0000000000000003"
        ),
        ("studies/setup", "other-0000000000000004"): _entry(
            tmp_path, "studies/setup", "other-0000000000000004"
        ),
    }
    costs = entry_costs(tmp_path, MODELS)
    assert len(costs) == 4 and set(costs["kind"]) == {"predictions", "studies/setup"}
    table = cost_table(costs)
    expected = (
        times[("predictions", "m-0000000000000001")] + times[("predictions", "m-0000000000000002")]
    ) / 60
    assert table.loc["predictions", "m"] == pytest.approx(expected, abs=0.05)
    assert math.isnan(table.loc["studies/setup", "m"]), "no entry is not a zero-cost entry"
    assert table.loc["predictions", "entries"] == 3 and table.loc["studies/setup", "entries"] == 1


def test_unreadable_manifest_is_listed_not_dropped(tmp_path, capsys):
    _entry(tmp_path, "saes", "m-0000000000000001")
    broken = tmp_path / "saes" / "m-0000000000000002"
    broken.mkdir()
    (broken / MANIFEST).write_text("{not json")
    costs = entry_costs(tmp_path, MODELS)
    assert len(costs) == 2 and costs["seconds"].isna().sum() == 1
    assert main(["costs", "--cache-dir", str(tmp_path), "--build-dir", str(tmp_path / "no-build")]) == 0
    out = capsys.readouterr().out
    assert "1 entries have no readable build time: m-0000000000000002" in out and "(none executed)" in out


def test_since_keeps_one_builds_entries(tmp_path):
    _entry(tmp_path, "predictions", "m-0000000000000001")
    old = tmp_path / "predictions" / "m-0000000000000001" / MANIFEST
    os.utime(old, (1_000, 1_000))
    _entry(tmp_path, "predictions", "m-0000000000000002")
    assert list(entry_costs(tmp_path, MODELS, since=2_000)["entry"]) == ["m-0000000000000002"]


def test_chapter_seconds_read_the_book_stamps(tmp_path):
    executed = tmp_path / "executed"
    executed.mkdir()
    for name, seconds in {"00_setup": 61.5, "01_flow": 120.0}.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata[METADATA_KEY] = {"run_seconds": seconds}
        nbformat.write(nb, executed / f"{name}.ipynb")
    assert chapter_seconds(tmp_path) == {"00_setup": 61.5, "01_flow": 120.0}
