"""Activations at many hook points from one forward pass per batch, streamed to a verified on-disk cache.

Two modes: `last` keeps the last token of each prompt (one row per prompt, what the analysis chapters read); `all`
keeps every token of each sequence (one row per token, the corpus SAEs are trained on), minus the first position
and, optionally, attention-sink outliers. An `ActivationStore` reads an entry back, whole or as shuffled batches.

Batches are exact: in `all` mode sequences are right-padded (a causal model never lets a real token see later
padding); in `last` mode prompts are laid out as `[common prefix][pad...][rest]` with an attention mask, the layout
`emolib.lm.classify` uses, so TransformerLens' mask-derived rotary positions equal the unpadded ones. An
instruction prefix that a whole batch shares and drops (`starts`) runs once, its keys and values reused by the
batch. Results depend neither on `batch_size` nor on `progress` (beyond float rounding of batched matrix
products), so neither is part of the cache key; everything else in `ExtractionConfig` is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformers import PreTrainedTokenizerBase

from emolib.cache import MANIFEST, cache_dir, cached_entry, config_key
from emolib.lm.batching import (
    common_prefix,
    expanded_cache,
    local_window,
    pad_id,
    padding_fits_window,
    prefix_cache,
    prefix_layout,
    right_padded,
)
from emolib.lm.models import LoadedModel, has_interventions
from emolib.lm.precision import model_key

#: Bump when extraction changes in a way that changes stored rows, so cached entries are rebuilt.
CODE_VERSION = "1"
#: The same for "last" mode only (2: the common prefix runs once into a key-value cache; rounding differs).
LAST_MODE_VERSION = "2"

Mode = Literal["last", "all"]
MODES = ("last", "all")
#: Storage dtypes. float16 is not offered: Gemma's residual stream reaches ~1e5, beyond float16's 65504.
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Per-row index tensors stored beside the activations in every shard (int64).
INDEX_KEYS = ("token_ids", "sequence_index", "position")
SHARD_PATTERN = "shard-{:05d}.safetensors"

# Drop reasons, as counted in the manifest (`meta["dropped"]`).
FIRST_POSITIONS = "first positions"
SHARED_PREFIX = "shared prefix"
OUTLIERS = "outliers"
BEYOND_MAX_LENGTH = "beyond max_length"

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")

# Shapes of what the store returns (aliases, so that linters do not read jaxtyping's shape strings as forward
# annotations). `rows` is the number of stored rows, `batch` a batch of them, `d` the hook's width.
HookRows = Float[Tensor, "rows d"]
RowIndex = Int[Tensor, " rows"]
BatchRows = Float[Tensor, "batch d"]
HookBatch = dict[str, BatchRows]


class ActivationCacheError(RuntimeError):
    """An activation cache folder is missing, incomplete, or not what the caller asked for."""


def resid_hooks(n_layers: int, point: str = "hook_resid_post") -> tuple[str, ...]:
    """Hook names of one point in every block, `blocks.0.<point>` ... `blocks.{n_layers-1}.<point>`."""
    return tuple(f"blocks.{layer}.{point}" for layer in range(n_layers))


@dataclass(frozen=True)
class ExtractionConfig:
    """What to extract and how to store it.

    `hooks` empty means every block's `hook_resid_post`. In `all` mode, the first `skip_first` positions of each
    sequence are dropped (position 0 is an attention sink), and so is, with `outlier_factor` set, every token whose
    norm at any hook exceeds `outlier_factor` x the median norm of its sequence's remaining tokens at that hook
    (the median is per sequence, so that results depend neither on batch size nor on shard boundaries; it is
    meant for corpus chunks of tens of tokens or more). In `last` mode rows are prompts and nothing is dropped.

    `max_length` (None: the model's context) caps sequence length: longer `all`-mode sequences are cut (the cut
    tokens are counted), longer `last`-mode prompts raise, since cutting would change their last token. A shard holds at most `shard_rows` rows, which bounds memory while extracting
    (`shard_rows x sum of hook widths x bytes per value`). `batch_size` and `progress` do not change results.
    """

    hooks: tuple[str, ...] = ()
    mode: Mode = "all"
    batch_size: int = 8
    max_length: int | None = None
    shard_rows: int = 4096
    storage_dtype: Literal["float32", "bfloat16"] = "float32"
    skip_first: int = 1
    outlier_factor: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be one of {tuple(STORAGE_DTYPES)}, not {self.storage_dtype!r} "
                "(float16 overflows: Gemma's residual stream reaches ~1e5)"
            )
        for name in ("batch_size", "max_length", "shard_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.skip_first < 0:
            raise ValueError(f"skip_first must be >= 0, not {self.skip_first}")
        if self.outlier_factor is not None and not self.outlier_factor > 1:
            raise ValueError("outlier_factor must be > 1 (a multiple of the median norm) or None")
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the stored rows (the cache key's part of this config)."""
        relevant = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("batch_size", "progress")
        }
        if self.mode == "last":  # nothing is dropped in last mode
            relevant.pop("skip_first")
            relevant.pop("outlier_factor")
        return relevant


