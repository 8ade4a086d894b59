"""Tests for emolib.sae.activations on tiny random-weight models: extraction against `run_with_cache`, padding and
batching, dropped first positions and planted outliers, cache keys, corrupt shards, bounded streaming, shuffled
batches, and bfloat16 storage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import gemma_like_config, llama_like_config, make_tiny_model
from transformer_lens import HookedTransformer, HookedTransformerConfig

from emolib.lm.prompts import build_prompt, encode_prefix, encode_suffix
from emolib.sae import activations
from emolib.sae.activations import (
    BEYOND_MAX_LENGTH,
    FIRST_POSITIONS,
    OUTLIERS,
    SHARED_PREFIX,
    ActivationStore,
    ExtractionConfig,
    activation_key,
    extract_activations,
    last_token_outliers,
    masked_mean_codes,
    norm_outliers,
    resid_hooks,
    sequences_sha256,
    token_chunks,
)

#: Residual stream and other hook points, out of layer order, with one that is not `[batch, pos, d_model]`.
HOOKS = (
    "blocks.1.hook_resid_post",
    "blocks.0.hook_mlp_out",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_pre",
    "blocks.0.mlp.hook_post",
    "hook_embed",
)

DOCUMENTS = [
    "The weather today is mild and the shops open at ten.",
    "I waited for hours and nobody called me back.",
    "The spider crawled across my pillow in the dark.",
    "ok",
    "When the results came in I could not stop smiling, and the cake was wonderful and everyone sang.",
]

TEXTS = [
    "I lost my keys.",
    "ok",
    "The cake was wonderful and everyone sang and danced all night long until the sun came up.",
    "The spider crawled across my pillow in the dark.",
    "Our old dog died last winter.",
]

FAST = {"progress": False}


def corpus(tokenizer, length: int = 9) -> list[list[int]]:
    """Chunks of different lengths (the last piece of each document is shorter), each opened by BOS."""
    return token_chunks(tokenizer, DOCUMENTS, length)


def prompts(tokenizer, chat: bool = False) -> list[list[int]]:
    """Full prompts as the classifier builds them: shared prefix + per-text suffix, of different lengths."""
    parts = build_prompt(tokenizer, ("joy", "fear", "anger"), chat=chat)
    prefix = encode_prefix(tokenizer, parts)
    return [prefix + encode_suffix(tokenizer, parts, text, 64)[0] for text in TEXTS]


def extract(model, sequences, name="tiny", description="test data", preset="test", starts=None, **config):
    return extract_activations(
        model,
        name,
        sequences,
        ExtractionConfig(**{**FAST, **config}),
        description=description,
        preset=preset,
        starts=starts,
    )


def reference(model, sequences, hooks, select):
    """`run_with_cache` on each sequence alone (no padding, no batching): `{hook: rows}` from `select(seq)`."""
    rows = {h: [] for h in hooks}
    for ids in sequences:
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=list(hooks))
        for h in hooks:
            rows[h].append(cache[h][0].flatten(1)[select(ids)])
    return {h: torch.cat(r) for h, r in rows.items()}


# ---------------------------------------------------------------------------------------- exact extraction


@pytest.mark.parametrize("batch_size", [1, 3])
def test_all_mode_equals_run_with_cache(any_tiny_model, tiny_tokenizer, tmp_cache, batch_size):
    sequences = corpus(tiny_tokenizer)
    assert len({len(s) for s in sequences}) > 1  # padding is exercised
    store = extract(any_tiny_model, sequences, hooks=HOOKS, batch_size=batch_size)
    expected = reference(any_tiny_model, sequences, HOOKS, lambda ids: slice(1, None))
    for hook in HOOKS:
        torch.testing.assert_close(store.load(hook), expected[hook], rtol=1e-5, atol=1e-5)
    assert store.dims["blocks.0.mlp.hook_post"] == any_tiny_model.cfg.d_mlp
    assert store.d_model == any_tiny_model.cfg.d_model
    assert store.sequence_index().tolist() == [i for i, s in enumerate(sequences) for _ in s[1:]]
    assert store.positions().tolist() == [p for s in sequences for p in range(1, len(s))]
    assert store.token_ids().tolist() == [t for s in sequences for t in s[1:]]
    assert store.n_rows == sum(len(s) - 1 for s in sequences)
    assert store.meta["dropped"] == {
        FIRST_POSITIONS: len(sequences),
        SHARED_PREFIX: 0,
        OUTLIERS: 0,
        BEYOND_MAX_LENGTH: 0,
    }


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_last_mode_equals_run_with_cache(any_tiny_model, tiny_tokenizer, tmp_cache, batch_size, chat):
    sequences = prompts(tiny_tokenizer, chat)
    assert len({len(s) for s in sequences}) == len(sequences)
    store = extract(any_tiny_model, sequences, hooks=HOOKS, mode="last", batch_size=batch_size)
    expected = reference(any_tiny_model, sequences, HOOKS, lambda ids: slice(len(ids) - 1, None))
    for hook in HOOKS:
        torch.testing.assert_close(store.load(hook), expected[hook], rtol=1e-5, atol=1e-5)
    # rows are the prompts, in input order
    assert store.sequence_index().tolist() == list(range(len(sequences)))
    assert store.positions().tolist() == [len(s) - 1 for s in sequences]
    assert store.token_ids().tolist() == [s[-1] for s in sequences]
    assert store.meta["dropped"] == {}


def test_batched_equals_one_by_one(any_tiny_model, tiny_tokenizer, tmp_cache):
    """Batch sizes 1 and 4 give the same rows (different presets: batch size alone would reuse the entry)."""
    for mode, sequences in [("all", corpus(tiny_tokenizer)), ("last", prompts(tiny_tokenizer))]:
        a = extract(any_tiny_model, sequences, hooks=HOOKS[:2], mode=mode, batch_size=1, preset="bs1")
        b = extract(any_tiny_model, sequences, hooks=HOOKS[:2], mode=mode, batch_size=4, preset="bs4")
        for hook in HOOKS[:2]:
            torch.testing.assert_close(a.load(hook), b.load(hook), rtol=1e-5, atol=1e-5)
        assert torch.equal(a.sequence_index(), b.sequence_index())


def test_last_mode_layouts_fall_back_to_equal_lengths():
    """Without a common prefix, or with padding wider than a local-attention window, prompts of equal length run
    together unpadded; otherwise `[common][pad...][rest]` with the last token in the last column."""
    seqs = [[5, 6, 7], [5, 6, 8, 9, 10], [5, 6]]
    [(members, tokens, mask, shared)] = activations._last_mode_layouts(seqs, 0, None)
    assert members == [0, 1, 2] and shared == 1  # the first column runs once, into a key-value cache
    # the common prefix stops one short of the shortest prompt, so every prompt's last token is in the last column
    assert tokens.tolist() == [[5, 0, 0, 6, 7], [5, 6, 8, 9, 10], [5, 0, 0, 0, 6]]
    assert mask.tolist() == [[1, 0, 0, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1]]
    groups = list(activations._last_mode_layouts(seqs, 0, 4))  # window 4 < width 5
    assert [g[0] for g in groups] == [[2], [0], [1]] and all(bool(g[2].all()) and g[3] == 0 for g in groups)
    groups = list(activations._last_mode_layouts([[1, 2], [3, 4, 5], [6, 7]], 0, None))  # no common prefix
    assert [g[0] for g in groups] == [[0, 2], [1]]


def test_last_mode_exact_with_small_local_window(tiny_tokenizer, tmp_cache):
    model = make_tiny_model(gemma_like_config(len(tiny_tokenizer), window_size=24), tiny_tokenizer)
    sequences = prompts(tiny_tokenizer)
    assert max(len(s) for s in sequences) > 24  # padding would reach the window: the fallback runs
    hooks = resid_hooks(2)
    store = extract(model, sequences, hooks=hooks, mode="last", batch_size=5)
    expected = reference(model, sequences, hooks, lambda ids: slice(len(ids) - 1, None))
    for hook in hooks:
        torch.testing.assert_close(store.load(hook), expected[hook], rtol=1e-5, atol=1e-5)


def test_stop_layer_and_hooks_after_the_last_block(tiny_model, tiny_tokenizer, tmp_cache):
    assert activations._stop_layer(tiny_model, ["blocks.0.hook_resid_post", "hook_embed"]) == 1
    assert activations._stop_layer(tiny_model, ["hook_embed"]) == 0
    assert activations._stop_layer(tiny_model, resid_hooks(2)) == 2
    assert activations._stop_layer(tiny_model, ["ln_final.hook_normalized"]) is None
    sequences = corpus(tiny_tokenizer)
    hooks = ("ln_final.hook_normalized", "blocks.0.hook_resid_post")
    store = extract(tiny_model, sequences, hooks=hooks, batch_size=3)
    expected = reference(tiny_model, sequences, hooks, lambda ids: slice(1, None))
    for hook in hooks:
        torch.testing.assert_close(store.load(hook), expected[hook], rtol=1e-5, atol=1e-5)


def test_forward_stops_after_the_deepest_hook(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    """Nothing after the deepest requested hook runs: the last block's hooks never fire."""
    fired = []
    hook_point = tiny_model.blocks[1].hook_resid_pre
    original = hook_point.forward
    monkeypatch.setattr(hook_point, "forward", lambda x: fired.append(1) or original(x))
    extract(tiny_model, corpus(tiny_tokenizer), hooks=("blocks.0.hook_resid_post",))
    assert fired == []
    extract(tiny_model, corpus(tiny_tokenizer), hooks=("blocks.1.hook_resid_post",))
    assert fired  # the patched hook point does run when needed


