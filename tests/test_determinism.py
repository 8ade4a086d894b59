"""Same config, same numbers: an SAE suite built again in a fresh process (another hash seed, another cache) is
bitwise the same: stored activations, SAE weights and quality numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_sae_suite import TINY_SUITE, builtin_only, tiny_lm  # noqa: F401 (fixtures)

from emolib.cache import entry_digest
from emolib.sae.suite import sae_suite

SCRIPT = Path(__file__).with_name("fixtures") / "suite_digest.py"


def test_sae_suite_is_bitwise_reproducible_in_a_fresh_process(tiny_lm, tmp_cache, builtin_only, tmp_path):  # noqa: F811
    here = sae_suite(tiny_lm, "test", TINY_SUITE).digests()
    assert set(here) == {"extract", "train", "evaluate"}
    env = {**os.environ, "EMOLIB_CACHE_DIR": str(tmp_path / "other-cache"), "PYTHONHASHSEED": "12345"}
    env.pop("EMOLIB_DATA_DIR", None)
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == here


def test_entry_digest_sees_a_changed_byte(tmp_path):
    from emolib.cache import cached_entry

    one = cached_entry(tmp_path / "a", lambda tmp: (tmp / "w.bin").write_bytes(b"\x00\x01"))
    two = cached_entry(tmp_path / "b", lambda tmp: (tmp / "w.bin").write_bytes(b"\x00\x01"))
    three = cached_entry(tmp_path / "c", lambda tmp: (tmp / "w.bin").write_bytes(b"\x00\x02"))
    assert entry_digest(one) == entry_digest(two) != entry_digest(three)
