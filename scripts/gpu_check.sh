#!/usr/bin/env bash
# GPU checks in stages, each capped in seconds (STAGE:SECONDS overrides a stage's cap). The device
# tool allows 10 minutes a command and 15 minutes of device time a session, start included, so one
# call runs the stages that matter most first; a stage never outlives the call (DEADLINE, default
# 570 s from the start), and what a stage measured comes back in $OUT even when its time runs out.
#
#   scripts/gpu_check.sh test             # fmcore info + pytest -m "cuda and not bigmem" (8 xdist workers)
#   scripts/gpu_check.sh test-tiles       # attention's tile configurations against the reference (the
#                                         # wgmma ones, 3 to 6, had never run on hardware before); the
#                                         # later stages time and test-run only those that passed
#   scripts/gpu_check.sh test-bigmem      # the tests that need tens of GB, alone
#   scripts/gpu_check.sh sanitize         # compute-sanitizer memcheck, racecheck, synccheck: every kernel
#   scripts/gpu_check.sh train            # README command 1 on the GPU + the 300-step GPT-2 124M ops A/B
#   scripts/gpu_check.sh bench-ops        # the ops with a bar (rope, cross_entropy, linear_cross_entropy, adamw)
#   scripts/gpu_check.sh bench-NAME       # one benchmark: bench-attention, bench-attention_masked (sliding
#                                         # window, packed documents), bench-loader, bench-train, bench-norm...
#   scripts/gpu_check.sh profile          # kernel-by-kernel time of each op (scripts/profile_kernels.py)
#   scripts/gpu_check.sh all              # every stage in order (no 10-minute limit; ~25 min)
#
# One 15-minute lease, most important first. The first lease (H200, 2026-12-04) spent 550 s on a
# 520 s command (the machine's start is the rest), then 250 s on a second; it measured the loader
# (bar met), AdamW (met), the training A/B (within 1%) and norm, which need no rerun until their code
# changes. What the next lease needs, in the order of what it decides (the tests close issues 4 and 8
# if they pass; the wgmma attention is the one change that can move issue 5), the second call only
# if the machine is still warm:
#   DEADLINE=575 scripts/gpu_check.sh test-tiles:40 test:170 bench-attention:130 bench-rope:25 bench-cross_entropy:30 bench-linear_cross_entropy:60 profile:40 bench-train:80
#   DEADLINE=240 scripts/gpu_check.sh test-bigmem:70 sanitize:110 bench-gelu:30 bench-swiglu:25
# bench-attention_masked (sliding window, packed documents) has not run on a GPU yet: give it ~180 s in a
# later call; two FlexAttention compiles (forward and backward, one per group of shapes) are most of it.
# bench-attention's tiles rows decide the sm_90 defaults, forward and backward apart (Tiles<D, 0>'s four
# wgmma fields in csrc/kernels/attention.cu take the winners' values, per head dim): 3 and 5 differ in
# the forward only (5 overlaps the softmax with the P V), 3 and 4 in both (4's backward is one
# warpgroup a CTA, two CTAs an SM; its forward 64 keys a step, two CTAs an SM), 6 is 5's forward on
# one-warpgroup CTAs (two an SM) with 4's backward. test-tiles runs the wgmma probe first
# (tests/ops/test_wgmma_probe.py): if a wgmma configuration fails, a failing probe form names the
# layout at fault (ss: K-major descriptors or the swizzle; ss_mn: the dq path; rs: P V, dV, dK), and
# all forms passing points at synchronisation instead. Predictions to check in those rows (design notes,
# "issue budget"): the wgmma kernels issue ~25-30% fewer instructions a step since the sixteenth
# session; the D = 64 ones (GPT-2's heads) were issue-bound and should gain most.
# bench-linear_cross_entropy's fmcore-chunk384 row against fmcore (448 rows) at V128256, and the
# profile's two V128256 cases (the cuBLAS tiles each chunk size gets), decide default_chunk_rows'
# rounding in csrc/ops/linear_cross_entropy.cpp: multiples of 64 now, of 192 if 384 wins.
#
# Each bench stage writes $OUT/results-<stage>.json, rewritten after every row: merge a session's files
# with `python scripts/merge_results.py benchmarks/results/<gpu>-<date>.json results-*.json`, commit,
# and run `python scripts/render_readme.py`.
#
# The extension: build it HERE, not on the device, and carry it with the peers that are not installed
# there (liger-kernel, cut-cross-entropy, as wheels in .whl/); scripts/prepare_gpu_call.sh makes both:
#   scripts/prepare_gpu_call.sh
#   run(command="FMCORE_COMMIT=<hash> DEADLINE=578 scripts/gpu_check.sh test:140 ...", carry=[...so, ".whl"])
# FMCORE_COMMIT: `git rev-parse --short HEAD` here (the device gets the tree without .git), so the
# results' header says which code produced them (fmcore.bench.report.git_commit).
# Without a carried extension that imports, the first stage builds one with 16 jobs (a few minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
OUT=${OUT:-/tmp/fmcore-gpu-check}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${DEADLINE:-570} ))
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo/python"
status=0

