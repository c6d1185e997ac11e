#!/usr/bin/env bash
# One command on the GPU machine: install, test, sanitize and benchmark fused_pool.
#
#   bash benchmarks/gpu_run.sh STAGE [OUTDIR]        (OUTDIR default: benchmarks/results/)
#
# STAGE: setup | test | sanitize | bench | all | smoke, or several joined by commas
# (e.g. setup,test). benchmarks/GPU.md says what each does, how long it takes, and the exact
# device-tool calls. Every stage runs under its own time budget (GPU_RUN_STAGE_BUDGET seconds,
# default 570, under the device tool's 10 minutes); GPU_RUN_CALL_BUDGET caps the stages of one
# invocation together. Outputs: flat names <gpu>_<date>_<what>.<ext> in OUTDIR, at most 8 files
# per stage, and one log per stage (<gpu>_<date>_<stage>.log).
#
# smoke: every stage at toy size on CPU (Triton's interpreter, the CPU extension), in the current
# environment (no install, no nvidia-smi, no compute-sanitizer): CI proves the script works.
#
# Knobs (environment): PYTHON (python3), GPU_RUN_STAGE_BUDGET, GPU_RUN_CALL_BUDGET,
# GPU_RUN_WORKERS (pytest -n, 16), GPU_RUN_PYTEST_ARGS (split on spaces), GPU_RUN_PYTEST_K (one
# -k expression), GPU_RUN_SANITIZE_TOOLS ("memcheck synccheck initcheck racecheck"),
# GPU_RUN_SANITIZE_ARGS (driver arguments for every tool), GPU_RUN_SANITIZER_FLAGS (extra
# compute-sanitizer flags, "--report-api-errors no"), GPU_RUN_BENCH_DTYPES ("float32
# bfloat16"), GPU_RUN_BENCH_ARGS (extra run.py arguments), GPU_RUN_COMMIT (when the copy has no
# .git; else wheels/COMMIT is read), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0).
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
PY=${PYTHON:-python3}
STAGES_ALL=(setup test sanitize bench)
WHEEL_DIRS=(wheels .whl)  # carried, git-ignored folders of wheels (GPU.md)
INSTALL_MARK=/tmp/gpu_run_installed.srchash  # lives as long as the machine, like the install

log() { printf '[gpu_run %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
  log "ERROR: $*"
  exit 1
}
now() { date +%s; }
# Seconds left in this stage (at least 1, a valid timeout), keeping $1 seconds in reserve for
# writing its summary.
remaining() {
  local left=$((GPU_RUN_DEADLINE - $(now) - ${1:-0}))
  echo $((left > 1 ? left : 1))
}

usage() {
  sed -n '2,22p' "$SELF" | sed 's/^# \{0,1\}//'
  exit 2
}

gpu_slug() {
  if [[ ${GPU_RUN_SMOKE:-0} == 1 ]]; then
    echo cpu-smoke
    return
  fi
  local name=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
  fi
  if [[ -z $name ]]; then
    name=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu")' \
      2>/dev/null || echo unknown-gpu)
  fi
  # "NVIDIA H100 80GB HBM3" -> h100-80gb-hbm3
  echo "$name" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//'
}

commit() {
  local c=""
  c=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || true)
  if [[ -n $c ]]; then
    [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null || true) ]] && c="$c+dirty"
  elif [[ -n ${GPU_RUN_COMMIT:-} ]]; then
    c=$GPU_RUN_COMMIT
  else
    local d
    for d in "${WHEEL_DIRS[@]}"; do
      [[ -f $REPO/$d/COMMIT ]] && c=$(head -c 200 "$REPO/$d/COMMIT" | tr '\n' ' ') && break
    done
  fi
  echo "${c:-unknown (no .git on this copy; set GPU_RUN_COMMIT or write wheels/COMMIT)}"
}

