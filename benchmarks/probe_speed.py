"""Seconds per cross-validated probe with the BLAS threads as they come against one BLAS thread (`one_blas_thread`).

Chapter 1 fits five-fold probes at every layer (residual, SAE codes, reconstruction, error, shuffled-label
controls); on the 2-core machine a profile of one SmolLM2 layer spent 97% of its 23 s in scikit-learn's L-BFGS,
whose small products OpenBLAS splits across threads at a loss. Both sides fit the same pipeline on the same data;
their out-of-fold predictions must agree (checked). Goal: one thread at least 2x faster, in the same run.

    python benchmarks/probe_speed.py [--items 560] [--features 576] [--labels 7] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np
from threadpoolctl import threadpool_info

from emolib.methods.probes import ProbeConfig, probe_accuracy

GOAL = 2.0


def residual_like(items: int, features: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian rows with a weak class signal in a few directions (a probe that converges in ~100 iterations)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, labels, items)
    X = rng.normal(size=(items, features)) + 0.3 * rng.normal(size=(labels, features))[y]
    return X.astype(np.float32), np.array([f"label{i}" for i in y])


def seconds(X: np.ndarray, y: np.ndarray, repeats: int, limited: bool) -> tuple[float, np.ndarray]:
    config = ProbeConfig(C=0.1, max_iter=3000, control=False, n_boot=10)
    context = contextlib.nullcontext() if limited else _all_threads()
    with context:
        began = time.perf_counter()
        for _ in range(repeats):
            result = probe_accuracy(X, y, config)
    return (time.perf_counter() - began) / repeats, result.predicted


@contextlib.contextmanager
def _all_threads():
    """The probe without its one-thread limit: `probe_accuracy`'s limit replaced by a no-op for the block."""
    import emolib.methods.probes as probes

    original = probes.one_blas_thread
    probes.one_blas_thread = contextlib.nullcontext
    try:
        yield
    finally:
        probes.one_blas_thread = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=560)
    parser.add_argument("--features", type=int, default=576, help="576: SmolLM2's residual stream")
    parser.add_argument("--labels", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    X, y = residual_like(args.items, args.features, args.labels)
    threads = {info["internal_api"]: info["num_threads"] for info in threadpool_info()}
    default_s, default_pred = seconds(X, y, args.repeats, limited=False)
    one_s, one_pred = seconds(X, y, args.repeats, limited=True)
    agree = float((default_pred == one_pred).mean())
    if agree < 1.0:
        raise SystemExit(f"the two thread settings predict differently on {1 - agree:.1%} of the items")
    ratio = default_s / one_s
    print(json.dumps({**vars(args), "threads": threads,
                      "seconds_per_probe": {"default threads": default_s, "one BLAS thread": one_s},
                      "ratio": ratio}, indent=2))  # fmt: skip
    print(f"goal one BLAS thread >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.1f}x)")


if __name__ == "__main__":
    main()
