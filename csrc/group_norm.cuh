// GroupNorm with fused affine, ADM scale-shift and SiLU, forward and backward, as
// host/device math shared by the CUDA kernels (group_norm.cu) and the CPU harness.
//
// x is (N, C, S) in NCHW (offset c·S + s within a sample) or channels_last (s·C + c),
// grouped into G groups of Cg = C/G channels.
// Forward:  x̂ = (x − mean)·rstd per (n, g), a = x̂·w[c] + b[c],
//           z = a·(1 + scale[n, c]) + shift[n, c], y = silu(z) or z.
//   Statistics: per (n, c) the shifted sums Σ(x − K), Σ(x − K)² with K = x[n, c, 0]
//   (the shift keeps E[x²] − E[x]² from cancelling when |mean| ≫ std), merged per group
//   in float64 with Chan's formula (equal counts S per channel).
// Backward: dz = dy·silu'(z) (or dy), A[n, c] = Σ_s dz, B[n, c] = Σ_s dz·x̂,
//   dshift = A, dscale = w·B + b·A, dbias = Σ_n (1 + scale)·A, dweight = Σ_n (1 + scale)·B,
//   dx = rstd·(dz·(1 + scale)·w − (S1 + x̂·S2)/(Cg·S)) with, per (n, g),
//   S1 = Σ_{c∈g} w(1 + scale)·A and S2 = Σ_{c∈g} w(1 + scale)·B.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace fastguide {

struct GroupNormParams {
  int64_t n, c, s, groups, channels_per_group;
  int chunks;  // spatial chunks per channel in the per-channel reduction
  bool channels_last, has_weight, has_bias, has_scale, has_shift, silu;
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

// y from x (forward element map).
FG_HOST_DEVICE float normalize_element(const GroupNormParams& p, const ChannelAffine& k, float x, float mean,
                                       float rstd) {
  const float z = ((x - mean) * rstd * k.w + k.b) * k.one_plus_scale + k.shift;
  return p.silu ? z * sigmoid(z) : z;
}

// dz = dy·silu'(z) at the pre-activation z recomputed from x̂; silu'(z) = σ(z)·(1 + z·(1 − σ(z))).
FG_HOST_DEVICE float backward_dz(const GroupNormParams& p, const ChannelAffine& k, float dy, float x_hat) {
  if (!p.silu) return dy;
  const float z = (x_hat * k.w + k.b) * k.one_plus_scale + k.shift;
  const float sig = sigmoid(z);
  return dy * sig * (1.0f + z * (1.0f - sig));
}

// dx from dz and x̂, given the group's S1/(Cg·S) and S2/(Cg·S).
FG_HOST_DEVICE float backward_dx(const ChannelAffine& k, float dz, float x_hat, float rstd, float mean_s1,
                                 float mean_s2) {
  return rstd * (dz * k.one_plus_scale * k.w - mean_s1 - x_hat * mean_s2);
}

// The per-channel sums: forward Σ(x − K), Σ(x − K)²; backward Σdz, Σdz·x̂.
FG_HOST_DEVICE void add_moments(float x, float shift, float (&acc)[2]) {
  const float d = x - shift;
  acc[0] += d;
  acc[1] += d * d;
}
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

// Sum of the `chunks` partial pairs of channel (n, c): partials are (N, C, chunks, 2).
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

// Channel c's mean and within-channel sum of squared deviations (float64), from its
// shifted sums and its shift K.
FG_HOST_DEVICE void channel_moments(const GroupNormParams& p, const float* partials, const float* shifts, int64_t n,
                                    int64_t c, double& mean, double& m2) {
  double d1, d2;
  channel_totals(p, partials, n, c, d1, d2);
  const double count = static_cast<double>(p.s);
  mean = static_cast<double>(shifts[n * p.c + c]) + d1 / count;
  m2 = d2 - d1 * d1 / count;
}

// A group's mean and rstd from Chan's merge of its channels (equal counts S):
// mean = Σ_c mean_c / Cg, M2 = Σ_c [m2_c + S·(mean_c − mean)²], var = M2/(Cg·S).
FG_HOST_DEVICE void finish_statistics(const GroupNormParams& p, double mean, double m2, float& mean_out,
                                      float& rstd_out) {
  const double variance = m2 / (static_cast<double>(p.s) * static_cast<double>(p.channels_per_group));
  mean_out = static_cast<float>(mean);
  // Statistics that overflowed float32 partial sums (or met a NaN) give NaN, on every backend.
  rstd_out = variance < HUGE_VAL ? static_cast<float>(1.0 / sqrt(fmax(variance, 0.0) + static_cast<double>(p.eps)))
                                 : NAN;
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

// Forward: y (x's layout), mean and rstd (N, G). Workspace: partials (N, C, chunks, 2)
// and shifts (N, C), fp32; x, y of `dtype`. Returns 0 or a cudaError_t.
int launch_group_norm_forward(StorageType dtype, const GroupNormParams& p, const void* x, const GroupNormAffine& a,
                              void* y, float* mean, float* rstd, float* partials, float* shifts, void* stream);

// Backward: dx (x's layout) and sums (N, C, 2) = (A, B) for the parameter gradients.
// Workspace: partials (N, C, chunks, 2), group_sums (N, G, 2), fp32.
int launch_group_norm_backward(StorageType dtype, const GroupNormParams& p, const void* dy, const void* x,
                               const GroupNormAffine& a, const float* mean, const float* rstd, void* dx,
                               float* sums, float* partials, float* group_sums, void* stream);

}  // namespace fastguide
