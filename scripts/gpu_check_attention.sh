#!/usr/bin/env bash
# One call on the GPU machine for the attention op: build, CUDA tests, compute-sanitizer memcheck and
# racecheck on small calls that reach every kernel path (tails, causal Sq != Sk, rows without keys,
# GQA, varlen with empty documents, every head dim), then the benchmark; the table prints last.
#   scripts/gpu_check_attention.sh            # everything
#   SKIP_BUILD=1 scripts/gpu_check_attention.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=python
[ -n "${SKIP_BUILD:-}" ] || JOBS=${JOBS:-16} FMCORE_CUDA=on scripts/dev_build.sh
python -m pytest tests/ops/test_attention.py -q -x -p no:cacheprovider 2>&1 | tail -n 5

cat > /tmp/fmcore_attn_sanitize.py <<'PY'
import torch
from fmcore.ops import flash_attention, flash_attention_varlen
torch.manual_seed(0)
for D in (64, 96, 128):
    for dt in (torch.bfloat16, torch.float16):
        for (B, Sq, Sk, Hq, Hk, causal) in [(2, 77, 77, 4, 2, True), (1, 130, 45, 3, 1, True), (1, 17, 200, 2, 2, True),
                                            (1, 65, 129, 2, 1, False), (1, 1, 1, 1, 1, False)]:
            q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dt, requires_grad=True)
            k = torch.randn(B, Sk, Hk, D, device="cuda", dtype=dt, requires_grad=True)
            v = torch.randn(B, Sk, Hk, D, device="cuda", dtype=dt, requires_grad=True)
            out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
            (out.float().sum() + lse[torch.isfinite(lse)].sum()).backward()
lens_q, lens_k = [1, 0, 70, 3, 130], [5, 2, 0, 3, 64]
cq = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
ck = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
q = torch.randn(sum(lens_q), 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(sum(lens_k), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(sum(lens_k), 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
flash_attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True).float().sum().backward()
torch.cuda.synchronize()
print("sanitize driver: ok")
PY
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 python /tmp/fmcore_attn_sanitize.py 2>&1 | tail -n 4
done
python -m fmcore.bench attention --json runs/bench_attention.json
