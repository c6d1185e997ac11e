"""The reports of benchmarks/gpu_run.py, as plain functions on text and files (tests/test_gpu_run.py):

- test outcomes per (backend, device) pair, from pytest's JUnit XML, or from its `-v` log when
  pytest was stopped before writing the XML;
- the line that sums up a compute-sanitizer run, and its first findings;
- one CSV from the benchmark's runs (one run.py per dtype and op);
- flat, file-name-safe slugs ("NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3").
"""

from __future__ import annotations

import collections
import csv
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

# A test's (backend, device) pair, as the suite's parameter ids spell it: "triton-cuda", "cpu-cpu".
PAIR = re.compile(r"(?<![a-z])(triton|cuda|cpu)-(cpu|cuda)(?![a-z])")
NO_PAIR = "no backend parameter"
# One outcome line of `pytest -v`: "[gw0] [ 3%] PASSED tests/t.py::f[a]" with xdist, else
# "tests/t.py::f[a] PASSED [ 3%]"; the path may start with "../" (pytest ran from another folder).
_OUTCOME = r"(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
_TEST = r"(?:\S*/)?(?P<test>tests/[^\[\s]+(?:\[[^\]]*\])?)"
VERBOSE_LINES = (re.compile(rf"\b{_OUTCOME} {_TEST}"), re.compile(rf"(?<!\S){_TEST} {_OUTCOME}\b"))
VERBOSE_OUTCOME = {"PASSED": "passed", "SKIPPED": "skipped", "XFAIL": "skipped"}  # others: failed
# pytest's last line: "=== 3 failed, 120 passed, 4 skipped in 81.20s (0:01:21) ===".
SUMMARY_LINE = re.compile(r"(passed|failed|error|skipped|no tests ran).* in [0-9.]+s")


@dataclass
class Outcomes:
    """Passed / failed / skipped counts per (backend, device) pair, the failures and the skip reasons."""

    source: str
    counts: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    failures: list[str] = field(default_factory=list)
    skip_reasons: collections.Counter = field(default_factory=collections.Counter)

    def add(self, test: str, outcome: str) -> None:
        self.counts[pair_of(test)][outcome] += 1


def pair_of(test: str) -> str:
    """The (backend, device) pair in a test's parameter id, e.g. "triton-cuda"; NO_PAIR without one."""
    params = test.split("[", 1)[1] if "[" in test else ""
    found = PAIR.search(params)
    return found.group(0) if found else NO_PAIR


def outcomes_from_junit(xml_text: str) -> Outcomes:
    """Counts every <testcase> of pytest's JUnit XML (a failure or an error counts as failed)."""
    outcomes = Outcomes("JUnit XML")
    for case in ET.fromstring(xml_text).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = (child.get("message") or child.tag).splitlines() or [child.tag]
                outcomes.failures.append(f"{name}: {message[0][:200]}")
            elif child.tag == "skipped":
                outcome = "skipped"
                outcomes.skip_reasons[(child.get("message") or "")[:160]] += 1
        outcomes.add(name, outcome)
    return outcomes


def outcomes_from_log(log_text: str) -> Outcomes:
    """Counts the tests that finished, from a `pytest -v` log (XFAIL counts as skipped, XPASS failed)."""
    outcomes = Outcomes("no JUnit XML: pytest was stopped; counted from the -v log, tests that finished")
    for line in log_text.splitlines():
        found = VERBOSE_LINES[0].search(line) or VERBOSE_LINES[1].search(line)
        if found:
            outcome = VERBOSE_OUTCOME.get(found["outcome"], "failed")
            outcomes.add(found["test"], outcome)
            if outcome == "failed":
                outcomes.failures.append(found["test"])
    return outcomes


def format_outcomes(outcomes: Outcomes, max_failures: int = 30, max_skip_reasons: int = 15) -> str:
    lines = [f"outcomes ({outcomes.source}):"]
    for pair in sorted(outcomes.counts):
        count = outcomes.counts[pair]
        lines.append(
            f"  {pair}: {count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped"
        )
    if outcomes.failures:
        lines.append(f"failed ({len(outcomes.failures)}; first {max_failures}):")
        lines += [f"  {failure}" for failure in outcomes.failures[:max_failures]]
    if outcomes.skip_reasons:
        lines.append("skip reasons:")
        lines += [f"  {n} x {reason}" for reason, n in outcomes.skip_reasons.most_common(max_skip_reasons)]
    return "\n".join(lines)


def outcome_report(junit: Path, log_text: str) -> str:
    """The outcome report of one pytest run: from its JUnit XML if it wrote one, else from its log."""
    if junit.exists():
        return format_outcomes(outcomes_from_junit(junit.read_text(errors="replace")))
    return format_outcomes(outcomes_from_log(log_text))


def pytest_summary_line(log_text: str) -> str:
    """pytest's final "N passed, M failed ... in Ss" line without its "=" rule; "" if there is none."""
    lines = [line for line in log_text.splitlines() if SUMMARY_LINE.search(line)]
    return lines[-1].strip().strip("=").strip() if lines else ""


def sanitizer_passed(output: str, rc: int) -> bool:
    return rc == 0 and "ERROR SUMMARY: 0 errors" in output


def summarize_sanitizer(output: str, tool: str, rc: int, seconds: int, budget: int) -> str:
    """One compute-sanitizer run: its ERROR SUMMARY line (or why it has none), the driver's summary,
    and when it found something, its first 40 report lines and the driver's first 10 failures."""
    lines = output.splitlines()
    summary = next((line for line in lines if "ERROR SUMMARY" in line), "")
    if not summary:
        timed_out = rc in (124, 137)
        summary = (
            f"TIMEOUT after {seconds}s (budget {budget}s): no ERROR SUMMARY"
            if timed_out
            else f"no ERROR SUMMARY (exit status {rc})"
        )
    report = [f"{tool}: {summary} (exit status {rc}, {seconds}s)"]
    driver = next((line for line in lines if line.startswith("sanitize_driver:")), "")
    if driver:
        report.append(f"  driver: {driver}")
    if "ERROR SUMMARY: 0 errors" not in output:
        findings = [
            line
            for line in lines
            if line.startswith("========= ")
            and "ERROR SUMMARY" not in line
            and line != "========= COMPUTE-SANITIZER"
        ]
        report += [f"  {line}" for line in findings[:40]]
        report += [f"  {line}" for line in lines if line.startswith("FAIL ")][:10]
    return "\n".join(report)


def merge_csvs(paths: list[Path], out: Path, commit: str) -> int:
    """Writes the rows of every CSV in `paths` to `out` (columns in first-seen order) and fills an
    empty or missing `commit` (a copy without git) with `commit`. Returns the number of rows."""
    rows: list[dict[str, str]] = []
    columns: dict[str, None] = {}
    for path in paths:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns.update(dict.fromkeys(reader.fieldnames or []))
            rows += list(reader)
    columns.setdefault("commit")
    for row in rows:
        row["commit"] = row.get("commit") or commit
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def slug(name: str) -> str:
    """A flat file-name part: lower case, "nvidia " dropped, every other run of characters -> "-"."""
    name = name.strip().lower()
    name = name.removeprefix("nvidia ")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