# A hash of what the installed package is built from: a carried wheel is used only if it matches.
source_hash() {
  local paths=() p
  for p in setup.py pyproject.toml MANIFEST.in csrc fused_pool triton_kernels; do
    [[ -e $REPO/$p ]] && paths+=("$p")
  done
  (cd "$REPO" && find "${paths[@]}" -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' \
    -o -name '*.cuh' -o -name '*.h' -o -name '*.toml' -o -name '*.in' \) -not -path '*/__pycache__/*' |
    LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
}

versions() {
  echo "gpu: $GPU_RUN_SLUG"
  echo "date: $GPU_RUN_DATE"
  echo "commit: $(commit)"
  echo "source hash: $(source_hash)"
  "$PY" - <<'EOF' || true
import importlib, platform, sys
print(f"python: {platform.python_version()} ({sys.executable})")
for name in ("torch", "triton", "numpy", "transformers", "sentence_transformers", "pytest", "xdist"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as error:
        print(f"{name}: missing ({type(error).__name__})")
import torch
print(f"torch CUDA: {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0) >> 20
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory >> 30} GiB, L2 {l2} MiB")
EOF
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
  fi
  local tool
  for tool in nvcc compute-sanitizer ncu; do
    if command -v "$tool" >/dev/null 2>&1; then
      echo "$tool: $("$tool" --version 2>/dev/null | grep -v '^$' | tail -n 1 || true)"
    else
      echo "$tool: not on PATH"
    fi
  done
}

# Checks the fused_pool that Python imports from outside the source tree. $1: "cuda" (installed,
# with CUDA kernels, triton and cuda backends on a GPU) or "cpu" (smoke: any install, cpu backend
# and the Triton interpreter). Prints what it found; nonzero exit on a problem.
verify_install() {
  local dir
  dir=$(mktemp -d)
  (cd "$dir" && "$PY" - "$REPO" "$1" <<'EOF')
import os, sys
import torch
import fused_pool
from fused_pool import reference
from fused_pool.backends import extension, extension_has_cuda, unavailable_reason

repo, mode = os.path.realpath(sys.argv[1]), sys.argv[2]
path = os.path.realpath(fused_pool.__file__)
ext = extension()
print(f"fused_pool: {path}")
print(f"fused_pool._C: {ext.__file__ if ext else 'not built'}; CUDA kernels: {extension_has_cuda()}")
print(f"available_backends: {fused_pool.available_backends()}")
problems = []
device = torch.device("cuda" if mode == "cuda" else "cpu")
backends = ("triton", "cuda") if mode == "cuda" else ("cpu", "triton")
if mode == "cuda":
    if path.startswith(repo + os.sep):
        problems.append(f"fused_pool is imported from the source tree ({path}), not the installed package")
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA GPU")
for backend in backends:
    reason = unavailable_reason(backend, device)
    if reason:
        problems.append(f"backend {backend!r} cannot run on {device.type}: {reason}")
if not problems:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 96, generator=gen).to(device)
    mask = (torch.rand(4, 50, generator=gen) > 0.3).to(device)
    expected = reference.masked_mean(x, mask)
    for backend in backends:
        error = (fused_pool.masked_mean(x, mask, backend=backend) - expected).abs().max().item()
        print(f"masked_mean {backend} on {device.type}: max error {error:.2e}")
        if not error < 1e-4:
            problems.append(f"backend {backend!r} gives a wrong masked_mean (error {error:.2e})")
for problem in problems:
    print(f"PROBLEM: {problem}")
sys.exit(1 if problems else 0)
EOF
}

install_wheels() {
  local d found=()
  for d in "${WHEEL_DIRS[@]}"; do
    [[ -d $REPO/$d ]] || continue
    local f
    for f in "$REPO/$d"/*.whl; do
      [[ -f $f && $(basename "$f") != fused_pool-* ]] && found+=("$f")
    done
  done
  if ((${#found[@]} == 0)); then
    log "no carried wheels (wheels/*.whl): nothing extra to install"
    return 0
  fi
  log "installing ${#found[@]} carried wheels: $(printf '%s ' "${found[@]##*/}")"
  "$PY" -m pip install -q --no-index --find-links "$(dirname "${found[0]}")" --no-deps --no-cache-dir \
    --disable-pip-version-check "${found[@]}"
}