def test_left_padding_tokenizer_does_not_mask_real_tokens(any_tiny_model, tmp_cache, monkeypatch):
    """Gemma's tokenizer pads on the left, and TransformerLens then guesses a mask from pad ids: a real token
    equal to the pad id at the start would be masked. Extraction never lets it guess."""
    pad = any_tiny_model.tokenizer.pad_token_id
    sequences = [[pad, 40, 41, 42, 43], [pad, 50, 51, 52, 53], [pad, 60, 61]]
    hooks = resid_hooks(2)
    expected = reference(any_tiny_model, sequences, hooks, lambda ids: slice(1, None))
    monkeypatch.setattr(any_tiny_model.tokenizer, "padding_side", "left")
    for batch_size in (2, 3):  # an unpadded batch first, then a padded one
        store = extract(
            any_tiny_model, sequences, hooks=hooks, batch_size=batch_size, preset=f"bs{batch_size}"
        )
        for hook in hooks:
            torch.testing.assert_close(store.load(hook), expected[hook], rtol=1e-5, atol=1e-5)


def test_resid_hooks():
    assert resid_hooks(3) == (
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post",
    )
    assert resid_hooks(1, "hook_resid_pre") == ("blocks.0.hook_resid_pre",)


def test_default_hooks_are_every_resid_post(tiny_model, tiny_tokenizer, tmp_cache):
    store = extract(tiny_model, corpus(tiny_tokenizer))
    assert store.hooks == resid_hooks(tiny_model.cfg.n_layers)


