"""Saving and loading SAEs in the SAELens format (one folder per hook), and pretrained releases through sae-lens'
registry (they need the Hugging Face hub, or its cache)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_lens import SAE, TrainingSAE

from emolib.cache import write_json

#: Bump when training or the saved layout changes, so cached SAEs are retrained.
SAE_FORMAT_VERSION = "1"

#: Written at the top of a folder of saved SAEs: format version, hooks in order, training config.
INDEX_FILE = "emolib_saes.json"


class SAEError(ValueError):
    """A bad SAE config, a batch stream that does not match it, or a source that holds no SAEs."""


def save_saes(saes: Mapping[str, SAE], folder: Path | str, *, index: Mapping[str, Any] | None = None) -> Path:
    """Save SAEs in the SAELens format, one folder per hook (`folder/<hook>/cfg.json` + weights).

    Training SAEs are saved as their inference SAEs (`save_inference_model`: a BatchTopK SAE becomes a JumpReLU
    SAE with the learned global threshold), exactly as sae-lens' own training runners save them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for hook, sae in saes.items():
        if isinstance(sae, TrainingSAE):
            sae.save_inference_model(folder / hook)
        else:
            sae.save_model(folder / hook)
        _canonical_json(folder / hook / "cfg.json")
    write_json(folder / INDEX_FILE, {"format": SAE_FORMAT_VERSION, "hooks": list(saes), **dict(index or {})})
    return folder


def _canonical_json(path: Path) -> None:
    """Rewrite a JSON file with sorted keys: sae-lens writes its config's keys in an order that follows Python's
    per-process string hashing, so the same SAE would otherwise be saved as different bytes by every process."""
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class PretrainedSAEs:
    """SAEs of a sae-lens pretrained release: `sae_ids` maps each hook to its SAE id in the release."""

    release: str
    sae_ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainedSpec:
    """One entry of the pretrained-SAE registry: a release with one SAE per layer, ids by layer template."""

    model: str
    release: str
    sae_id: str
    n_layers: int
    hook: str = "blocks.{layer}.hook_resid_post"

    def source(self, layers: Iterable[int] | None = None) -> PretrainedSAEs:
        layers = range(self.n_layers) if layers is None else layers
        return PretrainedSAEs(
            self.release, {self.hook.format(layer=i): self.sae_id.format(layer=i) for i in layers}
        )


#: Pretrained residual-stream SAEs for every layer of a registered model (they need the Hugging Face hub, or its
#: cache, and the network for sae-lens' Gemma 3 loader; see `load_saes`).
PRETRAINED: dict[str, PretrainedSpec] = {
    "gemma-scope-2-270m-res-16k-small": PretrainedSpec(
        model="gemma-3-270m",
        release="gemma-scope-2-270m-pt-res-all",
        sae_id="layer_{layer}_width_16k_l0_small",
        n_layers=18,
    ),
    "gemma-scope-2-270m-res-16k-big": PretrainedSpec(
        model="gemma-3-270m",
        release="gemma-scope-2-270m-pt-res-all",
        sae_id="layer_{layer}_width_16k_l0_big",
        n_layers=18,
    ),
    # The paper-scale path (a GPU and the hub): Gemma Scope's canonical 16k residual SAEs for every layer.
    "gemma-scope-2b-res-16k": PretrainedSpec(
        model="gemma-2-2b",
        release="gemma-scope-2b-pt-res-canonical",
        sae_id="layer_{layer}/width_16k/canonical",
        n_layers=26,
    ),
    "gemma-scope-9b-res-16k": PretrainedSpec(
        model="gemma-2-9b",
        release="gemma-scope-9b-pt-res-canonical",
        sae_id="layer_{layer}/width_16k/canonical",
        n_layers=42,
    ),
}


def _select(available: Sequence[str], hooks: Sequence[str] | None, where: str) -> list[str]:
    if hooks is None:
        return list(available)
    missing = [hook for hook in hooks if hook not in available]
    if missing:
        raise SAEError(f"{where} has no SAEs for hooks {missing}; it has {list(available)}")
    return list(hooks)


def _local_hooks(folder: Path) -> list[str]:
    index = folder / INDEX_FILE
    if index.is_file():
        return list(json.loads(index.read_text())["hooks"])
    found = [p.name for p in folder.iterdir() if (p / "cfg.json").is_file()]
    return sorted(found, key=lambda h: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", h)])


def load_saes(
    source: Path | str | PretrainedSAEs, hooks: Sequence[str] | None = None, *, device: str = "cpu"
) -> dict[str, SAE]:
    """Inference SAEs by hook, from a folder saved by `save_saes`, a `PRETRAINED` name, or a `PretrainedSAEs`.

    Pretrained SAEs load through `SAE.from_pretrained(release, sae_id)`, which resolves the release in sae-lens'
    `pretrained_saes.yaml` and downloads through the Hugging Face hub (its local cache when offline). sae-lens'
    Gemma 3 (Gemma Scope 2) loader also reads each weight file's header over HTTP to learn the shapes, so those
    releases need the network even when the weights are cached.
    """
    if isinstance(source, str) and source in PRETRAINED:
        source = PRETRAINED[source].source()
    if isinstance(source, PretrainedSAEs):
        selected = _select(list(source.sae_ids), hooks, f"release {source.release!r}")
        saes = {}
        for hook in selected:
            sae = SAE.from_pretrained(source.release, source.sae_ids[hook], device=device)
            if sae.cfg.metadata.hook_name not in (None, hook):
                raise SAEError(
                    f"{source.release}/{source.sae_ids[hook]} reads {sae.cfg.metadata.hook_name}, not {hook}"
                )
            saes[hook] = sae
        return saes
    folder = Path(source)
    if not folder.is_dir():
        raise SAEError(
            f"{source!r} is neither a folder of saved SAEs nor a pretrained name; pretrained: {sorted(PRETRAINED)}"
        )
    available = _local_hooks(folder)
    if not available:
        raise SAEError(f"{folder} holds no SAEs (no <hook>/cfg.json)")
    return {
        hook: SAE.load_from_disk(folder / hook, device=device)
        for hook in _select(available, hooks, str(folder))
    }