# Installs fused_pool non-editable with its CUDA kernels: the carried wheel built from this very
# source (wheels/fused_pool-*.whl with a matching .srchash) if there is one, else a fresh build.
# $1: a folder that receives the wheel built (and its .srchash), or "".
install_fused_pool() {
  local keep=$1 hash whl="" d f
  hash=$(source_hash)
  for d in "${WHEEL_DIRS[@]}"; do
    for f in "$REPO/$d"/fused_pool-*.whl; do
      [[ -f $f && -f $f.srchash && $(cat "$f.srchash") == "$hash" ]] && whl=$f
    done
  done
  if [[ -z $whl ]]; then
    local build
    build=$(mktemp -d)
    log "building fused_pool with CUDA kernels (MAX_JOBS=${MAX_JOBS:-16}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
    local t0
    t0=$(now)
    (cd "$REPO" && MAX_JOBS=${MAX_JOBS:-16} FUSED_POOL_CUDA=${FUSED_POOL_CUDA:-1} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      timeout -k 10 "$(remaining 60)" "$PY" -m pip wheel -v --no-build-isolation --no-deps --no-index \
      --no-cache-dir --disable-pip-version-check -w "$build" .) ||
      die "building fused_pool failed (see the log above)"
    whl=$(ls "$build"/fused_pool-*.whl)
    echo "$hash" >"$whl.srchash"
    log "built $(basename "$whl") ($(du -h "$whl" | cut -f1)) in $(($(now) - t0))s"
    if [[ -n $keep ]]; then
      cp "$whl" "$whl.srchash" "$keep/"
    fi
  else
    log "installing the carried $(basename "$whl"): built from this source (hash $hash)"
  fi
  "$PY" -m pip install -q --no-index --no-deps --force-reinstall --no-cache-dir --disable-pip-version-check "$whl"
  echo "$hash" >"$INSTALL_MARK"
}

# Before test / sanitize / bench on a GPU: install unless this machine already holds this source's
# install (a warm machine from an earlier call).
ensure_installed() {
  if [[ ${GPU_RUN_SMOKE:-0} == 1 ]]; then
    verify_install cpu || die "fused_pool does not import with the cpu and triton (interpreter) backends"
    return
  fi
  if [[ -f $INSTALL_MARK && $(cat "$INSTALL_MARK") == "$(source_hash)" ]] && verify_install cuda; then
    log "fused_pool from this source is already installed"
    return
  fi
  log "fused_pool from this source is not installed here: installing it first (the setup stage's install)"
  versions
  install_wheels
  install_fused_pool ""
  verify_install cuda || die "the installed fused_pool does not run its triton and cuda backends"
}

# --- stages ---------------------------------------------------------------------------------------

stage_setup() {
  local txt=${PREFIX}_setup.txt
  {
    echo "gpu_run.sh setup: $(date -Is)"
    versions
    echo
    if [[ ${GPU_RUN_SMOKE:-0} == 1 ]]; then
      echo "smoke: no nvidia-smi, no install (the current environment is used)"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      nvidia-smi || true
    else
      echo "nvidia-smi: not on PATH"
    fi
  } | tee "$txt"
  if [[ ${GPU_RUN_SMOKE:-0} == 1 ]]; then
    verify_install cpu | tee -a "$txt"
    return
  fi
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    die "torch sees no CUDA GPU: this stage needs the GPU machine (use 'smoke' elsewhere)"
  install_wheels
  install_fused_pool "$OUTDIR"
  {
    echo
    echo "install: pip wheel --no-build-isolation --no-deps . + pip install (FUSED_POOL_CUDA=1," \
      "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}); wheel and .srchash copied to OUTDIR"
    verify_install cuda || echo "PROBLEM: the installed package failed its check"
    local so
    so=$(cd /tmp && "$PY" -c 'import fused_pool._C as c; print(c.__file__)' 2>/dev/null || true)
    if [[ -n $so ]] && command -v cuobjdump >/dev/null 2>&1; then
      echo "CUDA code in _C: $(cuobjdump --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort | uniq -c | tr '\n' ' ')"
    fi
  } | tee -a "$txt"
  grep -q '^PROBLEM' "$txt" && die "setup finished with problems (see $txt)"
  log "setup done: $txt"
}

