"""Seconds per classified text with the fused attention (`emolib.lm.attention`) against TransformerLens' own
attention, on the book's zero-shot prompt and behind an n-shot prefix (chapter 4's prompting baseline).

TransformerLens materialises the `[batch, head, query, key]` scores and pattern and passes over them several times
(mask, softmax, NaN check, dtype copies); on 2 CPU cores these memory-bound passes dominate when the key length is
long. Both paths score the same texts and must agree (checked: to 1e-4 in float32, to the bfloat16 noise floor
otherwise). Goal: at least 1.5x faster behind the n-shot prefix, in the same run (`--model`, `--precision`).

    python benchmarks/attention_speed.py [--model smollm2-135m-instruct] [--texts 32] [--shots 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import numpy as np

from emolib import data
from emolib.lm.attention import reference_attention, rerotated_keys
from emolib.lm.baselines import make_classifier, run_labels
from emolib.lm.classify import ClassifierConfig
from emolib.lm.models import load_model
from emolib.lm.prompts import template_for
from emolib.studies.steering import icl_template

GOAL = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--precision", default=None, help="float32, bfloat16 or auto (default: EMOLIB_PRECISION)"
    )
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--shots", type=int, default=3, help="examples per emotion in the n-shot prefix")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    dataset = "isear" if "isear" in data.available_datasets() else "builtin"
    frame = data.load(dataset)
    texts = data.column(data.select_split(frame, "dev"), "text")[: args.texts]
    train = data.select_split(frame, "train").to_pandas()
    labels = run_labels(dataset, "native")
    examples = [
        (text, label) for label in labels for text in train[train["label"] == label]["text"].head(args.shots)
    ]
    lm = load_model(args.model, precision=args.precision)
    config = ClassifierConfig(generate=False, progress=False, batch_size=args.batch_size)
    prompts = {
        "zero-shot": None,
        f"{args.shots}-shot": icl_template(template_for(dataset), examples, 0, 40),
    }
    tolerance = 1e-4 if lm.info.precision == "float32" else 0.5
    report, ratios = {}, {}
    for name, template in prompts.items():
        options = {} if template is None else {"template": template}
        classifier = make_classifier(lm, labels, dataset, config, **options)
        classifier.predict(texts[: args.batch_size])  # warm-up: allocations, rotary tables
        seconds, scores = {}, {}
        paths = (
            ("fused", contextlib.nullcontext),
            ("fused, cached keys rotated again", rerotated_keys),
            ("TransformerLens", reference_attention),
        )
        for path, context in paths:
            with context():
                began = time.perf_counter()
                scores[path] = classifier.predict(texts).label_logprobs
                seconds[path] = (time.perf_counter() - began) / len(texts)
        gap = max(float(np.abs(scores["fused"] - scores[path]).max()) for path in scores)
        if gap > tolerance:
            raise SystemExit(f"{name}: the two paths disagree by {gap:.3g} (tolerance {tolerance})")
        ratios[name] = seconds["TransformerLens"] / seconds["fused"]
        ratios[f"{name}, kept rotation"] = seconds["fused, cached keys rotated again"] / seconds["fused"]
        report[name] = {"prefix tokens": len(classifier.prefix_ids), "seconds per text": seconds, "gap": gap}
    print(json.dumps({"model": lm.info.name, "precision": lm.info.precision, "texts": len(texts),
                      "prompts": report, "ratio": ratios}, indent=2))  # fmt: skip
    shot = f"{args.shots}-shot"
    print(f"goal fused >= {GOAL}x behind the n-shot prefix: {'met' if ratios[shot] >= GOAL else 'NOT met'} "
          f"({ratios[shot]:.1f}x; zero-shot {ratios['zero-shot']:.1f}x; keeping the cache's rotated keys "
          f"{ratios[shot + ', kept rotation']:.2f}x of rotating them again)")  # fmt: skip


if __name__ == "__main__":
    main()
