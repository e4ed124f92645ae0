// CUDA GroupNorm (+ scale-shift, SiLU), forward and backward. The math is group_norm.cuh's;
// this file maps it onto threads.
//
// Forward, three launches:
//   1. channel_sums_kernel: per (n, c, spatial chunk) the shifted sums Σ(x − K), Σ(x − K)²;
//   2. forward_statistics_kernel: a warp per (n, g) merges them into mean and rstd;
//   3. normalize_kernel: elementwise y, 16-byte vectors when the layout allows.
// Backward, three launches of the same shapes: channel_sums_kernel (Σdz, Σdz·x̂),
// backward_group_kernel (per (n, g) S1, S2 and the (N, C) sums), dx_kernel.
// The per-group merges run a warp per (n, g).
// The per-channel reduction reads NCHW along s (a block per (n, c) chunk, 16-byte
// vectors) and channels_last across c (a warp spans 32 consecutive channels, the block's
// 8 warps stride over s), so global reads are coalesced in both layouts.
//
// Bytes it must move: forward reads x twice and writes y (3·E·s_x); backward reads x and
// dy twice and writes dx (5·E·s_x); O(N·C) besides. ~10 FLOPs per element: memory-bound.
#include <cuda_runtime.h>

#include "group_norm.cuh"

namespace fastguide {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = kThreads / kWarpSize;  // channels_last: warps striding over s

enum class SumsMode { kMoments, kBackward };

// Context of one channel's reduction: the channel's affine constants and group statistics.
struct ChannelContext {
  ChannelAffine affine;
  float mean, rstd, shift;
};

template <typename T, SumsMode kMode>
struct ChannelSumsArgs {
  const T* x;
  const T* dy;            // backward only
  GroupNormAffine affine;
  const float* mean;      // backward only
  const float* rstd;      // backward only
  float* partials;        // (N, C, chunks, 2)
  float* shifts;          // (N, C), forward only
};

template <typename T, SumsMode kMode>
__device__ __forceinline__ ChannelContext channel_context(const GroupNormParams& p, const ChannelSumsArgs<T, kMode>& a,
                                                          int64_t n, int64_t c) {
  ChannelContext ctx{};
  if constexpr (kMode == SumsMode::kMoments) {
    ctx.shift = to_float(a.x[element_offset(p, n, c, 0)]);
  } else {
    ctx.affine = channel_affine(p, a.affine, n, c);
    const int64_t group = n * p.groups + c / p.channels_per_group;
    ctx.mean = a.mean[group];
    ctx.rstd = a.rstd[group];
  }
  return ctx;
}

template <typename T, SumsMode kMode>
__device__ __forceinline__ void add_element(const GroupNormParams& p, const ChannelContext& ctx, float x, float dy,
                                            float (&acc)[2]) {
  if constexpr (kMode == SumsMode::kMoments) {
    add_moments(x, ctx.shift, acc);
  } else {
    add_backward_sums(p, ctx.affine, dy, x, ctx.mean, ctx.rstd, acc);
  }
}

template <typename T, SumsMode kMode>
__device__ __forceinline__ void write_channel_sums(const GroupNormParams& p, const ChannelSumsArgs<T, kMode>& a,
                                                   const ChannelContext& ctx, int64_t n, int64_t c, int chunk,
                                                   const float (&acc)[2]) {
  float* out = a.partials + ((n * p.c + c) * p.chunks + chunk) * 2;
  out[0] = acc[0];
  out[1] = acc[1];
  if constexpr (kMode == SumsMode::kMoments) {
    if (chunk == 0) a.shifts[n * p.c + c] = ctx.shift;
  }
}

// NCHW: block (n·C + c, chunk) reduces one contiguous run of its channel.
template <typename T, SumsMode kMode, int kVec>
__global__ void __launch_bounds__(kThreads) channel_sums_nchw_kernel(GroupNormParams p, ChannelSumsArgs<T, kMode> a) {
  const int64_t n = blockIdx.x / p.c, c = blockIdx.x % p.c;
  const int chunk = blockIdx.y;
  const ChannelContext ctx = channel_context(p, a, n, c);
  const int64_t per_chunk = chunk_positions(p, kVec);
  const int64_t begin = chunk * per_chunk;
  const int64_t end = begin + per_chunk < p.s ? begin + per_chunk : p.s;
  const int64_t base = element_offset(p, n, c, 0);
  float acc[2] = {0.0f, 0.0f};
  // With kVec > 1 the launcher guarantees s % kVec == 0: no tail.
  for (int64_t s = begin + static_cast<int64_t>(threadIdx.x) * kVec; s < end; s += kThreads * kVec) {
    const Vec<T, kVec> x = load_vec<T, kVec>(a.x + base + s);
    Vec<T, kVec> dy{};
    if constexpr (kMode == SumsMode::kBackward) dy = load_vec<T, kVec>(a.dy + base + s);
#pragma unroll
    for (int i = 0; i < kVec; ++i) add_element<T, kMode>(p, ctx, to_float(x.v[i]), to_float(dy.v[i]), acc);
  }
  block_sum(acc);
  if (threadIdx.x == 0) write_channel_sums(p, a, ctx, n, c, chunk, acc);
}

// channels_last: block (n·tiles + tile, chunk); lane → channel tile·32 + lane, warp → rows.
template <typename T, SumsMode kMode>
__global__ void __launch_bounds__(kThreads) channel_sums_nhwc_kernel(GroupNormParams p, ChannelSumsArgs<T, kMode> a) {
  const int64_t tiles = (p.c + kWarpSize - 1) / kWarpSize;
  const int64_t n = blockIdx.x / tiles;
  const int64_t c = (blockIdx.x % tiles) * kWarpSize + threadIdx.x % kWarpSize;
  const int row = threadIdx.x / kWarpSize;
  const int chunk = blockIdx.y;
  const bool active = c < p.c;
  ChannelContext ctx{};
  if (active) ctx = channel_context(p, a, n, c);
  const int64_t per_chunk = chunk_positions(p, 1);
  const int64_t begin = chunk * per_chunk;
  const int64_t end = begin + per_chunk < p.s ? begin + per_chunk : p.s;
  float acc[2] = {0.0f, 0.0f};
  if (active) {
    for (int64_t s = begin + row; s < end; s += kRows) {
      const int64_t offset = element_offset(p, n, c, s);
      const float dy = kMode == SumsMode::kBackward ? to_float(a.dy[offset]) : 0.0f;
      add_element<T, kMode>(p, ctx, to_float(a.x[offset]), dy, acc);
    }
  }
  __shared__ float rows[kRows][2][kWarpSize];
  rows[row][0][threadIdx.x % kWarpSize] = acc[0];
  rows[row][1][threadIdx.x % kWarpSize] = acc[1];
  __syncthreads();
  if (row == 0 && active) {
    float total[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      total[0] += rows[r][0][threadIdx.x];
      total[1] += rows[r][1][threadIdx.x];
    }
    write_channel_sums(p, a, ctx, n, c, chunk, total);
  }
}

// The per-group merges: a warp per (n, g), its lanes striding over the group's channels
// (float64 sums, reduced with shuffles), so a few large groups (G = 1) stay parallel.
constexpr int kGroupsPerBlock = kThreads / kWarpSize;

__global__ void __launch_bounds__(kThreads) forward_statistics_kernel(GroupNormParams p, const float* partials,
                                                                      const float* shifts, float* mean, float* rstd) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kWarpSize;
  if (group >= p.n * p.groups) return;  // the whole warp: no shuffle is left waiting
  const int64_t n = group / p.groups, first = (group % p.groups) * p.channels_per_group;
  const int lane = threadIdx.x % kWarpSize;
  double mean_sum = 0.0, channel_mean, channel_m2;
  for (int64_t c = first + lane; c < first + p.channels_per_group; c += kWarpSize) {
    channel_moments(p, partials, shifts, n, c, channel_mean, channel_m2);
    mean_sum += channel_mean;
  }
  const double group_mean = warp_sum(mean_sum) / static_cast<double>(p.channels_per_group);
  double m2 = 0.0;
  for (int64_t c = first + lane; c < first + p.channels_per_group; c += kWarpSize) {
    channel_moments(p, partials, shifts, n, c, channel_mean, channel_m2);
    const double deviation = channel_mean - group_mean;
    m2 += channel_m2 + static_cast<double>(p.s) * deviation * deviation;
  }
  m2 = warp_sum(m2);
  if (lane == 0) finish_statistics(p, group_mean, m2, mean[group], rstd[group]);
}

