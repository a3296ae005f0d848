// The fused DAMO step (docs/math.md sections 2, 3, 5): shared argument bundle and checks.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

#include "damo_step_math.h"

namespace mmalign {

struct DamoStepArgs {
  const at::Tensor& pc;
  const at::Tensor& pr;
  const at::Tensor& rc;
  const at::Tensor& rr;
  const std::optional<at::Tensor>& beta;  // (N,), any stride; beta_scalar when absent
  double beta_scalar;
  const std::optional<at::Tensor>& alpha_d;  // (N,) or absent (alpha_D = 1)
  const std::optional<at::Tensor>& weights;  // (N,) or absent
  const at::Tensor& g;                       // 0-dim running mean, read
  const at::Tensor& g_out;                   // 0-dim, written (may be g)
  const std::optional<at::Tensor>& step;     // 0-dim int64 read (and incremented), or step_scalar
  int64_t step_scalar;
  int64_t seed;
  int64_t K;
  double gamma, rho, eps, min_beta;
  bool paper;
  int64_t select, loss_kind;
  bool use_m, combine_sum, incr_step;
  bool check;  // raise on non-finite inputs or beta <= 0 (ValueError naming the argument)
};

struct DamoStepOutputs {
  at::Tensor loss, losses, keep, beta, rw, rl, margins, accuracies, grad_u, dl_du, alpha_m;
};

// damo_step_fwd's outputs: (loss, losses, keep, beta_i, chosen_rewards, rejected_rewards, margins,
// accuracies, d loss / d u, d l_i / d u_i, alpha_M).
using DamoStepTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The parameters of the damo_step operators in schema order (csrc/ops.cpp), for every unboxed kernel
// of them, and their bundle.
#define MMALIGN_DAMO_STEP_PARAMS                                                                              \
  const at::Tensor& pc, const at::Tensor& pr, const at::Tensor& rc, const at::Tensor& rr,                     \
      const std::optional<at::Tensor>& beta, double beta_scalar, const std::optional<at::Tensor>& alpha_d,    \
      const std::optional<at::Tensor>& weights, const at::Tensor& g, const at::Tensor& g_out,                 \
      const std::optional<at::Tensor>& step, int64_t step_scalar, int64_t seed, int64_t K, double gamma,      \
      double rho, double eps, double min_beta, bool paper, int64_t select, int64_t loss_kind, bool use_m,     \
      bool combine_sum, bool incr_step, bool check
#define MMALIGN_DAMO_STEP_BUNDLE                                                                              \
  ::mmalign::DamoStepArgs{pc,    pr,  rc,  rr,       beta,  beta_scalar, alpha_d,   weights, g,           \
                          g_out, step, step_scalar, seed, K, gamma, rho, eps, min_beta, paper, select,      \
                          loss_kind, use_m, combine_sum, incr_step, check}

// The C++ signature of mmalign::damo_step_fwd (every kernel of it, and the autograd op that calls it).
using DamoStepFwdFn = DamoStepTuple(MMALIGN_DAMO_STEP_PARAMS);

void check_damo_step_args(const DamoStepArgs& a, const char* op);

// Fresh outputs for a batch like pc (float64 for float64 inputs, else float32; bools for the masks), and
// the operator's tuple of them.
DamoStepOutputs empty_damo_step_outputs(const at::Tensor& pc);
DamoStepTuple as_tuple(const DamoStepOutputs& o);

#ifdef MMALIGN_WITH_CUDA
namespace cuda {
// The backward of the C++ autograd op on CUDA tensors, one kernel: (gu, -gu or undefined), gu =
// g_loss * grad_u + g_losses * dl_du (either gradient may be undefined).
std::pair<at::Tensor, at::Tensor> damo_step_backward(const at::Tensor& grad_u, const at::Tensor& dl_du,
                                                     const at::Tensor& g_loss, const at::Tensor& g_losses,
                                                     bool need_neg);
}  // namespace cuda
#endif

}  // namespace mmalign
