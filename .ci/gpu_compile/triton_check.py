"""Compiles every Triton specialization of fused_pool for sm_80 / sm_90 on a machine with no GPU.

Run by `.ci/check_gpu_compile` under one Triton (the project's venv, or the side venv with the GPU
image's Triton); writes a JSON report. How, without a GPU and without TRITON_INTERPRET:

1. Triton's active driver is a stand-in whose target is GPUTarget("cuda", arch, 32).
2. The public functions run, forward and backward, on CPU tensors over the matrix in cases.py,
   with the backend resolved to "triton"; the launchers believe they have a GPU of 108 (sm_80) or
   132 (sm_90) SMs where they size their grids. Triton's `jit_cache_hook` receives every
   specialization a launch would compile (signature, constexprs, attributes, options) and returns
   True, which makes Triton skip the compile and the launch: nothing runs, nothing is read back.
3. Each distinct specialization is compiled once (`JITFunction.preload` of the hook's
   specialization data) in a pool of processes, and its cubin is read with the wheel's cuobjdump:
   registers, stack (> 0: a spill), shared memory, 128-bit global loads / stores, async copies.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
import types
import warnings

import sass

# Max shared memory per block (opt-in) that a launch may ask for; Triton checks this when it loads
# a kernel, which never happens here.
MAX_SHARED = {80: 166912, 90: 232448}
SMS = {80: 108, 90: 132}  # A100, H100 SXM

_state: dict = {}


# --- Triton without a GPU ------------------------------------------------------------------------


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: a target to compile for, and nothing to launch on."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = types.SimpleNamespace(get_device_properties=self._properties)

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.arch  # one binder cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def _properties(self, device=None) -> dict:
        return {
            "max_shared_mem": MAX_SHARED[self.arch],
            "multiprocessor_count": SMS[self.arch],
            "max_num_regs": 65536,
            "warpSize": 32,
            "sm_clock_rate": 1_980_000,
            "mem_clock_rate": 2_619_000,
            "mem_bus_width": 5120,
        }


def activate(arch: int) -> None:
    from triton.runtime.driver import driver

    driver.set_active(CompileOnlyDriver(arch))


def make_importable(repo: str, farm: str) -> None:
    """Imports fused_pool from the work tree, with fused_pool.triton_kernels = <repo>/triton_kernels
    (what the editable install maps), under any Python: a folder of symlinks, first on sys.path."""
    package = os.path.join(farm, "fused_pool")
    if not os.path.isdir(package):
        os.makedirs(package)
        source = os.path.join(repo, "fused_pool")
        for entry in os.listdir(source):
            if entry != "__pycache__":
                os.symlink(os.path.join(source, entry), os.path.join(package, entry))
        if not os.path.exists(os.path.join(package, "triton_kernels")):
            os.symlink(os.path.join(repo, "triton_kernels"), os.path.join(package, "triton_kernels"))
    sys.path.insert(0, farm)
    for name in [m for m in sys.modules if m == "fused_pool" or m.startswith("fused_pool.")]:
        del sys.modules[name]


def quiet_triton_warnings() -> None:
    # Triton 3.9 warns once that its FP-fusion default will change; it is not a finding here.
    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")


# --- collecting the specializations --------------------------------------------------------------


def describe(jit_function, specialization_data: str) -> dict:
    """Readable parts of a specialization: kernel, x dtype, constexpr flags, ints specialized to 1
    (Triton turns an int argument equal to 1 into a constant) and the signature."""
    data = json.loads(specialization_data)
    names = list(jit_function.arg_names)
    declared = {names[i] for i in jit_function.constexprs}
    constants = {}
    for key, value in zip(data["constant_keys"], data["constant_vals"], strict=True):
        if len(key) == 1:
            constants[names[key[0]]] = value.get("constexpr", value) if isinstance(value, dict) else value
    flags, ones = [], []
    for name in names:
        value = constants.get(name)
        if name not in constants:
            continue
        if name not in declared:
            ones.append(f"{name}={value}")
        elif value is True:
            flags.append(name)
        elif value is not False:
            flags.append(f"{name}={value}")
    signature = data["signature"]
    pointers = {name: t[1:] for name, t in signature.items() if isinstance(t, str) and t.startswith("*")}
    x_dtype = next((pointers[n] for n in ("x_ptr", "dx_ptr", "out_ptr") if n in pointers), None)
    options = data["options"]
    if options.get("maxnreg"):
        flags.append(f"maxnreg={options['maxnreg']}")
    return {
        "kernel": jit_function.fn.__qualname__,
        "x": x_dtype or next(iter(pointers.values()), "-"),
        "flags": " ".join(flags),
        "ones": " ".join(ones),
        "signature": ", ".join(f"{name}: {t}" for name, t in signature.items() if t != "constexpr"),
        "warps": options.get("num_warps"),
        "stages": options.get("num_stages"),
        "constants": constants,
    }


def collect(archs: list[int], only: str | None) -> tuple[list[dict], dict]:
    import cases as matrix
    import torch
    from triton import knobs

    import fused_pool
    import fused_pool.functional
    import fused_pool.triton_kernels.attention  # noqa: F401  (the launchers, patched below)
    import fused_pool.triton_kernels.linear  # noqa: F401
    import fused_pool.triton_kernels.pool  # noqa: F401
    import fused_pool.triton_kernels.probe  # noqa: F401
    import fused_pool.triton_kernels.span  # noqa: F401
    from fused_pool.contract import STATES
    from fused_pool.ops import kernels

    specs: dict[tuple, dict] = {}
    seen_now: list[tuple] = []
    entered = [False]

    def cache_hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled, **_):
        jit_function = fn.jit_function
        data = compile["specialization_data"]
        spec_key = (_state["arch"], data)
        if spec_key not in specs:
            specs[spec_key] = {
                "arch": _state["arch"],
                "module": jit_function.fn.__module__,
                "qualname": jit_function.fn.__qualname__,
                "spec": data,
                "case": _state["case"],
                **describe(jit_function, data),
            }
        seen_now.append(spec_key)
        return True  # skip the compile and the launch

    if not hasattr(knobs.runtime, "jit_cache_hook"):
        raise SystemExit("this Triton has no knobs.runtime.jit_cache_hook: update .ci/gpu_compile")
    knobs.runtime.jit_cache_hook = cache_hook

    # The backend is Triton (CPU tensors, no interpreter): mark that the public checks passed.
    def resolve_backend(backend, device):
        entered[0] = True
        return "triton"

    if not hasattr(fused_pool.functional, "resolve_backend"):
        raise SystemExit("fused_pool.functional.resolve_backend is gone: update .ci/gpu_compile")
    fused_pool.functional.resolve_backend = resolve_backend

    # Grid sizing: a GPU of SMS[arch] SMs where the launchers ask for one.
    split_plan = importlib.import_module("fused_pool.triton_kernels.split_plan")
    original = getattr(split_plan, "resident_programs", None)
    if original is None:
        raise SystemExit(
            "fused_pool.triton_kernels.split_plan.resident_programs is gone: update .ci/gpu_compile"
        )

    def resident_programs(device):
        return SMS[_state["arch"]] * split_plan.PROGRAMS_PER_SM

    for module in [m for n, m in list(sys.modules.items()) if n.startswith("fused_pool.")]:
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, resident_programs)

    def device_properties(device=None):
        arch = _state["arch"]
        return types.SimpleNamespace(
            name=f"stand-in sm_{arch}",
            major=arch // 10,
            minor=arch % 10,
            multi_processor_count=SMS[arch],
            total_memory=80 << 30,
            L2_cache_size=50 << 20,
            max_threads_per_multi_processor=2048,
            warp_size=32,
        )

    torch.cuda.get_device_properties = device_properties

    report = {"cases": 0, "skipped": [], "errors": [], "warnings": []}
    for arch in archs:
        _state["arch"] = arch
        activate(arch)
        for case in matrix.all_cases():
            if only and only not in case.label():
                continue
            _state["case"] = case.label()
            report["cases"] += 1
            name, args, kwargs, grads = matrix.inputs(case)
            entered[0] = False
            seen_now.clear()
            try:
                if name == "pool_states":
                    *pool_args, mode = args
                    kernels("triton", "pool").forward(*pool_args, mode | STATES)
                else:
                    out = getattr(fused_pool, name)(*args, **kwargs)
                    torch.autograd.grad(out, grads, torch.empty_like(out))
            except (ValueError, TypeError) as error:
                if not entered[0]:  # the public checks reject this combination: not in the contract
                    if arch == archs[0]:
                        report["skipped"].append(f"{case.label()}: {str(error).splitlines()[0]}")
                    continue
                report["errors"].append(f"sm_{arch} {case.label()}: {_short_traceback()}")
                continue
            except Exception:
                report["errors"].append(f"sm_{arch} {case.label()}: {_short_traceback()}")
                continue
            if case.split and not any(specs[k]["constants"].get("SPLIT") is True for k in seen_now):
                report["warnings"].append(f"sm_{arch} {case.label()}: the split plan did not trigger")
    return list(specs.values()), report


def choose(specs: list[dict], all_variants: bool) -> list[dict]:
    """Per kernel configuration (arch, kernel, constexpr flags, x dtype, warps): the first
    specialization the matrix produced and, if another has fewer arguments known divisible by 16
    (H = 1000, L = 100: no 128-bit accesses), the least aligned one. The other variants differ in
    the types of secondary pointers (mask, placeholders), in ints Triton specialized to 1 and in
    alignment in between; about 2x as many again, more than CI's time allows (--all-variants)."""
    rows: dict[tuple, list[dict]] = {}
    for spec in specs:
        key = (spec["arch"], spec["kernel"], spec["flags"], spec["x"], spec["warps"])
        rows.setdefault(key, []).append(spec)
    chosen = []
    for group in rows.values():
        for spec in group:
            spec["variants"] = 0
        group[0]["variants"] = len(group)
        if all_variants:
            chosen += group
            continue
        least = min(group, key=_aligned_args)
        chosen += [group[0]] + ([least] if _aligned_args(least) < _aligned_args(group[0]) else [])
    return chosen


