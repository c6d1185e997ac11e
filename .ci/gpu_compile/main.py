"""`.ci/check_gpu_compile`: every Triton specialization and every CUDA kernel of fused_pool must
compile for sm_80 and sm_90 without spilling, on a machine with no GPU.

- Triton: under CI's Triton (this Python's) and under the GPU image's Triton (3.6.0, in a side venv
  created on first use), see triton_check.py.
- CUDA: `nvcc -cubin -Werror all-warnings -Xptxas -v` of csrc/cuda/*.cu for sm_80 and sm_90 (the
  one place CI compiles them); warnings, and spill stores / loads except for the allowlisted
  instantiations below, fail.

Prints a table (registers, stack, shared memory, 128-bit global loads / stores, async copies),
the failing specializations, and last `check_gpu_compile: N specializations, E errors, S spills`.
Exits 1 if E or S > 0, unless --report-only (or FUSED_POOL_GPU_COMPILE_REPORT_ONLY=1).
Stdlib only: it runs before anything is imported from the project.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import sass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SIDE_TRITON = "3.6.0"  # the GPU image's Triton
SIDE_VENV = os.environ.get("FUSED_POOL_TRITON36_VENV", os.path.join(REPO, ".ci", ".venv-triton36"))
SIDE_PACKAGES = ("torch==2.13.0", f"triton=={SIDE_TRITON}", "numpy")
ARCHS = (80, 90)

# CUDA kernels allowed to spill, with the reason (a regex on the demangled name).
CUDA_SPILL_ALLOWLIST = (
    (
        r"<double\b",
        "float64 instantiation: exists for gradcheck and parity with the CPU backend, not a fast path; "
        "a spill costs speed there, not correctness",
    ),
)

# Triton specializations that spill at most this many bytes are listed as known spills, not failures:
# 0 in CI. For local experiments only (e.g. FUSED_POOL_KNOWN_SPILL_BYTES=8 while trying a tile
# shape). The row-tile kernels launch with an explicit register budget (triton_kernels/launch.py,
# tile_launch), without which ptxas spilled 8 bytes at its occupancy tiers in 17 specializations.
TRITON_KNOWN_SPILL_BYTES = int(os.environ.get("FUSED_POOL_KNOWN_SPILL_BYTES", "0"))


def log(message: str) -> None:
    sys.stderr.write(f"[check_gpu_compile {time.strftime('%H:%M:%S')}] {message}\n")  # one write: threads
    sys.stderr.flush()


# --- Triton --------------------------------------------------------------------------------------


def side_venv_python() -> str:
    """The side venv's Python, created (or re-created) when missing or not the expected versions."""
    python = os.path.join(SIDE_VENV, "bin", "python")
    stamp = os.path.join(SIDE_VENV, "fused_pool_stamp.txt")
    wanted = " ".join(SIDE_PACKAGES)
    if os.path.exists(stamp) and open(stamp).read().strip() == wanted and os.path.exists(python):
        return python
    log(f"creating {os.path.relpath(SIDE_VENV, REPO)} ({wanted})")
    shutil.rmtree(SIDE_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", SIDE_VENV], check=True)
    with open(os.path.join(SIDE_VENV, ".gitignore"), "w") as f:
        f.write("*\n")  # as Python 3.13's venv does: git and ruff skip it even if not listed
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *SIDE_PACKAGES],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    with open(stamp, "w") as f:
        f.write(wanted + "\n")
    return python


