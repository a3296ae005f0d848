// The CUDA DAMO step kernel (see csrc/cuda/damo_step.cu for the design). Device code only, with no ATen:
// nvcc compiles it for the GPU, and the tests compile it for the host against csrc/cuda/simt_host.h (the
// few CUDA built-ins it uses, emulated with one std::thread per CUDA thread), so the kernel's own code
// runs on machines without a GPU (tests/ops/test_damo_step_cuda_kernel.py).
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MMALIGN_EXTERN_SHARED(type, name) extern __shared__ type name[]
#else
#include "simt_host.h"
#endif
#include "../damo_step_math.h"

namespace mmalign {
namespace cuda {

#ifndef __CUDACC__
using std::exp;  // on the host, the float overloads (nvcc's device math has them unqualified)
using std::isfinite;
#endif

constexpr int kThreads = 1024;
constexpr int kItems = 8;
// mmalign/ops/limits.py DAMO_ONE_PROGRAM_MAX_N (8192), as one Triton program: tests/ops/test_limits.py compares
constexpr int64_t kMaxN = int64_t(kThreads) * kItems;

template <typename scalar_t, typename acc_t>
struct StepParams {
  const scalar_t *pc, *pr, *rc, *rr;
  int64_t s_pc, s_pr, s_rc, s_rr;
  const acc_t* beta;  // (N,) stride s_beta, or null: beta_scalar
  int64_t s_beta;
  acc_t beta_scalar;
  const acc_t* alpha_d;  // null: 1
  int64_t s_ad;
  const acc_t* weights;  // null: 1
  int64_t s_w;
  const float* g;
  float* g_out;
  int64_t* step;  // null: step_scalar
  int64_t step_scalar, seed, N, K;
  acc_t gamma, rho, eps, min_beta;
  bool paper, use_m, combine_sum, incr_step;
  int64_t select, loss_kind;
  acc_t *loss, *losses, *beta_out, *rw, *rl, *margins, *grad_u, *dl_du, *alpha_m;
  bool *keep, *accuracies;
};

// The sum over the block of every thread's v, returned to every thread (same order everywhere).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous reduction's readers are done with red
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  acc_t r = 0;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) r += red[w];
  return r;
}

template <typename acc_t>
__device__ acc_t block_max(acc_t v, acc_t* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  acc_t r = red[0];
  for (int w = 1; w < int(blockDim.x >> 5); ++w) r = red[w] > r ? red[w] : r;
  return r;
}

template <typename T>
__device__ __forceinline__ bool finite(T x) {
  return isfinite(x);
}

template <typename T>
__device__ __forceinline__ T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) damo_step_kernel(const StepParams<scalar_t, acc_t> p) {
  MMALIGN_EXTERN_SHARED(int32_t, ordered);  // (N,) float32-ordered ranking keys
  __shared__ acc_t red[32];
  const int64_t N = p.N;
  const int tid = threadIdx.x, nt = blockDim.x;
  const acc_t g = static_cast<acc_t>(*p.g);

  acc_t logr_w[kItems], logr_l[kItems], u[kItems], A[kItems], beta[kItems];
  bool in[kItems], keep[kItems];
  acc_t n_bad = 0, sum_a = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = tid + int64_t(k) * nt;
    in[k] = i < N;
    logr_w[k] = logr_l[k] = u[k] = A[k] = 0;
    beta[k] = p.beta ? acc_t(1) : p.beta_scalar;  // finite math in the unused slots
    if (in[k]) {
      logr_w[k] = static_cast<acc_t>(p.pc[i * p.s_pc]) - static_cast<acc_t>(p.rc[i * p.s_rc]);
      logr_l[k] = static_cast<acc_t>(p.pr[i * p.s_pr]) - static_cast<acc_t>(p.rr[i * p.s_rr]);
      u[k] = logr_w[k] - logr_l[k];
      if (p.beta) beta[k] = p.beta[i * p.s_beta];
      A[k] = damo::model_aware(u[k], beta[k], g, p.paper);
      n_bad += finite(A[k]) ? acc_t(0) : acc_t(1);
      sum_a += A[k];
    }
  }
  const bool bad = block_sum(n_bad, red) > 0 || !finite(g);
  sum_a = block_sum(sum_a, red);

  // ---- the kept set S: the K largest keys ----
  if (p.select == kSelectAll) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) keep[k] = in[k];
  } else {
    acc_t key[kItems];
    acc_t max_key = -INFINITY;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      key[k] = damo::selection_key(A[k], g, p.select, p.paper);
      if (in[k] && key[k] > max_key) max_key = key[k];
    }
    if (p.select == kSelectClosestSample && exp(block_max(max_key, red)) > acc_t(0)) {
      // Gumbel-top-K == sampling without replacement ~ w (unless every w_i is 0: then the K closest)
      const uint64_t step = p.step ? static_cast<uint64_t>(*p.step) : static_cast<uint64_t>(p.step_scalar);
      const uint64_t rkey = damo::stream_key(p.seed, step);
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const float U = damo::uniform(rkey, tid + int64_t(k) * nt);
        key[k] += static_cast<acc_t>(-logf(-logf(U)));
      }
    }
    int32_t mine[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      mine[k] = damo::ordered_bits(static_cast<float>(key[k]));
      if (in[k]) ordered[tid + k * nt] = mine[k];
    }
    __syncthreads();
    // before[k]: the pairs that rank before this thread's k-th pair; one shared-memory read per j serves
    // every slot in use (slots past `items` hold no pair in any thread)
    const int items = static_cast<int>((N + nt - 1) / nt);
    int32_t before[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) before[k] = 0;
    for (int64_t j = 0; j < N; ++j) {
      const int32_t o = ordered[j];
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        if (k < items) before[k] += (o > mine[k]) || (o == mine[k] && j < tid + int64_t(k) * nt);
      }
    }
