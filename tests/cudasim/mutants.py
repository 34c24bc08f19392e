"""Mutation check of the attention kernels' CPU tests: plants one known bug at a time in a copy of
the tree and runs tests/cudasim/test_attention_on_cpu.py on fmsim, which must fail for each. A
mutant that passes means the tests (or the simulator) cannot see that kind of bug.

By hand, not in CI (each mutant rebuilds the attention kernels; about 3 minutes in all on 2 cores
after a first build of ~4):
    python tests/cudasim/mutants.py [NAME ...]
The copy lives in build/mutants/tree (refreshed from the working tree, uncommitted changes
included) so that its simulator build stays incremental between runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "build" / "mutants"
KERNEL = "csrc/kernels/attention.cu"

# name: (text in attention.cu, its replacement). Each replaces the first occurrence only.
MUTANTS = {
    # the forward's first K/V stage read while its cp.async may still be in flight
    "fwd_missing_wait": ("      cp_async_wait<1>();\n", "      cp_async_wait<2>();\n"),
    # the forward forgets to rescale the output accumulator when the running max grows
    "fwd_no_rescale": ("        o[mw][dt][2 * hh] *= alpha;\n", ""),
    # dk/dv: the causal mask lets each query see one key past the diagonal
    "dkdv_mask_off_by_one": ("j > i0 + c + diag)", "j > i0 + c + diag + 1)"),
    # atomic dq: dS^T read from shared memory before every warp has written it
    "no_barrier_before_atomic_dq": ("    __syncthreads();\n    if constexpr (kAtomicDq) {",
                                    "    if constexpr (kAtomicDq) {"),
    # atomic dq: the transposed A fragment read with the non-transposed lane offsets
    "gemm_tb_wrong_lane_offsets": ("sAt + kk * 16 * kPitchA + b_off<kPitchA>(lane)",
                                   "sAt + kk * 16 * kPitchA + a_off<kPitchA>(lane)"),
    # atomic dq: each lane's float2 pair one column off (misaligned: the H100's vector atomic faults)
    "atomic_dq_pair_misaligned": ("h) + c0 + 2 * tq;", "h) + c0 + 2 * tq + 1;"),
    # the convert pass leaves the last 8 elements of dq unwritten
    "dq_convert_skips_tail": ("if (i >= rows * p.heads_q * chunks) return;",
                              "if (i + 8 >= rows * p.heads_q * chunks) return;"),
    # deterministic dq: delta of the wrong row half
    "dq_delta_wrong_row": ("row_delta[mw][r / 2]", "row_delta[mw][r % 2]"),
}


def refresh_tree(tree: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    files += [str(p.relative_to(REPO)) for p in (REPO / "python" / "fmcore").glob("_C*.so")]
    for rel in filter(None, files):
        src, dst = REPO / rel, tree / rel
        if not src.is_file():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copy2(src, dst)


def main(names: list[str]) -> int:
    unknown = set(names) - set(MUTANTS)
    if unknown:
        print(f"unknown mutants {sorted(unknown)}; known: {sorted(MUTANTS)}", file=sys.stderr)
        return 2
    tree = WORK / "tree"
    refresh_tree(tree)
    kernel = tree / KERNEL
    original = kernel.read_text()
    env = dict(os.environ, PYTHONPATH=str(tree / "python"), FMCORE_SIM_BUILD_DIR=str(WORK / "cudasim"))
    missed = []
    try:
        for name in names or MUTANTS:
            old, new = MUTANTS[name]
            if old not in original:
                print(f"{name}: its text is no longer in {KERNEL}; update the mutant", flush=True)
                missed.append(name)
                continue
            kernel.write_text(original.replace(old, new, 1))
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "tests/cudasim/test_attention_on_cpu.py", "-x", "-q",
                 "-p", "no:cacheprovider"], cwd=tree, env=env, capture_output=True, text=True)
            summary = [ln for ln in run.stdout.splitlines() if ln.startswith("E ")][:1]
            summary += run.stdout.strip().splitlines()[-1:]
            caught = run.returncode == 1  # tests failed (not an error of the run itself)
            print(f"{name}: {'caught' if caught else 'MISSED'}: {' | '.join(summary)}", flush=True)
            if not caught:
                missed.append(name)
    finally:
        kernel.write_text(original)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