stage_test() {
  ensure_installed
  local work txt=${PREFIX}_tests.txt junit=${PREFIX}_junit.xml
  work=$(mktemp -d)
  # The suite runs from a copy of tests/ in a temporary folder, so that `import fused_pool` finds
  # the installed package, never the source tree's fused_pool/.
  cp -r "$REPO/tests" "$work/tests"
  find "$work/tests" -name __pycache__ -prune -exec rm -rf {} +
  printf '[pytest]\naddopts = -ra\n' >"$work/pytest.ini"
  cat >"$work/tests/test_zz_gpu_run.py" <<'EOF'
"""Added by benchmarks/gpu_run.sh: the suite ran against the installed package, on the GPU."""

import os

import torch

import fused_pool
from fused_pool.backends import unavailable_reason


def test_runs_against_the_installed_package():
    if os.environ.get("GPU_RUN_EXPECT_INSTALLED") == "1":
        repo = os.path.realpath(os.environ["GPU_RUN_REPO"])
        assert not os.path.realpath(fused_pool.__file__).startswith(repo + os.sep), fused_pool.__file__


def test_triton_and_cuda_backends_run_on_cuda_tensors():
    if os.environ.get("GPU_RUN_EXPECT_CUDA") == "1":
        for backend in ("triton", "cuda"):
            assert unavailable_reason(backend, torch.device("cuda")) is None, backend
EOF
  # -v: every outcome is in the log as it happens, so a run stopped by the budget still counts.
  local args=(-p no:cacheprovider -c "$work/pytest.ini" --rootdir "$work" --junitxml "$work/junit.xml" -v
    --durations 15)
  if "$PY" -c 'import xdist' 2>/dev/null; then
    args+=(-n "${GPU_RUN_WORKERS:-16}")
  fi
  local expect_installed=1 expect_cuda=1 targets=(tests)
  if [[ ${GPU_RUN_SMOKE:-0} == 1 ]]; then
    expect_installed=0
    expect_cuda=0
    args=(-p no:cacheprovider -c "$work/pytest.ini" --rootdir "$work" --junitxml "$work/junit.xml" -n 2 -x
      -k "backend or empty_sequences or empty_and_all or degenerate or gpu_run")
    targets=(tests/test_backends.py tests/test_pool.py tests/test_attention.py tests/test_zz_gpu_run.py)
  elif "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    args+=(--timeout 300)
  fi
  # shellcheck disable=SC2206  # GPU_RUN_PYTEST_ARGS is split into words on purpose
  args+=(${GPU_RUN_PYTEST_ARGS:-})
  [[ -n ${GPU_RUN_PYTEST_K:-} ]] && args+=(-k "$GPU_RUN_PYTEST_K")
  local t0 rc=0 budget
  budget=$(remaining 30)
  if ((budget <= 30)); then
    echo "gpu_run.sh test on $GPU_RUN_SLUG, $GPU_RUN_DATE: NOT RUN, ${budget}s left in the stage budget" | tee "$txt"
    return 1
  fi
  t0=$(now)
  log "pytest ${args[*]} ${targets[*]} (from $work, budget ${budget}s)"
  (cd "$work" && GPU_RUN_REPO=$REPO GPU_RUN_EXPECT_INSTALLED=$expect_installed GPU_RUN_EXPECT_CUDA=$expect_cuda \
    FUSED_POOL_REQUIRE_EXTENSION=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
    timeout -k 10 "$budget" "$PY" -m pytest "${args[@]}" "${targets[@]}") 2>&1 | tee "$work/pytest.out" ||
    rc=${PIPESTATUS[0]}
  local seconds=$(($(now) - t0))
  [[ -f $work/junit.xml ]] && cp "$work/junit.xml" "$junit"
  local summary
  summary=$(grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$work/pytest.out" | tail -n 1 |
    sed -e 's/^=* *//' -e 's/ *=*$//' || true)
  if [[ $rc == 124 || $rc == 137 ]]; then
    summary="TIMEOUT: pytest was stopped after ${seconds}s (budget ${budget}s); ${summary:-no summary line}"
  fi
  {
    echo "gpu_run.sh test on $GPU_RUN_SLUG, $GPU_RUN_DATE: ${summary:-no pytest summary line (rc $rc)}"
    echo "pytest exit status: $rc; wall ${seconds}s"
    echo "command (from a copy of tests/ in a temporary folder): python -m pytest $(printf '%q ' "${args[@]}" "${targets[@]}")"
    versions
    verify_install "$([[ ${GPU_RUN_SMOKE:-0} == 1 ]] && echo cpu || echo cuda)" | grep -v '^masked_mean' || true
    # Outcomes per (backend, device) pair: from the JUnit XML, or from the -v log when pytest was
    # stopped before writing it.
    "$PY" - "$work/junit.xml" "$work/pytest.out" <<'EOF'
import collections, os, re, sys
import xml.etree.ElementTree as ET

counts = collections.defaultdict(collections.Counter)
failures, skips = [], collections.Counter()
PAIR = re.compile(r"(?<![a-z])(triton|cuda|cpu)-(cpu|cuda)(?![a-z])")


def count(name, outcome):
    pair = PAIR.search(name.split("[", 1)[1] if "[" in name else "")
    counts[pair.group(0) if pair else "no backend parameter"][outcome] += 1


if os.path.exists(sys.argv[1]):
    print("outcomes (JUnit XML):")
    for case in ET.parse(sys.argv[1]).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = (child.get("message") or child.tag).splitlines() or [child.tag]
                failures.append(f"  {name}: {message[0][:200]}")
            elif child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "")[:160]] += 1
        count(name, outcome)
