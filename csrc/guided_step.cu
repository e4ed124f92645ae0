// CUDA guided_step: the stats pass (CFG rescale, CFG-Zero*, APG, tangential CFG) and one
// elementwise pass. The math is guided_step.cuh's; this file maps it onto threads.
//
// Elementwise pass: grid (chunks of a sample, batch). When every pointer and offset allows,
// each thread moves 16-byte vectors (kVec = 16/sizeof(T) elements): two of each input
// (CommonReads instances: the common steps, with or without a reduction, their optional
// inputs fixed at compile time, every load issued before the math; ADM's ancestral step
// with its learned variance included; GradReads: classifier guidance; MomentumReads: APG
// momentum) or one (RuntimeReads: 3-4 history tensors and the rarer mixes; each optional
// input a runtime branch); else one element at a time. A reduction's guidance
// coefficients are merged from the sample's partial moments once per sample, by
// sample_coefficients_kernel, and read as three floats (plain CFG's each thread takes from
// the scale): no barrier stands before the loads. With the
// similarity output (kernels of their own, similarity_guided_step_kernel) each thread also
// derives the x0 predictions x̂0_c, x̂0_u of its elements' c and u (predicted_x0, from the x
// it reads anyway) and sums x̂0_c·x̂0_u, x̂0_c², x̂0_u², the block reduces them (warp shuffles,
// then shared memory) and thread 0 writes the block's three floats; the host merges them
// in double.
// Stats pass: grid (parts, batch); each thread sums its elements of one chunk shifted by
// its first one (ShiftedSums), loading two 16-byte vectors of each input before the math
// of an iteration when vectorised, the block merges the threads' Moments by Chan's formula
// (warp shuffles, then shared memory) and writes the chunk's partial (8 floats). Then
// sample_coefficients_kernel merges each sample's partials into its coefficients.
//
// Bytes it must move: as kernels/guided_step.py (2E model output, 3E with a perturbed prediction,
// or E plus E of a guide; E of x and of each history or extra input read; E, 2E or 3E written;
// the similarity output adds 12 bytes per block of 256·kVec elements and no read):
// ~20 FLOPs per element (~10 more with the similarity output), memory-bound.
//
// A perturbed prediction (PAG, skip-layer guidance) is a compile-time branch (kPerturbed) of
// the same kernel bodies, launched as kernels of their own names: the plain instances keep
// their registers, and their names in the kernel report (tools/kernel_report.py).
#include <cuda_runtime.h>

#include "guided_step.cuh"

namespace fastguide {
namespace {

constexpr int kThreads = 256;

// Merges the lanes' Moments over the warp by xor butterflies, returned to every lane. At
// each level a group merges with its partner group in lane order (the lower first), so
// both compute the same bits and the result does not depend on the schedule.
__device__ __forceinline__ Moments warp_merge_moments(Moments m) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const Moments other{__shfl_xor_sync(0xffffffffu, m.count, offset),
                               __shfl_xor_sync(0xffffffffu, m.mean_c, offset),
                               __shfl_xor_sync(0xffffffffu, m.mean_v, offset),
                               __shfl_xor_sync(0xffffffffu, m.m_cc, offset),
                               __shfl_xor_sync(0xffffffffu, m.m_vv, offset),
                               __shfl_xor_sync(0xffffffffu, m.m_cv, offset)};
    m = (lane & offset) ? merge_moments(other, m) : merge_moments(m, other);
  }
  return m;
}

