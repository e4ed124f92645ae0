// GroupNorm with fused affine, ADM scale-shift and SiLU, forward and backward, as
// host/device math shared by the CUDA kernels (group_norm.cu) and the CPU harness.
//
// x is (N, C, S) in NCHW (offset c·S + s within a sample) or channels_last (s·C + c),
// grouped into G groups of Cg = C/G channels.
// Forward:  x̂ = (x − mean)·rstd per (n, g), a = x̂·w[c] + b[c],
//           z = a·(1 + scale[n, c]) + shift[n, c], y = silu(z) or z.
//   Statistics: per (n, c, spatial chunk) the moments (count, mean, M2 = Σ(d − mean)²) of
//   d = x − K, K = the median of x[n, c, 0], x[n, c, S/2] and x[n, c, S − 1] (the shift
//   keeps the means small when |mean| ≫ std, and is no single outlier), each
//   thread's merged over its steps and the threads over the block by Chan's formula (no
//   sum of squares cancels, whatever K is); the chunks and then the group's channels
//   merged the same way in float64.
// Backward: dz = dy·silu'(z) (or dy), A[n, c] = Σ_s dz, B[n, c] = Σ_s dz·x̂,
//   dshift = A, dscale = w·B + b·A, dbias = Σ_n (1 + scale)·A, dweight = Σ_n (1 + scale)·B,
//   dx = rstd·(dz·(1 + scale)·w − (S1 + x̂·S2)/(Cg·S)) with, per (n, g),
//   S1 = Σ_{c∈g} w(1 + scale)·A and S2 = Σ_{c∈g} w(1 + scale)·B.
// The elementwise passes read per-(n, c) linear maps (LinearMap) that the per-group merges
// fold in float64 from all of that, so an element costs one or two FMAs (+ SiLU) and
// 8-byte loads of cached constants rather than six parameter loads:
//   z = x·gain + offset, gain = rstd·w·(1 + scale), offset = (b − mean·rstd·w)·(1 + scale) + shift;
//   dx = dz·gain + x·slope + intercept, slope = −rstd²·S2/(Cg·S),
//        intercept = −rstd·S1/(Cg·S) − mean·slope.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace fastguide {

struct GroupNormParams {
  int64_t n, c, s, groups, channels_per_group;
  int chunks;  // spatial chunks per channel in the per-channel reduction
  bool channels_last, has_weight, has_bias, has_scale, has_shift, silu;
  // NCHW with at least two groups an SM: the forward holds each group in one block's
  // registers where it fits (64 KB, at most a channel a thread) and x's vectors align.
  bool group_in_registers;
  float eps;
};

// The parameters, each dense in its own storage type (weight, bias: (C,); scale, shift:
// (N, C)); data null when absent.
struct GroupNormAffine {
  Parameter weight, bias, scale, shift;
};

// The per-channel constants of the element maps.
struct ChannelAffine {
  float w, b, one_plus_scale, shift;
};

FG_HOST_DEVICE ChannelAffine channel_affine(const GroupNormParams& p, const GroupNormAffine& a, int64_t n, int64_t c) {
  return {a.weight.load(c, 1.0f), a.bias.load(c, 0.0f), 1.0f + a.scale.load(n * p.c + c, 0.0f),
          a.shift.load(n * p.c + c, 0.0f)};
}

// Offset of (n, c, s) in x's memory order, and the channel of flat offset i.
FG_HOST_DEVICE int64_t element_offset(const GroupNormParams& p, int64_t n, int64_t c, int64_t s) {
  return n * p.c * p.s + (p.channels_last ? s * p.c + c : c * p.s + s);
}
FG_HOST_DEVICE int64_t channel_of(const GroupNormParams& p, int64_t i) {
  return p.channels_last ? i % p.c : (i / p.s) % p.c;
}

FG_HOST_DEVICE float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// y from the pre-activation z.
FG_HOST_DEVICE float activate(const GroupNormParams& p, float z) { return p.silu ? z * sigmoid(z) : z; }

