// CUDA LayerNorm (+ adaLN modulation, fused gated residual), forward and backward. The
// math is layer_norm.cuh's; this file maps it onto threads.
//
// Forward, one launch: a warp per row (8 rows per block). Pass 1 reads the row (16-byte
// vectors when D and the pointers allow; several a lane issued together, see kBlocksPerSM)
// for its shifted sums, reduced with shuffles; pass 2 reads it again (from L1: a row is at
// most a few KB) and writes y (and h_new in the residual form, whose h + gate·branch both
// passes recompute identically).
// Backward, two launches: layer_norm_dx_kernel, a warp per row (Σdx̂ and Σdx̂·x̂, then dx
// and the per-token dscale, dshift); layer_norm_column_sums_kernel, a thread per (16-byte
// vector of columns, or one column where D or the pointers forbid it; sample; token chunk)
// summing (A, B, C, E) over its tokens, 4 a step, coalesced across columns.
//
// Bytes it must move: forward reads x and writes y (2·E·s_x; residual form reads h and
// branch, writes h_new and y: 4·E·s_x); backward reads x and dy twice and writes dx
// (5·E·s_x). ~8 FLOPs per element: memory-bound.
#include <cuda_runtime.h>

#include <cfloat>

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

// The forward's map of columns j .. j + kVec − 1 of `row`, folded per column: y = x̂·gain +
// offset with gain = w·(1 + scale), offset = b·(1 + scale) + shift. Two values an element
// stay live, not four, which keeps the loads of a whole pass in registers.
template <int kVec>
__device__ __forceinline__ void modulation(const LayerNormParams& p, const LayerNormAffine& a, int64_t row, int j,
                                           float (&gain)[kVec], float (&offset)[kVec]) {
  float scale[kVec], shift[kVec];
  load_parameters<kVec>(a.scale, parameter_row(p, row, p.scale_per_token) + j, 0.0f, scale);
  load_parameters<kVec>(a.weight, j, 1.0f, gain);
  load_parameters<kVec>(a.bias, j, 0.0f, offset);
  load_parameters<kVec>(a.shift, parameter_row(p, row, p.shift_per_token) + j, 0.0f, shift);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    gain[i] *= 1.0f + scale[i];
    offset[i] = offset[i] * (1.0f + scale[i]) + shift[i];
  }
}

// dx̂ = dy·c of columns j .. j + kVec − 1 of `row`: c = (1 + scale)·w.
template <int kVec>
__device__ __forceinline__ void dx_hat_coefficients(const LayerNormParams& p, const LayerNormAffine& a, int64_t row,
                                                    int j, float (&c)[kVec]) {
  float scale[kVec];
  load_parameters<kVec>(a.scale, parameter_row(p, row, p.scale_per_token) + j, 0.0f, scale);
  load_parameters<kVec>(a.weight, j, 1.0f, c);
#pragma unroll
  for (int i = 0; i < kVec; ++i) c[i] *= 1.0f + scale[i];
}

// One pass of a lane's row loop: kGroup vectors kWarpSize·kVec columns apart, from `base`.
// A vector past the row's end rereads the pass's first (in bounds) and is used for nothing,
// so every pass issues all its loads before any math, with one code path and no tail loop.
// Columns are int: bindings.cpp checked D < 2^30.
template <int kGroup, int kVec>
struct RowPass {
  int column[kGroup];
  bool valid[kGroup];

  __device__ __forceinline__ RowPass(int base, int d) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int j = base + g * kWarpSize * kVec;
      valid[g] = j < d;
      column[g] = valid[g] ? j : base;
    }
  }
};

// The row loops' shape. The first pass reads the row from HBM: 6 vectors a lane, all issued
// before their first use (x alone: 6 of it; two inputs, h and branch or x and dy: 3 of
// each), at the 3 blocks of 256 threads an SM holds at up to 80 registers a thread
// (__launch_bounds__): 18 KB a block, 72 KB an SM in flight. The second pass rereads the
// row from L1 with the parameters beside it, 2 vectors of each input at a time, which
// keeps its registers within that bound. A row of DiT's width 1152 in bf16 is 4.5 vectors
// a lane.
constexpr int kBlocksPerSM = 3;
constexpr int kFirstPassVectors = 6;
constexpr int kRereadGroup = 2;

