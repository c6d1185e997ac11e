"""Checks of the fused_pool that this interpreter imports, for benchmarks/gpu_run.py: skipped unless
it asks for them through the environment.

- FUSED_POOL_TEST_INSTALLED=1: fused_pool comes from an installed package, not this source tree
  (gpu_run.py runs the suite from outside the tree after a non-editable install);
- FUSED_POOL_TEST_BACKENDS=triton,cuda and FUSED_POOL_TEST_DEVICE=cuda: each of these backends
  can run on that device and matches the reference, output and gradient.
"""

import os
from pathlib import Path

import pytest
import torch

import fused_pool
from fused_pool import reference
from fused_pool.backends import unavailable_reason

SOURCE_TREE = Path(__file__).resolve().parents[1]
EXPECTED_BACKENDS = [b for b in os.environ.get("FUSED_POOL_TEST_BACKENDS", "").split(",") if b]
DEVICE = os.environ.get("FUSED_POOL_TEST_DEVICE", "cuda")


@pytest.mark.skipif(
    os.environ.get("FUSED_POOL_TEST_INSTALLED") != "1", reason="set FUSED_POOL_TEST_INSTALLED=1 to check"
)
def test_fused_pool_is_the_installed_package():
    path = Path(fused_pool.__file__).resolve()
    assert SOURCE_TREE not in path.parents, f"fused_pool is imported from the source tree: {path}"


@pytest.mark.skipif(not EXPECTED_BACKENDS, reason="set FUSED_POOL_TEST_BACKENDS to check")
@pytest.mark.parametrize("backend", EXPECTED_BACKENDS, ids=[f"{b}-{DEVICE}" for b in EXPECTED_BACKENDS])
def test_expected_backend_runs_and_matches_reference(backend):
    device = torch.device(DEVICE)
    reason = unavailable_reason(backend, device)
    assert reason is None, f"backend {backend!r} cannot run on {device.type}: {reason}"
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(4, 50, 96, generator=gen).to(device)
    mask = (torch.rand(4, 50, generator=gen) > 0.3).to(device)
    grad = torch.randn(4, 96, generator=gen).to(device)
    x_fused = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = fused_pool.masked_mean(x_fused, mask, backend=backend)
    expected = reference.masked_mean(x_ref, mask)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
