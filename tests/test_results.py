"""Results as data: write/read round trip, provenance, and the README table block."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from emolib.pipeline import results as rs
from emolib.pipeline.cli import main

README = f"""# Project

Intro text.

## Results

{rs.START_MARKER}
old content
{rs.END_MARKER}

## Licence

MIT.
"""


def test_round_trip_with_numpy_values_and_provenance(tmp_path):
    payload = {
        "accuracy": np.float32(0.5),
        "counts": np.arange(3),
        "nested": {"ci": (0.25, 0.75)},
        "nan": float("nan"),
    }
    path = rs.write_results("00_setup", payload, preset="quick", results_dir=tmp_path)
    assert path == tmp_path / "00_setup.json"
    record = rs.read_results("00_setup", results_dir=tmp_path)
    assert record["accuracy"] == 0.5 and record["counts"] == [0, 1, 2]
    assert record["nested"] == {"ci": [0.25, 0.75]} and record["nan"] is None
    prov = record["provenance"]
    assert prov["chapter"] == "00_setup" and prov["preset"] == "quick"
    assert set(prov) >= {"git", "emolib_version", "python_version", "torch_version", "machine", "created_utc"}
    assert prov["machine"]["logical_cores"] >= 1 and prov["machine"]["torch_threads"] >= 1
    assert set(prov["git"]) == {"commit", "dirty"}
    assert rs.read_results("00_setup", preset="quick", results_dir=tmp_path) == record
    with pytest.raises(rs.ResultsPresetError, match="preset 'quick', not 'full'"):
        rs.read_results("00_setup", preset="full", results_dir=tmp_path)


def test_write_leaves_no_temporary_files(tmp_path):
    rs.write_results("a", {"x": 1}, preset="full", results_dir=tmp_path)
    rs.write_results("a", {"x": 2}, preset="full", results_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text())["x"] == 2


def test_missing_results_error_names_file_and_chapter(tmp_path):
    with pytest.raises(rs.ResultsMissingError) as info:
        rs.read_results("07_steering", results_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "07_steering.json") in message
    assert "07_steering" in message and "emolib book --chapters 07_steering" in message
    assert isinstance(info.value, FileNotFoundError)


def test_bad_payloads_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        rs.write_results("a", {"provenance": 1}, preset="full", results_dir=tmp_path)
    with pytest.raises(TypeError, match="JSON data"):
        rs.write_results("a", {"x": object()}, preset="full", results_dir=tmp_path)
    with pytest.raises(TypeError, match="readme_rows"):
        rs.write_results("a", {"readme_rows": {"claim": 1}}, preset="full", results_dir=tmp_path)
    with pytest.raises(ValueError, match="file stem"):
        rs.write_results("../a", {}, preset="full", results_dir=tmp_path)


def test_table_columns_are_the_union_of_keys():
    table = rs.render_table([{"claim": "1", "acc": 0.51234}, {"claim": "2", "verdict": "a|b"}])
    lines = table.splitlines()
    assert lines[0] == "| claim | acc | verdict |"
    assert lines[2] == "| 1 | 0.512 |  |"
    assert lines[3] == "| 2 |  | a\\|b |"


def test_readme_block_rewrite_keeps_markers_and_is_idempotent(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = tmp_path / "results"
    rows = [
        {"claim": "baseline", "model": "smollm2", "accuracy": 0.4},
        {"claim": "baseline", "model": "gemma3"},
    ]
    rs.write_results("00_setup", {"readme_rows": rows, "other": 1}, preset="full", results_dir=results)
    rs.write_results("01_other", {"no_rows": True}, preset="full", results_dir=results)
    sae_rows = [{"model": "smollm2", "layers meeting every goal": "3 of 30"}]
    rs.write_results("saes", {"readme_rows": sae_rows}, preset="full", results_dir=results)

    assert rs.update_readme(readme, results) is True
    text = readme.read_text()
    assert text.count(rs.START_MARKER) == 1 and text.count(rs.END_MARKER) == 1
    assert "old content" not in text
    assert "| claim | model | accuracy |" in text and "| baseline | gemma3 |  |" in text
    # one table per chapter, in reading order, each with its own columns
    assert "| model | layers meeting every goal |" in text and "| smollm2 | 3 of 30 |" in text
    assert text.index("| claim |") < text.index("| model | layers")
    assert "preset `full`" in text
    before, after = README.split(rs.START_MARKER)[0], README.split(rs.END_MARKER)[1]
    assert text.startswith(before) and text.endswith(after)

    assert rs.update_readme(readme, results) is False
    assert readme.read_text() == text


def test_records_follow_the_reading_order():
    records = {
        name: {"readme_rows": [{"x": name}]} for name in ("00_setup", "features", "flow", "saes", "zz")
    }
    docnames = ["book/intro", "book/00_setup", "book/01_flow", "book/02_features", "book/appendix_saes"]
    assert list(rs.in_reading_order(records, docnames)) == ["00_setup", "flow", "features", "saes", "zz"]


def test_readme_without_results_says_so(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert main(["readme", "--readme", str(readme), "--results-dir", str(tmp_path / "none")]) == 0
    assert "No results yet" in readme.read_text()


def test_readme_without_markers_is_an_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="results:start"):
        rs.update_readme(readme, tmp_path)


def test_readme_models_block_lists_every_registered_model(tmp_path):
    from emolib.lm.models import MODELS

    readme = tmp_path / "README.md"
    readme.write_text(README + f"\n## Models\n\n{rs.MODELS_START}\nold models\n{rs.MODELS_END}\n")
    assert rs.update_readme(readme, tmp_path / "none") is True
    text = readme.read_text()
    assert "old models" not in text and text.count(rs.MODELS_START) == 1
    for spec in MODELS.values():
        assert f"`{spec.name}`" in text and spec.gguf_sha256 in text and spec.licence in text
    assert rs.update_readme(readme, tmp_path / "none") is False


def test_machine_reads_the_cpu_model_and_amx(tmp_path):
    from emolib.pipeline.provenance import machine

    cpuinfo = tmp_path / "cpuinfo"
    first = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n"
    )
    second = "processor\t: 1\nmodel name\t: another\nflags\t\t: fpu\n"
    cpuinfo.write_text(first + "\n" + second)
    intel = machine(cpuinfo)
    assert intel["cpu"] == "Intel(R) Xeon(R) Platinum" and intel["amx_bf16"] is True
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512_bf16\n")
    assert machine(cpuinfo)["amx_bf16"] is False
    unknown = machine(tmp_path / "missing")
    assert unknown["amx_bf16"] is None and unknown["cpu"]


def _kernel_in_a_fresh_process(**env: str) -> str:
    code = "from emolib.pipeline.provenance import bf16_matmul_kernel as k; print('KERNEL=' + k())"
    run = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("KERNEL=")]
    assert len(lines) == 1, run.stdout  # oneDNN's own verbose lines must not leak to standard output
    return lines[0].removeprefix("KERNEL=")


def test_the_bf16_kernel_is_read_from_onednn_and_changes_with_its_isa():
    """bfloat16 numbers depend on the oneDNN kernel (README, Reproducibility): provenance names it, and a run whose
    oneDNN is held to AVX2 (no bf16 units) records that no oneDNN kernel took the product."""
    from emolib.lm.precision import bf16_is_fast
    from emolib.pipeline.provenance import NOT_ONEDNN, machine

    if not bf16_is_fast("cpu"):
        pytest.skip("this CPU has no bfloat16 units: oneDNN takes no bf16 product")
    here = _kernel_in_a_fresh_process()
    assert here != NOT_ONEDNN and ":" in here  # e.g. brg_matmul:avx10_1_512_amx
    assert _kernel_in_a_fresh_process(ONEDNN_MAX_CPU_ISA="AVX2") == NOT_ONEDNN
    assert machine()["bf16_matmul_kernel"] == here


def test_the_bf16_kernel_is_unknown_not_an_error_where_onednn_cannot_be_read(monkeypatch):
    """A torch built without oneDNN raises from its verbose switch: the results file says so, the chapter runs on."""
    import torch

    from emolib.pipeline import provenance

    def no_onednn(level):
        raise RuntimeError("MKLDNN verbose only works when torch is built with MKLDNN")

    monkeypatch.setattr(torch.backends.mkldnn, "verbose", no_onednn)
    provenance.bf16_matmul_kernel.cache_clear()
    try:
        assert provenance.bf16_matmul_kernel() == (
            "unknown (RuntimeError: MKLDNN verbose only works when torch is built with MKLDNN)"
        )
    finally:
        provenance.bf16_matmul_kernel.cache_clear()


def test_the_implementation_is_read_from_exec_lines_only():
    from emolib.pipeline.provenance import _implementation

    lines = {
        "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16,,32x32:32x32,0.1": (
            "brg_matmul:avx10_1_512_amx"
        ),
        "onednn_verbose,v1,info,cpu,isa:Intel AVX10.1": None,
        "onednn_verbose,v1,primitive,exec,gpu,matmul,jit:gemm": None,
    }
    for line, implementation in lines.items():
        assert _implementation(line.split(",")) == implementation, line
