#!/usr/bin/env bash
# The whole GPU check in one go, for a fresh GPU machine (torch with CUDA preinstalled, no
# internet) with this repository as the working directory:
#   1. build relaydiff._C with its CUDA kernels in place (one arch, ninja, all cores)
#   2. in parallel: the tests (tests/test_ops_cuda.py, the CUDA cases of tests/test_ops.py,
#      the other `-m cuda` tests; failures do not stop the script; a test that crashes the
#      interpreter in test_ops_cuda.py is deselected and the file rerun), `relaydiff demo`
#      on the GPU (DEMO_MINUTES, default 2.5) and a second build for comparison: the
#      sources in VARIANT_SRC (default: this tree) built with VARIANT_MIN_BLOCKS (default 5;
#      empty: unset) after applying VARIANT_PATCH if given, e.g.
#      VARIANT_PATCH=my_change.patch VARIANT_MIN_BLOCKS= VARIANT_TESTS=1 to test and time a kernel
#      change side by side with the current kernels
#   3. on the idle GPU: bench/gpu_bench.py (kernel vs eager composition vs torch.compile of
#      it vs twin, % of copy bandwidth), the variant build's kernel rows, then
#      bench/gpu_pipeline_step.py (share of a 64->256 relay step outside the network)
#   4. ncu profile of one corrupt/step/dct launch (bench/ncu_ops.py), then
#      compute-sanitizer memcheck + racecheck of every op, when time is left
# Everything goes under $WORK (default /tmp/relaydiff_gpu): nvidia-smi.txt, build.log,
# test logs and JUnit XML, demo/ and demo.log, bench.txt/.json, bench_variant.txt/.json,
# pipeline_step.txt/.json, ncu.txt, sanitizer.log, summary.txt; $OUT (default
# bench/results/) gets summary.txt, bench.json, bench_variant.json, pipeline_step.json and
# everything packed in gpu_check.tgz (the device tool returns at most 8 files). The summary
# is printed last. Each step gets a share of DEADLINE seconds (default 430; a shorter
# DEADLINE shrinks every step's share).
#
#   OUT=/tmp/out bench/gpu_check.sh          # PYTHON=python3, TORCH_CUDA_ARCH_LIST=9.0
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=${DEADLINE:-430}
FINAL_OUT=${OUT:-bench/results}
OUT=${WORK:-/tmp/relaydiff_gpu}
PY=${PYTHON:-python3}
DEMO_MINUTES=${DEMO_MINUTES:-2.5}
# SKIP="demo variant bench pipe ncu sanitizer": leave those steps out (a verification rerun)
SKIP=" ${SKIP:-} "
skip() { [[ "$SKIP" == *" $1 "* ]]; }
VARIANT_MIN_BLOCKS=${VARIANT_MIN_BLOCKS-5}
VARIANT_SRC=${VARIANT_SRC:-.}
VARIANT_PATCH=${VARIANT_PATCH:-}
VARIANT_LABEL=${VARIANT_LABEL:-"$VARIANT_SRC${VARIANT_PATCH:+ + $VARIANT_PATCH} RELAYDIFF_CUDA_MIN_BLOCKS=$VARIANT_MIN_BLOCKS"}
mkdir -p "$OUT" "$FINAL_OUT"
# a warm machine keeps $OUT between calls: drop the last run's results, so that a step
# skipped this time cannot show the last run's figures in the summary
rm -rf "$OUT"/{*.txt,*.json,*.log,*.xml,*.csv,*.ncu-rep,demo}
git rev-parse HEAD >"$OUT/commit.txt" 2>/dev/null
git status --short >>"$OUT/commit.txt" 2>/dev/null
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $((DEADLINE - (SECONDS - START))); }
# seconds for a step: at most $1, leaving $2 for the steps after it
# The reserves are sized for the default DEADLINE of 430 s and shrink with a shorter one
# (else a DEADLINE of 300 leaves the tests ~20 s: a whole run came back with no test result).
share() {
  local s=$(($(left) - $2 * DEADLINE / 430))
  ((s > $1)) && s=$1
  ((s < 5)) && s=5
  echo "$s"
}
pytest_line() {  # the "N passed, M failed in Xs" line of a pytest log, or why there is none
  local line
  line=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran" "$1" 2>/dev/null | tail -1 | tr -d '=')
  echo "${line:-no result (timeout or crash; see $1)}"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv >"$OUT/nvidia-smi.txt" 2>&1
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  >>"$OUT/nvidia-smi.txt" 2>&1
{ command -v nvcc && nvcc --version | tail -2; } >>"$OUT/nvidia-smi.txt" 2>&1

# ---------------------------------------------------------------- 1. build
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_HOME
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} RELAYDIFF_BUILD_CUDA=1
t0=$SECONDS
timeout "$(share 200 150)" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
BUILD_RC=$?
BUILD_S=$((SECONDS - t0))
{ echo "host compiler: $(command -v "${CXX:-c++}") $("${CXX:-c++}" --version 2>/dev/null | head -1)"
  so=$(ls relaydiff/_C*.so 2>/dev/null | head -1)
  [[ -n "$so" ]] && echo "libstdc++ code defined inside _C: $(nm -C --defined-only "$so" 2>/dev/null | grep -c ' std::basic_ostream') ostream symbols"
} >>"$OUT/nvidia-smi.txt" 2>&1
BACKEND=$("$PY" -c "import relaydiff.ops as O; print(O.backend())" 2>&1 | tail -1)

