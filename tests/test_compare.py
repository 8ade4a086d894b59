"""`emolib compare`: two builds' results, number by number (the check that a refactoring moved no result)."""

from __future__ import annotations

import json

from emolib.pipeline.cli import main
from emolib.pipeline.compare import compare_records, compare_results, leaves, values_equal

OLD = {
    "config": {"n_boot": 200},
    "models": {
        "m": {"per_layer": [{"layer": 0, "probe": 0.25}, {"layer": 1, "probe": 0.5}], "verdict": "holds"}
    },
    "readme_rows": [{"model": "m", "k50": None}],
    "runtime_seconds": 12.0,
    "provenance": {"created_utc": "2026-01-01", "git": {"commit": "abc"}},
}


def test_leaves_flatten_dicts_and_lists():
    assert dict(leaves({"a": [{"b": 1}, 2], "c": None})) == {"a[0].b": 1, "a[1]": 2, "c": None}


def test_values_equal_within_tolerance_and_only_equal_specials():
    assert values_equal(1.0, 1.0 + 1e-9, 1e-6, 0)
    assert not values_equal(1.0, 1.001, 1e-6, 1e-9)
    assert values_equal(float("nan"), float("nan"), 0, 0) and not values_equal(float("nan"), 0.0, 1, 1)
    assert values_equal(float("inf"), float("inf"), 0, 0) and not values_equal(float("inf"), 1e308, 1, 1)
    assert not values_equal(True, 1, 0, 0), "a flag is not a number"
    assert values_equal("holds", "holds", 0, 0) and not values_equal("holds", "partly", 0, 0)


def test_identical_records_and_skipped_run_time_facts():
    new = json.loads(json.dumps(OLD))
    new["runtime_seconds"] = 99.0
    new["provenance"]["git"]["commit"] = "def"
    result = compare_records(OLD, new)
    assert result.same and result.compared == 8 and not result.added


def test_a_change_of_machine_is_noted_not_counted():
    """Builds on two CPUs: the results are compared as always and the report says the machine changed."""
    machine = {"cpu": "Intel Xeon", "amx_bf16": True, "torch_threads": 2}
    old = json.loads(json.dumps(OLD))
    old["provenance"]["machine"] = machine
    new = json.loads(json.dumps(old))
    assert compare_records(old, new).machines == set()
    new["provenance"]["machine"] = {**machine, "cpu": "AMD EPYC", "amx_bf16": False}
    result = compare_records(old, new)
    assert result.same and len(result.machines) == 2
    assert "amx_bf16 True -> False" in result.report() and "cpu 'Intel Xeon' -> 'AMD EPYC'" in result.report()
    unrecorded = compare_records(OLD, new).machines
    assert unrecorded == {"the old results do not record their machine (written before it was recorded)"}


def test_a_changed_number_or_string_is_reported():
    new = json.loads(json.dumps(OLD))
    new["models"]["m"]["per_layer"][1]["probe"] = 0.51
    new["models"]["m"]["verdict"] = "partly"
    result = compare_records(OLD, new)
    assert not result.same
    assert {path for path, _, _ in result.changed} == {"models.m.per_layer[1].probe", "models.m.verdict"}
    assert "RESULTS DIFFER" in result.report()


def test_a_moved_value_is_relocated_and_a_dropped_one_missing():
    moved = {
        "config": {"n_boot": 200},
        "models": {"m": {"layers": {"per_layer": [{"layer": 0, "probe": 0.25}, {"layer": 1, "probe": 0.5}]}}},
        "readme_rows": [{"model": "m", "k50": None}],
        "extra": 3,
    }
    result = compare_records(OLD, moved)
    assert result.relocated == 4  # two layers, two probes
    assert result.missing == [("models.m.verdict", "holds")]
    assert result.added == [("extra", 3)]


def test_a_relocated_value_must_match_its_name_and_value():
    new = {"config": {"n_boot": 200}, "models": {"m": {"rows": [{"layer": 0, "probe": 0.26}]}}}
    result = compare_records(
        {"config": {"n_boot": 200}, "models": {"m": {"x": [{"layer": 0, "probe": 0.25}]}}}, new
    )
    assert ("models.m.x[0].probe", 0.25) in result.missing


def test_folders_and_the_command_line(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "flow.json").write_text(json.dumps(OLD))
    (new / "flow.json").write_text(json.dumps(OLD))
    (old / "features.json").write_text(json.dumps({"models": {"m": {"n": 1}}}))
    result = compare_results(old, new)
    assert result.missing == [("features:models.m.n", 1)], "a chapter missing from the new build is missing"
    assert main(["compare", str(old / "flow.json"), str(new / "flow.json")]) == 0
    assert "the same results" in capsys.readouterr().out
    assert main(["compare", str(old), str(new)]) == 1
    assert "RESULTS DIFFER" in capsys.readouterr().out
    assert main(["compare", str(old / "flow.json"), str(tmp_path / "nowhere.json")]) == 2
    assert "nowhere.json does not exist" in capsys.readouterr().err