# ----------------------------------------------------------------------------------------------- cache keys


def sequences_sha256(sequences: Sequence[Sequence[int]]) -> str:
    """sha256 of the exact token sequences (their order, lengths and ids): the data part of a cache key."""
    digest = hashlib.sha256()
    for seq in sequences:
        ids = np.asarray(seq, dtype="<i8")
        digest.update(np.int64(ids.size).astype("<i8").tobytes())
        digest.update(ids.tobytes())
    return digest.hexdigest()


def activation_key(
    model_name: str, config: ExtractionConfig, data_sha256: str, *, description: str, preset: str
) -> str:
    """Cache key: code version, model, result-relevant config (hooks included), data hash, description, preset."""
    version = CODE_VERSION if config.mode == "all" else f"{CODE_VERSION}.{LAST_MODE_VERSION}"
    return config_key(version, model_name, config.result_fields(), data_sha256, description, preset)


def _folder_name(model_name: str, mode: str, key: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', model_name)}-{mode}-{key}"


# ---------------------------------------------------------------------------------------------- the store


class ActivationStore:
    """Read access to one cache entry: `hooks`, `n_rows`, `d_model`, `meta`, whole tensors and shuffled batches.

    Row `i` is the same token (or prompt) at every hook; `token_ids()`, `sequence_index()` and `positions()` say
    which. The folder is assumed verified (`extract_activations` returns only verified entries).
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise ActivationCacheError(f"{self.folder} holds no activation cache entry (no {MANIFEST})")
        self.meta: dict[str, Any] = json.loads(manifest.read_text())["meta"]
        self.hooks: tuple[str, ...] = tuple(self.meta["hooks"])
        self.dims: dict[str, int] = dict(self.meta["dims"])
        self.n_rows: int = int(self.meta["n_rows"])
        self.d_model: int = int(self.meta["d_model"])
        self.storage_dtype: torch.dtype = STORAGE_DTYPES[self.meta["storage_dtype"]]
        self._shards = [self.folder / s["file"] for s in self.meta["shards"]]
        self._shard_rows = [int(s["rows"]) for s in self.meta["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(self._shard_rows)]).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.meta['model']}, mode={self.meta['mode']}, {self.n_rows} rows x "
            f"{len(self.hooks)} hooks, {len(self._shards)} shards, {self.meta['storage_dtype']})"
        )

    @property
    def key(self) -> str:
        """The entry's cache key: identifies these activations (e.g. in the key of SAEs trained on them)."""
        return str(self.meta["key"])

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def _check_hooks(self, hooks: Sequence[str]) -> None:
        missing = [h for h in hooks if h not in self.dims]
        if missing:
            raise KeyError(f"hooks {missing} are not in this store; it holds {list(self.hooks)}")

    def _read(self, key: str, dtype: torch.dtype, width: int | None) -> Tensor:
        shape = (self.n_rows,) if width is None else (self.n_rows, width)
        out = torch.empty(shape, dtype=dtype)
        for path, start, stop in zip(self._shards, self._offsets[:-1], self._offsets[1:], strict=True):
            with safe_open(path, "pt") as handle:
                out[start:stop] = handle.get_tensor(key)
        return out

    def load(self, hook: str, dtype: torch.dtype = torch.float32) -> HookRows:
        """Every row at one hook (fine for `last` mode; a big `all`-mode corpus may not fit in memory)."""
        self._check_hooks([hook])
        return self._read(hook, dtype, self.dims[hook])

    def load_all(self, dtype: torch.dtype = torch.float32) -> dict[str, HookRows]:
        """`{hook: load(hook)}` for every hook."""
        return {hook: self.load(hook, dtype) for hook in self.hooks}

    def token_ids(self) -> RowIndex:
        return self._read("token_ids", torch.int64, None)

    def sequence_index(self) -> RowIndex:
        """Index into the extracted `sequences` of each row's sequence."""
        return self._read("sequence_index", torch.int64, None)

    def positions(self) -> RowIndex:
        """Position of each row's token within its sequence (0 = first token)."""
        return self._read("position", torch.int64, None)

    def iter_row_indices(
        self, batch_size: int, *, seed: int, epochs: int | None = 1, buffer_shards: int = 4
    ) -> Iterator[RowIndex]:
        """Global row numbers of the batches `iter_batches` yields with the same arguments (reads nothing)."""
        for rows, _ in self._stream(batch_size, seed, epochs, buffer_shards, (), torch.float32, False):
            yield rows

    def iter_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epochs: int | None = 1,
        hooks: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        buffer_shards: int = 4,
        drop_last: bool = False,
    ) -> Iterator[HookBatch]:
        """Shuffled `{hook: [batch, d]}` batches, the same rows at every hook, each row once per epoch.

        Each epoch visits the shards in a seeded random order, `buffer_shards` at a time, and permutes the rows of
        those shards (so memory holds about `buffer_shards` shards of the requested hooks). The epochs' row orders
        are concatenated and cut into batches of `batch_size`, so every batch is full except possibly the very
        last; `epochs=None` never ends (see `endless_batches`). Deterministic given `seed` (and `buffer_shards`).
        """
        selected = tuple(self.hooks if hooks is None else hooks)
        self._check_hooks(selected)
        for _, data in self._stream(batch_size, seed, epochs, buffer_shards, selected, dtype, drop_last):
            yield data

    def endless_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        hooks: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        buffer_shards: int = 4,
    ) -> Iterator[HookBatch]:
        """`iter_batches` cycling through epochs forever, every batch full: a data provider for sae-lens'
        `MultiSAETrainer` (which calls `next()` on it until it has seen its training tokens)."""
        return self.iter_batches(
            batch_size, seed=seed, epochs=None, hooks=hooks, dtype=dtype, buffer_shards=buffer_shards
        )

    def _stream(
        self,
        batch_size: int,
        seed: int,
        epochs: int | None,
        buffer_shards: int,
        hooks: Sequence[str],
        dtype: torch.dtype,
        drop_last: bool,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        if batch_size < 1 or buffer_shards < 1:
            raise ValueError("batch_size and buffer_shards must be positive")
        if self.n_rows == 0:
            return
        carry_rows = torch.empty(0, dtype=torch.int64)  # the row order's tail not yet yielded (< batch_size)
        carry: dict[str, Tensor] = {}
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(self.n_shards)
            for start in range(0, self.n_shards, buffer_shards):
                group = [int(s) for s in order[start : start + buffer_shards] if self._shard_rows[s] > 0]
                if not group:
                    continue
                rows = torch.cat([torch.arange(self._offsets[s], self._offsets[s + 1]) for s in group])
                perm = torch.from_numpy(rng.permutation(len(rows)))
                rows = rows[perm]
                data = self._read_group(group, hooks)
                for h in hooks:  # one hook at a time: at most one extra copy of one hook's rows
                    data[h] = data[h][perm]
                pos = 0
                if len(carry_rows):
                    need = batch_size - len(carry_rows)
                    if len(rows) < need:
                        carry_rows = torch.cat([carry_rows, rows])
                        carry = {h: torch.cat([carry[h], data[h]]) for h in hooks}
                        continue
                    yield (
                        torch.cat([carry_rows, rows[:need]]),
                        {h: torch.cat([carry[h], data[h][:need]]).to(dtype) for h in hooks},
                    )
                    pos = need
                while pos + batch_size <= len(rows):
                    yield (
                        rows[pos : pos + batch_size],
                        {h: data[h][pos : pos + batch_size].to(dtype, copy=True) for h in hooks},
                    )
                    pos += batch_size
                carry_rows = rows[pos:]
                carry = {h: data[h][pos:].clone() for h in hooks}
                del data
            epoch += 1
        if len(carry_rows) and not drop_last:
            yield carry_rows, {h: carry[h].to(dtype, copy=True) for h in hooks}

    def _read_group(self, group: Sequence[int], hooks: Sequence[str]) -> dict[str, Tensor]:
        """The rows of several shards at some hooks, in group order, in storage dtype (each shard opened once)."""
        n = sum(self._shard_rows[s] for s in group)
        out = {h: torch.empty((n, self.dims[h]), dtype=self.storage_dtype) for h in hooks}
        offset = 0
        for s in group:
            with safe_open(self._shards[s], "pt") as handle:
                for h in hooks:
                    out[h][offset : offset + self._shard_rows[s]] = handle.get_tensor(h)
            offset += self._shard_rows[s]
        return out


# --------------------------------------------------------------------------------------------- extraction


def norm_outliers(
    norms: Float[Tensor, "batch pos"], measured: Bool[Tensor, "batch pos"], factor: float
) -> Bool[Tensor, "batch pos"]:
    """Measured tokens whose residual norm exceeds `factor` x the median norm of their sequence's measured tokens
    (per sequence, so the rule depends neither on batch size nor on shard boundaries): attention-sink-like outliers
    that would dominate an SAE's squared error. The same rule drops them from training and from evaluation."""
    median = norms.masked_fill(~measured, torch.nan).nanmedian(dim=1).values  # lower median
    return measured & (norms > factor * median[:, None])


def last_token_outliers(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    hooks: Sequence[str],
    factor: float,
    skip_first: int = 1,
    batch_size: int = 8,
) -> Bool[np.ndarray, "prompts hooks"]:
    """Per prompt and hook, whether the SAE-training rule (`norm_outliers` over the prompt's tokens from
    `skip_first` on) flags the prompt's last token: the answer position the chapters read, where an SAE trained
    without such tokens is off its training distribution. Right-padded batches (a causal model's earlier positions
    never see the padding, whatever its attention window)."""
    hooks = list(hooks)
    stop = _stop_layer(model, hooks)
    flagged = np.zeros((len(prompts), len(hooks)), dtype=bool)
    for start in range(0, len(prompts), batch_size):
        tokens, mask = right_padded(prompts[start : start + batch_size], pad=0)
        position = torch.arange(tokens.shape[1])[None, :]
        measured = mask.bool() & (position >= skip_first)
        capture, norms = _capturing(hooks, tuple(tokens.shape), lambda x: x.float().norm(dim=-1))
        with torch.no_grad():
            _forward(model, tokens, mask, capture, stop)
        rows, last = torch.arange(len(tokens)), mask.sum(dim=1) - 1
        for j, hook in enumerate(hooks):
            flagged[start : start + len(tokens), j] = norm_outliers(norms[hook], measured, factor)[
                rows, last
            ].numpy()
    return flagged


def masked_mean_codes(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool]],
    encoders: Mapping[str, Callable[[Tensor], Tensor]],
    shared: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Float[np.ndarray, "prompts features"]]:
    """Per hook, the mean over each prompt's masked positions of `encoders[hook](activation)`: e.g. SAE codes
    averaged over the text's own tokens, what a stretch of text activates rather than one position. Encoding
    comes before averaging (an SAE is nonlinear: the codes of a mean residual are not the mean codes).

    `masks[i]` marks the positions of prompt `i` to average (at least one). The first `shared` tokens, the same
    in every prompt and in no mask (an instruction prefix), run once into a key-value cache. Right-padded
    batches: a causal model's real tokens never see the padding. `progress` shows a bar over the prompts."""
    hooks = list(encoders)
    if len(prompts) != len(masks):
        raise ValueError(f"{len(prompts)} prompts but {len(masks)} masks")
    for i, (ids, mask) in enumerate(zip(prompts, masks, strict=True)):
        if len(mask) != len(ids):
            raise ValueError(f"prompt {i} has {len(ids)} tokens but its mask {len(mask)}")
        if not any(mask[shared:]):
            raise ValueError(f"prompt {i} has no masked position after the shared prefix of {shared} tokens")
        if any(mask[:shared]) or list(ids[:shared]) != list(prompts[0][:shared]):
            raise ValueError(f"prompt {i} does not share the first {shared} tokens, unmasked, with prompt 0")
    stop = _stop_layer(model, hooks)
    cache = prefix_cache(model, prompts[0][:shared], stop) if shared and stop != 0 else None
    start_at = shared if cache is not None else 0
    out: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    bar = tqdm(total=len(prompts), desc="codes on text tokens", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        rows = range(start, min(start + batch_size, len(prompts)))
        tokens, attention = right_padded([prompts[i][start_at:] for i in rows], pad=0)
        selected, _ = right_padded([[int(m) for m in masks[i][start_at:]] for i in rows], pad=0)
        b_idx, p_idx = selected.bool().nonzero(as_tuple=True)
        weight = (1.0 / selected.sum(dim=1))[b_idx]
        capture, acts = _capturing(hooks, tuple(tokens.shape), lambda x, b=b_idx, p=p_idx: x[b, p].float())
        with torch.no_grad():
            batch_cache = expanded_cache(cache, len(rows)) if cache is not None else None
            _forward(model, tokens, attention, capture, stop, batch_cache)
            for hook in hooks:
                codes = encoders[hook](acts[hook]).float()
                mean = torch.zeros((len(rows), codes.shape[1])).index_add_(0, b_idx, codes * weight[:, None])
                out[hook].append(mean.numpy())
        bar.update(len(rows))
    bar.close()
    return {h: np.concatenate(parts) for h, parts in out.items()}


class _ShardWriter:
    """Rows accumulate in preallocated per-hook buffers of `shard_rows` rows; a full buffer becomes one shard.

    Memory therefore stays at one shard whatever the corpus size; `max_buffered` records the most rows ever held
    (tests check it never exceeds `shard_rows`).
    """

    def __init__(self, folder: Path, hooks: Sequence[str], shard_rows: int, dtype: torch.dtype) -> None:
        self.folder = folder
        self.hooks = tuple(hooks)
        self.shard_rows = shard_rows
        self.dtype = dtype
        self.buffers: dict[str, Tensor] = {}
        self.index = {key: torch.empty(shard_rows, dtype=torch.int64) for key in INDEX_KEYS}
        self.n = 0
        self.max_buffered = 0
        self.shards: list[dict[str, Any]] = []

    def _ensure_buffers(self, data: dict[str, Tensor]) -> None:
        if not self.buffers:  # allocated on first use: hook widths are known only once the model has run
            self.buffers = {
                h: torch.empty((self.shard_rows, data[h].shape[1]), dtype=self.dtype) for h in self.hooks
            }

    def append(self, data: dict[str, Tensor], index: dict[str, Tensor]) -> None:
        """Add rows at the end, writing a shard each time the buffer fills."""
        total = len(index["position"])
        self._ensure_buffers(data)
        start = 0
        while start < total:
            take = min(self.shard_rows - self.n, total - start)
            for key, source in [*data.items(), *index.items()]:
                target = self.buffers[key] if key in self.buffers else self.index[key]
                target[self.n : self.n + take].copy_(source[start : start + take])
            self.n += take
            start += take
            self.max_buffered = max(self.max_buffered, self.n)
            if self.n == self.shard_rows:
                self.flush()

    def place(self, slots: Tensor, data: dict[str, Tensor], index: dict[str, Tensor]) -> None:
        """Put rows at given slots of the current shard (`last` mode fills one shard per window of prompts)."""
        self._ensure_buffers(data)
        for key, source in [*data.items(), *index.items()]:
            target = self.buffers[key] if key in self.buffers else self.index[key]
            target[slots] = source.to(target.dtype)
        self.n = max(self.n, int(slots.max()) + 1)
        self.max_buffered = max(self.max_buffered, self.n)

    def flush(self) -> None:
        if self.n == 0:
            return
        name = SHARD_PATTERN.format(len(self.shards))
        tensors = {h: self.buffers[h][: self.n] for h in self.hooks}
        tensors.update({key: self.index[key][: self.n] for key in INDEX_KEYS})
        save_file(tensors, self.folder / name)
        self.shards.append({"file": name, "rows": self.n})
        self.n = 0


def _stop_layer(model: HookedTransformer, hooks: Sequence[str]) -> int | None:
    """`stop_at_layer` for a forward pass that reaches every hook and computes nothing after the deepest one.

    None when a hook lies after the last block (e.g. `ln_final.*`): then the whole model runs, without unembedding.
    """
    layers = []
    for hook in hooks:
        if hook not in model.hook_dict:
            raise ValueError(f"{hook!r} is not a hook point of this model (see model.hook_dict)")
        match = _BLOCK_HOOK.match(hook)
        if match:
            layers.append(int(match.group(1)))
        elif hook.startswith("hook_"):  # embedding hooks run before the first block
            layers.append(-1)
        else:
            return None
    return max(layers) + 1


def _forward(
    model: HookedTransformer,
    tokens: Tensor,
    mask: Tensor,
    hooks,
    stop: int | None,
    cache: TransformerLensKeyValueCache | None = None,
) -> None:
    """One forward pass with capturing hooks, stopped after the deepest hook (`stop`), after `cache`'s tokens.

    A batch without padding or cache runs unmasked, declared right-padded: TransformerLens would otherwise derive
    a mask from pad ids whenever the tokenizer pads on the left (Gemma's does), and masking costs time. A padded
    or cached batch always passes its explicit mask (the cache holds the prefix's part of it).
    """
    kwargs: dict[str, Any] = {"stop_at_layer": stop} if stop is not None else {"return_type": None}
    if cache is not None:
        kwargs.update(attention_mask=mask, past_kv_cache=cache)
    elif bool(mask.all()):
        kwargs.update(attention_mask=None, padding_side="right")
    else:
        kwargs.update(attention_mask=mask)
    with model.hooks(fwd_hooks=hooks):
        model(tokens, **kwargs)


def _capturing(
    hooks: Sequence[str], shape: tuple[int, int], select: Callable[[Tensor], Tensor]
) -> tuple[list[tuple[str, Callable]], dict[str, Tensor]]:
    """Forward hooks that store `select(activation)` per hook name in the returned dict (activations unchanged)."""
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook) -> None:
        if act.dim() < 3 or tuple(act.shape[:2]) != shape:
            raise ValueError(
                f"hook {hook.name!r} gives shape {tuple(act.shape)}, not [batch, pos, ...] {shape}"
            )
        captured[hook.name] = select(act)

    return [(h, capture) for h in hooks], captured


