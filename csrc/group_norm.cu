// CUDA GroupNorm (+ scale-shift, SiLU), forward and backward. The math is group_norm.cuh's;
// this file maps it onto threads.
//
// Forward, NCHW with enough groups that each fits a block's registers (64 KB): one launch,
// group_in_registers_kernel, which reads x once. Otherwise three launches:
//   1. channel_sums_kernel: per (n, c, spatial chunk) the moments (count, mean, M2) of
//      x − K, K the median of the channel's first, middle and last elements, merged
//      over threads by Chan's formula;
//   2. forward_statistics_kernel: a warp per (n, g) merges them into mean and rstd, and
//      folds them with the channel's affine constants into its map x ↦ z (group_norm.cuh);
//   3. normalize_kernel: y = act(z) elementwise, 16-byte vectors when the layout allows.
// Backward, three launches of the same shapes: channel_sums_kernel (Σdz, Σdz·x̂),
// backward_group_kernel (per (n, g) S1, S2, the (N, C) sums and each channel's maps for
// z and dx), dx_kernel.
// The per-group merges run a warp per (n, g).
// The per-channel reduction reads NCHW along s (a block per (n, c) chunk, 16-byte
// vectors) and channels_last across c (a warp spans 32 consecutive channels, the block's
// 8 warps stride over s; the backward's 32 channel pairs where C and the alignment allow:
// channel_moments_nhwc_kernel, channel_sums_nhwc_kernel), so global reads are coalesced
// in both layouts.
// The elementwise passes run block (tile, n) over kUnroll·kThreads vectors of sample n:
// thread t takes vectors tile·kTile + t + k·kThreads (k < kUnroll), so each load is one of
// a warp's 32 consecutive vectors, and it issues all its loads before any math, which puts
// kUnroll (normalize) or 2·kUnroll (dx) 16-byte loads per thread in flight (Little's law,
// tools/occupancy.py). Per element they read the channel's precomputed maps (one or two
// 8-byte loads, of an O(N·C) table that stays in cache) instead of its weight, bias,
// scale, shift, mean and rstd, and find the channel by stepping from the thread's first
// vector rather than dividing per vector (ThreadVectors).
//
// Bytes it must move: forward reads x twice and writes y (3·E·s_x); backward reads x and
// dy twice and writes dx (5·E·s_x); O(N·C) besides. ~10 FLOPs per element: memory-bound.
#include <cuda_runtime.h>

#include <type_traits>

#include "group_norm.cuh"

namespace fastguide {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = kThreads / kWarpSize;  // channels_last: warps striding over s
// Loads a thread issues before the math of a forward statistics step: 4 vectors of 16 B
// (NCHW), 16 single elements (channels_last).
constexpr int kMomentStep = 4;
constexpr int kRowMomentStep = 16;
// Bytes of x and dy a channels_last backward sums step loads before the math (16 loads of
// a 16-bit channel pair, 8 of an fp32 one), at kRowSumsBlocks blocks an SM (≤ 64
// registers a thread): 64 KB in flight.
constexpr int kRowSumsBytes = 64;
constexpr int kRowSumsBlocks = 4;
// Blocks an SM the channels_last statistics of a 16-bit x keep resident (≤ 32 registers a
// thread): with kRowMomentStep loads of 16 bits, 64 KB in flight an SM. Unbound: fp32's
// channels_last (40-48 registers, 5-6 blocks: 80-96 KB; bound, it spilled) and every NCHW
// step (16-bit vectors 42-56 registers, 4-5 blocks: 64-80 KB, spilling when bound to 6 or
// 8 blocks; fp32 and single elements 28-38).
constexpr int kRowMomentBlocks = 8;

enum class SumsMode { kMoments, kBackward };

// The moments of a set of values d: its count, mean and M2 = Σ(d − mean)².
struct Moments {
  float count, mean, m2;
};

// Chan, Golub and LeVeque's merge of two sets' moments: n = na + nb, δ = mean_b − mean_a,
// mean = mean_a + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n. Every term is ≥ 0, so nothing
// cancels (sums of squares from a shift K, Σd² − (Σd)²/n, lose (|K − mean|/σ)²·2⁻²⁴ of
// var: an outlier at K cancelled it). The term is formed as δ·(δ·(na·nb/n)), and an empty
// side is returned past, not merged: δ² alone overflows float past |δ| = 1.8e19 where the
// term is 0 or finite (inf·0 made finite statistics NaN; the chunks and channels merge in
// float64, so a group's statistics can be finite where a thread's δ² is not).
__device__ __forceinline__ Moments merge_moments(const Moments& a, const Moments& b) {
  if (b.count == 0.0f) return a;
  if (a.count == 0.0f) return b;
  const float count = a.count + b.count;
  // The hardware's approximate division (2 ulp, in a weight only): an IEEE division is a
  // subroutine call.
  const float share = __fdividef(b.count, count);
  const float delta = b.mean - a.mean;
  return {count, a.mean + delta * share, a.m2 + b.m2 + delta * (delta * (a.count * share))};
}

// A vector's moments of d = x − K in two passes over its kVec values (their mean, then
// the deviations from it), merged into acc.
template <typename T, int kVec>
__device__ __forceinline__ void add_vector_moments(const Vec<T, kVec>& x, float shift, Moments& acc) {
  float d[kVec];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    d[i] = to_float(x.v[i]) - shift;
    sum += d[i];
  }
  const float mean = sum * (1.0f / kVec);
  float m2 = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) m2 += (d[i] - mean) * (d[i] - mean);
  acc = merge_moments(acc, {static_cast<float>(kVec), mean, m2});
}

