"""probe_attention_pool and fused_pool.nn.MAPHead against the attention-pooling heads people run today.

    python benchmarks/probe.py --quick        # eager only, short timings: < 1 minute on 2 CPU cores
    python benchmarks/probe.py                # eager and torch.compile (CUDA when present)
    python benchmarks/probe.py --device cpu --budget 0.5

Cases (B = 4, the dtype is float32 on CPU, bfloat16 on CUDA):
- SigLIP so400m: L = 729 tokens, H = 1152, 16 heads, MLP 4304 (SiglipMultiheadAttentionPoolingHead);
- AIMv2 large: L = 256 tokens, H = 1024, 8 heads (Aimv2AttentionPoolingHead, no query projection).

Attention with the projections (one learned query per head -> (B, 1, H)); each provider computes
softmax(q_h . W_k,h x / sqrt(d)) weighted sums of W_v,h x + b_v for every head:
- `fused_pool:<backend>`: the keys folded into H-wide probes, one probe_attention_pool call, then the
  value projection of the pooled tokens (what MAPHead does);
- `fused_pool:<backend> op only`: the probe_attention_pool call alone on already folded probes;
- `torch:sdpa`: K and V projections of every token, then F.scaled_dot_product_attention;
- `torch:eager`: the same projections, then softmax(q K^T) V written out.
The heads: `hf` (the Hugging Face head itself) against `MAPHead:<backend>` (MAPHead.from_siglip /
from_aimv2 over the same parameters), eager, and with torch.compile (`compile`) unless --quick.

Modes: fwd (no grad) and fwd+bwd (gradients of x and of every parameter). Every provider's output is
checked against the source computation first. Writes benchmarks/results/probe_<device>_<date>.csv
(ms p50 / p20 / p80 and the peak memory of one call) and prints a table with each provider's speedup
over the unfused baseline of its group (`torch:eager` for the attention, `hf` for the heads).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from environment import environment, results_csv, write_rows  # noqa: E402
from measure import keep_freed_memory_on_cpu, peak_memory_bytes, time_ms  # noqa: E402

import fused_pool  # noqa: E402
from fused_pool.backends import unavailable_reason  # noqa: E402
from fused_pool.nn import MAPHead  # noqa: E402

COLUMNS = ["case", "group", "B", "L", "H", "heads", "dtype", "mode", "provider", "ms_p50", "ms_p20", "ms_p80"]
COLUMNS += ["peak_mib"]

# (label, tokens, hidden, heads, MLP width or None for AIMv2's head)
CASES = [("SigLIP so400m", 729, 1152, 16, 4304), ("AIMv2 large", 256, 1024, 8, None)]


def fused_backends(device: torch.device) -> list[str]:
    """Backends whose probe_attention kernels run (and are compiled, not interpreted) on device."""
    found = []
    for backend in fused_pool.available_backends() + ["torch"]:
        if backend in found or unavailable_reason(backend, device) is not None:
            continue
        if backend == "triton" and device.type == "cpu":  # Triton's interpreter: not timed
            continue
        if backend in ("cpu", "cuda") and not hasattr(torch.ops.fused_pool, "ext_probe_attention_fwd"):
            continue  # an extension built before the probe_attention kernels
        found.append(backend)
    return found


# --- attention with the projections ----------------------------------------------------------------


def attention_providers(heads: int, backends: list[str]) -> dict:
    """name -> fn(x, q, w_k, b_k, w_v, b_v) -> (B, 1, H); q (1, H) is the projected query."""

    def split(t, batch):  # (B, L, H) -> (B, heads, L, d)
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    def projected(x, q, w_k, b_k, w_v, b_v):
        batch = x.shape[0]
        query = q.view(1, heads, 1, -1).expand(batch, -1, -1, -1)
        return query, split(F.linear(x, w_k, b_k), batch), split(F.linear(x, w_v, b_v), batch)

    def merged(out):  # (B, heads, 1, d) -> (B, 1, H)
        return out.transpose(1, 2).reshape(out.shape[0], 1, -1)

    def sdpa(*args):
        return merged(F.scaled_dot_product_attention(*projected(*args)))

    def eager(*args):
        query, key, value = projected(*args)
        scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
        return merged(torch.softmax(scores, dim=-1) @ value)

    def folded(backend):
        def fn(x, q, w_k, b_k, w_v, b_v):
            hidden = x.shape[-1]
            d = hidden // heads
            probes = torch.einsum("hd,hdi->hi", q.view(heads, d), w_k.view(heads, d, hidden))
            pooled = fused_pool.probe_attention_pool(x, probes, scale=d**-0.5, backend=backend)
            values = torch.einsum("bhi,hdi->bhd", pooled, w_v.view(heads, d, hidden))
            return values.reshape(x.shape[0], 1, hidden) + b_v

        return fn

    found = {f"fused_pool:{b}": folded(b) for b in backends}
    found.update({"torch:sdpa": sdpa, "torch:eager": eager})
    return found


def attention_rows(label, x, heads, backends, budget, generator) -> list[dict]:
    hidden = x.shape[-1]

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(x)

    # q (1, H) of norm ~ sqrt(H) and weights of std 1/sqrt(H): scores of order 1.
    q, b_k, b_v = randn(1, hidden), randn(hidden), randn(hidden)
    w_k, w_v = randn(hidden, hidden, std=hidden**-0.5), randn(hidden, hidden, std=hidden**-0.5)
    params = [q, w_k, b_k, w_v, b_v]
    expected = attention_providers(heads, [])["torch:eager"](x.double(), *(p.double() for p in params))
    rows = []
    for name, fn in attention_providers(heads, backends).items():
        torch.testing.assert_close(fn(x, *params).double(), expected, atol=2e-3, rtol=2e-3)
        rows += timed(label, "attention", x, heads, name, lambda x, *p, fn=fn: fn(x, *p), params, budget)
    d = hidden // heads
    probes = torch.einsum("hd,hdi->hi", params[0].view(heads, d), params[1].view(heads, d, hidden))
    for backend in backends:
        op = lambda x, probes, b=backend: fused_pool.probe_attention_pool(x, probes, scale=d**-0.5, backend=b)  # noqa: E731
        rows += timed(label, "attention", x, heads, f"fused_pool:{backend} op only", op, [probes], budget)
    return rows


# --- the heads -------------------------------------------------------------------------------------


def hf_head(hidden: int, heads: int, mlp: int | None):
    if mlp is None:
        from transformers import Aimv2VisionConfig
        from transformers.models.aimv2.modeling_aimv2 import Aimv2AttentionPoolingHead

        return Aimv2AttentionPoolingHead(Aimv2VisionConfig(hidden_size=hidden, num_attention_heads=heads))
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    config = SiglipVisionConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=mlp)
    return SiglipMultiheadAttentionPoolingHead(config)


def head_rows(label, x, heads, mlp, backends, budget, compiled) -> list[dict]:
    torch.manual_seed(0)
    source = hf_head(x.shape[2], heads, mlp).to(x)
    modules = {"hf": source}
    for backend in backends:
        taken = copy.deepcopy(source)
        modules[f"MAPHead:{backend}"] = (
            MAPHead.from_aimv2(taken, backend=backend)
            if mlp is None
            else MAPHead.from_siglip(taken, backend=backend)
        )
    if compiled:
        modules.update({f"{name} compile": torch.compile(m) for name, m in list(modules.items())})
    expected = copy.deepcopy(source).double()(x.double())
    rows = []
    for name, module in modules.items():
        torch.testing.assert_close(module(x).double(), expected, atol=2e-3, rtol=2e-3)
        params = list(module.parameters())
        rows += timed(label, "head", x, heads, name, lambda x, *p, m=module: m(x), params, budget)
    return rows


# --- timing ----------------------------------------------------------------------------------------


def timed(label, group, x, heads, provider, fn, params, budget) -> list[dict]:
    """fwd and fwd+bwd rows of fn(x, *params): time and the peak memory of one call."""
    device = x.device.type
    xg = x.detach().requires_grad_()
    leaves = [p.detach().requires_grad_() if group == "attention" else p for p in params]
    out = fn(x, *params)
    grad = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            fn(x, *leaves)

    def forward_backward():
        torch.autograd.grad(fn(xg, *leaves), [xg, *leaves], grad, allow_unused=True)

    rows = []
    for mode, call in (("fwd", forward), ("fwd+bwd", forward_backward)):
        p50, p20, p80 = time_ms(call, device, budget)
        peak = peak_memory_bytes(call, device) / 2**20
        rows.append(
            dict(case=label, group=group, B=x.shape[0], L=x.shape[1], H=x.shape[2], heads=heads,
                 dtype=str(x.dtype)[6:], mode=mode, provider=provider, ms_p50=p50, ms_p20=p20,
                 ms_p80=p80, peak_mib=peak)
        )  # fmt: skip
        print(f"  {label} {group} {mode} {provider}: {p50:.2f} ms, {peak:.1f} MiB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per measurement")
    parser.add_argument("--quick", action="store_true", help="eager only, 0.05 s per measurement")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.device == "cpu":
        keep_freed_memory_on_cpu()
    budget = 0.05 if args.quick else args.budget
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = fused_backends(device)
    print(f"fused backends timed: {backends}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for label, tokens, hidden, heads, mlp in CASES:
        x = torch.randn(args.batch, tokens, hidden, generator=generator).to(device, dtype)
        rows += attention_rows(label, x, heads, backends, budget, generator)
        rows += head_rows(label, x, heads, mlp, backends, budget, compiled=not args.quick)
    env = environment(args.device)
    path = results_csv(args.out, "probe", env["device"], args.quick)
    write_rows(path, [{**row, **env} for row in rows], COLUMNS + list(env))
    print(f"wrote {path}")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Markdown: one line per (case, group, mode, provider), with the speedup over the group's
    unfused baseline (torch:eager for the attention, hf for the heads)."""
    baseline = {"attention": "torch:eager", "head": "hf"}
    base = {
        (r["case"], r["group"], r["mode"]): r["ms_p50"] for r in rows if r["provider"] == baseline[r["group"]]
    }
    print("| case | group | mode | provider | ms (p50) | peak MiB | speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = base[r["case"], r["group"], r["mode"]] / r["ms_p50"]
        print(
            f"| {r['case']} | {r['group']} | {r['mode']} | {r['provider']} | {r['ms_p50']:.3f} "
            f"| {r['peak_mib']:.1f} | {speedup:.2f}x |"
        )


if __name__ == "__main__":
    main()
