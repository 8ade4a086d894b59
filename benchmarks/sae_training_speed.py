"""Training every layer's SAE from cached activations against sae-lens' own runner, which re-runs the model per layer.

Both sides see SmolLM2-135M-Instruct, the same WikiText-2 token sequences (chunks of `--context` tokens; position 0,
the attention sink, is excluded from training), the same SAE (the full preset's width 4 x d_model, k 32, lr schedule,
windows, normalisation; TopK unless `--architecture batchtopk`) and the same number of training tokens (`--tokens` x
`--epochs`).

- emolib: one forward pass per batch writes every layer's residual to the activation cache (`emolib.sae.activations`),
  then sae-lens' `MultiSAETrainer` trains all layers' SAEs in lockstep from one `{hook: batch}` stream
  (`emolib.sae.training.train_saes`). Timed: extraction + training.
- sae-lens: `LanguageModelSAETrainingRunner` for one layer at a time. Its `ActivationsStore` runs the model (up to
  the SAE's layer) for every batch of every epoch. It is run on `--runner-layers` and extrapolated to all layers
  with a least-squares fit time(layer) = a + b (layer + 1), since each forward stops at the SAE's layer.
- optionally (`--multi-runner`) sae-lens' `MultiSAETrainingRunner`: all layers from one forward per batch, but the
  model re-runs for every epoch.

Each side runs in its own subprocess, so its peak resident memory is its own; model loading is not timed. The
trained SAEs of the runner layers are then measured on held-out WikiText (`emolib.sae.training.evaluate_saes`), so the
speed-up is not bought with quality. Goal: emolib >= 5x faster than the runner over all layers.

    EMOLIB_DATA_DIR=/work/shared/data python benchmarks/sae_training_speed.py [--tokens 110000] [--epochs 3]
        [--runner-layers 5 15 27] [--multi-runner] [--eval-sequences 32]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

MODEL = "smollm2-135m-instruct"
GOAL = 5.0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sequences(tokenizer, split: str, n_tokens: int, context: int) -> list[list[int]]:
    """Full-length WikiText chunks of `context` tokens, enough for `n_tokens` training rows (position 0 dropped)."""
    from emolib.data import wikitext_articles
    from emolib.sae.activations import token_chunks

    chunks = [c for c in token_chunks(tokenizer, wikitext_articles(split), context) if len(c) == context]
    n = -(-n_tokens // (context - 1))
    if len(chunks) < n:
        raise SystemExit(f"WikiText {split} has only {len(chunks)} chunks of {context} tokens; {n} needed")
    return chunks[:n]


def sae_config(args, n_rows: int):
    """The full preset's SAE, with `--architecture` (TopK by default: BatchTopK's inference threshold is a moving
    average that a run of a few dozen steps leaves far from converged, so its L0 would not be comparable)."""

    from emolib.sae.training import SAETrainingConfig

    return SAETrainingConfig(architecture=args.architecture).for_rows(n_rows, args.epochs)


# --------------------------------------------------------------------------------------------------- sides


def side_emolib(args, out: Path) -> dict:
    from emolib.lm.models import load_model
    from emolib.sae.activations import ExtractionConfig, extract_activations, resid_hooks
    from emolib.sae.loading import save_saes
    from emolib.sae.training import train_saes

    lm = load_model(MODEL)
    seqs = sequences(lm.tokenizer, "train", args.tokens, args.context)
    hooks = list(resid_hooks(lm.info.n_layers))
    extraction = ExtractionConfig(
        hooks=tuple(hooks), storage_dtype=args.storage, batch_size=8, progress=False
    )
    start = time.perf_counter()
    store = extract_activations(
        lm, None, seqs, extraction, description=f"sae benchmark {uuid.uuid4()}", preset="benchmark"
    )
    t_extract = time.perf_counter() - start
    config = sae_config(args, store.n_rows)
    start = time.perf_counter()
    saes = train_saes(
        functools.partial(store.endless_batches, hooks=hooks),
        config,
        hooks=hooks,
        d_in=store.d_model,
        metadata={"model_name": MODEL},
    )
    t_train = time.perf_counter() - start
    disk = sum(p.stat().st_size for p in store.folder.rglob("*") if p.is_file())
    shutil.rmtree(store.folder)
    save_saes(
        {f"blocks.{i}.hook_resid_post": saes[f"blocks.{i}.hook_resid_post"] for i in args.runner_layers}, out
    )
    return {
        "rows": store.n_rows,
        "training_samples": config.total_training_samples,
        "layers": len(hooks),
        "extract_s": t_extract,
        "train_s": t_train,
        "total_s": t_extract + t_train,
        "cache_gib": disk / 2**30,
        "peak_rss_gib": peak_rss_gib(),
    }


def _sae_config(config, d_in: int):
    """The sae-lens training config of one SAE, as `emolib.sae.training.make_training_sae` builds it."""
    from emolib.sae.training import ARCHITECTURES

    return ARCHITECTURES[config.architecture](
        d_in=d_in,
        d_sae=config.width(d_in),
        k=config.k,
        aux_loss_coefficient=config.aux_loss_coefficient,
        normalize_activations=config.normalize_activations,
    )


def _runner_kwargs(config, context: int) -> dict:
    """The training settings of `config` in sae-lens' runner-config fields (shared by both runners)."""
    from sae_lens import LoggingConfig

    return dict(
        model_name=MODEL,
        streaming=False,
        context_size=context,
        seqpos_slice=(1, None),  # position 0 excluded, as on the emolib side
        training_tokens=config.total_training_samples,
        train_batch_size_tokens=config.train_batch_size,
        store_batch_size_prompts=8,
        lr=config.lr,
        lr_end=config.lr_end if config.lr_end is not None else config.lr / 10,
        lr_scheduler_name=config.lr_scheduler_name,
        lr_warm_up_steps=config.lr_warm_up_steps,
        lr_decay_steps=config.lr_decay_steps,
        dead_feature_window=config.dead_feature_window,
        feature_sampling_window=config.feature_sampling_window,
        n_batches_for_norm_estimate=config.n_batches_for_norm_estimate,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        device="cpu",
        seed=config.seed,
    )