# ---------------------------------------------------------------- 2a. background work
# the demo on the GPU (its training shares the GPU with the tests, never with the timings)
DEMO_PID=""
if ((BUILD_RC == 0)) && ! skip demo; then
  PYTHONUNBUFFERED=1 "$PY" -m relaydiff demo --out "$OUT/demo" --minutes "$DEMO_MINUTES" --quiet \
    >"$OUT/demo.log" 2>&1 &
  DEMO_PID=$!
fi
# the occupancy variant: the same sources built with a minimum of blocks per SM
VARIANT_DIR=/tmp/relaydiff_variant
VARIANT_PID=""
if ((BUILD_RC == 0)) && ! skip variant; then
  rm -rf "$VARIANT_DIR" && mkdir -p "$VARIANT_DIR" && (cd "$VARIANT_SRC" && cp -r setup.py pyproject.toml csrc relaydiff "$VARIANT_DIR"/) 2>/dev/null
  find "$VARIANT_DIR" -name "*.so" -delete
  if [[ -n "$VARIANT_PATCH" ]]; then
    patch -d "$VARIANT_DIR" -p1 <"$VARIANT_PATCH" >"$OUT/variant_patch.log" 2>&1 || echo "PATCH FAILED" >>"$OUT/variant_patch.log"
  fi
  # VARIANT_TESTS=1: the variant build also runs the CUDA op tests (from its own copy of
  # tests/, so that it imports its own relaydiff), before the benchmark starts
  [[ -n "${VARIANT_TESTS:-}" ]] && cp -r tests "$VARIANT_DIR"/
  (cd "$VARIANT_DIR" && RELAYDIFF_CUDA_MIN_BLOCKS=$VARIANT_MIN_BLOCKS MAX_JOBS=8 timeout 240 \
     "$PY" setup.py build_ext --inplace >"$OUT/build_variant.log" 2>&1 || exit 1
   [[ -z "${VARIANT_TESTS:-}" ]] && exit 0
   export PYTHONPATH="$VARIANT_DIR" RELAYDIFF_REQUIRE_CUDA=1
   "$PY" -c "import relaydiff.ops as O; print('variant imports', O.__file__, O.backend())" >"$OUT/test_variant.log" 2>&1
   timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py >>"$OUT/test_variant.log" 2>&1
   timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda >"$OUT/test_variant_ops.log" 2>&1
   exit 0) &
  VARIANT_PID=$!
fi

