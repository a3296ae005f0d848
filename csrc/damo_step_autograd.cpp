// mmalign::damo_step: the fused DAMO step with its gradient, all in C++ (no Python on the way).
//
// The Autograd kernel wraps mmalign::damo_step_fwd (whichever device kernel the dispatcher finds for
// the inputs) in a torch::autograd::Function; its backward is one loop on CPU and one kernel on CUDA
// (ATen ops for tensors seen while tracing). The forward kernel already computes d loss / d u_i and
// d l_i / d u_i (closed form, docs/math.md section 2), so backward is one multiply-add per pair:
//   u = (pc - rc) - (pr - rr)  ->  grad pc = grad rr = gu,  grad pr = grad rc = -gu,
//   gu = grad_loss * (d loss / d u) + grad_losses * (d l / d u).
// beta_i, alpha_D, the weights and the kept set are constants for the gradient (docs/math.md section 3).
// The CompositeExplicitAutograd kernel serves calls that bypass autograd (inference mode, no_grad
// tensors without autograd keys).
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <utility>

#include "damo_step.h"

namespace mmalign {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs9 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor>;

DamoStepTuple call_fwd(const DamoStepArgs& a) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mmalign::damo_step_fwd", "").typed<DamoStepFwdFn>();
  return op.call(a.pc, a.pr, a.rc, a.rr, a.beta, a.beta_scalar, a.alpha_d, a.weights, a.g, a.g_out, a.step,
                 a.step_scalar, a.seed, a.K, a.gamma, a.rho, a.eps, a.min_beta, a.paper, a.select, a.loss_kind,
                 a.use_m, a.combine_sum, a.incr_step, a.check);
}

// A tensor with real data (not a fake, functional or symbolic-shape tensor seen while tracing).
bool plain(const at::Tensor& t) {
  const auto tracing = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize});
  return !t.key_set().has_any(tracing) && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// The non-differentiable outputs (keep, beta_i, rewards, margins, accuracies, alpha_M) leave the
// forward through this holder rather than as Function outputs: they need no autograd metadata.
using Metrics7 = std::array<at::Tensor, 7>;

class DamoStepFunction : public torch::autograd::Function<DamoStepFunction> {
 public:
  // pc, pr, rc, rr are passed on their own so that autograd sees them as the differentiable inputs.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pc, const at::Tensor& pr,
                               const at::Tensor& rc, const at::Tensor& rr, const DamoStepArgs& a, Metrics7* metrics) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, losses, keep, beta, rw, rl, margins, acc, grad_u, dl_du, alpha_m] = call_fwd(a);
    ctx->set_materialize_grads(false);  // an unused output gets no zero-filled gradient
    ctx->save_for_backward({grad_u, dl_du});
    *metrics = {keep, beta, rw, rl, margins, acc, alpha_m};
    return {loss, losses};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_neg = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    auto [gu, neg] = input_grads(saved[0], saved[1], grads[0], grads[1], need_neg);
    return {ctx->needs_input_grad(0) ? gu : at::Tensor(), neg, neg, ctx->needs_input_grad(3) ? gu : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }

 private:
  // gu = g_loss * grad_u + g_losses * dl_du (either gradient may be undefined) and, if asked, -gu.
  static std::pair<at::Tensor, at::Tensor> input_grads(const at::Tensor& grad_u, const at::Tensor& dl_du,
                                                       const at::Tensor& g_loss, const at::Tensor& g_losses,
                                                       bool need_neg) {
    const bool real = plain(grad_u) && (!g_loss.defined() || plain(g_loss)) && (!g_losses.defined() || plain(g_losses));
#ifdef MMALIGN_WITH_CUDA
    if (real && grad_u.is_cuda()) return cuda::damo_step_backward(grad_u, dl_du, g_loss, g_losses, need_neg);
#endif
    if (!real || !grad_u.is_cpu() || (g_loss.defined() && !g_loss.is_cpu()) || (g_losses.defined() && !g_losses.is_cpu())) {
      at::Tensor gu = g_loss.defined() ? grad_u.mul(g_loss) : at::zeros_like(grad_u);
      if (g_losses.defined()) gu = gu.addcmul(g_losses, dl_du);
      return {gu, need_neg ? gu.neg() : at::Tensor()};
    }
    // plain CPU tensors: one pass, no dispatcher round trips (this runs on every training step)
    at::Tensor gu = at::empty_like(grad_u), neg = need_neg ? at::empty_like(grad_u) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(grad_u.scalar_type(), "damo_step_backward", [&] {
      const int64_t N = grad_u.numel();
      const scalar_t* GU = grad_u.const_data_ptr<scalar_t>();
      const scalar_t* DL = dl_du.const_data_ptr<scalar_t>();
      const auto st_u = grad_u.scalar_type();
      const scalar_t gl = !g_loss.defined()                ? scalar_t(0)
                          : g_loss.scalar_type() == st_u ? *g_loss.const_data_ptr<scalar_t>()  // 0-dim
                                                         : g_loss.item().to<scalar_t>();
      const at::Tensor gls = !g_losses.defined() || g_losses.scalar_type() == st_u ? g_losses : g_losses.to(st_u);
      const scalar_t* GLS = gls.defined() ? gls.const_data_ptr<scalar_t>() : nullptr;
      const int64_t st = gls.defined() ? gls.stride(0) : 0;
      scalar_t* P = gu.mutable_data_ptr<scalar_t>();
      scalar_t* M = need_neg ? neg.mutable_data_ptr<scalar_t>() : nullptr;
      for (int64_t i = 0; i < N; ++i) {
        const scalar_t v = gl * GU[i] + (GLS ? GLS[i * st] * DL[i] : scalar_t(0));
        P[i] = v;
        if (M) M[i] = -v;
      }
    });
    return {gu, neg};
  }
};

// kAutograd: through DamoStepFunction (the Autograd kernel); else the forward alone.
template <bool kAutograd>
Outputs9 damo_step(MMALIGN_DAMO_STEP_PARAMS) {
  const DamoStepArgs a = MMALIGN_DAMO_STEP_BUNDLE;
  if constexpr (kAutograd) {
    Metrics7 m;
    auto o = DamoStepFunction::apply(pc, pr, rc, rr, a, &m);
    return {o[0], o[1], m[0], m[1], m[2], m[3], m[4], m[5], m[6]};
  } else {
    auto [loss, losses, keep, beta_i, rw, rl, margins, acc, grad_u, dl_du, alpha_m] = call_fwd(a);
    return {loss, losses, keep, beta_i, rw, rl, margins, acc, alpha_m};
  }
}

}  // namespace
}  // namespace mmalign

TORCH_LIBRARY_IMPL(mmalign, Autograd, m) {
  m.impl("damo_step", &mmalign::damo_step<true>);
}

TORCH_LIBRARY_IMPL(mmalign, CompositeExplicitAutograd, m) {
  m.impl("damo_step", &mmalign::damo_step<false>);
}