// The block's merged Moments, returned to thread 0 (the threads' sets in thread order).
__device__ __forceinline__ Moments block_merge_moments(Moments m) {
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ Moments warp_moments[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  m = warp_merge_moments(m);
  if (lane == 0) warp_moments[warp] = m;
  __syncthreads();
  if (warp == 0) m = warp_merge_moments(lane < kWarps ? warp_moments[lane] : Moments{});
  return m;
}

// kVec consecutive values of the fp32 APG momentum buffer, in 16-byte vectors (the launcher
// checked its alignment; kVec is 4 or 8).
template <int kVec>
__device__ __forceinline__ void load_buffer(const float* from, float (&values)[kVec]) {
#pragma unroll
  for (int q = 0; q < kVec; q += 4) {
    const Vec<float, 4> v = load_vec<float, 4>(from + q);
#pragma unroll
    for (int i = 0; i < 4; ++i) values[q + i] = v.v[i];
  }
}
template <int kVec>
__device__ __forceinline__ void store_buffer(float* to, const float (&values)[kVec]) {
#pragma unroll
  for (int q = 0; q < kVec; q += 4) {
    Vec<float, 4> v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.v[i] = values[q + i];
    store_vec(to + q, v);
  }
}

// kVectors vectors of each input of the stats pass, at j, j + kThreads·kVec, ..., added to
// `sums`: all loaded before any math, so that a thread keeps kVectors times its inputs'
// bytes in flight. Element by element across the vectors, so that the first math already
// needs every vector (nvcc issued a later vector's loads after the first's math when the
// first vector's elements came first).
template <typename T, int kVec, int kVectors, bool kPerturbed, bool kMomentum, bool kZeroStar>
__device__ __forceinline__ void add_stats_vectors(const GuidedStepParams& p, const GuidedStepTensors<T>& t,
                                                  int64_t b, int64_t j, ShiftedSums& sums) {
  constexpr int64_t kStride = static_cast<int64_t>(kThreads) * kVec;
  const T* c_at = t.model_output + b * p.mo_sample_stride + j;
  // With kPerturbed u and p at B-row block offsets from c (stats_inputs_at).
  const T* u_at = kPerturbed ? c_at + p.mo_block : t.uncond + b * p.uncond_sample_stride + j;
  Vec<T, kVec> c[kVectors], u[kVectors], perturbed[kVectors] = {};
  float buffer[kVectors][kVec] = {};
#pragma unroll
  for (int r = 0; r < kVectors; ++r) {
    c[r] = load_vec<T, kVec>(c_at + r * kStride);
    u[r] = load_vec<T, kVec>(u_at + r * kStride);
    if constexpr (kPerturbed) perturbed[r] = load_vec<T, kVec>(c_at + 2 * p.mo_block + r * kStride);
    if constexpr (kMomentum) load_buffer<kVec>(t.apg_buffer + b * p.sample_elems + j + r * kStride, buffer[r]);
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
#pragma unroll
    for (int r = 0; r < kVectors; ++r) {
      const float c_i = to_float(c[r].v[i]), u_i = to_float(u[r].v[i]);
      float v_i = c_i - u_i;
      if constexpr (kPerturbed) {  // "cfg" only: no APG buffer
        v_i = perturbed_guidance(p, c_i, v_i, to_float(perturbed[r].v[i]));
      } else if constexpr (kMomentum) {  // guidance_difference's, with the flag known
        v_i += p.combine.apg_momentum * buffer[r][i];
      } else if constexpr (kZeroStar) {  // stats_inputs_at's pair (c, u)
        v_i = u_i;
      }
      add_shifted(sums, c_i, v_i);
    }
  }
}

// kMomentum: APG's momentum buffer is read (a compile-time branch: a runtime one between
// the loads and the math kept nvcc from issuing the second vector's loads before the
// first's math). The scalar path (kVec = 1) reads p.apg_momentum_on, which equals it.
// kZeroStar: CFG-Zero*'s pair (c, u) in place of (c, v) (stats_inputs_at).
template <typename T, int kVec, bool kPerturbed, bool kMomentum, bool kZeroStar>
__device__ __forceinline__ void guided_stats(const GuidedStepParams& p, const GuidedStepTensors<T>& t) {
  const int64_t b = p.first_sample + blockIdx.y;
  const int64_t per_part = stats_part_elems(p, kVec);
  const int64_t begin = blockIdx.x * per_part;
  const int64_t end = begin + per_part < p.sample_elems ? begin + per_part : p.sample_elems;
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  // Each thread's first element is its shift, read before the loop (a cached reread; a
  // shift chosen per element costs the vector path 8 registers).
  ShiftedSums sums{};
  if (first < end) stats_inputs_at<T, kPerturbed, kZeroStar>(p, t, b, first, sums.k_c, sums.k_v);
  if constexpr (kVec > 1) {
    // Two vectors of each input an iteration, then at most one more: every load of an
    // iteration is unconditional and a constant offset from the first, so that the
    // compiler issues them all before the math (behind a select of the second vector's
    // address, or a branch, it issued the first vector's math in between). (The launcher
    // guarantees sample_elems % kVec == 0: no partial vector.)
    constexpr int64_t kStride = static_cast<int64_t>(kThreads) * kVec;
    int64_t j = first;
    for (; j + kStride < end; j += 2 * kStride) {
      add_stats_vectors<T, kVec, 2, kPerturbed, kMomentum, kZeroStar>(p, t, b, j, sums);
    }
    if (j < end) add_stats_vectors<T, kVec, 1, kPerturbed, kMomentum, kZeroStar>(p, t, b, j, sums);
  } else {
    for (int64_t j = first; j < end; j += kThreads) accumulate_stats_at<T, kPerturbed, kZeroStar>(p, t, b, j, sums);
  }
  // The part's first element is the reference of the means (read after the loop, so that
  // it holds no register there).
  float ref_c = 0.0f, ref_v = 0.0f;
  if (first < end) stats_inputs_at<T, kPerturbed, kZeroStar>(p, t, b, begin, ref_c, ref_v);
  const Moments m = block_merge_moments(shifted_moments(sums, ref_c, ref_v));
  if (threadIdx.x == 0) {  // thread 0 reads the reference: its part is never empty
    float* out = t.partials + (b * p.parts + blockIdx.x) * kStatsPerSample;
    const float fields[kStatsPerSample] = {m.count, ref_c, ref_v, m.mean_c, m.mean_v, m.m_cc, m.m_vv, m.m_cv};
#pragma unroll
    for (int k = 0; k < kStatsPerSample; ++k) out[k] = fields[k];
  }
}

template <typename T, int kVec, bool kMomentum>
__global__ void __launch_bounds__(kThreads) guided_stats_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_stats<T, kVec, false, kMomentum, false>(p, t);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) zero_star_stats_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_stats<T, kVec, false, false, true>(p, t);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) perturbed_guided_stats_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_stats<T, kVec, true, false, false>(p, t);
}