// The moments of x − K (K = shift) over one thread's positions first, first + stride, ...
// below end, each a vector of kVec elements at x + offset(position). kStep positions a
// step, all loaded before any math; a step's moments come from its values in registers in
// two passes (their mean, then the deviations from it) and merge into the running ones
// with the share 1/(k + 1) of the k-th step (equal counts: no division by a count that
// depends on the data, so the steps pipeline); the last, partial step a vector at a time.
template <typename T, int kVec, int kStep, typename Offset>
__device__ __forceinline__ Moments strided_moments(const T* x, Offset offset, int64_t first, int64_t end,
                                                   int64_t stride, float shift) {
  constexpr float kStepCount = static_cast<float>(kStep * kVec);
  Moments acc{};
  float steps = 0.0f;
  int64_t position = first;
  for (; position + (kStep - 1) * stride < end; position += kStep * stride) {
    Vec<T, kVec> held[kStep];
#pragma unroll
    for (int u = 0; u < kStep; ++u) held[u] = load_vec<T, kVec>(x + offset(position + u * stride));
    float sum = 0.0f;
#pragma unroll
    for (int u = 0; u < kStep; ++u) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += to_float(held[u].v[i]) - shift;
    }
    const float step_mean = sum * (1.0f / kStepCount);
    float step_m2 = 0.0f;
#pragma unroll
    for (int u = 0; u < kStep; ++u) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float deviation = (to_float(held[u].v[i]) - shift) - step_mean;
        step_m2 += deviation * deviation;
      }
    }
    const float share = __fdividef(1.0f, steps + 1.0f);
    const float delta = step_mean - acc.mean;
    acc.mean += delta * share;
    acc.m2 += step_m2 + delta * (delta * (kStepCount * steps * share));  // the first step: δ·(δ·0), not δ²·0
    steps += 1.0f;
  }
  acc.count = steps * kStepCount;
  for (; position < end; position += stride) add_vector_moments(load_vec<T, kVec>(x + offset(position)), shift, acc);
  return acc;
}

// The moments of a warp's lanes, merged by a butterfly of shuffles: on every lane.
__device__ __forceinline__ Moments warp_merge_moments(Moments m) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Moments other{__shfl_xor_sync(0xffffffffu, m.count, offset), __shfl_xor_sync(0xffffffffu, m.mean, offset),
                        __shfl_xor_sync(0xffffffffu, m.m2, offset)};
    m = merge_moments(m, other);
  }
  return m;
}

// The moments of the whole block's threads (blockDim.x a multiple of 32), returned to
// thread 0 only.
__device__ __forceinline__ Moments block_merge_moments(Moments m) {
  __shared__ Moments warp_moments[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  m = warp_merge_moments(m);
  if (lane == 0) warp_moments[warp] = m;
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  if (warp == 0) m = warp_merge_moments(lane < warps ? warp_moments[lane] : Moments{});
  return m;
}

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
  float* partials;        // forward (N, C, chunks, kMomentFields); backward (N, C, chunks, 2)
  float* shifts;          // (N, C), forward only
};

// A thread's accumulator: the forward's moments of x − K (K = median_of_three of the channel,
// which keeps the means small at a large mean), the backward's (Σdz, Σdz·x̂).
template <SumsMode kMode>
using ChannelAccumulator = std::conditional_t<kMode == SumsMode::kMoments, Moments, float[2]>;

template <typename T, SumsMode kMode>
__device__ __forceinline__ ChannelContext channel_context(const GroupNormParams& p, const ChannelSumsArgs<T, kMode>& a,
                                                          int64_t n, int64_t c) {
  ChannelContext ctx{};
  if constexpr (kMode == SumsMode::kMoments) {
    const T* x = a.x;
    ctx.shift = median_of_three(to_float(x[element_offset(p, n, c, 0)]), to_float(x[element_offset(p, n, c, p.s / 2)]),
                                to_float(x[element_offset(p, n, c, p.s - 1)]));
  } else {
    ctx.affine = channel_affine(p, a.affine, n, c);
    const int64_t group = n * p.groups + c / p.channels_per_group;
    ctx.mean = a.mean[group];
    ctx.rstd = a.rstd[group];
  }
  return ctx;
}

