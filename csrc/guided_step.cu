// CUDA guided_step: the stats pass (CFG rescale, CFG-Zero*, APG, tangential CFG) and one
// elementwise pass. The math is guided_step.cuh's; this file maps it onto threads.
//
// Elementwise pass: grid (chunks of a sample, batch); each thread owns kVec consecutive
// elements of one sample and moves them as 16-byte vectors (kVec = 16/sizeof(T)) when
// every pointer and offset allows, else one element at a time. A variant's guidance
// coefficients are merged from the sample's partial moments once per block, by thread 0
// (plain CFG's each thread takes from the scale). With the
// similarity output (kernels of their own, similarity_guided_step_kernel) each thread also
// derives the x0 predictions x̂0_c, x̂0_u of its elements' c and u (predicted_x0, from the x
// it reads anyway) and sums x̂0_c·x̂0_u, x̂0_c², x̂0_u², the block reduces them (warp shuffles,
// then shared memory) and thread 0 writes the block's three floats; the host merges them
// in double.
// Stats pass: grid (parts, batch); each thread sums its elements of one chunk shifted by
// its first one (ShiftedSums), the block merges the threads' Moments by Chan's formula
// (warp shuffles, then shared memory) and writes the chunk's partial (8 floats).
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

template <typename T, int kVec, bool kPerturbed>
__device__ __forceinline__ void guided_stats(const GuidedStepParams& p, const GuidedStepTensors<T>& t) {
  const int64_t b = blockIdx.y;
  const int64_t per_part = stats_part_elems(p, kVec);
  const int64_t begin = blockIdx.x * per_part;
  const int64_t end = begin + per_part < p.sample_elems ? begin + per_part : p.sample_elems;
  const int64_t first = begin + static_cast<int64_t>(threadIdx.x) * kVec;
  // Each thread's first element is its shift, read before the loop (a cached reread; a
  // shift chosen per element costs the vector path 8 registers).
  ShiftedSums sums{};
  if (first < end) stats_inputs_at<T, kPerturbed>(p, t, b, first, sums.k_c, sums.k_v);
  // With kVec > 1 the launcher guarantees sample_elems % kVec == 0: no tail.
  for (int64_t j = first; j < end; j += kThreads * kVec) {
    if constexpr (kVec > 1) {
      const int64_t mo = b * p.mo_sample_stride + j;
      const Vec<T, kVec> c = load_vec<T, kVec>(t.model_output + mo);
      // With kPerturbed u and p at B-row block offsets from c (stats_inputs_at).
      const Vec<T, kVec> u =
          load_vec<T, kVec>(kPerturbed ? t.model_output + mo + p.mo_block : t.uncond + b * p.uncond_sample_stride + j);
      Vec<T, kVec> perturbed{};
      if constexpr (kPerturbed) perturbed = load_vec<T, kVec>(t.model_output + mo + 2 * p.mo_block);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float c_i = to_float(c.v[i]);
        if constexpr (kPerturbed) {  // "cfg" only: no APG buffer
          add_shifted(sums, c_i, perturbed_guidance(p, c_i, c_i - to_float(u.v[i]), to_float(perturbed.v[i])));
        } else {
          const float buffer = p.apg_momentum_on ? t.apg_buffer[b * p.sample_elems + j + i] : 0.0f;
          add_shifted(sums, c_i, guidance_difference(p, c_i, to_float(u.v[i]), buffer));
        }
      }
    } else {
      accumulate_stats_at<T, kPerturbed>(p, t, b, j, sums);
    }
  }
  // The part's first element is the reference of the means (read after the loop, so that
  // it holds no register there).
  float ref_c = 0.0f, ref_v = 0.0f;
  if (first < end) stats_inputs_at<T, kPerturbed>(p, t, b, begin, ref_c, ref_v);
  const Moments m = block_merge_moments(shifted_moments(sums, ref_c, ref_v));
  if (threadIdx.x == 0) {  // thread 0 reads the reference: its part is never empty
    float* out = t.partials + (b * p.parts + blockIdx.x) * kStatsPerSample;
    const float fields[kStatsPerSample] = {m.count, ref_c, ref_v, m.mean_c, m.mean_v, m.m_cc, m.m_vv, m.m_cv};
#pragma unroll
    for (int k = 0; k < kStatsPerSample; ++k) out[k] = fields[k];
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) guided_stats_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_stats<T, kVec, false>(p, t);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) perturbed_guided_stats_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_stats<T, kVec, true>(p, t);
}

