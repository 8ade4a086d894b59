"""Tests for emolib.sae.training: planted-feature recovery with sae-lens' synthetic data, SAELens-format save/load (local
and through the pretrained-release path, offline), the trained-SAE cache, known-answer quality metrics on tiny
models, the `start_at_layer` shortcut against full forwards with the SAE spliced in, and errors on bad inputs."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens.util import cosine_similarities
from safetensors import safe_open
from safetensors.torch import save_file
from transformer_lens.utils import lm_cross_entropy_loss

from emolib.sae import loading, quality
from emolib.sae import training as S
from emolib.sae.loading import PRETRAINED, PretrainedSAEs, SAEError, load_saes, save_saes
from emolib.sae.quality import evaluate_saes, missed_goals, quality_dict
from emolib.sae.training import SAETrainingConfig, train_saes, train_saes_cached

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def to_inference(saes):
    """The inference SAEs of training SAEs, through emolib's save and sae-lens' load."""
    with tempfile.TemporaryDirectory(prefix="emolib-saes-") as tmp:
        return load_saes(save_saes(saes, tmp))


def train_sae(batches, config, *, hook, d_in, metadata=None):
    """The reference for `train_saes`: one hook's SAE trained alone with sae-lens' single-SAE `SAETrainer`, from
    the same stream format and the same data-based start."""
    stream = S._checked(S._stream(batches, config), [hook], d_in, config.train_batch_size)
    sae = S.make_training_sae(config, hook=hook, d_in=d_in, metadata=metadata)
    trainer = SAETrainer(cfg=config.trainer_config(), sae=sae, data_provider=iter(()))
    stream = S._start_from_data(stream, {hook: sae}, {hook: trainer.activation_scaler}, config)
    trainer.data_provider = (batch[hook] for batch in stream)
    return trainer.fit()


# ------------------------------------------------------------------------------------------ synthetic data


class PlantedStream:
    """Two "layers" reading the same sparse features through different planted dictionaries (rows aligned);
    a `BatchFactory` that counts how often it is called (i.e. how often SAEs were trained)."""

    def __init__(self, n_features: int = 32, dim: int = 24, p: float = 0.05) -> None:
        self.dim = dim
        self.dicts = {hook: FeatureDictionary(n_features, dim, seed=i + 1) for i, hook in enumerate(HOOKS)}
        self.generator = ActivationGenerator(n_features, firing_probabilities=p, std_firing_magnitudes=0.2)
        self.calls = 0

    def __call__(self, batch_size: int, *, seed: int):
        self.calls += 1
        rng = torch.Generator().manual_seed(seed)
        return self._batches(batch_size, rng)

    @torch.no_grad()
    def _batches(self, batch_size: int, rng: torch.Generator):
        while True:
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=rng)))
                features = self.generator.sample(batch_size)
            yield {hook: dictionary(features) for hook, dictionary in self.dicts.items()}


#: Recovers the planted features in about 2 s on one thread.
PLANTED = SAETrainingConfig(
    d_sae=64,
    k=2,
    lr=3e-3,
    train_batch_size=256,
    total_training_samples=100_000,
    dead_feature_window=20,
    feature_sampling_window=50,
    n_batches_for_norm_estimate=5,
)

#: A handful of steps: enough to exercise the machinery.
TINY = dataclasses.replace(
    PLANTED, d_sae=16, train_batch_size=64, total_training_samples=640, n_batches_for_norm_estimate=2
)


def mean_best_cosine(true: torch.Tensor, learned: torch.Tensor) -> float:
    """For each planted direction, the best cosine with any learned decoder row; averaged."""
    return cosine_similarities(true, learned).max(dim=1).values.mean().item()


def test_multi_sae_training_recovers_planted_features():
    stream = PlantedStream()
    trained = train_saes(stream, PLANTED, hooks=HOOKS, d_in=stream.dim, metadata={"model_name": "synthetic"})
    assert stream.calls == 1
    inference = to_inference(trained)
    for hook in HOOKS:
        planted = stream.dicts[hook].feature_vectors.detach()
        assert mean_best_cosine(planted, inference[hook].W_dec.detach()) >= 0.9, hook
        # the training SAE (before saving as JumpReLU) has the same directions
        assert mean_best_cosine(planted, trained[hook].W_dec.detach()) >= 0.9, hook


def test_single_sae_trainer_matches_the_multi_sae_trainer():
    """Each SAE's init is seeded by its hook and its trainer is independent: training one hook alone with
    `SAETrainer` gives the same SAE as training it next to another hook with `MultiSAETrainer`."""
    both = train_saes(PlantedStream(), TINY, hooks=HOOKS, d_in=24)
    alone = train_sae(PlantedStream(), TINY, hook=HOOKS[1], d_in=24)
    for name, tensor in both[HOOKS[1]].state_dict().items():
        torch.testing.assert_close(alone.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


class OffsetStream(PlantedStream):
    """The planted features on top of a constant offset 20x longer than a typical feature vector, as in Gemma's
    residual stream (whose mean is as long as a typical token's vector)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = {hook: 20 * torch.randn(self.dim, generator=torch.Generator().manual_seed(i)) for i, hook
                       in enumerate(HOOKS)}  # fmt: skip

    def _batches(self, batch_size: int, rng: torch.Generator):
        for batch in super()._batches(batch_size, rng):
            yield {hook: x + self.offset[hook] for hook, x in batch.items()}