__global__ void __launch_bounds__(kThreads) backward_group_kernel(GroupNormParams p, GroupNormAffine a,
                                                                  const float* partials, float* sums,
                                                                  float* group_sums) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kWarpSize;
  if (group >= p.n * p.groups) return;  // the whole warp: no shuffle is left waiting
  const int64_t n = group / p.groups, first = (group % p.groups) * p.channels_per_group;
  double s1 = 0.0, s2 = 0.0, s1_term, s2_term;
  for (int64_t c = first + threadIdx.x % kWarpSize; c < first + p.channels_per_group; c += kWarpSize) {
    channel_backward_terms(p, a, partials, sums, n, c, s1_term, s2_term);
    s1 += s1_term;
    s2 += s2_term;
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  if (threadIdx.x % kWarpSize == 0) {
    // S1/(Cg·S) and S2/(Cg·S), as backward_dx takes them.
    const double elements = static_cast<double>(p.channels_per_group) * static_cast<double>(p.s);
    group_sums[2 * group] = static_cast<float>(s1 / elements);
    group_sums[2 * group + 1] = static_cast<float>(s2 / elements);
  }
}

// Elementwise passes over x in memory order. A vector of kVec elements never crosses a
// sample, and shares one channel (NCHW, s % kVec == 0: its constants are loaded once) or
// holds kVec consecutive channels (channels_last, C % kVec == 0).
struct ElementContext {
  ChannelAffine affine;
  float mean, rstd, mean_s1, mean_s2;
};

