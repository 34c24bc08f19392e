#!/usr/bin/env bash
# fmcore's C++ under the compiler sanitizers, on the CPU (no GPU needed).
#
#   scripts/sanitize_cpu.sh asan    # AddressSanitizer + UndefinedBehaviorSanitizer: csrc/data (shards,
#                                   # plan, loader) and the CPU reference of every op (csrc/ops/*.cpp)
#   scripts/sanitize_cpu.sh tsan    # ThreadSanitizer: the loader's worker threads (csrc/data)
#   scripts/sanitize_cpu.sh asan tests/data/test_loader.py -k resume   # other pytest arguments
#
# What it does: configures a CPU-only (FMCORE_CUDA=off) build of fmcore._C with -fsanitize=... in
# build/<asan|tsan>/ (Debug, -O1 -g), builds it with at most JOBS=2 jobs, lays out a package tree
# build/<mode>/python/fmcore (symlinks to python/fmcore, plus the sanitized _C) so the regular
# python/fmcore/_C*.so is left alone, and runs pytest with the sanitizer runtime preloaded into
# CPython (which is not instrumented itself). Exits non-zero on a report or a test failure; the
# report goes to build/<mode>/reports/*.log (log_path) and is printed at the end.
#
# Not covered: csrc/kernels and csrc/ops/*_cuda.cpp (CUDA: see `scripts/gpu_check.sh sanitize`) and
# csrc/dist (CUDA/NCCL only; the CPU build compiles a stub that reports has_nccl = False).
#
# Time on the 2-core dev machine (2026-11-23, shared): build ~N min each mode (first time; then
# incremental); asan tests ~N min; tsan tests ~N min.
#
# Notes on the runtimes:
# - ASAN_OPTIONS=detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# - ASan+UBSan: -fno-sanitize=vptr, because the vptr check compares typeinfo across torch's shared
#   libraries (not instrumented) and fmcore's, and reports ... (see the suppressions comment below).
# - TSan: see scripts/tsan.supp for what is suppressed and why (races inside CPython/torch/OpenMP
#   frames, never in fmcore frames).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
mode=${1:-asan}
shift || true
python=${PYTHON:-$(command -v python)}
export PATH="$(dirname "$python"):$PATH"  # the venv's cmake/ninja (see scripts/dev_build.sh)
build=$repo/build/$mode
case $mode in
  asan)
    flags="-fsanitize=address,undefined -fno-omit-frame-pointer"
    runtime=$(g++ -print-file-name=libasan.so)
    default_tests=(tests/data tests/ops)
    ;;
  tsan)
    flags="-fsanitize=thread"
    runtime=$(g++ -print-file-name=libtsan.so)
    default_tests=(tests/data/test_loader.py)
    ;;
  *) echo "usage: $0 asan|tsan [pytest args...]" >&2; exit 2 ;;
esac

mkdir -p "$build"
start=$(date +%s)
if [ ! -f "$build/build.ninja" ]; then
  cmake -S . -B "$build" -G Ninja -DPython_EXECUTABLE="$python" -DFMCORE_CUDA=off \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS="$flags -O1 -g" \
    -DCMAKE_MODULE_LINKER_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" \
    > "$build/configure.log" || { cat "$build/configure.log"; exit 1; }
fi
cmake --build "$build" -j "${JOBS:-2}"
echo "build: $(( $(date +%s) - start )) s"

# A package tree that imports the sanitized _C: symlinks to every Python file of python/fmcore.
pkg=$build/python
rm -rf "$pkg"
mkdir -p "$pkg"
cp -rs "$repo/python/fmcore" "$pkg/fmcore"
find "$pkg/fmcore" -name '_C*.so' -delete
cp "$build"/_C*.so "$pkg/fmcore/"

# libstdc++ is preloaded too: CPython does not link it, so without it the sanitizer runtime finds no
# real __cxa_throw to intercept and aborts at the first C++ exception (triton's import throws one).
stdcxx=$(readlink -f "$(g++ -print-file-name=libstdc++.so)")
# Reports go to stderr (fd 2): GCC 12's UBSan ignores log_path when combined with ASan, and pytest's
# default fd capture loses what a dying process wrote, hence --capture=sys (Python output is still
# captured; the runtime's writes to fd 2 are not) and the log that is searched afterwards.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$repo/scripts/tsan.supp"
export PYTHONPATH=$pkg
tests=("$@")
[ ${#tests[@]} -eq 0 ] && tests=("${default_tests[@]}")
log=$build/pytest.log
start=$(date +%s)
set +e
LD_PRELOAD="$runtime $stdcxx" "$python" -m pytest -q -p no:cacheprovider --capture=sys \
  "${tests[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "tests: $(( $(date +%s) - start )) s, pytest exit $status"
if grep -qE "runtime error:|ERROR: AddressSanitizer|WARNING: ThreadSanitizer|CHECK failed" "$log"; then
  echo "SANITIZER REPORT: see $log"
  grep -nE "runtime error:|ERROR: AddressSanitizer|WARNING: ThreadSanitizer|SUMMARY" "$log" | head -20
  status=1
fi
exit $status
