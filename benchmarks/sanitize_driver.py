"""Runs every fused kernel, forward and backward, on small shapes: the workload that
`benchmarks/gpu_run.py sanitize` runs under compute-sanitizer (memcheck, racecheck, initcheck,
synccheck). It also runs on its own, and on CPU (the `cpu` backend and Triton's interpreter).

    python benchmarks/sanitize_driver.py                          # CUDA: backends cuda and triton
    python benchmarks/sanitize_driver.py --device cpu --size toy  # CPU: backends cpu and triton

Every op (masked_mean, masked_max, masked_mean_max, attention_pool with one and two heads,
query_attention_pool with one and two heads) on:

- padded inputs with no mask, a bool mask (with an empty and a one-token sequence) and a float
  mask (weights with zeros); attention scores with a sequence whose kept scores are all -inf;
- varlen inputs (with an empty sequence; per-token weights for masked_mean);
- one long sequence (B=1, L=--split-length) padded and varlen, so that the forward splits the
  sequence axis across programs (the Triton plan is printed: it must say split);
- malformed cu_seqlens, without and with the split: decreasing, beyond T, negative, overlapping,
  not starting at 0, ending before T, near the int32 limit (int32) and beyond it (int64), and
  max_seqlen hints that are too small or too large. Results are meaningless there; what counts
  is that nothing reads or writes out of bounds (the sanitizer's job) and nothing crashes.

in every --dtypes (float32 and bfloat16 by default). Valid cases are also checked against the
float32 reference on the CPU (outputs and gradients). Every case ends with a device sync, so a
sanitizer report lands next to the case line printed before it. Exit status 1 if any case raised
or mismatched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

OPS = ("masked_mean", "masked_max", "masked_mean_max", "attention_pool", "query_attention_pool")
DTYPES = ("float32", "bfloat16", "float16")
# Loose on purpose: this is a smoke check that the kernels compute the right thing under the
# sanitizer, not the test suite (tests/ hold the tight tolerances).
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 4e-3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("cuda", "triton", "cpu"),
        default=None,
        help="default: cuda triton (--device cuda), cpu triton (--device cpu)",
    )
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["float32", "bfloat16"])
    parser.add_argument(
        "--size", choices=("small", "toy"), default="small", help="toy: for Triton's CPU interpreter"
    )
    parser.add_argument(
        "--split-length",
        type=int,
        default=None,
        help="rows of the long sequence that forces the split (default 8192 small, 1024 toy)",
    )
    parser.add_argument("--no-malformed", action="store_true", help="skip the malformed cu_seqlens")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the reference")
    parser.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    return parser.parse_args(argv)


@dataclass
class Case:
    """One call: x (B, L, H) or (T, H), mask or cu_seqlens, the attention input, and what to check."""

    name: str
    x: object
    mask: object = None
    cu_seqlens: object = None
    max_seqlen: int | None = None
    scores: object = None  # attention_pool: (B, L[, nh]) / (T[, nh])
    query: object = None  # query_attention_pool: (H,) / (nh, H / nh)
    ops: tuple[str, ...] = OPS
    malformed: bool = False  # results meaningless: run it, check nothing but that it ran
    optional: bool = False  # in DESIGN.md but maybe not implemented: a ValueError skips it


def build_cases(args, torch, dtype) -> list[Case]:
    """Inputs on the CPU (moved to the device by the caller): no device kernels while building."""
    gen = torch.Generator().manual_seed(0)
    toy = args.size == "toy"
    batch, length, hidden = (3, 9, 24) if toy else (5, 37, 80)  # H not a power of two; nh=2 divides it
    split_len = args.split_length or (1024 if toy else 8192)
    split_hidden = 16 if toy else 64

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    def scores_for(token_shape, heads, empty_row=None):
        s = randn(*token_shape, *((heads,) if heads > 1 else ()))
        if empty_row is not None:  # every score of one sequence -inf: it pools to 0
            s[empty_row] = float("-inf")
        return s

    def attention_variants(name, x, token_shape, empty_row=None, head_counts=(1, 2), **kw):
        """The two attention ops, one and two heads each, on the same x and structure."""
        h = x.shape[-1]
        out = []
        for heads in head_counts:
            out.append(
                Case(
                    f"{name} nh={heads}",
                    x,
                    scores=scores_for(token_shape, heads, empty_row),
                    ops=("attention_pool",),
                    **kw,
                )
            )
            query = randn(h) if heads == 1 else randn(heads, h // heads)
            out.append(Case(f"{name} nh={heads}", x, query=query, ops=("query_attention_pool",), **kw))
        return out

    def all_ops(name, x, token_shape, empty_row=None, head_counts=(1, 2), **kw):
        pool_ops = ("masked_mean", "masked_max", "masked_mean_max")
        attention = attention_variants(name, x, token_shape, empty_row, head_counts, **kw)
        return [Case(name, x, ops=pool_ops, **kw), *attention]

    cases: list[Case] = []
    # Padded, three mask kinds; sequence 1 empty, sequence 2 a single kept token.
    x = randn(batch, length, hidden)
    keep = torch.rand(batch, length, generator=gen) > 0.35
    keep[1] = False
    keep[2] = False
    keep[2, length // 2] = True
    weights = torch.where(keep, torch.rand(batch, length, generator=gen) * 1.75 + 0.25, 0.0)
    cases += all_ops(f"padded B={batch} L={length} H={hidden} mask=none", x, (batch, length), empty_row=0)
    cases += all_ops(f"padded B={batch} L={length} H={hidden} mask=bool", x, (batch, length), 0, mask=keep)
    cases += all_ops(
        f"padded B={batch} L={length} H={hidden} mask=float", x, (batch, length), 0, mask=weights.to(dtype)
    )
    # Varlen, with an empty sequence.
    lengths = [3, 0, 5, 1] if toy else [5, 0, 17, 1, 30]
    tokens = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    xv = randn(tokens, hidden)
    cases += all_ops(f"varlen T={tokens} H={hidden}", xv, (tokens,), cu_seqlens=cu, max_seqlen=max(lengths))
    cases.append(
        Case(
            f"varlen T={tokens} H={hidden} weights",
            xv,
            mask=torch.rand(tokens, generator=gen).to(dtype),
            cu_seqlens=cu,
            ops=("masked_mean",),
            optional=True,
        )
    )
    # One long sequence: the forward splits it across programs.
    xs = randn(1, split_len, split_hidden)
    keep_long = torch.rand(1, split_len, generator=gen) > 0.5
    cases += all_ops(f"split padded B=1 L={split_len} mask=bool", xs, (1, split_len), mask=keep_long)
    cases.append(Case(f"split padded B=1 L={split_len} mask=none", xs, ops=("masked_mean", "masked_max")))
    long_lengths = [split_len // 8, split_len - split_len // 8 - 64, 0, 64]
    cu_long = torch.tensor([0, *torch.tensor(long_lengths).cumsum(0).tolist()], dtype=torch.int64)
    cases += all_ops(f"split varlen T={split_len} int64", xs[0], (split_len,), cu_seqlens=cu_long)

    # Malformed cu_seqlens and wrong hints: bounds logic, the same for every dtype and head count,
    # so only in the first dtype and with one head (keeps the sanitizer runs short).
    if not args.no_malformed and dtype == getattr(torch, args.dtypes[0]):
        for t_name, xt in (("T", xv), ("split T", xs[0])):
            t = xt.shape[0]
            a = max(2, t // 4)
            bad = {
                "decreasing": [0, a, a // 2, t],
                "beyond T": [0, a, t + 17, t + 1000],
                "negative": [0, -7, a, t],
                "negative start": [-5, a, t],
                "overlapping": [0, 2 * a, a, t],
                "overlapping many": [0, t, 0, t, 0, t, 0, t],
                "not from 0": [3, a, t],
                "ends before T": [0, a, t - 2],
                "int32 limit": [0, a, 2**31 - 1],
            }
            for kind, values in bad.items():
                cu_bad = torch.tensor(values, dtype=torch.int32)
                cases += all_ops(
                    f"malformed {t_name}={t} {kind}", xt, (t,), None, (1,), cu_seqlens=cu_bad, malformed=True
                )
            cu_huge = torch.tensor([0, a, 2**40, -(2**40), t], dtype=torch.int64)
            cases += all_ops(
                f"malformed {t_name}={t} beyond int32",
                xt,
                (t,),
                None,
                (1,),
                cu_seqlens=cu_huge,
                malformed=True,
            )
            cu_ok = torch.tensor([0, a, t], dtype=torch.int32)
            for hint in (1, 10 * t):  # a wrong hint only steers the launch plan
                cases += all_ops(
                    f"{t_name}={t} max_seqlen hint {hint}",
                    xt,
                    (t,),
                    None,
                    (1,),
                    cu_seqlens=cu_ok,
                    max_seqlen=hint,
                )
    return [c for c in cases if any(op in args.ops for op in c.ops)]


def call(fused_pool, op, case: Case, x, second, backend, mask, cu_seqlens):
    fn = getattr(fused_pool if backend is not None else fused_pool.reference, op)
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": case.max_seqlen}
    if backend is not None:
        kwargs["backend"] = backend
    args = (x,) if second is None else (x, second)
    return fn(*args, mask, **kwargs)


def run_case(torch, fused_pool, op, case: Case, backend, device, check, dtype_name):
    """Forward and backward on `device`; returns an error message or None."""
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    second = {"attention_pool": case.scores, "query_attention_pool": case.query}.get(op)
    leaves = [case.x] + ([second] if second is not None else [])
    dev_leaves = [t.to(device).requires_grad_() for t in leaves]
    mask, cu_seqlens = move(case.mask), move(case.cu_seqlens)
    dev_second = dev_leaves[1] if second is not None else None
    out = call(fused_pool, op, case, dev_leaves[0], dev_second, backend, mask, cu_seqlens)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    grads = torch.autograd.grad(out, dev_leaves, grad_out.to(device))
    # Read every output and gradient with a device kernel (initcheck sees unwritten elements),
    # then sync: a sanitizer report lands next to this case.
    total = out.float().sum() + sum(g.float().sum() for g in grads)
    total.item()
    if not check or case.malformed:
        return None
    outputs = [out, *grads]
    if not all(torch.isfinite(t).all().item() for t in outputs):
        return "non-finite output or gradient on finite inputs"
    ref_leaves = [t.float().requires_grad_() for t in leaves]
    ref_mask = (
        None if case.mask is None else case.mask.float() if case.mask.is_floating_point() else case.mask
    )
    ref_second = ref_leaves[1] if second is not None else None
    ref_out = call(fused_pool, op, case, ref_leaves[0], ref_second, None, ref_mask, case.cu_seqlens)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.float())
    tol = TOLERANCE[dtype_name]
    names = ("out", "dx", "dquery" if op == "query_attention_pool" else "dscores")
    for what, actual, expected in zip(names[: len(outputs)], outputs, [ref_out, *ref_grads], strict=True):
        actual = actual.detach().float().cpu()
        expected = expected.detach()
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        error = (actual - expected).abs().max().item() if expected.numel() else 0.0
        if not error <= tol * scale:
            return f"{what} differs from the reference by {error:.3g} (allowed {tol * scale:.3g})"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    backends = args.backends or (["cuda", "triton"] if args.device == "cuda" else ["cpu", "triton"])
    if args.device == "cpu" and "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
    import torch

    import fused_pool
    import fused_pool.reference  # noqa: F401
    from fused_pool.backends import unavailable_reason

    device = torch.device(args.device)
    print(f"fused_pool {fused_pool.__file__}; torch {torch.__version__}; device {args.device}", flush=True)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
    for backend in backends:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            print(f"sanitize_driver: backend {backend!r} cannot run on {args.device}: {reason}", flush=True)
            return 2
    if "triton" in backends:
        from fused_pool.triton_kernels.split_plan import plan_split

        split_len = args.split_length or (1024 if args.size == "toy" else 8192)
        plan = plan_split(1, split_len, split_len, 1, 64, device)
        print(
            f"Triton plan for B=1 L={split_len}: split={plan.split} chunk_rows={plan.chunk_rows}", flush=True
        )

    start = time.perf_counter()
    runs = failed = skipped = 0
    failures = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        cases = build_cases(args, torch, dtype)
        for backend in backends:
            for case in cases:
                for op in case.ops:
                    if op not in args.ops:
                        continue
                    runs += 1
                    label = f"{backend} {op} {dtype_name} {case.name}"
                    t0 = time.perf_counter()
                    try:
                        error = run_case(
                            torch, fused_pool, op, case, backend, device, not args.no_check, dtype_name
                        )
                    except ValueError as exc:
                        if not case.optional:
                            raise
                        skipped += 1
                        print(f"skip {label}: not supported here ({exc})", flush=True)
                        continue
                    except Exception as exc:  # report every case, then fail at the end
                        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if error is not None:
                        failed += 1
                        failures.append(f"{label}: {error}")
                        print(f"FAIL {label}: {error}", flush=True)
                    elif not args.quiet:
                        print(f"ok   {label} ({time.perf_counter() - t0:.2f}s)", flush=True)
    elapsed = time.perf_counter() - start
    print(
        f"sanitize_driver: {runs} runs (fwd+bwd), {runs - failed - skipped} ok, {failed} failed, "
        f"{skipped} skipped, "
        f"backends {' '.join(backends)}, dtypes {' '.join(args.dtypes)}, {elapsed:.1f}s",
        flush=True,
    )
    for line in failures[:20]:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