# --------------------------------------------------------------------------------------- dropped tokens


def planted_model(tokenizer, token: int):
    """A tiny model whose embedding of `token` is 1000x larger: a planted attention-sink-like outlier whose
    residual norm dwarfs every other token's at every residual hook (not at `hook_mlp_out`: the norm before the
    MLP rescales it)."""
    model = make_tiny_model(llama_like_config(len(tokenizer)), tokenizer)
    with torch.no_grad():
        model.embed.W_E[token] *= 1000
    return model


def test_first_position_and_planted_outliers_are_dropped_at_every_hook(tiny_tokenizer, tmp_cache):
    sequences = corpus(tiny_tokenizer)
    counts: dict[int, int] = {}
    for ids in sequences:
        for t in ids[1:]:
            counts[t] = counts.get(t, 0) + 1
    token = max(counts, key=counts.get)  # the most frequent non-first token
    planted = [(i, p) for i, s in enumerate(sequences) for p in range(1, len(s)) if s[p] == token]
    assert len(planted) >= 2
    model = planted_model(tiny_tokenizer, token)
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out")
    store = extract(model, sequences, hooks=hooks, outlier_factor=20.0, batch_size=2)
    kept = [(i, p) for i, s in enumerate(sequences) for p in range(1, len(s)) if (i, p) not in planted]
    assert list(zip(store.sequence_index().tolist(), store.positions().tolist(), strict=True)) == kept
    assert token not in store.token_ids().tolist()
    assert store.meta["dropped"] == {
        FIRST_POSITIONS: len(sequences),
        SHARED_PREFIX: 0,
        OUTLIERS: len(planted),
        BEYOND_MAX_LENGTH: 0,
    }
    by_hook = store.meta["outliers_by_hook"]
    assert by_hook["blocks.0.hook_resid_post"] == by_hook["blocks.1.hook_resid_post"] == len(planted)
    # dropped at every hook, the mlp output included, and the remaining rows are the right ones
    expected = reference(model, sequences, hooks, lambda ids: slice(None))
    for hook in hooks:
        rows = torch.stack([expected[hook][sum(len(s) for s in sequences[:i]) + p] for i, p in kept])
        torch.testing.assert_close(store.load(hook), rows, rtol=1e-5, atol=1e-4)


def test_skip_first_and_max_length(tiny_model, tiny_tokenizer, tmp_cache):
    sequences = corpus(tiny_tokenizer, length=12)
    store = extract(tiny_model, sequences, hooks=resid_hooks(2), skip_first=0, max_length=5)
    assert store.positions().tolist() == [p for s in sequences for p in range(min(len(s), 5))]
    assert store.meta["dropped"][FIRST_POSITIONS] == 0
    assert store.meta["dropped"][BEYOND_MAX_LENGTH] == sum(max(0, len(s) - 5) for s in sequences)
    store = extract(tiny_model, sequences, hooks=resid_hooks(2), skip_first=3)
    assert min(store.positions().tolist()) == 3
    assert store.meta["dropped"][FIRST_POSITIONS] == sum(min(3, len(s)) for s in sequences)


