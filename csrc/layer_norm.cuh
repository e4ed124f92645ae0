// LayerNorm over the last dim with DiT's adaLN modulation and the fused gated residual,
// forward and backward, as host/device math shared by the CUDA kernels (layer_norm.cu)
// and the CPU harness.
//
// x is (N, L, D), dense: R = N·L rows of D elements; row r is token l = r mod L of sample
// n = r / L. The parameters, each dense in its own storage type (fp32, fp16 or bf16,
// whatever x's) and read as fp32: weight, bias (D,); scale, shift and the residual gate
// (N, 1, D) per sample or (N, L, D) per token.
// Forward:  (residual form: x = h + gate·branch, rounded to the storage type, written
//           as h_new) x̂ = (x − mean)·rstd per row, y = (x̂·w + b)·(1 + scale) + shift.
//   Statistics: the row's shifted sums Σ(x − K), Σ(x − K)² with K = the row's first
//   element (the shift keeps E[x²] − E[x]² from cancelling when |mean| ≫ std).
// Backward: da = dy·(1 + scale), dx̂ = da·w,
//   dx = rstd·(dx̂ − mean_D(dx̂) − x̂·mean_D(dx̂·x̂)); per-token dshift = dy, dscale = dy·a
//   (a = x̂·w + b); per (sample, column) over the tokens A = Σdy, B = Σdy·x̂, C = Σda,
//   E = Σda·x̂, from which the glue forms dweight, dbias and per-sample dscale, dshift.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace fastguide {

struct LayerNormParams {
  int64_t rows, tokens, d;  // R = N·L, L, D
  int chunks;               // token chunks per sample in the backward column sums
  bool scale_per_token, shift_per_token, gate_per_token;
  float eps;
};

// The parameters; data null when absent (gate: the residual form only).
struct LayerNormAffine {
  Parameter weight, bias, scale, shift, gate;
};

// Offset of row `row`'s parameter row in a per-sample (N, 1, D) or per-token (N, L, D) tensor.
FG_HOST_DEVICE int64_t parameter_row(const LayerNormParams& p, int64_t row, bool per_token) {
  return (per_token ? row : row / p.tokens) * p.d;
}

// The per-column constants of the element maps.
struct ColumnAffine {
  float w, b, one_plus_scale, shift;
};

FG_HOST_DEVICE ColumnAffine column_affine(const LayerNormParams& p, const LayerNormAffine& a, int64_t row,
                                          int64_t j) {
  return {a.weight.load(j, 1.0f), a.bias.load(j, 0.0f),
          1.0f + a.scale.load(parameter_row(p, row, p.scale_per_token) + j, 0.0f),
          a.shift.load(parameter_row(p, row, p.shift_per_token) + j, 0.0f)};
}

// h + gate·branch in fp32 (the caller rounds it to the storage type).
FG_HOST_DEVICE float residual_element(float h, float gate, float branch) { return h + gate * branch; }

// dx from dx̂ and x̂, given the row's mean_D(dx̂) and mean_D(dx̂·x̂).
FG_HOST_DEVICE float layer_norm_dx(float dx_hat, float x_hat, float rstd, float mean_dx_hat, float mean_dx_hat_xhat) {
  return rstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_xhat);
}

// The per-(sample, column) sums (A, B, C, E) of one element.
FG_HOST_DEVICE void add_column_sums(const ColumnAffine& k, float dy, float x_hat, float (&acc)[4]) {
  const float da = dy * k.one_plus_scale;
  acc[0] += dy;
  acc[1] += dy * x_hat;
  acc[2] += da;
  acc[3] += da * x_hat;
}

// Forward: y, mean and rstd (R,); h_new and branch (of `dtype`) only in the residual form
// (a.gate set). Returns 0 or a cudaError_t.
int launch_layer_norm_forward(StorageType dtype, const LayerNormParams& p, const void* x, const void* branch,
                              const LayerNormAffine& a, void* h_new, void* y, float* mean, float* rstd, void* stream);

// Backward: dx; per-token dscale and dshift (fp32, null unless per token); partial sums
// (N, chunks, 4, D) of (A, B, C, E).
int launch_layer_norm_backward(StorageType dtype, const LayerNormParams& p, const void* dy, const void* x,
                               const LayerNormAffine& a, const float* mean, const float* rstd, void* dx,
                               float* dscale, float* dshift, float* partials, void* stream);

}  // namespace fastguide