// The forward's input vectors of one pass: x (h in the residual form) and branch.
template <typename T, int kVec, bool kResidual, int kGroup>
struct InputVectors {
  Vec<T, kVec> x[kGroup], branch[kGroup];

  __device__ __forceinline__ InputVectors(const ForwardTensors<T>& t, int64_t row_offset,
                                          const RowPass<kGroup, kVec>& pass) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) x[g] = load_vec<T, kVec>(t.x + row_offset + pass.column[g]);
    if constexpr (kResidual) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) branch[g] = load_vec<T, kVec>(t.branch + row_offset + pass.column[g]);
    }
  }

  // Vector g's elements as fp32: x, or h + gate·branch rounded to T (the gate read here,
  // after the data vectors are in flight).
  __device__ __forceinline__ void element_values(const LayerNormParams& p, const LayerNormAffine& a, int64_t row,
                                                 int64_t j, int g, float (&v)[kVec]) const {
    if constexpr (kResidual) {
      float gate[kVec];
      load_parameters<kVec>(a.gate, parameter_row(p, row, p.gate_per_token) + j, 0.0f, gate);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        // Rounded as stored: the norm sees the h_new the caller gets.
        v[i] = to_float(from_float<T>(residual_element(to_float(x[g].v[i]), gate[i], to_float(branch[g].v[i]))));
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = to_float(x[g].v[i]);
    }
  }
};

// A row's mean and rstd from each lane's sums of its `count` elements shifted by its own K:
// s1 = Σ(x − K), s2 = Σ(x − K)². In float64: the lane's mean μ_l = K + s1/n_l and
// M2_l = s2 − s1²/n_l (the one subtraction that can cancel: by (K − μ_l)²·n_l/M2_l, small
// for K a mean of the lane's elements), then the row's μ = Σ n_l·μ_l / D and
// M2 = Σ (M2_l + n_l·(μ_l − μ)²) over the warp (Chan et al.'s merge: no cancellation).
// Every lane gets the result.
__device__ __forceinline__ void row_statistics(const LayerNormParams& p, float shift, float s1, float s2, int count,
                                               float& mean_out, float& rstd_out) {
  const double n = static_cast<double>(count);
  const double lane_mean = count > 0 ? static_cast<double>(shift) + static_cast<double>(s1) / n : 0.0;
  const double lane_m2 = count > 0 ? static_cast<double>(s2) - static_cast<double>(s1) * static_cast<double>(s1) / n
                                   : 0.0;
  const double mean = warp_sum(n * lane_mean) / static_cast<double>(p.d);
  const double deviation = lane_mean - mean;
  const double variance = warp_sum(fmax(lane_m2, 0.0) + n * deviation * deviation) / static_cast<double>(p.d);
  mean_out = static_cast<float>(mean);
  // A row whose float32 statistics overflow (its Σx or Σ(x − μ)² past float32's range, as the
  // other backends sum them; or a NaN or ±inf) is NaN, on every backend: float64 holds them.
  const double d = static_cast<double>(p.d);
  const bool representable = fabs(mean * d) <= static_cast<double>(FLT_MAX) && variance * d <= static_cast<double>(FLT_MAX);
  rstd_out = representable ? static_cast<float>(1.0 / sqrt(variance + static_cast<double>(p.eps))) : NAN;
}

template <typename T, int kVec, bool kResidual>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    layer_norm_forward_kernel(LayerNormParams p, LayerNormAffine a, ForwardTensors<T> t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.rows) return;  // the whole warp: no shuffle is left waiting
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row_offset = row * p.d;
  const int d = static_cast<int>(p.d);
  constexpr int kGroup = kResidual ? kFirstPassVectors / 2 : kFirstPassVectors;
  // Each lane sums its elements shifted by K, the mean of its first pass's elements (a shift
  // far from the lane's mean, such as an outlier channel's value, cancels catastrophically
  // in Σ(x − K)² − (Σ(x − K))²/n: the row's first element once was K); the lanes' moments
  // then merge exactly (row_statistics).
  float shift = 0.0f, sum = 0.0f, sum_sq = 0.0f;
  int count = 0;