def variance_explained(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
    return 1 - ((x - recon) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


def test_decoder_bias_starts_at_the_data_mean():
    """A short run on data with a large mean: starting b_dec at the mean reconstructs the planted features; starting
    from zero, the same steps leave the reconstruction far worse."""
    short = dataclasses.replace(PLANTED, total_training_samples=64 * 300, train_batch_size=64)
    x = next(OffsetStream()(2048, seed=99))
    fve = {}
    for init in (True, False):
        config = dataclasses.replace(short, init_b_dec_to_mean=init)
        sae = to_inference(train_saes(OffsetStream(), config, hooks=HOOKS, d_in=24))[HOOKS[0]]
        fve[init] = variance_explained(sae, x[HOOKS[0]])
    assert fve[True] >= 0.7 and fve[False] <= 0.3, fve


# ---------------------------------------------------------------------------------------------- save/load


def assert_same_saes(a: dict[str, SAE], b: dict[str, SAE], x: torch.Tensor) -> None:
    assert list(a) == list(b)
    for hook in a:
        acts = a[hook].encode(x)
        assert torch.equal(acts, b[hook].encode(x))
        assert torch.equal(a[hook].decode(acts), b[hook].decode(acts))


@pytest.mark.parametrize("architecture", ["batchtopk", "topk"])
def test_save_load_round_trip(tmp_path, architecture):
    stream = PlantedStream()
    config = dataclasses.replace(TINY, architecture=architecture)
    trained = train_saes(stream, config, hooks=HOOKS, d_in=24, metadata={"model_name": "synthetic"})
    folder = save_saes(trained, tmp_path / "saes")
    loaded = load_saes(folder)
    assert list(loaded) == HOOKS
    x = next(stream(128, seed=5))[HOOKS[0]]
    # sae-lens reads the folders directly, and a second save/load changes nothing
    direct = {hook: SAE.load_from_disk(folder / hook) for hook in HOOKS}
    assert_same_saes(loaded, direct, x)
    assert_same_saes(loaded, load_saes(save_saes(loaded, tmp_path / "again")), x)
    assert list(load_saes(folder, hooks=[HOOKS[1]])) == [HOOKS[1]]
    # BatchTopK is saved as JumpReLU with its learned threshold; TopK reconstructs exactly as in training
    expected = {"batchtopk": "jumprelu", "topk": "topk"}[architecture]
    assert loaded[HOOKS[0]].cfg.architecture() == expected
    if architecture == "topk":
        torch.testing.assert_close(loaded[HOOKS[0]](x), trained[HOOKS[0]](x), rtol=1e-5, atol=1e-5)
    meta = json.loads((folder / HOOKS[0] / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == HOOKS[0]
    assert meta["model_name"] == "synthetic"
    assert meta["training_tokens"] == config.total_training_samples
    assert meta["emolib_training_config"] == dataclasses.asdict(config)


def test_trained_saes_are_cached_and_rebuilt_when_corrupt(tmp_cache):
    stream = PlantedStream()
    kwargs = {"hooks": HOOKS, "d_in": 24, "activation_key": "acts-1", "metadata": {"model_name": "synthetic"}}
    first = train_saes_cached(stream, TINY, **kwargs)
    assert stream.calls == 1
    again = train_saes_cached(stream, TINY, **kwargs)
    assert again == first and stream.calls == 1
    x = next(PlantedStream()(64, seed=3))[HOOKS[0]]
    before = {hook: sae.encode(x) for hook, sae in load_saes(first).items()}
    weights = first / HOOKS[0] / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    rebuilt = train_saes_cached(stream, TINY, **kwargs)
    assert rebuilt == first and stream.calls == 2
    for hook, sae in load_saes(rebuilt).items():  # seeded: the same SAEs again
        assert torch.equal(sae.encode(x), before[hook])
    # the key follows the config, the activations and the hooks
    assert train_saes_cached(stream, dataclasses.replace(TINY, lr=1e-3), **kwargs) != first
    assert train_saes_cached(stream, TINY, **{**kwargs, "activation_key": "acts-2"}) != first
    assert train_saes_cached(stream, TINY, **{**kwargs, "hooks": HOOKS[:1]}) != first
    assert stream.calls == 5


def test_training_from_the_activation_cache(tiny_model, tiny_tokenizer, tmp_cache):
    """The real stream: an `emolib.sae.activations.ActivationStore`'s endless batches drive every hook's SAE, and the
    trained SAEs are cached under the store's key."""
    from conftest import CORPUS

    from emolib.sae.activations import ExtractionConfig, extract_activations, token_chunks

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sequences = token_chunks(tiny_tokenizer, CORPUS * 4, 32)
    store = extract_activations(
        tiny_model,
        "tiny",
        sequences,
        ExtractionConfig(hooks=tuple(hooks), progress=False),
        description="t",
        preset="t",
    )
    config = TINY.for_rows(store.n_rows, epochs=2)
    assert config.total_training_samples == store.n_rows * 2 // 64 * 64
    factory = functools.partial(store.endless_batches, hooks=hooks)
    folder = train_saes_cached(factory, config, hooks=hooks, d_in=store.d_model, activation_key=store.key)
    saes = load_saes(folder)
    assert list(saes) == hooks and saes[hooks[0]].cfg.d_in == tiny_model.cfg.d_model
    assert json.loads((folder / loading.INDEX_FILE).read_text())["activation_key"] == store.key
    assert saes[hooks[1]].cfg.metadata.activation_key == store.key
    table = evaluate_saes(
        tiny_model, saes, torch.tensor([s for s in sequences if len(s) == 32][:4]), progress=False
    )
    assert (table.fve > 0).all()


# ----------------------------------------------------------------------------- pretrained releases, offline


def hub_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in a Hugging Face hub cache at `cache` (created, refs/main set)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face hub cache, used offline (conftest sets HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


def test_release_path_loads_from_the_hub_cache(tmp_path, hub_cache, monkeypatch):
    """`SAE.from_pretrained(release, sae_id)` through sae-lens' registry and its default (SAELens-format) loader,
    served by the hub cache: the release is registered in the registry sae-lens itself reads."""
    trained = to_inference(train_saes(PlantedStream(), TINY, hooks=HOOKS, d_in=24))
    repo_id = "emolib-tests/tiny-saes"
    save_saes(trained, hub_snapshot(hub_cache, repo_id) / "resid")
    ids = {hook: f"layer_{i}" for i, hook in enumerate(HOOKS)}
    lookup = PretrainedSAELookup(
        release="emolib-tiny",
        repo_id=repo_id,
        model="tiny",
        conversion_func=None,
        saes_map={ids[hook]: f"resid/{hook}" for hook in HOOKS},
        expected_var_explained={},
        expected_l0={},
        neuronpedia_id={},
        norm_scaling_factor={},
        config_overrides=None,
    )
    monkeypatch.setitem(get_pretrained_saes_directory(), "emolib-tiny", lookup)
    loaded = load_saes(PretrainedSAEs("emolib-tiny", ids))
    x = torch.randn(16, 24)
    assert_same_saes(trained, loaded, x)
    assert list(load_saes(PretrainedSAEs("emolib-tiny", ids), hooks=[HOOKS[1]])) == [HOOKS[1]]
    with pytest.raises(SAEError, match="no SAEs for hooks"):
        load_saes(PretrainedSAEs("emolib-tiny", ids), hooks=["blocks.7.hook_resid_post"])


def gemma_scope_files(snapshot: Path, folder: str, d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
    """A Gemma-Scope-2-shaped SAE (`params.safetensors` + `config.json`) with small random weights."""
    torch.manual_seed(0)
    params = {
        "w_enc": torch.randn(d_in, d_sae),
        "w_dec": torch.randn(d_sae, d_in),
        "b_enc": torch.randn(d_sae),
        "b_dec": torch.randn(d_in),
        "threshold": torch.rand(d_sae),
    }
    (snapshot / folder).mkdir(parents=True)
    save_file(params, snapshot / folder / "params.safetensors")
    (snapshot / folder / "config.json").write_text(
        json.dumps({"architecture": "jump_relu", "model_name": "gemma-3-270m-pt", "hf_hook_point_in": "x"})
    )
    return params


def test_gemma_scope_2_release_offline(hub_cache, monkeypatch):
    """The registered Gemma Scope 2 release through sae-lens' real registry entry and Gemma 3 loader, with the
    weights in the hub cache. That loader reads the weight file's header over HTTP to learn its shapes (bypassing
    the cache), which cannot work offline: the test shows the request, then serves the shapes from the cache."""
    spec = PRETRAINED["gemma-scope-2-270m-res-16k-small"]
    directory = get_pretrained_saes_directory()[spec.release]
    source = spec.source()
    assert set(source.sae_ids.values()) <= set(directory.saes_map), "registry ids exist in sae-lens' yaml"
    hook = "blocks.1.hook_resid_post"
    params = gemma_scope_files(
        hub_snapshot(hub_cache, directory.repo_id),
        directory.saes_map[source.sae_ids[hook]],
        d_in=32,
        d_sae=48,
    )

    requested = []

    def no_network(url, headers, timeout=None):
        requested.append(url)
        raise ConnectionError(f"offline: {url}")

    monkeypatch.setattr(pretrained_sae_loaders.requests, "get", no_network)
    with pytest.raises(ConnectionError):
        load_saes("gemma-scope-2-270m-res-16k-small", hooks=[hook])
    assert requested and "params.safetensors" in requested[0]

    def cached_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        from huggingface_hub import hf_hub_download

        with safe_open(hf_hub_download(repo_id, filename), framework="pt") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118

    monkeypatch.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes", cached_shapes)
    sae = load_saes("gemma-scope-2-270m-res-16k-small", hooks=[hook])[hook]
    assert sae.cfg.metadata.hook_name == hook and sae.cfg.architecture() == "jumprelu"
    x = torch.randn(8, 32)
    pre = x @ params["w_enc"] + params["b_enc"]  # Gemma Scope: no b_dec subtracted from the input
    expected = pre * (pre > params["threshold"])
    torch.testing.assert_close(sae.encode(x), expected.relu())
    torch.testing.assert_close(sae.decode(expected), expected @ params["w_dec"] + params["b_dec"])


# ----------------------------------------------------------------------------------------------- quality


def identity_sae(d: int, hook: str, *, extra_dead: bool = False, extra_dense: bool = False) -> StandardSAE:
    """A ReLU SAE that reconstructs exactly: features relu(x_i) and relu(-x_i) decode to +e_i and -e_i.
    Optionally one feature that never fires and one that always fires (decoding to nothing)."""
    n = 2 * d + extra_dead + extra_dense
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, apply_b_dec_to_input=False))
    sae.cfg.metadata.hook_name = hook
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[:, :d], sae.W_enc[:, d : 2 * d] = eye, -eye
        sae.W_dec[:d], sae.W_dec[d : 2 * d] = eye, -eye
        if extra_dead:
            sae.b_enc[2 * d] = -1e6
        if extra_dense:
            sae.b_enc[n - 1] = 1e6
    return sae.eval()


def zero_sae(d: int, hook: str) -> StandardSAE:
    sae = identity_sae(d, hook)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def random_sae(d: int, hook: str, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=3 * d))
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


TEXTS = [
    "Experience: I lost my keys on the way home. Answer: fear",
    "The cake was wonderful.",
    "When the results came in I could not stop smiling, and the spider crawled across my pillow in the dark.",
    "ok",
]


@pytest.fixture
def batch(tiny_tokenizer):
    """Right-padded tokens with BOS at position 0 only, and their attention mask."""
    encoded = tiny_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (encoded.input_ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert (encoded.input_ids[:, 1:] != tiny_tokenizer.bos_token_id).all()
    assert not encoded.attention_mask.all()
    return encoded.input_ids, encoded.attention_mask


def test_perfect_and_zero_saes_known_answers(any_tiny_model, batch):
    tokens, mask = batch
    d = any_tiny_model.cfg.d_model
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    perfect = evaluate_saes(
        any_tiny_model,
        {h: identity_sae(d, h) for h in hooks},
        tokens,
        attention_mask=mask,
        batch_size=3,
        progress=False,
    )
    for hook in hooks:
        row = perfect.loc[hook]
        assert row.fve == pytest.approx(1.0, abs=1e-9)
        assert row.loss_sae == pytest.approx(row.loss_clean, abs=1e-5)
        assert row.loss_recovered == pytest.approx(1.0, abs=1e-4)
        assert row.loss_zero != pytest.approx(row.loss_clean, abs=1e-3)
        assert row.n_tokens == int(mask[:, 1:].sum())  # every real token but the BOS position
    zero = evaluate_saes(
        any_tiny_model,
        {h: zero_sae(d, h) for h in hooks},
        tokens,
        attention_mask=mask,
        batch_size=3,
        progress=False,
    )
    for hook in hooks:
        row = zero.loc[hook]
        assert row.fve <= 0
        assert row.loss_sae == pytest.approx(row.loss_zero, abs=1e-6)
        assert row.loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert perfect.loss_clean.iloc[0] == pytest.approx(zero.loss_clean.iloc[0], abs=1e-6)


def test_sparsity_known_answers(tiny_model, batch):
    tokens, mask = batch
    d = tiny_model.cfg.d_model
    hook = "blocks.1.hook_resid_post"
    sae = identity_sae(d, hook, extra_dead=True, extra_dense=True)
    table = evaluate_saes(tiny_model, {hook: sae}, tokens, attention_mask=mask, progress=False)
    row = table.loc[hook]
    n = 2 * d + 2
    assert row.l0 == pytest.approx(
        d + 1
    )  # one of relu(x_i), relu(-x_i) per coordinate, plus the always-on one
    assert row.dead_fraction == pytest.approx(1 / n)
    # the coordinate features fire on about half the tokens each: dense at 10%, like the always-on feature
    assert row.dense_fraction == pytest.approx((n - 1) / n)
    assert table.attrs["dense_threshold"] == quality.DENSE_THRESHOLD
    strict = evaluate_saes(
        tiny_model, {hook: sae}, tokens, attention_mask=mask, dense_threshold=0.99, progress=False
    )
    assert strict.loc[hook].dense_fraction == pytest.approx(1 / n)
    as_dict = quality_dict(table)
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert set(as_dict["hooks"][hook]) >= {"fve", "l0", "dead_fraction", "dense_fraction", "loss_recovered"}


def full_forward_losses(model, hook, sae, tokens, mask, keep_first: int = 1) -> tuple[float, float]:
    """Mean next-token loss with the SAE spliced in by a hook on a full forward, and with the residual zeroed;
    the first `keep_first` positions keep their residual."""

    def splice(replacement):
        def hook_fn(resid, hook):
            out = replacement(resid)
            out[:, :keep_first] = resid[:, :keep_first]
            return out

        return hook_fn

    losses = []
    for replacement in (lambda r: sae(r), torch.zeros_like):
        logits = model.run_with_hooks(
            tokens, attention_mask=mask, return_type="logits", fwd_hooks=[(hook, splice(replacement))]
        )
        losses.append(lm_cross_entropy_loss(logits, tokens, mask).item())
    return losses[0], losses[1]


@pytest.mark.parametrize(
    "hook", ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
)
def test_start_at_layer_equals_full_forward_with_the_sae_spliced(any_tiny_model, batch, hook):
    tokens, mask = batch
    sae = random_sae(any_tiny_model.cfg.d_model, hook)
    table = evaluate_saes(
        any_tiny_model, {hook: sae}, tokens, attention_mask=mask, batch_size=2, progress=False
    )
    loss_sae, loss_zero = full_forward_losses(any_tiny_model, hook, sae, tokens, mask)
    assert table.loc[hook].loss_sae == pytest.approx(loss_sae, abs=1e-5)
    assert table.loc[hook].loss_zero == pytest.approx(loss_zero, abs=1e-5)
    # sae-lens' own splicing (the SAE bypassed at the BOS token) agrees
    logits = any_tiny_model.run_with_saes(
        tokens,
        saes=[sae],
        attention_mask=mask,
        exclude_special_tokens=[any_tiny_model.tokenizer.bos_token_id],
    )
    assert not any_tiny_model.acts_to_saes
    assert table.loc[hook].loss_sae == pytest.approx(
        lm_cross_entropy_loss(logits, tokens, mask).item(), abs=1e-5
    )
    clean = any_tiny_model(tokens, attention_mask=mask)
    assert table.loc[hook].loss_clean == pytest.approx(
        lm_cross_entropy_loss(clean, tokens, mask).item(), abs=1e-5
    )


def test_keep_original_mask(tiny_model, batch):
    """An explicit mask keeps those positions' residuals; keeping every position gives the clean loss."""
    tokens, mask = batch
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(tiny_model.cfg.d_model, hook)
    keep_two = evaluate_saes(
        tiny_model, {hook: sae}, tokens, attention_mask=mask, keep_original=2, progress=False
    )
    loss_sae, _ = full_forward_losses(tiny_model, hook, sae, tokens, mask, keep_first=2)
    assert keep_two.loc[hook].loss_sae == pytest.approx(loss_sae, abs=1e-5)
    everything = torch.ones_like(tokens, dtype=torch.bool)
    kept = evaluate_saes(
        tiny_model, {hook: sae}, tokens, attention_mask=mask, keep_original=everything, progress=False
    )
    assert kept.loc[hook].loss_sae == pytest.approx(kept.loc[hook].loss_clean, abs=1e-6)


def test_loss_on_the_first_sequences_only(tiny_model, batch):
    """`loss_sequences` limits the spliced forwards to the leading batches; reconstruction still sees all."""
    tokens, mask = batch
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    saes = {h: random_sae(tiny_model.cfg.d_model, h, seed=i) for i, h in enumerate(hooks)}
    every = evaluate_saes(tiny_model, saes, tokens, attention_mask=mask, batch_size=2, progress=False)
    limited = evaluate_saes(
        tiny_model, saes, tokens, attention_mask=mask, batch_size=2, loss_sequences=2, progress=False
    )
    first_two = evaluate_saes(
        tiny_model, saes, tokens[:2], attention_mask=mask[:2], batch_size=2, progress=False
    )
    reconstruction = ["fve", "l0", "dead_fraction", "dense_fraction", "n_tokens"]
    losses = ["loss_clean", "loss_sae", "loss_zero", "loss_recovered"]
    pd.testing.assert_frame_equal(limited[reconstruction], every[reconstruction])
    pd.testing.assert_frame_equal(limited[losses], first_two[losses])
    assert limited.attrs["n_predicted_tokens"] == first_two.attrs["n_predicted_tokens"]
    assert limited.attrs["n_loss_sequences"] == 2 and limited.attrs["n_sequences"] == len(TEXTS)
    assert not np.allclose(limited[losses].to_numpy(), every[losses].to_numpy())


def test_batching_and_trailing_padding_change_nothing(tiny_model, batch):
    """Sequences are batched by length and each batch is cut to its longest sequence: any batch size, and extra
    padding columns, give the same table (up to float rounding)."""
    tokens, mask = batch
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    saes = {h: random_sae(tiny_model.cfg.d_model, h, seed=i) for i, h in enumerate(hooks)}
    reference = evaluate_saes(tiny_model, saes, tokens, attention_mask=mask, batch_size=1, progress=False)
    pad = torch.full((tokens.shape[0], 5), tiny_model.tokenizer.pad_token_id)
    wider_tokens, wider_mask = torch.cat([tokens, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)
    for batch_size, toks, m in ((3, tokens, mask), (len(TEXTS), wider_tokens, wider_mask)):
        table = evaluate_saes(tiny_model, saes, toks, attention_mask=m, batch_size=batch_size, progress=False)
        # loss_recovered divides by L_zero - L_clean, small for these random SAEs: rounding is amplified there
        direct = table.columns.drop("loss_recovered")
        pd.testing.assert_frame_equal(table[direct], reference[direct], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(table["loss_recovered"], reference["loss_recovered"], rtol=1e-3)
        assert table.attrs["n_predicted_tokens"] == reference.attrs["n_predicted_tokens"]


def test_length_batches_cover_every_row_once_with_little_padding():
    lengths = torch.tensor([256, 90, 100, 95, 250, 30, 256, 101, 99, 40])
    mask = (torch.arange(256)[None, :] < lengths[:, None]).long()
    batches = quality._length_batches(mask, loss_rows=4, batch_size=3)
    rows = [int(r) for chunk, _ in batches for r in chunk]
    assert sorted(rows) == list(range(10))
    assert all(
        with_loss == (int(chunk.max()) < 4) and (chunk < 4).all() == with_loss for chunk, with_loss in batches
    )
    for chunk, _ in batches:
        assert len(chunk) <= 3 and lengths[chunk].max() <= 1.25 * lengths[chunk].min()


def test_excluded_tokens_match_the_activation_cache(tiny_model, tiny_tokenizer, batch, tmp_cache):
    """The tokens measured here are exactly the rows SAE training sees: `emolib.sae.activations` drops the first
    position and attention-sink outliers by the same rule."""
    from emolib.sae.activations import ExtractionConfig, extract_activations

    tokens, mask = batch
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(tokens, mask, strict=True)]
    saes = {h: identity_sae(tiny_model.cfg.d_model, h) for h in hooks}
    for factor in (None, 1.3):
        store = extract_activations(
            tiny_model,
            "tiny",
            sequences,
            ExtractionConfig(hooks=tuple(hooks), outlier_factor=factor, progress=False),
            description="test",
            preset="test",
        )
        table = evaluate_saes(
            tiny_model, saes, tokens, attention_mask=mask, outlier_factor=factor, progress=False
        )
        assert (table.n_tokens == store.n_rows).all()
        assert table.attrs["n_outlier_tokens"] == store.meta["dropped"]["outliers"]
        if factor is not None:
            assert table.attrs["n_outlier_tokens"] > 0
            assert table.loc[hooks[0]].loss_recovered == pytest.approx(1.0, abs=1e-4)


def test_a_few_layers_measured_on_the_tokens_training_saw(tiny_model, tiny_tokenizer, batch, tmp_cache):
    """SAEs of a few layers trained on every layer's stored activations are measured without the tokens flagged at
    any extracted layer (`outlier_hooks`), as in training; with only their own layers' flags they are not."""
    from emolib.sae.activations import ExtractionConfig, extract_activations

    tokens, mask = batch
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sequences = [row[: int(m.sum())].tolist() for row, m in zip(tokens, mask, strict=True)]
    config = ExtractionConfig(hooks=tuple(hooks), outlier_factor=1.3, progress=False)
    store = extract_activations(tiny_model, "tiny", sequences, config, description="test", preset="test")
    one = {hooks[1]: identity_sae(tiny_model.cfg.d_model, hooks[1])}
    own = evaluate_saes(tiny_model, one, tokens, attention_mask=mask, outlier_factor=1.3, progress=False)
    assert (
        own.loc[hooks[1]].n_tokens > store.n_rows
    )  # the precondition: layer 0 flags tokens layer 1 does not
    as_trained = evaluate_saes(
        tiny_model, one, tokens, attention_mask=mask, outlier_factor=1.3, outlier_hooks=hooks, progress=False
    )
    assert as_trained.loc[hooks[1]].n_tokens == store.n_rows
    assert as_trained.attrs["n_outlier_tokens"] == store.meta["dropped"]["outliers"]
    both = {h: identity_sae(tiny_model.cfg.d_model, h) for h in hooks}
    every = evaluate_saes(tiny_model, both, tokens, attention_mask=mask, outlier_factor=1.3, progress=False)
    assert as_trained.loc[hooks[1]].equals(every.loc[hooks[1]])
    with pytest.raises(SAEError, match="not a residual-stream hook"):
        evaluate_saes(tiny_model, one, tokens, outlier_factor=1.3, outlier_hooks=["embed"], progress=False)


def test_missed_goals():
    table = pd.DataFrame(
        {
            "fve": [0.85, 0.70, 0.90, 0.95],
            "loss_recovered": [0.95, 0.95, 0.85, float("nan")],
            "dead_fraction": [0.01, 0.02, 0.20, 0.0],
            "l0": [32.0, 30.0, 40.0, 25.0],
        },
        index=[f"blocks.{i}.hook_resid_post" for i in range(4)],
    )
    missed = missed_goals(table, k=32)
    assert list(missed.index) == [f"blocks.{i}.hook_resid_post" for i in (1, 2, 3)]
    assert missed.loc["blocks.1.hook_resid_post", "missed"] == "fve"
    assert missed.loc["blocks.2.hook_resid_post", "missed"] == "loss_recovered, dead_fraction, l0"
    assert missed.loc["blocks.3.hook_resid_post", "missed"] == "loss_recovered, l0"
    assert quality.goal_summary(table, k=32).startswith("1 of 4 layers meet every goal")


# ------------------------------------------------------------------------------------------------ errors


def test_bad_configs_raise():
    with pytest.raises(SAEError, match="unknown SAE architecture 'relu'"):
        SAETrainingConfig(architecture="relu")
    with pytest.raises(SAEError, match="normalize_activations"):
        SAETrainingConfig(normalize_activations="layer_norm")
    with pytest.raises(SAEError, match="total_training_samples"):
        SAETrainingConfig(total_training_samples=10, train_batch_size=512)
    with pytest.raises(SAEError, match="d_sae"):
        SAETrainingConfig(d_sae=8, k=32)
    with pytest.raises(SAEError, match="no steps at the full learning rate"):
        SAETrainingConfig(total_training_samples=5120, train_batch_size=512, lr_warm_up_steps=8)
    assert SAETrainingConfig(total_training_samples=51200, train_batch_size=512).lr_decay_steps == 20


def test_stream_mismatches_raise():
    with pytest.raises(SAEError, match=r"no activations for hooks \['blocks.5.hook_resid_post'\]"):
        train_saes(PlantedStream(), TINY, hooks=[HOOKS[0], "blocks.5.hook_resid_post"], d_in=24)
    with pytest.raises(SAEError, match=r"shape \(64, 24\), expected \(batch, d_in=32\)"):
        train_saes(PlantedStream(), TINY, hooks=HOOKS, d_in=32)
    with pytest.raises(SAEError, match="train_batch_size"):
        train_saes(PlantedStream()(32, seed=0), TINY, hooks=HOOKS, d_in=24)
    short = [next(PlantedStream()(64, seed=0))] * 3
    with pytest.raises(SAEError, match="ended after 3 batches"):
        train_saes(short, TINY, hooks=HOOKS, d_in=24)
    with pytest.raises(SAEError, match="repeated"):
        train_saes(PlantedStream(), TINY, hooks=[HOOKS[0], HOOKS[0]], d_in=24)


def test_bad_evaluation_inputs_raise(tiny_model, batch, tmp_path):
    tokens, mask = batch
    d = tiny_model.cfg.d_model
    with pytest.raises(SAEError, match="not a residual-stream hook"):
        evaluate_saes(tiny_model, {"blocks.0.hook_mlp_out": identity_sae(d, "x")}, tokens, progress=False)
    with pytest.raises(SAEError, match="beyond the model's 2 layers"):
        evaluate_saes(tiny_model, {"blocks.2.hook_resid_post": identity_sae(d, "x")}, tokens, progress=False)
    with pytest.raises(SAEError, match="d_in=8"):
        evaluate_saes(tiny_model, {HOOKS[0]: identity_sae(8, HOOKS[0])}, tokens, progress=False)
    with pytest.raises(SAEError, match="neither a folder"):
        load_saes(tmp_path / "missing")
    with pytest.raises(SAEError, match="holds no SAEs"):
        load_saes(tmp_path)
