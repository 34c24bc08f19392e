#!/usr/bin/env bash
# The one call to make on the GPU machine: build with 16 jobs, run the CUDA tests, run every new
# kernel under compute-sanitizer (memcheck, racecheck, synccheck), run the benchmarks against every importable
# peer, and print a short table last. Results land in $OUT (the device tool brings them back):
#   $OUT/results.json  -> commit as benchmarks/results/<gpu>-<date>.json (scripts/render_readme.py)
#   $OUT/*.log, $OUT/plots/*.png
# Peers that are not on the machine travel as wheels in .whl/ (see README "Benchmarks").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fmcore-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16 FMCORE_CUDA=on
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps --no-index -q . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
cd /tmp  # import the installed package, not the source tree
python3 -m fmcore info | tee "$OUT/info.log"

python3 -m pytest "$OLDPWD/tests" -m cuda -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest-cuda.log" | tail -25 || status=1
for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python3 "$OLDPWD/scripts/sanitize_ops.py" \
    > "$OUT/sanitizer-$tool.log" 2>&1 && echo "compute-sanitizer $tool: clean" \
    || { echo "compute-sanitizer $tool: ERRORS (see sanitizer-$tool.log)"; tail -20 "$OUT/sanitizer-$tool.log"; status=1; }
done

python3 -m fmcore.bench ${BENCH:-} --json "$OUT/results.json" --plot "$OUT/plots" > "$OUT/bench.log" 2>&1 || status=1
echo; echo "==== benchmark table ===="
sed -n '/^### /,$p' "$OUT/bench.log"
exit $status
