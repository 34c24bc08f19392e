// Flash attention, part 2 of 4 (the overview is attention.cu's): the row-wise pieces every kernel
// shares, on mma.sync and wgmma alike (their accumulators have the same row-per-quad layout): row
// pointers, causal, window and end-of-sequence masks, the online softmax and the forward's
// epilogue, the backward's P and dS, its walk over query blocks and its lse / delta loads.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "attention.h"
#include "attention_fragments.cuh"
#include "common.cuh"
#include "ptx.cuh"

namespace fmcore {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ const T* row_ptr(const AttnTensor& t, int64_t b, int64_t row,
                                            int64_t h) {
  return static_cast<const T*>(t.ptr) + b * t.stride_b + row * t.stride_s + h * t.stride_h;
}
template <typename T>
__device__ __forceinline__ T* row_ptr_mut(const AttnTensor& t, int64_t b, int64_t row, int64_t h) {
  return static_cast<T*>(t.ptr) + b * t.stride_b + row * t.stride_s + h * t.stride_h;
}

// The window bounds a kernel sees: its call's in the windowed instantiations (kWindow), none in the
// others (left -1, right 0), whose masks and block ranges then compile to the causal / full ones
// they were before windows existed (no register or instruction for the window).
template <bool kWindow>
__device__ __forceinline__ int64_t window_left(const AttnParams& p) {
  return kWindow ? p.window_left : -1;
}
template <bool kWindow>
__device__ __forceinline__ int64_t window_right(const AttnParams& p) {
  return kWindow ? p.window_right : 0;
}

// Where the rows r0 + i (0 <= i < kRows) of a query block stop seeing the keys of the kBlockN-key
// block at n0: row r0 + i sees its keys below (i), relative to n0 (key_end's clamps, in 32 bits).
template <bool kWindow, int kRows, int kBlockN>
struct BlockKeyEnd {
  int e0, kv;  // (i) = min(max(e0 + i, 0), kv); kv: the block's keys before the sequence end
  __device__ __forceinline__ BlockKeyEnd(const AttnParams& p, int64_t r0, int64_t n0,
                                         const SeqInfo& s) {
    const int64_t valid = s.k_len - n0, right = window_right<kWindow>(p);
    const int64_t e = p.causal ? r0 + s.k_len - s.q_len + right + 1 - n0 : kBlockN;
    kv = valid < 0 ? 0 : (valid < kBlockN ? static_cast<int>(valid) : kBlockN);
    e0 = e < -kRows ? -kRows : (e > kBlockN ? kBlockN : static_cast<int>(e));
  }
  __device__ __forceinline__ int operator()(int i) const {
    const int e = e0 + i;
    return e < 0 ? 0 : (e < kv ? e : kv);
  }
};

// Where the rows r0 + i of a query block start seeing the keys of the kBlockN-key block at n0 with
// a left window bound (key_begin's clamps, in 32 bits, relative to n0).
template <bool kWindow, int kRows, int kBlockN>
struct BlockKeyBegin {
  int b0;  // (i) = min(max(b0 + i, 0), kBlockN)
  __device__ __forceinline__ BlockKeyBegin(const AttnParams& p, int64_t r0, int64_t n0,
                                           const SeqInfo& s) {
    const int64_t b = r0 + s.k_len - s.q_len - window_left<kWindow>(p) - n0;
    b0 = b < -kRows ? -kRows : (b > kBlockN ? kBlockN : static_cast<int>(b));
  }
  __device__ __forceinline__ int operator()(int i) const {
    const int b = b0 + i;
    return b < 0 ? 0 : (b < kBlockN ? b : kBlockN);
  }
};

// Whether a left window bound hides keys of the block at n0 from some of the kRows rows from r0:
// the last row's window starts past n0 (rows start later down the block).
template <bool kWindow, int kRows>
__device__ __forceinline__ bool crosses_window_start(const AttnParams& p, int64_t r0, int64_t n0,
                                                     const SeqInfo& s) {
  const int64_t left = window_left<kWindow>(p);
  return left >= 0 && n0 < r0 + kRows - 1 + s.k_len - s.q_len - left;
}

// In a block of kBlockN keys from n0 that crosses the sequence end, this warp's part of the
// diagonal (its rows from r0; with a right window bound, the diagonal moved right by it) or of a
// left window bound, sets acc (a warp's kMW 16-row tiles of scores, or of P) to `fill` for the
// keys a row does not see. Other blocks need no mask: the branch is warp-uniform. Only blocks that
// a left bound crosses take the two-sided mask, so that unwindowed calls keep the one compare an
// element.
template <bool kWindow, int kRows, int kBlockN, int kMW, int NT>
__device__ __forceinline__ void mask_block(float (&acc)[kMW][NT][4], float fill,
                                           const AttnParams& p, int64_t r0, int64_t n0,
                                           const SeqInfo& s, int lane) {
  const bool window_start = crosses_window_start<kWindow, kRows>(p, r0, n0, s);
  const int64_t right_diag = s.k_len - s.q_len + window_right<kWindow>(p);
  if (n0 + kBlockN <= s.k_len && !(p.causal && n0 + kBlockN > r0 + right_diag + 1) &&
      !window_start) {
    return;
  }
  const BlockKeyEnd<kWindow, kRows, kBlockN> key_end_of(p, r0, n0, s);
  const int g = lane / 4, tq = lane % 4;
  if (window_start) {
    const BlockKeyBegin<kWindow, kRows, kBlockN> key_begin_of(p, r0, n0, s);
#pragma unroll
    for (int r2 = 0; r2 < 2 * kMW; ++r2) {
      const int mw = r2 / 2, hh = r2 % 2, i = mw * 16 + g + hh * 8;
      // keys [kb, ke) of the block: one unsigned compare an element
      const int kb = key_begin_of(i), ke = key_end_of(i);
      const unsigned span = ke > kb ? static_cast<unsigned>(ke - kb) : 0u;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = nt * 8 + 2 * tq + e;
          if (static_cast<unsigned>(c - kb) >= span) acc[mw][nt][2 * hh + e] = fill;
        }
      }
    }
    return;
  }
