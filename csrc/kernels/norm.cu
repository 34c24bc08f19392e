// Fused residual add + LayerNorm / RMSNorm CUDA kernels (see norm.h for the math).
//
// Why this shape: the op is pure memory traffic, so each row is read once, kept in registers
// between the statistics pass and the output pass, and written once, with 16-byte accesses.
// Rows of up to 1024 features (the 8-element vector path) take one warp each, four rows to a block,
// and reduce with shuffles only; wider rows take a whole block (up to 512 threads, 16 or 32
// features per thread) and reduce through shared memory. Features that are not a multiple of 8, or pointers that
// are not 16-byte aligned, take the scalar path (one element per access, one block per row).
//
// Every reduction runs in a fixed order (xor butterflies, then warps in index order), so results
// are bitwise reproducible and every thread of a row sees the same mean and rstd.
#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "common.cuh"
#include "norm.h"

namespace fmcore {

// ---- kernels

namespace {

// v rounded to dtype dt and back: the value a tensor of that dtype holds.
__device__ __forceinline__ float round_to(float v, DType dt) {
  switch (dt) {
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(v));
    case DType::kFloat16: return __half2float(__float2half_rn(v));
    default: return v;
  }
}

// Sum of v over the threads of a row: one warp (WARP) or the whole block (blockDim.x threads, a
// multiple of 32). Every thread gets the same bits. `red` is 32 float2 of shared memory.
template <bool WARP>
__device__ __forceinline__ float2 row_sum(float2 v, float2* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  if constexpr (WARP) {
    return v;
  } else {
    const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    __syncthreads();  // the previous call's readers are done with `red`
    if (threadIdx.x % 32 == 0) red[warp] = v;
    __syncthreads();
    float2 t = make_float2(0.f, 0.f);
    for (int w = 0; w < nwarps; ++w) {
      t.x += red[w].x;
      t.y += red[w].y;
    }
    return t;
  }
}

// Where a thread works: WARP rows are (32 lanes) x (blockDim.y rows per block); block rows are
// blockDim.x threads on one row. A thread owns the VEC-element chunks tid, tid + tpr, ... of a row,
// the same columns for every row it visits.
template <bool WARP>
struct RowTiling {
  int tid, tpr;
  int64_t first_row, row_step;
  __device__ RowTiling() {
    tid = threadIdx.x;
    tpr = WARP ? 32 : blockDim.x;
    const int64_t rpb = WARP ? blockDim.y : 1;
    first_row = static_cast<int64_t>(blockIdx.x) * rpb + (WARP ? threadIdx.y : 0);
    row_step = static_cast<int64_t>(gridDim.x) * rpb;
  }
};

// Warp-row blocks have 4 warps; block rows at most 512 threads, so 128 registers a thread fit.
constexpr int kWarpRowsPerBlock = 4;
constexpr int kMaxBlockThreads = 512;

template <int VEC, int C, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxBlockThreads)
add_norm_fwd_kernel(const AddNormParams p) {
  __shared__ float2 red[32];
  const RowTiling<WARP> tl;
  const int D = static_cast<int>(p.dim);
  const int chunks = D / VEC;
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t row = tl.first_row; row < p.rows; row += tl.row_step) {
    const int64_t base = row * p.dim;
    float s[C][VEC];
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = tl.tid + k * tl.tpr;
      if (c >= chunks) continue;
      const int64_t i = base + static_cast<int64_t>(c) * VEC;
      load<VEC>(p.x, p.x_dtype, i, s[k]);
      if (p.residual != nullptr) {
        float r[VEC];
        load<VEC>(p.residual, p.residual_dtype, i, r);
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[k][e] = round_to(s[k][e] + r[e], p.residual_out_dtype);
        store<VEC>(p.residual_out, p.residual_out_dtype, i, s[k]);
      }
    }
    // The statistics of s * scale: scale = 1 (every FFMA below is then the FADD it replaces, bit
    // for bit) and, where that overflows fp32 (a sum of squares past 3.4e38: rows past ~1.8e19 /
    // sqrt(D), 1e18 at D = 2056; or the sum: D copies of 1e38), once more at 2^-72, where no finite
    // row overflows (D max|s|^2 2^-144 < 1e38 at D = 16384) and the elements that matter stay
    // normal (such a row has max|s| > 7e16). Those rows had rstd NaN (before that 0 and the bias as
    // output, as torch's fp32 statistics still give); now the CPU reference's fp64 result. A loop,
    // not a second copy of the passes (or fp64 sums): the 16-byte kernels keep their register
    // allocation (a copy cost them up to 16). Uniform per row (every thread holds q's bits). NaN
    // and inf inputs retry, and stay NaN.
    float scale = 1.f, mean0;
    float2 q;