__device__ __forceinline__ ElementContext element_context(const GroupNormParams& p, const GroupNormAffine& a,
                                                          const float* mean, const float* rstd,
                                                          const float* group_sums, int64_t n, int64_t c) {
  const int64_t group = n * p.groups + c / p.channels_per_group;
  ElementContext ctx{channel_affine(p, a, n, c), mean[group], rstd[group], 0.0f, 0.0f};
  if (group_sums != nullptr) {
    ctx.mean_s1 = group_sums[2 * group];
    ctx.mean_s2 = group_sums[2 * group + 1];
  }
  return ctx;
}

// Calls element(lane, ctx) for each lane of the vector starting at flat offset i.
template <int kVec, bool kChannelsLast, typename Element>
__device__ __forceinline__ void for_each_lane(const GroupNormParams& p, const GroupNormAffine& a, const float* mean,
                                              const float* rstd, const float* group_sums, int64_t i,
                                              Element element) {
  const int64_t n = i / (p.c * p.s);
  const int64_t c0 = kChannelsLast ? i % p.c : (i / p.s) % p.c;
  if constexpr (!kChannelsLast) {
    const ElementContext ctx = element_context(p, a, mean, rstd, group_sums, n, c0);
#pragma unroll
    for (int lane = 0; lane < kVec; ++lane) element(lane, ctx);
  } else {
#pragma unroll
    for (int lane = 0; lane < kVec; ++lane) element(lane, element_context(p, a, mean, rstd, group_sums, n, c0 + lane));
  }
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) normalize_kernel(GroupNormParams p, const T* x, GroupNormAffine a,
                                                             const float* mean, const float* rstd, T* y) {
  const int64_t total = p.n * p.c * p.s;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads * kVec) {
    const Vec<T, kVec> in = load_vec<T, kVec>(x + i);
    Vec<T, kVec> out;
    for_each_lane<kVec, kChannelsLast>(p, a, mean, rstd, nullptr, i, [&](int lane, const ElementContext& ctx) {
      out.v[lane] = from_float<T>(normalize_element(p, ctx.affine, to_float(in.v[lane]), ctx.mean, ctx.rstd));
    });
    store_vec(y + i, out);
  }
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) dx_kernel(GroupNormParams p, const T* dy, const T* x, GroupNormAffine a,
                                                      const float* mean, const float* rstd, const float* group_sums,
                                                      T* dx) {
  const int64_t total = p.n * p.c * p.s;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads * kVec) {
    const Vec<T, kVec> x_in = load_vec<T, kVec>(x + i);
    const Vec<T, kVec> dy_in = load_vec<T, kVec>(dy + i);
    Vec<T, kVec> out;
    for_each_lane<kVec, kChannelsLast>(p, a, mean, rstd, group_sums, i, [&](int lane, const ElementContext& ctx) {
      const float x_hat = (to_float(x_in.v[lane]) - ctx.mean) * ctx.rstd;
      const float dz = backward_dz(p, ctx.affine, to_float(dy_in.v[lane]), x_hat);
      out.v[lane] = from_float<T>(backward_dx(ctx.affine, dz, x_hat, ctx.rstd, ctx.mean_s1, ctx.mean_s2));
    });
    store_vec(dx + i, out);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// kVec when the layout and the pointers allow 16-byte vectors, else 1.
template <typename T>
int vector_width(const GroupNormParams& p, const void* a, const void* b, const void* c) {
  constexpr int kVec = 16 / sizeof(T);
  const bool runs = p.channels_last ? p.c % kVec == 0 : p.s % kVec == 0;
  const bool aligned = aligned16(a) && aligned16(b) && (c == nullptr || aligned16(c));
  return runs && aligned ? kVec : 1;
}

unsigned elementwise_blocks(const GroupNormParams& p, int vec) {
  const int64_t vectors = (p.n * p.c * p.s + vec - 1) / vec;
  const int64_t blocks = (vectors + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);  // grid-stride beyond
}

template <typename T, SumsMode kMode>
void launch_channel_sums(const GroupNormParams& p, const ChannelSumsArgs<T, kMode>& a, int vec, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (p.channels_last) {
    const dim3 grid(static_cast<unsigned>(p.n * ((p.c + kWarpSize - 1) / kWarpSize)), p.chunks);
    launch_kernel(channel_sums_nhwc_kernel<T, kMode>, grid, kThreads, stream, p, a);
  } else if (vec == kVec) {
    launch_kernel(channel_sums_nchw_kernel<T, kMode, kVec>, dim3(static_cast<unsigned>(p.n * p.c), p.chunks), kThreads, stream, p, a);
  } else {
    launch_kernel(channel_sums_nchw_kernel<T, kMode, 1>, dim3(static_cast<unsigned>(p.n * p.c), p.chunks), kThreads, stream, p, a);
  }
}

unsigned group_blocks(const GroupNormParams& p) {
  return static_cast<unsigned>((p.n * p.groups + kGroupsPerBlock - 1) / kGroupsPerBlock);
}

template <typename T>
int forward_typed(const GroupNormParams& p, const T* x, const GroupNormAffine& a, T* y, float* mean, float* rstd,
                  float* partials, float* shifts, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vector_width<T>(p, x, y, nullptr);
  launch_channel_sums(p, ChannelSumsArgs<T, SumsMode::kMoments>{x, nullptr, a, nullptr, nullptr, partials, shifts},
                      vec, stream);
  launch_kernel(forward_statistics_kernel, group_blocks(p), kThreads, stream, p, partials, shifts, mean, rstd);
  const unsigned blocks = elementwise_blocks(p, vec);
  if (vec == kVec && p.channels_last) {
    launch_kernel(normalize_kernel<T, kVec, true>, blocks, kThreads, stream, p, x, a, mean, rstd, y);
  } else if (vec == kVec) {
    launch_kernel(normalize_kernel<T, kVec, false>, blocks, kThreads, stream, p, x, a, mean, rstd, y);
  } else if (p.channels_last) {
    launch_kernel(normalize_kernel<T, 1, true>, blocks, kThreads, stream, p, x, a, mean, rstd, y);
  } else {
    launch_kernel(normalize_kernel<T, 1, false>, blocks, kThreads, stream, p, x, a, mean, rstd, y);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward_typed(const GroupNormParams& p, const T* dy, const T* x, const GroupNormAffine& a, const float* mean,
                   const float* rstd, T* dx, float* sums, float* partials, float* group_sums, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vector_width<T>(p, x, dy, dx);
  launch_channel_sums(p, ChannelSumsArgs<T, SumsMode::kBackward>{x, dy, a, mean, rstd, partials, nullptr}, vec,
                      stream);
  launch_kernel(backward_group_kernel, group_blocks(p), kThreads, stream, p, a, partials, sums, group_sums);
  const unsigned blocks = elementwise_blocks(p, vec);
  if (vec == kVec && p.channels_last) {
    launch_kernel(dx_kernel<T, kVec, true>, blocks, kThreads, stream, p, dy, x, a, mean, rstd, group_sums, dx);
  } else if (vec == kVec) {
    launch_kernel(dx_kernel<T, kVec, false>, blocks, kThreads, stream, p, dy, x, a, mean, rstd, group_sums, dx);
  } else if (p.channels_last) {
    launch_kernel(dx_kernel<T, 1, true>, blocks, kThreads, stream, p, dy, x, a, mean, rstd, group_sums, dx);
  } else {
    launch_kernel(dx_kernel<T, 1, false>, blocks, kThreads, stream, p, dy, x, a, mean, rstd, group_sums, dx);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_group_norm_forward(StorageType dtype, const GroupNormParams& p, const void* x, const GroupNormAffine& a,
                              void* y, float* mean, float* rstd, float* partials, float* shifts, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case StorageType::kFloat32:
      return forward_typed(p, static_cast<const float*>(x), a, static_cast<float*>(y), mean, rstd, partials, shifts, s);
    case StorageType::kFloat16:
      return forward_typed(p, static_cast<const __half*>(x), a, static_cast<__half*>(y), mean, rstd, partials, shifts,
                           s);
    case StorageType::kBFloat16:
      return forward_typed(p, static_cast<const __nv_bfloat16*>(x), a, static_cast<__nv_bfloat16*>(y), mean, rstd,
                           partials, shifts, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_group_norm_backward(StorageType dtype, const GroupNormParams& p, const void* dy, const void* x,
                               const GroupNormAffine& a, const float* mean, const float* rstd, void* dx, float* sums,
                               float* partials, float* group_sums, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case StorageType::kFloat32:
      return backward_typed(p, static_cast<const float*>(dy), static_cast<const float*>(x), a, mean, rstd,
                            static_cast<float*>(dx), sums, partials, group_sums, s);
    case StorageType::kFloat16:
      return backward_typed(p, static_cast<const __half*>(dy), static_cast<const __half*>(x), a, mean, rstd,
                            static_cast<__half*>(dx), sums, partials, group_sums, s);
    case StorageType::kBFloat16:
      return backward_typed(p, static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x), a, mean,
                            rstd, static_cast<__nv_bfloat16*>(dx), sums, partials, group_sums, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace fastguide