template <typename T, int kVec>
__device__ __forceinline__ void add_backward_vector(const GroupNormParams& p, const ChannelContext& ctx,
                                                    const Vec<T, kVec>& x, const Vec<T, kVec>& dy, float (&acc)[2]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    add_backward_sums(p, ctx.affine, to_float(dy.v[i]), to_float(x.v[i]), ctx.mean, ctx.rstd, acc);
  }
}

// One thread's walk over `count` vectors of kVec elements of x and of dy, `pitch` elements
// apart, handed to add(x, dy): kStep vectors a step, those of x and dy all loaded before
// the math; the rest one at a time.
template <typename T, int kVec, int kStep, typename Add>
__device__ __forceinline__ void strided_pairs(const T* x, const T* dy, int64_t count, int64_t pitch, Add add) {
  int64_t i = 0;
  for (; i + kStep <= count; i += kStep, x += kStep * pitch, dy += kStep * pitch) {
    Vec<T, kVec> xs[kStep], dys[kStep];
#pragma unroll
    for (int u = 0; u < kStep; ++u) {
      xs[u] = load_vec<T, kVec>(x + u * pitch);
      dys[u] = load_vec<T, kVec>(dy + u * pitch);
    }
#pragma unroll
    for (int u = 0; u < kStep; ++u) add(xs[u], dys[u]);
  }
  for (; i < count; ++i, x += pitch, dy += pitch) add(load_vec<T, kVec>(x), load_vec<T, kVec>(dy));
}

// The block's accumulators merged, on thread 0.
template <SumsMode kMode>
__device__ __forceinline__ void block_merge(ChannelAccumulator<kMode>& acc) {
  if constexpr (kMode == SumsMode::kMoments) {
    acc = block_merge_moments(acc);
  } else {
    block_sum(acc);
  }
}

template <typename T, SumsMode kMode>
__device__ __forceinline__ void write_channel_sums(const GroupNormParams& p, const ChannelSumsArgs<T, kMode>& a,
                                                   const ChannelContext& ctx, int64_t n, int64_t c, int chunk,
                                                   const ChannelAccumulator<kMode>& acc) {
  if constexpr (kMode == SumsMode::kMoments) {
    float* out = a.partials + ((n * p.c + c) * p.chunks + chunk) * kMomentFields;
    out[0] = acc.count;
    out[1] = acc.mean;
    out[2] = acc.m2;
    if (chunk == 0) a.shifts[n * p.c + c] = ctx.shift;
  } else {
    float* out = a.partials + ((n * p.c + c) * p.chunks + chunk) * 2;
    out[0] = acc[0];
    out[1] = acc[1];
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
  ChannelAccumulator<kMode> acc{};
  // With kVec > 1 the launcher guarantees s % kVec == 0: no tail.
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  if constexpr (kMode == SumsMode::kMoments) {
    acc = strided_moments<T, kVec, kVec == 1 ? kRowMomentStep : kMomentStep>(
        a.x, [base](int64_t s) { return base + s; }, first, end, kThreads * kVec, ctx.shift);
  } else {
    for (int64_t s = first; s < end; s += kThreads * kVec) {
      add_backward_vector<T, kVec>(p, ctx, load_vec<T, kVec>(a.x + base + s), load_vec<T, kVec>(a.dy + base + s), acc);
    }
  }
  block_merge<kMode>(acc);
  if (threadIdx.x == 0) write_channel_sums(p, a, ctx, n, c, chunk, acc);
}

// channels_last: block (n·tiles + tile, chunk); lane → kChannels adjacent channels from
// (tile·32 + lane)·kChannels, a vector of each row, warp → rows. The forward's moments take
// a channel a thread; the backward's sums a pair where it can (see channel_sums_nhwc_kernel).
template <typename T, SumsMode kMode, int kChannels>
__device__ __forceinline__ void channel_rows(const GroupNormParams& p, const ChannelSumsArgs<T, kMode>& a) {
  static_assert(kMode == SumsMode::kBackward || kChannels == 1, "the forward's moments take a channel a thread");
  const int64_t tiles = (p.c + kWarpSize * kChannels - 1) / (kWarpSize * kChannels);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n = blockIdx.x / tiles;
  const int64_t c = ((blockIdx.x % tiles) * kWarpSize + lane) * kChannels;  // the thread's first channel
  const int row = threadIdx.x / kWarpSize;
  const int chunk = blockIdx.y;
  const bool active = c < p.c;  // with kChannels > 1 the launcher guarantees C % kChannels == 0
  ChannelContext ctx[kChannels] = {};
  if (active) {
#pragma unroll
    for (int i = 0; i < kChannels; ++i) ctx[i] = channel_context(p, a, n, c + i);
  }
  const int64_t per_chunk = chunk_positions(p, 1);
  const int64_t begin = chunk * per_chunk;
  const int64_t end = begin + per_chunk < p.s ? begin + per_chunk : p.s;
  const auto offset = [&p, n, c](int64_t s) { return element_offset(p, n, c, s); };
  ChannelAccumulator<kMode> acc[kChannels] = {};
  if constexpr (kMode == SumsMode::kMoments) {
    if (active) acc[0] = strided_moments<T, 1, kRowMomentStep>(a.x, offset, begin + row, end, kRows, ctx[0].shift);
  } else if (active && begin + row < end) {
    // kRowSumsBytes of x and dy a step.
    constexpr int kStep = kRowSumsBytes / (2 * kChannels * static_cast<int>(sizeof(T)));
    // z = (x̂·w + b)·(1 + scale) + shift as x̂·gain + offset: two constants a channel held, not four.
    LinearMap folded[kChannels];
#pragma unroll
    for (int i = 0; i < kChannels; ++i) {
      const ChannelAffine& k = ctx[i].affine;
      folded[i] = {k.w * k.one_plus_scale, fmaf(k.b, k.one_plus_scale, k.shift)};
    }
    const int64_t first = offset(begin + row);
    strided_pairs<T, kChannels, kStep>(
        a.x + first, a.dy + first, (end - begin - row + kRows - 1) / kRows, kRows * p.c,
        [&](const Vec<T, kChannels>& x, const Vec<T, kChannels>& dy) {
#pragma unroll
          for (int i = 0; i < kChannels; ++i) {
            const float x_hat = (to_float(x.v[i]) - ctx[i].mean) * ctx[i].rstd;
            const float dz = backward_dz_at(p, to_float(dy.v[i]), fmaf(x_hat, folded[i].gain, folded[i].offset));
            acc[i][0] += dz;
            acc[i][1] += dz * x_hat;
          }
        });
  }
  // The rows' accumulators of each channel merged by row 0, in row order.
  __shared__ ChannelAccumulator<kMode> rows[kRows][kWarpSize][kChannels];
#pragma unroll
  for (int i = 0; i < kChannels; ++i) {
    if constexpr (kMode == SumsMode::kMoments) {
      rows[row][lane][i] = acc[i];
    } else {
      rows[row][lane][i][0] = acc[i][0];
      rows[row][lane][i][1] = acc[i][1];
    }
  }
  __syncthreads();
  if (row == 0 && active) {
#pragma unroll
    for (int i = 0; i < kChannels; ++i) {
      ChannelAccumulator<kMode> total{};
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if constexpr (kMode == SumsMode::kMoments) {
          total = merge_moments(total, rows[r][lane][i]);
        } else {
          total[0] += rows[r][lane][i][0];
          total[1] += rows[r][lane][i][1];
        }
      }
      write_channel_sums(p, a, ctx[i], n, c + i, chunk, total);
    }
  }
}