#pragma unroll 1
    for (int pass = 0;; ++pass) {
      scale = pass == 0 ? 1.f : 0x1p-72f;
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < C; ++k) {
        if (tl.tid + k * tl.tpr >= chunks) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum = fmaf(s[k][e], scale, sum);
      }
      mean0 = p.rms ? 0.f : row_sum<WARP>(make_float2(sum, 0.f), red).x * inv_d;
      // Two passes over the registers: no cancellation in E[s^2] - mean^2. The second also sums
      // s - mean0 (free: the reduction moves a float2 anyway), which measures the fp32 error of the
      // first pass's D-term sum: on rows with |mean| >> std (1e3 vs 0.1) that error is a few ulps
      // of the mean, several times 1 ulp(mean) / std in every output; the corrected mean is within
      // ~1 ulp (the "corrected two-pass" variance algorithm).
      float sq = 0.f, dsum = 0.f;
#pragma unroll
      for (int k = 0; k < C; ++k) {
        if (tl.tid + k * tl.tpr >= chunks) continue;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = fmaf(s[k][e], scale, -mean0);
          sq += d * d;
          dsum += d;
        }
      }
      q = row_sum<WARP>(make_float2(sq, dsum), red);
      if (q.x <= FLT_MAX || pass == 1) break;
    }
    // The variance is the one about the corrected mean: the sum about mean0 less D (its
    // correction)^2, clamped at 0 (rounding; NaN stays). Kept about mean0, it held mean0's rounding
    // error squared, which dominates a row whose spread is smaller: 2056 copies of 1e10 had rstd
    // 1e-3 for 1 / sqrt(eps), and a gradient 1e5 too small.
    const float corr = p.rms ? 0.f : q.y * inv_d;  // mean - mean0
    float var = q.x * inv_d - corr * corr;
    var = var < 0.f ? 0.f : var;
    // Back to s's units (powers of two: exact). A variance past fp32's range is eps-free: rstd from
    // the scaled one (>= 1 / (2 max |s|): subnormal at worst).
    const float inv_scale = scale == 1.f ? 1.f : 0x1p72f;
    const float mean = (mean0 + corr) * inv_scale;
    float rstd = rsqrtf(var * inv_scale * inv_scale + p.eps);
    if (rstd == 0.f) rstd = rsqrtf(var) * scale;
    if (tl.tid == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = tl.tid + k * tl.tpr;
      if (c >= chunks) continue;
      float w[VEC], b[VEC];
      load<VEC>(p.weight, p.weight_dtype, static_cast<int64_t>(c) * VEC, w);
      if (p.bias != nullptr) {
        load<VEC>(p.bias, p.weight_dtype, static_cast<int64_t>(c) * VEC, b);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) b[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[k][e] = (s[k][e] - mean) * rstd * w[e] + b[e];
      store<VEC>(p.out, p.out_dtype, base + static_cast<int64_t>(c) * VEC, s[k]);
    }
  }
}

