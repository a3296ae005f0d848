// Per-pair math of the DAMO step that the C++ CPU kernel (csrc/cpu/damo_step.cpp) and the CUDA kernel
// (csrc/cuda/damo_step.cu) share, host and device: the random numbers, the ranking keys and their
// float32 ordering, the model-aware A_i, beta_i and the per-pair loss. The Triton kernels
// (mmalign/ops/damo_step_triton.py) compute the same expressions, so every backend keeps the same pairs.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define MMALIGN_HD __host__ __device__ __forceinline__
#else
#define MMALIGN_HD inline
#endif

namespace mmalign {

// The kept-set rules (the SELECT codes of mmalign/ops/limits.py: tests/ops/test_limits.py compares).
enum DamoSelect : int64_t { kSelectAll = 0, kSelectClosest = 1, kSelectClosestSample = 2, kSelectBottom = 3, kSelectTop = 4 };

namespace damo {

MMALIGN_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The key of the random stream of (seed, step): U_i = uniform(stream_key(seed, step), i).
MMALIGN_HD uint64_t stream_key(int64_t seed, uint64_t step) {
  return mix64(mix64(static_cast<uint64_t>(seed)) + step);
}

// U_i in (0, 1), float32 (uniforms_reference in mmalign/ops/damo_step.py).
MMALIGN_HD float uniform(uint64_t key, int64_t i) {
  const uint64_t z = mix64(key + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ULL);
  return (static_cast<float>(z >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// key rounded to float32, as an int32 whose order is the float order (larger key, larger int).
MMALIGN_HD int32_t ordered_bits(float key) {
#ifdef __CUDA_ARCH__
  const int32_t kb = __float_as_int(key);
#else
  int32_t kb;
  std::memcpy(&kb, &key, sizeof(kb));
#endif
  return kb < 0 ? (kb ^ 0x7FFFFFFF) : kb;
}

// A_i: the margin u ("official"), or R-hat = beta u / g (beta u while |g| < 1e-6, "paper").
template <typename T>
MMALIGN_HD T model_aware(T u, T beta, T g, bool paper) {
  if (!paper) return u;
  const T R = beta * u;
  return (g < T(1e-6) && g > T(-1e-6)) ? R : R / g;
}

// The ranking key before Gumbel noise: the kept set is the K largest.
template <typename T>
MMALIGN_HD T selection_key(T A, T g, int64_t select, bool paper) {
  const T d = A - g;
  return select == kSelectBottom ? -A : select == kSelectTop ? A : paper ? -d * d : -d * d / 2;
}

// beta_i = max(beta * alpha, min_beta), alpha = alpha_D,i * alpha_M or (1 - rho) alpha_M + rho alpha_D,i.
template <typename T>
MMALIGN_HD T pair_beta(T beta, T alpha_m, T alpha_d, bool combine_sum, T rho, T min_beta) {
  const T alpha = combine_sum ? (1 - rho) * alpha_m + rho * alpha_d : alpha_d * alpha_m;
  const T b = beta * alpha;
  return b < min_beta ? min_beta : b;  // std::max's NaN behaviour: NaN stays NaN
}

// The sigmoid loss (label smoothing eps) and dl/du from m = beta_i u, e = exp(-|m|) and log1p(e): one
// exp and one log1p serve logsigmoid(+-m) = min(+-m, 0) - log1p(e) and sigmoid(|m|) = 1 / (1 + e), all
// without cancellation.
template <typename T>
MMALIGN_HD void sigmoid_loss(T m, T e, T l1pe, T beta_i, T eps, T& loss, T& dl_du) {
  const T inv = T(1) / (T(1) + e);
  const T sig = m >= 0 ? inv : e * inv, sig_neg = m >= 0 ? e * inv : inv;
  const T min_pos = T(0) < m ? T(0) : m, min_neg = T(0) < -m ? T(0) : -m;  // std::min(+-m, 0), NaN kept
  loss = -(1 - eps) * (min_pos - l1pe) - eps * (min_neg - l1pe);
  dl_du = beta_i * (-(1 - eps) * sig_neg + eps * sig);
}

// The per-pair loss l(beta_i, u) of docs/math.md section 2 and dl/du: sigmoid (kind 0), ipo (1), hinge (2).
template <typename T>
MMALIGN_HD void pair_loss(T u, T beta_i, T eps, int64_t kind, T& loss, T& dl_du) {
  using std::exp;
  using std::log1p;
  const T m = beta_i * u;
  if (kind == 0) {
    const T e = exp(-(m < 0 ? -m : m));
    sigmoid_loss(m, e, T(log1p(e)), beta_i, eps, loss, dl_du);
  } else if (kind == 1) {
    const T d = u - 1 / (2 * beta_i);
    loss = d * d;
    dl_du = 2 * d;
  } else {
    loss = 1 - m < 0 ? T(0) : 1 - m;  // NaN kept
    dl_du = 1 - m > 0 ? -beta_i : T(0);
  }
}

}  // namespace damo
}  // namespace mmalign
