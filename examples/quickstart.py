"""Pool a padded batch and a varlen-packed batch with every backend that runs here, check each
against the reference, and time the forward + backward.

    python examples/quickstart.py            # CUDA tensors if a GPU is present, else CPU
"""

import time

import torch

import fused_pool
from fused_pool import reference


def timed(fn, repeats=5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    batch, length, hidden = 8, 128, 384
    x = torch.randn(batch, length, hidden, device=device, requires_grad=True)
    lengths = torch.randint(1, length + 1, (batch,), device=device)
    mask = torch.arange(length, device=device) < lengths[:, None]  # right padding
    tokens = x.detach()[mask].requires_grad_()  # the same sequences, packed
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
    print(f"device {device}; backends here: {fused_pool.available_backends()}")
    print(f"padded x {tuple(x.shape)}, varlen x {tuple(tokens.shape)}, {len(lengths)} sequences")

    scores = torch.randn(batch, length, device=device, requires_grad=True)  # e.g. from a scorer head
    query = torch.randn(4, hidden // 4, device=device, requires_grad=True)  # 4 heads
    token_scores = scores.detach()[mask]
    ops = {
        "masked_mean": ((), ()),
        "masked_max": ((), ()),
        "masked_mean_max": ((), ()),
        "attention_pool": ((scores,), (token_scores,)),
        "query_attention_pool": ((query,), (query,)),
    }
    for backend in fused_pool.available_backends():
        note = " (Triton interpreter: correct, not fast)" if backend == "triton" and device == "cpu" else ""
        for name, (padded_args, packed_args) in ops.items():
            fn, ref = getattr(fused_pool, name), getattr(reference, name)
            out = fn(x, *padded_args, mask, backend=backend)
            packed = fn(tokens, *packed_args, cu_seqlens=cu_seqlens, backend=backend)
            error = max(
                (out - ref(x, *padded_args, mask)).abs().max().item(), (packed - out).abs().max().item()
            )
            ms = timed(lambda fn=fn, a=padded_args, b=backend: fn(x, *a, mask, backend=b).sum().backward())
            print(
                f"{backend:>7} {name:<21} max |error| vs reference {error:.1e}   fwd+bwd {ms:8.2f} ms{note}"
            )


if __name__ == "__main__":
    main()