def test_nothing_left_gives_an_empty_store(tiny_model, tmp_cache):
    store = extract(tiny_model, [[1], [1, 5]], hooks=resid_hooks(2), skip_first=2)
    assert store.n_rows == 0 and store.n_shards == 0
    assert store.load("blocks.0.hook_resid_post").shape == (0, tiny_model.cfg.d_model)
    assert list(store.iter_batches(4, seed=0)) == []
    assert store.meta["dropped"][FIRST_POSITIONS] == 3


def test_outlier_median_is_per_sequence(tiny_tokenizer, tmp_cache):
    """The threshold does not depend on which sequences share a batch: batch sizes 1 and 4 drop the same tokens."""
    sequences = corpus(tiny_tokenizer)
    token = sequences[0][2]
    model = planted_model(tiny_tokenizer, token)
    a = extract(model, sequences, hooks=resid_hooks(2), outlier_factor=5.0, batch_size=1)
    b = extract(model, sequences, hooks=resid_hooks(2), outlier_factor=5.0, batch_size=4, preset="other")
    assert a.meta["dropped"] == b.meta["dropped"] and a.meta["dropped"][OUTLIERS] > 0
    assert torch.equal(a.positions(), b.positions())


# ------------------------------------------------------------------------------------------ cache keys


def test_cache_key_changes_with_every_result_relevant_part():
    config = ExtractionConfig(hooks=resid_hooks(2), max_length=64)
    data = sequences_sha256([[1, 2, 3], [1, 4]])
    base = activation_key("m", config, data, description="d", preset="p")
    variants = [
        activation_key("other", config, data, description="d", preset="p"),
        activation_key(
            "m", dataclasses.replace(config, hooks=resid_hooks(3)), data, description="d", preset="p"
        ),
        activation_key(
            "m", dataclasses.replace(config, hooks=resid_hooks(2)[::-1]), data, description="d", preset="p"
        ),
        activation_key("m", config, sequences_sha256([[1, 2, 3], [1, 5]]), description="d", preset="p"),
        activation_key("m", config, data, description="other", preset="p"),
        activation_key("m", config, data, description="d", preset="other"),
        activation_key(
            "m", dataclasses.replace(config, storage_dtype="bfloat16"), data, description="d", preset="p"
        ),
        activation_key("m", dataclasses.replace(config, mode="last"), data, description="d", preset="p"),
        activation_key(
            "m", dataclasses.replace(config, outlier_factor=10.0), data, description="d", preset="p"
        ),
        activation_key("m", dataclasses.replace(config, skip_first=0), data, description="d", preset="p"),
        activation_key("m", dataclasses.replace(config, max_length=32), data, description="d", preset="p"),
        activation_key("m", dataclasses.replace(config, shard_rows=10), data, description="d", preset="p"),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # neither batch size nor progress bars change results
    same = dataclasses.replace(config, batch_size=1, progress=False)
    assert activation_key("m", same, data, description="d", preset="p") == base


def test_cache_key_changes_with_code_version(monkeypatch):
    config = ExtractionConfig(hooks=resid_hooks(2))
    data = sequences_sha256([[1, 2]])
    before = activation_key("m", config, data, description="d", preset="p")
    monkeypatch.setattr(activations, "CODE_VERSION", "test-next")
    assert activation_key("m", config, data, description="d", preset="p") != before


def test_sequences_sha256_sees_boundaries_and_order():
    assert sequences_sha256([[1, 2], [3]]) != sequences_sha256([[1], [2, 3]])
    assert sequences_sha256([[1, 2], [3]]) != sequences_sha256([[3], [1, 2]])
    assert sequences_sha256([[1, 2], [3]]) == sequences_sha256([(1, 2), torch.tensor([3]).tolist()])


def test_last_mode_key_ignores_drop_settings():
    data = sequences_sha256([[1, 2]])
    a = ExtractionConfig(hooks=("x",), mode="last", max_length=8)
    b = dataclasses.replace(a, skip_first=0, outlier_factor=3.0)
    assert activation_key("m", a, data, description="", preset="") == activation_key(
        "m", b, data, description="", preset=""
    )


# ------------------------------------------------------------------------------------ cache entries on disk


def count_builds(monkeypatch) -> list[int]:
    builds: list[int] = []
    original = activations._build

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(activations, "_build", counting)
    return builds


def test_cache_is_reused_across_batch_sizes(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch):
    builds = count_builds(monkeypatch)
    first = extract(tiny_model, corpus(tiny_tokenizer), hooks=resid_hooks(2), batch_size=2)
    again = extract(tiny_model, corpus(tiny_tokenizer), hooks=resid_hooks(2), batch_size=5)
    assert len(builds) == 1 and first.folder == again.folder
    extract(tiny_model, corpus(tiny_tokenizer), hooks=resid_hooks(2), description="other")
    assert len(builds) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_detected_and_rebuilt(tiny_model, tiny_tokenizer, tmp_cache, monkeypatch, damage):
    builds = count_builds(monkeypatch)
    sequences = corpus(tiny_tokenizer)
    store = extract(tiny_model, sequences, hooks=resid_hooks(2), shard_rows=8)
    good = store.load_all()
    shard = store.folder / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(raw[: len(raw) // 2])
    else:
        raw[-5] ^= 0xFF  # inside the activation data: the file still parses, only the checksum tells
        shard.write_bytes(raw)
    rebuilt = extract(tiny_model, sequences, hooks=resid_hooks(2), shard_rows=8)
    assert len(builds) == 2
    for hook, rows in rebuilt.load_all().items():
        assert torch.equal(rows, good[hook])
    extract(tiny_model, sequences, hooks=resid_hooks(2), shard_rows=8)
    assert len(builds) == 2  # the rebuilt entry verifies


def test_store_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(activations.ActivationCacheError, match="no manifest"):
        ActivationStore(tmp_path)


def test_streaming_writes_shards_and_buffers_at_most_shard_rows(
    any_tiny_model, tiny_tokenizer, tmp_cache, monkeypatch
):
    """Instrumented writer: after every call the buffer holds at most `shard_rows` rows."""
    buffered: list[int] = []

    class Recording(activations._ShardWriter):
        def append(self, data, index):
            super().append(data, index)
            buffered.append(self.n)

        def place(self, slots, data, index):
            super().place(slots, data, index)
            buffered.append(self.n)

        def _ensure_buffers(self, data):
            super()._ensure_buffers(data)
            assert all(len(buffer) == self.shard_rows for buffer in self.buffers.values())

    monkeypatch.setattr(activations, "_ShardWriter", Recording)
    sequences = corpus(tiny_tokenizer) * 3
    hooks = resid_hooks(2)
    full = extract(any_tiny_model, sequences, hooks=hooks, shard_rows=100_000, batch_size=4)
    assert full.n_shards == 1
    buffered.clear()
    store = extract(any_tiny_model, sequences, hooks=hooks, shard_rows=7, batch_size=4)
    assert store.n_shards == -(-store.n_rows // 7) > 5
    assert buffered and max(buffered) <= 7 and store.meta["max_buffered_rows"] == 7
    shard_files = sorted(p.name for p in store.folder.glob("shard-*.safetensors"))
    assert shard_files == [f"shard-{i:05d}.safetensors" for i in range(store.n_shards)]
    assert [s["rows"] for s in store.meta["shards"]][:-1] == [7] * (store.n_shards - 1)
    for hook in hooks:  # the same rows whatever the sharding
        assert torch.equal(store.load(hook), full.load(hook))
    # last mode: one window of prompts per shard
    buffered.clear()
    last = extract(
        any_tiny_model, prompts(tiny_tokenizer) * 2, hooks=hooks, mode="last", shard_rows=3, batch_size=2
    )
    assert last.n_shards == 4 and max(buffered) <= 3
    assert last.sequence_index().tolist() == list(range(10))


# ----------------------------------------------------------------------------------------- batches


@pytest.fixture
def sharded_store(tiny_model, tiny_tokenizer, tmp_cache) -> ActivationStore:
    store = extract(tiny_model, corpus(tiny_tokenizer) * 2, hooks=resid_hooks(2), shard_rows=9)
    assert store.n_shards >= 8
    return store


def flatten_rows(batches) -> list[int]:
    return [r for rows in batches for r in rows.tolist()]


def test_iter_batches_visits_every_row_once_per_epoch(sharded_store):
    n = sharded_store.n_rows
    rows = flatten_rows(sharded_store.iter_row_indices(16, seed=3, epochs=1, buffer_shards=2))
    assert sorted(rows) == list(range(n))
    three = flatten_rows(sharded_store.iter_row_indices(16, seed=3, epochs=3, buffer_shards=2))
    assert len(three) == 3 * n
    for epoch in range(3):
        assert sorted(three[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert three[:n] == rows  # epoch 0 does not depend on how many epochs follow
    sizes = [len(b) for b in sharded_store.iter_row_indices(16, seed=3, epochs=3, buffer_shards=2)]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and sizes[-1] == 3 * n - 16 * (len(sizes) - 1)


def test_iter_batches_is_shuffled_deterministically(sharded_store):
    order = flatten_rows(sharded_store.iter_row_indices(8, seed=0))
    assert order == flatten_rows(sharded_store.iter_row_indices(8, seed=0))
    assert order != flatten_rows(sharded_store.iter_row_indices(8, seed=1))
    assert order != sorted(order)
    # rows cross shard boundaries within a batch (a buffer holds several shards)
    first = next(sharded_store.iter_row_indices(8, seed=0, buffer_shards=4))
    assert len({int(r) // 9 for r in first}) > 1


def test_iter_batches_rows_are_aligned_across_hooks(sharded_store):
    full = sharded_store.load_all()
    hooks = sharded_store.hooks
    pairs = zip(
        sharded_store.iter_row_indices(10, seed=5, epochs=2),
        sharded_store.iter_batches(10, seed=5, epochs=2),
        strict=True,
    )
    for rows, batch in pairs:
        assert set(batch) == set(hooks)
        for hook in hooks:
            assert batch[hook].dtype == torch.float32
            assert torch.equal(batch[hook], full[hook][rows])
    subset = next(sharded_store.iter_batches(10, seed=5, hooks=hooks[:1], dtype=torch.float64))
    assert list(subset) == [hooks[0]] and subset[hooks[0]].dtype == torch.float64
    with pytest.raises(KeyError, match="not in this store"):
        next(sharded_store.iter_batches(10, seed=5, hooks=["blocks.7.hook_resid_post"]))


def test_iter_batches_drop_last(sharded_store):
    sizes = [len(next(iter(b.values()))) for b in sharded_store.iter_batches(16, seed=0, drop_last=True)]
    assert sizes == [16] * (sharded_store.n_rows // 16)


def test_endless_batches_cycle_with_full_batches(sharded_store):
    n = sharded_store.n_rows
    stream = sharded_store.endless_batches(16, seed=2)
    batches = [next(stream) for _ in range(3 * n // 16 + 2)]  # more than three epochs
    assert all(len(b[h]) == 16 for b in batches for h in b)
    expected_rows = flatten_rows(sharded_store.iter_row_indices(16, seed=2, epochs=4))
    full = sharded_store.load_all()
    hook = sharded_store.hooks[0]
    stacked = torch.cat([b[hook] for b in batches])
    assert torch.equal(stacked, full[hook][expected_rows[: len(stacked)]])


# -------------------------------------------------------------------------------------------- storage


def test_bfloat16_storage_round_trips_within_precision(tiny_gemma, tiny_tokenizer, tmp_cache):
    sequences = corpus(tiny_tokenizer)
    hooks = resid_hooks(2)
    exact = extract(tiny_gemma, sequences, hooks=hooks)
    half = extract(tiny_gemma, sequences, hooks=hooks, storage_dtype="bfloat16")
    assert half.storage_dtype == torch.bfloat16 and half.meta["storage_dtype"] == "bfloat16"
    for hook in hooks:
        a, b = exact.load(hook), half.load(hook)
        assert b.dtype == torch.float32
        assert torch.equal(b, a.to(torch.bfloat16).float())  # exactly the bf16 rounding
        assert ((b - a).abs() <= a.abs() * 2**-8).all()  # bf16 keeps 8 significant bits
    size = lambda store: sum(p.stat().st_size for p in store.folder.glob("shard-*"))  # noqa: E731
    assert size(half) < 0.7 * size(exact)


def test_float16_storage_is_refused():
    with pytest.raises(ValueError, match="overflow"):
        ExtractionConfig(storage_dtype="float16")


# ------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_named_errors(tiny_model, tiny_tokenizer, tmp_cache):
    sequences = corpus(tiny_tokenizer)
    with pytest.raises(ValueError, match="not a hook point"):
        extract(tiny_model, sequences, hooks=("blocks.9.hook_resid_post",))
    with pytest.raises(ValueError, match=r"not \[batch, pos"):
        extract(tiny_model, sequences, hooks=("blocks.0.attn.hook_pattern",))
    with pytest.raises(ValueError, match="empty"):
        extract(tiny_model, [[1, 2], []], hooks=resid_hooks(2))
    with pytest.raises(ValueError, match="longer than max_length"):
        extract(tiny_model, prompts(tiny_tokenizer), hooks=resid_hooks(2), mode="last", max_length=10)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        extract(tiny_model, sequences, hooks=resid_hooks(2), max_length=10_000)
    with pytest.raises(ValueError, match="model_name is required"):
        extract(tiny_model, sequences, name=None)
    with pytest.raises(ValueError, match="mode"):
        ExtractionConfig(mode="first")
    noop = [("blocks.0.hook_resid_post", lambda act, hook: act)]
    with tiny_model.hooks(fwd_hooks=noop), pytest.raises(ValueError, match="hooks or SAEs attached"):
        extract(tiny_model, sequences, hooks=resid_hooks(2))


def test_loaded_model_gives_its_name(tiny_model, tiny_tokenizer, tmp_cache):
    from conftest import tiny_loaded

    lm = tiny_loaded(tiny_model, tiny_tokenizer, name="tiny-llama", chat=False)
    store = extract_activations(
        lm,
        None,
        corpus(tiny_tokenizer),
        ExtractionConfig(hooks=resid_hooks(2), **FAST),
        description="d",
        preset="p",
    )
    assert store.meta["model"] == "tiny-llama" and store.folder.name.startswith("tiny-llama-all-")
    assert store.key == store.meta["key"] and store.key in store.folder.name


# ---------------------------------------------------------------------------------------------- corpus


def test_token_chunks(tiny_tokenizer):
    chunks = token_chunks(tiny_tokenizer, DOCUMENTS, 9)
    bos = tiny_tokenizer.bos_token_id
    assert all(c[0] == bos and 2 <= len(c) <= 9 for c in chunks)
    joined = [t for c in chunks for t in c[1:]]
    assert joined == [t for d in DOCUMENTS for t in tiny_tokenizer(d, add_special_tokens=False).input_ids]
    plain = token_chunks(tiny_tokenizer, DOCUMENTS, 9, bos=False)
    assert all(len(c) <= 9 for c in plain) and plain[0][0] != bos
    with pytest.raises(ValueError, match="no room"):
        token_chunks(tiny_tokenizer, DOCUMENTS, 1)


@pytest.mark.parametrize("window", [None, 24])
def test_a_dropped_shared_prefix_runs_once_per_batch_and_changes_no_row(
    any_tiny_model, tiny_tokenizer, tmp_cache, monkeypatch, window
):
    """Prompts whose instruction prefix is dropped run it once per batch, from a key-value cache; every kept row
    equals `run_with_cache` of the whole prompt alone (also with a local-attention window shorter than a prompt)."""
    model = any_tiny_model
    if window is not None:
        model = make_tiny_model(gemma_like_config(len(tiny_tokenizer), window_size=window), tiny_tokenizer)
    sequences = prompts(tiny_tokenizer)
    parts = build_prompt(tiny_tokenizer, ("joy", "fear", "anger"), chat=False)
    prefix = len(encode_prefix(tiny_tokenizer, parts))
    assert prefix > 2 and (window is None or max(map(len, sequences)) > window)
    starts = [0] + [prefix] * (len(sequences) - 1)  # the corpus layout: the first prompt keeps the prefix
    widths: list[int] = []
    real_forward = activations._forward
    monkeypatch.setattr(
        activations,
        "_forward",
        lambda model, tokens, *args: (widths.append(tokens.shape[1]), real_forward(model, tokens, *args))[1],
    )
    store = extract(model, sequences, hooks=HOOKS, batch_size=3, starts=starts)
    batches = [sequences[i : i + 3] for i in range(0, len(sequences), 3)]
    # the first batch holds the prompt that keeps its prefix: it runs whole; the others skip the prefix
    assert widths == [max(map(len, batches[0]))] + [max(map(len, b)) - prefix for b in batches[1:]]
    expected = reference(model, sequences, HOOKS, lambda ids: slice(None))
    offsets = [0, *torch.tensor([len(s) for s in sequences]).cumsum(0).tolist()]
    kept = [offsets[i] + p for i, s in enumerate(sequences) for p in range(max(1, starts[i]), len(s))]
    for hook in HOOKS:
        torch.testing.assert_close(store.load(hook), expected[hook][kept], rtol=1e-5, atol=1e-5)
    assert store.positions().tolist() == [
        p for i, s in enumerate(sequences) for p in range(max(1, starts[i]), len(s))
    ]


@pytest.mark.parametrize("hook", ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_post"])
def test_starts_with_embedding_hooks_only_need_no_prefix_cache(tmp_cache, hook):
    """With hooks before the first block no block fills a prefix cache: the batch runs whole, rows exact."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=4, n_ctx=64, d_vocab=50, act_fn="gelu", seed=0
    )
    model = HookedTransformer(cfg)  # learned positional embeddings: a wrong offset would show
    sequences = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8, 9], [1, 2, 3, 4, 10, 11, 12, 13]]
    store = extract(model, sequences, hooks=(hook,), starts=[4, 4, 4])
    expected = reference(model, sequences, (hook,), lambda ids: slice(4, None))
    torch.testing.assert_close(store.load(hook), expected[hook], rtol=1e-5, atol=1e-5)


def test_starts_keep_a_shared_prefix_once_and_enter_the_key(tiny_model):
    """Per-sequence starts drop the positions before them (counted), keep later tokens exact, change the key."""
    sequences = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12], [5, 6, 7, 13, 14, 15, 16]]
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    starts = [0, 3, 3]  # the first prompt keeps its prefix; the others only their own tokens
    full = extract(tiny_model, sequences, hooks=hooks)
    cut = extract(tiny_model, sequences, hooks=hooks, starts=starts)
    kept = [(i, p) for i, s in enumerate(sequences) for p in range(max(1, starts[i]), len(s))]
    assert list(zip(cut.sequence_index().tolist(), cut.positions().tolist(), strict=True)) == kept
    assert cut.meta["dropped"][FIRST_POSITIONS] == len(sequences)
    assert cut.meta["dropped"][SHARED_PREFIX] == 2 + 2
    assert cut.key != full.key
    rows = {
        (i, p): r
        for r, (i, p) in enumerate(
            zip(full.sequence_index().tolist(), full.positions().tolist(), strict=True)
        )
    }
    for hook in hooks:
        expected = full.load(hook)[[rows[k] for k in kept]]
        torch.testing.assert_close(cut.load(hook), expected)
    with pytest.raises(ValueError, match="one non-negative position per sequence"):
        extract(tiny_model, sequences, hooks=hooks, starts=[0, 1])


def test_last_token_outliers_flag_a_planted_answer_norm_and_agree_with_the_training_rule(tiny_model):
    prompts = [[5, 9, 13, 2, 7, 7, 30, 4], [11, 3, 8, 6], [8, 8, 21, 17, 6, 12]]
    hooks = list(resid_hooks(tiny_model.cfg.n_layers))
    clean = last_token_outliers(tiny_model, prompts, hooks, factor=5.0, batch_size=2)
    for i, prompt in enumerate(prompts):  # one prompt at a time, no padding: the training rule itself
        _, cache = tiny_model.run_with_cache(torch.tensor([prompt]))
        for j, hook in enumerate(hooks):
            norms = cache[hook].norm(dim=-1)
            measured = torch.arange(len(prompt))[None, :] >= 1
            assert clean[i, j] == bool(norm_outliers(norms, measured, 5.0)[0, -1])
    assert not clean.any()  # a random model's last tokens are ordinary

    def plant(x, hook):  # the second prompt's last token (padded batch position 3) 100x its norm at layer 0
        x[1, 3] *= 100.0
        return x

    with tiny_model.hooks(fwd_hooks=[(hooks[0], plant)]):
        planted = last_token_outliers(tiny_model, prompts, hooks, factor=5.0, batch_size=3)
    assert planted[1, 0] and not planted[0].any() and not planted[2].any()


def test_masked_mean_codes_equal_encoding_each_prompt_alone_then_averaging(any_tiny_model):
    """Batched, right-padded, behind a shared-prefix cache: the same as one prompt at a time, every masked
    position encoded (a nonlinear encoder, so the order encode-then-average matters) and averaged."""
    model = any_tiny_model
    shared = [5, 9, 13]
    rests = [[2, 7, 7, 30, 4], [11, 3], [8, 8, 21, 17, 6, 12]]
    prompts = [shared + r for r in rests]
    masks = [[False] * 3 + [True] * (len(r) - 1) + [False] for r in rests]  # the text, not the answer cue
    hooks = list(resid_hooks(model.cfg.n_layers))
    weights = {
        h: torch.randn(model.cfg.d_model, 6, generator=torch.Generator().manual_seed(i))
        for i, h in enumerate(hooks)
    }
    encoders = {h: (lambda x, w=w: torch.relu(x @ w)) for h, w in weights.items()}
    batched = masked_mean_codes(model, prompts, masks, encoders, shared=len(shared), batch_size=2)
    differs = []
    for i, prompt in enumerate(prompts):
        _, cache = model.run_with_cache(torch.tensor([prompt]))
        chosen = torch.tensor(masks[i])
        for hook in hooks:
            expected = encoders[hook](cache[hook][0, chosen].float()).mean(dim=0)
            np.testing.assert_allclose(batched[hook][i], expected.numpy(), rtol=1e-4, atol=1e-5)
            mean_first = encoders[hook](cache[hook][0, chosen].float().mean(dim=0))
            differs.append(not np.allclose(batched[hook][i], mean_first.numpy(), atol=1e-5))
    assert any(differs)  # averaging the residual first would fail the comparison above
    assert masked_mean_codes(model, prompts, masks, encoders, batch_size=3)[hooks[0]].shape == (3, 6)


def test_masked_mean_codes_name_the_prompt_that_cannot_be_averaged(tiny_model):
    encoders = {"blocks.0.hook_resid_post": lambda x: x}
    prompts = [[5, 9, 2], [5, 9, 4, 4]]
    with pytest.raises(ValueError, match="prompt 1 has no masked position"):
        masked_mean_codes(tiny_model, prompts, [[0, 0, 1], [0, 0, 0, 0]], encoders, shared=2)
    with pytest.raises(ValueError, match="prompt 0 has 3 tokens but its mask 2"):
        masked_mean_codes(tiny_model, prompts, [[0, 1], [0, 0, 1, 1]], encoders)
    with pytest.raises(ValueError, match="prompt 1 does not share the first 2 tokens"):
        masked_mean_codes(tiny_model, [[5, 9, 2], [5, 8, 4]], [[0, 0, 1], [0, 0, 1]], encoders, shared=2)
