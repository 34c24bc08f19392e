"""A lane-level CPU model of csrc/kernels/attention.cu, for reviewing the kernels without a GPU.

Each kernel is transcribed statement by statement, with the 32 lanes of a warp as a numpy axis and the
warp-level PTX instructions (ldmatrix .x4 / .x4.trans, mma.m16n8k16.row.col, shfl.xor) implemented
from the PTX ISA's fragment tables, independently of the kernel's own helpers (a_off, b_off,
acc_to_a), so a wrong lane offset or fragment order gives a wrong result here. Arithmetic is float64
(no bf16 rounding), so the model's result must equal a float64 reference to ~1e-12: any indexing,
masking or softmax slip shows up as an O(1) error. Both backward dq paths are modelled: the
deterministic dq kernel, and the dk/dv kernel's kAtomicDq share (dS^T staged in shared memory,
float2 atomics into the fp32 dq_accum) with the convert kernel; run_bwd picks one as the binding and
the launcher do.

Shared memory is checked like compute-sanitizer's racecheck/initcheck, per barrier interval
("phase"): a read of an element whose cp.async is still in flight, or that was written in the same
phase (no barrier in between), or never written, fails; so does a write (cp.async or plain) to an
element read in the same phase (write-after-read without a barrier), and a kernel that exits with
cp.async groups not waited for. The dk/dv kernel's shared memory is the launcher's dynamic size, so
an access past it fails too. Global reads check bounds and the 16-byte alignment of every cp.async
source and vector access; global writes and atomics check bounds, float2 atomics 8-byte alignment.

CTAs run one after another and the warps of a CTA one after another within each phase, which is
sound here because within a CTA the kernels communicate only through shared memory between
barriers, and across CTAs only through atomic additions (dq_accum; their order changes rounding
only) that a later kernel reads; an atomic is therefore a plain read-add-write here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LANES = np.arange(32)
G, TQ = LANES // 4, LANES % 4


# ---- memory


class SharedMemory:
    def __init__(self, n: int):
        self.v = np.full(n, np.nan)
        self.wphase = np.full(n, -1)
        self.rphase = np.full(n, -1)
        self.inflight = np.zeros(n, bool)
        self.phase = 0
        self.groups: list[list] = []
        self.pending: list = []

    def _check_bounds(self, idx):
        assert idx.size == 0 or (idx.min() >= 0 and idx.max() < self.v.size), \
            "smem access outside the launch's dynamic shared memory"

    def read(self, idx):
        idx = np.asarray(idx)
        self._check_bounds(idx)
        assert not self.inflight[idx].any(), "smem read of an element whose cp.async is in flight"
        assert (self.wphase[idx] >= 0).all(), "smem read of an element never written"
        assert (self.wphase[idx] < self.phase).all(), "smem read of an element written without a barrier since"
        self.rphase[idx] = self.phase
        return self.v[idx]

    def _check_write(self, idx):
        self._check_bounds(idx)
        assert (self.rphase[idx] < self.phase).all(), "smem write to an element read in the same phase (WAR race)"
        assert not self.inflight[idx].any(), "smem write to an element with a cp.async in flight"

    def store(self, idx, vals):
        idx = np.asarray(idx)
        self._check_write(idx)
        self.v[idx] = vals
        self.wphase[idx] = self.phase

    def cp_async(self, idx, vals):
        idx = np.asarray(idx)
        self._check_write(idx)
        self.inflight[idx] = True
        self.pending.append((idx, np.array(vals, dtype=float)))

    def commit(self):
        self.groups.append(self.pending)
        self.pending = []

    def wait(self, n: int):
        while len(self.groups) > n:
            for idx, vals in self.groups.pop(0):
                self.v[idx] = vals
                self.inflight[idx] = False
                self.wphase[idx] = self.phase  # visible to other threads after the next barrier

    def sync(self):
        self.phase += 1

    def exit(self):
        assert not self.pending and not self.groups, "CTA exits with cp.async groups not waited for"


@dataclass
class Buffer:
    """Global memory: a flat float64 array (element offsets stand in for pointers)."""
    v: np.ndarray

    def read(self, off, n=1):
        off = np.asarray(off)
        assert (off >= 0).all() and (off + n <= self.v.size).all(), "global read out of bounds"
        return self.v[off[..., None] + np.arange(n)] if n > 1 else self.v[off]

    def write(self, off, vals):
        off = np.asarray(off)
        assert (off >= 0).all() and (off < self.v.size).all(), "global write out of bounds"
        self.v[off] = vals

    def read_vec(self, off, n):
        """A vector load of n elements (float4: n = 4 fp32, uint4: n = 8 bf16/fp16, 16 bytes either
        way), which must be aligned to its size; the buffer's start stands for an aligned pointer."""
        off = np.asarray(off)
        assert (off % n == 0).all(), f"{n}-element vector load not aligned to its size"
        return self.read(off, n)

    def write_vec(self, off, vals):
        """A vector store of vals (..., n), aligned to its size like read_vec."""
        off, n = np.asarray(off), np.shape(vals)[-1]
        assert (off % n == 0).all(), f"{n}-element vector store not aligned to its size"
        self.write(off[..., None] + np.arange(n), vals)

    def atomic_add2(self, off, x, y):
        """atomicAdd(float2*, {x, y}) per lane at fp32 element offsets off: 8-byte aligned, in bounds.
        CTAs run one after another here, so an atomic is a read-add-write (np.add.at also sums
        lanes that hit the same address, as the hardware would)."""
        off = np.asarray(off)
        assert (off % 2 == 0).all(), "float2 atomic address not 8-byte aligned"
        assert (off >= 0).all() and (off + 2 <= self.v.size).all(), "global atomic out of bounds"
        np.add.at(self.v, off, x)
        np.add.at(self.v, off + 1, y)


