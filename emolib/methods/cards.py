"""Feature cards: the items a feature fires on most and the tokens its decoder direction promotes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from emolib.methods.common import FeatureColumn, FeatureError, as_array


def top_activating(
    activations: FeatureColumn, texts: Sequence[str], k: int = 10, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """The `k` items on which one feature fires most: rank, item index, activation, text (and label).

    `activations` is one feature's codes over items (`codes[:, f]`). Only active items (> 0) are listed, so a
    rarely active feature shows fewer than `k` rows instead of arbitrary zeros; ties keep item order.
    """
    values = as_array(activations, "activations", 1)
    texts = list(texts)
    labels = None if labels is None else list(labels)
    if len(texts) != len(values):
        raise FeatureError(f"{len(values)} activations but {len(texts)} texts")
    if labels is not None and len(labels) != len(values):
        raise FeatureError(f"{len(values)} activations but {len(labels)} labels")
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0][:k]
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "item": order,
            "activation": values[order],
            "text": [texts[i] for i in order],
        }
    )
    if labels is not None:
        frame["label"] = [labels[i] for i in order]
    return frame


def promoted_tokens(
    decoder_row: Float[Tensor, " d_model"] | Float[np.ndarray, " d_model"],
    model: HookedTransformer,
    tokenizer: PreTrainedTokenizerBase | None = None,
    k: int = 10,
    ln_scale: bool = True,
    suppressed: bool = False,
) -> pd.DataFrame:
    """The tokens a feature's decoder direction pushes up (or, with `suppressed`, down) in the logits.

    Scores are `(d * w) @ W_U` for the decoder row `d` (`sae.W_dec[f]`), with `w = model.ln_final.w` when
    `ln_scale` and the model has one (models here are loaded unfolded, and TransformerLens stores Gemma's norm
    weight with its +1 already added, so `w` is the effective per-dimension scale), else `d @ W_U`. Ignored on
    purpose: the final norm's division by the residual's RMS (a positive factor per token: it rescales, never
    reorders), the unembedding bias (the same for every feature) and Gemma's logit soft cap (monotone).
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    W_U = model.W_U
    with torch.no_grad():
        row = torch.as_tensor(
            np.asarray(decoder_row) if not isinstance(decoder_row, torch.Tensor) else decoder_row
        )
        row = row.detach().to(device=W_U.device, dtype=W_U.dtype).flatten()
        if row.shape[0] != W_U.shape[0]:
            raise FeatureError(
                f"decoder row has {row.shape[0]} dimensions, the model's residual stream {W_U.shape[0]}"
            )
        ln_final = getattr(model, "ln_final", None)
        if ln_scale and ln_final is not None and hasattr(ln_final, "w"):
            row = row * ln_final.w
        scores = row @ W_U
        top = torch.topk(-scores if suppressed else scores, min(k, scores.shape[0]))
    ids = top.indices.tolist()
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(ids) + 1),
            "token_id": ids,
            "token": [tokenizer.decode([i]) for i in ids],
            "score": scores[top.indices].cpu().numpy(),
        }
    )