def side_runner(args, out: Path) -> dict:
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

    from emolib.lm.models import load_model
    from emolib.sae.loading import save_saes

    lm = load_model(MODEL)
    seqs = sequences(lm.tokenizer, "train", args.tokens, args.context)
    dataset = Dataset.from_dict({"tokens": seqs})
    config = sae_config(args, len(seqs) * (args.context - 1))
    times, trained = {}, {}
    for layer in args.runner_layers:
        hook = f"blocks.{layer}.hook_resid_post"
        cfg = LanguageModelSAERunnerConfig(
            sae=_sae_config(config, lm.info.d_model),
            hook_name=hook,
            is_dataset_tokenized=True,
            verbose=False,
            **_runner_kwargs(config, args.context),
        )
        start = time.perf_counter()
        trained[hook] = LanguageModelSAETrainingRunner(
            cfg, override_dataset=dataset, override_model=lm.model
        ).run()
        times[layer] = time.perf_counter() - start
    save_saes(trained, out)
    layers = np.array(list(times), dtype=float)
    seconds = np.array(list(times.values()))
    slope, intercept = np.polyfit(layers + 1, seconds, 1) if len(layers) > 1 else (0.0, float(seconds[0]))
    all_layers = np.arange(lm.info.n_layers) + 1
    projected = float(np.sum(intercept + slope * all_layers))
    return {
        "training_samples": config.total_training_samples,
        "seconds_by_layer": {str(k): v for k, v in times.items()},
        "fit_intercept_s": float(intercept),
        "fit_per_layer_depth_s": float(slope),
        "projected_all_layers_s": projected,
        "peak_rss_gib": peak_rss_gib(),
    }


def side_multi_runner(args, out: Path) -> dict:
    from datasets import Dataset
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    from emolib.lm.models import load_model
    from emolib.sae.activations import resid_hooks

    lm = load_model(MODEL)
    seqs = sequences(lm.tokenizer, "train", args.tokens, args.context)
    config = sae_config(args, len(seqs) * (args.context - 1))
    hooks = list(resid_hooks(lm.info.n_layers))
    cfg = MultiSAETrainingRunnerConfig(
        saes={hook: _sae_config(config, lm.info.d_model) for hook in hooks},
        hook_names={hook: hook for hook in hooks},
        **_runner_kwargs(config, args.context),
    )
    start = time.perf_counter()
    MultiSAETrainingRunner(
        cfg, override_dataset=Dataset.from_dict({"tokens": seqs}), override_model=lm.model
    ).run()
    return {"total_s": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}