#pragma unroll 1  // a pass holds the loads in flight; unrolling more costs registers
  for (int base = lane * kVec; base < d; base += kGroup * kWarpSize * kVec) {
    const RowPass<kGroup, kVec> pass(base, d);
    const InputVectors<T, kVec, kResidual, kGroup> in(t, row_offset, pass);
    // f(v) for every input value of the pass's valid vectors
    const auto each_value = [&](auto&& f) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (!pass.valid[g]) continue;
        float v[kVec];
        in.element_values(p, a, row, pass.column[g], g, v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) f(v[i]);
      }
    };
    if (count == 0) {  // the lane's first pass (its first vector is valid: base < d)
      float first_sum = 0.0f;
      int first_count = 0;
      each_value([&](float v) {
        first_sum += v;
        ++first_count;
      });
      shift = first_sum / static_cast<float>(first_count);
    }
    each_value([&](float v) {
      const float deviation = v - shift;
      sum += deviation;
      sum_sq += deviation * deviation;
      ++count;
    });
  }
  float mean, rstd;
  row_statistics(p, shift, sum, sum_sq, count, mean, rstd);
  if (lane == 0) {
    t.mean[row] = mean;
    t.rstd[row] = rstd;
  }
#pragma unroll 1
  for (int base = lane * kVec; base < d; base += kRereadGroup * kWarpSize * kVec) {
    const RowPass<kRereadGroup, kVec> pass(base, d);
    const InputVectors<T, kVec, kResidual, kRereadGroup> in(t, row_offset, pass);
#pragma unroll
    for (int g = 0; g < kRereadGroup; ++g) {
      if (!pass.valid[g]) continue;
      const int j = pass.column[g];
      float v[kVec];
      in.element_values(p, a, row, j, g, v);
      float gain[kVec], offset[kVec];
      modulation<kVec>(p, a, row, j, gain, offset);
      Vec<T, kVec> out;
#pragma unroll
      for (int i = 0; i < kVec; ++i) out.v[i] = from_float<T>((v[i] - mean) * rstd * gain[i] + offset[i]);
      store_vec(t.y + row_offset + j, out);
      if constexpr (kResidual) {
        Vec<T, kVec> h_new;
#pragma unroll
        for (int i = 0; i < kVec; ++i) h_new.v[i] = from_float<T>(v[i]);
        store_vec(t.h_new + row_offset + j, h_new);
      }
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

// Per-token dscale = dy·(x̂·w + b) and dshift = dy (fp32) of columns j .. j + kVec − 1,
// where the modulation is per token (the tensors are null otherwise). x and dy are read
// again (from L1): holding them for this rarer path would cost the main one registers.
template <typename T, int kVec>
__device__ __forceinline__ void per_token_gradients(const LayerNormParams& p, const LayerNormAffine& a,
                                                    const BackwardTensors<T>& t, int64_t row, int j, float mean,
                                                    float rstd) {
  const int64_t offset = row * p.d + j;
  const Vec<T, kVec> x = load_vec<T, kVec>(t.x + offset), dy = load_vec<T, kVec>(t.dy + offset);
  float w[kVec], b[kVec];
  load_parameters<kVec>(a.weight, j, 1.0f, w);
  load_parameters<kVec>(a.bias, j, 0.0f, b);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const float grad = to_float(dy.v[i]);
    if (t.dscale != nullptr) t.dscale[offset + i] = grad * ((to_float(x.v[i]) - mean) * rstd * w[i] + b[i]);
    if (t.dshift != nullptr) t.dshift[offset + i] = grad;
  }
}

// The backward's input vectors of one pass: x and dy, all issued together.
template <typename T, int kVec, int kGroup>
struct GradientVectors {
  Vec<T, kVec> x[kGroup], dy[kGroup];

  __device__ __forceinline__ GradientVectors(const BackwardTensors<T>& t, int64_t row_offset,
                                             const RowPass<kGroup, kVec>& pass) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      x[g] = load_vec<T, kVec>(t.x + row_offset + pass.column[g]);
      dy[g] = load_vec<T, kVec>(t.dy + row_offset + pass.column[g]);
    }
  }
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    layer_norm_dx_kernel(LayerNormParams p, LayerNormAffine a, BackwardTensors<T> t) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.rows) return;  // the whole warp: no shuffle is left waiting
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row_offset = row * p.d;
  const int d = static_cast<int>(p.d);
  constexpr int kGroup = kFirstPassVectors / 2;  // x and dy
  const float mean = t.mean[row], rstd = t.rstd[row];
  float sum = 0.0f, sum_xhat = 0.0f;
