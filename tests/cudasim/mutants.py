"""Mutation check of the CPU tests of code that only a GPU runs: plants one known bug at a time in a
copy of the tree and runs the tests that must catch it on the simulators: the attention kernels
(tests/cudasim/test_attention_on_cpu.py on fmsim), the cross-entropy, RoPE, bias-GELU and SwiGLU kernels
(tests/cudasim/test_kernels_on_cpu.py on fmsim) and the NCCL communicator
(tests/cudasim/test_nccl_on_cpu.py on ncclsim). A mutant that passes means the tests (or the
simulator) cannot see that kind of bug.

By hand, not in CI (each attention mutant rebuilds the attention kernels: about 3 minutes for them
all on 2 cores after a first build of ~4; each communicator mutant ~30 s):
    python tests/cudasim/mutants.py [NAME ...]
The copy lives in build/mutants/tree (refreshed from the working tree, uncommitted changes
included) so that its simulator builds stay incremental between runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "build" / "mutants"
# (files, glob: the mutant goes into the first that holds its text; the tests that must catch it)
ATTENTION = ("csrc/kernels/attention*.cu*", "tests/cudasim/test_attention_on_cpu.py")
COMMUNICATOR = ("csrc/dist/communicator.cpp", "tests/cudasim/test_nccl_on_cpu.py")
CROSS_ENTROPY = ("csrc/kernels/cross_entropy.cu", "tests/cudasim/test_kernels_on_cpu.py")
ROPE = ("csrc/kernels/rope.cu", "tests/cudasim/test_kernels_on_cpu.py")
ACTIVATION = ("csrc/kernels/activation.cu", "tests/cudasim/test_kernels_on_cpu.py")

# name: (text in attention.cu or one of its parts, its replacement). Each replaces the first occurrence only.
ATTENTION_MUTANTS = {
    # the forward's first K/V stage read while its cp.async may still be in flight
    "fwd_missing_wait": ("      cp_async_wait<1>();\n", "      cp_async_wait<2>();\n"),
    # the forward forgets to rescale the output accumulator when the running max grows
    "fwd_no_rescale": ("o[mw][dt][e] *= alpha[mw][e / 2];", "(void)alpha;"),
    # the forward leaves Q as it is for a negative scale: its running max over raw scores is then the min
    "fwd_negative_scale_unflipped": ("  if (p.scale < 0.f) {  // flip", "  if (false) {  // flip"),
    # the forward's lazy rescale: a row's offset follows its max even when o is not rescaled
    "lazy_rescale_offset_moves_alone": ("m_run[mw][hh] = keep ? m_run[mw][hh] : mx[mw][hh];",
                                        "m_run[mw][hh] = mx[mw][hh];"),
    # the forward's lazy rescale never rescales: offsets stay at -inf (0), so P = 2^(s * c) unbounded
    "lazy_rescale_never": ("keep = keep && (m == -INFINITY ||", "keep = keep || (m == -INFINITY ||"),
    # the forward scales by a zero scale as it is: 0 * -inf = NaN for masked scores
    "fwd_zero_scale_unclamped": ("fmaxf(fabsf(scale), FLT_MIN)", "fabsf(scale)"),
    # dk/dv: lse left in natural-log units
    "dkdv_lse_not_log2": ("l == -INFINITY ? INFINITY : l * kLog2e;", "l == -INFINITY ? INFINITY : l;"),
    # forward and dq (mask_block): each row sees one key past its diagonal or the sequence end
    "mask_block_off_by_one": ("if (nt * 8 + 2 * tq + e >= ke) acc", "if (nt * 8 + 2 * tq + e > ke) acc"),
    # dk/dv: the causal mask lets each query see one key past the diagonal
    "dkdv_mask_off_by_one": ("lo = jr - off;", "lo = jr - off - 1;"),
    # dk/dv: the queries past the sequence end left to their lse of +inf (NaN for a key of -inf)
    "dkdv_queries_past_end_unmasked": ("q_end = q_rows < kBlockM ? static_cast<int>(q_rows) : kBlockM;",
                                       "q_end = kBlockM;"),
    # atomic dq: dS^T read from shared memory before every warp has written it
    "no_barrier_before_atomic_dq": ("    __syncthreads();\n    if constexpr (kAtomicDq) {",
                                    "    if constexpr (kAtomicDq) {"),
    # atomic dq: the transposed A fragment read with the non-transposed lane offsets
    "gemm_tb_wrong_lane_offsets": ("sAt + kk * 16 * kPitchA + b_off<kPitchA>(lane)",
                                   "sAt + kk * 16 * kPitchA + a_off<kPitchA>(lane)"),
    # atomic dq: each lane's float2 pair one column off (misaligned: the H100's vector atomic faults)
    "atomic_dq_pair_misaligned": ("h) + c0 + 2 * tq;", "h) + c0 + 2 * tq + 1;"),
    # the convert pass writes dq as if contiguous (right only when nobody passed a strided dq)
    "dq_convert_ignores_strides": ("*reinterpret_cast<uint4*>(row_ptr_mut<T>(p.dq, b, row, h) + c) = out;",
                                   "*reinterpret_cast<uint4*>(static_cast<T*>(p.dq.ptr) + i * 8) = out;"),
    # the convert pass leaves the last 8 elements of dq unwritten
    "dq_convert_skips_tail": ("if (i >= rows * p.heads_q * chunks) return;",
                              "if (i + 8 >= rows * p.heads_q * chunks) return;"),
    # deterministic dq: delta of the wrong row half
    "dq_delta_wrong_row": ("row_delta[mw][r / 2]", "row_delta[mw][r % 2]"),
    # wgmma forward: tiles copied unswizzled, read through 128-byte-swizzle descriptors
    "wgmma_tile_unswizzled": ("(c % 8 ^ row % 8) * 8", "c % 8 * 8"),
    # wgmma forward: V's second 64-column atom looked for half a tile on
    "wgmma_v_lbo_half": ("sw128_desc(sV, kBlockN * 128, 1024)", "sw128_desc(sV, kBlockN * 64, 1024)"),
    # wgmma forward: K's second 64-column atom looked for at Q's tile stride
    "wgmma_k_atom_stride": ("kk / 4 * kBlockN * 64) * 2", "kk / 4 * 128 * 64) * 2"),
    # wgmma dk/dv: dS^T stored unswizzled, read through a swizzled descriptor by the dQ wgmma
    "wgmma_ds_unswizzled": ("(mt ^ key % 8) * 8", "mt * 8"),
    # wgmma dk/dv at D = 64: both warpgroups add dS K over the first 64 keys (none over the rest)
    "wgmma_dq_keys": ("dq_k0 = kSplitCols ? 0 : 64 * wg", "dq_k0 = 0"),
    # one-warpgroup wgmma dk/dv (tiles=4) at D = 128: dQ's second 64-column pass multiplies by K's
    # first 64 columns again
    "wgmma_dq_pass_b_columns": ("desc_plus(kt_desc, pass * kBlockN * 128 + off)", "desc_plus(kt_desc, off)"),
    # one-warpgroup wgmma dk/dv at D = 128: both dQ passes added into the first 64 columns
    "wgmma_dq_pass_atomic_columns": ("dq_rows[hh] + 64 * pass + dt * 8", "dq_rows[hh] + dt * 8"),
    # wgmma dk/dv: the last query row's share of dQ never added
    "wgmma_dq_last_row_dropped": ("if (row < s.q_len) {\n        dq_rows", "if (row + 1 < s.q_len) {\n        dq_rows"),
    # wgmma tiles: a whole tile's copies step one row a pass instead of a pass's rows
    "wgmma_tile_fast_path_stride": ("++i, src += pass) {", "++i, src += stride) {"),
    # two-warpgroup wgmma kernels: every warpgroup takes itself for the first (Q rows, K/V keys)
    "wgmma_warpgroup_index_zero": ("static_cast<int>(threadIdx.x / 128), 0)", "0, 0)"),
    # wgmma forward: the K / V copies read by wgmma with no fence.proxy.async after their wait
    "wgmma_fwd_no_proxy_fence": ("      fence_proxy_async();  // this thread's copies (and Q's sign flip), visible to wgmma\n", ""),
    # wgmma dk/dv: the Q / dO copies read by wgmma with no fence.proxy.async after their wait
    "wgmma_dkdv_no_proxy_fence": ("    fence_proxy_async();  // this thread's copies, visible to wgmma\n", ""),
    # the forward's P V issued with no wgmma.fence after o's rescale and P's packing
    "wgmma_pv_no_fence": ("    fence_regs(pa);\n    wgmma_fence();\n", "    fence_regs(pa);\n"),
    # the overlapped forward packs the next P into the A registers the in-flight P V still reads
    "wgmma_overlap_p_packed_in_flight": ("      if (p.heads_k <= 0) __trap();\n      wgmma_wait<0>();\n",
                                         "      pack_p();\n      if (p.heads_k <= 0) __trap();\n      wgmma_wait<0>();\n"),
    # wgmma dk/dv: a dQ pass issued with no wgmma.fence after the last pass's atomics read dq
    "wgmma_dq_no_fence": ("before this pass writes it\n      wgmma_fence();\n", "before this pass writes it\n"),
    # wgmma dk/dv: dS^T (ordinary stores) read by the dQ wgmma with no fence.proxy.async after them
    "wgmma_ds_no_proxy_fence": ("    fence_proxy_async();  // this thread's dS^T stores, visible to wgmma\n", ""),
    # wgmma dk/dv without the dq (deterministic calls): dV and dK not waited for, so the next step's
    # loads overwrite the Q and dO they read
    "wgmma_dkdv_deterministic_not_waited": ("      wgmma_wait<0>();  // dV and dK\n", ""),
    # one-warpgroup wgmma forward (tiles=6): launched over 128-query blocks, so half the queries have no CTA
    "wgmma_fwd_grid_queries": ("blocks(p.seqlen_q, kQueries)", "blocks(p.seqlen_q, 128)"),
    # one-warpgroup wgmma dk/dv: launched over 128-key blocks, so half the keys have no CTA
    "wgmma_bwd_grid_keys": ("blocks(p.seqlen_k, kKeys)", "blocks(p.seqlen_k, 128)"),
    # wgmma dk/dv: Q's second 64-column atom (dK's B) looked for a K tile on
    "wgmma_dk_q_lbo": ("sw128_desc(sQ, kBlockM * 128, 1024)", "sw128_desc(sQ, kBlockN * 128, 1024)"),
    # wgmma forward: O += P V not waited for; the next step's loads overwrite the V it reads
    "wgmma_pv_not_waited": ("      wgmma_wait<0>();\n      fence_regs(o[0]);", "      fence_regs(o[0]);"),
    # overlapped wgmma forward (tiles=5): K two blocks on loaded over the K the next S is about to read
    "wgmma_overlap_k_stage": ("load_k(nb + 2, nb & 1);", "load_k(nb + 2, (nb + 1) & 1);"),
    # overlapped wgmma forward: the softmax reads the next S before its wgmma is waited for
    "wgmma_overlap_s_not_waited": ("      wgmma_wait<1>();  // the S", "      // the S"),
    # overlapped wgmma forward: the last key block's P V never issued
    "wgmma_overlap_last_pv_dropped": ("      issue_pv((n_blocks - 1) & 1);\n", ""),
    # sliding window: the forward and dq start a block past the first their first row's window sees
    "window_first_key_block_late": ("key_begin(window_left<kWindow>(p), m0, s.q_len",
                                    "key_begin(window_left<kWindow>(p), m0 + kBlockM, s.q_len"),
    # sliding window: a dk/dv CTA stops at the queries that see its first key (not its last)
    "window_query_walk_stops_short": ("query_end(window_left<kWindow>(p), n_end - 1,", "query_end(window_left<kWindow>(p), n_end - n_end,"),
    # sliding window (forward and dq): each row sees one key before its window
    "window_mask_begin_off_by_one": ("s.q_len - window_left<kWindow>(p) - n0;", "s.q_len - window_left<kWindow>(p) - 1 - n0;"),
    # sliding window (dk/dv): each key seen by one query past its window
    "window_dkdv_query_end_off_by_one": ("- diag + window_left<kWindow>(p) + 1;", "- diag + window_left<kWindow>(p) + 2;"),
    # sliding window (forward and dq): a block that only the window's start crosses left unmasked
    "window_start_unmasked": ("r0 + right_diag + 1) &&\n      !window_start) {", "r0 + right_diag + 1)) {"),
}

# The same for communicator.cpp.
COMMUNICATOR_MUTANTS = {
    # the watchdog thread never looks at the pending work: a stuck collective goes unnoticed
    "watchdog_never_polls": ("if (!stop_ && comm_ != nullptr) poll_locked();", ""),
    # an argument error NCCL returned aborts the communicator (it need not)
    "argument_error_aborts": ("if (!returned_now || (r != ncclInvalidArgument && r != ncclInvalidUsage))",
                              "if (true)"),
    # an error reached while polling a call in progress is taken for an argument error (no abort)
    "async_error_taken_for_argument_error": ("if (!returned_now || (r", "if ((r"),
    # a pending event that is not ready yet is taken for a failure
    "not_ready_is_an_error": ("if (e == cudaErrorNotReady) break;", ""),
    # grouped collectives are not tracked: synchronize() returns before they finish
    "group_events_dropped": ("for (cudaStream_t s : group_streams_) enqueued_locked(s, \"grouped collectives\");",
                             ""),
    # the asynchronous error state is never read
    "async_error_ignored": ("state != ncclSuccess && state != ncclInProgress)", "false)"),
}

# The same for cross_entropy.cu (the fused pass's row cache and the target check).
CROSS_ENTROPY_MUTANTS = {
    # the unrolled first pass does not store its vectors: the gradient pass reads unwritten shared memory
    "ce_cache_not_stored": ("      if (j + u * step < cached) cache[j + u * step] = v[u];\n", ""),
    # the first pass's remainder loop does not store its vectors
    "ce_cache_remainder_not_stored": ("    if (j < cached) cache[j] = v;\n", ""),
    # the gradient pass reads its unrolled vectors from the wrong cache slots
    "ce_cache_wrong_slot": ("v[u] = k < cached ? cache[k] : vin[k];", "v[u] = k < cached ? cache[j] : vin[k];"),
    # negative targets pass the check
    "ce_check_misses_negative": ("(t < 0 || t >= p.vocab)", "(t >= p.vocab)"),
}

# The same for rope.cu (one thread an item, cos/sin from global memory).
ROPE_MUTANTS = {
    # cos/sin read as 32-byte vectors whatever their alignment and row stride
    "rope_cs_vector_always": ("  if (cs_vec) {", "  if (true) {"),
    # a row with more items than the block's threads: the rest is never visited
    "rope_row_one_pass": ("idx < total; idx += blockDim.x)", "idx < total; idx += total)"),
    # k's items done on q's tensor: k never written (in bounds: Hk <= Hq). An unshifted k index was
    # the first version of this mutant: it wrote past k's end, and whether fmsim faulted or the
    # process crashed (which this script cannot count as caught) depended on the build.
    "rope_k_items_on_q": ("p.k, b, s, idx - q_total, k_items", "p.q, b, s, idx - q_total, k_items"),
}

ACTIVATION_MUTANTS = {
    # every row block writes its bias-gradient sums into partial row 0: the other rows stay unwritten
    "gelu_partials_one_row": ("p.workspace + blockIdx.y * p.dim + c", "p.workspace + c"),
    # the backward differentiates at x instead of x + bias
    "gelu_bwd_ignores_bias": ("gelu_grad(z[e] + b[e], p.tanh)", "gelu_grad(z[e], p.tanh)"),
    # each row block stops one row short of the next
    "gelu_rows_one_short": ("r0 + rows_per_block);", "r0 + rows_per_block - 1);"),
    # swiglu's backward swaps its two gradients' derivatives
    "swiglu_grads_swapped": ("u[e] = d[e] * g[e] * sg;  // grad_up", "u[e] = dg;  // grad_up"),
    # swiglu reads up from gate's rows with the wrong stride (right only for separate tensors)
    "swiglu_packed_stride": ("load_t<T, VEC>(static_cast<const T*>(p.up) + r * p.in_stride + c, u);",
                             "load_t<T, VEC>(static_cast<const T*>(p.up) + r * p.dim + c, u);"),
}

MUTANTS = {name: (ATTENTION, *m) for name, m in ATTENTION_MUTANTS.items()}
MUTANTS |= {name: (ROPE, *m) for name, m in ROPE_MUTANTS.items()}
MUTANTS |= {name: (COMMUNICATOR, *m) for name, m in COMMUNICATOR_MUTANTS.items()}
MUTANTS |= {name: (CROSS_ENTROPY, *m) for name, m in CROSS_ENTROPY_MUTANTS.items()}
MUTANTS |= {name: (ACTIVATION, *m) for name, m in ACTIVATION_MUTANTS.items()}


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
    env = dict(os.environ, PYTHONPATH=str(tree / "python"), FMCORE_SIM_BUILD_ROOT=str(WORK))
    missed = []
    for name in names or MUTANTS:
        (source, test), old, new = MUTANTS[name]
        path = next((f for f in sorted(tree.glob(source)) if old in f.read_text()), None)
        if path is None:
            print(f"{name}: its text is no longer in {source}; update the mutant", flush=True)
            missed.append(name)
            continue
        original = path.read_text()
        try:
            path.write_text(original.replace(old, new, 1))
            run = subprocess.run([sys.executable, "-m", "pytest", test, "-x", "-q", "-p", "no:cacheprovider"],
                                 cwd=tree, env=env, capture_output=True, text=True)
        finally:
            path.write_text(original)
        summary = [ln for ln in run.stdout.splitlines() if ln.startswith("E ")][:1]
        summary += (run.stdout.strip() or run.stderr.strip()).splitlines()[-1:]
        caught = run.returncode == 1  # tests failed (not an error of the run itself)
        print(f"{name}: {'caught' if caught else 'MISSED'}: {' | '.join(summary)}", flush=True)
        if not caught:
            missed.append(name)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
