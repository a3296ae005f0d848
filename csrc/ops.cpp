// mmalign._C: operator schemas (TORCH_LIBRARY), argument checks, and the Python module stub.
// Device kernels register themselves in csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL);
// fake (meta) kernels for torch.compile live in mmalign/ops/_fake.py.
#include <Python.h>
#include <torch/library.h>

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

}  // namespace mmalign

TORCH_LIBRARY(mmalign, m) {
  // Returns (token_logps, lse), both (B, T) in the accumulation dtype.
  m.def("token_logps_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  // Gradient w.r.t. logits, a new contiguous (B, T, V) tensor in the logits' dtype.
  m.def("token_logps_bwd(Tensor grad, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
  // Same, written over `logits` itself (saves one logits-sized allocation).
  m.def("token_logps_bwd_(Tensor(a!) logits, Tensor grad, Tensor labels, Tensor lse, int ignore_index) -> ()");
}
