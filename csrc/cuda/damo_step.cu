// CUDA kernel of the fused DAMO step (docs/math.md sections 2, 3, 5): the whole step in one thread block,
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
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

#include "../damo_step.h"
#include "damo_step_kernel.cuh"

namespace mmalign {
namespace cuda {
namespace {

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
  const int threads = damo_step_threads(N);
  const size_t smem = damo_step_smem(N, select);
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

std::pair<at::Tensor, at::Tensor> damo_step_backward(const at::Tensor& grad_u, const at::Tensor& dl_du,
                                                     const at::Tensor& g_loss, const at::Tensor& g_losses,
                                                     bool need_neg) {
  const c10::cuda::CUDAGuard guard(grad_u.device());
  const int64_t N = grad_u.numel();
  const auto st = grad_u.scalar_type();
  const at::Tensor gl = !g_loss.defined() || g_loss.scalar_type() == st ? g_loss : g_loss.to(st);
  const at::Tensor gls = !g_losses.defined() || g_losses.scalar_type() == st ? g_losses : g_losses.to(st);
  at::Tensor pos = at::empty_like(grad_u), neg = need_neg ? at::empty_like(grad_u) : at::Tensor();
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((N + threads - 1) / threads, 1024));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(st, "damo_step_bwd_cuda", [&] {
    damo_step_bwd_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        grad_u.const_data_ptr<scalar_t>(), dl_du.const_data_ptr<scalar_t>(),
        gl.defined() ? gl.const_data_ptr<scalar_t>() : nullptr, gls.defined() ? gls.const_data_ptr<scalar_t>() : nullptr,
        gls.defined() ? gls.stride(0) : 0, pos.mutable_data_ptr<scalar_t>(),
        need_neg ? neg.mutable_data_ptr<scalar_t>() : nullptr, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pos, neg};
}

}  // namespace cuda
}  // namespace mmalign

TORCH_LIBRARY_IMPL(mmalign, CUDA, m) {
  m.impl("damo_step_fwd", &mmalign::cuda::damo_step_fwd);
}
