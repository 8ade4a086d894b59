"""Throughput of emolib's classifier against a plain one-prompt-at-a-time transformers forward, in one run.

Both sides see the same model weights and the same prompts. The baseline runs `AutoModelForCausalLM` on each full
prompt (batch of one, logits at every position: what a straightforward script does). emolib runs restricted
scoring (whole label sequences) in batches with the shared prefix computed once. Ablations show where the gain
comes from (no prefix reuse; batch size 1). Goal: emolib at least 3x the baseline's prompts per second.

    python benchmarks/classify_throughput.py [--models smollm2-135m-instruct gemma-3-270m] [--n 64]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch

from emolib import data
from emolib.lm.baselines import BaselineConfig, evaluation_items, make_classifier
from emolib.lm.classify import ClassifierConfig
from emolib.lm.models import load_hf_model, load_model
from emolib.lm.prompts import encode_prefix, encode_suffix

GOAL = 3.0


def prompts_per_second(run: Callable[[], object], n: int, repeats: int) -> float:
    """Best of `repeats` timed runs (after one warm-up run), as prompts per second."""
    run()
    best = min(_timed(run) for _ in range(repeats))
    return n / best


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_model(name: str, dataset: str, n: int, repeats: int) -> dict[str, float]:
    items = evaluation_items(
        dataset, BaselineConfig(n_per_label=max(1, n // len(data.get_spec(dataset).labels)))
    )
    texts = items.texts[:n]
    lm = load_model(name)
    hf_model, tokenizer = load_hf_model(name)

    def emolib_run(**overrides) -> Callable[[], object]:
        config = ClassifierConfig(generate=False, progress=False, **overrides)
        classifier = make_classifier(lm, items.labels, dataset, config)
        return lambda: classifier.predict(texts)

    parts = make_classifier(lm, items.labels, dataset, ClassifierConfig()).parts
    prefix = encode_prefix(tokenizer, parts)
    full_prompts = [torch.tensor([prefix + encode_suffix(tokenizer, parts, t, 256)[0]]) for t in texts]

    @torch.inference_mode()
    def baseline() -> None:
        for ids in full_prompts:
            hf_model(ids).logits[0, -1].argmax()

    rates = {
        "baseline (transformers, one prompt at a time)": prompts_per_second(baseline, len(texts), repeats),
        "emolib (batch 16, prefix reused)": prompts_per_second(emolib_run(), len(texts), repeats),
        "emolib, prefix not reused": prompts_per_second(emolib_run(reuse_prefix=False), len(texts), repeats),
        "emolib, batch 1": prompts_per_second(emolib_run(batch_size=1), len(texts), repeats),
    }
    tokens = sum(ids.shape[1] for ids in full_prompts) / len(full_prompts)
    print(
        f"\n{name} on {len(texts)} {dataset} prompts ({tokens:.0f} tokens each on average, prefix {len(prefix)})"
    )
    base = rates["baseline (transformers, one prompt at a time)"]
    for label, rate in rates.items():
        print(f"  {label:<48} {rate:7.2f} prompts/s   {rate / base:5.2f}x")
    ratio = rates["emolib (batch 16, prefix reused)"] / base
    print(
        f"  ratio emolib / baseline: {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})"
    )
    print(f"  peak resident memory so far: {peak_rss_gib():.2f} GiB")
    return {"ratio": ratio, **rates}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    parser.add_argument("--dataset", default=None, help="default: isear if available, else builtin")
    parser.add_argument("--n", type=int, default=64, help="prompts per run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dataset = args.dataset or ("isear" if "isear" in data.available_datasets() else "builtin")
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    for name in args.models:
        bench_model(name, dataset, args.n, args.repeats)


if __name__ == "__main__":
    main()
