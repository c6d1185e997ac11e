"""benchmarks/gpu_run.py's own logic, on small fixtures: the test-outcome report (JUnit XML and the
`-v` log), the sanitizer summary, the CSV merge, the source hash, budgets and step timeouts."""

import csv
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "gpu_run.py").is_file():
    pytest.skip("benchmarks/ is not part of this copy (an sdist)", allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))

import gpu_run  # noqa: E402
import gpu_run_machine as machine  # noqa: E402
import gpu_run_reports as reports  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6">
  <testcase classname="tests.test_pool" name="test_padded[masked_mean-triton-cuda]" time="0.1"/>
  <testcase classname="tests.test_pool" name="test_padded[masked_max-triton-cuda]" time="0.1">
    <failure message="AssertionError: max error 3e-2&#10;second line">trace</failure>
  </testcase>
  <testcase classname="tests.test_pool" name="test_padded[masked_mean-cuda-cuda]" time="0.1">
    <skipped type="pytest.skip" message="no CUDA kernels">skip</skipped>
  </testcase>
  <testcase classname="tests.test_pool" name="test_padded[masked_mean-cpu-cpu]" time="0.1"/>
  <testcase classname="tests.test_nn" name="test_module" time="0.1">
    <error message="fixture failed">trace</error>
  </testcase>
  <testcase classname="tests.test_nn" name="test_other" time="0.1">
    <skipped type="pytest.skip" message="no CUDA kernels">skip</skipped>
  </testcase>