// kVec elements starting at j, all inside the sample and 16-byte aligned everywhere; with
// kSimilarity their x0 predictions of c and u are also added to `similarity`. Only the
// first kHistorySlots history tensors are read (the launcher picks kHistorySlots ≥
// num_history): the slots beyond hold no registers.
template <typename T, int kVec, bool kPerturbed, bool kSimilarity, int kHistorySlots>
__device__ __forceinline__ void guided_step_vector(const GuidedStepParams& p, const GuidedStepTensors<T>& t,
                                                   const SampleCoefficients& k, int64_t b, int64_t j,
                                                   [[maybe_unused]] SimilaritySums& similarity) {
  const int64_t here = b * p.sample_elems + j;
  const int64_t mo = b * p.mo_sample_stride + j;
  const Vec<T, kVec> c = load_vec<T, kVec>(t.model_output + mo);
  const Vec<T, kVec> x = load_vec<T, kVec>(t.x + here);
  Vec<T, kVec> u{}, perturbed{}, noise{}, grad{}, var_value{};
  Vec<T, kVec> history[kMaxHistory] = {};
  if constexpr (kPerturbed) {  // [c; u; p]: u and p at B-row block offsets from c (stats_inputs_at)
    u = load_vec<T, kVec>(t.model_output + mo + p.mo_block);
    perturbed = load_vec<T, kVec>(t.model_output + mo + 2 * p.mo_block);
  } else if (p.guided) {
    u = load_vec<T, kVec>(t.uncond + b * p.uncond_sample_stride + j);
  }
#pragma unroll
  for (int h = 0; h < kHistorySlots; ++h) {
    if (h < p.num_history) history[h] = load_vec<T, kVec>(t.history[h] + here);
  }
  if (p.has_noise) noise = load_vec<T, kVec>(t.noise + here);
  if (p.grad_eps || p.has_grad_term) grad = load_vec<T, kVec>(t.grad + here);
  if (p.learned_var) var_value = load_vec<T, kVec>(t.model_output + p.var_offset + mo);
  // APG momentum is the "apg" variant's, never with a perturbed prediction ("cfg" only).
  const bool momentum = !kPerturbed && p.apg_momentum_on;
  float buffer[kVec] = {};
  if (momentum) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) buffer[i] = t.apg_buffer[here + i];
  }
  Vec<T, kVec> x_next, x0;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    StepInputs in{to_float(c.v[i]), to_float(u.v[i]), to_float(perturbed.v[i]), buffer[i], to_float(x.v[i]),
                  to_float(noise.v[i]), to_float(grad.v[i]), to_float(var_value.v[i]), {}};
#pragma unroll
    for (int h = 0; h < kMaxHistory; ++h) in.history[h] = to_float(history[h].v[i]);
    if constexpr (kSimilarity) add_similarity_at(p, similarity, in);
    const StepOutputs r = guided_element<kPerturbed>(p, k, in);
    x_next.v[i] = from_float<T>(r.x_next);
    x0.v[i] = from_float<T>(r.x0);
    buffer[i] = r.buffer;
  }
  if (momentum) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) t.apg_buffer[here + i] = buffer[i];
  }
  store_vec(t.out + here, x_next);
  if (p.out_2b) {
    store_vec(t.out + p.out_block_offset + here, x_next);
    if (p.out_3b) store_vec(t.out + 2 * p.out_block_offset + here, x_next);
  }
  if (p.has_x0_out) store_vec(t.x0_out + here, x0);
}