def _all_mode_batch(
    model: HookedTransformer,
    hooks: Sequence[str],
    stop: int | None,
    seqs: list[list[int]],
    seq_index: Tensor,
    config: ExtractionConfig,
    pad: int,
    starts: Sequence[int] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int], dict[str, int]]:
    """Rows of one right-padded batch: every token from `skip_first` (and the sequence's start) on, minus outliers
    (at any hook).

    A prefix that every sequence of the batch shares and drops (an instruction prefix, see `starts`) runs once,
    and the rest of each sequence runs on its keys and values: a causal model gives the kept tokens the same
    activations, for less compute (the prefix is ~40% of the SAE corpus' tokens).
    Returns per-hook rows `[kept, d]`, the index tensors, drop counts and per-hook outlier counts.
    """
    batch, width = len(seqs), max(len(s) for s in seqs)
    tokens, mask = right_padded(seqs, pad)
    wanted = mask.bool()
    wanted[:, : config.skip_first] = False
    n_first = int(wanted.logical_not().logical_and(mask.bool()).sum())
    if starts is not None:
        for row, begin in enumerate(starts):
            wanted[row, :begin] = False
    b_idx, p_idx = wanted.nonzero(as_tuple=True)  # sequence-major order
    # the blocks fill the prefix's key-value cache: with embedding hooks only (stop 0) there is nothing to reuse
    shared = _dropped_shared_prefix(seqs, starts, config.skip_first) if stop != 0 else 0
    cache = expanded_cache(prefix_cache(model, seqs[0][:shared], stop), batch) if shared else None
    flat = b_idx * (width - shared) + (p_idx - shared)
    fwd_hooks, captured = _capturing(
        hooks, (batch, width - shared), lambda act: act.flatten(0, 1).index_select(0, flat)
    )
    _forward(model, tokens[:, shared:], mask[:, shared:], fwd_hooks, stop, cache)
    dropped = {FIRST_POSITIONS: n_first, SHARED_PREFIX: int(mask.sum()) - len(flat) - n_first, OUTLIERS: 0}
    by_hook = {h: 0 for h in hooks}
    if config.outlier_factor is not None and len(flat):
        flagged = torch.zeros(len(flat), dtype=torch.bool)
        kept = torch.zeros((batch, width), dtype=torch.bool)
        kept[b_idx, p_idx] = True
        for h in hooks:
            grid = torch.zeros((batch, width))
            grid[b_idx, p_idx] = torch.linalg.vector_norm(captured[h], dim=1)
            outlier = norm_outliers(grid, kept, config.outlier_factor)[b_idx, p_idx]
            by_hook[h] = int(outlier.sum())
            flagged |= outlier
        dropped[OUTLIERS] = int(flagged.sum())
        if dropped[OUTLIERS]:
            keep = (~flagged).nonzero().squeeze(1)
            captured = {h: rows[keep] for h, rows in captured.items()}
            b_idx, p_idx = b_idx[keep], p_idx[keep]
    index = {"token_ids": tokens[b_idx, p_idx], "sequence_index": seq_index[b_idx], "position": p_idx}
    return captured, index, dropped, by_hook