</testsuite></testsuites>
"""

VERBOSE_LOG = """\
[gw0] [ 10%] PASSED tests/test_pool.py::test_padded[masked_mean-triton-cuda]
[gw1] [ 20%] FAILED ../../repo/tests/test_pool.py::test_padded[masked_max-triton-cuda]
tests/test_pool.py::test_padded[masked_mean-cpu-cpu] PASSED                [ 30%]
tests/test_nn.py::test_module SKIPPED (no GPU)                             [ 40%]
[gw0] [ 50%] XFAIL tests/test_nn.py::test_known[cuda-cuda]
[gw0] [ 60%] XPASS tests/test_nn.py::test_lucky[cuda-cuda]
[gw1] [ 70%] ERROR tests/test_nn.py::test_setup
collecting ... PASSED is not a test line
"""

SANITIZER_FINDING = """\
========= COMPUTE-SANITIZER
ok   cuda masked_mean float32 case
========= Invalid __global__ read of size 4 bytes
=========     at pool_fwd_kernel+0x1f0
FAIL cuda masked_max float32 varlen: error 1.0
sanitize_driver: 10 cases, 1 failed
========= ERROR SUMMARY: 1 error
"""


def counts(outcomes):
    return {pair: dict(count) for pair, count in outcomes.counts.items()}


def test_junit_outcomes_per_backend_device_pair():
    outcomes = reports.outcomes_from_junit(JUNIT)
    assert counts(outcomes) == {
        "triton-cuda": {"passed": 1, "failed": 1},
        "cuda-cuda": {"skipped": 1},
        "cpu-cpu": {"passed": 1},
        reports.NO_PAIR: {"failed": 1, "skipped": 1},
    }
    assert outcomes.failures == [
        "tests.test_pool::test_padded[masked_max-triton-cuda]: AssertionError: max error 3e-2",
        "tests.test_nn::test_module: fixture failed",
    ]
    assert outcomes.skip_reasons == {"no CUDA kernels": 2}


def test_verbose_log_outcomes_count_finished_tests():
    outcomes = reports.outcomes_from_log(VERBOSE_LOG)
    assert counts(outcomes) == {
        "triton-cuda": {"passed": 1, "failed": 1},
        "cpu-cpu": {"passed": 1},
        "cuda-cuda": {"skipped": 1, "failed": 1},
        reports.NO_PAIR: {"skipped": 1, "failed": 1},
    }
    assert outcomes.failures == [
        "tests/test_pool.py::test_padded[masked_max-triton-cuda]",
        "tests/test_nn.py::test_lucky[cuda-cuda]",
        "tests/test_nn.py::test_setup",
    ]


def test_pair_is_read_from_the_parameters_only():
    assert reports.pair_of("tests/test_cuda-cpu.py::test_x") == reports.NO_PAIR
    assert reports.pair_of("tests/t.py::test_x[float32-triton-cpu-4]") == "triton-cpu"
    assert reports.pair_of("tests/t.py::test_x[mytriton-cpu]") == reports.NO_PAIR


def test_outcome_report_prefers_junit_and_falls_back_to_the_log(tmp_path):
    junit = tmp_path / "junit.xml"
    from_log = reports.outcome_report(junit, VERBOSE_LOG)
    assert from_log.splitlines()[0].startswith("outcomes (no JUnit XML: pytest was stopped")
    assert "  triton-cuda: 1 passed, 1 failed, 0 skipped" in from_log.splitlines()
    junit.write_text(JUNIT)
    lines = reports.outcome_report(junit, "").splitlines()
    assert lines[0] == "outcomes (JUnit XML):"
    assert "  cpu-cpu: 1 passed, 0 failed, 0 skipped" in lines
    assert "failed (2; first 30):" in lines
    assert lines[-2:] == ["skip reasons:", "  2 x no CUDA kernels"]


def test_pytest_summary_line():
    log = "tests/t.py::a PASSED\n===== 1 failed, 120 passed, 3 skipped in 81.20s (0:01:21) =====\n"
    assert reports.pytest_summary_line(log) == "1 failed, 120 passed, 3 skipped in 81.20s (0:01:21)"
    assert reports.pytest_summary_line("collected 0 items\n") == ""


def test_sanitizer_summary_lists_findings():
    summary = reports.summarize_sanitizer(SANITIZER_FINDING, "memcheck", 86, 12, 100).splitlines()
    assert summary == [
        "memcheck: ========= ERROR SUMMARY: 1 error (exit status 86, 12s)",
        "  driver: sanitize_driver: 10 cases, 1 failed",
        "  ========= Invalid __global__ read of size 4 bytes",
        "  =========     at pool_fwd_kernel+0x1f0",
        "  FAIL cuda masked_max float32 varlen: error 1.0",
    ]
    assert not reports.sanitizer_passed(SANITIZER_FINDING, 86)


def test_sanitizer_summary_of_a_clean_run_and_of_a_timeout():
    clean = "========= COMPUTE-SANITIZER\nsanitize_driver: 10 cases\n========= ERROR SUMMARY: 0 errors\n"
    assert reports.summarize_sanitizer(clean, "racecheck", 0, 5, 100).splitlines() == [
        "racecheck: ========= ERROR SUMMARY: 0 errors (exit status 0, 5s)",
        "  driver: sanitize_driver: 10 cases",
    ]
    assert reports.sanitizer_passed(clean, 0)
    assert not reports.sanitizer_passed(clean, 1)
    stopped = reports.summarize_sanitizer("ok a\n", "initcheck", 124, 101, 100)
    assert stopped == "initcheck: TIMEOUT after 101s (budget 100s): no ERROR SUMMARY (exit status 124, 101s)"


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_merge_csvs_fills_the_missing_commit(tmp_path):
    write_csv(tmp_path / "a.csv", [{"op": "masked_mean", "ms_p50": "1.5", "commit": ""}])
    write_csv(
        tmp_path / "b.csv",
        [
            {"op": "masked_max", "ms_p50": "2", "commit": "abc123", "python": "3.12"},
            {"op": "attention_pool", "ms_p50": "3", "commit": "", "python": "3.12"},
        ],
    )
    out = tmp_path / "merged.csv"
    assert reports.merge_csvs([tmp_path / "a.csv", tmp_path / "b.csv"], out, "def456") == 3
    with open(out) as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["op", "ms_p50", "commit", "python"]
    assert [(r["op"], r["commit"], r["python"]) for r in rows] == [
        ("masked_mean", "def456", ""),
        ("masked_max", "abc123", "3.12"),
        ("attention_pool", "def456", "3.12"),
    ]


def test_slug_is_a_flat_file_name():
    assert reports.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert reports.slug(" NVIDIA H200\n") == "h200"
    assert reports.slug("Intel(R) Xeon(R) Processor (2 cores)") == "intel-r-xeon-r-processor-2-cores"


def test_source_hash_follows_the_sources_only(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "REPO", tmp_path)
    (tmp_path / "fused_pool" / "__pycache__").mkdir(parents=True)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "fused_pool" / "ops.py").write_text("A = 1\n")
    (tmp_path / "csrc" / "pool.cu").write_text("// kernel\n")
    first = machine.source_hash()
    (tmp_path / "fused_pool" / "__pycache__" / "ops.py").write_text("cached\n")
    (tmp_path / "fused_pool" / "notes.txt").write_text("not a source\n")
    (tmp_path / "fused_pool" / "linked.py").symlink_to(tmp_path / "setup.py")
    assert machine.source_hash() == first
    (tmp_path / "csrc" / "pool.cu").write_text("// kernel, changed\n")
    assert machine.source_hash() != first
    assert len(first) == 16


def test_budgets_default_to_the_device_limits():
    args = gpu_run.parse_args(["setup,test", "/tmp/out"])
    assert (args.stage_list, args.command_limit, args.max_files) == (["setup", "test"], 600, 8)
    assert (args.stage_budget, args.call_budget) == (570, 570)
    held = gpu_run.parse_args(["all", "--command-limit", "0"])
    assert (held.stage_list, held.stage_budget, held.call_budget) == (list(gpu_run.STAGES), 570, 0)
    smoke = gpu_run.parse_args(["smoke"])
    assert (smoke.stage_budget, smoke.call_budget, smoke.max_files) == (300, 0, 0)
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["setup,tests"])


def test_run_command_stops_the_whole_process_group_at_its_timeout(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(60)
        """
    )
    ctx = machine.Context(args=None, smoke=True, slug="s", date="d", outdir=tmp_path)
    start = time.monotonic()
    result = machine.run_command(ctx, [sys.executable, "-c", script], timeout=3, echo=False)
    assert result.timed_out and result.rc == machine.TIMEOUT_RC
    assert result.output == "started\n"
    assert time.monotonic() - start < 20
    grandchild = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):  # dead within moments of the SIGTERM (a zombie until something reaps it)
        if not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild ({grandchild}) outlived the timeout")


def test_run_command_returns_the_exit_status_and_output(tmp_path):
    ctx = machine.Context(args=None, smoke=True, slug="s", date="d", outdir=tmp_path)
    result = machine.run_command(
        ctx,
        [sys.executable, "-c", "print('ok a'); print('kept'); raise SystemExit(3)"],
        timeout=60,
        echo=False,
    )
    assert (result.rc, result.output, result.timed_out) == (3, "ok a\nkept\n", False)
