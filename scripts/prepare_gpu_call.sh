#!/usr/bin/env bash
# Prepares, on a dev machine, what a GPU call carries (scripts/gpu_check.sh's header): the extension
# built for the GPU machine's Python 3.12 and torch 2.11.0+cu130, and the peers' wheels in .whl/ (the
# GPU machine has no network). Both are untracked, so a new checkout runs this once (~5 min, most of
# it the first venv's torch download); afterwards it rebuilds incrementally.
#   scripts/prepare_gpu_call.sh        # VENV312=/path to put the venv elsewhere (default /work/venv312)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV312:-/work/venv312}
torch_version=2.11.0+cu130  # what the GPU machine's image holds (the device tool's KINDS.md)

if [ ! -x "$venv/bin/python" ]; then
  py=""
  for cand in python3.12 /root/.pyenv/versions/3.12.*/bin/python3.12; do
    if "$cand" -c "" 2>/dev/null; then py=$cand; break; fi  # pyenv's shim exists even when it cannot run
  done
  [ -n "$py" ] || { echo "no Python 3.12 found"; exit 1; }
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==${torch_version%+*}" cmake ninja pybind11 numpy
fi
got=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
[ "$got" = "$torch_version" ] || { echo "$venv has torch $got, the GPU machine $torch_version"; exit 1; }

FMCORE_CUDA=on PYTHON="$venv/bin/python" BUILD_DIR=build/py312-t211 scripts/dev_build.sh

grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
"$venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl liger_kernel==0.8.5 cut_cross_entropy==25.1.1
echo "carry: python/fmcore/_C.cpython-312-x86_64-linux-gnu.so .whl ($(ls .whl | tr '\n' ' '))"