// dz = dy·silu'(z) (or dy); silu'(z) = σ(z)·(1 + z·(1 − σ(z))).
FG_HOST_DEVICE float backward_dz_at(const GroupNormParams& p, float dy, float z) {
  if (!p.silu) return dy;
  const float sig = sigmoid(z);
  return dy * sig * (1.0f + z * (1.0f - sig));
}

// dz at the pre-activation z recomputed from x̂ (the per-channel sums).
FG_HOST_DEVICE float backward_dz(const GroupNormParams& p, const ChannelAffine& k, float dy, float x_hat) {
  return backward_dz_at(p, dy, (x_hat * k.w + k.b) * k.one_plus_scale + k.shift);
}

// x ↦ x·gain + offset: a channel's constants as the elementwise passes read them, one
// 8-byte load each (8-byte aligned only, so two of them never fuse into a 16-byte load).
struct alignas(8) LinearMap {
  float gain, offset;

  FG_HOST_DEVICE float operator()(float x) const { return fmaf(x, gain, offset); }
};

// x ↦ z of channel k, from its group's mean and rstd (float64, each constant rounded once;
// a NaN rstd gives NaN).
FG_HOST_DEVICE LinearMap pre_activation_map(const ChannelAffine& k, double mean, double rstd) {
  const double gain = rstd * k.w * k.one_plus_scale;
  const double offset = (k.b - mean * rstd * k.w) * k.one_plus_scale + k.shift;
  return {static_cast<float>(gain), static_cast<float>(offset)};
}

// x ↦ dx − dz·gain of a channel of the group with S1/(Cg·S) = mean_s1, S2/(Cg·S) = mean_s2.
FG_HOST_DEVICE LinearMap dx_map(double mean, double rstd, double mean_s1, double mean_s2) {
  const double slope = -rstd * rstd * mean_s2;
  return {static_cast<float>(slope), static_cast<float>(-rstd * mean_s1 - mean * slope)};
}

// The forward's per-channel partials: (count, mean, M2 = Σ(d − mean)²) of d = x − K.
constexpr int kMomentFields = 3;

// A channel's shift K: the median of its first, middle and last elements, so that one
// outlier among them is not K. The moments of x − K merge their means with a rounding of
// 2⁻²⁴·|mean of x − K| each: with an outlier at K that is up to 2⁻²⁴·√n·σ a merge (a
// shift of 0 would give 2⁻²⁴·|mean| instead, past the input's own rounding when
// |mean| ≫ σ).
FG_HOST_DEVICE float median_of_three(float a, float b, float c) { return fmaxf(fminf(a, b), fminf(fmaxf(a, b), c)); }

// The backward's per-channel sums Σdz, Σdz·x̂.
FG_HOST_DEVICE void add_backward_sums(const GroupNormParams& p, const ChannelAffine& k, float dy, float x, float mean,
                                      float rstd, float (&acc)[2]) {
  const float x_hat = (x - mean) * rstd;
  const float dz = backward_dz(p, k, dy, x_hat);
  acc[0] += dz;
  acc[1] += dz * x_hat;
}

// Spatial positions per chunk of the per-channel reduction: a multiple of `vec`.
FG_HOST_DEVICE int64_t chunk_positions(const GroupNormParams& p, int vec) {
  const int64_t per_chunk = (p.s + p.chunks - 1) / p.chunks;
  return (per_chunk + vec - 1) / vec * vec;
}

// Sum of the `chunks` partial pairs of channel (n, c) (the backward's): partials are
// (N, C, chunks, 2).
FG_HOST_DEVICE void channel_totals(const GroupNormParams& p, const float* partials, int64_t n, int64_t c,
                                   double& first, double& second) {
  first = 0.0;
  second = 0.0;
  const float* row = partials + (n * p.c + c) * p.chunks * 2;
  for (int k = 0; k < p.chunks; ++k) {
    first += static_cast<double>(row[2 * k]);
    second += static_cast<double>(row[2 * k + 1]);
  }
}