// One thread per sample b: its (α_c, α_v, f) from the stats pass's partials
// (sample_coefficients: float64, a fixed order), for the elementwise pass. Merged there,
// by thread 0 of every block, the merge stood behind a barrier before any load, and its
// double-precision calls took the registers the loads need.
template <bool kPerturbed>
__global__ void __launch_bounds__(kWarpSize) sample_coefficients_kernel(GuidedStepParams p, GuidedStepTensors<void> t) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  if (b >= p.batch) return;
  const SampleCoefficients k = sample_coefficients<kPerturbed>(p, t.partials + b * p.parts * kStatsPerSample);
  float* out = t.coefficients + b * kCoefficientFields;
  out[0] = k.alpha_c;
  out[1] = k.alpha_v;
  out[2] = k.f;
}

// kUnroll vectors of kVec elements, the r-th at j + r·kThreads·kVec (a warp's vectors stay
// adjacent), 16-byte aligned everywhere; with kSimilarity their x0 predictions of c and u
// are also added to `similarity`. Every load of the kUnroll vectors is issued before any
// math, so each thread keeps kUnroll × (its inputs) 16-byte loads in flight: what hides
// HBM's latency with the few blocks an SM holds (tools/occupancy.py). Every vector lies
// within the sample (guided_step calls it with kUnroll = 1 in the sample's last block), so
// each load is a constant offset from the first. Only the first kHistorySlots history
// tensors are read (the launcher picks kHistorySlots ≥ num_history), and `Reads` says which
// other optional inputs exist: what is absent holds no registers.
template <typename T, int kVec, int kUnroll, bool kPerturbed, bool kSimilarity, int kHistorySlots, typename Reads>
__device__ __forceinline__ void guided_step_vectors(const GuidedStepParams& p, const GuidedStepTensors<T>& t,
                                                    const SampleCoefficients& k, int64_t b, int64_t j,
                                                    [[maybe_unused]] SimilaritySums& similarity) {
  using V = Vec<T, kVec>;
  constexpr int64_t kStride = static_cast<int64_t>(kThreads) * kVec;
  // APG momentum is the "apg" variant's, never with a perturbed prediction ("cfg" only).
  const bool momentum = !kPerturbed && Reads::momentum(p);
  V c[kUnroll], x[kUnroll], u[kUnroll] = {}, perturbed[kUnroll] = {}, noise[kUnroll] = {}, grad[kUnroll] = {},
                            var_value[kUnroll] = {};
  V history[kUnroll][kMaxHistory] = {};
  float buffer[kUnroll][kVec] = {};
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) {
    const int64_t at = j + r * kStride;
    const int64_t here = b * p.sample_elems + at;
    const int64_t mo = b * p.mo_sample_stride + at;
    c[r] = load_vec<T, kVec>(t.model_output + mo);
    x[r] = load_vec<T, kVec>(t.x + here);
    if constexpr (kPerturbed) {  // [c; u; p]: u and p at B-row block offsets from c (stats_inputs_at)
      u[r] = load_vec<T, kVec>(t.model_output + mo + p.mo_block);
      perturbed[r] = load_vec<T, kVec>(t.model_output + mo + 2 * p.mo_block);
    } else if (p.guided) {
      u[r] = load_vec<T, kVec>(t.uncond + b * p.uncond_sample_stride + at);
    }
#pragma unroll
    for (int h = 0; h < kHistorySlots; ++h) {
      if (h < p.num_history) history[r][h] = load_vec<T, kVec>(t.history[h] + here);
    }
    if (Reads::noise(p)) noise[r] = load_vec<T, kVec>(t.noise + here);
    if (Reads::reads_grad(p)) grad[r] = load_vec<T, kVec>(t.grad + here);
    if (Reads::learned_var(p)) var_value[r] = load_vec<T, kVec>(t.model_output + p.var_offset + mo);
    if (momentum) {
      load_buffer<kVec>(t.apg_buffer + here, buffer[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) {
    const int64_t here = b * p.sample_elems + j + r * kStride;
    V x_next, x0;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      StepInputs in{to_float(c[r].v[i]),    to_float(u[r].v[i]), to_float(perturbed[r].v[i]),
                    buffer[r][i],           to_float(x[r].v[i]), to_float(noise[r].v[i]),
                    to_float(grad[r].v[i]), to_float(var_value[r].v[i]), {}};
#pragma unroll
      for (int h = 0; h < kMaxHistory; ++h) in.history[h] = to_float(history[r][h].v[i]);
      if constexpr (kSimilarity) add_similarity_at(p, similarity, in);
      const StepOutputs result = guided_element<kPerturbed, Reads>(p, k, in);
      x_next.v[i] = from_float<T>(result.x_next);
      x0.v[i] = from_float<T>(result.x0);
      buffer[r][i] = result.buffer;
    }
    if (momentum) {
      store_buffer<kVec>(t.apg_buffer + here, buffer[r]);
    }
    store_vec(t.out + here, x_next);
    if (p.out_2b) {
      store_vec(t.out + p.out_block_offset + here, x_next);
      if (p.out_3b) store_vec(t.out + 2 * p.out_block_offset + here, x_next);
    }
    if (p.has_x0_out) store_vec(t.x0_out + here, x0);
  }
}

template <typename T, int kVec, bool kPerturbed, bool kSimilarity, int kHistorySlots, typename Reads>
__device__ __forceinline__ void guided_step(const GuidedStepParams& p, const GuidedStepTensors<T>& t) {
  const int64_t b = p.first_sample + blockIdx.y;
  // Plain CFG's coefficients come from the scale alone; a variant's, merged once per sample
  // by sample_coefficients_kernel, are three floats every thread reads (the same address
  // across the block: one cached line). No barrier stands before the loads.
  SampleCoefficients k = plain_coefficients(p);
  if (reduced(p)) {
    const float* merged = t.coefficients + b * kCoefficientFields;
    k = {merged[0], merged[1], merged[2]};
  }
  SimilaritySums similarity{};  // this thread's elements' sums (kSimilarity only)
  if constexpr (kVec > 1) {
    constexpr int kUnroll = Reads::kVectorsPerThread;
    constexpr int64_t kStride = static_cast<int64_t>(kThreads) * kVec;
    const int64_t j = (static_cast<int64_t>(blockIdx.x) * kUnroll * kThreads + threadIdx.x) * kVec;
    const int64_t last = p.sample_elems - kVec;  // the sample's last vector (sample_elems % kVec == 0)
    if (j + (kUnroll - 1) * kStride <= last) {
      guided_step_vectors<T, kVec, kUnroll, kPerturbed, kSimilarity, kHistorySlots, Reads>(p, t, k, b, j, similarity);
    } else if (j <= last) {  // the sample's last block, where only a thread's first vector lies within it
      static_assert(kUnroll <= 2, "the last block's path moves one vector a thread");
      guided_step_vectors<T, kVec, 1, kPerturbed, kSimilarity, kHistorySlots, Reads>(p, t, k, b, j, similarity);
    }
  } else {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (j < p.sample_elems) guided_step_at<T, kPerturbed, kSimilarity>(p, t, k, b, j, similarity);
  }
  if constexpr (kSimilarity) {
    // Every thread takes part, those past the sample's end with zeros.
    float sums[kSimilarityFields] = {similarity.cu, similarity.cc, similarity.uu};
    block_sum(sums);
    if (threadIdx.x == 0) {
      float* out = t.similarity_partials + (b * gridDim.x + blockIdx.x) * kSimilarityFields;
#pragma unroll
      for (int f = 0; f < kSimilarityFields; ++f) out[f] = sums[f];
    }
  }
}

// The elementwise pass, specialised by what it reads (`Reads`: RuntimeReads, every
// variant; CommonReads<kNoise, kLearnedVar>, the common steps, with or without noise;
// GradReads<kNoise, kLearnedVar>, classifier guidance; MomentumReads<kNoise>, APG's
// momentum) and by how many
// history slots: 0 (one-step samplers), 2 (heun's and dpm++2s's second calls, dpm++2m/3m,
// unipc-2) or, RuntimeReads only, all kMaxHistory (unipc-3, whose folded corrector reads
// three).
static_assert(kMaxHistory >= 2, "the two-slot instance reads history[0] and history[1]");
template <typename T, int kVec, int kHistorySlots, typename Reads>
__global__ void __launch_bounds__(kThreads) guided_step_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_step<T, kVec, false, false, kHistorySlots, Reads>(p, t);
}

