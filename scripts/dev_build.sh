#!/usr/bin/env bash
# Incremental developer build: compiles fmcore._C into build/dev (build/dev-off, build/dev-on with
# FMCORE_CUDA set) and copies it into python/fmcore/, so `PYTHONPATH=python python -m pytest tests`
# runs against this tree without installing anything.
#   FMCORE_CUDA=off scripts/dev_build.sh     # CPU-only, faster on the 2-core machines
#   JOBS=16 scripts/dev_build.sh             # on the GPU machine
#   PYTHON=/path/venv/bin/python BUILD_DIR=build/other scripts/dev_build.sh   # another torch/Python
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python)}
# The venv's own cmake/ninja first: the system cmake (3.25) does not know nvcc 13's C++20 flags.
export PATH="$(dirname "$python"):$PATH"
build=${BUILD_DIR:-build/dev${FMCORE_CUDA:+-$FMCORE_CUDA}}
mkdir -p "$build"
if [ ! -f "$build/build.ninja" ]; then
  cmake -S . -B "$build" -G Ninja -DPython_EXECUTABLE="$python" -DCMAKE_BUILD_TYPE=Release \
    ${FMCORE_CUDA:+-DFMCORE_CUDA=$FMCORE_CUDA} > "$build/configure.log" || { cat "$build/configure.log"; exit 1; }
fi
cmake --build "$build" -j "${JOBS:-2}"
# Copied beside, then renamed over: a process running the tests keeps the file it mapped (cp onto
# it rewrote those pages in place, and crashed it).
for so in "$build"/_C*.so; do
  cp "$so" "python/fmcore/.$(basename "$so").tmp"
  mv -f "python/fmcore/.$(basename "$so").tmp" "python/fmcore/$(basename "$so")"
done
echo "dev build: $(ls python/fmcore/_C*.so)"
