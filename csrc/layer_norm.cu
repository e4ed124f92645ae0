// CUDA LayerNorm (+ adaLN modulation, fused gated residual), forward and backward. The
// math is layer_norm.cuh's; this file maps it onto threads.
//
// Forward, one launch: a warp per row (8 rows per block). Pass 1 reads the row (16-byte
// vectors when D and the pointers allow) for its shifted sums, reduced with shuffles;
// pass 2 reads it again (from L1/L2: a row is at most a few KB) and writes y (and h_new
// in the residual form, whose h + gate·branch both passes recompute identically).
// Backward, two launches: layer_norm_dx_kernel, a warp per row (Σdx̂ and Σdx̂·x̂, then dx
// and the per-token dscale, dshift); layer_norm_column_sums_kernel, a thread per (column,
// sample, token chunk) summing (A, B, C, E) over its tokens, coalesced across columns.
//
// Bytes it must move: forward reads x and writes y (2·E·s_x; residual form reads h and
// branch, writes h_new and y: 4·E·s_x); backward reads x and dy twice and writes dx
// (5·E·s_x). ~8 FLOPs per element: memory-bound.
#include <cuda_runtime.h>

#include "layer_norm.cuh"

namespace fastguide {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarpSize;

template <typename T>
struct ForwardTensors {
  const T* x;  // h in the residual form
  const T* branch;
  T* h_new;
  T* y;
  float* mean;
  float* rstd;
};

// kVec consecutive elements of a parameter from element `offset`, as S (its storage type or
// 16-bit raw bits), in vectors of up to 16 bytes (the launcher checked their alignment).
template <typename S, int kVec>
__device__ __forceinline__ void load_bits(const Parameter& param, int64_t offset, S (&out)[kVec]) {
  constexpr int kPiece = kVec * sizeof(S) > 16 ? static_cast<int>(16 / sizeof(S)) : kVec;
#pragma unroll
  for (int q = 0; q < kVec; q += kPiece) {
    const Vec<S, kPiece> v = load_vec<S, kPiece>(static_cast<const S*>(param.data) + offset + q);
#pragma unroll
    for (int i = 0; i < kPiece; ++i) out[q + i] = v.v[i];
  }
}

// kVec consecutive elements of a parameter from element `offset` as fp32, or `absent` when
// there is no tensor: one branch on the storage width, widened as Parameter::load does.
template <int kVec>
__device__ __forceinline__ void load_parameters(const Parameter& param, int64_t offset, float absent,
                                                float (&out)[kVec]) {
  if (!param.present()) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = absent;
  } else if (param.type == StorageType::kFloat32) {
    load_bits<float, kVec>(param, offset, out);
  } else {
    uint16_t bits[kVec];
    load_bits<uint16_t, kVec>(param, offset, bits);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = param.widen(bits[i]);
  }
}

// The constants of columns j .. j + kVec − 1 of `row` (column_affine, vectorised).
template <int kVec>
__device__ __forceinline__ void column_affines(const LayerNormParams& p, const LayerNormAffine& a, int64_t row,
                                               int64_t j, ColumnAffine (&k)[kVec]) {
  float w[kVec], b[kVec], scale[kVec], shift[kVec];
  load_parameters<kVec>(a.weight, j, 1.0f, w);
  load_parameters<kVec>(a.bias, j, 0.0f, b);
  load_parameters<kVec>(a.scale, parameter_row(p, row, p.scale_per_token) + j, 0.0f, scale);
  load_parameters<kVec>(a.shift, parameter_row(p, row, p.shift_per_token) + j, 0.0f, shift);
#pragma unroll
  for (int i = 0; i < kVec; ++i) k[i] = {w[i], b[i], 1.0f + scale[i], shift[i]};
}

// kVec input elements of `row` from column j: x, or h + gate·branch rounded to T.
template <typename T, int kVec, bool kResidual>
__device__ __forceinline__ void load_input(const LayerNormParams& p, const LayerNormAffine& a,
                                           const ForwardTensors<T>& t, int64_t row, int64_t j, float (&v)[kVec]) {
  const int64_t offset = row * p.d + j;
  const Vec<T, kVec> x = load_vec<T, kVec>(t.x + offset);
  if constexpr (kResidual) {
    const Vec<T, kVec> branch = load_vec<T, kVec>(t.branch + offset);
    float gate[kVec];
    load_parameters<kVec>(a.gate, parameter_row(p, row, p.gate_per_token) + j, 0.0f, gate);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      // Rounded as stored: the norm sees the h_new the caller gets.
      v[i] = to_float(from_float<T>(residual_element(to_float(x.v[i]), gate[i], to_float(branch.v[i]))));
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = to_float(x.v[i]);
  }
}

