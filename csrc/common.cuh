// Shared by every kernel source (and the CPU emulation): the host/device function macro,
// fp32 <-> storage conversions, parameters read in their storage type, 16-byte vectors and
// (device only) block reductions.
//
// Everything outside `#ifdef __CUDACC__` also compiles with a plain C++17 compiler. The
// CPU emulation of tests/cuda_emulation/ compiles the kernel sources as they are, with
// __CUDACC__ defined and its own stand-ins for the CUDA headers, builtins and launch.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FG_HOST_DEVICE __host__ __device__ __forceinline__
// Unroll the next loop in device code; host compilers (bindings.cpp, -Werror) do not know
// the pragma, and unroll small fixed-trip loops on their own.
#define FG_UNROLL _Pragma("unroll")
#else
#define FG_HOST_DEVICE inline
#define FG_UNROLL
#endif

namespace fastguide {

// Arithmetic is fp32 whatever the storage type; these are the only conversions.
FG_HOST_DEVICE float to_float(float v) { return v; }

template <typename T>
FG_HOST_DEVICE T from_float(float v);

template <>
FG_HOST_DEVICE float from_float<float>(float v) { return v; }

#ifdef __CUDACC__
// Host and device: cuda_fp16.h / cuda_bf16.h convert on both (as the emulation's stand-ins do).
FG_HOST_DEVICE float to_float(__half v) { return __half2float(v); }
FG_HOST_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
#endif

// Storage types a launch can take: of x-shaped tensors, and of each parameter tensor on
// its own (statistics and partial sums are fp32).
enum class StorageType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The bits of `from` as a To of the same size.
template <typename To, typename From>
FG_HOST_DEVICE To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as keeps the size");
  To to;
  memcpy(&to, &from, sizeof(to));
  return to;
}

// A parameter tensor (a norm's weight, bias, scale, shift, gate) read in its own storage
// type, whatever x's, and converted to fp32 as it is loaded; data is null when absent.
// The tag is the same for every thread of a launch. A load is one access of the storage
// width and a select between the two 16-bit conversions: straight-line code the compiler
// predicates (a branch per type made it duplicate the unrolled element loops whole).
struct Parameter {
  const void* data;
  StorageType type;

  FG_HOST_DEVICE bool present() const { return data != nullptr; }

  // Element i as fp32, or `absent` when there is no tensor.
  FG_HOST_DEVICE float load(int64_t i, float absent) const {
    if (data == nullptr) return absent;
#ifdef __CUDACC__
    if (type != StorageType::kFloat32) return widen(static_cast<const uint16_t*>(data)[i]);
#endif
    // Plain C++ (bindings.cpp) knows no 16-bit types; it only fills these structs and
    // never reads a parameter (device memory), so this is reached for fp32 only.
    return static_cast<const float*>(data)[i];
  }

#ifdef __CUDACC__
  // A 16-bit element's bits as fp32: fp16 or bf16, as the tag says.
  FG_HOST_DEVICE float widen(uint16_t bits) const {
    return type == StorageType::kBFloat16 ? to_float(bits_as<__nv_bfloat16>(bits)) : to_float(bits_as<__half>(bits));
  }
#endif
};

// N elements of T moved as one aligned access: N·sizeof(T) = 16 bytes gives LDG.E.128.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
FG_HOST_DEVICE Vec<T, N> load_vec(const T* p) {
#ifdef FASTGUIDE_CUDA_EMULATION
  // The CPU emulation reports a misaligned vector access as the fault a GPU would raise.
  return ::fastguide_emulation::load_checked<Vec<T, N>>(p);
#else
  return *reinterpret_cast<const Vec<T, N>*>(p);
#endif
}

template <typename T, int N>
FG_HOST_DEVICE void store_vec(T* p, const Vec<T, N>& value) {
#ifdef FASTGUIDE_CUDA_EMULATION
  ::fastguide_emulation::store_checked(p, value);
  return;
#endif
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(Vec<T, N>) == sizeof(uint4)) {
    // nvcc splits a 16-byte struct store into two 8-byte ones when the stored lanes come
    // from separate computations (seen in guided_step's vector path); say it in PTX.
    uint4 bits;
    memcpy(&bits, &value, sizeof(bits));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(bits.x), "r"(bits.y), "r"(bits.z),
                 "r"(bits.w)
                 : "memory");
    return;
  }
#endif
  *reinterpret_cast<Vec<T, N>*>(p) = value;
}

#ifdef __CUDACC__
#ifndef FASTGUIDE_CUDA_EMULATION
// kernel<<<grid, block, 0, stream>>>(args...) as a function, which the CPU emulation
// replaces with its own (a launch through a kernel pointer is plain CUDA).
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
}
#endif

constexpr int kWarpSize = 32;
// The most blocks a grid has along y (CUDA's limit); the CPU emulation builds with a small
// one, so that the tests run the loops that stride over more rows than the grid has.
#ifndef FASTGUIDE_MAX_GRID_Y
#define FASTGUIDE_MAX_GRID_Y 65535
#endif
constexpr int64_t kMaxGridY = FASTGUIDE_MAX_GRID_Y;

// Sum of `value` over the warp, returned to every lane (float or double).
template <typename V>
__device__ __forceinline__ V warp_sum(V value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Sums of K per-thread values over the whole block (blockDim.x a multiple of 32, at most
// 1024), returned to thread 0 only. Uses one __shared__ array of 32·K floats.
template <int K>
__device__ __forceinline__ void block_sum(float (&values)[K]) {
  __shared__ float warp_partials[K][kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    values[k] = warp_sum(values[k]);
    if (lane == 0) warp_partials[k][warp] = values[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      values[k] = warp_sum(lane < warps ? warp_partials[k][lane] : 0.0f);
    }
  }
}
#endif

}  // namespace fastguide