#pragma unroll 1  // a pass holds the loads in flight; unrolling more costs registers
  for (int base = lane * kVec; base < d; base += kGroup * kWarpSize * kVec) {
    const RowPass<kGroup, kVec> pass(base, d);
    const GradientVectors<T, kVec, kGroup> in(t, row_offset, pass);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (!pass.valid[g]) continue;
      float c[kVec];
      dx_hat_coefficients<kVec>(p, a, row, pass.column[g], c);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float dx_hat = to_float(in.dy[g].v[i]) * c[i];
        sum += dx_hat;
        sum_xhat += dx_hat * (to_float(in.x[g].v[i]) - mean) * rstd;
      }
    }
  }
  const float count = static_cast<float>(p.d);
  const float mean_dx_hat = warp_sum(sum) / count;
  const float mean_dx_hat_xhat = warp_sum(sum_xhat) / count;
#pragma unroll 1
  for (int base = lane * kVec; base < d; base += kRereadGroup * kWarpSize * kVec) {
    const RowPass<kRereadGroup, kVec> pass(base, d);
    const GradientVectors<T, kVec, kRereadGroup> in(t, row_offset, pass);
#pragma unroll
    for (int g = 0; g < kRereadGroup; ++g) {
      if (!pass.valid[g]) continue;
      const int j = pass.column[g];
      float c[kVec];
      dx_hat_coefficients<kVec>(p, a, row, j, c);
      Vec<T, kVec> dx;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float x_hat = (to_float(in.x[g].v[i]) - mean) * rstd;
        const float dx_hat = to_float(in.dy[g].v[i]) * c[i];
        dx.v[i] = from_float<T>(layer_norm_dx(dx_hat, x_hat, rstd, mean_dx_hat, mean_dx_hat_xhat));
      }
      store_vec(t.dx + row_offset + j, dx);
      if (t.dscale != nullptr || t.dshift != nullptr) {
        per_token_gradients<T, kVec>(p, a, t, row, j, mean, rstd);
      }
    }
  }
}

// The column sums' shape: a thread takes kVec adjacent columns (a 16-byte vector of x and
// of dy a token where D and the pointers allow, else one column) and walks its chunk's
// tokens kColumnTokens at a time, the x, dy, mean and rstd of all of them loaded before the
// math: 16-bit x reads 8 vectors (128 bytes) a step. Blocks are 64 threads, so a row of
// DiT's 1152 columns (144 vectors) leaves 48 of 192 threads idle, not 112 of 256.
constexpr int kColumnTokens = 4;
constexpr int kColumnThreads = 64;

// kVec floats from `values` to out[0 .. kVec), in 16-byte vectors where kVec allows (the
// partials' rows are D floats and D is a multiple of kVec, so they are aligned).
template <int kVec>
__device__ __forceinline__ void store_floats(float* out, const float (&values)[kVec]) {
  constexpr int kPiece = kVec < 4 ? kVec : 4;
#pragma unroll
  for (int q = 0; q < kVec; q += kPiece) {
    Vec<float, kPiece> v;
#pragma unroll
    for (int i = 0; i < kPiece; ++i) v.v[i] = values[q + i];
    store_vec(out + q, v);
  }
}