left() { echo $(( deadline - $(date +%s) )); }
# bounded SECONDS CMD...: run CMD with at most SECONDS (and never past the deadline); 124 on timeout.
# SIGINT first: pytest then still prints its summary of failures, Python scripts stop at a row boundary.
bounded() {
  local want=$1; shift
  local t; t=$(left); (( want < t )) && t=$want
  (( t > 5 )) || { echo "skipped (out of time): $*"; return 124; }
  timeout --signal=INT --kill-after=10 "$t" "$@"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "import fmcore._C" 2>/dev/null; then
  echo "no importable carried extension: building with 16 jobs"
  start=$(date +%s)
  FMCORE_CUDA=on JOBS=16 PYTHON=$(command -v python3) BUILD_DIR=build/device bounded 400 scripts/dev_build.sh \
    > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi
python3 -m fmcore info > "$OUT/info.log" 2>&1 || status=1
head -n 20 "$OUT/info.log"
cd "$OUT"

tiles_tested=  # set by the test-tiles stage: the test stage then skips the tests it ran

stage_test() {  # stage_test SECONDS
  # 8 workers share the GPU; a test that leaves a sticky CUDA error ends its worker (tests/conftest.py)
  # and xdist starts a fresh one, so one bad kernel cannot fail every later test.
  local workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
  local skip=(); [ -n "$tiles_tested" ] && skip=(-k "not tile_configs_match_reference_cuda and not wgmma_probe")
  # The files in the order of what they close, should the cap cut the run: the optimizer (issue 4) and
  # the NCCL tests (8) first, then rope (2) and the losses (3), attention (5; its tile tests ran in
  # test-tiles) last. pytest keeps the order of paths that do not overlap.
  local files
  files=$(cd "$repo" && find tests -name 'test_*.py' | sort | while read -r f; do
    case $f in
      tests/optim/*) r=0 ;; tests/distributed/*) r=1 ;; tests/ops/test_rope.py) r=2 ;;
      tests/ops/*cross_entropy*) r=3 ;; tests/ops/test_attention*|tests/ops/test_wgmma_probe.py) r=9 ;; *) r=5 ;;
    esac
    echo "$r $repo/$f"
  done | sort -s -n -k1,1 | cut -d' ' -f2-)
  # -v: one line per test as it ends, so a log cut by the cap still names every failure so far.
  # shellcheck disable=SC2086  # $files: one path per word
  bounded "$1" python3 -m pytest $files -m "cuda and not bigmem" -v "${workers[@]}" "${skip[@]}" \
    -p no:cacheprovider -p no:benchmark --timeout 120 -rfE --durations=15 > pytest-cuda.log 2>&1 || status=1
  grep -E "(FAILED|ERROR) |passed|failed|skipped" pytest-cuda.log | grep -v " PASSED " | tail -n 60
}

stage_test_tiles() {  # stage_test_tiles SECONDS
  # 72 tests (6 configurations x 3 head dims x causal x dq path), 4 xdist workers on the one GPU,
  # and first the wgmma probe (13 tests, seconds): where a wgmma configuration fails, whether
  # attention's wgmma layouts are the cause, and which form (test_wgmma_probe.py).
  local workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 4)
  bounded "$1" python3 -m pytest "$repo/tests/ops/test_wgmma_probe.py" "$repo/tests/ops/test_attention.py" -m cuda \
    -k "tile_configs_match_reference_cuda or wgmma_probe" -v \
    "${workers[@]}" -p no:cacheprovider -p no:benchmark --timeout 60 -rfE > pytest-tiles.log 2>&1 || status=1
  grep -E "(FAILED|ERROR) |passed|failed|skipped" pytest-tiles.log | grep -v " PASSED " | tail -n 30
  tiles_tested=1
  # The benchmarks time only the configurations with no failure here (test ids start [TILES-...]): a
  # kernel that computes garbage is no candidate, and one that crashes would cost the stage its rows.
  local bad t ok=()
  bad=$(grep -oE "^(FAILED|ERROR) [^ ]*tile_configs_match_reference_cuda\[[0-9]+" pytest-tiles.log | grep -oE "[0-9]+$" | sort -u)
  for t in $(python3 -c "from fmcore._C import attention_tile_configs as n; print(*range(1, n))"); do
    grep -qx "$t" <<< "$bad" || ok+=("$t")
  done
  export FMCORE_BENCH_TILES=$(IFS=,; echo "${ok[*]}")
  echo "benchmarks time tiles: ${FMCORE_BENCH_TILES:-none}"
}

stage_test_bigmem() {  # stage_test_bigmem SECONDS: tens of GB each, so one at a time
  bounded "$1" python3 -m pytest "$repo/tests" -m "cuda and bigmem" -q -p no:cacheprovider --timeout 100 -rfE \
    > pytest-bigmem.log 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed|skipped" pytest-bigmem.log | tail -n 20
}

sanitize_one() {  # sanitize_one SECONDS TOOL LOG [OP...]: one compute-sanitizer run of sanitize_ops.py
  local seconds=$1 tool=$2 log=$3; shift 3
  bounded "$seconds" compute-sanitizer --tool "$tool" --error-exitcode 9 python3 "$repo/scripts/sanitize_ops.py" "$@" \
    > "$log" 2>&1
  case $? in
    0) echo "compute-sanitizer $tool ${*:-all ops}: clean" ;;
    124) echo "compute-sanitizer $tool ${*:-all ops}: TIMEOUT after ${seconds} s ($log)"; status=1 ;;
    *) echo "compute-sanitizer $tool ${*:-all ops}: ERRORS ($log)"; tail -n 15 "$log"; status=1 ;;
  esac
}

stage_sanitize() {  # stage_sanitize SECONDS: a quarter each for memcheck and synccheck over every op,
  # half for racecheck (the slowest tool), one op at a time so a timeout still clears the others.
  sanitize_one $(( $1 / 4 )) memcheck sanitizer-memcheck.log
  sanitize_one $(( $1 / 4 )) synccheck sanitizer-synccheck.log
  local op start=$(date +%s) budget=$(( $1 / 2 ))
  for op in rope cross_entropy adamw add_norm activation attention; do
    sanitize_one $(( budget - ($(date +%s) - start) )) racecheck "sanitizer-racecheck-$op.log" "$op"
  done
}

stage_train() {  # stage_train SECONDS: a fifth for the default job, two fifths for each A/B run
  bounded $(( $1 / 5 )) python3 -m fmcore train --log.run_dir "$OUT/train-tiny" --log.progress plain > train-default.log 2>&1 || status=1
  tail -n 8 train-default.log
  local ops
  for ops in fmcore torch; do
    bounded $(( $1 * 2 / 5 )) python3 -m fmcore train gpt2-124m --model.ops $ops --train.steps 300 --train.tokens_per_step 0 \
      --schedule.warmup_steps 30 --train.eval_every 0 --log.every 10 --log.progress plain --checkpoint.every 0 \
      --checkpoint.save_final false --checkpoint.export_hf false --log.run_dir "$OUT/ab-$ops" > "ab-$ops.log" 2>&1 || status=1
  done
  python3 -m fmcore.train.compare "$OUT/ab-torch" "$OUT/ab-fmcore" --plot "$OUT/ab.png" > ab.txt 2>&1 || status=1
  cat ab.txt
  tar czf train-runs.tgz --exclude='*/checkpoints' --exclude='*/hf' train-tiny ab-* 2>/dev/null && rm -rf train-tiny ab-fmcore ab-torch
}

bench() {  # bench STAGE SECONDS NAME...: one group of benchmarks, its JSON and plots, the table last
  local stage=$1 seconds=$2; shift 2
  bounded "$seconds" python3 -m fmcore.bench "$@" --json "results-$stage.json" --plot "plots-$stage" > "$stage.log" 2>&1 || status=1
  tar czf "plots-$stage.tgz" "plots-$stage" 2>/dev/null && rm -rf "plots-$stage"
  sed -n '/^# roofline/p;/^### /,$p' "$stage.log"
  grep -E "Error|Traceback" "$stage.log" | head -n 5
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && { echo "usage: scripts/gpu_check.sh STAGE[:SECONDS]... (test test-bigmem sanitize train bench-ops bench-NAME profile all)"; exit 2; }
[ "${stages[*]}" = all ] && stages=(test-tiles test test-bigmem sanitize train bench-ops bench-attention bench-attention_masked profile bench-loader bench-train bench-norm bench-gelu bench-swiglu) \
  && deadline=$(( $(date +%s) + 3600 ))
for spec in "${stages[@]}"; do
  stage=${spec%%:*}; cap=${spec#*:}; [ "$cap" = "$spec" ] && cap=
  echo; echo "==== $stage ($(left) s left) ===="
  case $stage in
    test) stage_test "${cap:-300}" ;;
    test-bigmem) stage_test_bigmem "${cap:-120}" ;;
    test-tiles) stage_test_tiles "${cap:-60}" ;;
    sanitize) stage_sanitize "${cap:-450}" ;;
    train) stage_train "${cap:-400}" ;;
    bench-ops) bench bench-ops "${cap:-400}" rope cross_entropy linear_cross_entropy adamw ;;
    profile) bounded "${cap:-60}" python3 "$repo/scripts/profile_kernels.py" --json kernels.json > profile.log 2>&1 \
               || status=1; grep -v "^USDT" profile.log | tail -n 70 ;;
    bench-*) bench "$stage" "${cap:-400}" "${stage#bench-}" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
# The short table last: each issue's bar against this call's results.
if ls results-*.json >/dev/null 2>&1; then
  echo; python3 "$repo/scripts/check_bars.py" results-*.json || status=1
fi
# The device tool returns at most 8 files: past that, everything but the results and the A/B summary
# travels in one archive.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  find . -maxdepth 1 -type f ! -name 'results-*.json' ! -name kernels.json ! -name ab.txt ! -name pytest-cuda.log ! -name bundle.tgz -printf '%P\n' \
    | tar czf bundle.tgz -T - --remove-files
fi
exit $status