SIDES = {"emolib": side_emolib, "runner": side_runner, "multi-runner": side_multi_runner}


# ---------------------------------------------------------------------------------------------- orchestration


def run_side(name: str, args, out: Path) -> dict:
    """One side in a fresh interpreter (its own peak memory); returns the JSON it prints last."""
    command = [sys.executable, __file__, "--side", name, "--out", str(out), *args.passthrough]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def quality(args, folders: dict[str, Path]) -> None:
    """FVE, L0, dead fraction and loss recovered of both sides' SAEs at the runner layers, on held-out WikiText."""
    from emolib.lm.models import load_model
    from emolib.sae.loading import load_saes
    from emolib.sae.quality import evaluate_saes

    lm = load_model(MODEL)
    seqs = sequences(lm.tokenizer, "dev", args.eval_sequences * (args.context - 1), args.context)
    tokens = torch.tensor(seqs)
    for name, folder in folders.items():
        table = evaluate_saes(lm.model, load_saes(folder), tokens, batch_size=8, progress=False)
        print(f"\n  quality of the {name} SAEs on {len(seqs)} held-out sequences:")
        print(table[["fve", "l0", "dead_fraction", "dense_fraction", "loss_recovered"]].round(3).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=110_000, help="training tokens per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--runner-layers", type=int, nargs="+", default=[5, 15, 27])
    parser.add_argument("--storage", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--architecture", default="topk", choices=["topk", "batchtopk"])
    parser.add_argument(
        "--multi-runner", action="store_true", help="also time sae-lens' MultiSAETrainingRunner"
    )
    parser.add_argument("--eval-sequences", type=int, default=32, help="0 skips the quality check")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    if args.side:  # inside a subprocess
        torch.manual_seed(0)
        print(json.dumps(SIDES[args.side](args, args.out)))
        return

    args.passthrough = [
        "--tokens", str(args.tokens), "--epochs", str(args.epochs), "--context", str(args.context),
        "--storage", args.storage, "--architecture", args.architecture,
        "--runner-layers", *map(str, args.runner_layers),
    ]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="sae-bench-"))
    print(
        f"torch threads: {torch.get_num_threads()}; {args.tokens} tokens x {args.epochs} epochs, context {args.context}"
    )
    try:
        results = {"emolib": run_side("emolib", args, work / "emolib")}
        results["runner"] = run_side("runner", args, work / "runner")
        if args.multi_runner:
            results["multi-runner"] = run_side("multi-runner", args, work / "multi")
        ours, runner = results["emolib"], results["runner"]
        n = ours["layers"]
        print(f"\nSmolLM2, {n} layers, {ours['training_samples']} training samples per SAE")
        print(
            f"  emolib (cache + MultiSAETrainer): extract {ours['extract_s']:.0f} s + train {ours['train_s']:.0f} s "
            f"= {ours['total_s']:.0f} s ({ours['total_s'] / n:.1f} s per layer), peak RSS "
            f"{ours['peak_rss_gib']:.2f} GiB, activation cache {ours['cache_gib']:.2f} GiB on disk"
        )
        per_layer = ", ".join(f"layer {k}: {v:.0f} s" for k, v in runner["seconds_by_layer"].items())
        print(
            f"  sae-lens LanguageModelSAETrainingRunner: {per_layer}; fit {runner['fit_intercept_s']:.1f} s + "
            f"{runner['fit_per_layer_depth_s']:.2f} s x (layer+1); projected all layers "
            f"{runner['projected_all_layers_s']:.0f} s; peak RSS {runner['peak_rss_gib']:.2f} GiB"
        )
        if "multi-runner" in results:
            multi = results["multi-runner"]
            print(
                f"  sae-lens MultiSAETrainingRunner (all layers, model re-run every epoch): {multi['total_s']:.0f} s, "
                f"peak RSS {multi['peak_rss_gib']:.2f} GiB ({multi['total_s'] / ours['total_s']:.2f}x emolib's time)"
            )
        ratio = runner["projected_all_layers_s"] / ours["total_s"]
        print(
            f"  ratio runner / emolib over all layers: {ratio:.1f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})"
        )
        if args.eval_sequences:
            quality(args, {"emolib": work / "emolib", "runner": work / "runner"})
        print("\n" + json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
