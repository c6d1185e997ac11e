"""Backend choice: defaults, the env switch, explicit requests, and errors that say why."""

from __future__ import annotations

import os

import pytest
import torch

import fused_pool
from fused_pool.backends import extension, resolve_backend, triton_interpret, unavailable_reason


def test_available_backends_lists_what_runs():
    available = fused_pool.available_backends()
    assert "torch" in available
    assert set(available) <= {"triton", "cuda", "cpu", "torch"}
    if "triton" in available and not torch.cuda.is_available():
        assert triton_interpret()


@pytest.mark.skipif(
    os.environ.get("FUSED_POOL_REQUIRE_EXTENSION") != "1", reason="FUSED_POOL_REQUIRE_EXTENSION unset"
)
def test_extension_was_built():
    assert extension() is not None, "fused_pool._C did not build or import"
    assert "cpu" in fused_pool.available_backends()
    assert resolve_backend(None, torch.device("cpu")) == "cpu"


def test_default_on_cpu_is_never_the_interpreter():
    assert resolve_backend(None, torch.device("cpu")) in ("cpu", "torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_on_cuda_is_triton_when_it_imports():
    expected = "triton" if unavailable_reason("triton", torch.device("cuda")) is None else "cuda"
    assert resolve_backend(None, torch.device("cuda")) == expected


def test_env_switch_picks_the_backend(monkeypatch):
    monkeypatch.setenv("FUSED_POOL_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FUSED_POOL_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        resolve_backend(None, torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and ("TRITON_INTERPRET=1" in reason or "Triton does not import" in reason)


def test_torch_backend_is_the_reference():
    x = torch.randn(2, 6, 4)
    mask = torch.rand(2, 6) > 0.5
    assert torch.equal(
        fused_pool.masked_mean(x, mask, backend="torch"), fused_pool.reference.masked_mean(x, mask)
    )
