// Stand-in for the CUDA runtime header under the CPU emulation (see emulator.h).
#pragma once

#include <cmath>

#include "emulator.h"

// The hardware's approximate float division and reciprocal square root, exact here.
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

using cudaStream_t = void*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMisalignedAddress = 716 };

inline cudaError_t cudaGetLastError() {
  const int error = fastguide_emulation::pending_error;
  fastguide_emulation::pending_error = 0;
  return static_cast<cudaError_t>(error);
}

namespace fastguide {
// The emulation's kernel launch: every thread of every block, on the CPU.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
  fastguide_emulation::run_grid(grid, block, [&] { kernel(args...); });
}
}  // namespace fastguide