def _dropped_shared_prefix(
    seqs: Sequence[Sequence[int]], starts: Sequence[int] | None, skip_first: int
) -> int:
    """Length of the prefix that every sequence of a batch shares and none stores (0: nothing worth reusing).

    It stops short of each sequence's last token, so every sequence keeps at least one token to run.
    """
    if starts is None:
        return 0
    dropped = min(max(begin, skip_first) for begin in starts)
    shared = min(common_prefix(seqs), dropped, min(len(s) for s in seqs) - 1)
    return shared if shared > 1 and len(seqs) > 1 else 0


def _last_mode_layouts(
    seqs: list[list[int]], pad: int, window: int | None
) -> Iterator[tuple[list[int], Tensor, Tensor, int]]:
    """(members, tokens, mask, shared) for a batch of prompts, right-aligned so the last token is the last column;
    the first `shared` columns are the batch's common prefix (0: none).

    `[common prefix][pad...][rest]` (`prefix_layout`, as `emolib.lm.classify` lays out its batches): padding
    queries see the (real) common prefix, real tokens never see padding, and mask-derived positions equal the
    unpadded ones. When the batch has no common prefix, or padding could push a real token out of a local-attention
    `window` (`padding_fits_window`), prompts of equal length run together instead, unpadded.
    """
    lengths = [len(s) for s in seqs]
    if min(lengths) == max(lengths):
        tokens = torch.tensor(seqs)
        yield list(range(len(seqs))), tokens, torch.ones_like(tokens), 0
        return
    # the shared prefix stops short of the shortest prompt: every prompt keeps at least its last token in `rest`
    common = min(common_prefix(seqs), min(lengths) - 1)
    if common >= 1 and padding_fits_window(window, max(lengths)):
        tokens, mask = prefix_layout(seqs[0][:common], [ids[common:] for ids in seqs], pad)
        yield list(range(len(seqs))), tokens, mask, common
        return
    for length in sorted(set(lengths)):
        members = [i for i, n in enumerate(lengths) if n == length]
        tokens = torch.tensor([seqs[i] for i in members])
        yield members, tokens, torch.ones_like(tokens), 0


