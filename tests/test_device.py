"""Tests for emolib.lm.device: "auto" picks CUDA, then MPS, then the CPU; the environment override; devices this
machine lacks raise instead of falling back; a non-CPU device gets its own cache keys while CPU keys stay as they
were. (No test here runs on a GPU: the book's machines have none.)"""

from __future__ import annotations

import pytest
import torch
from conftest import llama_like_config, make_tiny_model
from test_saes import HOOKS, PLANTED

from emolib.lm import device as D
from emolib.lm.models import ModelInfo
from emolib.lm.precision import keyed_name, model_key
from emolib.sae.training import make_training_sae, saes_key


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has the given accelerators."""

    def set_machine(cuda: bool = False, mps: bool = False, gpus: int = 0) -> None:
        monkeypatch.setattr(D, "cuda_available", lambda: cuda)
        monkeypatch.setattr(D, "mps_available", lambda: mps)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    monkeypatch.delenv(D.DEVICE_ENV, raising=False)
    return set_machine


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps, gpus=int(cuda))
    assert D.resolve_device("auto") == expected
    assert D.resolve_device() == expected  # None reads the environment, default "auto"


def test_this_machine_resolves_to_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert D.resolve_device("auto") in ("cpu", "mps")


def test_the_environment_overrides_auto(machine, monkeypatch):
    machine(cuda=True, gpus=2)
    monkeypatch.setenv(D.DEVICE_ENV, "cpu")
    assert D.resolve_device() == "cpu"
    monkeypatch.setenv(D.DEVICE_ENV, "cuda:1")
    assert D.resolve_device() == "cuda:1"
    assert D.resolve_device("cpu") == "cpu"  # an explicit argument wins over the environment


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("tpu", r"unknown device 'tpu'"),
        ("cuda:x", r"unknown device 'cuda:x'"),
        ("mps:0", r"unknown device 'mps:0'"),
        ("cuda", r"no CUDA device"),
        ("mps", r"lacks"),
    ],
)
def test_unknown_or_missing_devices_raise(machine, name, match):
    machine()
    with pytest.raises(D.DeviceError, match=match):
        D.resolve_device(name)


def test_a_gpu_index_beyond_the_machine_raises(machine):
    machine(cuda=True, gpus=1)
    assert D.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(D.DeviceError, match="has 1 CUDA device"):
        D.resolve_device("cuda:1")


def test_a_bad_environment_value_names_the_variable(machine, monkeypatch):
    machine()
    monkeypatch.setenv(D.DEVICE_ENV, "gpu")
    with pytest.raises(D.DeviceError, match=r"\$EMOLIB_DEVICE"):
        D.resolve_device()


def test_cpu_keys_are_unchanged_and_other_devices_get_their_own():
    assert keyed_name("m", "float32") == keyed_name("m", "float32", "cpu") == "m"
    assert keyed_name("m", torch.bfloat16) == "m@bfloat16"
    assert keyed_name("m", "float32", "cuda:0") == "m@cuda"
    assert keyed_name("m", "bfloat16", "cuda:1") == "m@bfloat16@cuda"
    assert keyed_name("m", "float32", "mps") == "m@mps"
    info = ModelInfo("m", "llama", True, 2, 8, 10, 100, "test", precision="bfloat16", device="cuda:0")
    assert info.cache_name == "m@bfloat16@cuda"
    assert saes_key(PLANTED, activation_key="k", hooks=HOOKS, d_in=4) == saes_key(
        PLANTED, activation_key="k", hooks=HOOKS, d_in=4, device="cpu"
    )
    assert saes_key(PLANTED, activation_key="k", hooks=HOOKS, d_in=4) != saes_key(
        PLANTED, activation_key="k", hooks=HOOKS, d_in=4, device="cuda:0"
    )


def test_a_loaded_models_key_reads_its_device(tiny_tokenizer):
    model = make_tiny_model(llama_like_config(len(tiny_tokenizer)), tiny_tokenizer)
    assert D.device_of(model) == "cpu"
    assert model_key("tiny", model) == "tiny"
    assert D.device_of(torch.nn.ReLU()) == "cpu"  # no parameters


def test_training_saes_start_from_the_same_weights_whatever_the_device():
    """The initial weights are drawn on the CPU, so a seed means one SAE on every device (here: CPU twice, and
    the draw does not depend on the global RNG state)."""
    a = make_training_sae(PLANTED, hook=HOOKS[0], d_in=4, device="cpu")
    torch.manual_seed(123)
    b = make_training_sae(PLANTED, hook=HOOKS[0], d_in=4)
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