// APG's momentum (MomentumReads), a kernel of its own for its register bound: at 2 blocks
// an SM (≤ 128 registers) nvcc keeps the fp16 two-slot instance's values in registers,
// where uncapped it spills a few. A bound on guided_step_kernel itself would move every
// other instance's registers.
template <typename T, int kVec, int kHistorySlots, bool kNoise>
__global__ void __launch_bounds__(kThreads, 2) momentum_guided_step_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_step<T, kVec, false, false, kHistorySlots, MomentumReads<kNoise>>(p, t);
}

// With a perturbed prediction (PAG, skip-layer guidance).
template <typename T, int kVec, int kHistorySlots, typename Reads>
__global__ void __launch_bounds__(kThreads) perturbed_guided_step_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_step<T, kVec, true, false, kHistorySlots, Reads>(p, t);
}

// With the similarity output (truncated CFG).
template <typename T, int kVec, int kHistorySlots, typename Reads>
__global__ void __launch_bounds__(kThreads) similarity_guided_step_kernel(GuidedStepParams p,
                                                                          GuidedStepTensors<T> t) {
  guided_step<T, kVec, false, true, kHistorySlots, Reads>(p, t);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether the elementwise pass may move `vec`-element 16-byte vectors: every tensor and
// every offset in it 16-byte aligned.
bool vectorised(const GuidedStepParams& p, const GuidedStepTensors<void>& t, int vec) {
  const void* pointers[] = {t.model_output, t.uncond, t.x,     t.history[0], t.history[1], t.history[2],
                            t.history[3],   t.noise,  t.grad,  t.out,        t.x0_out,     t.apg_buffer};
  bool aligned = p.sample_elems % vec == 0 && p.mo_sample_stride % vec == 0 && p.uncond_sample_stride % vec == 0 &&
                 p.var_offset % vec == 0 && p.out_block_offset % vec == 0;
  for (const void* ptr : pointers) aligned = aligned && (ptr == nullptr || aligned16(ptr));
  return aligned;
}

// Elements of one 16-byte vector of the storage type.
int vector_elems(StorageType dtype) { return dtype == StorageType::kFloat32 ? 4 : 8; }

// Blocks per sample of the elementwise pass: each thread moves `vectors` 16-byte vectors
// of `vec` elements (vec > 1), or one element (vec = 1).
int64_t step_blocks(const GuidedStepParams& p, int vec, int vectors) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * (vec > 1 ? vec * vectors : 1);
  return (p.sample_elems + per_block - 1) / per_block;
}

