// CUDA kernels for per-token label log-probabilities (docs/math.md section 1).
//
// One thread block per row (b, t). Forward: every thread folds its share of the row into a running
// (max, sum-exp) pair, reading 16-byte vectors when the row is aligned, then the block merges the pairs;
// the row is read once. Backward: grad = g * (onehot - exp(z - lse)), one read and one write per
// element, written to a new tensor or over the logits (in-place). Ignored rows: forward returns at once,
// backward writes zeros.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../token_logps.h"

namespace mmalign {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: enough loads in flight per row at V >= 32k (see benchmarks/)

template <typename acc_t>
__device__ __forceinline__ acc_t fast_exp(acc_t x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float fast_exp<float>(float x) {
  return __expf(x);
}

template <typename acc_t>
struct MaxSum {
  acc_t m, s;
};

// Merge two (max, sum of exp(x - max)) pairs.
template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> merge(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return {m, acc_t(0)};
  return {m, a.s * fast_exp(a.m - m) + b.s * fast_exp(b.m - m)};
}

// Fold `n` values (already converted) into the running pair with one rescale.
template <typename acc_t, int N>
__device__ __forceinline__ void fold(MaxSum<acc_t>& st, const acc_t (&x)[N]) {
  acc_t lm = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) lm = x[i] > lm ? x[i] : lm;
  const acc_t m = st.m > lm ? st.m : lm;
  if (m == -INFINITY) return;
  acc_t s = st.s * fast_exp(st.m - m);
#pragma unroll
  for (int i = 0; i < N; ++i) s += fast_exp(x[i] - m);
  st = {m, s};
}

template <typename acc_t>
__device__ MaxSum<acc_t> block_merge(MaxSum<acc_t> st) {
  __shared__ acc_t sm[kThreads / 32], ss[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum<acc_t> o{__shfl_xor_sync(0xffffffff, st.m, off), __shfl_xor_sync(0xffffffff, st.s, off)};
    st = merge(st, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? MaxSum<acc_t>{sm[lane], ss[lane]} : MaxSum<acc_t>{-INFINITY, acc_t(0)};
    for (int off = 16; off > 0; off >>= 1) {
      MaxSum<acc_t> o{__shfl_xor_sync(0xffffffff, st.m, off), __shfl_xor_sync(0xffffffff, st.s, off)};
      st = merge(st, o);
    }
  }
  return st;  // valid in thread 0
}

template <typename scalar_t>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(scalar_t);
  scalar_t v[N];
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    token_logps_fwd_kernel(const scalar_t* __restrict__ Z, const int64_t* __restrict__ Y, acc_t* __restrict__ TOK,
                           acc_t* __restrict__ LSE, int64_t T, int64_t V, int64_t sB, int64_t sT,
                           int64_t ignore_index) {
  const int64_t r = blockIdx.x;
  const int64_t y = Y[r];
  if (y == ignore_index) {
    if (threadIdx.x == 0) {
      TOK[r] = 0;
      LSE[r] = 0;
    }
    return;
  }
  CUDA_KERNEL_ASSERT(y >= 0 && y < V);
  const scalar_t* z = Z + (r / T) * sB + (r % T) * sT;
  MaxSum<acc_t> st{-INFINITY, acc_t(0)};
  using VecT = Vec<scalar_t>;
  constexpr int N = VecT::N;
  int64_t tail = 0;
  if (reinterpret_cast<uintptr_t>(z) % 16 == 0) {
    const int64_t nvec = V / N;
    const VecT* zv = reinterpret_cast<const VecT*>(z);
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const VecT w = zv[i];
      acc_t x[N];
#pragma unroll
      for (int k = 0; k < N; ++k) x[k] = static_cast<acc_t>(w.v[k]);
      fold(st, x);
    }
    tail = nvec * N;
  }
  for (int64_t i = tail + threadIdx.x; i < V; i += kThreads) {
    const acc_t x[1] = {static_cast<acc_t>(z[i])};
    fold(st, x);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const acc_t l = st.m + log(st.s);
    LSE[r] = l;
    TOK[r] = static_cast<acc_t>(z[y]) - l;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    token_logps_bwd_kernel(scalar_t* O, const scalar_t* Z, const int64_t* __restrict__ Y,
                           const acc_t* __restrict__ G, const acc_t* __restrict__ L, int64_t T, int64_t V,
                           int64_t sB, int64_t sT, int64_t oB, int64_t oT, int64_t ignore_index) {
  // O may alias Z (in-place backward): each element is read and written by the same thread.
  const int64_t r = blockIdx.x;
  const int64_t y = Y[r];
  const bool ignored = y == ignore_index;
  const scalar_t* z = Z + (r / T) * sB + (r % T) * sT;
  scalar_t* o = O + (r / T) * oB + (r % T) * oT;
  const acc_t g = ignored ? acc_t(0) : G[r];
  const acc_t l = ignored ? acc_t(0) : L[r];
  using VecT = Vec<scalar_t>;
  constexpr int N = VecT::N;
  int64_t tail = 0;
  if (reinterpret_cast<uintptr_t>(z) % 16 == 0 && reinterpret_cast<uintptr_t>(o) % 16 == 0) {
    const int64_t nvec = V / N;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      VecT w;
      if (!ignored) {
        w = reinterpret_cast<const VecT*>(z)[i];
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const int64_t v = i * N + k;
          const acc_t p = fast_exp(static_cast<acc_t>(w.v[k]) - l);
          w.v[k] = static_cast<scalar_t>(g * ((v == y ? acc_t(1) : acc_t(0)) - p));
        }
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) w.v[k] = scalar_t(0);
      }
      reinterpret_cast<VecT*>(o)[i] = w;
    }
    tail = nvec * N;
  }
  for (int64_t v = tail + threadIdx.x; v < V; v += kThreads) {
    const acc_t val = ignored ? acc_t(0) : g * ((v == y ? acc_t(1) : acc_t(0)) - fast_exp(static_cast<acc_t>(z[v]) - l));
    o[v] = static_cast<scalar_t>(val);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                   int64_t ignore_index) {
  check_token_logps_args(logits, labels, "mmalign::token_logps_fwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = labels.options().dtype(token_logps_acc_type(logits));
  at::Tensor tok = at::empty(labels.sizes(), opts);
  at::Tensor lse = at::empty(labels.sizes(), opts);
  const int64_t rows = labels.numel();
  if (rows == 0) return {tok, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logps_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    token_logps_fwd_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), tok.mutable_data_ptr<acc_t>(),
        lse.mutable_data_ptr<acc_t>(), logits.size(1), logits.size(2), logits.stride(0), logits.stride(1),
        ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tok, lse};
}

void token_logps_bwd_into(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index) {
  check_token_logps_bwd_args(grad, logits, labels, lse, "mmalign::token_logps_bwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = labels.numel();
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logps_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    token_logps_bwd_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
        grad.const_data_ptr<acc_t>(), lse.const_data_ptr<acc_t>(), logits.size(1), logits.size(2),
        logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace mmalign

TORCH_LIBRARY_IMPL(mmalign, CUDA, m) {
  m.impl("token_logps_fwd", &mmalign::cuda::token_logps_fwd);
  m.impl("token_logps_bwd", &mmalign::token_logps_bwd_alloc<&mmalign::cuda::token_logps_bwd_into>);
  m.impl("token_logps_bwd_", &mmalign::token_logps_bwd_inplace<&mmalign::cuda::token_logps_bwd_into>);
}
