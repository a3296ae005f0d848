// Host emulation of the CUDA built-ins that csrc/cuda/damo_step_kernel.cuh uses, so that the kernel's own
// code runs in tests on machines without a GPU: one std::thread per CUDA thread of a single block,
// __syncthreads() as a block-wide barrier, __shfl_xor_sync as an exchange through a per-warp buffer
// between two warp-wide barriers, __shared__ variables as function statics (one block runs at a time).
// It checks the kernel's logic (indexing, reductions, the kept set, what is written where), not CUDA's
// memory model or timing. Never compiled by nvcc.
#pragma once
#ifdef __CUDACC__
#error "simt_host.h emulates CUDA on the host; nvcc has the real built-ins"
#endif

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define MMALIGN_EXTERN_SHARED(type, name) type* name = reinterpret_cast<type*>(::mmalign::simt::dynamic_shared())

namespace mmalign {
namespace simt {

struct Dim {
  unsigned x = 1, y = 1, z = 1;
};

// A reusable barrier for n threads (generation counting; threads sleep rather than spin, since the
// emulated block has far more threads than the machine has cores).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  uint64_t gen_ = 0;
};

struct Block {
  Dim dim;
  std::vector<unsigned char> shared;
  std::unique_ptr<Barrier> block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<double> exchange;  // one slot per thread, for __shfl_xor_sync
};

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}

inline thread_local Dim thread_idx;

inline void* dynamic_shared() { return current()->shared.data(); }

// Runs kernel() as one block of `threads` CUDA threads (a multiple of 32) with `smem` bytes of dynamic
// shared memory; returns when every thread has finished.
inline void launch(int threads, size_t smem, const std::function<void()>& kernel) {
  if (threads <= 0 || threads % 32 != 0) throw std::invalid_argument("simt::launch: threads must be a multiple of 32");
  Block b;
  b.dim.x = static_cast<unsigned>(threads);
  b.shared.assign(smem, 0xAB);  // garbage, as on a GPU
  b.block = std::make_unique<Barrier>(threads);
  for (int w = 0; w < threads / 32; ++w) b.warps.push_back(std::make_unique<Barrier>(32));
  b.exchange.assign(threads, 0.0);
  current() = &b;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&kernel, t] {
      thread_idx.x = static_cast<unsigned>(t);
      kernel();
    });
  }
  for (auto& th : pool) th.join();
  current() = nullptr;
}

}  // namespace simt
}  // namespace mmalign

#define threadIdx (::mmalign::simt::thread_idx)
#define blockDim (::mmalign::simt::current()->dim)
#define blockIdx (::mmalign::simt::Dim{0, 0, 0})  // one block
#define gridDim (::mmalign::simt::Dim{1, 1, 1})

inline void __syncthreads() { ::mmalign::simt::current()->block->wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: every lane*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(double), "__shfl_xor_sync emulation: at most 8 bytes");
  auto* b = ::mmalign::simt::current();
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  std::memcpy(&b->exchange[t], &v, sizeof(T));
  b->warps[warp]->wait();
  T other;
  std::memcpy(&other, &b->exchange[warp * 32 + (lane ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  b->warps[warp]->wait();
  return other;
}