def _last_mode_batch(
    model: HookedTransformer, hooks: Sequence[str], stop: int | None, seqs: list[list[int]], pad: int
) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    """(members, {hook: [len(members), d]}) at the last token of each prompt of a batch.

    A batch's common prefix (the classification prompt's instruction) runs once, into a key-value cache that every
    prompt of the batch reads, as the classifier does: only the rest of each prompt runs per row.
    """
    for members, tokens, mask, shared in _last_mode_layouts(seqs, pad, local_window(model.cfg)):
        cache = None
        if shared:
            cache = expanded_cache(prefix_cache(model, tokens[0, :shared].tolist(), stop), len(members))
            tokens, mask = tokens[:, shared:], mask[:, shared:]
        fwd_hooks, captured = _capturing(
            hooks, tuple(tokens.shape), lambda act: act[:, -1].flatten(1).clone()
        )
        _forward(model, tokens, mask, fwd_hooks, stop, cache)
        yield members, captured


def _build(
    folder: Path,
    model: HookedTransformer,
    sequences: list[list[int]],
    config: ExtractionConfig,
    hooks: tuple[str, ...],
    meta: dict[str, Any],
    starts: list[int] | None = None,
) -> None:
    stop = _stop_layer(model, hooks)
    tokenizer = model.tokenizer
    pad = pad_id(tokenizer)
    writer = _ShardWriter(folder, hooks, config.shard_rows, STORAGE_DTYPES[config.storage_dtype])
    dropped = {FIRST_POSITIONS: 0, SHARED_PREFIX: 0, OUTLIERS: 0, BEYOND_MAX_LENGTH: 0}
    by_hook = {h: 0 for h in hooks}
    n_tokens = sum(min(len(s), config.max_length) for s in sequences)
    bar = tqdm(
        total=n_tokens,
        unit="tok",
        desc=f"activations ({meta['model']}, {config.mode})",
        disable=not config.progress,
        leave=False,
    )
    with torch.inference_mode(), bar:
        if config.mode == "all":
            for start in range(0, len(sequences), config.batch_size):
                batch = sequences[start : start + config.batch_size]
                dropped[BEYOND_MAX_LENGTH] += sum(max(0, len(s) - config.max_length) for s in batch)
                batch = [s[: config.max_length] for s in batch]
                seq_index = torch.arange(start, start + len(batch))
                batch_starts = None if starts is None else starts[start : start + len(batch)]
                rows, index, counts, flagged = _all_mode_batch(
                    model, hooks, stop, batch, seq_index, config, pad, batch_starts
                )
                writer.append(rows, index)
                del rows, index  # before the next batch's rows exist: one batch of rows in memory, not two
                for reason, n in counts.items():
                    dropped[reason] += n
                for h, n in flagged.items():
                    by_hook[h] += n
                bar.update(sum(len(s) for s in batch))
        else:
            # One window of prompts fills one shard; within it prompts run sorted by length (less padding).
            for start in range(0, len(sequences), config.shard_rows):
                window = list(range(start, min(len(sequences), start + config.shard_rows)))
                order = sorted(window, key=lambda i: len(sequences[i]))
                for b in range(0, len(order), config.batch_size):
                    batch = order[b : b + config.batch_size]
                    seqs = [sequences[i] for i in batch]
                    for members, rows in _last_mode_batch(model, hooks, stop, seqs, pad):
                        ids = [batch[m] for m in members]
                        index = {
                            "token_ids": torch.tensor([sequences[i][-1] for i in ids]),
                            "sequence_index": torch.tensor(ids),
                            "position": torch.tensor([len(sequences[i]) - 1 for i in ids]),
                        }
                        writer.place(torch.tensor(ids) - start, rows, index)
                    bar.update(sum(len(s) for s in seqs))
                writer.flush()
        writer.flush()
    n_rows = sum(s["rows"] for s in writer.shards)
    dims = {h: int(writer.buffers[h].shape[1]) for h in hooks} if writer.buffers else {}
    # cached_entry writes the manifest after this function returns, from this same dict.
    meta.update(
        n_rows=n_rows,
        n_tokens=n_tokens,
        dims=dims,
        shards=writer.shards,
        dropped=dropped if config.mode == "all" else {},
        outliers_by_hook=by_hook if config.mode == "all" and config.outlier_factor is not None else {},
        max_buffered_rows=writer.max_buffered,
    )