template <typename T, int kVec, bool kPerturbed, bool kSimilarity, int kHistorySlots = kMaxHistory>
__device__ __forceinline__ void guided_step(const GuidedStepParams& p, const GuidedStepTensors<T>& t) {
  const int64_t b = blockIdx.y;
  // Plain CFG's coefficients come from the scale alone: each thread takes them itself, so
  // no barrier stands before its loads. A variant merges its sample's partials once per
  // block (thread 0) and shares them; p.stats is the whole grid's, so every thread of a
  // block takes the same branch to the barrier.
  SampleCoefficients k;
  if (p.stats == kStatsNone) {
    k = plain_coefficients(p);
  } else {
    __shared__ SampleCoefficients coefficients;
    if (threadIdx.x == 0) {
      coefficients = sample_coefficients<kPerturbed>(p, t.partials + b * p.parts * kStatsPerSample);
    }
    __syncthreads();
    k = coefficients;
  }
  SimilaritySums similarity{};  // this thread's elements' sums (kSimilarity only)
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (j + kVec <= p.sample_elems) {
    if constexpr (kVec > 1) {
      guided_step_vector<T, kVec, kPerturbed, kSimilarity, kHistorySlots>(p, t, k, b, j, similarity);
    } else {
      guided_step_at<T, kPerturbed, kSimilarity>(p, t, k, b, j, similarity);
    }
  } else {
    for (int64_t i = j; i < p.sample_elems; ++i) guided_step_at<T, kPerturbed, kSimilarity>(p, t, k, b, i, similarity);
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

// The plain elementwise pass, specialised by how many history slots it reads: 0 (one-step
// samplers), 2 (heun's and dpm++2s's second calls, dpm++2m/3m, unipc-2) or all kMaxHistory
// (unipc-3, whose folded corrector reads three).
static_assert(kMaxHistory >= 2, "the two-slot instance reads history[0] and history[1]");
template <typename T, int kVec, int kHistorySlots>
__global__ void __launch_bounds__(kThreads) guided_step_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_step<T, kVec, false, false, kHistorySlots>(p, t);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) perturbed_guided_step_kernel(GuidedStepParams p, GuidedStepTensors<T> t) {
  guided_step<T, kVec, true, false>(p, t);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) similarity_guided_step_kernel(GuidedStepParams p,
                                                                          GuidedStepTensors<T> t) {
  guided_step<T, kVec, false, true>(p, t);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether the elementwise pass may move `vec`-element 16-byte vectors: every tensor and
// every offset in it 16-byte aligned.
bool vectorised(const GuidedStepParams& p, const GuidedStepTensors<void>& t, int vec) {
  const void* pointers[] = {t.model_output, t.uncond,     t.x,          t.history[0], t.history[1],
                            t.history[2],   t.history[3], t.noise,      t.grad,       t.out,
                            t.x0_out};
  bool aligned = p.sample_elems % vec == 0 && p.mo_sample_stride % vec == 0 && p.uncond_sample_stride % vec == 0 &&
                 p.var_offset % vec == 0 && p.out_block_offset % vec == 0;
  for (const void* ptr : pointers) aligned = aligned && (ptr == nullptr || aligned16(ptr));
  return aligned;
}

// Elements of one 16-byte vector of the storage type.
int vector_elems(StorageType dtype) { return dtype == StorageType::kFloat32 ? 4 : 8; }

// Blocks per sample of the elementwise pass at `vec` elements per thread.
int64_t step_blocks(const GuidedStepParams& p, int vec) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  return (p.sample_elems + per_block - 1) / per_block;
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
  t.similarity_partials = untyped.similarity_partials;
  constexpr int kVec = 16 / sizeof(T);  // vector_elems of T's StorageType
  const dim3 stats_grid(p.parts, static_cast<unsigned>(p.batch));
  const bool vector = vectorised(p, untyped, kVec);
  // Each pass's instance: vectorised or element by element, with or without a perturbed
  // branch (the elementwise pass: or with the similarity sums, never both).
  using Kernel = void (*)(GuidedStepParams, GuidedStepTensors<T>);
  if (p.stats != kStatsNone) {
    const Kernel stats = vector ? (p.perturbed ? perturbed_guided_stats_kernel<T, kVec> : guided_stats_kernel<T, kVec>)
                                : (p.perturbed ? perturbed_guided_stats_kernel<T, 1> : guided_stats_kernel<T, 1>);
    launch_kernel(stats, stats_grid, kThreads, stream, p, t);
  }
  const dim3 grid(static_cast<unsigned>(step_blocks(p, vector ? kVec : 1)), static_cast<unsigned>(p.batch));
  const bool similarity = t.similarity_partials != nullptr;
  const Kernel plain = !vector               ? guided_step_kernel<T, 1, kMaxHistory>
                       : p.num_history == 0 ? guided_step_kernel<T, kVec, 0>
                       : p.num_history <= 2 ? guided_step_kernel<T, kVec, 2>
                                            : guided_step_kernel<T, kVec, kMaxHistory>;
  const Kernel step = vector ? (p.perturbed    ? perturbed_guided_step_kernel<T, kVec>
                                : similarity ? similarity_guided_step_kernel<T, kVec>
                                             : plain)
                             : (p.perturbed    ? perturbed_guided_step_kernel<T, 1>
                                : similarity ? similarity_guided_step_kernel<T, 1>
                                             : plain);
  launch_kernel(step, grid, kThreads, stream, p, t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t guided_step_blocks(StorageType dtype, const GuidedStepParams& p, const GuidedStepTensors<void>& t) {
  const int vec = vector_elems(dtype);
  return step_blocks(p, vectorised(p, t, vec) ? vec : 1);
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
