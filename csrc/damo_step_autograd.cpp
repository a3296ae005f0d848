// mmalign::damo_step: the fused DAMO step with its gradient, all in C++ (no Python on the way).
//
// The Autograd kernel wraps mmalign::damo_step_fwd (whichever device kernel the dispatcher finds for
// the inputs) in a torch::autograd::Function. The forward kernel already computes d loss / d u_i and
// d l_i / d u_i (closed form, SPEC.md section 2), so backward is one multiply-add per pair:
//   u = (pc - rc) - (pr - rr)  ->  grad pc = grad rr = gu,  grad pr = grad rc = -gu,
//   gu = grad_loss * (d loss / d u) + grad_losses * (d l / d u).
// beta_i, alpha_D, the weights and the kept set are constants for the gradient (SPEC.md section 3).
// The CompositeExplicitAutograd kernel serves calls that bypass autograd (inference mode, no_grad
// tensors without autograd keys).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

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

class DamoStepFunction : public torch::autograd::Function<DamoStepFunction> {
 public:
  // pc, pr, rc, rr are passed on their own so that autograd sees them as the differentiable inputs.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pc, const at::Tensor& pr,
                               const at::Tensor& rc, const at::Tensor& rr, const DamoStepArgs& a) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, losses, keep, beta, rw, rl, margins, acc, grad_u, dl_du, alpha_m] = call_fwd(a);
    ctx->set_materialize_grads(false);  // unused outputs get no zero-filled gradients
    ctx->save_for_backward({grad_u, dl_du});
    ctx->mark_non_differentiable({keep, beta, rw, rl, margins, acc, alpha_m});
    return {loss, losses, keep, beta, rw, rl, margins, acc, alpha_m};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_u = saved[0];
    const at::Tensor& dl_du = saved[1];
    at::Tensor gu;
    if (grads[0].defined()) gu = grad_u.mul(grads[0]);
    if (grads[1].defined()) gu = gu.defined() ? gu.addcmul(grads[1], dl_du) : grads[1].mul(dl_du);
    if (!gu.defined()) gu = at::zeros_like(grad_u);
    const at::Tensor neg = (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) ? gu.neg() : at::Tensor();
    return {ctx->needs_input_grad(0) ? gu : at::Tensor(), neg, neg, ctx->needs_input_grad(3) ? gu : at::Tensor(),
            at::Tensor()};
  }
};

// kAutograd: through DamoStepFunction (the Autograd kernel); else the forward alone.
template <bool kAutograd>
Outputs9 damo_step(const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,
                   const std::optional<at::Tensor>& beta, double beta_scalar, const std::optional<at::Tensor>& alpha_d,
                   const std::optional<at::Tensor>& weights, const at::Tensor& g, const at::Tensor& g_out,
                   const std::optional<at::Tensor>& step, int64_t step_scalar, int64_t seed, int64_t K, double gamma,
                   double rho, double eps, double min_beta, bool paper, int64_t select, int64_t loss_kind, bool use_m,
                   bool combine_sum, bool incr_step, bool check) {
  const DamoStepArgs a{pc, pr, rc, rr, beta, beta_scalar, alpha_d, weights, g, g_out, step, step_scalar, seed, K,
                       gamma, rho, eps, min_beta, paper, select, loss_kind, use_m, combine_sum, incr_step, check};
  if constexpr (kAutograd) {
    auto o = DamoStepFunction::apply(pc, pr, rc, rr, a);
    return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8]};
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
