"""`emolib classify`: a user's own texts classified by a book model, with or without a saved steering plan.

Reads a CSV or JSONL file with a text column, answers each text with the book's prompt (restricted first-token
scoring over the dataset's labels), and writes one row per text: the predicted label and the probability of each
label (renormalised over the labels). With `--steer plan.json` the plan's hooks are attached at every position
(`emolib.methods.steering.SteeringPlan`); a plan made for another model or other SAEs is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from emolib.cache import cache_dir
from emolib.methods.steering import SteeringError, SteeringPlan


class ClassifyError(ValueError):
    """Input the classify command cannot use: a missing file or column, empty texts, an unknown format."""


@dataclass(frozen=True)
class ClassifyRequest:
    """What to classify and how: the model, the input file and its text column, the dataset whose prompt and
    labels to use, an optional steering plan, where to write."""

    model: str
    input: Path
    output: Path
    text_column: str = "text"
    dataset: str = "isear"
    plan: Path | None = None
    batch_size: int = 16


def read_texts(path: Path, column: str = "text") -> list[str]:
    """The texts of a CSV or JSONL file (by suffix); errors name the file, the column and the empty rows."""
    path = Path(path)
    if not path.is_file():
        raise ClassifyError(f"no input file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix in (".jsonl", ".ndjson"):
        frame = pd.read_json(path, lines=True, dtype=False)
    else:
        raise ClassifyError(f"{path}: read .csv or .jsonl files, not {suffix or 'files without a suffix'}")
    if column not in frame.columns:
        raise ClassifyError(
            f"{path} has no column {column!r} (columns: {', '.join(map(str, frame.columns))}); "
            f"name the text column with --text-column"
        )
    texts = frame[column].astype(str).tolist()
    empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ClassifyError(f"{path}: rows {empty[:10]} (1-based, after the header) have an empty {column!r}")
    if not texts:
        raise ClassifyError(f"{path} holds no rows")
    return texts


def plan_saes(plan: SteeringPlan) -> dict:
    """The SAEs a plan's features index, by layer: a pretrained release by name, or the project's cached suite
    (`<cache>/saes/<sae_source>`)."""
    from emolib.sae.loading import PRETRAINED, load_saes

    if plan.variant == "subspace":
        return {}
    if plan.sae_source in PRETRAINED:
        loaded = load_saes(plan.sae_source)
    else:
        folder = cache_dir("saes") / str(plan.sae_source)
        if not folder.is_dir():
            raise SteeringError(
                f"the plan's SAEs {plan.sae_source!r} are not in the cache ({folder.parent}): run the steering "
                f"chapter for {plan.model} with the same preset first (it trains them), or set EMOLIB_CACHE_DIR"
            )
        loaded = load_saes(folder)
    return {int(hook.split(".")[1]): sae for hook, sae in loaded.items()}


def classify_file(request: ClassifyRequest, progress: bool = True) -> pd.DataFrame:
    """Classify the request's texts and write the predictions (CSV); returns them."""
    from emolib.lm.baselines import make_classifier, run_labels
    from emolib.lm.classify import ClassifierConfig
    from emolib.lm.models import load_model

    texts = read_texts(request.input, request.text_column)
    plan = SteeringPlan.load(request.plan) if request.plan is not None else None
    lm = load_model(request.model)
    labels = run_labels(request.dataset, "native")
    config = ClassifierConfig(generate=False, progress=progress, batch_size=request.batch_size)
    classifier = make_classifier(lm, labels, request.dataset, config)
    hooks = []
    if plan is not None:
        saes = plan_saes(plan)
        plan.check(lm.info.name, lm.model.cfg.d_model, saes, plan.sae_source)
        hooks = plan.hooks(saes)
    with lm.model.hooks(fwd_hooks=hooks):
        predictions = classifier.predict(texts)
    frame = predictions.to_frame()
    frame.insert(0, "text", texts)
    frame["steering"] = "none" if plan is None else f"{plan.method} {plan.variant} alpha={plan.strength:g}"
    request.output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(request.output, index=False)
    return frame