def extract_activations(
    lm_or_model: LoadedModel | HookedTransformer,
    model_name: str | None,
    sequences: Sequence[Sequence[int]],
    config: ExtractionConfig,
    *,
    description: str,
    preset: str,
    starts: Sequence[int] | None = None,
) -> ActivationStore:
    """Activations of `sequences` (token-id lists) at `config.hooks`, from the cache or extracted into it.

    `starts` (all mode only) drops, per sequence, the positions before `starts[i]` as well: a corpus of prompts
    that share an instruction prefix keeps that prefix's activations once instead of once per prompt (they are
    identical, the model being causal), while every later token still sees the prefix as context.

    One forward pass per batch records every hook and stops after the deepest one. `model_name` (default: the
    LoadedModel's name), the hooks and result-relevant config, a sha256 of the exact sequences, `description`
    (what the data and template are, in words), `preset` and `CODE_VERSION` make the cache key; an entry that
    fails its checksums is rebuilt. Models with hooks or SAEs attached are refused: their effect is not in the key.
    """
    model = lm_or_model.model if isinstance(lm_or_model, LoadedModel) else lm_or_model
    if model_name is None:
        if not isinstance(lm_or_model, LoadedModel):
            raise ValueError("model_name is required when passing a bare model")
        model_name = lm_or_model.info.name
    # activations computed in bfloat16 or on a GPU get their own keys
    model_name = model_key(model_name, model)
    if has_interventions(model):
        raise ValueError(
            "the model has hooks or SAEs attached; remove them (model.reset_hooks(), model.reset_saes())"
        )
    sequences = [[int(t) for t in s] for s in sequences]
    if not sequences:
        raise ValueError("extract_activations needs at least one sequence")
    if starts is not None:
        if config.mode != "all":
            raise ValueError("starts applies to all-token mode only")
        if len(starts) != len(sequences) or any(int(b) < 0 for b in starts):
            raise ValueError("starts needs one non-negative position per sequence")
        starts = [int(b) for b in starts]
    empty = [i for i, s in enumerate(sequences) if not s]
    if empty:
        raise ValueError(f"sequences at positions {empty[:10]} are empty")
    hooks = config.hooks or resid_hooks(model.cfg.n_layers)
    max_length = config.max_length or model.cfg.n_ctx
    if max_length > model.cfg.n_ctx:
        raise ValueError(f"max_length {max_length} exceeds the model's context ({model.cfg.n_ctx})")
    config = dataclasses.replace(config, hooks=hooks, max_length=max_length)  # resolved: they enter the key
    if config.mode == "last":
        long = [i for i, s in enumerate(sequences) if len(s) > config.max_length]
        if long:
            raise ValueError(
                f"prompts at positions {long[:10]} are longer than max_length={config.max_length}; shorten the "
                "texts (encode_suffix's max_text_tokens) rather than cut the prompt"
            )
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"hooks contain duplicates: {hooks}")
    _stop_layer(model, hooks)  # validates the names before anything is built
    data_sha = sequences_sha256(sequences)
    if starts is not None and any(starts):
        data_sha = config_key(data_sha, starts, length=64)  # the kept positions are part of the data
    key = activation_key(model_name, config, data_sha, description=description, preset=preset)
    folder = cache_dir("activations") / _folder_name(model_name, config.mode, key)
    meta: dict[str, Any] = {
        "code_version": CODE_VERSION,
        "model": model_name,
        "hooks": list(hooks),
        "mode": config.mode,
        "description": description,
        "preset": preset,
        "key": key,
        "data_sha256": data_sha,
        "n_sequences": len(sequences),
        "d_model": model.cfg.d_model,
        "storage_dtype": config.storage_dtype,
        "config": config.result_fields(),
    }
    entry = cached_entry(
        folder, lambda tmp: _build(tmp, model, sequences, config, hooks, meta, starts), meta=meta
    )
    store = ActivationStore(entry)
    if store.meta["data_sha256"] != data_sha or tuple(store.hooks) != hooks:
        raise ActivationCacheError(
            f"{entry} holds other data or hooks than requested (a key collision); delete it"
        )
    return store


# ------------------------------------------------------------------------------------------- corpus helper


def uses_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True if the tokenizer starts every encoded text with BOS (Gemma does; SmolLM2 does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def token_chunks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], length: int, *, bos: bool | None = None
) -> list[list[int]]:
    """Documents cut into sequences of at most `length` tokens, each opened with BOS if the model uses one.

    Each document is tokenised whole (no special tokens) and cut into consecutive pieces; the last piece of a
    document may be shorter. `bos=None` follows the tokenizer (`uses_bos`).
    """
    bos = uses_bos(tokenizer) if bos is None else bos
    prefix = [tokenizer.bos_token_id] if bos else []
    step = length - len(prefix)
    if step < 1:
        raise ValueError(f"length {length} leaves no room for text")
    chunks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        chunks.extend(prefix + ids[i : i + step] for i in range(0, len(ids), step))
    return chunks
