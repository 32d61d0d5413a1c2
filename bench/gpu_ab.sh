#!/usr/bin/env bash
# A kernel change against a base revision, on a GPU machine, in about two minutes: the
# short check for when most of a device lease is spent (bench/gpu_check.sh is the whole one).
#   1. build this working tree in place and BASE in a copy, in parallel. BASE is a git
#      revision (default HEAD) or a folder holding setup.py, pyproject.toml, csrc/ and
#      relaydiff/ (e.g. one exported with `git archive` into a carried, ignored folder).
#      The device tool's copy of .git can lag the working tree (seen 2026-12-04: HEAD there
#      was three commits old), so check commit.txt, or pass a folder.
#   2. the CUDA op tests on this tree (tests/test_ops_cuda.py, tests/test_ops.py -k cuda),
#      both files at once, RELAYDIFF_REQUIRE_CUDA=1
#   3. bench/gpu_bench.py --kernels-only for the tree and for BASE, one after the other on
#      the idle GPU, and the ratio per row (base ms / tree ms)
#   4. when ncu is there: executed instructions and issue use of one relay_corrupt /
#      relay_step / patch_dct launch each (bench/ncu_ops.py), tree and BASE
# Results in $OUT (default bench/results/ab): *.log, tree.json, base.json, ratio.txt, ncu_*.txt.
#
#   OUT=/tmp/ab bash bench/gpu_ab.sh [BASE]     # PYTHON=python3, TORCH_CUDA_ARCH_LIST=9.0,
#                                               # NCU_WHICH="tree base" (which builds ncu profiles)
set -u
cd "$(dirname "$0")/.."
BASE=${1:-HEAD}
OUT=${OUT:-bench/results/ab}
PY=${PYTHON:-python3}
BASE_DIR=/tmp/relaydiff_base
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} RELAYDIFF_BUILD_CUDA=1 RELAYDIFF_REQUIRE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))}
{ git rev-parse HEAD; git status --short; echo "base: $BASE = $(git rev-parse "$BASE" 2>/dev/null || echo folder)"; } >"$OUT/commit.txt" 2>&1

rm -rf "$BASE_DIR" && mkdir -p "$BASE_DIR"
if [[ -d "$BASE" ]]; then
  (cd "$BASE" && cp -r setup.py pyproject.toml csrc relaydiff "$BASE_DIR"/) || exit 2
  find "$BASE_DIR" -name "*.so" -delete
elif ! git archive "$BASE" setup.py pyproject.toml csrc relaydiff | tar -x -C "$BASE_DIR"; then
  echo "gpu_ab: cannot export $BASE (is this a git checkout?)" >&2
  exit 2
fi
t0=$SECONDS
(cd "$BASE_DIR" && "$PY" setup.py build_ext --inplace >"$OUT/build_base.log" 2>&1) &
base_pid=$!
"$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
tree_rc=$?
wait $base_pid
base_rc=$?
echo "build: tree rc $tree_rc, base rc $base_rc, $((SECONDS - t0)) s (MAX_JOBS=$MAX_JOBS each)"
if ((tree_rc != 0)); then
  grep -m 8 -E "error" "$OUT/build.log" | cut -c1-240
  exit 1
fi

t0=$SECONDS
export PYTHONPATH="$PWD"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py >"$OUT/test_ops_cuda.log" 2>&1 &
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda >"$OUT/test_ops.log" 2>&1
wait
for f in test_ops_cuda test_ops; do
  line=$(grep -E "[0-9]+ (passed|failed)|no tests ran" "$OUT/$f.log" | tail -1 | tr -d '=')
  echo "$f: ${line:-no result (timeout or crash; $f.log)}"
  grep -E "^(FAILED|ERROR) " "$OUT/$f.log" | head -6 | cut -c1-200
done
echo "tests: $((SECONDS - t0)) s"

timeout 60 "$PY" bench/gpu_bench.py --kernels-only --label "tree" --out "$OUT/tree.json" >"$OUT/tree.txt" 2>&1
if ((base_rc == 0)); then
  timeout 60 env PYTHONPATH="$BASE_DIR" "$PY" bench/gpu_bench.py --kernels-only --label "base $BASE" \
    --out "$OUT/base.json" >"$OUT/base.txt" 2>&1
fi
"$PY" - "$OUT" <<'EOF' | tee "$OUT/ratio.txt"
import json, sys
out = sys.argv[1]
try:
    t = json.load(open(f"{out}/tree.json"))
except (OSError, ValueError) as e:
    sys.exit(f"no tree timings: {e}")
try:
    b = {(r["op"], tuple(r["shape"]), r["dtype"]): r for r in json.load(open(f"{out}/base.json"))["rows"]}
except (OSError, ValueError):
    b = {}
print(f"{t['device']}: copy {t['copy_GBps']:.0f} GB/s; base ms / tree ms")
print(f"{'op':22s} {'shape':16s} {'dtype':9s} {'base ms':>8s} {'tree ms':>8s} {'%copy':>6s} {'ratio':>6s}")
for r in t["rows"]:
    k = (r["op"], tuple(r["shape"]), r["dtype"])
    base = b.get(k, {}).get("ms_kernel")
    ratio = f"{base / r['ms_kernel']:6.2f}" if base else "     -"
    bs = f"{base:8.3f}" if base else "       -"
    print(f"{r['op']:22s} {'x'.join(map(str, r['shape'])):16s} {r['dtype']:9s} {bs} "
          f"{r['ms_kernel']:8.3f} {100 * r['frac_copy']:5.0f}% {ratio}")
EOF

if command -v ncu >/dev/null; then
  for which in ${NCU_WHICH:-tree base}; do
    pp="$PWD"; [[ $which == base ]] && pp="$BASE_DIR"
    PYTHONPATH="$pp" timeout 40 ncu --clock-control none -k regex:tile_kernel --section SpeedOfLight \
      --section InstructionStats --section Occupancy "$PY" bench/ncu_ops.py >"$OUT/ncu_$which.txt" 2>&1
    echo "ncu $which (relay_corrupt, relay_step, patch_dct; [64, 3, 256, 256] float32):"
    grep -E "Executed Instructions  |Issue Slots Busy|Duration  |Achieved Occupancy" "$OUT/ncu_$which.txt" \
      | tr -s ' ' | sed 's/^/ /'
  done
fi