template <typename T>
using Kernel = void (*)(GuidedStepParams, GuidedStepTensors<T>);

// History slots of the instance for `history` history tensors: the fewest of 0, 2 and all.
int history_slots(int history) { return history == 0 ? 0 : history <= 2 ? 2 : kMaxHistory; }

// The elementwise instance with kHistorySlots slots: with a perturbed prediction, with the
// similarity sums (never both), or plain.
template <typename T, int kVec, int kHistorySlots, typename Reads>
Kernel<T> kind_kernel(const GuidedStepParams& p, bool similarity) {
  if (p.perturbed) return perturbed_guided_step_kernel<T, kVec, kHistorySlots, Reads>;
  if (similarity) return similarity_guided_step_kernel<T, kVec, kHistorySlots, Reads>;
  return guided_step_kernel<T, kVec, kHistorySlots, Reads>;
}

// Whether a CommonReads instance serves this step: common_reads, and at most two history
// tensors (three or four, unipc-3's corrector alone, run RuntimeReads: 18 fewer
// instances to compile); a learned variance (ADM's ancestral step) in the plain pass with
// no history only: the instances it would need beside those spill or take 84-106
// registers (sm_90, two slots) and serve rarer steps.
bool runs_common(const GuidedStepParams& p, bool similarity) {
  return common_reads(p) && p.num_history <= 2 &&
         !(p.learned_var && (p.perturbed || similarity || p.num_history > 0));
}

