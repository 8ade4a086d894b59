"""What SAE features do over a whole prompt: template, content, emotion or inactive roles, and the tokens they fire on."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from emolib.methods.common import FeatureError, FlowError, as_array, as_matrix
from emolib.methods.selectivity import Selectivity


@dataclass
class TokenCodes:
    """SAE codes of every stored token of some prompts at one layer, with where each row comes from."""

    codes: Float[np.ndarray, "tokens features"]
    is_template: Bool[np.ndarray, " tokens"]
    sequence: Int[np.ndarray, " tokens"]
    position: Int[np.ndarray, " tokens"]
    token_ids: Int[np.ndarray, " tokens"]


def token_codes(store, hook: str, encode: Callable, text_masks: Sequence[np.ndarray]) -> TokenCodes:
    """All-token SAE codes of one hook of an `ActivationStore` (mode "all"), each row marked template or text.

    `encode` maps a `[rows, d_model]` float tensor to codes (e.g. `sae.encode`); `text_masks[s][p]` is True when
    token `p` of sequence `s` belongs to the text (False: template), as `AnalysisSet.text_masks` gives them.
    """
    sequence = np.asarray(store.sequence_index())
    position = np.asarray(store.positions())
    if len(sequence) == 0:
        raise FlowError("the store holds no rows")
    if sequence.max() >= len(text_masks):
        raise FlowError(f"the store has sequence {sequence.max()} but only {len(text_masks)} text masks")
    lengths = np.array([len(m) for m in text_masks])
    if (position >= lengths[sequence]).any():
        raise FlowError("a stored position lies beyond its sequence's text mask")
    is_text = np.array([bool(text_masks[s][p]) for s, p in zip(sequence, position, strict=True)])
    with torch.no_grad():
        codes = encode(store.load(hook).float())
    codes = codes.detach().cpu().numpy() if torch.is_tensor(codes) else np.asarray(codes)
    return TokenCodes(
        codes=codes,
        is_template=~is_text,
        sequence=sequence,
        position=position,
        token_ids=np.asarray(store.token_ids()),
    )


def top_tokens(
    values: Float[np.ndarray, " tokens"],
    tokens: TokenCodes,
    prompts: Sequence[Sequence[int]],
    decode: Callable,
    k: int = 5,
    window: int = 6,
) -> pd.DataFrame:
    """The `k` stored tokens on which one feature fires most (`values`: its codes over `tokens`' rows), each with
    up to `window` tokens of left context and the firing token in [[brackets]]; only active rows are listed."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(tokens.sequence),):
        raise FlowError(
            f"values need one entry per stored token ({len(tokens.sequence)}), got {values.shape}"
        )
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0][:k]
    rows = []
    for rank, r in enumerate(order, start=1):
        s, p = int(tokens.sequence[r]), int(tokens.position[r])
        left = decode(list(prompts[s][max(0, p - window) : p]))
        rows.append(
            {
                "rank": rank,
                "activation": float(values[r]),
                "token": decode([int(tokens.token_ids[r])]),
                "context": f"{left}[[{decode([int(tokens.token_ids[r])])}]]".replace("\n", "⏎"),
                "template": bool(tokens.is_template[r]),
            }
        )
    return pd.DataFrame(rows, columns=["rank", "activation", "token", "context", "template"])


def role_mass_shares(
    codes: Float[np.ndarray, "items features"], roles: Sequence[str], categories: Sequence[str]
) -> dict[str, float]:
    """Share of the total activation of `codes` `[n_items, d_sae]` carried by the features of each role."""
    codes = as_matrix(codes, "codes")
    roles = np.asarray(roles).astype(str)
    if roles.shape != (codes.shape[1],):
        raise FlowError(f"roles need one entry per feature ({codes.shape[1]}), got {roles.shape}")
    per_feature = codes.sum(axis=0)
    total = float(per_feature.sum())
    return {c: (float(per_feature[roles == c].sum()) / total if total > 0 else np.nan) for c in categories}


ROLES = ("emotion", "template", "content", "inactive")


@dataclass(frozen=True)
class RoleConfig:
    """Thresholds of `feature_roles`.

    `min_rate`: a feature active (code > `active_threshold`) on fewer than this share of all tokens, and not
    emotion-selective, is inactive. `template_share`: a feature is a template feature when its mean activation per
    template token is at least this share of (mean per template token + mean per content token); 0.8 means at
    least 4x as strong on the template. Means per token, not totals, because a prompt holds many more template
    tokens (instruction, label list, "Answer:") than text tokens.
    """

    min_rate: float = 1e-3
    template_share: float = 0.8
    active_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.template_share <= 1:
            raise FeatureError(f"template_share must be in [0.5, 1], not {self.template_share}")
        if not 0 <= self.min_rate < 1:
            raise FeatureError(f"min_rate must be in [0, 1), not {self.min_rate}")