// Row gradients, and this block's partial sums of dweight/dbias into workspace row blockIdx.x;
// each only when asked for (its output pointer is not null: frozen norm weights, or the weights'
// gradient alone). The running sums live in shared memory, not registers (which hold the row's
// xhat and g): dynamic smem of 2 * rows_per_block * D fp32 (none without sums), one (dweight,
// dbias) slot pair per row-owner (warp or block).
// Inside a slot, column c * VEC + e sits at e * chunks + c, so a warp's accesses hit consecutive
// banks; each thread only ever touches its own columns until the final reduction.
template <int VEC, int C, bool WARP>
__global__ void __launch_bounds__(WARP ? 32 * kWarpRowsPerBlock : kMaxBlockThreads)
add_norm_bwd_kernel(const AddNormParams p) {
  __shared__ float2 red[32];
  extern __shared__ float part[];
  const RowTiling<WARP> tl;
  const int D = static_cast<int>(p.dim);
  const int chunks = D / VEC;
  const float inv_d = 1.f / static_cast<float>(D);
  // Uniform per launch: a skipped row_sum skips its __syncthreads in every thread of the block.
  const bool want_x = p.grad_x != nullptr, want_w = p.grad_weight != nullptr,
             want_b = p.grad_bias != nullptr, sums = want_w || want_b;
  const void* s_ptr = p.residual_out != nullptr ? p.residual_out : p.x;
  const DType s_dtype = p.residual_out != nullptr ? p.residual_out_dtype : p.x_dtype;
  const int slots = WARP ? blockDim.y : 1;
  const int slot = WARP ? threadIdx.y : 0;
  float* part_w = part + static_cast<int64_t>(slot) * D;
  float* part_b = part + static_cast<int64_t>(slots + slot) * D;
  if (sums) {
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = tl.tid + k * tl.tpr;
      if (c >= chunks) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) part_w[e * chunks + c] = part_b[e * chunks + c] = 0.f;
    }
  }
  for (int64_t row = tl.first_row; row < p.rows; row += tl.row_step) {
    const int64_t base = row * p.dim;
    const float mean = p.rms ? 0.f : p.mean[row];
    const float rstd = p.rstd[row];
    float xh[C][VEC], g[C][VEC];
    float2 acc = make_float2(0.f, 0.f);  // (sum g * xhat, sum g)
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = tl.tid + k * tl.tpr;
      if (c >= chunks) continue;
      const int64_t i = base + static_cast<int64_t>(c) * VEC;
      float dy[VEC];
      load<VEC>(s_ptr, s_dtype, i, xh[k]);
      load<VEC>(p.grad_out, p.out_dtype, i, dy);
#pragma unroll
      for (int e = 0; e < VEC; ++e) xh[k][e] = (xh[k][e] - mean) * rstd;
      if (want_w) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) part_w[e * chunks + c] += dy[e] * xh[k][e];
      }
      if (want_b) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) part_b[e * chunks + c] += dy[e];
      }
      if (want_x) {
        float w[VEC];
        load<VEC>(p.weight, p.weight_dtype, static_cast<int64_t>(c) * VEC, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          g[k][e] = dy[e] * w[e];
          acc.x += g[k][e] * xh[k][e];
          acc.y += g[k][e];
        }
      }
    }
    if (!want_x) continue;
    acc = row_sum<WARP>(acc, red);
    const float c1 = acc.x * inv_d, c2 = p.rms ? 0.f : acc.y * inv_d;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int c = tl.tid + k * tl.tpr;
      if (c >= chunks) continue;
      const int64_t i = base + static_cast<int64_t>(c) * VEC;
      float ds[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) ds[e] = rstd * (g[k][e] - c2 - xh[k][e] * c1);
      if (p.grad_residual_out != nullptr) {
        float gr[VEC];
        load<VEC>(p.grad_residual_out, p.residual_out_dtype, i, gr);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ds[e] += gr[e];
      }
      store<VEC>(p.grad_x, p.x_dtype, i, ds);
      if (p.grad_residual != nullptr) store<VEC>(p.grad_residual, p.residual_dtype, i, ds);
    }
  }

  if (!sums) return;
  float* ws_w = p.workspace + static_cast<int64_t>(blockIdx.x) * D;
  float* ws_b = p.workspace + (p.partial_rows + blockIdx.x) * static_cast<int64_t>(D);
  // Warp rows first add their slots in warp order (deterministic); a block row owns one slot.
  __syncthreads();
  const int nthreads = blockDim.x * blockDim.y;
  for (int col = threadIdx.y * blockDim.x + threadIdx.x; col < D; col += nthreads) {
    const int idx = (col % VEC) * chunks + col / VEC;
    float sw = 0.f, sb = 0.f;
    for (int y = 0; y < slots; ++y) {
      sw += part[static_cast<int64_t>(y) * D + idx];
      sb += part[static_cast<int64_t>(slots + y) * D + idx];
    }
    if (want_w) ws_w[col] = sw;
    if (want_b) ws_b[col] = sb;
  }
}

}  // namespace