def _aligned_args(spec: dict) -> int:
    return sum(1 for attr in json.loads(spec["spec"])["attrs_vals"] if attr)


def _short_traceback() -> str:
    """The exception and the innermost frame in the project: enough to find it, one line."""
    error_type, error, tb = sys.exc_info()
    frames = [f for f in traceback.extract_tb(tb) if "fused_pool" in f.filename]
    where = ""
    if frames:
        frame = frames[-1]
        path = frame.filename.split("fused_pool/", 1)[-1]
        where = f" at {path}:{frame.lineno} ({frame.name})"
    message = str(error).strip().splitlines()
    return f"{error_type.__name__}: {message[0] if message else ''}{where}"


# --- compiling them ------------------------------------------------------------------------------


def init_worker(repo: str, farm: str, cuobjdump: str) -> None:
    quiet_triton_warnings()
    make_importable(repo, farm)
    _state["cuobjdump"] = cuobjdump
    _state["tmp"] = tempfile.mkdtemp(prefix="cubin_", dir=farm)


def compile_spec(task: dict) -> dict:
    """Compiles one specialization; its resources from cuobjdump, its machine code to a file for
    the batched disassembly."""
    result = {"error": None}
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    try:
        if _state.get("arch") != task["arch"]:
            activate(task["arch"])
            _state["arch"] = task["arch"]
        module = importlib.import_module(task["module"])
        jit_function = getattr(module, task["qualname"])
        kernel = jit_function.preload(task["spec"])
        metadata = kernel.metadata
        cubin = kernel.asm["cubin"]
        path = os.path.join(_state["tmp"], f"{task['index']}.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        functions = sass.resources(_state["cuobjdump"], path)
        entry = functions.get(metadata.name) or next(iter(functions.values()))
        code = sass.code_sections(cubin).get(metadata.name, b"")
        code_path = path[: -len(".cubin")] + ".code"
        with open(code_path, "wb") as f:
            f.write(code)
        os.unlink(path)
        result.update(
            regs=entry["regs"],
            stack=max(f["stack"] for f in functions.values()),
            shared=metadata.shared,
            warps=metadata.num_warps,
            stages=metadata.num_stages,
            code=code_path,
        )
        if metadata.shared > MAX_SHARED[task["arch"]]:
            result["error"] = f"shared memory {metadata.shared} B > {MAX_SHARED[task['arch']]} B per block"
    except Exception as error:
        message = f"{type(error).__name__}: {error}".strip().splitlines()
        result["error"] = "\n".join(
            message[:8] + (["..."] + message[-8:] if len(message) > 16 else message[8:])
        )
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 3)
    return result