def _token_chunks(token_codes, is_template) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    if isinstance(token_codes, np.ndarray | torch.Tensor):
        token_codes, is_template = [token_codes], [is_template]
    if len(token_codes) != len(is_template):
        raise FeatureError(f"{len(token_codes)} arrays of token codes but {len(is_template)} template masks")
    for i, (codes, mask) in enumerate(zip(token_codes, is_template, strict=True)):
        acts = as_array(codes, f"token codes [{i}]", 2)
        m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        if m.dtype != bool:
            raise FeatureError(f"template mask [{i}] must be boolean, got {m.dtype}")
        if m.shape != (acts.shape[0],):
            raise FeatureError(
                f"template mask [{i}] has shape {m.shape}, expected ({acts.shape[0]},) (one per token)"
            )
        yield acts, m


def feature_roles(
    token_codes: Float[np.ndarray, "tokens features"] | Sequence[Float[np.ndarray, "tokens features"]],
    is_template: Bool[np.ndarray, " tokens"] | Sequence[Bool[np.ndarray, " tokens"]],
    emotion_selective,
    config: RoleConfig = RoleConfig(),
) -> pd.DataFrame:
    """Classify every feature as "emotion", "template", "content" or "inactive" over all tokens of the prompts.

    `token_codes` is `[n_tokens, d_sae]` with `is_template` `[n_tokens]` (True on the prompt's fixed tokens:
    instruction, field name, "Answer:", chat markup; False on the text), or lists of such arrays per prompt.
    `emotion_selective` is a `Selectivity` of last-token codes or a boolean `[d_sae]` / `[d_sae, n_emotions]`.
    The first rule that applies wins: emotion (selective at the last token; it comes first because the last token
    is itself a template token), inactive (see `RoleConfig.min_rate`), template (fires mostly on template tokens,
    see `RoleConfig.template_share`; it is not emotion-selective, so it fires whatever the emotion), content
    (everything else that is active: it fires on the text, possibly on the template too).
    """
    sums = {True: 0.0, False: 0.0}
    actives = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    width = None
    for acts, m in _token_chunks(token_codes, is_template):
        if width is not None and acts.shape[1] != width:
            raise FeatureError(
                f"token codes have {acts.shape[1]} features in one array and {width} in another"
            )
        width = acts.shape[1]
        for part in (True, False):
            rows = acts[m == part]
            sums[part] = sums[part] + rows.sum(axis=0)
            actives[part] = actives[part] + (rows > config.active_threshold).sum(axis=0)
            counts[part] += len(rows)
    if width is None:
        raise FeatureError("no token codes given")
    if counts[True] == 0 or counts[False] == 0:
        raise FeatureError(f"need both template and content tokens, got {counts[True]} and {counts[False]}")
    if isinstance(emotion_selective, Selectivity):
        emotion = emotion_selective.selective.any(axis=1)
    else:
        emotion = np.asarray(emotion_selective, dtype=bool)
        emotion = emotion.any(axis=1) if emotion.ndim == 2 else emotion
    if emotion.shape != (width,):
        raise FeatureError(f"emotion_selective covers {emotion.shape[0]} features, the token codes {width}")
    mean_template, mean_content = sums[True] / counts[True], sums[False] / counts[False]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = mean_template / (mean_template + mean_content)
    rate = (actives[True] + actives[False]) / (counts[True] + counts[False])
    role = np.select(
        [emotion, rate < config.min_rate, np.nan_to_num(share) >= config.template_share],
        ["emotion", "inactive", "template"],
        default="content",
    )
    frame = pd.DataFrame(
        {
            "role": pd.Categorical(role, categories=ROLES),
            "rate": rate,
            "rate_template": actives[True] / counts[True],
            "rate_content": actives[False] / counts[False],
            "mean_template": mean_template,
            "mean_content": mean_content,
            "template_share": share,
            "emotion_selective": emotion,
        }
    )
    frame.index.name = "feature"
    frame.attrs.update(n_template_tokens=counts[True], n_content_tokens=counts[False])
    return frame
