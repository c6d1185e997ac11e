"""Plots of a benchmark CSV (benchmarks/run.py writes them next to the CSV).

    python benchmarks/plot.py benchmarks/results/<device>_<date>.csv

- <stem>_gbps_<mode>.png: achieved GB/s of every provider, per op and shape;
- <stem>_speedup.png: fwd+bwd speedup of the fused backend over torch eager and torch.compile;
- <stem>_summary.png: the README figure: fwd+bwd speedups on the largest padded shape and varlen.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OPS = ("masked_mean", "masked_max", "masked_mean_max", "attention_pool", "query_attention_pool")
COLORS = {
    "fused_pool:triton": "#1f77b4",
    "fused_pool:cuda": "#17becf",
    "fused_pool:cpu": "#2ca02c",
    "torch:eager": "#d62728",
    "torch:compile": "#ff7f0e",
    "torch:segment_reduce": "#9467bd",
    "st:pooling": "#8c564b",
}


def _case(row: dict) -> str:
    if row["layout"] == "varlen":
        return f"varlen T={int(row['T']) // 1000}k H={row['H']}"
    return f"B={row['B']} L={row['L']} H={row['H']} {float(row['kept_fraction']):.0%}"


def _load(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _title(rows: list[dict]) -> str:
    first = rows[0]
    return f"{first['device']} | torch {first['torch']} | {first['date']} | commit {first['commit']}"


def _best_fused(by_provider: dict[str, float]) -> float | None:
    fused = [ms for name, ms in by_provider.items() if name.startswith("fused_pool:")]
    return min(fused) if fused else None


def plot_gbps(rows: list[dict], mode: str, path: Path) -> Path | None:
    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return None
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        op_rows = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(f"{_case(r)} {r['dtype']}" for r in op_rows))
        names = list(dict.fromkeys(r["provider"] for r in op_rows))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = {f"{_case(r)} {r['dtype']}": float(r["gbps"]) for r in op_rows if r["provider"] == name}
            xs = [j + i * width for j, case in enumerate(cases) if case in values]
            ax.bar(xs, [values[c] for c in cases if c in values], width, label=name, color=COLORS.get(name))
        copy_bw = float(op_rows[0]["copy_bw_gbps"])
        ax.axhline(copy_bw, color="gray", linestyle="--", linewidth=1, label="device copy")
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=15, fontsize=7, ha="right"
        )
        ax.set_ylabel("GB/s (byte floor)")
        ax.set_title(f"{op} {mode}", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(_title(rows), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _speedups(
    rows: list[dict], mode: str = "fwd+bwd"
) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """op -> case -> (speedup over eager, over compile) of the fastest fused backend."""
    times: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["mode"] == mode:
            times[(r["op"], f"{_case(r)} {r['dtype']}")][r["provider"]] = float(r["ms_p50"])
    result: dict[str, dict[str, tuple]] = defaultdict(dict)
    for (op, case), by_provider in times.items():
        best = _best_fused(by_provider)
        if best is None:
            continue
        result[op][case] = tuple(
            by_provider[name] / best if name in by_provider else None
            for name in ("torch:eager", "torch:compile")
        )
    return result


def plot_speedup(rows: list[dict], path: Path, cases_filter=None, title_suffix="") -> Path | None:
    speedups = _speedups(rows)
    ops = [op for op in OPS if op in speedups]
    if not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(3.4 * len(ops), 4), squeeze=False, sharey=True)
    for ax, op in zip(axes[0], ops, strict=True):
        cases = [c for c in speedups[op] if cases_filter is None or cases_filter(c)]
        for i, (label, index, color) in enumerate(
            (("vs eager", 0, "#d62728"), ("vs torch.compile", 1, "#ff7f0e"))
        ):
            values = [speedups[op][c][index] or 0 for c in cases]
            ax.bar([j + i * 0.4 for j in range(len(cases))], values, 0.4, label=label, color=color)
        ax.axhline(1, color="gray", linewidth=1)
        ax.set_xticks([j + 0.2 for j in range(len(cases))], cases, rotation=30, fontsize=7, ha="right")
        ax.set_title(op, fontsize=10)
    axes[0][0].set_ylabel("fused speedup, fwd+bwd (x)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(rows) + title_suffix, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(csv_path: Path) -> list[Path]:
    csv_path = Path(csv_path)
    rows = _load(csv_path)
    if not rows:
        return []
    stem = csv_path.with_suffix("")
    written = [
        plot_gbps(rows, mode, Path(f"{stem}_gbps_{mode.replace('+', '_')}.png"))
        for mode in ("fwd", "bwd", "fwd+bwd")
    ]
    written.append(plot_speedup(rows, Path(f"{stem}_speedup.png")))
    # Summary: the largest padded case with padding, and varlen.
    padded = [r for r in rows if r["layout"] == "padded" and float(r["kept_fraction"]) < 1]
    if padded:
        biggest = max(padded, key=lambda r: int(r["B"]) * int(r["L"]) * int(r["H"]))
        keep = {f"{_case(biggest)} {biggest['dtype']}"} | {
            f"{_case(r)} {r['dtype']}" for r in rows if r["layout"] == "varlen"
        }
        written.append(plot_speedup(rows, Path(f"{stem}_summary.png"), lambda c: c in keep, " | fwd+bwd"))
    return [p for p in written if p is not None]


if __name__ == "__main__":
    for figure in plot_all(Path(sys.argv[1])):
        print(figure)