// A CommonReads instance, with the fewest history slots that hold the step's history.
template <typename T, int kVec, typename Reads>
Kernel<T> common_kernel(const GuidedStepParams& p, bool similarity) {
  return p.num_history == 0 ? kind_kernel<T, kVec, 0, Reads>(p, similarity)
                            : kind_kernel<T, kVec, 2, Reads>(p, similarity);
}

// Whether a MomentumReads instance serves this step: APG's momentum in the plain pass
// (APG never has a perturbed prediction; no similarity output) with at most two history
// tensors.
bool runs_momentum(const GuidedStepParams& p, bool similarity) {
  return momentum_reads(p) && p.num_history <= 2 && !p.perturbed && !similarity;
}

// Whether a GradReads instance serves this step: classifier guidance in the plain pass
// with no history (ADM's samplers: DDPM and DDIM, one step each).
bool runs_grad(const GuidedStepParams& p, bool similarity) {
  return grad_reads(p) && p.num_history == 0 && !p.perturbed && !similarity;
}

// The GradReads instance for the step's noise and learned variance.
template <typename T, int kVec>
Kernel<T> grad_kernel(const GuidedStepParams& p) {
  if (p.has_noise) {
    return p.learned_var ? guided_step_kernel<T, kVec, 0, GradReads<true, true>>
                         : guided_step_kernel<T, kVec, 0, GradReads<true, false>>;
  }
  return p.learned_var ? guided_step_kernel<T, kVec, 0, GradReads<false, true>>
                       : guided_step_kernel<T, kVec, 0, GradReads<false, false>>;
}

