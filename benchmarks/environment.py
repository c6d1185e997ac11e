"""Where a benchmark row was measured: the device, the versions, the commit and the date (the columns
every benchmarks/*.py CSV carries), and where its CSV goes."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and the cores this process may use: "AMD EPYC (2 cores)"."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def git_commit() -> str:
    """The checked-out commit, "+dirty" when tracked files differ from it; "" without git."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short=12", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit


def environment(device: str) -> dict[str, str]:
    """The columns that say where a row was measured: device, versions, commit, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def results_csv(out: Path | str, name: str, device: str, quick: bool = False) -> Path:
    """out/<name>_<device>_<date-time>[_quick].csv (no "<name>_" for an empty name), the device's name
    as a slug ("intel-r-xeon-r-..."): one file per run, never overwritten. Creates `out`."""
    slug = "-".join("".join(c if c.isalnum() else " " for c in device.lower()).split())
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name + '_' if name else ''}{slug}_{stamp}{'_quick' if quick else ''}.csv"


def write_rows(path: Path, rows: list[dict], columns: list[str], float_format: str | None = None) -> None:
    """rows as CSV under these columns (other keys left out), floats as format(v, float_format) when
    one is given."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            if float_format is not None:
                row = {k: format(v, float_format) if isinstance(v, float) else v for k, v in row.items()}
            writer.writerow(row)