template <typename T, int kVec, bool kResidual>
__global__ void __launch_bounds__(kThreads) layer_norm_forward_kernel(LayerNormParams p, LayerNormAffine a,
                                                                      ForwardTensors<T> t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.rows) return;  // the whole warp: no shuffle is left waiting
  const int lane = threadIdx.x % kWarpSize;
  float first[1];
  load_input<T, 1, kResidual>(p, a, t, row, 0, first);
  const float shift = first[0];
  float sum = 0.0f, sum_sq = 0.0f;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < p.d; j += kWarpSize * kVec) {
    float v[kVec];
    load_input<T, kVec, kResidual>(p, a, t, row, j, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float d = v[i] - shift;
      sum += d;
      sum_sq += d * d;
    }
  }
  sum = warp_sum(sum);
  sum_sq = warp_sum(sum_sq);
  float mean, rstd;
  row_statistics(p, shift, sum, sum_sq, mean, rstd);
  if (lane == 0) {
    t.mean[row] = mean;
    t.rstd[row] = rstd;
  }
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < p.d; j += kWarpSize * kVec) {
    float v[kVec];
    load_input<T, kVec, kResidual>(p, a, t, row, j, v);
    ColumnAffine k[kVec];
    column_affines<kVec>(p, a, row, j, k);
    Vec<T, kVec> out;
#pragma unroll
    for (int i = 0; i < kVec; ++i) out.v[i] = from_float<T>(modulate_element(k[i], (v[i] - mean) * rstd));
    store_vec(t.y + row * p.d + j, out);
    if constexpr (kResidual) {
      Vec<T, kVec> h_new;
#pragma unroll
      for (int i = 0; i < kVec; ++i) h_new.v[i] = from_float<T>(v[i]);
      store_vec(t.h_new + row * p.d + j, h_new);
    }
  }
}

template <typename T>
struct BackwardTensors {
  const T* dy;
  const T* x;
  const float* mean;
  const float* rstd;
  T* dx;
  float* dscale;    // per-token scale only
  float* dshift;    // per-token shift only
  float* partials;  // (N, chunks, 4, D)
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) layer_norm_dx_kernel(LayerNormParams p, LayerNormAffine a,
                                                                 BackwardTensors<T> t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.rows) return;  // the whole warp: no shuffle is left waiting
  const int lane = threadIdx.x % kWarpSize;
  const float mean = t.mean[row], rstd = t.rstd[row];
  float sum = 0.0f, sum_xhat = 0.0f;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < p.d; j += kWarpSize * kVec) {
    const Vec<T, kVec> x = load_vec<T, kVec>(t.x + row * p.d + j);
    const Vec<T, kVec> dy = load_vec<T, kVec>(t.dy + row * p.d + j);
    ColumnAffine k[kVec];
    column_affines<kVec>(p, a, row, j, k);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float dx_hat = layer_norm_dx_hat(k[i], to_float(dy.v[i]));
      sum += dx_hat;
      sum_xhat += dx_hat * (to_float(x.v[i]) - mean) * rstd;
    }
  }
  const float count = static_cast<float>(p.d);
  const float mean_dx_hat = warp_sum(sum) / count;
  const float mean_dx_hat_xhat = warp_sum(sum_xhat) / count;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < p.d; j += kWarpSize * kVec) {
    const Vec<T, kVec> x = load_vec<T, kVec>(t.x + row * p.d + j);
    const Vec<T, kVec> dy = load_vec<T, kVec>(t.dy + row * p.d + j);
    ColumnAffine k[kVec];
    column_affines<kVec>(p, a, row, j, k);
    Vec<T, kVec> dx;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float x_hat = (to_float(x.v[i]) - mean) * rstd;
      const float g = to_float(dy.v[i]);
      dx.v[i] = from_float<T>(layer_norm_dx(layer_norm_dx_hat(k[i], g), x_hat, rstd, mean_dx_hat, mean_dx_hat_xhat));
      if (t.dscale != nullptr) t.dscale[row * p.d + j + i] = g * (x_hat * k[i].w + k[i].b);
      if (t.dshift != nullptr) t.dshift[row * p.d + j + i] = g;
    }
    store_vec(t.dx + row * p.d + j, dx);
  }
}

