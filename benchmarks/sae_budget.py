"""What halving the SAE training budget costs in quality: the book's SAEs trained for 1 and 2 epochs on a few layers.

The SAE stage (extract, train, evaluate) is most of a fresh build's time and training is most of the stage (issue
13: ~80 minutes for the three book models at two epochs, against a 60-minute goal). This trains the full preset's
SAEs of a few layers of one model from the same stored activations for each number of epochs, measures them with
the suite's own evaluation (FVE, loss recovered, dead fraction, L0 on the held-out dev corpus) and reports seconds
and quality side by side, so the budget is chosen on measured quality, not guessed. Needs the real datasets.

    EMOLIB_DATA_DIR=... python benchmarks/sae_budget.py --model smollm2-135m-instruct [--layers 7 15 23] [--epochs 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tempfile
import time

import pandas as pd

from emolib.lm.device import device_of
from emolib.lm.models import load_model
from emolib.lm.precision import compute_dtype
from emolib.sae.activations import extract_activations, resid_hooks
from emolib.sae.corpus import build_corpus
from emolib.sae.loading import load_saes, save_saes
from emolib.sae.suite import measure_saes
from emolib.sae.training import train_saes
from emolib.studies.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="default: a quarter, half, 3/4 deep"
    )
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--preset", default="full")
    args = parser.parse_args()

    config = get_preset(args.preset).suite
    lm = load_model(args.model)
    n_layers = lm.info.n_layers
    layers = args.layers or [n_layers // 4, n_layers // 2, 3 * n_layers // 4]
    every = list(resid_hooks(n_layers))
    hooks = [every[layer] for layer in layers]
    corpus = build_corpus(lm.tokenizer, lm.info.chat, config.corpus)
    extraction = dataclasses.replace(config.extraction, hooks=tuple(every))
    store = extract_activations(  # the suite's own cache entry: reused when the book has built it
        lm,
        lm.info.name,
        corpus.sequences,
        extraction,
        description=corpus.description,
        preset=args.preset,
        starts=corpus.starts,
    )
    eval_corpus = build_corpus(lm.tokenizer, lm.info.chat, config.eval_corpus)

    rows = []
    for epochs in args.epochs:
        training = config.training.for_rows(store.n_rows, epochs)
        began = time.perf_counter()
        trained = train_saes(
            functools.partial(store.endless_batches, hooks=hooks),
            training,
            hooks=hooks,
            d_in=lm.info.d_model,
            precision=compute_dtype(lm.model),
            device=device_of(lm.model),
        )
        seconds = time.perf_counter() - began
        with tempfile.TemporaryDirectory() as folder:
            save_saes(trained, folder)
            saes = load_saes(folder, device=device_of(lm.model))
            table = measure_saes(lm, saes, eval_corpus, config, progress=False)
        for hook, row in table.iterrows():
            rows.append(
                {
                    "epochs": epochs,
                    "hook": hook,
                    "steps": training.n_steps,
                    "train_s_per_layer": seconds / len(hooks),
                    **{k: float(row[k]) for k in ("fve", "loss_recovered", "dead_fraction", "l0")},
                }
            )
    frame = pd.DataFrame(rows)
    print(frame.round(3).to_string(index=False))
    print(json.dumps({"model": args.model, "stored_rows": store.n_rows, "rows": rows}))


if __name__ == "__main__":
    main()
