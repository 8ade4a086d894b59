"""Compute precision of model forwards and SAE training: bfloat16 autocast where the hardware runs it fast, else
float32.

Weights, activations stored on disk, SAE master weights and every measure stay float32; only matrix products run in
bfloat16 (torch autocast). CPUs with AMX or AVX-512 bf16 units run those several times faster than float32; CPUs
without them (AVX2 only) run them hundreds of times slower, so "auto" checks the hardware at run time and falls back
to float32. The precision a model ran in is part of every cache key built from it (`keyed_name`), so numbers
computed in bfloat16 are never read back as float32 ones. `EMOLIB_PRECISION` overrides the choice for a whole run.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from emolib.lm.device import device_of

#: The accepted precision names; "auto" is bfloat16 where `bf16_is_fast()`, else float32.
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")

#: The environment variable that overrides "auto" (e.g. `EMOLIB_PRECISION=float32` to reproduce float32 numbers
#: on a machine with bfloat16 units).
PRECISION_ENV = "EMOLIB_PRECISION"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ATTRIBUTE = "_emolib_compute_dtype"


class PrecisionError(ValueError):
    """An unknown precision name."""


def bf16_is_fast(device: str = "cpu") -> bool:
    """True when `device` has bfloat16 matrix units: AMX or AVX-512 bf16 on a CPU, native bf16 on a GPU."""
    kind = torch.device(device).type
    if kind == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def resolve_precision(precision: str | None = None, device: str = "cpu") -> torch.dtype:
    """The compute dtype for `precision` ("auto", "float32", "bfloat16"; None reads `EMOLIB_PRECISION`, default
    "auto")."""
    name = precision if precision is not None else os.environ.get(PRECISION_ENV, "auto")
    if name not in PRECISIONS:
        source = "" if precision is not None else f" (from ${PRECISION_ENV})"
        raise PrecisionError(f"unknown precision {name!r}{source}; choose one of {list(PRECISIONS)}")
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' or 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def keyed_name(name: str, precision: torch.dtype | str, device: str = "cpu") -> str:
    """A model's name as cache keys and folders use it: the bare name for float32 on CPU (the reference, so those
    keys are the same as before precision existed), `name@bfloat16` for bfloat16, and `@cuda` / `@mps` appended
    for a model that runs elsewhere (its numbers differ in the last digits)."""
    label = precision if isinstance(precision, str) else dtype_name(precision)
    keyed = name if label == "float32" else f"{name}@{label}"
    kind = torch.device(device).type
    return keyed if kind == "cpu" else f"{keyed}@{kind}"


def model_key(name: str, model: torch.nn.Module) -> str:
    """`keyed_name` of a loaded model: its compute precision and the device its weights are on."""
    return keyed_name(name, compute_dtype(model), device_of(model))


@contextlib.contextmanager
def autocast(dtype: torch.dtype, device: str = "cpu") -> Iterator[None]:
    """Matrix products in `dtype` inside the block (a no-op for float32)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype `set_compute_dtype` gave `model`'s forward (float32 if never set)."""
    return getattr(model, _ATTRIBUTE, torch.float32)


def set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run every forward of `model` (plain calls, `run_with_cache`, `run_with_hooks`, partial forwards) under
    `autocast(dtype)`, returning float32 tensors; the weights stay float32."""
    if compute_dtype(model) == dtype:
        return
    forward = getattr(model, "_emolib_float32_forward", model.forward)
    object.__setattr__(model, "_emolib_float32_forward", forward)
    object.__setattr__(model, _ATTRIBUTE, dtype)
    if dtype == torch.float32:
        object.__setattr__(model, "forward", forward)
        return
    object.__setattr__(model, "forward", _autocast_forward(forward, dtype, str(model.cfg.device or "cpu")))


def _autocast_forward(forward: Callable[..., Any], dtype: torch.dtype, device: str) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with autocast(dtype, device):
            out = forward(*args, **kwargs)
        return _as_float32(out)

    return run


def _as_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor) and out.is_floating_point():
        return out.float()
    if isinstance(out, tuple):
        return tuple(_as_float32(o) for o in out)
    if isinstance(out, list):
        return [_as_float32(o) for o in out]
    return out
