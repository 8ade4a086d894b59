"""bfloat16 autocast against float32, in one run, on the three steps that dominate the build: a model forward (the
classifier's batched prompts), all-layer activation extraction, and SAE training.

Both sides use the same weights, tokens and SAE config; only the compute dtype differs (`emolib.lm.precision`).
A raw matrix product (the shape of a 1.5B model's MLP) shows what the hardware gives before any framework cost.
The run also says what "auto" picks on this machine: bfloat16 only where the CPU has AMX or AVX-512 bf16 units.
Goal (on such CPUs): bfloat16 >= 2x float32 for the forward and extraction, with the quality checks of
`tests/test_precision.py` holding. On AVX2-only CPUs bfloat16 is emulated and far slower; "auto" must then pick
float32, and the benchmark reports the ratio so that the fallback is seen to be needed.

    python benchmarks/precision_speed.py [--model smollm2-135m-instruct] [--batch 8] [--length 64]
        [--sae-steps 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import time
import uuid
from collections.abc import Callable

import torch

GOAL = 2.0


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The best of `repeats` timed runs after one warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(dtype: torch.dtype, repeats: int, rows: int) -> float:
    a, b = torch.randn(rows, 1536, dtype=dtype), torch.randn(1536, 6144, dtype=dtype)
    seconds = best_seconds(lambda: a @ b, repeats)
    return 2 * rows * 1536 * 6144 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--sae-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--skip-bf16-if-slow", action="store_true", help="time only the matmul when auto is fp32"
    )
    args = parser.parse_args()

    from emolib.lm.models import load_model
    from emolib.lm.precision import bf16_is_fast, resolve_precision, set_compute_dtype
    from emolib.sae.activations import ExtractionConfig, extract_activations, resid_hooks
    from emolib.sae.training import SAETrainingConfig, train_saes

    report: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_is_fast": bf16_is_fast(),
        "auto_picks": str(resolve_precision("auto")).removeprefix("torch."),
        # emulated bfloat16 runs at well under 1 GFLOP/s: a few rows are enough to measure it
        "matmul_gflops": {
            "float32": matmul_gflops(torch.float32, args.repeats, 2048),
            "bfloat16": matmul_gflops(torch.bfloat16, 1, 2048 if bf16_is_fast() else 64),
        },
    }
    report["matmul_ratio"] = report["matmul_gflops"]["bfloat16"] / report["matmul_gflops"]["float32"]
    if args.skip_bf16_if_slow and not report["bf16_is_fast"]:
        print(json.dumps(report, indent=2))
        return

    lm = load_model(args.model, precision="float32")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, lm.info.d_vocab - 100, (args.batch, args.length), generator=generator)
    hooks = list(resid_hooks(lm.info.n_layers))
    sequences = tokens.tolist()
    config = SAETrainingConfig(
        train_batch_size=256, total_training_samples=256 * args.sae_steps, n_batches_for_norm_estimate=2,
        dead_feature_window=5, feature_sampling_window=10,
    )  # fmt: skip
    rows = {h: torch.randn(4096, lm.info.d_model, generator=generator) for h in hooks[-2:]}

    def sae_stream(batch_size: int, *, seed: int):
        rng = torch.Generator().manual_seed(seed)
        while True:
            index = torch.randint(0, 4096, (batch_size,), generator=rng)
            yield {h: r[index] for h, r in rows.items()}

    extraction = ExtractionConfig(hooks=tuple(hooks), batch_size=args.batch, progress=False)
    timings: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        set_compute_dtype(lm.model, dtype)
        name = str(dtype).removeprefix("torch.")
        with torch.inference_mode():
            forward = best_seconds(lambda: lm.model(tokens), args.repeats)

        def extract_once() -> None:
            store = extract_activations(
                lm,
                None,
                sequences,
                extraction,
                description=f"precision benchmark {uuid.uuid4()}",
                preset="bench",
            )
            shutil.rmtree(store.folder)  # a fresh key each time: nothing is read back from the cache

        extract = best_seconds(extract_once, 1)
        train = best_seconds(
            functools.partial(
                train_saes, sae_stream, config, hooks=hooks[-2:], d_in=lm.info.d_model, precision=dtype
            ),
            1,
        )
        timings[name] = {"forward_s": forward, "extract_all_layers_s": extract, "sae_training_s": train}
    report["model"] = args.model
    report["timings"] = timings
    report["ratio (float32 time / bfloat16 time)"] = {
        step: timings["float32"][step] / timings["bfloat16"][step] for step in timings["float32"]
    }
    print(json.dumps(report, indent=2))
    if report["bf16_is_fast"]:
        worst = min(
            report["ratio (float32 time / bfloat16 time)"][s] for s in ("forward_s", "extract_all_layers_s")
        )
        print(f"goal bfloat16 >= {GOAL}x: {'met' if worst >= GOAL else 'NOT met'} (worst {worst:.2f}x)")
    else:
        print("this CPU has no bf16 units: auto runs float32 (the ratio above shows why)")


if __name__ == "__main__":
    main()