// Block (column block + column_blocks·chunk, sample): thread → columns j .. j + kVec − 1;
// loops over the chunk's tokens, adding each element's (A, B, C, E) (add_column_sums). The
// grid's kMaxGridY rows stride over more samples (a 2-D (N, D) input has N samples of one
// token). Only the scale of the adaLN constants enters these sums: per sample it is loaded
// once a sample, per token once a token.
template <typename T, int kVec>
__global__ void __launch_bounds__(kColumnThreads) layer_norm_column_sums_kernel(LayerNormParams p, LayerNormAffine a,
                                                                                BackwardTensors<T> t) {
  const int64_t column_blocks = (p.d / kVec + kColumnThreads - 1) / kColumnThreads;
  const int64_t j = ((blockIdx.x % column_blocks) * kColumnThreads + threadIdx.x) * kVec;
  const int64_t chunk = blockIdx.x / column_blocks;
  if (j >= p.d) return;
  const int64_t per_chunk = (p.tokens + p.chunks - 1) / p.chunks;
  const int64_t begin = chunk * per_chunk;
  const int64_t end = begin + per_chunk < p.tokens ? begin + per_chunk : p.tokens;
  const int64_t samples = p.rows / p.tokens;
  for (int64_t n = blockIdx.y; n < samples; n += gridDim.y) {
    float acc[kVec][4] = {};  // column j + i's (A, B, C, E)
    float sample_scale[kVec];
    load_parameters<kVec>(a.scale, parameter_row(p, n * p.tokens, false) + j, 0.0f, sample_scale);
    // Tokens [l, l + count) of sample n: their loads first, then the math.
    const auto add_tokens = [&](int64_t l, auto count) {
      constexpr int kCount = decltype(count)::value;
      Vec<T, kVec> x[kCount], dy[kCount];
      float mean[kCount], rstd[kCount];
#pragma unroll
      for (int u = 0; u < kCount; ++u) {
        const int64_t row = n * p.tokens + l + u;
        x[u] = load_vec<T, kVec>(t.x + row * p.d + j);
        dy[u] = load_vec<T, kVec>(t.dy + row * p.d + j);
        mean[u] = t.mean[row];
        rstd[u] = t.rstd[row];
      }
#pragma unroll
      for (int u = 0; u < kCount; ++u) {
        float scale[kVec];
        if (p.scale_per_token) {
          load_parameters<kVec>(a.scale, (n * p.tokens + l + u) * p.d + j, 0.0f, scale);
        } else {
#pragma unroll
          for (int i = 0; i < kVec; ++i) scale[i] = sample_scale[i];
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float x_hat = (to_float(x[u].v[i]) - mean[u]) * rstd[u];
          // The sums read only 1 + scale of a column's constants.
          const ColumnAffine k{1.0f, 0.0f, 1.0f + scale[i], 0.0f};
          add_column_sums(k, to_float(dy[u].v[i]), x_hat, acc[i]);
        }
      }
    };
    int64_t l = begin;
    for (; l + kColumnTokens <= end; l += kColumnTokens) add_tokens(l, std::integral_constant<int, kColumnTokens>{});
    for (; l < end; ++l) add_tokens(l, std::integral_constant<int, 1>{});
    float* out = t.partials + (n * p.chunks + chunk) * 4 * p.d + j;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float sums[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) sums[i] = acc[i][k];
      store_floats<kVec>(out + k * p.d, sums);
    }
  }
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
  // The column sums read x, dy and the scale of all the parameters: vectors when those allow.
  const int column_vec =
      p.d % kVec == 0 && aligned16(t.x) && aligned16(t.dy) && aligned16(a.scale.data) ? kVec : 1;
  const int64_t column_blocks = (p.d / column_vec + kColumnThreads - 1) / kColumnThreads;
  const int64_t samples = p.rows / p.tokens;
  const dim3 grid(static_cast<unsigned>(column_blocks * p.chunks),
                  static_cast<unsigned>(samples < kMaxGridY ? samples : kMaxGridY));
  if (column_vec == kVec) {
    launch_kernel(layer_norm_column_sums_kernel<T, kVec>, grid, kColumnThreads, stream, p, a, t);
  } else {
    launch_kernel(layer_norm_column_sums_kernel<T, 1>, grid, kColumnThreads, stream, p, a, t);
  }
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
