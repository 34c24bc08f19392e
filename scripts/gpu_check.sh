#!/usr/bin/env bash
# The one call to make on the GPU machine (~25 min on an H100; SKIP_AB=1 saves ~8):
#   1. build with 16 jobs (FMCORE_CUDA=on), install, `fmcore info`
#   2. the CUDA tests (pytest -m cuda)
#   3. every kernel under compute-sanitizer memcheck, racecheck, synccheck (scripts/sanitize_ops.py)
#   4. README command 1 (`fmcore train`) on the GPU
#   5. the ops A/B quality check: 300 steps of GPT-2 124M, model.ops fmcore vs torch, curves compared
#   6. every benchmark against every importable peer; the table prints last
# What comes back in $OUT (the device tool returns at most 8 files): results.json (commit it as
# benchmarks/results/<gpu>-<date>.json, then run scripts/render_readme.py), ab.txt, and
# artifacts.tgz (logs, plots, the A/B curves).
# Peers that are not installed on the machine (liger-kernel, cut-cross-entropy) travel as wheels in
# .whl/, named in the device tool's carry.
#   BENCH="rope adamw" scripts/gpu_check.sh    # only these benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
OUT=${OUT:-/tmp/fmcore-gpu-check}
work="$OUT/work"
mkdir -p "$work"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16 FMCORE_CUDA=on
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps --no-index -q . > "$work/build.log" 2>&1 \
  || { tail -50 "$work/build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
cd "$work"  # from here on, import the installed package, not the source tree
python3 -m fmcore info | tee info.log

python3 -m pytest "$repo/tests" -m cuda -q -p no:cacheprovider > pytest-cuda.log 2>&1 || status=1
tail -n 30 pytest-cuda.log

for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 python3 "$repo/scripts/sanitize_ops.py" > "sanitizer-$tool.log" 2>&1 \
    && echo "compute-sanitizer $tool: clean" \
    || { echo "compute-sanitizer $tool: ERRORS (see sanitizer-$tool.log)"; tail -n 20 "sanitizer-$tool.log"; status=1; }
done

python3 -m fmcore train --log.run_dir "$work/tiny" --log.progress plain > train-default.log 2>&1 || status=1
tail -n 12 train-default.log

if [ -z "${SKIP_AB:-}" ]; then
  for ops in fmcore torch; do
    python3 -m fmcore train gpt2-124m --model.ops $ops --train.steps 300 --train.tokens_per_step 0 \
      --schedule.warmup_steps 30 --train.eval_every 0 --log.every 10 --log.progress plain --checkpoint.every 0 \
      --checkpoint.save_final false --checkpoint.export_hf false --log.run_dir "$work/ab-$ops" > "ab-$ops.log" 2>&1 || status=1
  done
  python3 -m fmcore.train.compare "$work/ab-torch" "$work/ab-fmcore" --plot "$work/ab.png" > "$OUT/ab.txt" 2>&1 || status=1
  cat "$OUT/ab.txt"
fi

python3 -m fmcore.bench ${BENCH:-} --json "$OUT/results.json" --plot "$work/plots" > bench.log 2>&1 || status=1
cd "$OUT" && tar czf artifacts.tgz --exclude='*/checkpoints' --exclude='*/hf' work && rm -rf work
echo; echo "==== benchmark table ===="
tar xzf artifacts.tgz -O work/bench.log | sed -n '/^# roofline/p;/^### /,$p'
exit $status
