"""Microbenchmarks: every fused_pool op against the code people use today, on identical inputs.

    python benchmarks/run.py --quick          # small sweep, < 2 minutes on a 2-core CPU
    python benchmarks/run.py                  # full sweep (CUDA when present)
    python benchmarks/run.py --device cpu --ops masked_mean attention_pool --dtypes float32

linear_pool (SPLADE heads) gets rows of its own from benchmarks/linear.py (its CSV, table and docstring:
TFLOP/s and % of torch.matmul instead of GB/s).

Writes one CSV per run to --out (default benchmarks/results/), named by device, date and time, plots
next to it (matplotlib), and prints a table. Every row names where it was measured: the device (GPU
name, or CPU model and the cores this process may use), torch / triton / CUDA / Python versions,
the commit ("+dirty" with uncommitted changes) and the date. Providers, timing and the byte floor
behind GB/s are described in providers.py and measure.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases as case_sets  # noqa: E402
import linear  # noqa: E402
import measure  # noqa: E402
import providers as provider_set  # noqa: E402
from environment import environment, results_csv, write_rows  # noqa: E402

from fused_pool import reference  # noqa: E402

COLUMNS = [
    "op",
    "layout",
    "dtype",
    "B",
    "L",
    "H",
    "T",
    "heads",
    "kept_fraction",
    "mode",
    "provider",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "gbps",
    "pct_of_copy_bw",
    "copy_bw_gbps",
    "peak_mem_bytes",
    "wall_us_per_call",
    "faults_per_call",
    "floor_bytes",
    "max_abs_err",
    "device",
    "torch",
    "triton",
    "cuda",
    "python",
    "commit",
    "date",
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sweep for a CPU machine")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ops = (*case_sets.OPS, "linear_pool")  # linear_pool: rows of their own (benchmarks/linear.py)
    parser.add_argument("--ops", nargs="+", choices=ops, default=list(ops))
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=tuple(DTYPES),
        default=None,
        help="default: float32 (--quick), float32 and bfloat16 (full sweep)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=case_sets.MODES,
        default=None,
        help="default: fwd fwd+bwd (--quick), all three (full sweep)",
    )
    parser.add_argument("--providers", nargs="+", default=None, help="default: every provider that runs here")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args()


def reference_output(op: str, inputs: case_sets.Inputs, args: list[torch.Tensor]) -> torch.Tensor:
    fn = getattr(reference, op)
    if op == "span_pool":
        return fn(*args, inputs.spans)
    if inputs.mask is not None:
        return fn(*args, inputs.mask)
    return fn(*args, cu_seqlens=inputs.cu_seqlens)


def measure_job(op, mode, provider, inputs, device, budget) -> dict[str, object]:
    """Times `op` by `provider` in `mode`; also its peak memory and its error against the reference."""
    needs_grad = mode != "fwd"
    fn = provider_set.build(provider, op, inputs, grad=needs_grad)
    second = {"attention_pool": inputs.scores, "query_attention_pool": inputs.query}.get(op)
    args = [inputs.x] + ([second] if second is not None else [])
    with torch.no_grad():
        out = fn(*args)
        error = (out.float() - reference_output(op, inputs, args).float()).abs().max().item()
    if not needs_grad:

        def call():
            with torch.no_grad():
                return fn(*args)

    else:
        leaves = [t.detach().requires_grad_() for t in args]
        grad = torch.randn_like(out)
        if mode == "fwd+bwd":

            def call():
                return torch.autograd.grad(fn(*leaves), leaves, grad)

        else:
            graph_out = fn(*leaves)

            def call():
                return torch.autograd.grad(graph_out, leaves, grad, retain_graph=True)

    calls = [0]

    def counted():
        calls[0] += 1
        return call()

    faults_before = measure.minor_page_faults()
    p50, p20, p80 = measure.time_ms(counted, device, budget)
    faults = (measure.minor_page_faults() - faults_before) / max(calls[0], 1)
    return {
        "ms_p50": p50,
        "ms_p20": p20,
        "ms_p80": p80,
        "max_abs_err": error,
        "faults_per_call": round(faults, 1) if device == "cpu" else "",
        "peak_mem_bytes": measure.peak_memory_bytes(call, device),
        "call": call,
    }


def jobs_for(args, names):
    sweep = case_sets.quick_sweep() if args.quick else case_sets.full_sweep()
    dtypes = args.dtypes or (["float32"] if args.quick or args.device == "cpu" else ["float32", "bfloat16"])
    modes = args.modes or (["fwd", "fwd+bwd"] if args.quick else list(case_sets.MODES))
    for case in sweep:
        for dtype in dtypes:
            for op in (op for op in args.ops if op != "linear_pool"):
                for mode in modes:
                    for provider in names:
                        if not provider_set.supports(provider, op, case.layout):
                            continue
                        # --quick: compiling the varlen peers (graph breaks, new graphs) would cost
                        # more than the rest of the sweep on a 2-core machine.
                        if args.quick and provider == "torch:compile" and case.layout == "varlen":
                            continue
                        yield case, dtype, op, mode, provider


def main() -> None:
    args = parse_args()
    device = args.device
    if device == "cpu":
        measure.keep_freed_memory_on_cpu()
    budget = args.budget or (0.1 if args.quick else 0.3 if device == "cpu" else 0.2)
    env = environment(device)
    names = args.providers or provider_set.providers(device)
    jobs = list(jobs_for(args, names))
    copy_bw = measure.copy_bandwidth_gbps(device)
    print(f"{env['device']}: copy bandwidth {copy_bw:.1f} GB/s; {len(jobs)} measurements; providers {names}")
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    progress = tqdm(jobs, unit="run", dynamic_ncols=True) if tqdm else jobs
    inputs_cache: dict = {}
    rows = []
    for case, dtype, op, mode, provider in progress:
        key = (case, dtype)
        if key not in inputs_cache:
            inputs_cache.clear()
            inputs_cache[key] = case_sets.make_inputs(case, DTYPES[dtype], device)
        inputs = inputs_cache[key]
        if tqdm:
            progress.set_description(f"{op} {case.layout} {mode} {provider}")
        try:
            result = measure_job(op, mode, provider, inputs, device, budget)
        except Exception as error:  # a peer that cannot run a case is reported, not fatal
            print(f"\nskipped {provider} {op} {mode} {case.label()} {dtype}: {type(error).__name__}: {error}")
            continue
        call = result.pop("call")
        floor = measure.floor_bytes(op, mode, inputs)
        gbps = floor / (result["ms_p50"] * 1e-3) / 1e9
        rows.append(
            {
                "op": op,
                "layout": case.layout,
                "dtype": dtype,
                "B": inputs.batch,
                "L": case.length if case.layout == "padded" else inputs.max_seqlen,
                "H": case.hidden,
                "T": inputs.kept_tokens,
                "heads": case.heads,
                "kept_fraction": round(inputs.kept_tokens / inputs.rows, 4),
                "mode": mode,
                "provider": provider,
                **result,
                "gbps": gbps,
                "pct_of_copy_bw": 100 * gbps / copy_bw,
                "copy_bw_gbps": copy_bw,
                "floor_bytes": floor,
                "wall_us_per_call": measure.wall_us_per_call(call, device) if case.tag == "tiny" else "",
                **env,
            }
        )

    if rows:
        write_report(rows, args, env)
    if "linear_pool" in args.ops:
        dtypes = [DTYPES[d] for d in args.dtypes or []]
        linear_rows = linear.run(device, args.quick, budget, env, args.providers, dtypes, args.modes)
        print(f"\nwrote {linear.write_csv(linear_rows, args.out, env, args.quick)}")
        linear.print_table(linear_rows)


def write_report(rows: list[dict], args: argparse.Namespace, env: dict[str, str]) -> None:
    """The CSV of the pooling ops' rows, their table and plots."""
    path = results_csv(args.out, "", env["device"], args.quick)
    write_rows(path, rows, COLUMNS, ".6g")
    print(f"\nwrote {path}")
    print_table(rows)
    if not args.no_plots:
        try:
            import plot
        except ImportError as error:
            print(f"no plots ({error}); pip install matplotlib")
        else:
            for figure in plot.plot_all(path):
                print(f"wrote {figure}")