def run_triton(python: str, args, workdir: str, tag: str) -> dict:
    out = os.path.join(workdir, f"triton-{tag}.json")
    command = [python, os.path.join(HERE, "triton_check.py"), "--repo", REPO, "--out", out]
    command += ["--arch", ",".join(map(str, args.arch)), "--jobs", str(args.jobs)]
    if args.only:
        command += ["--only", args.only]
    if args.all_variants:
        command += ["--all-variants"]
    if args.cache:
        command += ["--cache", os.path.join(os.path.abspath(args.cache), tag)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    log(f"Triton ({tag}): collecting and compiling")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(out):
        return {
            "triton": tag,
            "specs": [],
            "errors": [f"the Triton check under {python} failed:\n{done.stderr.strip()[-3000:]}"],
            "warnings": [],
            "skipped": [],
            "cases": 0,
        }
    with open(out) as f:
        report = json.load(f)
    log(
        f"Triton {report['triton']}: {len(report['specs'])} specializations compiled (of "
        f"{report['distinct']} distinct) from {report['cases']} cases "
        f"in {time.perf_counter() - start:.0f} s (compile CPU {report['compile_cpu_seconds']:.0f} s)"
    )
    return report


# --- CUDA ----------------------------------------------------------------------------------------


def nvcc_path() -> str | None:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def cuobjdump_path() -> str | None:
    """The CUDA toolkit's cuobjdump, else the one in this Python's Triton wheel."""
    nvcc = nvcc_path()
    candidates = [os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump")] if nvcc else []
    candidates.append(shutil.which("cuobjdump"))
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            candidates.append(
                os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
            )
    except (ImportError, ValueError):
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?(?:,|$)")


def demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = {}
    for name, readable in zip(names, out.splitlines(), strict=False):
        readable = re.sub(r"^void ", "", readable)
        readable = readable[: readable.index("(", readable.rfind(">") + 1 if ">" in readable else 0)]
        readable = readable.replace("(anonymous namespace)::", "").replace("fused_pool::cuda::", "")
        pretty[name] = readable
    return pretty


def compile_cuda(source: str, arch: int, workdir: str, nvcc: str, cuobjdump: str | None) -> dict:
    cubin = os.path.join(workdir, f"{os.path.basename(source)}.sm_{arch}.cubin")
    command = [nvcc, "-cubin", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Werror", "all-warnings"]
    command += ["-Xptxas", "-v", "-o", cubin, source]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    result = {"source": os.path.relpath(source, REPO), "arch": arch, "kernels": [], "error": None}
    if done.returncode != 0:
        result["error"] = done.stderr.strip()[-3000:]
        return result
    kernels: dict[str, dict] = {}
    current = None
    for line in done.stderr.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = kernels.setdefault(m.group(1), {"name": m.group(1)})
        elif current is not None and (m := _PTXAS_PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current["regs"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared"] = int(smem.group(1)) if smem else 0
    stats = sass.resources(cuobjdump, cubin, with_sass=True) if cuobjdump else {}
    pretty = demangle(list(kernels))
    for name, kernel in kernels.items():
        s = stats.get(name, {})
        kernel.update(
            kernel=pretty[name],
            ldg128=s.get("ldg128", "?"),
            stg128=s.get("stg128", "?"),
            async_copies=s.get("async_copies", "?"),
        )
        result["kernels"].append(kernel)
    return result


def run_cuda(workdir: str) -> list[dict]:
    nvcc = nvcc_path()
    sources = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
    if nvcc is None:
        return [{"source": "nvcc", "arch": 0, "kernels": [], "error": "nvcc not found (set NVCC)"}]
    cuobjdump = cuobjdump_path()
    log(f"CUDA: nvcc -Xptxas -v on {len(sources)} sources for sm_80 and sm_90")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(compile_cuda, s, a, workdir, nvcc, cuobjdump) for s in sources for a in ARCHS]
        return [j.result() for j in jobs]


# --- report --------------------------------------------------------------------------------------


def _span(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def print_table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def triton_rows(report: dict, full: bool) -> list[list]:
    """One row per (arch, kernel, x dtype, constexpr flags, warps); --full-table: per specialization.
    A group's variants differ in pointer dtypes (mask), ints specialized to 1, divisibility."""
    groups: dict[tuple, list[dict]] = {}
    for spec in report["specs"]:
        key = (spec["arch"], spec["kernel"], spec["x"], spec["flags"], spec.get("warps"))
        if full:
            key += (spec["ones"], spec["signature"])
        groups.setdefault(key, []).append(spec)
    rows = []
    for (arch, kernel, x_dtype, flags, warps, *_), specs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        ok = [s for s in specs if not s["error"]]
        pipelined = {bool(s["async_copies"]) for s in ok}
        rows.append(
            [
                report["triton"],
                f"sm_{arch}",
                kernel.lstrip("_"),
                x_dtype,
                f"{flags} w={warps}",
                f"{len(specs)}/{sum(s.get('variants', 1) for s in specs)}",
                _span(s["regs"] for s in ok),
                _span(s["stack"] for s in ok),
                _span(s["shared"] for s in ok),
                _span(s["ldg128"] for s in ok),
                _span(s["stg128"] for s in ok),
                {frozenset([True]): "yes", frozenset([False]): "no"}.get(frozenset(pipelined), "some")
                if ok
                else "-",
                sum(1 for s in specs if s["error"]) or "",
            ]
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--report-only", action="store_true", help="print everything, exit 0 anyway")
    parser.add_argument(
        "--triton", choices=("all", "ci", "side", "none"), default="all", help="which Tritons"
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    parser.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes per Triton (default 2)")
    parser.add_argument("--only", help="only the cases whose label contains this (e.g. 'query_attention')")
    parser.add_argument("--full-table", action="store_true", help="one row per specialization")
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="compile every distinct specialization (~3x as many), not one per kernel configuration",
    )
    parser.add_argument("--json", help="also write everything found to this file")
    parser.add_argument(
        "--cache", help="keep Triton's compile cache in this folder across runs (default: a cold one)"
    )
    args = parser.parse_args()
    args.arch = [int(a) for a in args.arch.split(",")]
    report_only = args.report_only or os.environ.get("FUSED_POOL_GPU_COMPILE_REPORT_ONLY", "0") not in (
        "",
        "0",
    )

    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="check_gpu_compile_")
    try:
        reports: list[dict] = []
        side: dict = {}

        # The side venv's Triton runs alongside CI's: the venv is built (mostly I/O) while CI's
        # Triton compiles, and both compile pools share the cores afterwards.
        def side_job():
            try:
                side["report"] = run_triton(side_venv_python(), args, workdir, SIDE_TRITON)
            except (subprocess.CalledProcessError, OSError) as error:
                detail = getattr(error, "stderr", b"") or b""
                detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
                side["report"] = {
                    "triton": SIDE_TRITON,
                    "specs": [],
                    "errors": [f"cannot create the Triton {SIDE_TRITON} venv: {error}\n{detail[-2000:]}"],
                    "warnings": [],
                    "skipped": [],
                    "cases": 0,
                }

        side_thread = threading.Thread(target=side_job)
        if args.triton in ("all", "side"):
            side_thread.start()
        if args.triton in ("all", "ci"):
            reports.append(run_triton(sys.executable, args, workdir, "ci"))
        cuda = [] if args.no_cuda else run_cuda(workdir)
        if args.triton in ("all", "side"):
            side_thread.join()
            reports.append(side["report"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    # --- the table
    headers = [
        "triton",
        "arch",
        "kernel",
        "x",
        "constexprs",
        "n",
        "regs",
        "stack",
        "smem",
        "ldg128",
        "stg128",
    ]
    headers += ["cp.async", "errors"]
    rows = [row for report in reports for row in triton_rows(report, args.full_table)]
    if rows:
        print(
            "Triton kernel configurations (n: compiled / distinct specializations the matrix produced; "
            "columns give ranges over the compiled ones)"
        )
        print_table(headers, rows)
    # CUDA: one row per kernel, "sm_80 / sm_90" values side by side.
    by_kernel: dict[tuple, dict] = {}
    for result in cuda:
        for k in result["kernels"]:
            by_kernel.setdefault((result["source"], k["kernel"]), {})[result["arch"]] = k
    cuda_rows = []
    for (source, name), per_arch in by_kernel.items():

        def both(field, per_arch=per_arch):
            return "/".join(str(per_arch.get(a, {}).get(field, "-")) for a in ARCHS)

        for k in per_arch.values():
            k["spill"] = k.get("spill_stores", 0) + k.get("spill_loads", 0)
            k["async"] = "yes" if k.get("async_copies") else "no"
        cuda_rows.append(
            [os.path.basename(source), name]
            + [both(f) for f in ("regs", "stack", "spill", "shared", "ldg128", "stg128", "async")]
        )
    if cuda_rows:
        print("\nCUDA kernels (values: sm_80/sm_90)")
        cuda_headers = ["source", "kernel", "regs", "stack", "spill", "smem", "ldg128", "stg128", "cp.async"]
        print_table(cuda_headers, cuda_rows)

    # --- what fails
    errors, spills, notes, known_spills = [], [], [], []
    for report in reports:
        version = report["triton"]
        errors += [f"triton {version}: {e}" for e in report["errors"]]
        for s in report["specs"]:
            where = (
                f"triton {version} sm_{s['arch']} {s['kernel']} [{s['x']}: {s['flags']} w={s['warps']}"
                f"{' ' + s['ones'] if s['ones'] else ''}] (first from: {s['case']})"
            )
            if s["error"]:
                errors.append(f"{where}\n    {s['error'].replace(chr(10), chr(10) + '    ')}")
            elif s["stack"] > 0:
                (known_spills if s["stack"] <= TRITON_KNOWN_SPILL_BYTES else spills).append(
                    f"{where}: stack {s['stack']} B, {s['regs']} registers"
                )
        notes += [f"triton {version}: {w}" for w in report["warnings"]]
    skipped = sorted({s for report in reports for s in report["skipped"]})
    cuda_count = 0
    for result in cuda:
        if result["error"]:
            errors.append(f"nvcc sm_{result['arch']} {result['source']}:\n    {result['error']}")
        for k in result["kernels"]:
            cuda_count += 1
            if k.get("spill_stores", 0) + k.get("spill_loads", 0) > 0:
                what = (
                    f"nvcc sm_{result['arch']} {k['kernel']}: {k['spill_stores']} B spill stores, "
                    f"{k['spill_loads']} B spill loads, {k.get('regs')} registers"
                )
                reason = next((r for p, r in CUDA_SPILL_ALLOWLIST if re.search(p, k["kernel"])), None)
                (notes.append(f"{what} (allowed: {reason})") if reason else spills.append(what))

    if skipped:
        print(f"\nNot compiled: {len(skipped)} combinations the public functions reject, e.g. {skipped[0]}")
    known = f"Known spills of at most {TRITON_KNOWN_SPILL_BYTES} B (tolerated: TRITON_KNOWN_SPILL_BYTES)"
    for title, lines in (("Notes", notes), (known, known_spills), ("Errors", errors), ("Spills", spills)):
        if lines:
            print(f"\n{title} ({len(lines)}):")
            for line in lines:
                print(f"  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": reports, "cuda": cuda}, f, indent=1)
    total = sum(len(r["specs"]) for r in reports) + cuda_count
    print(f"\n(wall time {time.perf_counter() - start:.0f} s)")
    if known_spills:
        tolerated = f"{len(known_spills)} known spills of at most {TRITON_KNOWN_SPILL_BYTES} B tolerated"
        print(f"check_gpu_compile: {tolerated}")
    print(f"check_gpu_compile: {total} specializations, {len(errors)} errors, {len(spills)} spills")
    return 0 if report_only or not (errors or spills) else 1


if __name__ == "__main__":
    sys.exit(main())