#pragma unroll
  for (int r2 = 0; r2 < 2 * kMW; ++r2) {  // this lane's rows: tile mw, half hh
    const int mw = r2 / 2, hh = r2 % 2;
    const int ke = key_end_of(mw * 16 + g + hh * 8);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (nt * 8 + 2 * tq + e >= ke) acc[mw][nt][2 * hh + e] = fill;
      }
    }
  }
}

// Writes the 16 x D accumulator of a warp (rows row0 + g, row0 + g + 8) times `mul` to rows <
// n_rows.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const AttnTensor& t, int64_t b, int64_t seq_start,
                                           int64_t row0, int64_t n_rows, int64_t h,
                                           const float (&acc)[D / 8][4], const float (&mul)[2],
                                           int lane) {
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t row = row0 + g + hh * 8;
    if (row >= n_rows) continue;
    T* out = row_ptr_mut<T>(t, b, seq_start + row, h);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * tq) =
          pack2<T>(acc[dt][2 * hh] * mul[hh], acc[dt][2 * hh + 1] * mul[hh]);
    }
  }
}

// How far (in log2 units) a row's maximum may rise above the offset its P is taken against before
// the offset must follow it: P then reaches at most 2^8, far from overflowing the fp32 sums or the
// bf16/fp16 P (whose relative precision does not depend on the magnitude). The offset cancels in
// out = o / l and lse = offset + log2(l), so the result is the same whichever offset a row keeps.
constexpr float kStaleMaxLog2 = 8.f;

