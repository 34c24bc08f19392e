#!/usr/bin/env bash
# fmcore's C++ under the compiler sanitizers, on the CPU (no GPU needed).
#
#   scripts/sanitize_cpu.sh asan    # AddressSanitizer + UndefinedBehaviorSanitizer: csrc/data (shards,
#                                   # plan, loader) and the CPU reference of every op (csrc/ops/*.cpp)
#   scripts/sanitize_cpu.sh tsan    # ThreadSanitizer: the loader's worker threads (csrc/data)
#   scripts/sanitize_cpu.sh asan tests/data/test_loader.py -k resume   # other pytest arguments
#   scripts/sanitize_cpu.sh sim-asan  # the CUDA kernels on the CPU simulator (tests/cudasim) under
#   scripts/sanitize_cpu.sh sim-tsan  # ASan+UBSan / TSan: out-of-bounds and racy kernel accesses
#
# What it does: configures a CPU-only (FMCORE_CUDA=off) build of fmcore._C with -fsanitize=... in
# build/<asan|tsan>/ (Debug, -O1 -g; GCC's runtimes), builds it with at most JOBS=2 jobs, lays out
# a package tree build/<mode>/python/fmcore (symlinks to python/fmcore plus the sanitized _C), so
# the regular python/fmcore/_C*.so is left alone, and runs pytest with the sanitizer runtime
# preloaded into CPython (which is not instrumented itself). Exits non-zero on a test failure or
# on any sanitizer report (halt_on_error: the first report ends the run); the whole output is kept
# in build/<mode>/pytest.log. Tests that start subprocesses (test_clean_shutdown) inherit the
# preload, so their child runs sanitized too.
#
# Default test sets: asan: tests/data, tests/ops and tests/optim without the CUDA cases (every CPU
# op reference, forward and backward, opcheck, torch.compile paths). tsan: tests/data/test_loader.py
# and tests/data/test_shards.py (every loader thread path: workers, restart, close, concurrent
# consumers, worker errors, malformed shards opened by the parallel openers). sim-asan / sim-tsan:
# tests/cudasim (the simulator's self-tests, every kernel test, and the NCCL communicator on ncclsim).
#
# sim-asan / sim-tsan: csrc/kernels/*.cu (attention with fmsim's PTX models) and their *_cuda.cpp bindings
# as built for fmsim (tests/cudasim/build.py, FMCORE_SIM_SANITIZE; into build/cudasim-<sanitizer>,
# by the test session itself), every CUDA thread a real OS thread; the reference fmcore._C is the
# regular python/fmcore one (uninstrumented). And csrc/dist/communicator.cpp over ncclsim (into
# build/ncclsim-<sanitizer>): its mutex against its watchdog thread, ranks as threads. Under TSan
# fmsim hides its own locks and declares only the orderings CUDA defines (__syncthreads,
# __syncwarp, one block's end before the next's start; see fmsim.cpp), so a report is a pair of
# accesses by CUDA threads of one block that no barrier orders (a racecheck), whatever warp
# collectives ran in between; test_simulator.py proves one is seen.
#
# Not covered: the inline PTX itself (fmsim models it; `scripts/gpu_check.sh sanitize` runs
# compute-sanitizer on every kernel) and NCCL itself (ncclsim models it). TSan on
# tests/data/test_prepare.py and the trainer tests is impractical here: training the BPE tokenizer
# (tests' `fmcore prepare` fixtures) under TSan's interceptors took more than 10 minutes without
# finishing.
#
# Time on the 2-core dev machine, shared with other jobs (2026-11-23): a first build ~5-10 min per
# mode (incremental after that: ~1 min for a touched op file); asan tests (638) 1 min 45 s on a
# quiet machine, up to ~8 min while other jobs ran; tsan tests (119) ~30 s. sim-asan: build and 88
# tests ~5.5 min; sim-tsan: ~11 min (hundreds of OS threads a block under TSan's runtime).
#
# Notes on the runtimes:
# - ASAN_OPTIONS=detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# - UBSan runs with every check GCC has, vptr included (no false positive from torch's types seen).
# - TSan: scripts/tsan.supp lists what is suppressed and why (frames in glibc and third-party
#   libraries only, never fmcore's). The op tests are not in its default set: at::parallel_for in
#   csrc/ops runs on libgomp (fmcore is built with -fopenmp, see CMakeLists.txt), which is not
#   instrumented, so TSan misses its barriers and reports false races in parallel_for bodies and in
#   torch's own OpenMP regions (seen in torch's cpu_flash_attention, the reference in
#   tests/ops/test_attention.py).
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
    default_tests=(tests/data tests/ops tests/optim -k "not cuda")
    ;;
  tsan)
    flags="-fsanitize=thread"
    runtime=$(g++ -print-file-name=libtsan.so)
    default_tests=(tests/data/test_loader.py tests/data/test_shards.py)
    ;;
  sim-asan|sim-tsan)
    if [ "$mode" = sim-asan ]; then
      export FMCORE_SIM_SANITIZE=address,undefined
      runtime=$(g++ -print-file-name=libasan.so)
    else
      export FMCORE_SIM_SANITIZE=thread
      runtime=$(g++ -print-file-name=libtsan.so)
    fi
    default_tests=(tests/cudasim)
    ;;
  *) echo "usage: $0 asan|tsan|sim-asan|sim-tsan [pytest args...]" >&2; exit 2 ;;
esac

# The flags are fixed at configure time: after changing them, delete build/<mode>. Two runs of the
# same mode at once would share (and rebuild under each other) build/<mode>/python.
mkdir -p "$build"
start=$(date +%s)
if [[ $mode == sim-* ]]; then
  pkg=$repo/python  # the simulator library is built (instrumented) by the tests' fixture
elif [ ! -f "$build/build.ninja" ]; then
  cmake -S . -B "$build" -G Ninja -DPython_EXECUTABLE="$python" -DFMCORE_CUDA=off \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS="$flags -O1 -g" \
    -DCMAKE_MODULE_LINKER_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" \
    > "$build/configure.log" || { cat "$build/configure.log"; exit 1; }
fi
if [[ $mode != sim-* ]]; then
  cmake --build "$build" -j "${JOBS:-2}"
  echo "build: $(( $(date +%s) - start )) s"

  # A package tree that imports the sanitized _C: symlinks to every Python file of python/fmcore.
  pkg=$build/python
  rm -rf "$pkg"
  mkdir -p "$pkg"
  cp -rs "$repo/python/fmcore" "$pkg/fmcore"
  find "$pkg/fmcore" -name '_C*.so' -delete
  cp "$build"/_C*.so "$pkg/fmcore/"
fi

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