// The forward's channels_last statistics.
template <typename T>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 2 ? kRowMomentBlocks : 1)
    channel_moments_nhwc_kernel(GroupNormParams p, ChannelSumsArgs<T, SumsMode::kMoments> a) {
  channel_rows<T, SumsMode::kMoments, 1>(p, a);
}

// The backward's channels_last sums, kVec channels a thread: pairs (a warp's 128 bytes of a
// 16-bit row, 256 of an fp32 one) where C is even and x and dy are aligned to a pair, else
// one. Bound to kRowSumsBlocks so a step's 16 loads stay in flight at 4 blocks.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, kRowSumsBlocks)
    channel_sums_nhwc_kernel(GroupNormParams p, ChannelSumsArgs<T, SumsMode::kBackward> a) {
  channel_rows<T, SumsMode::kBackward, kVec>(p, a);
}

// The per-group merges: a warp per (n, g), its lanes striding over the group's channels
// (float64 sums, reduced with shuffles), so a few large groups (G = 1) stay parallel.
constexpr int kGroupsPerBlock = kThreads / kWarpSize;

__global__ void __launch_bounds__(kThreads) forward_statistics_kernel(GroupNormParams p, GroupNormAffine a,
                                                                      const float* partials, const float* shifts,
                                                                      float* mean, float* rstd, LinearMap* maps) {
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
  m2 = warp_sum(m2);  // on every lane, as is group_mean: each lane writes its channels' maps
  float mean_out, rstd_out;
  const double group_rstd = finish_statistics(p, group_mean, m2, mean_out, rstd_out);
  if (lane == 0) {
    mean[group] = mean_out;
    rstd[group] = rstd_out;
  }
  for (int64_t c = first + lane; c < first + p.channels_per_group; c += kWarpSize) {
    maps[n * p.c + c] = pre_activation_map(channel_affine(p, a, n, c), group_mean, group_rstd);
  }
}

