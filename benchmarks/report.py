"""A Markdown table of a benchmark CSV, for the README (numbers copied from the file, never typed).

python benchmarks/report.py benchmarks/results/<run>.csv [--mode fwd+bwd] [--layout padded]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

PROVIDERS = (
    "fused_pool:triton",
    "fused_pool:cuda",
    "fused_pool:cpu",
    "torch:eager",
    "torch:compile",
    "torch:segment_reduce",
    "st:pooling",
)


def case_of(row: dict) -> str:
    if row["layout"] == "varlen":
        return f"varlen B={row['B']} T={row['T']} H={row['H']}"
    return f"B={row['B']} L={row['L']} H={row['H']} kept {float(row['kept_fraction']):.0%}"


def markdown(rows: list[dict]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        groups[(row["op"], case_of(row), row["dtype"], row["mode"])][row["provider"]] = row
    present = [p for p in PROVIDERS if any(p in g for g in groups.values())]
    header = [
        "op",
        "case",
        "dtype",
        "mode",
        *(f"{p} ms" for p in present),
        "fused vs eager",
        "fused vs compile",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (op, case, dtype, mode), by_provider in groups.items():
        cells = [f"{float(by_provider[p]['ms_p50']):.3f}" if p in by_provider else "" for p in present]
        fused = [float(r["ms_p50"]) for p, r in by_provider.items() if p.startswith("fused_pool:")]
        ratios = [
            f"{float(by_provider[p]['ms_p50']) / min(fused):.2f}x" if fused and p in by_provider else ""
            for p in ("torch:eager", "torch:compile")
        ]
        lines.append(f"| {op} | {case} | {dtype} | {mode} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("csv")
    parser.add_argument("--mode", default=None)
    parser.add_argument("--layout", default=None)
    args = parser.parse_args()
    with open(args.csv) as handle:
        rows = list(csv.DictReader(handle))
    rows = [r for r in rows if args.mode in (None, r["mode"]) and args.layout in (None, r["layout"])]
    first = rows[0]
    versions = f"torch {first['torch']}, triton {first['triton'] or '-'}, commit {first['commit']}"
    bandwidth = f"device-copy bandwidth {float(first['copy_bw_gbps']):.1f} GB/s"
    print(f"{first['device']}, {versions}, {first['date']}; {bandwidth}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