else:
    print("outcomes (no JUnit XML: pytest was stopped; counted from the -v log, tests that finished):")
    line_re = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/[^\[\s]+(?:\[.*\])?)")
    with open(sys.argv[2], errors="replace") as handle:
        for line in handle:
            found = line_re.search(line)
            if found:
                outcome = {"PASSED": "passed", "SKIPPED": "skipped", "XFAIL": "skipped"}.get(found[1], "failed")
                count(found[2], outcome)
                if outcome == "failed":
                    failures.append(f"  {found[2]}")
for key in sorted(counts):
    c = counts[key]
    print(f"  {key}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
if failures:
    print(f"failed ({len(failures)}; first 30):")
    print("\n".join(failures[:30]))
if skips:
    print("skip reasons:")
    for reason, n in skips.most_common(15):
        print(f"  {n} x {reason}")
EOF
  } >"$txt" 2>&1
  cat "$txt"
  return "$rc"
}

# Prints the ERROR SUMMARY line of one compute-sanitizer run's output ($1), and its first findings.
summarize_tool() {
  local out=$1 tool=$2 rc=$3 seconds=$4 budget=$5 line
  line=$(grep -m 1 'ERROR SUMMARY' "$out" || true)
  if [[ -z $line ]]; then
    if [[ $rc == 124 || $rc == 137 ]]; then
      line="TIMEOUT after ${seconds}s (budget ${budget}s): no ERROR SUMMARY"
    else
      line="no ERROR SUMMARY (exit status $rc)"
    fi
  fi
  echo "$tool: $line (exit status $rc, ${seconds}s)"
  local driver
  driver=$(grep -m 1 '^sanitize_driver:' "$out" || true)
  [[ -n $driver ]] && echo "  driver: $driver"
  if ! grep -q 'ERROR SUMMARY: 0 errors' "$out"; then
    grep -E '^========= ' "$out" | grep -v -E 'ERROR SUMMARY|^========= COMPUTE-SANITIZER$' | head -n 40 |
      sed 's/^/  /' || true
    grep -m 10 '^FAIL ' "$out" | sed 's/^/  /' || true
  fi
}