__global__ void __launch_bounds__(kThreads) backward_group_kernel(GroupNormParams p, GroupNormAffine a,
                                                                  const float* mean, const float* rstd,
                                                                  const float* partials, float* sums,
                                                                  LinearMap* maps) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kWarpSize;
  if (group >= p.n * p.groups) return;  // the whole warp: no shuffle is left waiting
  const int64_t n = group / p.groups, first = (group % p.groups) * p.channels_per_group;
  double s1 = 0.0, s2 = 0.0, s1_term, s2_term;
  for (int64_t c = first + threadIdx.x % kWarpSize; c < first + p.channels_per_group; c += kWarpSize) {
    channel_backward_terms(p, a, partials, sums, n, c, s1_term, s2_term);
    s1 += s1_term;
    s2 += s2_term;
  }
  s1 = warp_sum(s1);  // on every lane: each lane writes its channels' maps
  s2 = warp_sum(s2);
  const double elements = static_cast<double>(p.channels_per_group) * static_cast<double>(p.s);
  const double group_mean = mean[group], group_rstd = rstd[group];
  const LinearMap dx = dx_map(group_mean, group_rstd, s1 / elements, s2 / elements);
  for (int64_t c = first + threadIdx.x % kWarpSize; c < first + p.channels_per_group; c += kWarpSize) {
    maps[2 * (n * p.c + c)] = pre_activation_map(channel_affine(p, a, n, c), group_mean, group_rstd);
    maps[2 * (n * p.c + c) + 1] = dx;
  }
}

// The elementwise passes (see the top of the file). A vector of kVec elements never crosses
// a sample, and shares one channel (NCHW, S % kVec == 0: one map per vector) or holds kVec
// consecutive channels (channels_last, C % kVec == 0: kVec maps).
constexpr int kUnroll = 4;
constexpr int64_t kTile = kThreads * kUnroll;  // vectors per block
// normalize_kernel's register cap: 5 blocks a SM keep 80 KB in flight (uncapped, sm_90 bf16
// took 57 registers: 4 blocks, 64 KB). dx_kernel, with 2·kUnroll vectors a thread, keeps
// 3–4 blocks (96–128 KB) uncapped.
constexpr int kNormalizeBlocks = 5;

// A thread's vectors within its sample, first + k·kThreads (k < kUnroll), and the (first)
// channel of each, or −1 past the sample's end; the same in every sample. One division per
// thread, none per vector: vector v is (v / d, v % d) with d = S/kVec (NCHW: the quotient
// is the channel) or d = C/kVec (channels_last: kVec × the remainder is), and kThreads
// vectors further on adds (kThreads / d, kThreads % d), with at most one carry.
template <int kVec, bool kChannelsLast>
struct ThreadVectors {
  int64_t first;
  int channel[kUnroll];  // 2·C < 2³¹: map indices stay int

  __device__ __forceinline__ explicit ThreadVectors(const GroupNormParams& p) {
    const int64_t vectors = p.c * p.s / kVec;
    const int64_t d = (kChannelsLast ? p.c : p.s) / kVec;
    first = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
    int64_t q = first / d, r = first % d;
    const int step_q = d > kThreads ? 0 : kThreads / static_cast<int>(d);
    const int step_r = d > kThreads ? kThreads : kThreads % static_cast<int>(d);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      channel[k] = first + k * kThreads < vectors ? static_cast<int>(kChannelsLast ? r * kVec : q) : -1;
      q += step_q;
      r += step_r;
      if (r >= d) {
        r -= d;
        ++q;
      }
    }
  }

  __device__ __forceinline__ bool valid(int k) const { return channel[k] >= 0; }
  // Element offset of vector k within its sample.
  __device__ __forceinline__ int64_t offset(int k) const { return (first + k * kThreads) * kVec; }
  // The map of element `lane` of vector k, among a sample's maps spaced `stride` apart.
  __device__ __forceinline__ const LinearMap& map(const LinearMap* maps, int stride, int k, int lane) const {
    return maps[stride * (channel[k] + (kChannelsLast ? lane : 0))];
  }
};

// The vector at p, or zeros when !valid. Loaded as 32-bit words where it can be: zeros and
// a predicated load merged per 16-bit element would take a register per element.
template <typename T, int kVec>
__device__ __forceinline__ Vec<T, kVec> load_if(const T* p, bool valid) {
  using Word = std::conditional_t<sizeof(T) * kVec % sizeof(uint32_t) == 0, uint32_t, T>;
  constexpr int kWords = sizeof(T) * kVec / sizeof(Word);
  Vec<Word, kWords> words = {};
  if (valid) words = load_vec<Word, kWords>(reinterpret_cast<const Word*>(p));
  return bits_as<Vec<T, kVec>>(words);
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, kNormalizeBlocks)
    normalize_kernel(GroupNormParams p, const T* x, const LinearMap* maps, T* y) {
  const ThreadVectors<kVec, kChannelsLast> mine(p);
  for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
    const int64_t sample = n * p.c * p.s;
    const LinearMap* sample_maps = maps + n * p.c;
    Vec<T, kVec> in[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) in[k] = load_if<T, kVec>(x + sample + mine.offset(k), mine.valid(k));
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (!mine.valid(k)) continue;
      Vec<T, kVec> out;
#pragma unroll
      for (int lane = 0; lane < kVec; ++lane) {
        const LinearMap& z = mine.map(sample_maps, 1, k, lane);
        out.v[lane] = from_float<T>(activate(p, z(to_float(in[k].v[lane]))));
      }
      store_vec(y + sample + mine.offset(k), out);
    }
  }
}