# ---------------------------------------------------------------- 2. tests
export RELAYDIFF_REQUIRE_CUDA=1
t0=$SECONDS
# -v prints each test's id before running it, so a crash of the interpreter names its test:
# that test is deselected and the run repeated (at most twice), so one crash cannot hide the
# rest of the file. Crashed tests are listed in the summary.
CRASHED=()
cuda_budget=$(share 120 260)
for attempt in 1 2 3; do
  log="$OUT/test_ops_cuda.log"; ((attempt > 1)) && log="$OUT/test_ops_cuda.rerun$attempt.log"
  deselect=(); for c in "${CRASHED[@]}"; do deselect+=(--deselect "$c"); done
  s=$((cuda_budget - (SECONDS - t0)))
  ((attempt > 1 && s < 10)) && break
  ((s < 5)) && s=5
  timeout "$s" "$PY" -m pytest -v -p no:cacheprovider tests/test_ops_cuda.py --durations=8 \
    "${deselect[@]}" --junitxml="$OUT/test_ops_cuda.xml" >"$log" 2>&1
  rc=$?
  # the interpreter died only if pytest printed no summary line ("Fatal Python error" can
  # also be the text of a child process's crash that a test reports)
  grep -qE "^=+ .*[0-9]+ (passed|failed|error).* in [0-9.]+s" "$log" && break
  grep -q "Fatal Python error" "$log" || break
  crashed=$(grep -oE "^tests/test_ops_cuda.py::[^ ]+" "$log" | tail -1)
  [[ -z "$crashed" ]] && break
  CRASHED+=("$crashed")
done
CUDA_TESTS_S=$((SECONDS - t0))
OPS_TESTS="(no tests/test_ops.py)"
OPS_TESTS_S=0
if [[ -f tests/test_ops.py ]]; then
  t0=$SECONDS
  timeout "$(share 40 240)" "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda \
    --junitxml="$OUT/test_ops.xml" >"$OUT/test_ops.log" 2>&1
  OPS_TESTS_S=$((SECONDS - t0))
  OPS_TESTS=$(pytest_line "$OUT/test_ops.log")
fi

# the rest of the library's CUDA tests (models, training, evaluation, conversion), briefly
t0=$SECONDS
timeout "$(share 50 220)" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests --ignore=tests/test_ops.py \
  --ignore=tests/test_ops_cuda.py --junitxml="$OUT/test_other_cuda.xml" >"$OUT/test_other_cuda.log" 2>&1
OTHER_TESTS_S=$((SECONDS - t0))
OTHER_TESTS=$(pytest_line "$OUT/test_other_cuda.log")

# ---------------------------------------------------------------- 3. benchmark (idle GPU)
t0=$SECONDS
DEMO="not run (build failed)"
skip demo && DEMO="skipped (SKIP)"
if [[ -n "$DEMO_PID" ]]; then
  # the demo keeps its own wall-clock budget; give it a little slack, then stop it
  waited=0
  while kill -0 "$DEMO_PID" 2>/dev/null && ((waited < 120)); do sleep 2; waited=$((waited + 2)); done
  if kill -0 "$DEMO_PID" 2>/dev/null; then kill "$DEMO_PID"; DEMO="KILLED after the wait (demo.log)"; fi
  wait "$DEMO_PID"; rc=$?
  [[ "$DEMO" == KILLED* ]] || DEMO="rc $rc (demo.log)"
fi
DEMO_WAIT_S=$((SECONDS - t0))
# the variant's build (and tests) must be over before anything is timed
VARIANT_RC=1
if [[ -n "$VARIANT_PID" ]]; then
  wait "$VARIANT_PID"; VARIANT_RC=$?
fi
t0=$SECONDS
bench_s=$(share ${BENCH_S:-120} 100)
skip bench && bench_s=1
timeout "$bench_s" "$PY" bench/gpu_bench.py --out "$OUT/bench.json" --budget $((bench_s * 5 / 10)) \
  --compile-budget $((bench_s * 3 / 10)) >"$OUT/bench.txt" 2>&1
BENCH_RC=$?
BENCH_S=$((SECONDS - t0))

VARIANT="not built"
if [[ -n "$VARIANT_PID" ]]; then
  if ((VARIANT_RC == 0)) && (($(left) >= 60)); then
    timeout "$(share 35 70)" env PYTHONPATH="$VARIANT_DIR" "$PY" bench/gpu_bench.py --kernels-only \
      --label "$VARIANT_LABEL" --out "$OUT/bench_variant.json" \
      >"$OUT/bench_variant.txt" 2>&1
    VARIANT="rc $? (bench_variant.txt)"
  else
    VARIANT="build failed or no time (build_variant.log)"
  fi
fi