stage_sanitize() {
  ensure_installed
  local txt=${PREFIX}_sanitizer.txt work driver=$REPO/benchmarks/sanitize_driver.py
  work=$(mktemp -d)
  local base_args=(--device cuda)
  [[ ${GPU_RUN_SMOKE:-0} == 1 ]] && base_args=(--device cpu --size toy --dtypes float32)
  # shellcheck disable=SC2206  # split into words on purpose
  base_args+=(${GPU_RUN_SANITIZE_ARGS:-})
  local failed=0 t0 rc budget
  {
    echo "gpu_run.sh sanitize on $GPU_RUN_SLUG, $GPU_RUN_DATE, commit $(commit)"
    echo "driver: python benchmarks/sanitize_driver.py ${base_args[*]}"
  } >"$txt"

  # A plain run first: a Python error shows without the sanitizer's slowness, the reference check
  # runs, and Triton's compile cache is warm for the sanitizer runs.
  budget=$(remaining 30)
  t0=$(now)
  rc=0
  (cd "$work" && timeout -k 10 "$budget" "$PY" "$driver" "${base_args[@]}" --quiet) 2>&1 | tee "$work/plain.out" ||
    rc=${PIPESTATUS[0]}
  {
    echo -n "plain run (no sanitizer, checked against the reference): exit status $rc, $(($(now) - t0))s"
    [[ $rc == 124 || $rc == 137 ]] && echo -n " TIMEOUT (budget ${budget}s)"
    echo
    echo "  $(grep -m 1 '^sanitize_driver:' "$work/plain.out" || echo 'no driver summary')"
    grep -m 20 -E '^(FAIL|skip) ' "$work/plain.out" | sed 's/^/  /' || true
  } >>"$txt"
  [[ $rc == 0 ]] || failed=1

  if [[ ${GPU_RUN_SMOKE:-0} == 1 ]]; then
    # No compute-sanitizer on CPU: prove the summary parser on canned output instead.
    printf '%s\n' '========= COMPUTE-SANITIZER' 'ok   cuda masked_mean float32 case' \
      '========= Invalid __global__ read of size 4 bytes' '=========     at pool_fwd_kernel+0x1f0' \
      '========= ERROR SUMMARY: 1 error' >"$work/canned.out"
    summarize_tool "$work/canned.out" "canned-memcheck" 86 1 1 >"$work/canned.txt"
    if ! grep -q 'memcheck: ========= ERROR SUMMARY: 1 error' "$work/canned.txt" ||
      ! grep -q 'Invalid __global__ read' "$work/canned.txt"; then
      die "summarize_tool does not parse sanitizer output: $(cat "$work/canned.txt")"
    fi
    echo "compute-sanitizer: not run (smoke on CPU); the summary parser passed on canned output" >>"$txt"
  else
    local sanitizer
    sanitizer=$(command -v compute-sanitizer || true)
    [[ -z $sanitizer && -x /usr/local/cuda/bin/compute-sanitizer ]] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
    if [[ -z $sanitizer ]]; then
      echo "compute-sanitizer: not found" >>"$txt"
      failed=1
    else
      echo "compute-sanitizer: $("$sanitizer" --version | grep -v '^$' | tail -n 1)" >>"$txt"
      # shellcheck disable=SC2206  # a list of words
      local tools=(${GPU_RUN_SANITIZE_TOOLS:-memcheck synccheck initcheck racecheck}) i tool
      for i in "${!tools[@]}"; do
        tool=${tools[$i]}
        local left=$((${#tools[@]} - i)) env_args=() tool_args=() driver_args=("${base_args[@]}")
        # Each tool gets an equal share of what is left: time a fast tool leaves goes to the next.
        budget=$(($(remaining 30) / left))
        if ((budget < 30)); then
          echo "$tool: NOT RUN: no time left in the stage budget" >>"$txt"
          failed=1
          continue
        fi
        case $tool in
          memcheck | initcheck)
            # One cudaMalloc per tensor: an access past a tensor is past its allocation, not
            # inside torch's cached pool where the sanitizer cannot see it.
            env_args=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
            ;;
          racecheck | synccheck)
            # Shared-memory and barrier use do not depend on the dtype: one dtype keeps them short.
            [[ " ${base_args[*]} " == *" --dtypes "* ]] || driver_args+=(--dtypes float32)
            ;;
        esac
        [[ $tool == memcheck ]] && tool_args=(--leak-check no)
        # torch and Triton probe the driver with calls that may fail on purpose: not findings.
        # shellcheck disable=SC2206  # split into words on purpose
        tool_args+=(${GPU_RUN_SANITIZER_FLAGS:---report-api-errors no})
        log "compute-sanitizer --tool $tool (budget ${budget}s)"
        t0=$(now)
        rc=0
        (cd "$work" && env "${env_args[@]}" PYTHONUNBUFFERED=1 timeout -k 10 "$budget" "$sanitizer" --tool "$tool" \
          --target-processes all --print-limit 64 --error-exitcode 86 \
          --show-backtrace device "${tool_args[@]}" "$PY" "$driver" "${driver_args[@]}" --no-check) 2>&1 |
          tee "$work/$tool.out" | grep -v -E '^ok ' || rc=${PIPESTATUS[0]}
        summarize_tool "$work/$tool.out" "$tool" "$rc" "$(($(now) - t0))" "$budget" >>"$txt"
        grep -q 'ERROR SUMMARY: 0 errors' "$work/$tool.out" && [[ $rc == 0 ]] || failed=1
      done
    fi
  fi
  cat "$txt"
  return "$failed"
}

stage_bench() {
  ensure_installed
  local work stamp
  work=$(mktemp -d)
  stamp=$(date +%H%M%S)
  local csv=${PREFIX}_${stamp}_bench.csv
  local groups=(masked_mean masked_max masked_mean_max attention_pool query_attention_pool)
  local dtypes reserve=60 extra=()
  read -r -a dtypes <<<"${GPU_RUN_BENCH_DTYPES:-float32 bfloat16}"
  local base=(--device cuda)
  if [[ ${GPU_RUN_SMOKE:-0} == 1 ]]; then
    groups=(masked_mean attention_pool)
    dtypes=(float32)
    reserve=20
    base=(--device cpu --quick --modes fwd --providers fused_pool:cpu torch:eager --budget 0.02)
  fi
  # shellcheck disable=SC2206  # split into words on purpose
  extra=(${GPU_RUN_BENCH_ARGS:-})
  command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv || true
  # One run.py per (dtype, op): a run stopped by the budget loses one op, not the sweep.
  local dtype op budget rc done_runs=0 cut=()
  for dtype in "${dtypes[@]}"; do
    for op in "${groups[@]}"; do
      budget=$(remaining "$reserve")
      if ((budget < reserve)); then
        cut+=("$dtype/$op")
        continue
      fi
      log "run.py ${base[*]} --dtypes $dtype --ops $op ${extra[*]} (budget ${budget}s)"
      rc=0
      (cd "$work" && TQDM_MININTERVAL=10 timeout -k 10 "$budget" "$PY" "$REPO/benchmarks/run.py" "${base[@]}" \
        --dtypes "$dtype" --ops "$op" --out "$work/runs" --no-plots "${extra[@]}") || rc=$?
      if [[ $rc == 0 ]]; then
        done_runs=$((done_runs + 1))
      else
        cut+=("$dtype/$op(exit $rc)")
      fi
    done
  done
  ((done_runs > 0)) || die "no benchmark run finished"
  # One CSV for the whole sweep (run.py's columns; the commit filled in where git was missing).
  "$PY" - "$csv" "$(commit)" "$work"/runs/*.csv <<'EOF'
import csv, sys

out, commit, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
rows, fields = [], None
for path in paths:
    with open(path) as handle:
        reader = csv.DictReader(handle)
        fields = fields or reader.fieldnames
        rows += list(reader)
for row in rows:
    row["commit"] = row.get("commit") or commit
with open(out, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
print(f"wrote {out}: {len(rows)} rows from {len(paths)} runs")
EOF
  (cd "$work" && "$PY" "$REPO/benchmarks/plot.py" "$csv") || log "plotting failed (the CSV is complete)"
  (cd "$work" && "$PY" "$REPO/benchmarks/report.py" "$csv") || true
  command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
  if ((${#cut[@]})); then
    log "not measured (budget or failure): ${cut[*]}; rerun with GPU_RUN_BENCH_DTYPES / a larger budget"
    return 3
  fi
  log "bench done: $csv"
}

# --- driver ---------------------------------------------------------------------------------------

run_stage() {
  local stage=$1 budget=${GPU_RUN_STAGE_BUDGET:-570}
  if [[ -n ${CALL_DEADLINE:-} ]]; then
    local left=$((CALL_DEADLINE - $(now)))
    ((left < budget)) && budget=$left
  fi
  local stage_log=${PREFIX}_${stage}.log
  if ((budget < 40)); then
    log "stage $stage: NOT RUN, ${budget}s left of GPU_RUN_CALL_BUDGET" | tee -a "$stage_log"
    return 1
  fi
  log "stage $stage: budget ${budget}s, log $stage_log"
  local rc=0
  # The stage stops its own steps in time (GPU_RUN_DEADLINE); the outer timeout is the backstop.
  GPU_RUN_DEADLINE=$(($(now) + budget)) GPU_RUN_LOG=$stage_log \
    timeout -k 10 $((budget + 15)) bash "$SELF" __stage "$stage" "$OUTDIR" 2>&1 | tee "$stage_log" ||
    rc=${PIPESTATUS[0]}
  log "stage $stage: exit status $rc"
  return "$rc"
}

main() {
  [[ $# -ge 1 && $# -le 2 ]] || usage
  local spec=$1
  if [[ $spec == __stage ]]; then
    usage
  fi
  OUTDIR=${2:-$REPO/benchmarks/results}
  mkdir -p "$OUTDIR"
  OUTDIR=$(cd "$OUTDIR" && pwd)
  local stages=()
  case $spec in
    all) stages=("${STAGES_ALL[@]}") ;;
    smoke)
      stages=("${STAGES_ALL[@]}")
      export GPU_RUN_SMOKE=1 TRITON_INTERPRET=1 GPU_RUN_STAGE_BUDGET=${GPU_RUN_STAGE_BUDGET:-150}
      ;;
    *)
      IFS=, read -r -a stages <<<"$spec"
      local s
      for s in "${stages[@]}"; do
        [[ " ${STAGES_ALL[*]} " == *" $s "* ]] || { echo "unknown stage '$s'" >&2 && usage; }
      done
      ;;
  esac
  GPU_RUN_SLUG=$(gpu_slug)
  GPU_RUN_DATE=$(date +%F)
  PREFIX=$OUTDIR/${GPU_RUN_SLUG}_${GPU_RUN_DATE}
  export GPU_RUN_SLUG GPU_RUN_DATE PREFIX OUTDIR PYTHON=$PY
  [[ -n ${GPU_RUN_CALL_BUDGET:-} ]] && CALL_DEADLINE=$(($(now) + GPU_RUN_CALL_BUDGET))
  log "stages: ${stages[*]}; gpu $GPU_RUN_SLUG; outputs in $OUTDIR"
  local t0 stage failed=()
  t0=$(now)
  for stage in "${stages[@]}"; do
    if ! run_stage "$stage"; then
      failed+=("$stage")
      # Nothing else can run against a package that did not install.
      [[ $stage == setup && ${GPU_RUN_SMOKE:-0} != 1 ]] && break
    fi
  done
  log "done in $(($(now) - t0))s; outputs:"
  local f
  for f in "$PREFIX"_*; do
    [[ -f $f ]] && printf '  %8s  %s\n' "$(du -h "$f" | cut -f1)" "${f##*/}"
  done
  if ((${#failed[@]})); then
    log "FAILED stages: ${failed[*]}"
    exit 1
  fi
  log "all stages passed"
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  return 0 # sourced (to test its functions): define them, run nothing
elif [[ ${1:-} == __stage ]]; then
  # Inner call: one stage, under run_stage's timeout and tee.
  "stage_$2"
else
  main "$@"
fi
