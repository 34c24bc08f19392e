// Row helpers of the CPU implementations that compute one row at a time in an accumulation type
// Acc (fp32, or fp64 for fp64 tensors): tensors of any float dtype are read and written through
// load_row / store_row, and per-column sums over rows (a norm's dweight, a bias gradient) are
// taken over fixed blocks of rows, so that they do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Dispatch.h>
#include <torch/types.h>

namespace fmcore {

// dst[i] = t's elements off + i, i < n (t contiguous)
template <typename Acc>
void load_row(const at::Tensor& t, int64_t off, int64_t n, Acc* dst) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "load_row", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>() + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Acc>(src[i]);
  });
}

// t's elements off + i = src[i] rounded to t's dtype, i < n (t contiguous)
template <typename Acc>
void store_row(const at::Tensor& t, int64_t off, int64_t n, const Acc* src) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "store_row", [&] {
    scalar_t* dst = t.mutable_data_ptr<scalar_t>() + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  });
}

// Rows per parallel task over rows of `cols` elements: ~16K elements a task (at::parallel_for's
// grain), at least one row, and no division by zero for rows of no elements.
inline int64_t rows_per_task(int64_t cols) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
}

// Rows per block of a per-column sum: each block adds its rows into a partial row of its own, and
// the partial rows are added in block order.
constexpr int64_t kRowsPerPartial = 32;

inline int64_t partial_rows(int64_t rows) { return (rows + kRowsPerPartial - 1) / kRowsPerPartial; }

// The per-column sum of those partial rows, in block order: out[i] = the sum over blocks b of
// part[b * stride + offset + i], i < n (a block's partial rows are stride apart in part).
template <typename Acc>
std::vector<Acc> add_partial_rows(const std::vector<Acc>& part, int64_t blocks, int64_t stride,
                                  int64_t offset, int64_t n) {
  std::vector<Acc> out(n, Acc(0));
  for (int64_t b = 0; b < blocks; ++b) {
    const Acc* row = part.data() + b * stride + offset;
    for (int64_t i = 0; i < n; ++i) out[i] += row[i];
  }
  return out;
}

}  // namespace fmcore