// The MomentumReads instance with the fewest history slots (0 or 2) that hold the step's.
template <typename T, int kVec, bool kNoise>
Kernel<T> momentum_kernel(const GuidedStepParams& p) {
  return p.num_history == 0 ? momentum_guided_step_kernel<T, kVec, 0, kNoise>
                            : momentum_guided_step_kernel<T, kVec, 2, kNoise>;
}

// A RuntimeReads instance (every step): the plain pass with the fewest history slots,
// the perturbed and similarity passes with all of them.
template <typename T, int kVec>
Kernel<T> runtime_kernel(const GuidedStepParams& p, bool similarity) {
  if (p.perturbed || similarity) return kind_kernel<T, kVec, kMaxHistory, RuntimeReads>(p, similarity);
  switch (history_slots(p.num_history)) {
    case 0:
      return guided_step_kernel<T, kVec, 0, RuntimeReads>;
    case 2:
      return guided_step_kernel<T, kVec, 2, RuntimeReads>;
    default:
      return guided_step_kernel<T, kVec, kMaxHistory, RuntimeReads>;
  }
}

// Calls launch(params, samples) once per kMaxGridY samples, params.first_sample set: a
// grid's y axis holds at most 65535 rows (a loop over samples inside the kernels cost the
// tuned instances registers and blocks an SM).
template <typename Launch>
void for_each_launch(const GuidedStepParams& p, Launch launch) {
  for (int64_t first = 0; first < p.batch; first += kMaxGridY) {
    GuidedStepParams rows = p;
    rows.first_sample = first;
    launch(rows, static_cast<unsigned>(p.batch - first < kMaxGridY ? p.batch - first : kMaxGridY));
  }
}