// ---- launchers

namespace {

constexpr int64_t kMaxGrid = int64_t{1} << 30;  // grid-stride loops cover any row count

struct Layout {
  int vec = 1, c = 4;
  bool warp = false;
  int threads = 32;  // per row
  int rows_per_block() const { return warp ? kWarpRowsPerBlock : 1; }
  int block_threads() const { return threads * rows_per_block(); }
};

int round_up32(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

// Which kernel covers rows of this width: warp rows with 8-element chunks for D <= 1024, block
// rows with 2 or 4 chunks a thread (up to 512 threads at the 16384 maximum) beyond; the scalar path
// holds 4 to 32 elements a thread so that 512 threads still cover D = 16384.
Layout choose_layout(const AddNormParams& p, bool vec_ok) {
  Layout l;
  const int64_t D = p.dim;
  if (vec_ok && D % 8 == 0) {
    l.vec = 8;
    const int64_t chunks = D / 8;
    if (chunks <= 128) {
      l.warp = true;
      l.threads = 32;
      l.c = chunks <= 32 ? 1 : chunks <= 64 ? 2 : 4;
    } else {  // 2 chunks a thread up to D 8192 (no register spills in the backward), then 4
      l.c = chunks <= 2 * kMaxBlockThreads ? 2 : 4;
      l.threads = round_up32((chunks + l.c - 1) / l.c);
    }
    return l;
  }
  l.vec = 1;
  l.c = D <= 2048 ? 4 : D <= 4096 ? 8 : D <= 8192 ? 16 : 32;
  l.threads = round_up32((D + l.c - 1) / l.c);
  return l;
}

bool fwd_vec_ok(const AddNormParams& p) {
  return all_aligned({p.x, p.residual, p.residual_out, p.out, p.weight, p.bias});
}

bool bwd_vec_ok(const AddNormParams& p) {
  return all_aligned({p.x, p.residual_out, p.grad_out, p.grad_residual_out, p.grad_x,
                      p.grad_residual, p.weight});
}

// Calls launch.operator()<VEC, C, WARP>() for the nine combinations choose_layout returns.
template <typename Launch>
cudaError_t dispatch_layout(const Layout& l, Launch&& launch) {
  if (l.vec == 8) {
    if (l.warp) {
      if (l.c == 1) return launch.template operator()<8, 1, true>();
      if (l.c == 2) return launch.template operator()<8, 2, true>();
      return launch.template operator()<8, 4, true>();
    }
    if (l.c == 2) return launch.template operator()<8, 2, false>();
    return launch.template operator()<8, 4, false>();
  }
  if (l.c == 4) return launch.template operator()<1, 4, false>();
  if (l.c == 8) return launch.template operator()<1, 8, false>();
  if (l.c == 16) return launch.template operator()<1, 16, false>();
  return launch.template operator()<1, 32, false>();
}

// The backward's dweight/dbias running sums: 2 * rows_per_block * D fp32 (<= 128 KiB at D 16384);
// none when neither gradient is asked for. One kernel instantiation serves a range of D, so the
// size varies per call (allow_dynamic_smem only ever raises the kernel's limit).
size_t bwd_smem(const AddNormParams& p, const Layout& l) {
  return add_norm_bwd_sums(p) ? sizeof(float) * 2 * l.rows_per_block() * p.dim : 0;
}

int64_t grid_rows(const Layout& l, int64_t rows) {
  const int64_t rpb = l.rows_per_block();
  return (rows + rpb - 1) / rpb;
}

}  // namespace

cudaError_t add_norm_fwd(const AddNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.dim < 1 || p.dim > kAddNormMaxDim) return cudaErrorInvalidValue;
  const Layout l = choose_layout(p, fwd_vec_ok(p));
  const dim3 grid(static_cast<unsigned>(std::min(grid_rows(l, p.rows), kMaxGrid)));
  const dim3 block(l.threads, l.rows_per_block());
  return dispatch_layout(l, [&]<int VEC, int C, bool WARP>() {
    add_norm_fwd_kernel<VEC, C, WARP><<<grid, block, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

int64_t add_norm_bwd_partial_rows(const AddNormParams& p, int sm_count) {
  const Layout l = choose_layout(p, bwd_vec_ok(p));
  // A persistent grid, one wave of as many blocks as fit: more only add partial rows (and a
  // partly filled last wave).
  int per_sm = 0;
  const cudaError_t err = dispatch_layout(l, [&]<int VEC, int C, bool WARP>() {
    const cudaError_t e = allow_dynamic_smem<add_norm_bwd_kernel<VEC, C, WARP>>(bwd_smem(p, l));
    if (e != cudaSuccess) return e;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, add_norm_bwd_kernel<VEC, C, WARP>,
                                                         l.block_threads(), bwd_smem(p, l));
  });
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky; fall back to one block an SM
  return std::min(grid_rows(l, p.rows), int64_t{std::max(1, sm_count)} * std::max(1, per_sm));
}

cudaError_t add_norm_bwd(const AddNormParams& p, cudaStream_t stream) {
  if (p.dim < 1 || p.dim > kAddNormMaxDim) return cudaErrorInvalidValue;
  const bool sums = add_norm_bwd_sums(p);
  // Only partial rows need a workspace: with no rows there are none, and the caller's empty
  // workspace tensor may well have a null data pointer (torch's allocators return one for 0 bytes).
  if (sums && p.partial_rows > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;
  if (p.rows > 0 && (sums || p.grad_x != nullptr)) {
    const Layout l = choose_layout(p, bwd_vec_ok(p));
    // The caller sized the workspace with add_norm_bwd_partial_rows: one partial row per block.
    if (p.partial_rows < 1 || p.partial_rows > kMaxGrid) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(p.partial_rows));
    const dim3 block(l.threads, l.rows_per_block());
    const size_t smem = bwd_smem(p, l);
    const cudaError_t err = dispatch_layout(l, [&]<int VEC, int C, bool WARP>() {
      const cudaError_t e = allow_dynamic_smem<add_norm_bwd_kernel<VEC, C, WARP>>(smem);
      if (e != cudaSuccess) return e;
      add_norm_bwd_kernel<VEC, C, WARP><<<grid, block, smem, stream>>>(p);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  if (!sums) return cudaSuccess;
  // grad_weight and grad_bias (each when asked for): the partial rows summed in a fixed order.
  // With no rows the partial sums are empty and the kernel writes zeros.
  PartialRowSums<2> sums_of;
  sums_of.part[0] = p.workspace;
  sums_of.part[1] = p.workspace + p.partial_rows * p.dim;
  sums_of.out[0] = p.grad_weight;
  sums_of.out[1] = p.grad_bias;
  sums_of.rows = p.partial_rows;
  sums_of.dim = p.dim;
  sums_of.dtype = p.weight_dtype;
  return sum_partial_rows(sums_of, stream);
}

}  // namespace fmcore