// One key block of the online softmax for a warp's kMW 16-row tiles, but for the output: turns the
// scores sc (raw, masked to -inf) into P in place, adds them to this lane's partial row sums, and
// returns whether o must be rescaled (then by alpha, see rescale_rows; the answer is the same for
// the whole warp).
//
// Rescaling is lazy (as in FlashAttention-4): while no row of the warp's maximum has risen more than
// kStaleMaxLog2 above the offset m_run its P are taken against, m_run stays, and so do o and l_run:
// no rescale. Past the first key blocks a row's maximum rarely rises that far, so most steps skip
// the rescale: a multiply per o element (128 a thread a step in the mma.sync forward at D = 128,
// about a tenth of its instructions).
template <int kMW, int NT>
__device__ __forceinline__ bool softmax_scores(float (&sc)[kMW][NT][4], float (&m_run)[kMW][2],
                                               float (&l_run)[kMW][2], float scale_log2,
                                               float (&alpha)[kMW][2]) {
  float mx[kMW][2];
  bool keep = true;  // every row of this lane keeps its offset
#pragma unroll
  for (int r2 = 0; r2 < 2 * kMW; ++r2) {
    const int mw = r2 / 2, hh = r2 % 2;
    float m = m_run[mw][hh];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      m = fmaxf(m, fmaxf(sc[mw][nt][2 * hh], sc[mw][nt][2 * hh + 1]));
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    mx[mw][hh] = m;
    // A row that has seen only masked keys has max -inf and nothing to rescale; from -inf to a
    // finite max the difference is +inf, which fails the test.
    keep = keep && (m == -INFINITY || (m - m_run[mw][hh]) * scale_log2 <= kStaleMaxLog2);
  }
  keep = __all_sync(0xffffffffu, keep);
#pragma unroll
  for (int r2 = 0; r2 < 2 * kMW; ++r2) {
    const int mw = r2 / 2, hh = r2 % 2;
    // The exponential unconditionally and selects, not branches: the overlapped wgmma forward
    // (tiles 5, 6) relies on its softmax being one basic block, which ptxas schedules above the
    // P V's wait (see the design notes). From an offset of -inf the factor is 0 (-inf - -inf would
    // give NaN).
    const float shrink = ex2_approx((m_run[mw][hh] - mx[mw][hh]) * scale_log2);
    alpha[mw][hh] = keep ? 1.f : (m_run[mw][hh] == -INFINITY ? 0.f : shrink);
    m_run[mw][hh] = keep ? m_run[mw][hh] : mx[mw][hh];
    // p = 2^(s * scale_log2 - m_off), one FFMA and one MUFU.EX2. A row whose offset is still -inf
    // (only masked keys so far) takes 0, so that p = 2^-inf = 0.
    const float m_off = m_run[mw][hh] == -INFINITY ? 0.f : m_run[mw][hh] * scale_log2;
    float rs = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pv = ex2_approx(sc[mw][nt][2 * hh + e] * scale_log2 - m_off);
        sc[mw][nt][2 * hh + e] = pv;
        rs += pv;
      }
    }
    l_run[mw][hh] = l_run[mw][hh] * alpha[mw][hh] + rs;  // the quad adds its partial sums at the end
  }
  return !keep;
}

// o's rows times softmax_scores' alpha.
template <int kMW, int DT>
__device__ __forceinline__ void rescale_rows(float (&o)[kMW][DT][4], const float (&alpha)[kMW][2]) {
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mw][dt][e] *= alpha[mw][e / 2];
    }
  }
}

// softmax_scores, and o rescaled when it must be.
template <int kMW, int NT, int DT>
__device__ __forceinline__ void softmax_step(float (&sc)[kMW][NT][4], float (&o)[kMW][DT][4],
                                             float (&m_run)[kMW][2], float (&l_run)[kMW][2],
                                             float scale_log2) {
  float alpha[kMW][2];
  if (softmax_scores(sc, m_run, l_run, scale_log2, alpha)) rescale_rows(o, alpha);
}

// The forward's epilogue for a warp's kMW 16-row tiles from query row0 (of sequence b, head h):
// lse, and out = o / l.
template <typename T, int D, int kMW>
__device__ __forceinline__ void write_rows(const AttnParams& p, int64_t b, int64_t h,
                                           const SeqInfo& s, int64_t row0,
                                           const float (&o)[kMW][D / 8][4],
                                           const float (&m_run)[kMW][2],
                                           const float (&l_run)[kMW][2], float scale_log2,
                                           int lane) {
  float* lse = static_cast<float*>(p.lse);
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int mw = 0; mw < kMW; ++mw) {
    float inv_l[2];
    const int64_t r0 = row0 + mw * 16;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = l_run[mw][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      // l = 0: the row saw no key, or only keys scored -inf: out 0, lse -inf. A NaN l (a NaN or
      // +inf score, a NaN scale) stays NaN in out and lse, as in the reference: an lse of -inf
      // would tell the backward that the row sees no key, and it would drop the row's gradient
      // (NaN dq, and NaN in dk/dv of every key it sees) for 0.
      inv_l[hh] = l == 0.f ? 0.f : 1.f / l;
      const int64_t row = r0 + g + hh * 8;
      if (tq == 0 && row < s.q_len) {
        lse[b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + row] =
            l == 0.f ? -INFINITY : (m_run[mw][hh] * scale_log2 + log2f(l)) * kLn2;
      }
    }
    store_rows<T, D>(p.out, b, s.q_start, r0, s.q_len, h, o[mw], inv_l, lane);
  }
}

