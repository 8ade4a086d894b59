"""Seconds per label permutation of the selectivity null, the way chapter 1 now runs it against the plain way.

Chapter 1 gives every layer enough label permutations for a Holm correction across layers (about 600 for 30
layers, `FlowConfig.shuffles_for`), so one permutation must be cheap. `permuted_selectivities` ranks the codes,
sums their ties and marks active features once (`RankedCodes`: none of it depends on the labels) and runs only the
label-dependent products per permutation; the baseline calls `selectivity` on the permuted labels, which redoes
all of it. Both sides use the same codes, labels and permutations, and must find the same counts (checked).
Goal: the shared-ranking path at least 5x faster than the baseline, in the same run.

    python benchmarks/selectivity_null_speed.py [--items 560] [--features 2304] [--shuffles 50]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from emolib.methods.selectivity import SelectivityConfig, permuted_selectivities, selectivity

GOAL = 5.0
EMOTIONS = ("anger", "disgust", "fear", "guilt", "joy", "sadness", "shame")


def codes_and_labels(items: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sparse non-negative codes (2% of entries active) with ten features planted on joy items."""
    rng = np.random.default_rng(seed)
    codes = (rng.random((items, features)) < 0.02) * rng.exponential(1.0, (items, features))
    labels = np.array(EMOTIONS)[rng.integers(0, len(EMOTIONS), items)]
    codes[labels == "joy", :10] += 2.0
    return codes.astype(np.float32), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=560)
    parser.add_argument("--features", type=int, default=2304)
    parser.add_argument("--shuffles", type=int, default=50)
    args = parser.parse_args()
    codes, labels = codes_and_labels(args.items, args.features)

    began = time.perf_counter()
    rng = np.random.default_rng(0)
    plain = [int(selectivity(codes, rng.permutation(labels), EMOTIONS).selective.any(axis=1).sum())
             for _ in range(args.shuffles)]  # fmt: skip
    plain_s = (time.perf_counter() - began) / args.shuffles

    began = time.perf_counter()
    _, results = permuted_selectivities(codes, labels, EMOTIONS, SelectivityConfig(), args.shuffles, 0)
    shared = [int(r.selective.any(axis=1).sum()) for r in results]
    shared_s = (time.perf_counter() - began) / args.shuffles

    if plain != shared:
        raise SystemExit(f"the two paths disagree: {plain} vs {shared}")
    ratio = plain_s / shared_s
    print(json.dumps({"items": args.items, "features": args.features, "shuffles": args.shuffles,
                      "seconds_per_permutation": {"selectivity": plain_s, "shared ranking": shared_s},
                      "ratio": ratio}, indent=2))  # fmt: skip
    print(f"goal shared ranking >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.1f}x)")


if __name__ == "__main__":
    main()
