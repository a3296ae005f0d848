// mmalign._C: operator schemas (TORCH_LIBRARY), argument checks, and the Python module stub.
// Device kernels register themselves in csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL);
// fake (meta) kernels for torch.compile live in mmalign/ops/_fake.py.
#include <Python.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "damo_step.h"
#include "token_logps.h"

extern "C" {
// Importing mmalign._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mmalign compiled operators", -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace mmalign {

void check_token_logps_args(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits: expected shape (B, T, V), got ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": logits: expected float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(logits.size(2) > 0, op, ": logits: vocabulary size V must be > 0");
  TORCH_CHECK(logits.size(2) == 1 || logits.stride(2) == 1, op,
              ": logits: the vocabulary dimension must be contiguous (stride 1), got strides ", logits.strides());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels: expected int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1), op,
              ": labels: expected shape (B, T) = (", logits.size(0), ", ", logits.size(1), "), got ", labels.sizes());
  TORCH_CHECK(labels.is_contiguous(), op, ": labels: expected a contiguous tensor");
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels: expected device ", logits.device(), ", got ",
              labels.device());
}

at::ScalarType token_logps_acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_token_logps_bwd_args(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& lse, const char* op) {
  check_token_logps_args(logits, labels, op);
  const auto acc = token_logps_acc_type(logits);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad", grad}, {"lse", lse}}) {
    TORCH_CHECK(t.sizes() == labels.sizes(), op, ": ", name, ": expected shape ", labels.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, ": expected ", acc, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, ": expected a contiguous tensor");
    TORCH_CHECK(t.device() == logits.device(), op, ": ", name, ": expected device ", logits.device());
  }
}

void check_damo_step_args(const DamoStepArgs& a, const char* op) {
  const char* names[] = {"policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"};
  const at::Tensor* ts[] = {&a.pc, &a.pr, &a.rc, &a.rr};
  TORCH_CHECK(a.pc.dim() == 1 && a.pc.size(0) > 0, op, ": ", names[0], ": expected shape (N,) with N > 0, got ",
              a.pc.sizes());
  const int64_t N = a.pc.size(0);
  for (int k = 0; k < 4; ++k) {
    TORCH_CHECK(ts[k]->sizes() == a.pc.sizes(), op, ": ", names[k], ": expected shape (", N, "), got ", ts[k]->sizes());
    TORCH_CHECK(ts[k]->scalar_type() == a.pc.scalar_type(), op, ": ", names[k], ": expected dtype ",
                a.pc.scalar_type(), ", got ", ts[k]->scalar_type());
    TORCH_CHECK(ts[k]->device() == a.pc.device(), op, ": ", names[k], ": expected device ", a.pc.device());
  }
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>&>{"beta", a.beta},
                                {"alpha_d", a.alpha_d}, {"weights", a.weights}}) {
    if (t.has_value()) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == N, op, ": ", name, ": expected shape (", N, "), got ", t->sizes());
      TORCH_CHECK(t->device() == a.pc.device(), op, ": ", name, ": expected device ", a.pc.device());
    }
  }
  TORCH_CHECK(a.g.dim() == 0 && a.g_out.dim() == 0, op, ": running_mean: expected a 0-dim tensor");
  TORCH_CHECK(a.g.scalar_type() == at::kFloat && a.g_out.scalar_type() == at::kFloat, op,
              ": running_mean: expected float32, got ", a.g_out.scalar_type());
  TORCH_CHECK(!a.step.has_value() || (a.step->dim() == 0 && a.step->scalar_type() == at::kLong), op,
              ": step: expected a 0-dim int64 tensor");
  TORCH_CHECK(a.K >= 1 && a.K <= N, op, ": keep: expected 1 <= K <= N = ", N, ", got K = ", a.K);
  TORCH_CHECK(a.select >= kSelectAll && a.select <= kSelectTop, op, ": select: expected a code in [0, 4], got ", a.select);
  TORCH_CHECK(a.loss_kind >= 0 && a.loss_kind <= 2, op, ": loss_type: expected a code in [0, 2], got ", a.loss_kind);
}

DamoStepOutputs empty_damo_step_outputs(const at::Tensor& pc) {
  const int64_t N = pc.size(0);
  const auto opts = pc.options().dtype(pc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const auto vec = [&] { return at::empty({N}, opts); };
  const auto mask = [&] { return at::empty({N}, opts.dtype(at::kBool)); };
  return {at::empty({}, opts), vec(), mask(), vec(), vec(), vec(), vec(), mask(), vec(), vec(), at::empty({}, opts)};
}

DamoStepTuple as_tuple(const DamoStepOutputs& o) {
  return {o.loss, o.losses, o.keep, o.beta, o.rw, o.rl, o.margins, o.accuracies, o.grad_u, o.dl_du, o.alpha_m};
}

}  // namespace mmalign

TORCH_LIBRARY(mmalign, m) {
  // Returns (token_logps, lse), both (B, T) in the accumulation dtype.
  m.def("token_logps_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  // Gradient w.r.t. logits, a new contiguous (B, T, V) tensor in the logits' dtype.
  m.def("token_logps_bwd(Tensor grad, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
  // Same, written over `logits` itself (saves one logits-sized allocation).
  m.def("token_logps_bwd_(Tensor(a!) logits, Tensor grad, Tensor labels, Tensor lse, int ignore_index) -> ()");
  // The fused DAMO step: (loss, losses, keep, beta_i, chosen_rewards, rejected_rewards, margins, accuracies,
  // dloss/du, dl_i/du_i, alpha_M); writes the updated running mean into g_out and, with incr_step, step += 1.
  // With check, non-finite inputs or beta <= 0 raise ValueError naming the argument, before anything is written.
#define MMALIGN_DAMO_STEP_ARGS                                                                               \
  "(Tensor pc, Tensor pr, Tensor rc, Tensor rr, Tensor? beta, float beta_scalar, Tensor? alpha_d, Tensor? weights, " \
  "Tensor g, Tensor(a!) g_out, Tensor(b!)? step, int step_scalar, int seed, int K, float gamma, float rho, "         \
  "float eps, float min_beta, bool paper, int select, int loss_kind, bool use_m, bool combine_sum, bool incr_step, " \
  "bool check)"
  m.def("damo_step_fwd" MMALIGN_DAMO_STEP_ARGS " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
  // The same step with its gradient (csrc/damo_step_autograd.cpp): (loss, losses, keep, beta_i, chosen_rewards,
  // rejected_rewards, margins, accuracies, alpha_M); differentiable w.r.t. pc, pr, rc, rr through loss and losses.
  m.def("damo_step" MMALIGN_DAMO_STEP_ARGS " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
#undef MMALIGN_DAMO_STEP_ARGS
}
