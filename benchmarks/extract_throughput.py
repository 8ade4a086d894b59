"""Throughput of extracting every layer's residual stream to the on-disk cache, against a bare transformers forward.

Both sides see the same weights and the same tokens: full-length chunks of WikiText articles (`$EMOLIB_DATA_DIR`),
in batches of the same size. The baseline is `AutoModelForCausalLM(input_ids)` batch by batch (logits at every
position: what a plain script runs). emolib extracts `blocks.{l}.hook_resid_post` of every layer in all-token mode
into a temporary EMOLIB_CACHE_DIR, end to end: forward passes with hooks, shards written, checksummed manifest.
Further rows explain the difference: transformers without its LM head, TransformerLens' forward alone (no hooks,
stopped after the last block), and bfloat16 storage. Goal: extraction at >= 0.9x the baseline's tokens per second.

Memory is the peak resident set during each measurement (Linux `VmHWM`, reset before each one), shown as the
increase over the resident set before it (the loaded models), and the process' `ru_maxrss` at the end.

    EMOLIB_DATA_DIR=/work/shared/data python benchmarks/extract_throughput.py [--models ...] [--tokens 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from emolib import data
from emolib.lm.models import load_hf_model, load_model
from emolib.sae.activations import ExtractionConfig, extract_activations, resid_hooks, token_chunks

GOAL = 0.9
GIB = 2**30
_LIBC = ctypes.CDLL("libc.so.6")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(run: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak extra resident memory in GiB) of one call; the peak is reset before the call.

    Freed heap is handed back to the system first (`malloc_trim`), so that memory an earlier measurement freed but
    the allocator kept does not hide this one's allocations.
    """
    gc.collect()
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return seconds, (_status_kib("VmHWM") - before) * 1024 / GIB


@contextlib.contextmanager
def temporary_cache() -> Iterator[Path]:
    """A fresh EMOLIB_CACHE_DIR for the extraction only (the converted models stay in the real cache)."""
    previous = os.environ.get("EMOLIB_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="emolib-bench-") as folder:
        os.environ["EMOLIB_CACHE_DIR"] = folder
        try:
            yield Path(folder)
        finally:
            if previous is None:
                os.environ.pop("EMOLIB_CACHE_DIR", None)
            else:
                os.environ["EMOLIB_CACHE_DIR"] = previous


def corpus(tokenizer, n_tokens: int, length: int) -> list[list[int]]:
    """Full-length chunks of WikiText train articles, in file order, until `n_tokens` tokens."""
    chunks = [c for c in token_chunks(tokenizer, data.wikitext_articles("train"), length) if len(c) == length]
    needed = -(-n_tokens // length)
    if len(chunks) < needed:
        raise SystemExit(f"WikiText gives only {len(chunks)} chunks of {length} tokens; {needed} needed")
    return chunks[:needed]


def bench_model(name: str, n_tokens: int, length: int, batch_size: int, repeats: int) -> dict[str, float]:
    lm = load_model(name)
    hf_model, tokenizer = load_hf_model(name)
    chunks = corpus(tokenizer, n_tokens, length)
    batches = [torch.tensor(chunks[i : i + batch_size]) for i in range(0, len(chunks), batch_size)]
    total = sum(len(c) for c in chunks)
    n_layers = lm.model.cfg.n_layers
    disk: dict[str, float] = {}

    @torch.inference_mode()
    def hf_logits() -> None:
        for ids in batches:
            hf_model(input_ids=ids).logits  # noqa: B018 (the forward is the point)

    @torch.inference_mode()
    def hf_body() -> None:
        for ids in batches:
            hf_model.model(input_ids=ids).last_hidden_state  # noqa: B018

    @torch.inference_mode()
    def tl_forward() -> None:
        for ids in batches:
            lm.model(ids, stop_at_layer=n_layers, padding_side="right")

    def extract(storage_dtype: str) -> Callable[[], None]:
        config = ExtractionConfig(
            hooks=resid_hooks(n_layers),
            mode="all",
            batch_size=batch_size,
            storage_dtype=storage_dtype,
            progress=False,
        )

        def run() -> None:
            with temporary_cache():
                store = extract_activations(
                    lm,
                    name,
                    chunks,
                    config,
                    description="benchmark: WikiText-2 train chunks",
                    preset="benchmark",
                )
                size = sum(p.stat().st_size for p in store.folder.iterdir())
                disk[storage_dtype] = size / store.n_rows * 1000  # bytes per 1k stored tokens
                del store

        return run

    runs: dict[str, Callable[[], object]] = {
        "transformers forward (logits): baseline": hf_logits,
        "transformers body (no LM head)": hf_body,
        "TransformerLens forward (no hooks, no unembed)": tl_forward,
        "emolib extract, float32, to disk": extract("float32"),
        "emolib extract, bfloat16, to disk": extract("bfloat16"),
    }
    with torch.inference_mode():  # warm-up: one batch each
        hf_model(input_ids=batches[0])
        lm.model(batches[0], stop_at_layer=n_layers, padding_side="right")
    best: dict[str, float] = {}
    peak: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, so that drifting machine load hits every row alike
        for label, run in runs.items():
            seconds, extra = measure(run)
            best[label] = min(best.get(label, float("inf")), seconds)
            peak[label] = max(peak.get(label, 0.0), extra)
    rates = {label: total / seconds for label, seconds in best.items()}
    base = rates["transformers forward (logits): baseline"]
    print(
        f"\n{name}: {len(chunks)} WikiText chunks x {length} tokens = {total} tokens, batch {batch_size}, "
        f"{n_layers} hooks (blocks.*.hook_resid_post), best of {repeats}, torch threads {torch.get_num_threads()}"
    )
    print(f"  {'':<48} {'tokens/s':>9} {'vs base':>8} {'peak extra RSS':>15}")
    for label, rate in rates.items():
        print(f"  {label:<48} {rate:9.0f} {rate / base:7.2f}x {peak[label]:12.2f} GiB")
    ratio = rates["emolib extract, float32, to disk"] / base
    print(
        f"  ratio extract / baseline: {ratio:.2f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})"
    )
    print(
        f"  disk per 1k stored tokens: float32 {disk['float32'] / 2**20:.1f} MiB, "
        f"bfloat16 {disk['bfloat16'] / 2**20:.1f} MiB"
    )
    print(
        f"  process peak resident memory so far (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )
    return {"ratio": ratio, **rates}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    parser.add_argument(
        "--tokens", type=int, default=20_000, help="tokens per model (rounded up to whole chunks)"
    )
    parser.add_argument("--length", type=int, default=256, help="tokens per chunk")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if data.data_dir() is None:
        raise SystemExit("set EMOLIB_DATA_DIR to the shared datasets (WikiText-2 is read from there)")
    torch.manual_seed(0)
    for name in args.models:
        bench_model(name, args.tokens, args.length, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