// The dk/dv kernels' P^T from S^T in place, for a warp's 16 keys (rows, from n0 + 16 * warp) by
// MT * 8 queries (columns, from i0, whose lse in log2 units is sL): P^T = 2^(S^T * scale_log2 -
// lse), and 0 where a query does not see a key (keys past the sequence end, and, causal, keys past
// a query's diagonal (plus window_right); keys before a query's left window bound) and for queries
// past the end. Only a warp whose keys cross any of these, or a block whose queries cross the end,
// is masked (a warp-uniform branch). The queries past the end
// (zero rows of Q and dO, lse +inf) need it as much: a key holding +-inf scores 0 * inf = NaN
// against a zero row, and 2^(NaN - inf) is NaN, which dV += P^T dO and dK += dS^T Q then spread
// over the whole key (its dk and dv NaN where torch's are finite).
template <bool kWindow, int kBlockM, int kBlockN, int MT>
__device__ __forceinline__ void pt_from_st(float (&pt)[MT][4], const float* sL, float scale_log2,
                                           const AttnParams& p, int64_t n0, int warp,
                                           int64_t i0, const SeqInfo& s, int lane) {
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      pt[mt][r] = ex2_approx(pt[mt][r] * scale_log2 - sL[mt * 8 + 2 * tq + (r & 1)]);
    }
  }
  const int64_t j0 = n0 + warp * 16;             // this warp's first key
  // key j is visible to query i iff j <= i + diag (+ window_right, causal) and, with a left bound,
  // j >= i + diag - window_left
  const int64_t diag = s.k_len - s.q_len;
  const int64_t q_rows = s.q_len - i0;           // the block's queries before the end (>= 1)
  const bool causal = p.causal, windowed = window_left<kWindow>(p) >= 0;
  const int64_t right_diag = diag + window_right<kWindow>(p);
  // with a left bound: the block's last query does not see this warp's first key
  const bool window_start = windowed && j0 < i0 + kBlockM - 1 + diag - window_left<kWindow>(p);
  if (j0 + 16 <= s.k_len && q_rows >= kBlockM && !(causal && j0 + 15 > i0 + right_diag) &&
      !window_start) {
    return;
  }
  // Key jr (relative to n0) is seen by the queries c (relative to i0) in [lo, q_end): lo = jr - off
  // (causal: jr - c <= i0 + diag + window_right - n0), q_end the sequence end or, with a left
  // bound, the first query past key jr's window if sooner; none when jr is past the end. One
  // unsigned compare an element (with q_end a second one, the wgmma dk/dv at D = 64 took 18 more
  // registers).
  const int64_t off64 = causal ? i0 + right_diag - n0 : kBlockN;
  const int off =
      off64 < -kBlockM ? -kBlockM : (off64 > kBlockN ? kBlockN : static_cast<int>(off64));
  const int q_end = q_rows < kBlockM ? static_cast<int>(q_rows) : kBlockM;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int jr = warp * 16 + g + hh * 8, lo = jr - off;
    int hi = q_end;
    if (window_start) {  // query_end of key n0 + jr, relative to i0
      const int64_t e = n0 + jr - i0 - diag + window_left<kWindow>(p) + 1;
      hi = e < lo ? lo : (e < hi ? static_cast<int>(e) : hi);
    }
    const unsigned span = n0 + jr >= s.k_len || hi <= lo ? 0u : static_cast<unsigned>(hi - lo);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (static_cast<unsigned>(mt * 8 + 2 * tq + e - lo) >= span) pt[mt][2 * hh + e] = 0.f;
      }
    }
  }
}

// The dk/dv kernels' dS^T = P^T * (dP^T - delta) in place of dP^T (delta of the query columns, as
// pt_from_st's lse, in sD).
template <int MT>
__device__ __forceinline__ void ds_from_dp(float (&dst)[MT][4], const float (&pt)[MT][4],
                                           const float* sD, int lane) {
  const int tq = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      dst[mt][r] = pt[mt][r] * (dst[mt][r] - sD[mt * 8 + 2 * tq + (r & 1)]);
    }
  }
}

// The query blocks a dk/dv CTA (keys [n0, n_end), kv head hk) works through: in every query head
// of its GQA group, the blocks of kBlockM rows from the first that sees key n0 to the last that
// sees key n_end - 1 (the sequence's last with no left window bound). Trip `it` works on query
// head hk * group + it / per_head, rows from (m_first + it % per_head) * kBlockM; step() moves
// (h, i0) through that order (no 64-bit division a trip).
template <bool kWindow, int kBlockM>
struct QueryWalk {
  int64_t m_first, m_count, iters, h, i0;  // m_count: the end of the blocks (in blocks)
  __device__ __forceinline__ QueryWalk(const AttnParams& p, const SeqInfo& s, int64_t n0,
                                       int64_t n_end, int64_t hk) {
    const int64_t group = p.heads_q / p.heads_k;
    m_first = query_begin(p.causal, window_right<kWindow>(p), n0, s.q_len, s.k_len) / kBlockM;
    const int64_t q_end = query_end(window_left<kWindow>(p), n_end - 1, s.q_len, s.k_len);
    m_count = (q_end + kBlockM - 1) / kBlockM;
    iters = group * (m_count > m_first ? m_count - m_first : 0);
    h = hk * group;
    i0 = m_first * kBlockM;
  }
  // The last block of this head: the next trip starts the next head.
  __device__ __forceinline__ bool head_done() const { return i0 + kBlockM >= m_count * kBlockM; }
  __device__ __forceinline__ int64_t next_h() const { return head_done() ? h + 1 : h; }
  __device__ __forceinline__ int64_t next_i0() const {
    return head_done() ? m_first * kBlockM : i0 + kBlockM;
  }
  __device__ __forceinline__ void step() {
    const int64_t nh = next_h(), ni = next_i0();
    h = nh;
    i0 = ni;
  }
};

