"""Worker of tests/distributed/test_distributed.py: a one-rank group ("gloo" on CPU tensors, "nccl" on CUDA
ones) runs every distributed op through that collective backend, for every fused backend the
device has, against the single-device op. One rank is what a one-GPU machine can run with NCCL."""

from __future__ import annotations

import argparse
import gc
import sys
import weakref

import torch
import torch.distributed as dist

import fused_pool
import fused_pool.distributed as fd
from fused_pool.backends import unavailable_reason


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dist-backend", choices=("gloo", "nccl"), required=True)
    parser.add_argument("--init-file", required=True)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.dist_backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.dist_backend, init_method=f"file://{args.init_file}", rank=0, world_size=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 64, generator=gen).to(device, torch.bfloat16)
    mask = (torch.rand(3, 40, generator=gen) > 0.3).to(device)
    mask[1] = False  # an empty sequence
    scores = torch.randn(3, 40, 4, generator=gen).to(device)
    query = torch.randn(4, 16, generator=gen).to(device)
    # even lengths: zigzag cuts each into 2W = 2 slices, cu_seqlens_padded defaulting to cu_seqlens
    cu_seqlens = torch.tensor([0, 8, 8, 40], dtype=torch.int32, device=device)
    tokens = x[0]
    tolerance = dict(atol=1.6e-2, rtol=1.6e-2)
    ran = []
    for backend in ("triton", "cuda", "cpu", "torch"):
        if unavailable_reason(backend, device) is not None:
            continue
        for layout in ("contiguous", "zigzag"):
            calls = [
                ("masked_mean", (x, mask), {}),
                ("masked_max", (x, mask), {}),
                ("masked_mean_max", (tokens,), dict(cu_seqlens=cu_seqlens)),
                ("attention_pool", (x, scores, mask), {}),
                ("query_attention_pool", (tokens, query), dict(cu_seqlens=cu_seqlens)),
            ]
            for name, inputs, kwargs in calls:
                out = getattr(fd, name)(*inputs, layout=layout, backend=backend, **kwargs)
                expected = getattr(fused_pool, name)(*inputs, backend=backend, **kwargs)
                torch.testing.assert_close(out, expected, **tolerance, msg=f"{name} {layout} {backend}")
            ran.append(f"{backend}/{layout}")
        last = fd.last_token(tokens, cu_seqlens=cu_seqlens)
        assert torch.equal(last, fused_pool.last_token(tokens, cu_seqlens=cu_seqlens))
    # Pool and token ops keep no hidden states for backward (as on one device): an activation
    # passed in is freed once the caller drops it.
    for name in ("masked_mean", "masked_max", "last_token"):
        hidden = x.float().requires_grad_() * 2  # an activation: only the caller holds it
        alive = weakref.ref(hidden)
        out = getattr(fd, name)(hidden, mask, layout="zigzag")
        del hidden
        gc.collect()
        assert alive() is None, f"{name} keeps its input alive until backward"
        out.sum().backward()
    dist.destroy_process_group()
    print(f"{args.dist_backend} one-rank group on {device}: {', '.join(ran)} match single-device")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