// NCHW, one pass: block n·G + g holds its group's Cg·S contiguous elements in registers,
// kGroupVectors 16-byte vectors a thread (64 KB: 32768 fp16/bf16 or 16384 fp32 elements),
// all loaded before any math. It sums them twice from the registers (an estimate of the
// mean, then the deviations from it) for the mean and variance, folds each of the group's
// channels into its map z = x·gain + offset (a thread a channel, into shared memory), and
// writes y from the same registers: x crosses HBM once (2·E·s_x in all).
// __launch_bounds__(kThreads, 2): 2 blocks an SM, 128 KB of loads in flight.
constexpr int kGroupVectors = 16;
constexpr int kGroupChannels = kThreads;  // at most a channel a thread for the maps

// Marks a held vector's bits as changed (an empty asm on each 32-bit word), so that nvcc
// converts it to float again where it is used next rather than keeping the conversions
// of an earlier use alive: with bf16 on sm_90 it kept them, 16-bit halves, and spilled.
template <typename V>
__device__ __forceinline__ void reconvert(V& v) {
  auto words = bits_as<Vec<uint32_t, sizeof(V) / sizeof(uint32_t)>>(v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(uint32_t)); ++i) asm volatile("" : "+r"(words.v[i]));
  v = bits_as<V>(words);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 2)
    group_in_registers_kernel(GroupNormParams p, GroupNormAffine a, const T* x, T* y, float* mean, float* rstd) {
  __shared__ LinearMap maps[kGroupChannels];
  __shared__ float shared_estimate;
  __shared__ double group_mean, group_rstd;  // thread 0's, for every thread
  // n and the first channel by 32-bit division (a 64-bit one is a subroutine call, whose
  // frame would spill the held data): the grid has N·G < 2^31 blocks. The launcher's
  // bounds make count ≤ kGroupVectors·kThreads·kVec, hence S and Cg, an int too.
  const int groups = static_cast<int>(p.groups);
  const int n = static_cast<int>(blockIdx.x) / groups;
  const int first_channel = static_cast<int>(blockIdx.x) % groups * static_cast<int>(p.channels_per_group);
  const int64_t group = blockIdx.x;
  const int count = static_cast<int>(p.channels_per_group * p.s), s = static_cast<int>(p.s);
  const int vectors = count / kVec;  // S, hence count, is a multiple of kVec
  const T* in = x + group * count;
  T* out = y + group * count;
  Vec<T, kVec> held[kGroupVectors];
#pragma unroll
  for (int k = 0; k < kGroupVectors; ++k) {
    const int v = k * kThreads + static_cast<int>(threadIdx.x);
    held[k] = load_if<T, kVec>(in + v * kVec, v < vectors);  // zeros past the group add nothing
  }
  // The statistics in two passes over the held data (the corrected two-pass algorithm):
  // an estimate m̂ of the mean, from each thread's first vector (up to kThreads·kVec
  // elements: cheaper in registers than all of them, and as good a reference), then the
  // sums of d = x − m̂ over the group, which give mean = m̂ + Σd/n and
  // var = Σd²/n − (Σd/n)². Σd/n, m̂'s error, is small beside the spread, so nothing
  // cancels: neither at a large mean with a small spread (m̂ and x agree in their leading
  // digits, so x − m̂ is exact) nor with an outlier, which a shift by one element (the
  // group's first, as this kernel once did) made the reference every d² is taken from
  // (an outlier first in its group: 2e-4 relative error in rstd). Sums that overflow
  // float32 give NaN statistics, as every backend's do.
  __syncthreads();  // every thread's loads issued before any math
  float first[1] = {0.0f};
#pragma unroll
  for (int lane = 0; lane < kVec; ++lane) first[0] += to_float(held[0].v[lane]);  // zeros past the group
  block_sum(first);
  // In float with the hardware's approximate reciprocal (2 ulp): an IEEE division is a
  // subroutine call, whose frame would spill the held data.
  const float inv_count = __fdividef(1.0f, static_cast<float>(count));
  const int first_elements = (vectors < kThreads ? vectors : kThreads) * kVec;  // the valid ones
  if (threadIdx.x == 0) shared_estimate = first[0] * __fdividef(1.0f, static_cast<float>(first_elements));
  __syncthreads();
  const float estimate = shared_estimate;
  float sums[2] = {0.0f, 0.0f};
#pragma unroll
  for (int k = 0; k < kGroupVectors; ++k) {
    const bool valid = k * kThreads + static_cast<int>(threadIdx.x) < vectors;
    reconvert(held[k]);  // converted again, not kept as floats from the first pass
#pragma unroll
    for (int lane = 0; lane < kVec; ++lane) {
      const float d = valid ? to_float(held[k].v[lane]) - estimate : 0.0f;
      sums[0] += d;
      sums[1] += d * d;
    }
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    // rsqrt with the hardware's approximation (2 ulp): a float64 sqrt is a subroutine call too.
    const float offset = sums[0] * inv_count;
    const float variance = sums[1] * inv_count - offset * offset;
    // Statistics that overflowed float32 (or met a NaN) give NaN, on every backend
    // (checked before the clamp: fmaxf would turn a NaN into 0).
    const float rstd_f = variance < INFINITY ? rsqrtf(fmaxf(variance, 0.0f) + p.eps) : NAN;
    group_mean = static_cast<double>(estimate) + static_cast<double>(offset);
    mean[group] = static_cast<float>(group_mean);
    rstd[group] = rstd_f;
    group_rstd = rstd_f;
  }
  __syncthreads();
  if (threadIdx.x < p.channels_per_group) {
    maps[threadIdx.x] = pre_activation_map(channel_affine(p, a, n, first_channel + threadIdx.x), group_mean, group_rstd);
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kGroupVectors; ++k) {
    const int v = k * kThreads + static_cast<int>(threadIdx.x);
    if (v >= vectors) continue;
    reconvert(held[k]);
    const LinearMap z = maps[v * kVec / s];  // a vector is one channel's: S is a multiple of kVec
    Vec<T, kVec> result;
#pragma unroll
    for (int lane = 0; lane < kVec; ++lane) result.v[lane] = from_float<T>(activate(p, z(to_float(held[k].v[lane]))));
    store_vec(out + v * kVec, result);
  }
}