@dataclass
class Tensor:
    """AttnTensor: a buffer, an element offset (the pointer) and strides (the dim stride is 1)."""
    buf: Buffer
    off: int
    stride_b: int
    stride_s: int
    stride_h: int

    def row(self, b, row, h):
        return self.off + b * self.stride_b + row * self.stride_s + h * self.stride_h


@dataclass
class Params:
    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    lse: Buffer
    lse_stride_b: int
    lse_stride_h: int
    batch: int
    heads_q: int
    heads_k: int
    head_dim: int
    seqlen_q: int
    seqlen_k: int
    scale: float
    causal: bool
    cu_q: list | None = None
    cu_k: list | None = None
    total_q: int = 0
    total_k: int = 0
    dout: Tensor | None = None
    dq: Tensor | None = None
    dk: Tensor | None = None
    dv: Tensor | None = None
    dq_accum: Tensor | None = None  # fp32, set for the atomic dq path (attn_bwd)
    dlse: Buffer | None = None
    delta: Buffer | None = None


# ---- attention.h's sequence arithmetic


def seq_info(p: Params, b: int):
    if p.cu_q is None:
        return 0, p.seqlen_q, 0, p.seqlen_k
    def clamp(x, hi):
        return min(max(x, 0), hi)
    q0, q1 = clamp(p.cu_q[b], p.total_q), clamp(p.cu_q[b + 1], p.total_q)
    k0, k1 = clamp(p.cu_k[b], p.total_k), clamp(p.cu_k[b + 1], p.total_k)
    return q0, max(q1 - q0, 0), k0, max(k1 - k0, 0)


def key_end(causal, i, q_len, k_len):
    if not causal:
        return k_len
    return min(max(i + k_len - q_len + 1, 0), k_len)


def query_begin(causal, j, q_len, k_len):
    if not causal:
        return 0
    return max(j - (k_len - q_len), 0)


# ---- warp-level PTX, from the PTX ISA's tables (not from the kernel's helpers)


