#!/usr/bin/env bash
# Compile every CUDA source (csrc/cuda/*.cu and the torch glue *.cpp) without a GPU and
# against whatever torch PYTHON has (a CPU-only wheel works): CMake's relaydiff_cuda_check
# target in a temporary build folder. Exits non-zero on any compile error; prints the
# registers / stack / spills ptxas reports for each kernel.
#
#   tools/check_cuda_compile.sh                      # PYTHON=python, CUDA_HOME=/usr/local/cuda
#   PYTHON=/work/venv/bin/python CUDA_ARCHS="80;90" tools/check_cuda_compile.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
cuda_home=${CUDA_HOME:-/usr/local/cuda}
archs=${CUDA_ARCHS:-90}
jobs=${JOBS:-$(nproc)}
if [[ ! -x "$cuda_home/bin/nvcc" ]]; then
  echo "check_cuda_compile: no nvcc at $cuda_home/bin/nvcc (set CUDA_HOME)" >&2
  exit 2
fi
build=$(mktemp -d "${TMPDIR:-/tmp}/relaydiff-cuda-check.XXXXXX")
trap 'rm -rf "$build"' EXIT
start=$(date +%s)
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$here" -B "$build" "${generator[@]}" -DRELAYDIFF_CUDA_CHECK=ON \
  -DPython_EXECUTABLE="$(command -v "$python")" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc" \
  -DCUDAToolkit_ROOT="$cuda_home" -DRELAYDIFF_CUDA_ARCHITECTURES="$archs" >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; exit 1; }
if ! cmake --build "$build" --target relaydiff_cuda_check -j "$jobs" >"$build/build.log" 2>&1; then
  grep -E -B2 -A6 "error|Error" "$build/build.log" | head -80
  echo "check_cuda_compile: FAILED" >&2
  exit 1
fi
"$python" - "$build/build.log" <<'PY'
import re, sys
log = open(sys.argv[1]).read()
rows = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?(\d+) bytes stack frame, "
                  r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers",
                  log, re.S)
spills = [r for r in rows if int(r[3]) or int(r[4])]
print(f"{len(rows)} kernels compiled; max registers {max((int(r[5]) for r in rows), default=0)}; "
      f"{len(spills)} with spills")
for name, arch, stack, st, ld, regs in spills:
    print(f"  spills: {name} ({arch}) {st}/{ld} bytes")
PY
# A link-level check without CUDA libraries: every relaydiff:: symbol the objects use must be
# defined in one of them (a missing kernel instantiation or launcher shows up here, not only
# when a GPU machine imports the extension).
objs=$(find "$build" -path "*relaydiff_cuda_check.dir*" -name "*.o")
if [[ -z "$objs" ]]; then
  echo "check_cuda_compile: no object files found under $build" >&2
  exit 1
fi
# shellcheck disable=SC2086
missing=$(comm -23 <(nm -C --undefined-only $objs | grep -o "relaydiff::.*" | sort -u) \
                   <(nm -C --defined-only $objs | grep -o "relaydiff::.*" | sort -u))
if [[ -n "$missing" ]]; then
  echo "check_cuda_compile: relaydiff symbols used but not defined by the CUDA sources:" >&2
  echo "$missing" >&2
  exit 1
fi
echo "check_cuda_compile: OK in $(( $(date +%s) - start )) s ($(echo "$objs" | wc -l) objects, no undefined relaydiff symbols)"
