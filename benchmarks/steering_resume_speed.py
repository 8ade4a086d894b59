"""Seconds per steering configuration when each plan runs only from its first edited block, against running every
block for every configuration.

Chapter 4 tries every intervention on a grid of configurations for every draw of examples, on the same dev texts.
`SteeredScorer` runs the clean model over those texts once, keeps the residual entering every block of the final
phase, and then runs each plan from its first edited block (the shared prompt prefix too, from its clean residual);
the baseline (`resume=False`) runs all blocks of every text for every plan. Both score the same plans on the same texts
and must agree (checked). The plans are gains on random features of SAEs with random weights on the model's last
`--phase` layers (a final-phase intervention; the cost does not depend on what the features mean). Goal: at least
4x faster per configuration, in the same run. The one clean pass is reported apart. Skipping blocks cannot do better
than n_layers / phase blocks (SmolLM2, 30 layers, an 8-layer phase: 3.75x) even if the SAE hooks, which both paths
run, were free; the output reports that bound beside the ratio.

    python benchmarks/steering_resume_speed.py [--model smollm2-135m-instruct] [--texts 70] [--configs 6] [--phase 8]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sae_lens import StandardSAE
from sae_lens.saes.standard_sae import StandardSAEConfig

from emolib import data
from emolib.lm.baselines import make_classifier, run_labels
from emolib.lm.classify import ClassifierConfig
from emolib.lm.models import load_model
from emolib.methods.steering import SteeredScorer, SteeringPlan

GOAL = 4.0


def random_sae(d_model: int, layer: int, seed: int) -> StandardSAE:
    """An SAE with random unit-norm encoder and decoder rows (about half the features fire)."""
    g = torch.Generator().manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_model, d_sae=4 * d_model))
    with torch.no_grad():
        sae.W_enc.copy_(torch.nn.functional.normalize(torch.randn(d_model, 4 * d_model, generator=g), dim=0))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(4 * d_model, d_model, generator=g), dim=1))
        sae.b_enc.zero_()
    return sae.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--texts", type=int, default=70)
    parser.add_argument("--configs", type=int, default=6)
    parser.add_argument("--phase", type=int, default=8, help="layers of the final phase (the last ones)")
    args = parser.parse_args()
    dataset = "isear" if "isear" in data.available_datasets() else "builtin"
    texts = data.column(data.select_split(data.load(dataset), "dev"), "text")[: args.texts]
    lm = load_model(args.model)
    classifier = make_classifier(lm, run_labels(dataset, "native"), dataset, ClassifierConfig(generate=False))
    n_layers, d_model = lm.model.cfg.n_layers, lm.model.cfg.d_model
    final = list(range(n_layers - args.phase, n_layers))
    saes = {layer: random_sae(d_model, layer, layer) for layer in final}
    rng = np.random.default_rng(0)
    plans = [
        SteeringPlan(
            model=lm.info.name, method="benchmark", variant="gain", strength=float(alpha), sae_source="random",
            features={layer: tuple(sorted(rng.choice(4 * d_model, 16, replace=False).tolist())) for layer in final},
            typical={layer: (1.0,) * 16 for layer in final},
        )
        for alpha in np.linspace(0.5, 3.0, args.configs)
    ]  # fmt: skip

    timings, scores = {}, {}
    for name, resume in (("every block", False), ("from the first edited block", True)):
        began = time.perf_counter()
        scorer = SteeredScorer(classifier, texts, from_block=final[0], resume=resume)
        timings[f"clean pass, {name}"] = time.perf_counter() - began
        began = time.perf_counter()
        scores[name] = [scorer.plan_scores(plan, saes) for plan in plans]
        timings[name] = (time.perf_counter() - began) / len(plans)
    for a, b in zip(scores["every block"], scores["from the first edited block"], strict=True):
        if not np.allclose(a, b, atol=2e-2):
            raise SystemExit(f"the two paths disagree by {np.abs(a - b).max():.3g}")
    ratio = timings["every block"] / timings["from the first edited block"]
    bound = n_layers / len(final)  # blocks run per configuration: all of them against the final phase's
    print(json.dumps({"model": lm.info.name, "texts": len(texts), "configs": len(plans), "final phase": final,
                      "seconds": timings, "ratio per configuration": ratio,
                      "bound (blocks skipped, SAE hooks free)": bound}, indent=2))  # fmt: skip
    print(
        f"goal from the first edited block >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.1f}x)"
    )


if __name__ == "__main__":
    main()