# ---------------------------------------------------------------- 3c. the relay sampler step
PIPE="skipped (no time left)"
skip pipe && PIPE="skipped (SKIP)"
if ((BUILD_RC == 0)) && (($(left) >= 40)) && ! skip pipe; then
  timeout "$(share 60 30)" "$PY" bench/gpu_pipeline_step.py --out "$OUT/pipeline_step.json" \
    >"$OUT/pipeline_step.txt" 2>&1
  PIPE="rc $? (pipeline_step.txt)"
fi

# ---------------------------------------------------------------- 3b. one profile
# Nsight Compute on one launch of relay_corrupt / relay_step / patch_dct (bench/ncu_ops.py):
# throughput, occupancy, warp stall reasons and pipe use, for the next optimisation.
NCU="skipped (no time left)"
command -v ncu >/dev/null || NCU="skipped (ncu not found)"
skip ncu && NCU="skipped (SKIP)"
if ((BUILD_RC == 0)) && command -v ncu >/dev/null && (($(left) >= 40)) && ! skip ncu; then
  timeout "$(share 35 5)" ncu --clock-control none -k regex:tile_kernel \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    "$PY" bench/ncu_ops.py >"$OUT/ncu.txt" 2>&1
  case $? in
    0) NCU="ok (ncu.txt)" ;;
    124) NCU="timeout (ncu.txt)" ;;
    *) NCU="failed (ncu.txt)" ;;
  esac
fi

# ---------------------------------------------------------------- 4. sanitizer
SANITIZER="skipped (no time left)"
command -v compute-sanitizer >/dev/null || SANITIZER="skipped (compute-sanitizer not found)"
if ((BUILD_RC == 0)) && command -v compute-sanitizer >/dev/null && (($(left) >= 30)); then
  cat >"$OUT/sanitize_ops.py" <<'EOF'
import torch
import relaydiff.ops  # noqa: F401  (registers the ops)
K = torch.ops.relaydiff
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(2, 3, 40, 72, device="cuda").to(dt)
    v = torch.tensor([0.5, 1.0], dtype=torch.float64, device="cuda")
    K.patch_dct(x, 4); K.patch_idct(x[..., ::2], 2); K.patch_blur(x, v, 8, 1e-3)
    K.block_noise(x, 5, 1); K.mixed_noise(x, 0.15, 16, True, 1)
    K.relay_corrupt(x.to(memory_format=torch.channels_last), v, v, 4, 0.15, 4, 1e-3, True, 1)
    K.relay_step(x, x, x, x, v, v, v, v, 0.2, 4, 0.15, 3, 1e-3, True, 1)
torch.cuda.synchronize()
print("sanitized run done")
EOF
  : >"$OUT/sanitizer.log"
  SANITIZER=""
  for tool in memcheck racecheck; do
    ((s = $(left) / 2 - 5)); ((s < 10)) && { SANITIZER+="$tool: skipped (time) "; continue; }
    timeout "$s" compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" "$OUT/sanitize_ops.py" \
      >>"$OUT/sanitizer.log" 2>&1
    case $? in
      0) SANITIZER+="$tool: clean " ;;
      3) SANITIZER+="$tool: ERRORS (sanitizer.log) " ;;
      124) SANITIZER+="$tool: timeout " ;;
      *) SANITIZER+="$tool: did not run (sanitizer.log) " ;;
    esac
  done
fi

# ---------------------------------------------------------------- 5. per-instruction profile
# executed instructions per source line and per SASS instruction of one relay_corrupt
# launch, float32 [64, 3, 256, 256]: where the noise kernels spend their issue slots
NCU_SRC="skipped (no time left)"
skip ncu_source && NCU_SRC="skipped (SKIP)"
if ((BUILD_RC == 0)) && command -v ncu >/dev/null && (($(left) >= 45)) && ! skip ncu_source; then
  timeout "$(share 40 15)" ncu --clock-control none -k regex:tile_kernel -c 1 --section SourceCounters \
    --section InstructionStats --import-source yes -f -o "$OUT/corrupt_source" \
    "$PY" bench/ncu_ops.py >"$OUT/ncu_source.log" 2>&1 &&
    timeout 40 ncu --import "$OUT/corrupt_source.ncu-rep" --page source --csv --print-source cuda \
      >"$OUT/corrupt_lines.csv" 2>>"$OUT/ncu_source.log" &&
    timeout 40 ncu --import "$OUT/corrupt_source.ncu-rep" --page source --csv --print-source sass \
      >"$OUT/corrupt_sass.csv" 2>>"$OUT/ncu_source.log"
  NCU_SRC="rc $? (ncu_source.log; per source line corrupt_lines.csv, per instruction corrupt_sass.csv)"
