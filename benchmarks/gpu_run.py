"""One command on the GPU machine: install, test, sanitize and benchmark fused_pool.

    python benchmarks/gpu_run.py STAGE [OUTDIR] [options]      (OUTDIR default: benchmarks/results/)

STAGE: setup | test | sanitize | bench | all | smoke, or several joined by commas (setup,test).
benchmarks/GPU.md says what each does, how long it takes, and the exact device-tool calls. The
defaults fit the device tool: each stage, and all the stages of one call together, end 30 s inside
its 10-minute command limit, and a warning names a call whose outputs exceed the 8 files it brings
back. Outputs: flat names <gpu>_<date>_<what>.<ext> in OUTDIR, and one log per stage
(<gpu>_<date>_<stage>.log).

smoke: every stage at toy size on CPU (Triton's interpreter, the CPU extension), in the current
environment (no install, no nvidia-smi, no compute-sanitizer): CI proves the runner works.

The stages are here; running steps under a budget and the install are in gpu_run_machine.py, the
reports (test outcomes, sanitizer summary, CSV merge) in gpu_run_reports.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_run_reports as reports  # noqa: E402
from gpu_run_machine import (  # noqa: E402
    REPO,
    Context,
    Deadline,
    Report,
    StageFailed,
    capture,
    commit,
    ensure_installed,
    gpu_slug,
    install_fused_pool,
    install_wheels,
    probe,
    python_has,
    run_command,
    verify_install,
    versions,
)

STAGES = ("setup", "test", "sanitize", "bench")
# The device tool (/work/.library/device/README.md): one command runs at most 10 minutes; at most 8
# files come back from $OUT, flat names of letters, digits, ".", "_" and "-".
DEVICE_COMMAND_LIMIT_S = 600
DEVICE_MAX_FILES = 8
HAND_BACK_S = 30  # budgets end this long before the command limit: summaries, files back
SMOKE_STAGE_BUDGET_S = 300  # a loaded 2-core machine: the test stage took 140 s
MIN_STAGE_BUDGET_S = 40
FLAT_NAME = re.compile(r"[A-Za-z0-9._-]+")
SMOKE_TEST_FILES = ("test_backends.py", "test_pool.py", "test_attention.py", "test_installed_package.py")
SMOKE_TEST_K = "backend or empty_sequences or empty_and_all or degenerate or installed"
SANITIZER_TOOLS = ("memcheck", "synccheck", "initcheck", "racecheck")
BENCH_OPS = ("masked_mean", "masked_max", "masked_mean_max", "attention_pool", "query_attention_pool")
SMOKE_BENCH_ARGS = (
    "--device",
    "cpu",
    "--quick",
    "--modes",
    "fwd",
    "--providers",
    "fused_pool:cpu",
    "torch:eager",
)


# --- stages: each returns its exit status (0: passed) or raises StageFailed; ctx.deadline is its budget


def stage_setup(ctx: Context) -> int:
    """Versions and nvidia-smi; on a GPU also the carried wheels, fused_pool built and installed, checked."""
    report = Report(ctx, ctx.out("setup.txt"))
    report.add(f"gpu_run setup: {datetime.datetime.now().isoformat(timespec='seconds')}", versions(ctx))
    if ctx.smoke:
        report.add("smoke: no nvidia-smi, no install (the current environment is used)")
        ok, text = verify_install(ctx, on_gpu=False)
        report.add(text)
        return 0 if ok else 1
    report.add(capture(["nvidia-smi"])[1] if shutil.which("nvidia-smi") else "nvidia-smi: not on PATH")
    if capture([ctx.python, "-c", "import sys, torch; sys.exit(not torch.cuda.is_available())"])[0]:
        raise StageFailed("torch sees no CUDA GPU: this stage needs the GPU machine (use 'smoke' elsewhere)")
    install_wheels(ctx)
    install_fused_pool(ctx, keep=ctx.outdir)
    ok, text = verify_install(ctx, on_gpu=True)
    report.add(
        "",
        "install: pip wheel --no-build-isolation --no-deps . + pip install (FUSED_POOL_CUDA=1, "
        f"TORCH_CUDA_ARCH_LIST={ctx.args.cuda_arch_list}); wheel and .srchash copied to OUTDIR",
        text,
    )
    extension = re.search(r"^fused_pool\._C: (\S+?);", text, re.MULTILINE)
    if extension and Path(extension[1]).is_file() and shutil.which("cuobjdump"):
        archs = re.findall(r"sm_[0-9a-z]+", capture(["cuobjdump", "--list-elf", extension[1]])[1])
        counts = " ".join(f"{archs.count(arch)} {arch}" for arch in sorted(set(archs)))
        report.add(f"CUDA code in _C: {counts or 'none'}")
    if not ok:
        ctx.log.say(f"ERROR: setup finished with problems (see {report.path})")
        return 1
    ctx.log.say(f"setup done: {report.path}")
    return 0


def stage_test(ctx: Context) -> int:
    """The suite against the installed package: pytest runs tests/ from a folder outside the source
    tree, so `import fused_pool` finds the install (tests/test_installed_package.py checks that)."""
    ensure_installed(ctx)
    work = Path(tempfile.mkdtemp(prefix="gpu_run_test_"))
    junit = work / "junit.xml"
    # -v: every outcome is in the log as it happens, so a run stopped by the budget still counts.
    args = ["-p", "no:cacheprovider", "-v", "--junitxml", str(junit)]
    if ctx.smoke:
        args += ["-x", "-k", SMOKE_TEST_K] + (["-n", "2"] if python_has(ctx, "xdist") else [])
        targets = [REPO / "tests" / name for name in SMOKE_TEST_FILES]
    else:
        args += ["--durations", "15"] + (["-n", str(ctx.args.workers)] if python_has(ctx, "xdist") else [])
        args += ["--timeout", "300"] if python_has(ctx, "pytest_timeout") else []
        targets = [REPO / "tests"]
    args += shlex.split(ctx.args.pytest_args) + (["-k", ctx.args.pytest_k] if ctx.args.pytest_k else [])
    budget = ctx.deadline.left(30)
    if budget <= 30:
        report = Report(ctx, ctx.out("tests.txt"))
        report.add(f"gpu_run test on {ctx.slug}, {ctx.date}: NOT RUN, {budget}s left in the stage budget")
        return 1
    env = {
        "FUSED_POOL_TEST_INSTALLED": "0" if ctx.smoke else "1",
        "FUSED_POOL_TEST_DEVICE": "cpu" if ctx.smoke else "cuda",
        "FUSED_POOL_TEST_BACKENDS": "cpu,triton" if ctx.smoke else "triton,cuda",
        "FUSED_POOL_REQUIRE_EXTENSION": "1",
        "OMP_NUM_THREADS": ctx.args.omp_threads,
    }
    command = [ctx.python, "-m", "pytest", *args, *targets]
    ctx.log.say(f"{shlex.join(map(str, command))} (from {work}, budget {budget}s)")
    result = run_command(ctx, command, cwd=work, env=env, timeout=budget)
    if junit.exists():
        shutil.copy(junit, ctx.out("junit.xml"))
    summary = reports.pytest_summary_line(result.output)
    if result.timed_out:
        stopped = f"pytest was stopped after {result.seconds}s (budget {budget}s)"
        summary = f"TIMEOUT: {stopped}; {summary or 'no summary line'}"
    Report(ctx, ctx.out("tests.txt")).add(
        f"gpu_run test on {ctx.slug}, {ctx.date}: {summary or f'no pytest summary line (rc {result.rc})'}",
        f"pytest exit status: {result.rc}; wall {result.seconds}s",
        f"command (from a folder outside the source tree): python {shlex.join(map(str, command[1:]))}",
        versions(ctx),
        probe(ctx, "install")[1],
        reports.outcome_report(junit, result.output),
    )
    return result.rc


def stage_sanitize(ctx: Context) -> int:
    """benchmarks/sanitize_driver.py once plainly (checked against the reference, Triton's cache warm),
    then under each compute-sanitizer tool, each with an equal share of the time left."""
    ensure_installed(ctx)
    work = Path(tempfile.mkdtemp(prefix="gpu_run_sanitize_"))
    driver = REPO / "benchmarks" / "sanitize_driver.py"
    base = ["--device", "cpu", "--size", "toy", "--dtypes", "float32"] if ctx.smoke else ["--device", "cuda"]
    base += shlex.split(ctx.args.sanitize_args)
    report = Report(ctx, ctx.out("sanitizer.txt"))
    report.add(
        f"gpu_run sanitize on {ctx.slug}, {ctx.date}, commit {commit(ctx)}",
        f"driver: python benchmarks/sanitize_driver.py {shlex.join(base)}",
    )
    budget = ctx.deadline.left(30)
    plain = run_command(ctx, [ctx.python, driver, *base, "--quiet"], cwd=work, timeout=budget)
    lines = plain.output.splitlines()
    timeout = f" TIMEOUT (budget {budget}s)" if plain.timed_out else ""
    summary = next((line for line in lines if line.startswith("sanitize_driver:")), "no driver summary")
    report.add(
        "plain run (no sanitizer, checked against the reference): "
        f"exit status {plain.rc}, {plain.seconds}s{timeout}",
        f"  {summary}",
        *[f"  {line}" for line in lines if line.startswith(("FAIL ", "skip "))][:20],
    )
    failed = plain.rc != 0
    if ctx.smoke:
        report.add("compute-sanitizer: not run (smoke on CPU); its report parser: tests/test_gpu_run.py")
        return int(failed)
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).is_file():
        report.add("compute-sanitizer: not found")
        return 1
    version = [line for line in capture([sanitizer, "--version"])[1].splitlines() if line.strip()]
    report.add(f"compute-sanitizer: {version[-1] if version else '?'}")
    tools = ctx.args.sanitize_tools
    for i, tool in enumerate(tools):
        budget = ctx.deadline.left(30) // (len(tools) - i)  # what a fast tool leaves goes to the next
        if budget < 30:
            report.add(f"{tool}: NOT RUN: no time left in the stage budget")
            failed = True
            continue
        env, driver_args = {"PYTHONUNBUFFERED": "1"}, list(base)
        if tool in ("memcheck", "initcheck"):
            # One cudaMalloc per tensor: an access past a tensor is past its allocation, not inside
            # torch's cached pool where the sanitizer cannot see it.
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        if tool in ("racecheck", "synccheck") and "--dtypes" not in base:
            driver_args += ["--dtypes", "float32"]  # shared memory and barriers do not depend on it
        tool_args = (["--leak-check", "no"] if tool == "memcheck" else []) + shlex.split(
            ctx.args.sanitizer_flags
        )
        command = [sanitizer, "--tool", tool, "--target-processes", "all", "--print-limit", "64"]
        command += ["--error-exitcode", "86", "--show-backtrace", "device", *tool_args]
        command += [ctx.python, driver, *driver_args, "--no-check"]
        ctx.log.say(f"compute-sanitizer --tool {tool} (budget {budget}s)")
        result = run_command(
            ctx, command, cwd=work, env=env, timeout=budget, echo=lambda line: not line.startswith("ok ")
        )
        report.add(reports.summarize_sanitizer(result.output, tool, result.rc, result.seconds, budget))
        failed |= not reports.sanitizer_passed(result.output, result.rc)
    return int(failed)


def nvidia_smi_clocks(ctx: Context, fields: str) -> None:
    if shutil.which("nvidia-smi"):
        ctx.log.write(capture(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"])[1] + "\n")


def stage_bench(ctx: Context) -> int:
    """benchmarks/run.py once per (dtype, op), each under the time left (a run stopped by the budget
    loses one op, not the sweep), merged into one CSV, then plot.py and report.py. Exit 3 when some
    op was not measured."""
    ensure_installed(ctx)
    work = Path(tempfile.mkdtemp(prefix="gpu_run_bench_"))
    csv_path = ctx.out(f"{time.strftime('%H%M%S')}_bench.csv")
    ops, dtypes, reserve, base = BENCH_OPS, ctx.args.bench_dtypes, 60, ["--device", "cuda"]
    if ctx.smoke:
        ops, dtypes, reserve = ("masked_mean", "attention_pool"), ["float32"], 20
        base = [*SMOKE_BENCH_ARGS, "--budget", "0.02"]
    extra = shlex.split(ctx.args.bench_args)
    nvidia_smi_clocks(ctx, "name,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu")
    finished, cut = 0, []
    for dtype in dtypes:
        for op in ops:
            budget = ctx.deadline.left(reserve)
            if budget < reserve:
                cut.append(f"{dtype}/{op}")
                continue
            args = [
                *base,
                "--dtypes",
                dtype,
                "--ops",
                op,
                "--out",
                work / "runs" / f"{dtype}_{op}",
                "--no-plots",
            ]
            ctx.log.say(f"run.py {shlex.join(map(str, args + extra))} (budget {budget}s)")
            command = [ctx.python, REPO / "benchmarks" / "run.py", *args, *extra]
            result = run_command(ctx, command, cwd=work, env={"TQDM_MININTERVAL": "10"}, timeout=budget)
            if result.rc == 0:
                finished += 1
            else:
                cut.append(f"{dtype}/{op}(exit {result.rc})")
    if not finished:
        raise StageFailed("no benchmark run finished")
    runs = sorted((work / "runs").glob("*/*.csv"))
    rows = reports.merge_csvs(runs, csv_path, commit(ctx))
    ctx.log.say(f"wrote {csv_path}: {rows} rows from {len(runs)} runs")
    for script in ("plot.py", "report.py"):
        command = [ctx.python, REPO / "benchmarks" / script, csv_path]
        if run_command(ctx, command, cwd=work, timeout=ctx.deadline.left(5)).rc:
            ctx.log.say(f"{script} failed (the CSV is complete)")
    nvidia_smi_clocks(ctx, "name,clocks.sm,clocks.mem,temperature.gpu,power.draw")
    if cut:
        ctx.log.say(
            f"not measured (budget or failure): {' '.join(cut)}; rerun with --bench-dtypes / more time"
        )
        return 3
    ctx.log.say(f"bench done: {csv_path}")
    return 0


STAGE_FUNCTIONS = {"setup": stage_setup, "test": stage_test, "sanitize": stage_sanitize, "bench": stage_bench}


# --- driver ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stages", help="setup | test | sanitize | bench | all | smoke, or a comma list")
    parser.add_argument("outdir", nargs="?", type=Path, default=REPO / "benchmarks" / "results")
    limits = parser.add_argument_group("the device tool's limits (benchmarks/GPU.md)")
    limits.add_argument(
        "--command-limit",
        type=int,
        default=None,
        help=f"seconds one device-tool command may run ({DEVICE_COMMAND_LIMIT_S}; smoke: 0, none)",
    )
    limits.add_argument(
        "--max-files",
        type=int,
        default=None,
        help=f"files the device tool brings back from $OUT ({DEVICE_MAX_FILES}; smoke: 0, no check)",
    )
    limits.add_argument(
        "--stage-budget",
        type=int,
        default=None,
        help=f"seconds per stage (command limit - {HAND_BACK_S}; smoke {SMOKE_STAGE_BUDGET_S})",
    )
    limits.add_argument(
        "--call-budget",
        type=int,
        default=None,
        help=f"seconds for all the stages of this call (command limit - {HAND_BACK_S}; 0: none)",
    )
    knobs = parser.add_argument_group("what runs")
    knobs.add_argument("--python", default=sys.executable, help="the interpreter under test (this one)")
    knobs.add_argument("--workers", type=int, default=16, help="pytest -n")
    knobs.add_argument("--pytest-args", default="", help='extra pytest arguments: --pytest-args="-x --lf"')
    knobs.add_argument("--pytest-k", default="", help="one pytest -k expression")
    knobs.add_argument("--omp-threads", default="2", help="OMP_NUM_THREADS of the tests")
    knobs.add_argument("--sanitize-tools", nargs="+", choices=SANITIZER_TOOLS, default=list(SANITIZER_TOOLS))
    knobs.add_argument("--sanitize-args", default="", help="extra sanitize_driver.py arguments, every tool")
    knobs.add_argument(
        "--sanitizer-flags", default="--report-api-errors no", help="extra compute-sanitizer flags"
    )
    knobs.add_argument("--bench-dtypes", nargs="+", default=["float32", "bfloat16"], help="in this order")
    knobs.add_argument("--bench-args", default="", help='extra run.py arguments: --bench-args="--budget 0.1"')
    knobs.add_argument("--commit", default="", help="the commit to record where the copy has no .git")
    knobs.add_argument("--max-jobs", type=int, default=16, help="MAX_JOBS of the CUDA build")
    knobs.add_argument("--cuda-arch-list", default="9.0", help="TORCH_CUDA_ARCH_LIST of the CUDA build")
    args = parser.parse_args(argv)
    if args.stages in ("all", "smoke"):
        args.stage_list = list(STAGES)
    else:
        args.stage_list = args.stages.split(",")
        unknown = [s for s in args.stage_list if s not in STAGES]
        if unknown:
            parser.error(f"unknown stage {unknown[0]!r}: choose from {', '.join(STAGES)}, all, smoke")
    smoke = args.stages == "smoke"
    if args.command_limit is None:
        args.command_limit = 0 if smoke else DEVICE_COMMAND_LIMIT_S
    if args.max_files is None:
        args.max_files = 0 if smoke else DEVICE_MAX_FILES
    inside_limit = args.command_limit - HAND_BACK_S if args.command_limit else 0
    if args.stage_budget is None:
        args.stage_budget = (
            SMOKE_STAGE_BUDGET_S if smoke else inside_limit or DEVICE_COMMAND_LIMIT_S - HAND_BACK_S
        )
    if args.call_budget is None:
        args.call_budget = inside_limit
    return args


def run_stage(ctx: Context, stage: str, call: Deadline | None) -> int:
    budget = min(ctx.args.stage_budget, call.left()) if call else ctx.args.stage_budget
    log_path = ctx.out(f"{stage}.log")
    with open(log_path, "w") as handle:
        ctx.log.file = handle
        try:
            if budget < MIN_STAGE_BUDGET_S:
                ctx.log.say(f"stage {stage}: NOT RUN, {budget}s left of the call budget")
                return 1
            ctx.log.say(f"stage {stage}: budget {budget}s, log {log_path}")
            ctx.deadline = Deadline(budget)
            try:
                rc = STAGE_FUNCTIONS[stage](ctx)
            except StageFailed as error:
                ctx.log.say(f"ERROR: {error}")
                rc = 1
            except Exception:  # a bug in this runner: report it, go on with the next stage
                ctx.log.write(traceback.format_exc())
                rc = 1
            ctx.log.say(f"stage {stage}: exit status {rc}")
            return rc
        finally:
            ctx.log.file = None


def list_outputs(ctx: Context, since: float) -> None:
    """The outputs of this call, and a warning when they will not all come back from the device."""
    written = sorted(p for p in ctx.outdir.glob(f"{ctx.slug}_{ctx.date}_*") if p.stat().st_mtime >= since)
    ctx.log.say("outputs:")
    for path in written:
        ctx.log.write(f"  {path.stat().st_size / 1024:9.1f} KiB  {path.name}\n")
    if ctx.args.max_files and len(written) > ctx.args.max_files:
        ctx.log.say(
            f"WARNING: {len(written)} files; the device tool brings back {ctx.args.max_files}: fewer stages"
        )
    for path in written:
        if not FLAT_NAME.fullmatch(path.name):
            ctx.log.say(f"WARNING: {path.name!r} is not a flat name the device tool brings back")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    smoke = args.stages == "smoke"
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # for every step this call starts
    args.outdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        args=args,
        smoke=smoke,
        slug=gpu_slug(args.python, smoke),
        date=datetime.date.today().isoformat(),
        outdir=args.outdir.resolve(),
    )
    call = Deadline(args.call_budget) if args.call_budget else None
    ctx.log.say(f"stages: {' '.join(args.stage_list)}; gpu {ctx.slug}; outputs in {ctx.outdir}")
    start, started, failed = time.monotonic(), time.time() - 1, []
    for stage in args.stage_list:
        if run_stage(ctx, stage, call):
            failed.append(stage)
            if stage == "setup" and not smoke:
                break  # nothing else can run against a package that did not install
    ctx.log.say(f"done in {round(time.monotonic() - start)}s")
    list_outputs(ctx, started)
    if failed:
        ctx.log.say(f"FAILED stages: {' '.join(failed)}")
        return 1
    ctx.log.say("all stages passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
