// CPU kernels for per-token label log-probabilities (docs/math.md section 1).
//
// One task per row (b, t) through at::parallel_for. A row is read in chunks of CHUNK elements,
// converted to the accumulation type into a stack buffer, and folded into a running (max, sum-exp)
// pair, so the row is read from memory once and nothing of size V is allocated. Ignored rows are
// skipped (forward) or zero-filled (backward). The float path uses a branch-free exp that GCC/Clang
// vectorize; the hot loops are compiled twice (AVX2 and baseline) and picked at load time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../token_logps.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMALIGN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MMALIGN_CLONES
#endif

namespace mmalign {
namespace cpu {
namespace {

constexpr int64_t CHUNK = 1024;

// The first row with a label outside [0, V), found by any thread; raised once the parallel loop is over.
struct BadLabel {
  std::atomic<int64_t> row{std::numeric_limits<int64_t>::max()};
  void record(int64_t r) {
    int64_t cur = row.load();
    while (r < cur && !row.compare_exchange_weak(cur, r)) {
    }
  }
  void raise_if_any(const int64_t* Y, int64_t V, int64_t ignore_index) const {
    const int64_t r = row.load();
    TORCH_CHECK(r == std::numeric_limits<int64_t>::max(), "token_logps: labels: expected values in [0, ", V,
                ") or ignore_index=", ignore_index, ", got ", (r == std::numeric_limits<int64_t>::max() ? 0 : Y[r]),
                " at flat position ", r);
  }
};

// exp(x) for x <= 0 in float32, about 2 ulp, branch-free so loops over it vectorize.
// Inputs below -87 give exp(-87) ~ 1.6e-38 instead of a denormal or 0: invisible next to a sum >= 1.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (t + magic) - magic;
  float f = x - n * 0.693145751953125f;  // Cody-Waite: ln2 split in a short high part
  f = f - n * 1.428606765330187045e-06f;  // and the rest
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

MMALIGN_CLONES float chunk_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

MMALIGN_CLONES float chunk_sum_exp(const float* x, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_nonpos(x[i] - shift);
  return s;
}

// out[i] = -g * exp(x[i] - lse)
MMALIGN_CLONES void chunk_neg_softmax(float* out, const float* x, int64_t n, float lse, float g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = -g * exp_nonpos(x[i] - lse);
}

double chunk_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double chunk_sum_exp(const double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

void chunk_neg_softmax(double* out, const double* x, int64_t n, double lse, double g) {
  for (int64_t i = 0; i < n; ++i) out[i] = -g * std::exp(x[i] - lse);
}

template <typename scalar_t, typename acc_t>
inline void load_chunk(acc_t* buf, const scalar_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
}

template <typename scalar_t, typename acc_t>
inline void store_chunk(scalar_t* dst, const acc_t* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
}

// logsumexp of one row, in one pass over memory.
template <typename scalar_t, typename acc_t>
acc_t row_logsumexp(const scalar_t* z, int64_t V) {
  alignas(64) acc_t buf[CHUNK];
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0;
  for (int64_t start = 0; start < V; start += CHUNK) {
    const int64_t n = std::min(CHUNK, V - start);
    const acc_t* x = buf;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      x = z + start;  // no conversion needed: read the row in place
    } else {
      load_chunk(buf, z + start, n);
    }
    const acc_t cm = chunk_max(x, n);
    if (cm > m) {  // rescale the running sum to the new maximum
      s = (m == -std::numeric_limits<acc_t>::infinity()) ? acc_t(0) : s * std::exp(m - cm);
      m = cm;
    }
    if (m != -std::numeric_limits<acc_t>::infinity()) s += chunk_sum_exp(x, n, m);
  }
  return m + std::log(s);
}

template <typename scalar_t, typename acc_t>
void fwd_impl(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& tok,
              const at::Tensor& lse) {
  const int64_t T = logits.size(1), V = logits.size(2);
  const int64_t sB = logits.stride(0), sT = logits.stride(1);
  const scalar_t* Z = logits.const_data_ptr<scalar_t>();
  const int64_t* Y = labels.const_data_ptr<int64_t>();
  acc_t* TOK = tok.mutable_data_ptr<acc_t>();
  acc_t* LSE = lse.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  BadLabel bad;
  at::parallel_for(0, labels.numel(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = Y[r];
      if (y == ignore_index) {
        TOK[r] = 0;
        LSE[r] = 0;
        continue;
      }
      if (y < 0 || y >= V) {  // reported after the loop: never throw inside a parallel region
        bad.record(r);
        continue;
      }
      const scalar_t* z = Z + (r / T) * sB + (r % T) * sT;
      const acc_t l = row_logsumexp<scalar_t, acc_t>(z, V);
      LSE[r] = l;
      TOK[r] = static_cast<acc_t>(z[y]) - l;
    }
  });
  bad.raise_if_any(Y, V, ignore_index);
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
              const at::Tensor& lse, int64_t ignore_index) {
  const int64_t T = logits.size(1), V = logits.size(2);
  const int64_t sB = logits.stride(0), sT = logits.stride(1);
  const int64_t oB = out.stride(0), oT = out.stride(1);
  const scalar_t* Z = logits.const_data_ptr<scalar_t>();
  scalar_t* O = out.mutable_data_ptr<scalar_t>();  // may alias Z: each chunk is read before it is written
  const int64_t* Y = labels.const_data_ptr<int64_t>();
  const acc_t* G = grad.const_data_ptr<acc_t>();
  const acc_t* L = lse.const_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / V);
  BadLabel bad;
  at::parallel_for(0, labels.numel(), grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t buf[CHUNK];
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = O + (r / T) * oB + (r % T) * oT;
      const int64_t y = Y[r];
      if (y == ignore_index) {
        std::fill(o, o + V, scalar_t(0));
        continue;
      }
      if (y < 0 || y >= V) {
        bad.record(r);
        continue;
      }
      const scalar_t* z = Z + (r / T) * sB + (r % T) * sT;
      const acc_t g = G[r], l = L[r];
      for (int64_t start = 0; start < V; start += CHUNK) {
        const int64_t n = std::min(CHUNK, V - start);
        if constexpr (std::is_same_v<scalar_t, acc_t>) {  // no conversion: straight from z to o
          chunk_neg_softmax(o + start, z + start, n, l, g);
          if (y >= start && y < start + n) o[y] += g;
        } else {
          load_chunk(buf, z + start, n);
          chunk_neg_softmax(buf, buf, n, l, g);
          if (y >= start && y < start + n) buf[y - start] += g;
          store_chunk(o + start, buf, n);
        }
      }
    }
  });
  bad.raise_if_any(Y, V, ignore_index);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                   int64_t ignore_index) {
  check_token_logps_args(logits, labels, "mmalign::token_logps_fwd");
  const auto opts = labels.options().dtype(token_logps_acc_type(logits));
  at::Tensor tok = at::empty(labels.sizes(), opts);
  at::Tensor lse = at::empty(labels.sizes(), opts);
  if (labels.numel() == 0) return {tok, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logps_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fwd_impl<scalar_t, acc_t>(logits, labels, ignore_index, tok, lse);
  });
  return {tok, lse};
}

void token_logps_bwd_into(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index) {
  check_token_logps_bwd_args(grad, logits, labels, lse, "mmalign::token_logps_bwd");
  if (labels.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logps_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bwd_impl<scalar_t, acc_t>(out, grad, logits, labels, lse, ignore_index);
  });
}

}  // namespace cpu

}  // namespace mmalign

TORCH_LIBRARY_IMPL(mmalign, CPU, m) {
  m.impl("token_logps_fwd", &mmalign::cpu::token_logps_fwd);
  m.impl("token_logps_bwd", &mmalign::token_logps_bwd_alloc<&mmalign::cpu::token_logps_bwd_into>);
  m.impl("token_logps_bwd_", &mmalign::token_logps_bwd_inplace<&mmalign::cpu::token_logps_bwd_into>);
}