// Block (column block + column_blocks·chunk, n): thread → column; loops over the chunk's tokens.
template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_column_sums_kernel(LayerNormParams p, LayerNormAffine a,
                                                                          BackwardTensors<T> t) {
  const int64_t column_blocks = (p.d + kThreads - 1) / kThreads;
  const int64_t j = (blockIdx.x % column_blocks) * kThreads + threadIdx.x;
  const int64_t chunk = blockIdx.x / column_blocks, n = blockIdx.y;
  if (j >= p.d) return;
  const int64_t per_chunk = (p.tokens + p.chunks - 1) / p.chunks;
  const int64_t begin = chunk * per_chunk;
  const int64_t end = begin + per_chunk < p.tokens ? begin + per_chunk : p.tokens;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t l = begin; l < end; ++l) {
    const int64_t row = n * p.tokens + l;
    const float x_hat = (to_float(t.x[row * p.d + j]) - t.mean[row]) * t.rstd[row];
    add_column_sums(column_affine(p, a, row, j), to_float(t.dy[row * p.d + j]), x_hat, acc);
  }
  float* out = t.partials + (n * p.chunks + chunk) * 4 * p.d + j;
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k * p.d] = acc[k];
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// kVec when D and every pointer (the rows of x-shaped tensors, the parameters, read kVec
// at a time in vectors of up to 16 bytes) allow 16-byte vectors, else 1.
template <typename T>
int vector_width(const LayerNormParams& p, const LayerNormAffine& a, const void* x, const void* y, const void* z,
                 const void* w) {
  constexpr int kVec = 16 / sizeof(T);
  const bool parameters = aligned16(a.weight.data) && aligned16(a.bias.data) && aligned16(a.scale.data) &&
                          aligned16(a.shift.data) && aligned16(a.gate.data);
  return p.d % kVec == 0 && parameters && aligned16(x) && aligned16(y) && aligned16(z) && aligned16(w) ? kVec : 1;
}

unsigned row_blocks(const LayerNormParams& p) {
  return static_cast<unsigned>((p.rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

template <typename T, int kVec>
void launch_forward_vec(const LayerNormParams& p, const LayerNormAffine& a, const ForwardTensors<T>& t,
                        cudaStream_t stream) {
  if (a.gate.present()) {
    launch_kernel(layer_norm_forward_kernel<T, kVec, true>, row_blocks(p), kThreads, stream, p, a, t);
  } else {
    launch_kernel(layer_norm_forward_kernel<T, kVec, false>, row_blocks(p), kThreads, stream, p, a, t);
  }
}

template <typename T>
int forward_typed(const LayerNormParams& p, const LayerNormAffine& a, const ForwardTensors<T>& t,
                  cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (vector_width<T>(p, a, t.x, t.branch, t.h_new, t.y) == kVec) {
    launch_forward_vec<T, kVec>(p, a, t, stream);
  } else {
    launch_forward_vec<T, 1>(p, a, t, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward_typed(const LayerNormParams& p, const LayerNormAffine& a, const BackwardTensors<T>& t,
                   cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (vector_width<T>(p, a, t.x, t.dy, t.dx, nullptr) == kVec) {
    launch_kernel(layer_norm_dx_kernel<T, kVec>, row_blocks(p), kThreads, stream, p, a, t);
  } else {
    launch_kernel(layer_norm_dx_kernel<T, 1>, row_blocks(p), kThreads, stream, p, a, t);
  }
  const int64_t column_blocks = (p.d + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(column_blocks * p.chunks), static_cast<unsigned>(p.rows / p.tokens));
  launch_kernel(layer_norm_column_sums_kernel<T>, grid, kThreads, stream, p, a, t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_layer_norm_forward(StorageType dtype, const LayerNormParams& p, const void* x, const void* branch,
                              const LayerNormAffine& a, void* h_new, void* y, float* mean, float* rstd, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case StorageType::kFloat32:
      return forward_typed(p, a, ForwardTensors<float>{static_cast<const float*>(x), static_cast<const float*>(branch),
                                                       static_cast<float*>(h_new), static_cast<float*>(y), mean, rstd},
                           s);
    case StorageType::kFloat16:
      return forward_typed(p, a, ForwardTensors<__half>{static_cast<const __half*>(x),
                                                        static_cast<const __half*>(branch),
                                                        static_cast<__half*>(h_new), static_cast<__half*>(y), mean,
                                                        rstd},
                           s);
    case StorageType::kBFloat16:
      return forward_typed(p, a, ForwardTensors<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(x),
                                                               static_cast<const __nv_bfloat16*>(branch),
                                                               static_cast<__nv_bfloat16*>(h_new),
                                                               static_cast<__nv_bfloat16*>(y), mean, rstd},
                           s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_layer_norm_backward(StorageType dtype, const LayerNormParams& p, const void* dy, const void* x,
                               const LayerNormAffine& a, const float* mean, const float* rstd, void* dx,
                               float* dscale, float* dshift, float* partials, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case StorageType::kFloat32:
      return backward_typed(p, a, BackwardTensors<float>{static_cast<const float*>(dy), static_cast<const float*>(x),
                                                         mean, rstd, static_cast<float*>(dx), dscale, dshift,
                                                         partials},
                            s);
    case StorageType::kFloat16:
      return backward_typed(p, a, BackwardTensors<__half>{static_cast<const __half*>(dy),
                                                          static_cast<const __half*>(x), mean, rstd,
                                                          static_cast<__half*>(dx), dscale, dshift, partials},
                            s);
    case StorageType::kBFloat16:
      return backward_typed(p, a, BackwardTensors<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(dy),
                                                                 static_cast<const __nv_bfloat16*>(x), mean, rstd,
                                                                 static_cast<__nv_bfloat16*>(dx), dscale, dshift,
                                                                 partials},
                            s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace fastguide
