// A CPU emulation of the CUDA execution model, just enough for csrc/'s kernels: a grid of
// blocks run one after another; the threads of a block are fibers on one OS thread,
// switched only at __syncthreads and warp shuffles, so the run is deterministic. The
// switch is a few lines of x86-64 assembly (emulator.cpp): glibc's swapcontext makes two
// system calls per switch, and a block reduction switches ~50 times per thread.
// A kernel whose first block never synchronises runs its other blocks' threads as plain
// calls (csrc/'s kernels synchronise in every block or in none; a barrier met later
// aborts with a message).
// __shared__ variables become function statics, shared by the block's threads, which is
// right because blocks never overlap. Built by tests/test_cuda_backend.py; never shipped.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace fastguide_emulation {

inline uint3 thread_index, block_index;
inline dim3 block_dim, grid_dim;

// The error the next cudaGetLastError() returns: a misaligned vector access is recorded
// as cudaErrorMisalignedAddress (the access itself is harmless on x86).
inline int pending_error = 0;
constexpr int kMisalignedAddress = 716;

// Vector loads and stores of csrc/ (common.cuh): checked for the alignment a GPU needs,
// then done with memcpy so that a misaligned one is reported rather than crashing here.
template <typename V>
inline V load_checked(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) pending_error = kMisalignedAddress;
  V value;
  std::memcpy(&value, p, sizeof(V));
  return value;
}

template <typename V>
inline void store_checked(void* p, const V& value) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) pending_error = kMisalignedAddress;
  std::memcpy(p, &value, sizeof(V));
}

// Saves the callee-saved registers on the current stack, stores its pointer in *from and
// resumes the fiber whose stack pointer is `to` (emulator.cpp).
extern "C" void fastguide_emulation_switch(void** from, void* to);

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  std::unique_ptr<char[]> stack;  // uninitialised: only the pages a thread touches are mapped
  uint3 index;
  bool done = false;
  int barrier = -1;  // the barrier it waits at, or -1
  int generation = 0;
};

// Barrier 0 spans the block; barrier 1 + w spans warp w.
struct Block {
  void* scheduler = nullptr;  // the scheduler's saved stack pointer
  std::vector<Fiber> fibers;
  std::vector<int> participants, arrived, generation;
  std::function<void()> body;
  int current = 0;
  bool synchronised = false;  // some thread met a barrier
  bool direct = false;        // threads run as plain calls: no barrier may be met
};

inline Block* block = nullptr;

[[noreturn]] inline void fiber_main() {
  block->body();
  Fiber& self = block->fibers[block->current];
  self.done = true;
  fastguide_emulation_switch(&self.sp, block->scheduler);
  std::abort();  // a finished fiber is never resumed
}

// A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment.
constexpr size_t kStackBytes = 64 * 1024;

inline void* initial_stack(const std::unique_ptr<char[]>& stack) {
  auto top = reinterpret_cast<uintptr_t>(stack.get() + kStackBytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                        // keeps rsp ≡ 8 (mod 16) at entry
  *--sp = reinterpret_cast<void*>(&fiber_main);           // the switch's `ret` lands here
  for (int saved = 0; saved < 6; ++saved) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  return sp;
}

inline void wait_at(int barrier) {
  Block& b = *block;
  if (b.direct) {
    std::fprintf(stderr, "cuda emulation: a barrier in block (%u, %u) of a kernel whose first block had none\n",
                 block_index.x, block_index.y);
    std::abort();
  }
  b.synchronised = true;
  Fiber& self = b.fibers[b.current];
  const int generation = b.generation[barrier];
  if (++b.arrived[barrier] == b.participants[barrier]) {  // the last one releases the rest
    b.arrived[barrier] = 0;
    ++b.generation[barrier];
    return;
  }
  self.barrier = barrier;
  self.generation = generation;
  while (b.generation[barrier] == generation) fastguide_emulation_switch(&self.sp, b.scheduler);
  self.barrier = -1;
}

inline void run_block(Block& b) {
  for (Fiber& f : b.fibers) {
    f.done = false;
    f.barrier = -1;
    f.sp = initial_stack(f.stack);
  }
  for (;;) {
    bool progress = false, all_done = true;
    for (size_t i = 0; i < b.fibers.size(); ++i) {
      Fiber& f = b.fibers[i];
      if (f.done) continue;
      all_done = false;
      if (f.barrier >= 0 && b.generation[f.barrier] == f.generation) continue;  // still blocked
      b.current = static_cast<int>(i);
      thread_index = f.index;
      fastguide_emulation_switch(&b.scheduler, f.sp);
      progress = true;
    }
    if (all_done) return;
    if (!progress) {
      std::fprintf(stderr, "cuda emulation: deadlock in block (%u, %u): threads wait at barriers that not all reach\n",
                   block_index.x, block_index.y);
      std::abort();
    }
  }
}

// Runs body as every thread of every block of the grid (1-D blocks, as csrc/ launches).
// A grid past CUDA's limits along y or z (65535 blocks) fails, as its launch would.
inline void run_grid(dim3 grid, dim3 threads, std::function<void()> body) {
  if (grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("cuda emulation: a grid of " + std::to_string(grid.y) + " x " + std::to_string(grid.z) +
                             " blocks along y x z, past CUDA's 65535");
  }
  constexpr unsigned kWarp = 32;
  Block b;
  b.body = std::move(body);
  b.fibers.resize(threads.x);
  for (unsigned t = 0; t < threads.x; ++t) {
    b.fibers[t].stack.reset(new char[kStackBytes]);
    b.fibers[t].index = {t, 0, 0};
  }
  const unsigned warps = (threads.x + kWarp - 1) / kWarp;
  b.participants.push_back(static_cast<int>(threads.x));
  for (unsigned w = 0; w < warps; ++w) {
    b.participants.push_back(static_cast<int>(threads.x - w * kWarp < kWarp ? threads.x - w * kWarp : kWarp));
  }
  b.arrived.assign(b.participants.size(), 0);
  b.generation.assign(b.participants.size(), 0);
  Block* outer = block;
  block = &b;
  grid_dim = grid;
  block_dim = threads;
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      block_index = {x, y, 0};
      if (!b.direct) {
        run_block(b);
        b.direct = !b.synchronised;
        continue;
      }
      for (unsigned t = 0; t < threads.x; ++t) {
        thread_index = {t, 0, 0};
        b.body();
      }
    }
  }
  block = outer;
}

// The value of `value` at lane (own lane ^ offset) of the warp: a warp-wide exchange.
template <typename V>
inline V shuffle_xor(V value, int offset) {
  static V lanes[1024];
  const unsigned warp = thread_index.x / 32;
  lanes[thread_index.x] = value;
  wait_at(1 + static_cast<int>(warp));
  const V result = lanes[warp * 32 + ((thread_index.x % 32) ^ static_cast<unsigned>(offset))];
  wait_at(1 + static_cast<int>(warp));
  return result;
}

}  // namespace fastguide_emulation

#define threadIdx ::fastguide_emulation::thread_index
#define blockIdx ::fastguide_emulation::block_index
#define blockDim ::fastguide_emulation::block_dim
#define gridDim ::fastguide_emulation::grid_dim

inline void __syncthreads() { fastguide_emulation::wait_at(0); }
inline float __shfl_xor_sync(unsigned, float value, int offset) { return fastguide_emulation::shuffle_xor(value, offset); }
inline double __shfl_xor_sync(unsigned, double value, int offset) { return fastguide_emulation::shuffle_xor(value, offset); }
