"""Time of one SAE training step on this CPU, for the SAE variants sae-lens offers, at a book model's width.

The SAE stage is bound by arithmetic (a profile of Qwen2.5-Coder-0.5B's training shows the backward pass and the
decoder product on top), so the one lever left besides fewer tokens is doing less arithmetic per step. sae-lens'
TopK SAE can keep its activations sparse (`use_sparse_activations`: the decoder multiplies only the k active
features); its BatchTopK SAE, the book's architecture, has no sparse path. All variants run in one process on the
same random batches, with sae-lens' own training forward pass, backward and Adam step (as its trainer does).

    python benchmarks/sae_step_speed.py [--d-in 896] [--expansion 4] [--k 32] [--batch 512] [--steps 10]

Prints seconds per step and the ratio of each variant to BatchTopK (dense), the book's today. A variant that cannot
train here is reported with its error: with torch 2.13 on CPU, the sparse TopK backward fails (`aten::view` has no
SparseCPU kernel), so that lever does not exist on CPU today.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig


def make(variant: str, d_in: int, d_sae: int, k: int):
    common = dict(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu")
    if variant == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    return TopKTrainingSAE(TopKTrainingSAEConfig(**common, use_sparse_activations=variant == "topk-sparse"))


def seconds_per_step(sae, batches: list[torch.Tensor], dead: torch.Tensor) -> float:
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
            )
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for x in batches[1:]:
        step(x)
    return (time.perf_counter() - start) / (len(batches) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--d-in", type=int, default=896, help="896: Qwen2.5-Coder-0.5B; 576: SmolLM2; 640: Gemma"
    )
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-dead", dest="dead", action="store_false", help="no dead features (no aux loss)")
    args = parser.parse_args()
    torch.manual_seed(0)
    d_sae = args.expansion * args.d_in
    batches = [torch.randn(args.batch, args.d_in) for _ in range(args.steps + 1)]
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 10] = args.dead  # some dead features, so the auxiliary loss runs as in training
    times, failed = {}, {}
    for variant in ("batchtopk", "topk", "topk-sparse"):
        torch.manual_seed(0)
        try:
            times[variant] = seconds_per_step(make(variant, args.d_in, d_sae, args.k), batches, dead)
        except (
            NotImplementedError,
            RuntimeError,
        ) as err:  # seen: sparse backward on CPU (aten::view, SparseCPU)
            failed[variant] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    base = times["batchtopk"]
    print(json.dumps({"config": vars(args), "threads": torch.get_num_threads(), "seconds_per_step": times,
                      "speed_vs_batchtopk": {v: base / t for v, t in times.items()}, "failed": failed}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