template <typename T>
int launch_typed(const GuidedStepParams& p, const GuidedStepTensors<void>& untyped, cudaStream_t stream) {
  GuidedStepTensors<T> t{};
  t.model_output = static_cast<const T*>(untyped.model_output);
  t.uncond = static_cast<const T*>(untyped.uncond);
  t.x = static_cast<const T*>(untyped.x);
  for (int h = 0; h < kMaxHistory; ++h) t.history[h] = static_cast<const T*>(untyped.history[h]);
  t.noise = static_cast<const T*>(untyped.noise);
  t.grad = static_cast<const T*>(untyped.grad);
  t.apg_buffer = untyped.apg_buffer;
  t.out = static_cast<T*>(untyped.out);
  t.x0_out = static_cast<T*>(untyped.x0_out);
  t.partials = untyped.partials;
  t.coefficients = untyped.coefficients;
  t.similarity_partials = untyped.similarity_partials;
  constexpr int kVec = 16 / sizeof(T);  // vector_elems of T's StorageType
  const bool vector = vectorised(p, untyped, kVec);
  if (p.stats != kStatsNone) {
    const Kernel<T> stats =
        p.perturbed                  ? (vector ? perturbed_guided_stats_kernel<T, kVec> : perturbed_guided_stats_kernel<T, 1>)
        : p.stats == kStatsZeroStar ? (vector ? zero_star_stats_kernel<T, kVec> : zero_star_stats_kernel<T, 1>)
        : p.apg_momentum_on         ? (vector ? guided_stats_kernel<T, kVec, true> : guided_stats_kernel<T, 1, true>)
                                    : (vector ? guided_stats_kernel<T, kVec, false> : guided_stats_kernel<T, 1, false>);
    for_each_launch(p, [&](const GuidedStepParams& rows, unsigned samples) {
      launch_kernel(stats, dim3(static_cast<unsigned>(p.parts), samples), kThreads, stream, rows, t);
    });
    const unsigned merge_blocks = static_cast<unsigned>((p.batch + kWarpSize - 1) / kWarpSize);
    launch_kernel(p.perturbed ? sample_coefficients_kernel<true> : sample_coefficients_kernel<false>, merge_blocks,
                  kWarpSize, stream, p, untyped);
  }
  const bool similarity = t.similarity_partials != nullptr;
  // Vectorised: a CommonReads instance where it serves (with or without noise), a
  // GradReads one for classifier guidance, a MomentumReads one for APG's momentum, else a
  // RuntimeReads one; element by element: RuntimeReads, every history slot.
  Kernel<T> step = kind_kernel<T, 1, kMaxHistory, RuntimeReads>(p, similarity);
  int vectors = 1;
  if (vector && runs_common(p, similarity)) {
    if (p.learned_var) {  // the plain pass, no history (runs_common)
      step = guided_step_kernel<T, kVec, 0, CommonReads<true, true>>;
    } else {
      step = p.has_noise ? common_kernel<T, kVec, CommonReads<true>>(p, similarity)
                         : common_kernel<T, kVec, CommonReads<false>>(p, similarity);
    }
    vectors = CommonReads<false>::kVectorsPerThread;
  } else if (vector && runs_grad(p, similarity)) {
    step = grad_kernel<T, kVec>(p);
    vectors = GradReads<false, false>::kVectorsPerThread;
  } else if (vector && runs_momentum(p, similarity)) {
    step = p.has_noise ? momentum_kernel<T, kVec, true>(p) : momentum_kernel<T, kVec, false>(p);
    vectors = MomentumReads<false>::kVectorsPerThread;
  } else if (vector) {
    step = runtime_kernel<T, kVec>(p, similarity);
    vectors = RuntimeReads::kVectorsPerThread;
  }
  const unsigned blocks = static_cast<unsigned>(step_blocks(p, vector ? kVec : 1, vectors));
  for_each_launch(p, [&](const GuidedStepParams& rows, unsigned samples) {
    launch_kernel(step, dim3(blocks, samples), kThreads, stream, rows, t);
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t guided_step_blocks(StorageType dtype, const GuidedStepParams& p, const GuidedStepTensors<void>& t) {
  const int vec = vector_elems(dtype);
  if (!vectorised(p, t, vec)) return step_blocks(p, 1, 1);
  const bool common = runs_common(p, true);  // asked for the similarity output's rows
  return step_blocks(p, vec, common ? CommonReads<false>::kVectorsPerThread : RuntimeReads::kVectorsPerThread);
}

int launch_guided_step(StorageType dtype, const GuidedStepParams& p, const GuidedStepTensors<void>& t, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case StorageType::kFloat32:
      return launch_typed<float>(p, t, s);
    case StorageType::kFloat16:
      return launch_typed<__half>(p, t, s);
    case StorageType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, t, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace fastguide