#pragma unroll
    for (int k = 0; k < kItems; ++k) keep[k] = in[k] && before[k] < p.K;
  }

  // ---- alpha_M and the running mean ----
  acc_t kept = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (keep[k]) kept += p.paper ? A[k] : sigmoid(A[k]);
  }
  kept = block_sum(kept, red);
  acc_t alpha_m, g_new;
  if (p.paper) {
    const acc_t r_bar = kept / acc_t(p.K);
    alpha_m = sigmoid(r_bar) / sigmoid(g);
    g_new = p.gamma * g + (1 - p.gamma) * r_bar;
  } else {
    alpha_m = kept / acc_t(p.K) / sigmoid(g);
    g_new = p.gamma * g + (1 - p.gamma) * sum_a / acc_t(N);
  }
  if (!p.use_m) alpha_m = 1;

  // ---- per-pair beta, loss and derivative; weighted mean over S ----
  acc_t beta_i[kItems], losses[kItems], dl_du[kItems], wt[kItems];
  acc_t denom = 0, num = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = tid + int64_t(k) * nt;
    const acc_t a_d = (in[k] && p.alpha_d) ? p.alpha_d[i * p.s_ad] : acc_t(1);
    beta_i[k] = damo::pair_beta(beta[k], alpha_m, a_d, p.combine_sum, p.rho, p.min_beta);
    damo::pair_loss(u[k], beta_i[k], p.eps, p.loss_kind, losses[k], dl_du[k]);
    wt[k] = keep[k] ? (p.weights ? p.weights[i * p.s_w] : acc_t(1)) : acc_t(0);
    if (in[k]) {  // an unused slot's loss may be inf (0 * inf = NaN)
      denom += wt[k];
      num += wt[k] * losses[k];
    }
  }
  denom = block_sum(denom, red);
  num = block_sum(num, red);

  const acc_t nan = NAN;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (!in[k]) continue;
    const int64_t i = tid + int64_t(k) * nt;
    const acc_t r_w = beta_i[k] * logr_w[k], r_l = beta_i[k] * logr_l[k];
    p.losses[i] = bad ? nan : losses[k];
    p.keep[i] = !bad && keep[k];
    p.beta_out[i] = beta_i[k];
    p.rw[i] = r_w;
    p.rl[i] = r_l;
    p.margins[i] = r_w - r_l;
    p.accuracies[i] = r_w > r_l;
    p.grad_u[i] = bad ? nan : wt[k] / denom * dl_du[k];
    p.dl_du[i] = dl_du[k];
  }
  if (tid == 0) {  // every thread has read g and the step (block_sum synchronized since)
    *p.loss = bad ? nan : num / denom;
    *p.alpha_m = alpha_m;
    *p.g_out = static_cast<float>(bad ? g : g_new);
    if (p.incr_step && p.step) *p.step += 1;
  }
}

// Backward (docs/math.md section 2's gradient, closed form): gu_i = g_loss * grad_u_i + g_losses_i * dl_du_i for
// the grad of pc and rr, -gu_i for pr and rc (neg may be null). g_loss / g_losses may be null (undefined
// gradients); g_losses has stride s_gls (0 for an expanded gradient).
template <typename acc_t>
__global__ void damo_step_bwd_kernel(const acc_t* grad_u, const acc_t* dl_du, const acc_t* g_loss,
                                     const acc_t* g_losses, int64_t s_gls, acc_t* pos, acc_t* neg, int64_t N) {
  const acc_t gl = g_loss ? *g_loss : acc_t(0);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N; i += int64_t(blockDim.x) * gridDim.x) {
    const acc_t v = gl * grad_u[i] + (g_losses ? g_losses[i * s_gls] * dl_du[i] : acc_t(0));
    pos[i] = v;
    if (neg) neg[i] = -v;
  }
}

// Threads and dynamic shared memory of the launch for n pairs.
inline int damo_step_threads(int64_t n) {
  return static_cast<int>(n >= kThreads ? kThreads : (n + 31) / 32 * 32);
}
inline size_t damo_step_smem(int64_t n, int64_t select) {
  return select == 0 ? 0 : static_cast<size_t>(n) * sizeof(int32_t);
}

}  // namespace cuda
}  // namespace mmalign
