// CUDA kernel of the fused DAMO step (SPEC.md sections 2, 3, 5): the whole step in one thread block,
// launched from C++ (no Python launcher on the way), for batches of up to kMaxN pairs.
//
// Each thread holds up to kItems pairs (pair i = threadIdx.x + k * blockDim.x) in registers. Block
// sums are a warp-shuffle tree and then a sum of the 32 warp partials that every thread reads in the
// same order: deterministic, the same bits on every rank and every run. The kept set: each pair's key
// goes to shared memory as float32-ordered bits, and pair i is kept when fewer than K pairs rank before
// it (a larger key, or the same key and a lower index): the K largest, ties towards the lower index,
// as in the Triton and CPU kernels. The per-pair math is theirs too (csrc/damo_step_math.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

#include "../damo_step.h"
#include "../damo_step_math.h"

namespace mmalign {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kItems = 8;
constexpr int64_t kMaxN = int64_t(kThreads) * kItems;  // 8192, as one Triton program (MAX_FUSED_N)

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
  bool paper, use_m, use_d, combine_sum, incr_step;
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
  extern __shared__ int32_t ordered[];  // (N,) float32-ordered ranking keys
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
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = tid + int64_t(k) * nt;
      int64_t before = 0;  // pairs that rank before pair i
      if (in[k]) {
        for (int64_t j = 0; j < N; ++j) {
          const int32_t o = ordered[j];
          before += (o > mine[k]) || (o == mine[k] && j < i);
        }
      }
      keep[k] = in[k] && before < p.K;
    }
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
    const acc_t a_d = (in[k] && p.use_d) ? p.alpha_d[i * p.s_ad] : acc_t(1);
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

// An optional (N,) tensor as acc_t values (converted when its dtype differs) and its stride.
template <typename acc_t>
std::pair<std::optional<at::Tensor>, int64_t> as_acc(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {std::nullopt, 0};
  const auto st = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor v = t->scalar_type() == st ? *t : t->to(st);
  return {v, v.stride(0)};
}

}  // namespace

DamoStepTuple damo_step_fwd(MMALIGN_DAMO_STEP_PARAMS) {
  const DamoStepArgs a = MMALIGN_DAMO_STEP_BUNDLE;
  check_damo_step_args(a, "mmalign::damo_step_fwd");
  const int64_t N = pc.size(0);
  TORCH_CHECK(N <= kMaxN, "mmalign::damo_step_fwd: policy_chosen_logps: the CUDA kernel holds at most ", kMaxN,
              " pairs (one thread block), got N = ", N, "; larger batches run the Triton multi-program path "
              "(backend='triton')");
  TORCH_CHECK(!check, "mmalign::damo_step_fwd: check: the in-kernel input check is CPU-only (on CUDA, "
              "mmalign.functional checks the values before the launch)");
  const c10::cuda::CUDAGuard guard(pc.device());
  const DamoStepOutputs o = empty_damo_step_outputs(pc);
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (N + 31) / 32 * 32));
  const size_t smem = a.select == kSelectAll ? 0 : static_cast<size_t>(N) * sizeof(int32_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc.scalar_type(), "damo_step_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto [beta_v, s_beta] = as_acc<acc_t>(beta);
    const auto [ad_v, s_ad] = as_acc<acc_t>(alpha_d);
    const auto [w_v, s_w] = as_acc<acc_t>(weights);
    StepParams<scalar_t, acc_t> p{};
    p.pc = pc.const_data_ptr<scalar_t>();
    p.pr = pr.const_data_ptr<scalar_t>();
    p.rc = rc.const_data_ptr<scalar_t>();
    p.rr = rr.const_data_ptr<scalar_t>();
    p.s_pc = pc.stride(0);
    p.s_pr = pr.stride(0);
    p.s_rc = rc.stride(0);
    p.s_rr = rr.stride(0);
    p.beta = beta_v ? beta_v->const_data_ptr<acc_t>() : nullptr;
    p.s_beta = s_beta;
    p.beta_scalar = static_cast<acc_t>(beta_scalar);
    p.alpha_d = ad_v ? ad_v->const_data_ptr<acc_t>() : nullptr;
    p.s_ad = s_ad;
    p.use_d = ad_v.has_value();
    p.weights = w_v ? w_v->const_data_ptr<acc_t>() : nullptr;
    p.s_w = s_w;
    p.g = g.const_data_ptr<float>();
    p.g_out = g_out.mutable_data_ptr<float>();
    p.step = step.has_value() ? step->mutable_data_ptr<int64_t>() : nullptr;
    p.step_scalar = step_scalar;
    p.seed = seed;
    p.N = N;
    p.K = K;
    p.gamma = static_cast<acc_t>(gamma);
    p.rho = static_cast<acc_t>(rho);
    p.eps = static_cast<acc_t>(eps);
    p.min_beta = static_cast<acc_t>(min_beta);
    p.paper = paper;
    p.use_m = use_m;
    p.combine_sum = combine_sum;
    p.incr_step = incr_step;
    p.select = select;
    p.loss_kind = loss_kind;
    p.loss = o.loss.mutable_data_ptr<acc_t>();
    p.losses = o.losses.mutable_data_ptr<acc_t>();
    p.beta_out = o.beta.mutable_data_ptr<acc_t>();
    p.rw = o.rw.mutable_data_ptr<acc_t>();
    p.rl = o.rl.mutable_data_ptr<acc_t>();
    p.margins = o.margins.mutable_data_ptr<acc_t>();
    p.grad_u = o.grad_u.mutable_data_ptr<acc_t>();
    p.dl_du = o.dl_du.mutable_data_ptr<acc_t>();
    p.alpha_m = o.alpha_m.mutable_data_ptr<acc_t>();
    p.keep = o.keep.mutable_data_ptr<bool>();
    p.accuracies = o.accuracies.mutable_data_ptr<bool>();
    damo_step_kernel<scalar_t, acc_t><<<1, threads, smem, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return as_tuple(o);
}

}  // namespace cuda
}  // namespace mmalign

TORCH_LIBRARY_IMPL(mmalign, CUDA, m) {
  m.impl("damo_step_fwd", &mmalign::cuda::damo_step_fwd);
}
