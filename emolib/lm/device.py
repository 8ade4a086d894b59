"""Where model forwards and SAE training run: "auto" picks CUDA, then Apple MPS, then the CPU.

The book's own runs are on CPU (2 cores, no GPU); a reader with a GPU gets it without changing a chapter, or picks a
device for a whole run with `EMOLIB_DEVICE` (e.g. `EMOLIB_DEVICE=cuda:1 make build`). Numbers computed on another
device differ in the last digits, so a non-CPU device is part of every cache key (`emolib.lm.precision.keyed_name`)
and CPU keys stay as they were.
"""

from __future__ import annotations

import os

import torch

#: The accepted device kinds ("cuda:N" selects a GPU by index).
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")

#: The environment variable that overrides "auto" for a whole run.
DEVICE_ENV = "EMOLIB_DEVICE"


class DeviceError(ValueError):
    """An unknown device name, or a device this machine does not have."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def auto_device() -> str:
    """The fastest device this machine has: "cuda", else "mps", else "cpu"."""
    if cuda_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def resolve_device(device: str | None = None) -> str:
    """The device for `device` ("auto", "cpu", "cuda", "cuda:N", "mps"; None reads `EMOLIB_DEVICE`, default
    "auto"), checked against this machine: asking for a GPU it lacks raises instead of falling back silently."""
    name = device if device is not None else os.environ.get(DEVICE_ENV, "auto")
    source = "" if device is not None else f" (from ${DEVICE_ENV})"
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"unknown device {name!r}{source}; choose one of {list(DEVICES)} or 'cuda:N'")
    if kind == "auto":
        return auto_device()
    if kind == "cuda":
        if not cuda_available():
            raise DeviceError(
                f"device {name!r}{source} asks for a GPU, but torch sees no CUDA device here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use 'auto' or 'cpu'"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r}{source}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0"
            )
    if kind == "mps" and not mps_available():
        raise DeviceError(
            f"device {name!r}{source} asks for Apple MPS, which this machine lacks; use 'auto' or 'cpu'"
        )
    return name


def device_of(module: torch.nn.Module) -> str:
    """The device a module's parameters live on ("cpu", "cuda:0", ...); "cpu" for a module without parameters."""
    parameter = next(module.parameters(), None)
    return "cpu" if parameter is None else str(parameter.device)