fi

# ---------------------------------------------------------------- summary (last)
{
  echo "================ relaydiff GPU check: ${DEVICE:-no GPU found} ================"
  echo "total $((SECONDS - START)) s; results in $OUT"
  if ((BUILD_RC == 0)); then
    echo "build:   ok in ${BUILD_S} s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS); backend: $BACKEND"
  else
    echo "build:   FAILED (rc $BUILD_RC) after ${BUILD_S} s; first errors, then the log's end:"
    grep -m 8 -E "error:|Error:" "$OUT/build.log" | cut -c1-240
    tail -n 4 "$OUT/build.log" | cut -c1-240
  fi
  last_log=$(ls -t "$OUT"/test_ops_cuda*.log 2>/dev/null | head -1)
  echo "tests/test_ops_cuda.py:    $(pytest_line "${last_log:-$OUT/test_ops_cuda.log}") [${CUDA_TESTS_S} s]"
  for c in "${CRASHED[@]}"; do echo "  CRASHED (interpreter died; deselected and rerun): $c"; done
  grep -hE "^(FAILED|ERROR) " "$OUT"/test_ops_cuda*.log | sort -u | head -12 | cut -c1-200
  echo "tests/test_ops.py -k cuda: $OPS_TESTS [${OPS_TESTS_S} s]"
  [[ -f "$OUT/test_ops.log" ]] && grep -E "^(FAILED|ERROR) " "$OUT/test_ops.log" | head -8 | cut -c1-200
  echo "other CUDA tests (-m cuda): $OTHER_TESTS [${OTHER_TESTS_S} s]"
  grep -E "^(FAILED|ERROR) " "$OUT/test_other_cuda.log" | head -8 | cut -c1-200
  echo "demo on the GPU (--minutes $DEMO_MINUTES): $DEMO; waited ${DEMO_WAIT_S} s after the tests"
  grep -E "PSNR|SSIM|relay|nearest|bicubic|minutes|device" "$OUT/demo.log" 2>/dev/null | tail -n 14 | cut -c1-200
  echo "relay step outside the network: $PIPE"
  tail -n 3 "$OUT/pipeline_step.txt" 2>/dev/null
  echo "variant build ($VARIANT_LABEL): $VARIANT"
  if [[ -n "${VARIANT_TESTS:-}" ]]; then
    head -1 "$OUT/test_variant.log" 2>/dev/null | cut -c1-200
    echo "  variant tests/test_ops_cuda.py:    $(pytest_line "$OUT/test_variant.log")"
    grep -E "^(FAILED|ERROR) " "$OUT/test_variant.log" 2>/dev/null | head -8 | cut -c1-200
    echo "  variant tests/test_ops.py -k cuda: $(pytest_line "$OUT/test_variant_ops.log")"
    grep -E "^(FAILED|ERROR) " "$OUT/test_variant_ops.log" 2>/dev/null | head -8 | cut -c1-200
  fi
  tail -n 25 "$OUT/bench_variant.txt" 2>/dev/null
  echo "sanitizer: $SANITIZER"
  echo "ncu:       $NCU"
  echo "ncu per-instruction profile: $NCU_SRC"
  echo "benchmark (rc $BENCH_RC, ${BENCH_S} s):"
  if ((BENCH_RC == 0)); then
    tail -n 30 "$OUT/bench.txt"
  else
    tail -n 6 "$OUT/bench.txt"
    [[ -f "$OUT/bench.json" ]] && "$PY" bench/gpu_bench.py --table "$OUT/bench.json"
  fi
} | tee "$OUT/summary.txt"
for f in summary.txt bench.json bench_variant.json pipeline_step.json; do
  [[ -f "$OUT/$f" ]] && cp "$OUT/$f" "$FINAL_OUT/"
done
tar czf "$FINAL_OUT/gpu_check.tgz" -C "$OUT" --exclude="*.pt" --exclude="*.safetensors" --exclude="*.zip" . 2>/dev/null