// The dk/dv kernels' lse and delta of query row i0 + threadIdx.x (of sequence b, head h) into sL
// and sD by cp.async (zeros past the end), one thread a row; lse_to_log2 converts lse once landed.
template <int kBlockM>
__device__ __forceinline__ void load_lse_delta(const AttnParams& p, int64_t b, int64_t h,
                                               const SeqInfo& s, int64_t i0, float* sL, float* sD) {
  if (threadIdx.x < kBlockM) {
    const float* lse = static_cast<const float*>(p.lse);
    const int64_t row = i0 + threadIdx.x;
    const bool ok = row < s.q_len;
    const int64_t idx = b * p.lse_stride_b + h * p.lse_stride_h + s.q_start + row;
    cp_async4(sL + threadIdx.x, ok ? lse + idx : lse, ok);
    cp_async4(sD + threadIdx.x, ok ? p.delta + idx : p.delta, ok);
  }
}

// The dk/dv kernels' lse of query row i0 + threadIdx.x, which this thread copied into sL and has
// waited for: to log2 units, +inf for rows past the end or rows that saw no key (-inf), so that
// P = 0 there.
template <int kBlockM>
__device__ __forceinline__ void lse_to_log2(float* sL, int64_t i0, int64_t q_len) {
  if (threadIdx.x < kBlockM) {
    float& l = sL[threadIdx.x];
    l = i0 + threadIdx.x >= q_len || l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

// The forwards' exponent scale: the running max is taken over raw scores and the scale applied
// inside each exponent's FFMA, so raw scores must rank as scaled ones do: a negative scale negates
// Q instead (negate8) and scales by its magnitude. A zero scale becomes the smallest normal float,
// so that a masked score (-inf) still gives 2^-inf = 0 (not 0 * -inf = NaN) while visible ones
// give 2^(+-tiny) = 1, as with 0. A NaN scale stays NaN (fmaxf would pick FLT_MIN: a forward
// computed as with scale 0, and a NaN backward), so that out and lse are NaN, as in the reference.
__device__ __forceinline__ float fwd_scale_log2(float scale) {
  return isnan(scale) ? scale : fmaxf(fabsf(scale), FLT_MIN) * kLog2e;
}

// Flips the sign bit of the 8 bf16 or fp16 values in v (bit 15 of each half): Q for a negative
// scale.
__device__ __forceinline__ void negate8(uint4& v) {
  v.x ^= 0x80008000u;
  v.y ^= 0x80008000u;
  v.z ^= 0x80008000u;
  v.w ^= 0x80008000u;
}

// The blocks of kBlockN keys the query rows [m0, m0 + kBlockM) see: `count` blocks from block
// `first`, from the block of the first key their first row sees (0 without a left window bound)
// to that of the last key their last row sees. Blocks outside the window are never loaded.
struct KeyBlocks {
  int first, count;
};
template <bool kWindow, int kBlockM, int kBlockN>
__device__ __forceinline__ KeyBlocks key_blocks(const AttnParams& p, int64_t m0, const SeqInfo& s) {
  const int64_t last_row = (m0 + kBlockM < s.q_len ? m0 + kBlockM : s.q_len) - 1;
  const int64_t end = key_end(p.causal, window_right<kWindow>(p), last_row, s.q_len, s.k_len);
  const int64_t begin = key_begin(window_left<kWindow>(p), m0, s.q_len, s.k_len);
  const int first = static_cast<int>(begin / kBlockN);
  // (last >= first: a row's window ends past its start, and both clamp into [0, k_len])
  const int last = static_cast<int>((end + kBlockN - 1) / kBlockN);
  return {first, last - first};
}

}  // namespace
}  // namespace fmcore