template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) dx_kernel(GroupNormParams p, const T* dy, const T* x,
                                                      const LinearMap* maps, T* dx) {
  const ThreadVectors<kVec, kChannelsLast> mine(p);
  for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
    const int64_t sample = n * p.c * p.s;
    const LinearMap* sample_maps = maps + 2 * n * p.c;  // (z map, dx map) per channel
    Vec<T, kVec> x_in[kUnroll], dy_in[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      x_in[k] = load_if<T, kVec>(x + sample + mine.offset(k), mine.valid(k));
      dy_in[k] = load_if<T, kVec>(dy + sample + mine.offset(k), mine.valid(k));
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (!mine.valid(k)) continue;
      Vec<T, kVec> out;
#pragma unroll
      for (int lane = 0; lane < kVec; ++lane) {
        const LinearMap& z = mine.map(sample_maps, 2, k, lane);
        const LinearMap& dx_rest = mine.map(sample_maps + 1, 2, k, lane);
        const float x_value = to_float(x_in[k].v[lane]);
        const float dz = backward_dz_at(p, to_float(dy_in[k].v[lane]), z(x_value));
        out.v[lane] = from_float<T>(fmaf(dz, z.gain, dx_rest(x_value)));
      }
      store_vec(dx + sample + mine.offset(k), out);
    }
  }
}

bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }
bool aligned16(const void* ptr) { return aligned_to(ptr, 16); }

// kVec when the layout and the pointers allow 16-byte vectors, else 1.
template <typename T>
int vector_width(const GroupNormParams& p, const void* a, const void* b, const void* c) {
  constexpr int kVec = 16 / sizeof(T);
  const bool runs = p.channels_last ? p.c % kVec == 0 : p.s % kVec == 0;
  const bool aligned = aligned16(a) && aligned16(b) && (c == nullptr || aligned16(c));
  return runs && aligned ? kVec : 1;
}

// (tiles of a sample, samples); the grid's kMaxGridY rows stride over more samples.
dim3 elementwise_grid(const GroupNormParams& p, int vec) {
  const int64_t tiles = (p.c * p.s / vec + kTile - 1) / kTile;
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.n < kMaxGridY ? p.n : kMaxGridY));
}

