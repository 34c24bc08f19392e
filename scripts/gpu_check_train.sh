#!/usr/bin/env bash
# One call on the GPU machine for the trainer: build, the train tests (CUDA cases included), README
# command 1 (`fmcore train`) on the GPU, the ops A/B quality check (300 steps of GPT-2 124M, same data
# and seed, model.ops fmcore vs torch, curves compared), then the `train` benchmark; table last.
#   scripts/gpu_check_train.sh                 # everything (~8 min on an H100)
#   SKIP_BUILD=1 SKIP_AB=1 scripts/gpu_check_train.sh
# Results under $OUT: tiny/ (run dir), ab-fmcore/ ab-torch/ ab.png ab.txt, train.json, plots/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fmcore-gpu-check-train}
mkdir -p "$OUT"
export PYTHONPATH=python PYTHONUNBUFFERED=1
status=0
[ -n "${SKIP_BUILD:-}" ] || JOBS=${JOBS:-16} FMCORE_CUDA=on scripts/dev_build.sh > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
python -m pytest tests/train -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest-train.log" | tail -n 5 || status=1

# README command 1 on the GPU (its own run dir so reruns do not pile up).
python -m fmcore train --log.run_dir "$OUT/tiny" --log.progress plain 2>&1 | tail -n 22 || status=1

if [ -z "${SKIP_AB:-}" ]; then
  for ops in fmcore torch; do
    rm -rf "$OUT/ab-$ops"
    python -m fmcore train gpt2-124m --model.ops $ops --train.steps 300 --train.tokens_per_step 0 \
      --schedule.warmup_steps 30 --train.eval_every 0 --log.every 10 --log.progress plain --checkpoint.every 0 \
      --checkpoint.save_final false --checkpoint.export_hf false --log.run_dir "$OUT/ab-$ops" 2>&1 \
      | grep -E "^fmcore train|step (1|100|200|300)/|median|peak_mem" || status=1
  done
  python -m fmcore.train.compare "$OUT/ab-torch" "$OUT/ab-fmcore" --plot "$OUT/ab.png" | tee "$OUT/ab.txt" || status=1
fi

python -m fmcore.bench train --json "$OUT/train.json" --plot "$OUT/plots" > "$OUT/bench.log" 2>&1 || status=1
echo; echo "==== train benchmark ===="
grep -E "^# train" "$OUT/bench.log"
sed -n '/^### /,$p' "$OUT/bench.log"
exit $status