def ldsm_x4(sm: SharedMemory, addr, trans=False):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
    matrix i; register i of lane l holds row l/4, cols 2(l%4), 2(l%4)+1 of matrix i (of its
    transpose with .trans). Returns (4, 32, 2)."""
    addr = np.asarray(addr)
    assert (addr % 8 == 0).all(), "ldmatrix row address not 16-byte aligned"
    m = sm.read(addr[:, None] + np.arange(8)).reshape(4, 8, 8)  # matrix i = rows of lanes 8i..8i+7
    if trans:
        m = m.transpose(0, 2, 1)
    return m[:, G[:, None], 2 * TQ[:, None] + np.arange(2)]


def _fragment_maps():
    """mma.m16n8k16's fragment tables as (row, col) index arrays: A (4 regs, 32 lanes, 2 halves) ->
    16x16, B (2, 32, 2) -> 16x8 (row = k), C (32 lanes, 4) -> 16x8."""
    e = np.arange(2)
    a_row = np.stack([G[:, None] + 0 * e, G[:, None] + 8 + 0 * e] * 2)
    a_col = np.stack([2 * TQ[:, None] + e] * 2 + [2 * TQ[:, None] + 8 + e] * 2)
    b_row = np.stack([2 * TQ[:, None] + e, 2 * TQ[:, None] + 8 + e])
    b_col = np.stack([G[:, None] + 0 * e] * 2)
    c_row = np.stack([G, G, G + 8, G + 8], axis=1)
    c_col = np.stack([2 * TQ, 2 * TQ + 1] * 2, axis=1)
    # every element of A, B and C is held by exactly one (register, lane, half)
    for rows, cols, n in ((a_row, a_col, 256), (b_row, b_col, 128), (c_row, c_col, 128)):
        assert np.unique(rows * 16 + cols).size == n == rows.size
    return a_row, a_col, b_row, b_col, c_row, c_col


A_ROW, A_COL, B_ROW, B_COL, C_ROW, C_COL = _fragment_maps()


def mma16816(c, a, b0, b1):
    """mma.sync.aligned.m16n8k16.row.col.f32: c (32, 4) += A (16x16) B (16x8). A: a0,a1 (reg 0) at
    row g, cols 2t+i; a2,a3 (reg 1) at row g+8; a4,a5 (reg 2) row g, cols +8; a6,a7 (reg 3) row g+8,
    cols +8. B: b0,b1 (reg 0) at rows 2t+i, col g; b2,b3 (reg 1) rows 2t+8+i. C: c0,c1 row g, cols
    2t+i; c2,c3 row g+8."""
    A = np.empty((16, 16))
    B = np.empty((16, 8))
    A[A_ROW, A_COL] = a
    B[B_ROW, B_COL] = (b0, b1)
    c += (A @ B)[C_ROW, C_COL]


def shfl_xor(x, m):
    return x[LANES ^ m]


# ---- the kernel's helpers, transcribed


def a_off(pitch):
    lane = LANES
    return ((lane & 7) + ((lane >> 3) & 1) * 8) * pitch + (lane >> 4) * 8


def b_off(pitch):
    lane = LANES
    return ((lane & 7) + (lane >> 4) * 8) * pitch + ((lane >> 3) & 1) * 8


def acc_to_a(c, kk):
    """c: (NT, 32, 4) accumulator tiles -> A fragment (4, 32, 2) of cols kk*16.."""
    return np.stack([c[2 * kk][:, 0:2], c[2 * kk][:, 2:4], c[2 * kk + 1][:, 0:2], c[2 * kk + 1][:, 2:4]])


def gemm_abt_mw(c, sm, sA, sB, D, MW, NT, pitch):
    """c (MW, NT, 32, 4) += A (MW*16 rows at sA) * B^T (NT*8 rows at sB)."""
    for kk in range(D // 16):
        a = [ldsm_x4(sm, sA + mw * 16 * pitch + a_off(pitch) + kk * 16) for mw in range(MW)]
        for nn in range(NT // 2):
            b = ldsm_x4(sm, sB + nn * 16 * pitch + b_off(pitch) + kk * 16)
            for mw in range(MW):
                mma16816(c[mw][2 * nn], a[mw], b[0], b[1])
                mma16816(c[mw][2 * nn + 1], a[mw], b[2], b[3])


def gemm_pb_mw(acc, p, sm, sB, D, MW, KT, pitch):
    """acc (MW, D/8, 32, 4) += P (MW, KT, 32, 4 accumulator layout) * sB (K rows x D)."""
    for kk in range(KT // 2):
        a = [acc_to_a(p[mw], kk) for mw in range(MW)]
        for dd in range(D // 16):
            b = ldsm_x4(sm, sB + kk * 16 * pitch + a_off(pitch) + dd * 16, trans=True)
            for mw in range(MW):
                mma16816(acc[mw][2 * dd], a[mw], b[0], b[1])
                mma16816(acc[mw][2 * dd + 1], a[mw], b[2], b[3])


def gemm_tb(acc, sm, sAt, sB, DW, K, pitch_a, pitch_b):
    """acc (DW/8, 32, 4) += A (16 x K) * B (K x DW); A stored transposed at sAt (K rows, pitch_a),
    B row-major at sB (K rows, pitch_b)."""
    for kk in range(K // 16):
        a = ldsm_x4(sm, sAt + kk * 16 * pitch_a + b_off(pitch_a), trans=True)
        for dd in range(DW // 16):
            b = ldsm_x4(sm, sB + kk * 16 * pitch_b + a_off(pitch_b) + dd * 16, trans=True)
            mma16816(acc[2 * dd], a, b[0], b[1])
            mma16816(acc[2 * dd + 1], a, b[2], b[3])


def st_shared_b32(sm, addr, lo, hi):
    """A 32-bit store of two T (pack2: lo at the lower address) per lane; 4-byte aligned."""
    addr = np.asarray(addr)
    assert (addr % 2 == 0).all(), "32-bit smem store not 4-byte aligned"
    sm.store(addr[:, None] + np.arange(2), np.stack([lo, hi], axis=-1))


def load_tile(sm, dst, t: Tensor, src, stride, n_valid, D, rows, threads):
    """Every thread's cp.async chunks at once: chunk c is row c / (D/8), cols (c % (D/8)) * 8 .. + 8;
    rows >= n_valid are zero-filled without a read."""
    kchunks = D // 8
    c = np.arange(rows * kchunks)  # thread c % threads issues chunk c; the set of chunks is the same
    r, col = c // kchunks, (c % kchunks) * 8
    ok = r < n_valid
    s = src + r[ok] * stride + col[ok]
    assert (s % 8 == 0).all(), "cp.async source not 16-byte aligned"
    vals = np.zeros((c.size, 8))
    if ok.any():
        vals[ok] = t.buf.read(s, 8)
    sm.cp_async((dst + r * (D + 8) + col)[:, None] + np.arange(8), vals)


def store_rows(t: Tensor, b, seq_start, row0, n_rows, h, acc, mul, D):
    """acc (D/8, 32, 4): rows row0 + g (+ 8) times mul[hh] (scalar or per lane) to rows < n_rows."""
    for hh in range(2):
        row = row0 + G + hh * 8
        ok = row < n_rows
        o = np.array([t.row(b, seq_start + int(r), h) for r in row])
        m = np.broadcast_to(mul[hh], (32,))
        for dt in range(D // 8):
            for e in range(2):
                t.buf.write((o + dt * 8 + 2 * TQ + e)[ok], (acc[dt][:, 2 * hh + e] * m)[ok])


# ---- kernels


def attn_fwd_kernel(p: Params, D, kWarps, kMW, kBlockN, grid_x, bx, h, b):
    kRowsW = 16 * kMW
    kBlockM, pitch = kRowsW * kWarps, D + 8
    threads, NT = 32 * kWarps, kBlockN // 8
    sQ = 0
    sK = sQ + kBlockM * pitch
    sV = sK + 2 * kBlockN * pitch
    sm = SharedMemory(sV + 2 * kBlockN * pitch)

    q_start, q_len, k_start, k_len = seq_info(p, b)
    m0 = ((grid_x - 1 - bx) if p.causal else bx) * kBlockM
    if m0 >= q_len:
        return
    hk = h // (p.heads_q // p.heads_k)
    scale_log2 = p.scale * LOG2E
    last_row = min(m0 + kBlockM, q_len) - 1
    n_end = key_end(p.causal, last_row, q_len, k_len)
    n_blocks = (n_end + kBlockN - 1) // kBlockN
    k_seq, v_seq = p.k.row(b, k_start, hk), p.v.row(b, k_start, hk)

    def load_kv(nb, stage):
        n0 = nb * kBlockN
        load_tile(sm, sK + stage * kBlockN * pitch, p.k, k_seq + n0 * p.k.stride_s, p.k.stride_s, k_len - n0, D,
                  kBlockN, threads)
        load_tile(sm, sV + stage * kBlockN * pitch, p.v, v_seq + n0 * p.v.stride_s, p.v.stride_s, k_len - n0, D,
                  kBlockN, threads)

    load_tile(sm, sQ, p.q, p.q.row(b, q_start + m0, h), p.q.stride_s, q_len - m0, D, kBlockM, threads)
    sm.commit()
    if n_blocks > 0:
        load_kv(0, 0)
    sm.commit()

    o = np.zeros((kWarps, kMW, D // 8, 32, 4))
    m_run = np.full((kWarps, kMW, 2, 32), -np.inf)
    l_run = np.zeros((kWarps, kMW, 2, 32))

    for nb in range(n_blocks):
        stage = nb & 1
        if nb + 1 < n_blocks:
            load_kv(nb + 1, stage ^ 1)
            sm.commit()
            sm.wait(1)
        else:
            sm.wait(0)
        sm.sync()
        sKs, sVs = sK + stage * kBlockN * pitch, sV + stage * kBlockN * pitch
        for warp in range(kWarps):
            sQw = sQ + warp * kRowsW * pitch
            sc = np.zeros((kMW, NT, 32, 4))
            gemm_abt_mw(sc, sm, sQw, sKs, D, kMW, NT, pitch)
            n0 = nb * kBlockN
            need_mask = n0 + kBlockN > k_len or (p.causal and n0 + kBlockN > m0 + k_len - q_len + 1)
            for r2 in range(2 * kMW):
                mw, hh = r2 // 2, r2 % 2
                row = m0 + warp * kRowsW + mw * 16 + G + hh * 8  # (32,)
                ke = np.array([key_end(p.causal, int(r), q_len, k_len) for r in row]) - n0
                mx = m_run[warp, mw, hh].copy()
                for nt in range(NT):
                    for e in range(2):
                        x = sc[mw, nt, :, 2 * hh + e] * scale_log2
                        if need_mask:
                            x = np.where(nt * 8 + 2 * TQ + e >= ke, -np.inf, x)
                        sc[mw, nt, :, 2 * hh + e] = x
                        mx = np.maximum(mx, x)
                mx = np.maximum(mx, shfl_xor(mx, 1))
                mx = np.maximum(mx, shfl_xor(mx, 2))
                m_use = np.where(mx == -np.inf, 0.0, mx)
                alpha = np.exp2(m_run[warp, mw, hh] - m_use)
                m_run[warp, mw, hh] = mx
                rs = np.zeros(32)
                for nt in range(NT):
                    for e in range(2):
                        pv = np.exp2(sc[mw, nt, :, 2 * hh + e] - m_use)
                        sc[mw, nt, :, 2 * hh + e] = pv
                        rs += pv
                l_run[warp, mw, hh] = l_run[warp, mw, hh] * alpha + rs
                for dt in range(D // 8):
                    o[warp, mw, dt, :, 2 * hh] *= alpha
                    o[warp, mw, dt, :, 2 * hh + 1] *= alpha
            gemm_pb_mw(o[warp], sc, sm, sVs, D, kMW, NT, pitch)
        sm.sync()
    sm.wait(0)
    sm.exit()

    for warp in range(kWarps):
        for mw in range(kMW):
            inv_l = [None, None]
            row0 = m0 + warp * kRowsW + mw * 16
            for hh in range(2):
                l = l_run[warp, mw, hh]
                l = l + shfl_xor(l, 1)
                l = l + shfl_xor(l, 2)
                inv_l[hh] = np.where(l > 0, 1.0 / np.where(l > 0, l, 1.0), 0.0)
                for lane in range(32):
                    row = row0 + G[lane] + hh * 8
                    if TQ[lane] == 0 and row < q_len:
                        val = (m_run[warp, mw, hh, lane] + math.log2(l[lane])) * LN2 if l[lane] > 0 else -np.inf
                        p.lse.write(b * p.lse_stride_b + h * p.lse_stride_h + q_start + row, val)
            store_rows(p.out, b, q_start, row0, q_len, h, o[warp, mw], inv_l, D)


def attn_bwd_delta_kernel(p: Params, warps_per_block, bx, h, b):
    q_start, q_len, _, _ = seq_info(p, b)
    for w in range(warps_per_block):
        row = bx * warps_per_block + w
        if row >= q_len:
            continue
        o = p.out.buf.read(p.out.row(b, q_start + row, h), p.head_dim)
        d = p.dout.buf.read(p.dout.row(b, q_start + row, h), p.head_dim)
        idx = b * p.lse_stride_b + h * p.lse_stride_h + q_start + row
        p.delta.write(idx, float(o @ d) - (p.dlse.read(idx) if p.dlse is not None else 0.0))


def attn_bwd_dkdv_kernel(p: Params, D, kWarps, kBlockM, kAtomicDq, smem, bx, hk, b):
    """smem: the launch's dynamic shared memory in bytes (T is 2 bytes; the model's smem is in T)."""
    kBlockN, pitch, threads, MT = 16 * kWarps, D + 8, 32 * kWarps, kBlockM // 8
    kPitchS, kRowTiles = kBlockM + 8, kBlockM // 16
    kDW = D * kRowTiles // kWarps  # dQ columns per warp
    assert not kAtomicDq or (kWarps % kRowTiles == 0 and kDW % 16 == 0)
    sm = SharedMemory(smem // 2)
    sK = 0
    sV = sK + kBlockN * pitch
    sQ = sV + kBlockN * pitch
    sdO = sQ + 2 * kBlockM * pitch
    end_T = sdO + 2 * kBlockM * pitch
    # sLse and sDelta, 2 * kBlockM fp32 each, hold one model element per float at the start of their
    # span; sdS = reinterpret_cast<T*>(sDelta + 2 * kBlockM) lies past 4 * kBlockM floats, 2 T each.
    sLse, sDelta = end_T, end_T + 2 * kBlockM
    sdS = end_T + 4 * kBlockM * 2  # kAtomicDq only

    q_start, q_len, k_start, k_len = seq_info(p, b)
    n0 = bx * kBlockN
    if n0 >= k_len:
        return
    group = p.heads_q // p.heads_k
    scale_log2 = p.scale * LOG2E
    m_first = query_begin(p.causal, n0, q_len, k_len) // kBlockM
    m_count = (q_len + kBlockM - 1) // kBlockM
    per_head = m_count - m_first if m_count > m_first else 0
    iters = group * per_head

    def load_q(it, stage):
        h = hk * group + it // per_head
        i0 = (m_first + it % per_head) * kBlockM
        load_tile(sm, sQ + stage * kBlockM * pitch, p.q, p.q.row(b, q_start + i0, h), p.q.stride_s, q_len - i0, D,
                  kBlockM, threads)
        load_tile(sm, sdO + stage * kBlockM * pitch, p.dout, p.dout.row(b, q_start + i0, h), p.dout.stride_s,
                  q_len - i0, D, kBlockM, threads)
        for i in range(kBlockM):
            row = i0 + i
            l, d = np.inf, 0.0
            if row < q_len:
                idx = b * p.lse_stride_b + h * p.lse_stride_h + q_start + row
                lv = p.lse.read(idx)
                l = np.inf if lv == -np.inf else lv * LOG2E
                d = p.delta.read(idx)
            sm.store(sLse + stage * kBlockM + i, l)
            sm.store(sDelta + stage * kBlockM + i, d)

    load_tile(sm, sK, p.k, p.k.row(b, k_start + n0, hk), p.k.stride_s, k_len - n0, D, kBlockN, threads)
    load_tile(sm, sV, p.v, p.v.row(b, k_start + n0, hk), p.v.stride_s, k_len - n0, D, kBlockN, threads)
    if iters > 0:
        load_q(0, 0)
    sm.commit()

    dk = np.zeros((kWarps, D // 8, 32, 4))
    dv = np.zeros((kWarps, D // 8, 32, 4))
    diag = k_len - q_len
    for it in range(iters):
        stage = it & 1
        if it + 1 < iters:
            load_q(it + 1, stage ^ 1)
            sm.commit()
            sm.wait(1)
        else:
            sm.wait(0)
        sm.sync()
        sQs, sdOs = sQ + stage * kBlockM * pitch, sdO + stage * kBlockM * pitch
        sL, sD = sLse + stage * kBlockM, sDelta + stage * kBlockM
        i0 = (m_first + it % per_head) * kBlockM
        for warp in range(kWarps):
            sKw, sVw = sK + warp * 16 * pitch, sV + warp * 16 * pitch
            pt = np.zeros((1, MT, 32, 4))
            gemm_abt_mw(pt, sm, sKw, sQs, D, 1, MT, pitch)
            pt = pt[0]
            need_mask = n0 + kBlockN > k_len or (p.causal and n0 + kBlockN - 1 > i0 + diag)
            for hh in range(2):
                j = n0 + warp * 16 + G + hh * 8
                for mt in range(MT):
                    for e in range(2):
                        c = mt * 8 + 2 * TQ + e
                        pv = np.exp2(pt[mt, :, 2 * hh + e] * scale_log2 - sm.read(sL + c))
                        if need_mask:
                            masked = (j >= k_len) | (p.causal & (j > i0 + c + diag))
                            pv = np.where(masked, 0.0, pv)
                        pt[mt, :, 2 * hh + e] = pv
            dst = np.zeros((1, MT, 32, 4))
            gemm_abt_mw(dst, sm, sVw, sdOs, D, 1, MT, pitch)
            dst = dst[0]
            for mt in range(MT):
                for r in range(4):
                    c = mt * 8 + 2 * TQ + (r & 1)
                    dst[mt, :, r] = pt[mt, :, r] * (dst[mt, :, r] - sm.read(sD + c))
            gemm_pb_mw(dv[warp][None], pt[None], sm, sdOs, D, 1, MT, pitch)
            gemm_pb_mw(dk[warp][None], dst[None], sm, sQs, D, 1, MT, pitch)
            if kAtomicDq:
                sdSw = sdS + warp * 16 * kPitchS
                for mt in range(MT):
                    for hh in range(2):
                        st_shared_b32(sm, sdSw + (G + hh * 8) * kPitchS + mt * 8 + 2 * TQ, dst[mt, :, 2 * hh],
                                      dst[mt, :, 2 * hh + 1])
        sm.sync()
        if kAtomicDq:
            for warp in range(kWarps):
                rt, c0 = warp % kRowTiles, (warp // kRowTiles) * kDW
                dq = np.zeros((kDW // 8, 32, 4))
                gemm_tb(dq, sm, sdS + rt * 16, sK + c0, kDW, kBlockN, kPitchS, pitch)
                h = hk * group + it // per_head
                for hh in range(2):
                    row = i0 + rt * 16 + G + hh * 8
                    ok = row < q_len  # lanes whose row is past the end skip their adds
                    acc = np.array([p.dq_accum.row(b, q_start + int(r), h) for r in row]) + c0 + 2 * TQ
                    for dt in range(kDW // 8):
                        p.dq_accum.buf.atomic_add2((acc + dt * 8)[ok], dq[dt][ok, 2 * hh], dq[dt][ok, 2 * hh + 1])
    sm.wait(0)
    sm.exit()
    for warp in range(kWarps):
        store_rows(p.dv, b, k_start, n0 + warp * 16, k_len, hk, dv[warp], [1.0, 1.0], D)
        store_rows(p.dk, b, k_start, n0 + warp * 16, k_len, hk, dk[warp], [p.scale, p.scale], D)


def attn_bwd_dq_convert_kernel(p: Params, rows, block_dim, bx):
    """One block of block_dim threads, all at once (thread i handles 8 elements)."""
    chunks = p.head_dim // 8
    i = bx * block_dim + np.arange(block_dim)
    i = i[i < rows * p.heads_q * chunks]  # the other threads return
    c, h, r = i % chunks * 8, i // chunks % p.heads_q, i // chunks // p.heads_q
    varlen = p.cu_q is not None
    b, row = (0 * r, r) if varlen else (r // p.seqlen_q, r % p.seqlen_q)
    a = p.dq_accum.row(b, row, h) + c
    lo, hi = p.dq_accum.buf.read_vec(a, 4), p.dq_accum.buf.read_vec(a + 4, 4)
    sc = p.scale
    out = np.concatenate([lo * sc, hi * sc], axis=-1)
    p.dq.buf.write_vec(p.dq.row(b, row, h) + c, out)


def attn_bwd_dq_kernel(p: Params, D, kWarps, kMW, kBlockN, grid_x, bx, h, b):
    kRowsW = 16 * kMW
    kBlockM, pitch = kRowsW * kWarps, D + 8
    threads, NT = 32 * kWarps, kBlockN // 8
    sQ = 0
    sdO = sQ + kBlockM * pitch
    sK = sdO + kBlockM * pitch
    sV = sK + 2 * kBlockN * pitch
    sm = SharedMemory(sV + 2 * kBlockN * pitch)

    q_start, q_len, k_start, k_len = seq_info(p, b)
    m0 = ((grid_x - 1 - bx) if p.causal else bx) * kBlockM
    if m0 >= q_len:
        return
    hk = h // (p.heads_q // p.heads_k)
    scale_log2 = p.scale * LOG2E
    last_row = min(m0 + kBlockM, q_len) - 1
    n_blocks = (key_end(p.causal, last_row, q_len, k_len) + kBlockN - 1) // kBlockN

    row_lse = np.full((kWarps, kMW, 2, 32), np.inf)
    row_delta = np.zeros((kWarps, kMW, 2, 32))
    for warp in range(kWarps):
        for r2 in range(2 * kMW):
            mw, hh = r2 // 2, r2 % 2
            for lane in range(32):
                row = m0 + warp * kRowsW + mw * 16 + G[lane] + hh * 8
                if row < q_len:
                    idx = b * p.lse_stride_b + h * p.lse_stride_h + q_start + row
                    lv = p.lse.read(idx)
                    row_lse[warp, mw, hh, lane] = np.inf if lv == -np.inf else lv * LOG2E
                    row_delta[warp, mw, hh, lane] = p.delta.read(idx)

    k_seq, v_seq = p.k.row(b, k_start, hk), p.v.row(b, k_start, hk)

    def load_kv(nb, stage):
        n0 = nb * kBlockN
        load_tile(sm, sK + stage * kBlockN * pitch, p.k, k_seq + n0 * p.k.stride_s, p.k.stride_s, k_len - n0, D,
                  kBlockN, threads)
        load_tile(sm, sV + stage * kBlockN * pitch, p.v, v_seq + n0 * p.v.stride_s, p.v.stride_s, k_len - n0, D,
                  kBlockN, threads)

    load_tile(sm, sQ, p.q, p.q.row(b, q_start + m0, h), p.q.stride_s, q_len - m0, D, kBlockM, threads)
    load_tile(sm, sdO, p.dout, p.dout.row(b, q_start + m0, h), p.dout.stride_s, q_len - m0, D, kBlockM, threads)
    if n_blocks > 0:
        load_kv(0, 0)
    sm.commit()

    dq = np.zeros((kWarps, kMW, D // 8, 32, 4))
    for nb in range(n_blocks):
        stage = nb & 1
        if nb + 1 < n_blocks:
            load_kv(nb + 1, stage ^ 1)
            sm.commit()
            sm.wait(1)
        else:
            sm.wait(0)
        sm.sync()
        sKs, sVs = sK + stage * kBlockN * pitch, sV + stage * kBlockN * pitch
        n0 = nb * kBlockN
        for warp in range(kWarps):
            sQw, sdOw = sQ + warp * kRowsW * pitch, sdO + warp * kRowsW * pitch
            pr = np.zeros((kMW, NT, 32, 4))
            gemm_abt_mw(pr, sm, sQw, sKs, D, kMW, NT, pitch)
            need_mask = n0 + kBlockN > k_len or (p.causal and n0 + kBlockN > m0 + k_len - q_len + 1)
            for r2 in range(2 * kMW):
                mw, hh = r2 // 2, r2 % 2
                row = m0 + warp * kRowsW + mw * 16 + G + hh * 8
                ke = np.array([key_end(p.causal, int(r), q_len, k_len) for r in row]) - n0
                for nt in range(NT):
                    for e in range(2):
                        pv = np.exp2(pr[mw, nt, :, 2 * hh + e] * scale_log2 - row_lse[warp, mw, hh])
                        if need_mask:
                            pv = np.where(nt * 8 + 2 * TQ + e >= ke, 0.0, pv)
                        pr[mw, nt, :, 2 * hh + e] = pv
            ds = np.zeros((kMW, NT, 32, 4))
            gemm_abt_mw(ds, sm, sdOw, sVs, D, kMW, NT, pitch)
            for mw in range(kMW):
                for nt in range(NT):
                    for r in range(4):
                        ds[mw, nt, :, r] = pr[mw, nt, :, r] * (ds[mw, nt, :, r] - row_delta[warp, mw, r // 2])
            gemm_pb_mw(dq[warp], ds, sm, sKs, D, kMW, NT, pitch)
        sm.sync()
    sm.wait(0)
    sm.exit()
    for warp in range(kWarps):
        for mw in range(kMW):
            store_rows(p.dq, b, q_start, m0 + warp * kRowsW + mw * 16, q_len, h, dq[warp, mw], [p.scale, p.scale], D)


# ---- launchers (Tiles<D> and the grids of attention.cu)


def tiles(D):
    return dict(fwd_warps=4, fwd_mw=2, fwd_bn=64 if D <= 64 else 32, dkdv_warps=4, dkdv_bm=64 if D <= 64 else 32,
                dq_warps=4, dq_mw=2 if D <= 64 else 1, dq_bn=32)


def blocks(n, per):
    return (n + per - 1) // per


def run_fwd(p: Params):
    t, D = tiles(p.head_dim), p.head_dim
    bm = 16 * t["fwd_mw"] * t["fwd_warps"]
    gx = blocks(p.seqlen_q, bm)
    for b in range(p.batch):
        for h in range(p.heads_q):
            for bx in range(gx):
                attn_fwd_kernel(p, D, t["fwd_warps"], t["fwd_mw"], t["fwd_bn"], gx, bx, h, b)


def run_bwd(p: Params, deterministic: bool):
    """attention_cuda.cpp's flash_attn_bwd_cuda (the dq_accum scratch) then attn_bwd's bwd<T, D>."""
    p.dq_accum = None
    if not deterministic:  # at::zeros(q.sizes(), float32): contiguous like dq
        Hq, D = p.heads_q, p.head_dim
        rows = p.total_q if p.cu_q is not None else p.batch * p.seqlen_q
        stride_b = 0 if p.cu_q is not None else p.seqlen_q * Hq * D
        # An empty tensor's data pointer is null, so an empty dq takes the deterministic kernels (whose
        # dq grid is empty too); p.dq_accum None stands for the null pointer.
        if rows * Hq * D > 0:
            p.dq_accum = Tensor(Buffer(np.zeros(rows * Hq * D)), 0, stride_b, Hq * D, D)

    t, D = tiles(p.head_dim), p.head_dim
    for b in range(p.batch):
        for h in range(p.heads_q):
            for bx in range(blocks(p.seqlen_q, 8)):
                attn_bwd_delta_kernel(p, 8, bx, h, b)

    kBlockN, kBlockMq = 16 * t["dkdv_warps"], t["dkdv_bm"]
    kv_smem = (2 * kBlockN + 4 * kBlockMq) * (D + 8) * 2 + 4 * kBlockMq * 4

    def dkdv(atomic_dq, smem):
        for b in range(p.batch):
            for hk in range(p.heads_k):
                for bx in range(blocks(p.seqlen_k, kBlockN)):
                    attn_bwd_dkdv_kernel(p, D, t["dkdv_warps"], kBlockMq, atomic_dq, smem, bx, hk, b)

    if p.dq_accum is not None:
        ds_smem = kBlockN * (kBlockMq + 8) * 2
        dkdv(True, kv_smem + ds_smem)
        rows = p.total_q if p.cu_q is not None else p.batch * p.seqlen_q
        for bx in range(blocks(rows * p.heads_q * (D // 8), 256)):
            attn_bwd_dq_convert_kernel(p, rows, 256, bx)
        return
    dkdv(False, kv_smem)

    bm = 16 * t["dq_mw"] * t["dq_warps"]
    gx = blocks(p.seqlen_q, bm)
    for b in range(p.batch):
        for h in range(p.heads_q):
            for bx in range(gx):
                attn_bwd_dq_kernel(p, D, t["dq_warps"], t["dq_mw"], t["dq_bn"], gx, bx, h, b)