def add_sass_stats(specs: list[dict], nvdisasm: str, jobs: int) -> None:
    """128-bit loads / stores and async copies of every compiled specialization: one raw
    disassembly per arch (and per job), run side by side."""
    batches = []
    for arch in sorted({s["arch"] for s in specs}):
        mine = [s for s in specs if s["arch"] == arch and s.get("code")]
        size = max(1, -(-len(mine) // jobs))
        batches += [(arch, mine[i : i + size]) for i in range(0, len(mine), size)]

    def run(batch):
        arch, group = batch
        codes = []
        for s in group:
            with open(s["code"], "rb") as f:
                codes.append(f.read())
        return sass.disassemble_many(nvdisasm, arch, codes)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for (_, group), stats in zip(batches, pool.map(run, batches), strict=True):
            for s, stat in zip(group, stats, strict=True):
                s.update(stat)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ptxas, cuobjdump)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="80,90")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=None, help="only cases whose label contains this")
    parser.add_argument("--collect-only", action="store_true", help="list the specializations, compile none")
    parser.add_argument("--cache", help="Triton's cache folder (default: a new one, removed at the end)")
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="compile every distinct specialization, not one per kernel configuration",
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: this check compiles for the GPU, unset it")

    quiet_triton_warnings()
    farm = tempfile.mkdtemp(prefix="gpu_compile_")
    # By default a cold cache: every specialization is compiled by this run's Triton.
    os.environ["TRITON_CACHE_DIR"] = args.cache or os.path.join(farm, "triton_cache")
    try:
        import triton

        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        make_importable(args.repo, farm)
        start = time.perf_counter()
        specs, report = collect([int(a) for a in args.arch.split(",")], args.only)
        collect_seconds = time.perf_counter() - start
        report["distinct"] = len(specs)
        specs = choose(specs, args.all_variants)
        if args.collect_only:
            print(f"would compile {len(specs)}", file=sys.stderr)
        print(f"{len(specs)} specializations from {report['cases']} cases", file=sys.stderr, flush=True)
        tasks = [
            {"index": i, **{k: s[k] for k in ("arch", "module", "qualname", "spec")}}
            for i, s in enumerate(specs)
        ]
        if args.collect_only:
            tasks = []
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(args.repo, farm, cuobjdump),
        ) as pool:
            results = pool.map(compile_spec, tasks, chunksize=2)
            for done, (spec, result) in enumerate(zip(specs, results, strict=False), 1):
                spec.update(result)
                if done % 100 == 0:
                    print(f"  compiled {done} / {len(specs)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        add_sass_stats(specs, os.path.join(os.path.dirname(cuobjdump), "nvdisasm"), args.jobs)
        sass_seconds = time.perf_counter() - start
        for spec in specs:
            del spec["spec"], spec["constants"]
            spec.pop("code", None)
        report.update(
            triton=triton.__version__,
            python=sys.executable,
            specs=specs,
            collect_seconds=round(collect_seconds, 1),
            sass_seconds=round(sass_seconds, 1),
            compile_seconds=round(sum(s.get("seconds", 0) for s in specs), 1),
            compile_cpu_seconds=round(sum(s.get("cpu_seconds", 0) for s in specs), 1),
        )
        with open(args.out, "w") as f:
            json.dump(report, f)
    finally:
        shutil.rmtree(farm, ignore_errors=True)


if __name__ == "__main__":
    main()