def print_table(rows: list[dict]) -> None:
    """One line per (op, case, dtype, mode): ms per provider, and the fused speedups."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (
            row["op"],
            row["layout"],
            row["B"],
            row["L"],
            row["H"],
            row["kept_fraction"],
            row["dtype"],
            row["mode"],
        )
        groups.setdefault(key, {})[row["provider"]] = row
    names = sorted({row["provider"] for row in rows}, key=lambda n: (not n.startswith("fused"), n))
    header = (
        f"{'op':<21}{'case':<30}{'mode':<8}"
        + "".join(f"{n:>22}" for n in names)
        + "  speedup vs eager / compile"
    )
    print(header)
    print("-" * len(header))
    for (op, layout, batch, length, hidden, kept, dtype, mode), by_provider in groups.items():
        case = f"{layout} B={batch} L={length} H={hidden} {kept:.0%} {dtype}"
        cells = "".join(
            f"{by_provider[n]['ms_p50']:>12.3f}ms {by_provider[n]['pct_of_copy_bw']:>4.0f}%bw"
            if n in by_provider
            else f"{'':>22}"
            for n in names
        )
        fused = [r["ms_p50"] for n, r in by_provider.items() if n.startswith("fused_pool:")]
        speed = ""
        if fused:
            best = min(fused)
            speed = " / ".join(
                f"{by_provider[p]['ms_p50'] / best:.2f}x" if p in by_provider else "-"
                for p in ("torch:eager", "torch:compile")
            )
        print(f"{op:<21}{case:<30}{mode:<8}{cells}  {speed}")


if __name__ == "__main__":
    main()
