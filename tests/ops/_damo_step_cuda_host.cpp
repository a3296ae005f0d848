// Host build of the CUDA DAMO step kernel (csrc/cuda/damo_step_kernel.cuh against csrc/cuda/simt_host.h)
// behind a C entry point for ctypes: tests/ops/test_damo_step_cuda_kernel.py runs it against the
// reference. float32 or float64 inputs (acc type = input type), contiguous arrays.
#include <cstdint>

#include "cuda/damo_step_kernel.cuh"

namespace {

template <typename T>
void run(int64_t N, const void* pc, const void* pr, const void* rc, const void* rr, const void* beta,
         double beta_scalar, const void* alpha_d, const void* weights, const float* g, float* g_out, int64_t* step,
         int64_t step_scalar, int64_t seed, int64_t K, double gamma, double rho, double eps, double min_beta,
         int paper, int64_t select, int64_t loss_kind, int use_m, int combine_sum, int incr_step, void* loss,
         void* losses, bool* keep, void* beta_out, void* rw, void* rl, void* margins, bool* accuracies,
         void* grad_u, void* dl_du, void* alpha_m) {
  using namespace mmalign::cuda;
  const auto in = [](const void* p) { return static_cast<const T*>(p); };
  const auto out = [](void* p) { return static_cast<T*>(p); };
  StepParams<T, T> p{};
  p.pc = in(pc), p.pr = in(pr), p.rc = in(rc), p.rr = in(rr);
  p.s_pc = p.s_pr = p.s_rc = p.s_rr = 1;
  p.beta = in(beta), p.s_beta = 1, p.beta_scalar = static_cast<T>(beta_scalar);
  p.alpha_d = in(alpha_d), p.s_ad = 1;
  p.weights = in(weights), p.s_w = 1;
  p.g = g, p.g_out = g_out, p.step = step, p.step_scalar = step_scalar, p.seed = seed, p.N = N, p.K = K;
  p.gamma = static_cast<T>(gamma), p.rho = static_cast<T>(rho), p.eps = static_cast<T>(eps);
  p.min_beta = static_cast<T>(min_beta);
  p.paper = paper, p.use_m = use_m, p.combine_sum = combine_sum, p.incr_step = incr_step;
  p.select = select, p.loss_kind = loss_kind;
  p.loss = out(loss), p.losses = out(losses), p.beta_out = out(beta_out), p.rw = out(rw), p.rl = out(rl);
  p.margins = out(margins), p.grad_u = out(grad_u), p.dl_du = out(dl_du), p.alpha_m = out(alpha_m);
  p.keep = keep, p.accuracies = accuracies;
  mmalign::simt::launch(damo_step_threads(N), damo_step_smem(N, select), [&p] { damo_step_kernel<T, T>(p); });
}

}  // namespace

extern "C" int damo_step_host(int fp64, int64_t N, const void* pc, const void* pr, const void* rc, const void* rr,
                              const void* beta, double beta_scalar, const void* alpha_d, const void* weights,
                              const float* g, float* g_out, int64_t* step, int64_t step_scalar, int64_t seed,
                              int64_t K, double gamma, double rho, double eps, double min_beta, int paper,
                              int64_t select, int64_t loss_kind, int use_m, int combine_sum, int incr_step,
                              void* loss, void* losses, bool* keep, void* beta_out, void* rw, void* rl, void* margins,
                              bool* accuracies, void* grad_u, void* dl_du, void* alpha_m) {
  if (N < 1 || N > mmalign::cuda::kMaxN) return 1;
  (fp64 ? run<double> : run<float>)(N, pc, pr, rc, rr, beta, beta_scalar, alpha_d, weights, g, g_out, step,
                                    step_scalar, seed, K, gamma, rho, eps, min_beta, paper, select, loss_kind, use_m,
                                    combine_sum, incr_step, loss, losses, keep, beta_out, rw, rl, margins, accuracies,
                                    grad_u, dl_du, alpha_m);
  return 0;
}

// The backward kernel, float64: pos (and neg when given) from grad_u, dl_du, g_loss, g_losses (nullable).
extern "C" void damo_step_bwd_host(int64_t N, const double* grad_u, const double* dl_du, const double* g_loss,
                                   const double* g_losses, int64_t s_gls, double* pos, double* neg, int threads) {
  mmalign::simt::launch(threads, 0, [&] {
    mmalign::cuda::damo_step_bwd_kernel<double>(grad_u, dl_du, g_loss, g_losses, s_gls, pos, neg, N);
  });
}