// Channel c's mean and M2 = Σ(x − mean)² (float64), from its chunks' (count, mean, M2) of
// x − K (partials (N, C, chunks, kMomentFields)) and its shift K, merged by Chan's formula
// in two passes over the chunks: mean = Σ n_k·mean_k / n, M2 = Σ [M2_k + n_k·(mean_k − mean)²].
FG_HOST_DEVICE void channel_moments(const GroupNormParams& p, const float* partials, const float* shifts, int64_t n,
                                    int64_t c, double& mean, double& m2) {
  const float* row = partials + (n * p.c + c) * p.chunks * kMomentFields;
  double count = 0.0, weighted = 0.0;
  for (int k = 0; k < p.chunks; ++k) {
    const float* chunk = row + kMomentFields * k;
    count += static_cast<double>(chunk[0]);
    weighted += static_cast<double>(chunk[0]) * static_cast<double>(chunk[1]);
  }
  const double offset = weighted / count;  // count = S ≥ 1
  m2 = 0.0;
  for (int k = 0; k < p.chunks; ++k) {
    const float* chunk = row + kMomentFields * k;
    const double deviation = static_cast<double>(chunk[1]) - offset;
    m2 += static_cast<double>(chunk[2]) + static_cast<double>(chunk[0]) * deviation * deviation;
  }
  mean = static_cast<double>(shifts[n * p.c + c]) + offset;
}

// A group's mean and rstd from Chan's merge of its channels (equal counts S):
// mean = Σ_c mean_c / Cg, M2 = Σ_c [m2_c + S·(mean_c − mean)²], var = M2/(Cg·S).
// Returns rstd in float64.
FG_HOST_DEVICE double finish_statistics(const GroupNormParams& p, double mean, double m2, float& mean_out,
                                        float& rstd_out) {
  const double variance = m2 / (static_cast<double>(p.s) * static_cast<double>(p.channels_per_group));
  mean_out = static_cast<float>(mean);
  // A group whose variance is past float32's range (constant channels of ±1e30: each M2 is 0,
  // the group's variance 1e60), or met a NaN or ±inf, is NaN, on every backend; float64 holds
  // it, where the float32 statistics of the others overflow.
  const double rstd =
      variance <= static_cast<double>(FLT_MAX) ? 1.0 / sqrt(fmax(variance, 0.0) + static_cast<double>(p.eps)) : NAN;
  rstd_out = static_cast<float>(rstd);
  return rstd;
}

// Channel c's merged (A, B) = (Σ_s dz, Σ_s dz·x̂), written to sums (N, C, 2), and its terms
// w(1 + scale)·A and w(1 + scale)·B of the group sums S1 and S2.
FG_HOST_DEVICE void channel_backward_terms(const GroupNormParams& p, const GroupNormAffine& a, const float* partials,
                                           float* sums, int64_t n, int64_t c, double& s1_term, double& s2_term) {
  double sum_dz, sum_dz_xhat;
  channel_totals(p, partials, n, c, sum_dz, sum_dz_xhat);
  sums[(n * p.c + c) * 2] = static_cast<float>(sum_dz);
  sums[(n * p.c + c) * 2 + 1] = static_cast<float>(sum_dz_xhat);
  const ChannelAffine k = channel_affine(p, a, n, c);
  const double factor = static_cast<double>(k.w) * static_cast<double>(k.one_plus_scale);
  s1_term = factor * sum_dz;
  s2_term = factor * sum_dz_xhat;
}

// Forward: y (x's layout), mean and rstd (N, G). Workspace: partials (N, C, chunks, kMomentFields),
// shifts (N, C) and maps (N, C, 2) (a LinearMap per channel), fp32; x, y of `dtype`.
// Returns 0 or a cudaError_t.
int launch_group_norm_forward(StorageType dtype, const GroupNormParams& p, const void* x, const GroupNormAffine& a,
                              void* y, float* mean, float* rstd, float* partials, float* shifts, float* maps,
                              void* stream);

// Backward: dx (x's layout) and sums (N, C, 2) = (A, B) for the parameter gradients.
// Workspace: partials (N, C, chunks, 2) and maps (N, C, 4) (two LinearMaps per channel), fp32.
int launch_group_norm_backward(StorageType dtype, const GroupNormParams& p, const void* dy, const void* x,
                               const GroupNormAffine& a, const float* mean, const float* rstd, void* dx,
                               float* sums, float* partials, float* maps, void* stream);

}  // namespace fastguide
