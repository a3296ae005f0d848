// Per-token label log-probabilities (docs/math.md section 1), shared declarations.
//
//   tok[b,t] = z[b,t,y[b,t]] - logsumexp_v z[b,t,v]      (0 where y == ignore_index)
//   grad z[b,t,v] = g[b,t] * (1[v == y[b,t]] - exp(z[b,t,v] - lse[b,t]))   (0 where ignored)
//
// logits: (B, T, V), last dimension contiguous, any strides for B and T; fp32/fp64/fp16/bf16.
// labels: (B, T) int64, contiguous. tok, lse: (B, T) fp32 (fp64 for fp64 logits), contiguous.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <tuple>

namespace mmalign {

// Argument checks shared by every device; `op` names the operator in the error messages.
void check_token_logps_args(const at::Tensor& logits, const at::Tensor& labels, const char* op);
void check_token_logps_bwd_args(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& lse, const char* op);
at::ScalarType token_logps_acc_type(const at::Tensor& logits);

namespace cpu {
std::tuple<at::Tensor, at::Tensor> token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                   int64_t ignore_index);
// Writes the gradient into `out` (B, T, V), which may be `logits` itself (in-place backward).
void token_logps_bwd_into(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index);
}  // namespace cpu

#ifdef MMALIGN_WITH_CUDA
namespace cuda {
std::tuple<at::Tensor, at::Tensor> token_logps_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                   int64_t ignore_index);
void token_logps_bwd_into(const at::Tensor& out, const at::Tensor& grad, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index);
}  // namespace cuda
#endif

using BwdInto = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, int64_t);

// token_logps_bwd for one device: a new contiguous gradient tensor.
template <BwdInto Impl>
at::Tensor token_logps_bwd_alloc(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index) {
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  Impl(out, grad, logits, labels, lse, ignore_index);
  return out;
}

// token_logps_bwd_ for one device: the gradient written over the logits.
template <BwdInto Impl>
void token_logps_bwd_inplace(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index) {
  Impl(logits, grad, logits, labels, lse, ignore_index);
}

}  // namespace mmalign
