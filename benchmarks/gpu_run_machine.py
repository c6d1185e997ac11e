"""The machine side of benchmarks/gpu_run.py: steps run under a budget (their whole process group
stopped at the deadline), what is being tested (GPU, commit, source hash, versions) and the install
of fused_pool that the stages run against (carried wheels, a build, a check from outside the tree).

Nothing here imports torch: whatever needs it runs in the tested interpreter (`--python`), through
gpu_run_probe.py and tests/test_installed_package.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gpu_run_reports as reports

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_RC = 124  # a step stopped at its budget (as coreutils' timeout reports it)
WHEEL_DIRS = ("wheels", ".whl")  # carried, git-ignored folders of wheels (GPU.md)
INSTALL_MARK = Path("/tmp/gpu_run_installed.srchash")  # lives as long as the machine, like the install
SOURCE_PATHS = ("setup.py", "pyproject.toml", "MANIFEST.in", "csrc", "fused_pool", "triton_kernels")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".toml", ".in")


class StageFailed(Exception):
    """A step the rest of the stage depends on failed; the message says which."""


class Log:
    """Prints to stdout and to the current stage's log file."""

    def __init__(self) -> None:
        self.file = None

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if self.file:
            self.file.write(text)
            self.file.flush()

    def say(self, message: str) -> None:
        self.write(f"[gpu_run {time.strftime('%H:%M:%S')}] {message}\n")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, reserve: float = 0) -> int:
        """Whole seconds left, keeping `reserve` back (for a summary); at least 1, a valid timeout."""
        return max(1, int(self.end - time.monotonic() - reserve))


@dataclass
class Context:
    args: argparse.Namespace
    smoke: bool
    slug: str
    date: str
    outdir: Path
    log: Log = field(default_factory=Log)
    deadline: Deadline = field(default_factory=lambda: Deadline(0))

    @property
    def python(self) -> str:
        return self.args.python

    def out(self, what: str) -> Path:
        return self.outdir / f"{self.slug}_{self.date}_{what}"


@dataclass
class Result:
    rc: int
    seconds: int
    output: str

    @property
    def timed_out(self) -> bool:
        return self.rc == TIMEOUT_RC


