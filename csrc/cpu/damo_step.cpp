// CPU kernel of the fused DAMO step (docs/math.md sections 2, 3, 5); mirrors _damo_step_kernel in
// mmalign/ops/damo_step_triton.py, and shares its per-pair math with the CUDA kernel (damo_step_math.h):
// same keys, same float32 ordering with ties towards the lower index, same counter-based random numbers,
// so every backend keeps the same pairs. The per-pair loss shares one exp and one log1p between
// logsigmoid(+-m) and sigmoid(+-m) (the same values, fewer transcendentals), and long batches run their
// transcendentals through ATen's vectorized kernels (apply_math).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/log.h>
#include <ATen/ops/log1p.h>
#include <ATen/ops/sigmoid.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../damo_step.h"
#include "../damo_step_math.h"

namespace mmalign {
namespace cpu {
namespace {

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Order-preserving int64 of (float32 key, index): larger key first, then lower index.
inline int64_t rank_key(float key, int64_t i, int64_t block) {
  return (static_cast<int64_t>(damo::ordered_bits(key)) << 32) | (block - 1 - i);
}

// x - x is 0 for finite x and NaN for +-inf and NaN: a test the compiler vectorizes (no -ffast-math here)
template <typename T>
inline bool finite(T x) {
  return (x - x) == T(0);
}

// n values as acc_t: a view of the caller's memory when it already is contiguous acc_t, else a copy.
template <typename acc_t>
struct Values {
  std::vector<acc_t> store;
  const acc_t* p = nullptr;
  acc_t operator[](int64_t i) const { return p[i]; }
  const acc_t* data() const { return p; }
};

// n values at ptr, stride st (one copy-convert pass when contiguous and of another dtype).
template <typename acc_t, typename scalar_t>
Values<acc_t> to_acc(const scalar_t* ptr, int64_t n, int64_t st) {
  Values<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (st == 1) {
      v.p = ptr;
      return v;
    }
  }
  if (st == 1) {
    v.store.assign(ptr, ptr + n);
  } else {
    v.store.resize(n);
    for (int64_t i = 0; i < n; ++i) v.store[i] = static_cast<acc_t>(ptr[i * st]);
  }
  v.p = v.store.data();
  return v;
}

// An optional (N,) tensor of any float dtype and stride as acc_t values; absent: `fill` for every pair
// (fill_absent) or no values at all (data() is null).
template <typename acc_t>
Values<acc_t> load_vec(const std::optional<at::Tensor>& t, int64_t N, acc_t fill, bool fill_absent = true) {
  Values<acc_t> v;
  if (!t.has_value()) {
    if (fill_absent) {
      v.store.assign(N, fill);
      v.p = v.store.data();
    }
    return v;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "damo_step_load", [&] {
    v = to_acc<acc_t>(t->const_data_ptr<scalar_t>(), N, t->stride(0));
  });
  return v;
}

// In-place elementwise math on a buffer of n values. Long buffers go through ATen's own vectorized
// (SLEEF) kernels on a from_blob view, short ones through the scalar libm loop: a transcendental costs
// ~10 ns scalar on the 2-core test machine, and a dispatched ATen op ~3 us of fixed cost.
constexpr int64_t kVectorMathMin = 512;

template <typename T, typename Scalar, typename Aten>
void apply_math(std::vector<T>& v, Scalar scalar, Aten aten) {
  const int64_t n = static_cast<int64_t>(v.size());
  if (n >= kVectorMathMin) {
    at::Tensor t = at::from_blob(v.data(), {n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    aten(t);
  } else {
    for (T& x : v) x = scalar(x);
  }
}

template <typename T>
void exp_(std::vector<T>& v) {
  apply_math(v, [](T x) { return std::exp(x); }, [](at::Tensor& t) { t.exp_(); });
}

template <typename T>
void log_(std::vector<T>& v) {
  apply_math(v, [](T x) { return std::log(x); }, [](at::Tensor& t) { t.log_(); });
}

template <typename T>
void log1p_(std::vector<T>& v) {
  apply_math(v, [](T x) { return std::log1p(x); }, [](at::Tensor& t) { t.log1p_(); });
}

template <typename T>
void sigmoid_(std::vector<T>& v) {
  apply_math(v, [](T x) { return sigmoid(x); }, [](at::Tensor& t) { t.sigmoid_(); });
}

// The functional API's message (mmalign/functional.py, _check_pair_inputs), raised as ValueError.
template <typename acc_t>
void check_finite(const char* name, const acc_t* x, int64_t n) {
  int64_t n_bad = 0;
#pragma omp simd reduction(+ : n_bad)
  for (int64_t i = 0; i < n; ++i) n_bad += finite(x[i]) ? 0 : 1;
  TORCH_CHECK_VALUE(n_bad == 0, name, ": expected finite values, got NaN or inf (pass check_inputs=False to let "
                    "them propagate: NaN loss, empty mask, g unchanged)");
}

template <typename scalar_t, typename acc_t>
void step_impl(const DamoStepArgs& a, const DamoStepOutputs& o) {
  const int64_t N = a.pc.size(0);
  auto load = [N](const at::Tensor& t) { return to_acc<acc_t>(t.const_data_ptr<scalar_t>(), N, t.stride(0)); };
  const auto pc = load(a.pc), pr = load(a.pr), rc = load(a.rc), rr = load(a.rr);
  const auto beta = load_vec(a.beta, N, static_cast<acc_t>(a.beta_scalar));
  const auto ad = load_vec(a.alpha_d, N, acc_t(1), false);  // null when absent (alpha_D = 1)
  const bool has_w = a.weights.has_value();
  const auto wts = load_vec(a.weights, N, acc_t(1), false);  // null when absent
  const acc_t g = static_cast<acc_t>(*a.g.const_data_ptr<float>());
  if (a.check) {
    check_finite("policy_chosen_logps", pc.data(), N);
    check_finite("policy_rejected_logps", pr.data(), N);
    check_finite("ref_chosen_logps", rc.data(), N);
    check_finite("ref_rejected_logps", rr.data(), N);
    check_finite("running_mean", &g, 1);
    if (a.alpha_d.has_value()) check_finite("alpha_d", ad.data(), N);
    if (has_w) check_finite("weights", wts.data(), N);
    int64_t n_nonpositive = 0;
#pragma omp simd reduction(+ : n_nonpositive)
    for (int64_t i = 0; i < N; ++i) n_nonpositive += beta[i] > 0 ? 0 : 1;
    TORCH_CHECK_VALUE(n_nonpositive == 0, "beta: expected every beta > 0");
  }

  std::vector<acc_t> u(N), A_store(a.paper ? N : 0);  // A is u itself for "official"
  int64_t n_bad = 0;
  {
    const acc_t *PC = pc.data(), *PR = pr.data(), *RC = rc.data(), *RR = rr.data(), *BETA = beta.data();
    acc_t* __restrict__ U = u.data();
    acc_t* __restrict__ AA = A_store.data();
    if (a.paper) {  // the variant is hoisted out of the loops so that each vectorizes
#pragma omp simd reduction(+ : n_bad)
      for (int64_t i = 0; i < N; ++i) {
        U[i] = (PC[i] - RC[i]) - (PR[i] - RR[i]);
        AA[i] = damo::model_aware(U[i], BETA[i], g, true);
        n_bad += finite(AA[i]) ? 0 : 1;
      }
    } else {  // A is u itself
#pragma omp simd reduction(+ : n_bad)
      for (int64_t i = 0; i < N; ++i) {
        U[i] = (PC[i] - RC[i]) - (PR[i] - RR[i]);
        n_bad += finite(U[i]) ? 0 : 1;
      }
    }
  }
  const acc_t* A = a.paper ? A_store.data() : u.data();
  const bool bad = n_bad > 0 || !finite(g);

  // ---- the kept set S ----
  std::vector<char> keep(N, 1);
  if (a.select != kSelectAll) {
    std::vector<acc_t> key(N);
    for (int64_t i = 0; i < N; ++i) key[i] = damo::selection_key(A[i], g, a.select, a.paper);
    if (a.select == kSelectClosestSample) {
      // some w_i = exp(key_i) > 0  <=>  exp(max key) > 0 (one exp instead of N)
      const acc_t max_key = *std::max_element(key.begin(), key.end());
      if (std::exp(max_key) > acc_t(0)) {
        const uint64_t step = a.step.has_value() ? static_cast<uint64_t>(*a.step->const_data_ptr<int64_t>())
                                                 : static_cast<uint64_t>(a.step_scalar);
        const uint64_t rkey = damo::stream_key(a.seed, step);
        std::vector<float> gumbel(N);  // -log(-log(U)), in float32 as in the Triton kernel
        for (int64_t i = 0; i < N; ++i) gumbel[i] = damo::uniform(rkey, i);
        log_(gumbel);
        for (float& x : gumbel) x = -x;
        log_(gumbel);
        for (int64_t i = 0; i < N; ++i) key[i] += static_cast<acc_t>(-gumbel[i]);
      }
    }
    int64_t block = 16;
    while (block < N) block *= 2;
    std::vector<int64_t> comp(N), sorted(N);
    for (int64_t i = 0; i < N; ++i) comp[i] = rank_key(static_cast<float>(key[i]), i, block);
    sorted = comp;
    std::nth_element(sorted.begin(), sorted.begin() + (a.K - 1), sorted.end(), std::greater<int64_t>());
    const int64_t thr = sorted[a.K - 1];
    for (int64_t i = 0; i < N; ++i) keep[i] = comp[i] >= thr;
  }

  // ---- alpha_M and the running mean ----
  acc_t sum_sig = 0, sum_A_kept = 0, sum_A = 0;
  if (a.use_m && !a.paper) {
    std::vector<acc_t> sig(A, A + N);
    sigmoid_(sig);
    for (int64_t i = 0; i < N; ++i) sum_sig += keep[i] ? sig[i] : acc_t(0);
  }
  // the sums are reductions in any order (here SIMD lanes, in Triton a tree): not bit-equal across backends
#pragma omp simd reduction(+ : sum_A_kept, sum_A)
  for (int64_t i = 0; i < N; ++i) {
    sum_A_kept += keep[i] ? A[i] : acc_t(0);
    sum_A += A[i];
  }
  acc_t alpha_m, g_new;
  if (a.paper) {
    const acc_t r_bar = sum_A_kept / a.K;
    alpha_m = sigmoid(r_bar) / sigmoid(g);
    g_new = a.gamma * g + (1 - a.gamma) * r_bar;
  } else {
    alpha_m = sum_sig / a.K / sigmoid(g);
    g_new = a.gamma * g + (1 - a.gamma) * sum_A / N;
  }
  if (!a.use_m) alpha_m = 1;

  // ---- per-pair beta, loss and derivative; weighted mean over S ----
  // written straight into the (distinct, fresh) outputs: __restrict__ lets the loops vectorize
  acc_t* __restrict__ BETA_I = o.beta.mutable_data_ptr<acc_t>();
  acc_t* __restrict__ L = o.losses.mutable_data_ptr<acc_t>();
  acc_t* __restrict__ D = o.dl_du.mutable_data_ptr<acc_t>();
  std::vector<acc_t> mm(N), wt(N);
  {
    const acc_t *BETA = beta.data(), *AD = ad.data(), *U = u.data();
    const acc_t rho = acc_t(a.rho), min_beta = static_cast<acc_t>(a.min_beta);
    const bool combine_sum = a.combine_sum;
    if (AD) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) {
        BETA_I[i] = damo::pair_beta(BETA[i], alpha_m, AD[i], combine_sum, rho, min_beta);
        mm[i] = BETA_I[i] * U[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) {
        BETA_I[i] = damo::pair_beta(BETA[i], alpha_m, acc_t(1), combine_sum, rho, min_beta);
        mm[i] = BETA_I[i] * U[i];
      }
    }
  }
  const acc_t eps = a.eps;
  if (a.loss_kind == 0) {
    // sigmoid loss: e = exp(-|m|) and log1p(e) for the whole batch at once (vectorized when long)
    std::vector<acc_t> e(N);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) e[i] = -std::abs(mm[i]);
    exp_(e);
    std::vector<acc_t> l1pe = e;
    log1p_(l1pe);
    const acc_t *M = mm.data(), *E = e.data(), *LP = l1pe.data();
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) damo::sigmoid_loss(M[i], E[i], LP[i], BETA_I[i], eps, L[i], D[i]);
  } else {  // one loop per loss kind: each vectorizes (the ternaries become blends)
    const acc_t* U = u.data();
    const int64_t kind = a.loss_kind;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) damo::pair_loss(U[i], BETA_I[i], eps, kind, L[i], D[i]);
  }
  acc_t denom = 0, num = 0;
  {
    const acc_t* W = wts.data();
    const char* KP = keep.data();
    if (has_w) {  // W is null without weights: the loops are split, not blended
#pragma omp simd reduction(+ : denom, num)
      for (int64_t i = 0; i < N; ++i) {
        wt[i] = (KP[i] ? acc_t(1) : acc_t(0)) * W[i];
        denom += wt[i];
        num += wt[i] * L[i];
      }
    } else {
#pragma omp simd reduction(+ : denom, num)
      for (int64_t i = 0; i < N; ++i) {
        wt[i] = KP[i] ? acc_t(1) : acc_t(0);
        denom += wt[i];
        num += wt[i] * L[i];
      }
    }
  }
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  bool* __restrict__ KEEP = o.keep.mutable_data_ptr<bool>();
  acc_t* __restrict__ RW = o.rw.mutable_data_ptr<acc_t>();
  acc_t* __restrict__ RL = o.rl.mutable_data_ptr<acc_t>();
  acc_t* __restrict__ MARGINS = o.margins.mutable_data_ptr<acc_t>();
  bool* __restrict__ ACC = o.accuracies.mutable_data_ptr<bool>();
  acc_t* __restrict__ GU = o.grad_u.mutable_data_ptr<acc_t>();
  const acc_t inv_denom = acc_t(1) / denom;
  const acc_t *PC = pc.data(), *PR = pr.data(), *RC = rc.data(), *RR = rr.data();
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) {
    const acc_t rw = BETA_I[i] * (PC[i] - RC[i]), rl = BETA_I[i] * (PR[i] - RR[i]);
    RW[i] = rw;
    RL[i] = rl;
    MARGINS[i] = rw - rl;
    ACC[i] = rw > rl;
    KEEP[i] = keep[i] != 0;
    GU[i] = wt[i] * inv_denom * D[i];
  }
  if (bad) {  // documented propagation: NaN loss, losses and gradient, empty mask
    std::fill(L, L + N, nan);
    std::fill(GU, GU + N, nan);
    std::fill(KEEP, KEEP + N, false);
  }
  *o.loss.mutable_data_ptr<acc_t>() = bad ? nan : num / denom;
  *o.alpha_m.mutable_data_ptr<acc_t>() = alpha_m;
  *a.g_out.mutable_data_ptr<float>() = static_cast<float>(bad ? g : g_new);
  if (a.incr_step && a.step.has_value()) *a.step->mutable_data_ptr<int64_t>() += 1;
}

}  // namespace

DamoStepTuple damo_step_fwd(MMALIGN_DAMO_STEP_PARAMS) {
  const DamoStepArgs a = MMALIGN_DAMO_STEP_BUNDLE;
  check_damo_step_args(a, "mmalign::damo_step_fwd");
  const DamoStepOutputs o = empty_damo_step_outputs(pc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc.scalar_type(), "damo_step_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    step_impl<scalar_t, acc_t>(a, o);
  });
  return as_tuple(o);
}

}  // namespace cpu
}  // namespace mmalign

TORCH_LIBRARY_IMPL(mmalign, CPU, m) {
  m.impl("damo_step_fwd", &mmalign::cpu::damo_step_fwd);
}