template <typename T, SumsMode kMode>
void launch_channel_sums(const GroupNormParams& p, const ChannelSumsArgs<T, kMode>& a, int vec, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (p.channels_last) {
    // The backward reads channel pairs where C and x and dy allow.
    const bool pairs = kMode == SumsMode::kBackward && p.c % 2 == 0 && aligned_to(a.x, 2 * sizeof(T)) &&
                       aligned_to(a.dy, 2 * sizeof(T));
    const int channels = pairs ? 2 : 1;
    const int64_t tiles = (p.c + kWarpSize * channels - 1) / (kWarpSize * channels);
    const dim3 grid(static_cast<unsigned>(p.n * tiles), p.chunks);
    if constexpr (kMode == SumsMode::kMoments) {
      launch_kernel(channel_moments_nhwc_kernel<T>, grid, kThreads, stream, p, a);
    } else if (pairs) {
      launch_kernel(channel_sums_nhwc_kernel<T, 2>, grid, kThreads, stream, p, a);
    } else {
      launch_kernel(channel_sums_nhwc_kernel<T, 1>, grid, kThreads, stream, p, a);
    }
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
                  float* partials, float* shifts, LinearMap* maps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vector_width<T>(p, x, y, nullptr);
  if (p.group_in_registers && vec == kVec && p.channels_per_group <= kGroupChannels &&
      p.channels_per_group * p.s <= static_cast<int64_t>(kGroupVectors) * kThreads * kVec) {
    launch_kernel(group_in_registers_kernel<T, kVec>, static_cast<unsigned>(p.n * p.groups), kThreads, stream, p, a,
                  x, y, mean, rstd);
    return static_cast<int>(cudaGetLastError());
  }
  launch_channel_sums(p, ChannelSumsArgs<T, SumsMode::kMoments>{x, nullptr, a, nullptr, nullptr, partials, shifts},
                      vec, stream);
  launch_kernel(forward_statistics_kernel, group_blocks(p), kThreads, stream, p, a, partials, shifts, mean, rstd,
                maps);
  const dim3 grid = elementwise_grid(p, vec);
  if (vec == kVec && p.channels_last) {
    launch_kernel(normalize_kernel<T, kVec, true>, grid, kThreads, stream, p, x, maps, y);
  } else if (vec == kVec) {
    launch_kernel(normalize_kernel<T, kVec, false>, grid, kThreads, stream, p, x, maps, y);
  } else if (p.channels_last) {
    launch_kernel(normalize_kernel<T, 1, true>, grid, kThreads, stream, p, x, maps, y);
  } else {
    launch_kernel(normalize_kernel<T, 1, false>, grid, kThreads, stream, p, x, maps, y);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward_typed(const GroupNormParams& p, const T* dy, const T* x, const GroupNormAffine& a, const float* mean,
                   const float* rstd, T* dx, float* sums, float* partials, LinearMap* maps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vector_width<T>(p, x, dy, dx);
  launch_channel_sums(p, ChannelSumsArgs<T, SumsMode::kBackward>{x, dy, a, mean, rstd, partials, nullptr}, vec,
                      stream);
  launch_kernel(backward_group_kernel, group_blocks(p), kThreads, stream, p, a, mean, rstd, partials, sums, maps);
  const dim3 grid = elementwise_grid(p, vec);
  if (vec == kVec && p.channels_last) {
    launch_kernel(dx_kernel<T, kVec, true>, grid, kThreads, stream, p, dy, x, maps, dx);
  } else if (vec == kVec) {
    launch_kernel(dx_kernel<T, kVec, false>, grid, kThreads, stream, p, dy, x, maps, dx);
  } else if (p.channels_last) {
    launch_kernel(dx_kernel<T, 1, true>, grid, kThreads, stream, p, dy, x, maps, dx);
  } else {
    launch_kernel(dx_kernel<T, 1, false>, grid, kThreads, stream, p, dy, x, maps, dx);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_group_norm_forward(StorageType dtype, const GroupNormParams& p, const void* x, const GroupNormAffine& a,
                              void* y, float* mean, float* rstd, float* partials, float* shifts, float* maps,
                              void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  LinearMap* m = reinterpret_cast<LinearMap*>(maps);
  switch (dtype) {
    case StorageType::kFloat32:
      return forward_typed(p, static_cast<const float*>(x), a, static_cast<float*>(y), mean, rstd, partials, shifts, m,
                           s);
    case StorageType::kFloat16:
      return forward_typed(p, static_cast<const __half*>(x), a, static_cast<__half*>(y), mean, rstd, partials, shifts,
                           m, s);
    case StorageType::kBFloat16:
      return forward_typed(p, static_cast<const __nv_bfloat16*>(x), a, static_cast<__nv_bfloat16*>(y), mean, rstd,
                           partials, shifts, m, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_group_norm_backward(StorageType dtype, const GroupNormParams& p, const void* dy, const void* x,
                               const GroupNormAffine& a, const float* mean, const float* rstd, void* dx, float* sums,
                               float* partials, float* maps, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  LinearMap* m = reinterpret_cast<LinearMap*>(maps);
  switch (dtype) {
    case StorageType::kFloat32:
      return backward_typed(p, static_cast<const float*>(dy), static_cast<const float*>(x), a, mean, rstd,
                            static_cast<float*>(dx), sums, partials, m, s);
    case StorageType::kFloat16:
      return backward_typed(p, static_cast<const __half*>(dy), static_cast<const __half*>(x), a, mean, rstd,
                            static_cast<__half*>(dx), sums, partials, m, s);
    case StorageType::kBFloat16:
      return backward_typed(p, static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x), a, mean,
                            rstd, static_cast<__nv_bfloat16*>(dx), sums, partials, m, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace fastguide