def run_command(
    ctx: Context,
    cmd: list,
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    echo: Callable[[str], bool] | bool = True,
) -> Result:
    """Runs a long step, its output streamed to the log (the lines `echo` keeps) and returned.

    At `timeout` its whole process group is stopped (SIGTERM, SIGKILL 10 s later), not only the
    child: pytest-xdist workers and compute-sanitizer's target hold the GPU. rc is then TIMEOUT_RC.
    """
    start = time.monotonic()
    process = subprocess.Popen(
        [str(part) for part in cmd],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            lines.append(line)
            if echo is True or (callable(echo) and echo(line)):
                ctx.log.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        rc = TIMEOUT_RC
    reader.join(timeout=10)
    return Result(rc, round(time.monotonic() - start), "".join(lines))


def capture(cmd: list, *, cwd: Path | None = None, timeout: float = 120) -> tuple[int, str]:
    """A short query: (exit status, stdout + stderr); 127 when it cannot start or times out."""
    try:
        done = subprocess.run(
            [str(part) for part in cmd],
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return 127, str(error)
    return done.returncode, (done.stdout + done.stderr).strip()


def first_line(cmd: list) -> str:
    rc, text = capture(cmd)
    return text.splitlines()[0].strip() if rc == 0 and text else ""


def python_has(ctx: Context, module: str) -> bool:
    return capture([ctx.python, "-c", f"import {module}"])[0] == 0


# --- what is tested: GPU, commit, source, versions, install ----------------------------------------


def gpu_slug(python: str, smoke: bool) -> str:
    if smoke:
        return "cpu-smoke"
    name = (
        first_line(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
        if shutil.which("nvidia-smi")
        else ""
    )
    if not name:
        query = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')"
        name = first_line([python, "-c", query]) or "unknown-gpu"
    return reports.slug(name)


def commit(ctx: Context) -> str:
    """git's commit (+dirty); else --commit; else wheels/COMMIT, written where git is (GPU.md)."""
    found = first_line(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"])
    if found:
        rc, status = capture(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
        return found + ("+dirty" if rc == 0 and status else "")
    if ctx.args.commit:
        return ctx.args.commit
    for folder in WHEEL_DIRS:
        note = REPO / folder / "COMMIT"
        if note.is_file():
            return note.read_text(errors="replace")[:200].replace("\n", " ").strip()
    return "unknown (no .git on this copy; pass --commit or write wheels/COMMIT)"


def source_hash() -> str:
    """A hash of what the installed package is built from: a carried wheel is used only if it matches."""
    files = []
    for top in SOURCE_PATHS:
        path = REPO / top
        if path.is_file():
            files.append(top)
        for root, dirs, names in os.walk(path):  # not into linked folders, like `find`
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in names:
                file = Path(root, name)
                if name.endswith(SOURCE_SUFFIXES) and not file.is_symlink():
                    files.append(file.relative_to(REPO).as_posix())
    listing = "".join(f"{hashlib.sha256((REPO / f).read_bytes()).hexdigest()}  {f}\n" for f in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def probe(ctx: Context, what: str) -> tuple[bool, str]:
    """gpu_run_probe.py's report, from a folder outside the source tree (finds the installed package)."""
    with tempfile.TemporaryDirectory() as outside:
        rc, text = capture([ctx.python, REPO / "benchmarks" / "gpu_run_probe.py", what], cwd=Path(outside))
    return rc == 0, text


def versions(ctx: Context) -> str:
    lines = [
        f"gpu: {ctx.slug}",
        f"date: {ctx.date}",
        f"commit: {commit(ctx)}",
        f"source hash: {source_hash()}",
        probe(ctx, "versions")[1],
    ]
    if shutil.which("nvidia-smi"):
        lines.append(
            f"driver: {first_line(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'])}"
        )
    for tool in ("nvcc", "compute-sanitizer", "ncu"):
        if shutil.which(tool):
            out = [line for line in capture([tool, "--version"])[1].splitlines() if line.strip()]
            lines.append(f"{tool}: {out[-1] if out else ''}")
        else:
            lines.append(f"{tool}: not on PATH")
    return "\n".join(lines) + "\n"


def verify_install(ctx: Context, on_gpu: bool) -> tuple[bool, str]:
    """Where fused_pool comes from, and tests/test_installed_package.py run against it from outside the
    source tree: on a GPU the installed package with the triton and cuda backends, else (smoke) any
    install with the cpu backend and the Triton interpreter."""
    probed, info = probe(ctx, "install")
    env = {
        "FUSED_POOL_TEST_INSTALLED": "1" if on_gpu else "0",
        "FUSED_POOL_TEST_DEVICE": "cuda" if on_gpu else "cpu",
        "FUSED_POOL_TEST_BACKENDS": "triton,cuda" if on_gpu else "cpu,triton",
    }
    test = REPO / "tests" / "test_installed_package.py"
    with tempfile.TemporaryDirectory() as outside:
        cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", test]
        result = run_command(ctx, cmd, cwd=Path(outside), env=env, timeout=ctx.deadline.left(30), echo=False)
    ok = probed and result.rc == 0
    outcome = reports.pytest_summary_line(result.output) or f"exit status {result.rc}"
    text = f"{info}\ninstalled-package check: {outcome}"
    if not ok:
        text += (
            "\n"
            + "\n".join(result.output.splitlines()[-40:])
            + "\nPROBLEM: the installed fused_pool failed its check"
        )
    return ok, text + "\n"


def install_wheels(ctx: Context) -> None:
    found = [
        w
        for d in WHEEL_DIRS
        for w in sorted((REPO / d).glob("*.whl"))
        if not w.name.startswith("fused_pool-")
    ]
    if not found:
        ctx.log.say("no carried wheels (wheels/*.whl): nothing extra to install")
        return
    ctx.log.say(f"installing {len(found)} carried wheels: {' '.join(w.name for w in found)}")
    pip = [
        ctx.python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        found[0].parent,
        "--no-deps",
    ]
    result = run_command(
        ctx, [*pip, "--no-cache-dir", "--disable-pip-version-check", *found], timeout=ctx.deadline.left(60)
    )
    if result.rc:
        raise StageFailed(f"installing the carried wheels failed (exit status {result.rc})")


def install_fused_pool(ctx: Context, keep: Path | None) -> None:
    """Installs fused_pool non-editable with its CUDA kernels: the carried wheel built from this very
    source (wheels/fused_pool-*.whl with a matching .srchash) if there is one, else a fresh build,
    copied with its .srchash into `keep`."""
    source = source_hash()
    carried = [
        w
        for d in WHEEL_DIRS
        for w in sorted((REPO / d).glob("fused_pool-*.whl"))
        if Path(f"{w}.srchash").is_file() and Path(f"{w}.srchash").read_text().strip() == source
    ]
    if carried:
        wheel = carried[-1]
        ctx.log.say(f"installing the carried {wheel.name}: built from this source (hash {source})")
    else:
        build = Path(tempfile.mkdtemp(prefix="gpu_run_wheel_"))
        env = {
            "MAX_JOBS": str(ctx.args.max_jobs),
            "FUSED_POOL_CUDA": os.environ.get("FUSED_POOL_CUDA", "1"),
            "TORCH_CUDA_ARCH_LIST": ctx.args.cuda_arch_list,
        }
        ctx.log.say(f"building fused_pool with CUDA kernels ({' '.join(f'{k}={v}' for k, v in env.items())})")
        pip = [ctx.python, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "--no-index"]
        cmd = [*pip, "--no-cache-dir", "--disable-pip-version-check", "-w", build, "."]
        result = run_command(ctx, cmd, cwd=REPO, env=env, timeout=ctx.deadline.left(60))
        wheels = sorted(build.glob("fused_pool-*.whl"))
        if result.rc or not wheels:
            raise StageFailed(f"building fused_pool failed (exit status {result.rc}; see the log above)")
        wheel = wheels[0]
        Path(f"{wheel}.srchash").write_text(source + "\n")
        ctx.log.say(f"built {wheel.name} ({wheel.stat().st_size >> 20} MiB) in {result.seconds}s")
        if keep:
            shutil.copy(wheel, keep)
            shutil.copy(f"{wheel}.srchash", keep)
    pip = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall"]
    result = run_command(
        ctx, [*pip, "--no-cache-dir", "--disable-pip-version-check", wheel], timeout=ctx.deadline.left(30)
    )
    if result.rc:
        raise StageFailed(f"pip install {wheel.name} failed (exit status {result.rc})")
    INSTALL_MARK.write_text(source + "\n")


def ensure_installed(ctx: Context) -> None:
    """Before test / sanitize / bench on a GPU: install unless this machine already holds this source's
    install (a warm machine from an earlier call). Smoke: fused_pool imports in this environment."""
    if ctx.smoke:  # setup and the suite run the installed-package test; here: does it import
        ok, text = probe(ctx, "install")
        ctx.log.write(text + "\n")
        if not ok:
            raise StageFailed("fused_pool does not import in this environment")
        return
    if INSTALL_MARK.is_file() and INSTALL_MARK.read_text().strip() == source_hash():
        if verify_install(ctx, on_gpu=True)[0]:
            ctx.log.say("fused_pool from this source is already installed")
            return
    ctx.log.say("fused_pool from this source is not installed here: installing it first (setup's install)")
    ctx.log.write(versions(ctx))
    install_wheels(ctx)
    install_fused_pool(ctx, keep=None)
    ok, text = verify_install(ctx, on_gpu=True)
    ctx.log.write(text)
    if not ok:
        raise StageFailed("the installed fused_pool does not run its triton and cuda backends")


class Report:
    """A stage's summary file (<gpu>_<date>_<stage>.txt), written as it grows and echoed to the log."""

    def __init__(self, ctx: Context, path: Path) -> None:
        self.ctx, self.path = ctx, path
        path.write_text("")

    def add(self, *texts: str) -> None:
        text = "".join(t if t.endswith("\n") else t + "\n" for t in texts)
        with open(self.path, "a") as handle:
            handle.write(text)
        self.ctx.log.write(text)

    def text(self) -> str:
        return self.path.read_text()
