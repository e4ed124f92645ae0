// guided_step: the guidance combine and one sampler update (docs/design.md's contract), as
// host/device math shared by the CUDA kernels (guided_step.cu) and the CPU harness.
//
// With c the model's prediction, u the guiding one (the uncond half of the model output or a
// separate guide tensor) and v = c − u (for APG with momentum
// v = c − u + momentum·buffer, the new buffer), every guidance variant
// (fastguide/ops/contract.py's GuidanceCombine states them) is m = f·(α_c·c + α_v·v) with
// per-sample scalars (kernels/guided_step.py derives them):
//   CFG          α_c = 1, α_v = w − 1, f = 1
//   PAG / SLG    with the perturbed prediction p (the model output's third B rows), v is the whole
//                guidance term g = (w − 1)·(c − u) + s·(c − p), m = c + g: α_c = 1, α_v = 1
//                (a compile-time branch, kPerturbed: kernels of their own)
//   CFG-Zero*    s* = ⟨c, u⟩/(‖u‖² + 1e-8), α_c = w + s*(1 − w), α_v = s*(w − 1)
//   tangential   u ← (u·v₁)v₁ = β(a₀c + a₁u) from the 2×2 Gram matrix of [c; u] (kernels/guided_step.py)
//   APG          k = min(1, τ/‖v‖), α_c = 1 + (w − 1)·k·(η − 1)·⟨v, c⟩/‖c‖², α_v = (w − 1)·k
//   rescale      f = φ·std(c)/std(m₀) + 1 − φ
// all from the moments of (c, v) per sample: the means μc, μv and the centred co-moment
// sums Mcc = Σ(c − μc)², Mvv, Mcv, from which std(m₀)² = (α_c²Mcc + 2α_cα_vMcv + α_v²Mvv)/(n − 1)
// and the Gram entries Σxy = Mxy + n·μx·μy (u = c − v) follow without cancelling when
// |mean| ≫ std (Moments below). Then per element: x0 and
// eps by the prediction type's linear map, the optional clip, the classifier eps shift,
// and x_next, the linear combination fastguide.ops.contract.StepCoefficients writes out.
// On request (the similarity output) the elementwise pass also derives the x0 predictions
// x̂0_c and x̂0_u of the c and u it reads, each alone by the step's prediction-type map
// (predicted_x0, the map it applies to m; no guidance transform, clip or classifier shift),
// elementwise in fp32 before the products (sums of x·x, x·c, ... would cancel at high
// noise), sums x̂0_c·x̂0_u, x̂0_c², x̂0_u² (SimilaritySums) and writes each block's sums; the
// host merges them into cos(x̂0_c, x̂0_u) = Σx̂0_c·x̂0_u/(√Σx̂0_c²·√Σx̂0_u²) per sample, in double.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace fastguide {

enum GuidedStats : int { kStatsNone = 0, kStatsZeroStar = 1, kStatsApg = 2, kStatsPlain = 3, kStatsTangential = 4 };
constexpr int kStatsPerSample = 8;  // floats of one partial: n, reference (c, v), Moments about it
constexpr int kMaxParts = 32;       // partials per sample written by the stats pass

// The contract's scalars (fastguide/ops/contract.py): the float fields of StepCoefficients
// and of GuidanceCombine, in the types' declaration order. The bindings copy the op's
// float[] straight into these structs, so their order is the Python types' order (a test
// compares the two).
struct StepScalars {
  float alpha, sigma, k_x, k_x0, k_eps, k_noise, k_grad, grad_eps_scale, k_guide_eps;
};
struct CombineScalars {
  float scale, rescale, apg_eta, apg_norm_threshold, apg_momentum, perturbed_scale;
};
constexpr int kMaxHistory = 4;  // history pointer slots (contract.MAX_HISTORY)

enum PredictionType : int { kEpsilon = 0, kVPrediction = 1, kSample = 2, kFlowPrediction = 3 };

// Everything a launch needs besides the pointers. Offsets are in elements.
struct GuidedStepParams {
  int64_t batch;
  int64_t first_sample;          // the sample of the grid's row 0 (a launch takes ≤ kMaxGridY samples)
  int64_t sample_elems;          // elements of one sample of x
  int64_t mo_sample_stride;      // elements between samples of model_output (C' = C or 2C channels)
  int64_t uncond_sample_stride;  // elements between samples of the guiding prediction u
  int64_t mo_block;              // B·mo_sample_stride: u and p of a [c; u; p] model output, from c's offset
  int64_t var_offset;            // start of the variance channels within a model_output sample
  int64_t out_block_offset;      // start of out's second B-row block when out is (2B, ...) or (3B, ...)
  int stats;                     // GuidedStats
  int parts;                     // partial sums per sample (≤ kMaxParts)
  int num_history;               // history tensors in use (≤ kMaxHistory)
  bool guided, rescale, apg_momentum_on, perturbed, clip, grad_eps, learned_var;
  bool has_noise, has_grad_term, out_2b, out_3b, has_x0_out;  // out_2b: a 2B or 3B out
  StepScalars step;
  CombineScalars combine;
  float k_history[kMaxHistory];
  float log_var_min, log_var_max;
  int prediction_type;         // PredictionType
  float inv_alpha, inv_sigma;  // 1/alpha, 1/sigma (0 when sigma = 0), once per step
};

// Which optional inputs an elementwise instance has. RuntimeReads: what the parameters say,
// each a runtime branch (every step; the scalar path). CommonReads: the common steps (no
// APG momentum, classifier gradient or learned variance; noise or none as kNoise says),
// where those branches are constants: the loads they guard, and the registers that would
// wait on those loads, are compiled away, so that each thread has room for two vectors of
// every input in flight. A reduction (rescale, CFG-Zero*, APG, tangential) adds no load,
// only its sample's three coefficients (sample_coefficients_kernel merges them), so both
// serve it. common_reads says when a CommonReads instance computes what RuntimeReads would.
struct RuntimeReads {
  // One vector per input: with two, every optional input's registers halve the blocks an SM
  // holds (sm_90, bf16: 62 → 114 registers), and the bytes in flight stay where they were.
  static constexpr int kVectorsPerThread = 1;
  FG_HOST_DEVICE static bool momentum(const GuidedStepParams& p) { return p.apg_momentum_on; }
  FG_HOST_DEVICE static bool grad_eps(const GuidedStepParams& p) { return p.grad_eps; }
  FG_HOST_DEVICE static bool grad_term(const GuidedStepParams& p) { return p.has_grad_term; }
  FG_HOST_DEVICE static bool reads_grad(const GuidedStepParams& p) { return p.grad_eps || p.has_grad_term; }
  FG_HOST_DEVICE static bool learned_var(const GuidedStepParams& p) { return p.learned_var; }
  FG_HOST_DEVICE static bool noise(const GuidedStepParams& p) { return p.has_noise; }
};
// kLearnedVar (with kNoise only; the plain pass with no history only, runs_common): ADM's
// learned variance scales the noise, its channels read beside the prediction (ancestral
// sampling of an ADM model).
template <bool kNoise, bool kLearnedVar = false>
struct CommonReads {
  static_assert(kNoise || !kLearnedVar, "a learned variance without noise to scale is not read");
  static constexpr int kVectorsPerThread = 2;  // 16-byte vectors per input per thread
  FG_HOST_DEVICE static constexpr bool momentum(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool grad_eps(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool grad_term(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool reads_grad(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool learned_var(const GuidedStepParams&) { return kLearnedVar; }
  FG_HOST_DEVICE static constexpr bool noise(const GuidedStepParams&) { return kNoise; }
};
// APG with momentum (no gradient, no learned variance; noise or none fixed at compile
// time): the fp32 buffer read and written beside the step's other inputs, two vectors of
// each a thread, as CommonReads.
template <bool kNoise>
struct MomentumReads {
  static constexpr int kVectorsPerThread = 2;
  FG_HOST_DEVICE static constexpr bool momentum(const GuidedStepParams&) { return true; }
  FG_HOST_DEVICE static constexpr bool grad_eps(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool grad_term(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool reads_grad(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool learned_var(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static constexpr bool noise(const GuidedStepParams&) { return kNoise; }
};
// Classifier guidance (ADM's gradient on eps or on the mean; no APG momentum), with its
// learned variance and noise or without, fixed at compile time: the gradient read beside
// the step's other inputs, two vectors of each a thread. Which of its two uses the step
// makes stays a runtime choice: it moves no load.
template <bool kNoise, bool kLearnedVar>
struct GradReads {
  static constexpr int kVectorsPerThread = 2;
  FG_HOST_DEVICE static constexpr bool momentum(const GuidedStepParams&) { return false; }
  FG_HOST_DEVICE static bool grad_eps(const GuidedStepParams& p) { return p.grad_eps; }
  FG_HOST_DEVICE static bool grad_term(const GuidedStepParams& p) { return p.has_grad_term; }
  FG_HOST_DEVICE static constexpr bool reads_grad(const GuidedStepParams&) { return true; }
  FG_HOST_DEVICE static constexpr bool learned_var(const GuidedStepParams&) { return kLearnedVar; }
  FG_HOST_DEVICE static constexpr bool noise(const GuidedStepParams&) { return kNoise; }
};
// Whether the step's guidance is a reduction variant's m = f·(α_c·c + α_v·v), with the
// sample's coefficients from the stats pass.
FG_HOST_DEVICE bool reduced(const GuidedStepParams& p) { return p.stats != kStatsNone; }

inline bool common_reads(const GuidedStepParams& p) {
  return !p.apg_momentum_on && !p.grad_eps && !p.has_grad_term && (!p.learned_var || p.has_noise);
}

// When a GradReads instance computes what RuntimeReads would.
inline bool grad_reads(const GuidedStepParams& p) { return (p.grad_eps || p.has_grad_term) && !p.apg_momentum_on; }

// When a MomentumReads instance computes what RuntimeReads would.
inline bool momentum_reads(const GuidedStepParams& p) {
  return p.apg_momentum_on && !p.grad_eps && !p.has_grad_term && !p.learned_var;
}

// The reciprocals the step divides by, once per step on the host.
inline void derive_step_constants(GuidedStepParams& p) {
  p.inv_alpha = p.step.alpha > 0.0f ? 1.0f / p.step.alpha : 0.0f;
  p.inv_sigma = p.step.sigma > 0.0f ? 1.0f / p.step.sigma : 0.0f;
}

template <typename T>
struct GuidedStepTensors {
  const T* model_output;
  const T* uncond;                  // the guiding prediction's first sample, null unless guided
  const T* x;
  const T* history[kMaxHistory];    // the first num_history are set
  const T* noise;                   // null unless has_noise
  const T* grad;                    // null unless grad_eps or has_grad_term
  float* apg_buffer;                // fp32 momentum state, null unless apg_momentum_on
  T* out;
  T* x0_out;                        // null unless has_x0_out
  float* partials;                  // (batch, parts, 8) fp32 partial moments, null unless stats != none
  float* coefficients;              // (batch, 3) fp32 SampleCoefficients of the merged partials, likewise
  float* similarity_partials;       // (batch, blocks, 3) fp32 SimilaritySums of the elementwise pass's
                                    // blocks, null unless asked (never with a perturbed prediction)
};

// Σa·b, Σa·a, Σb·b over a set of elements, a = x̂0_c and b = x̂0_u the x0 predictions of c
// and u: what cos(x̂0_c, x̂0_u) = Σa·b/(√Σa·a·√Σb·b) needs.
struct SimilaritySums {
  float cu, cc, uu;
};
constexpr int kSimilarityFields = 3;  // floats of one block's SimilaritySums in similarity_partials

FG_HOST_DEVICE void add_similarity(SimilaritySums& s, float x0_c, float x0_u) {
  s.cu += x0_c * x0_u;
  s.cc += x0_c * x0_c;
  s.uu += x0_u * x0_u;
}

// The moments of (c, v) over a set of elements: count n, means μc, μv and the centred
// co-moment sums Mcc = Σ(c − μc)², Mvv = Σ(v − μv)², Mcv = Σ(c − μc)(v − μv). The means
// are offsets from a reference value (an element) that the holder keeps: exact to the
// last bit of a spread much smaller than |μ|, and exactly 0 for a constant set. A partial
// of the stats pass is (n, r_c, r_v, μc − r_c, μv − r_v, Mcc, Mvv, Mcv); the merge over
// the parts runs in double (sample_coefficients).
struct Moments {
  float count, mean_c, mean_v, m_cc, m_vv, m_cv;
};

// Chan's merge of two sets whose means share a reference: δ = μ_b − μ_a,
// μ = μ_a + δ·n_b/n, M = M_a + M_b + δ·δ'·n_a·n_b/n. An empty set (all zero) leaves the
// other exactly as it is, without a branch. Deterministic for a fixed order.
FG_HOST_DEVICE Moments merge_moments(const Moments& a, const Moments& b) {
  const float count = a.count + b.count;
  const float weight_b = b.count / (count > 0.0f ? count : 1.0f), weight = a.count * weight_b;
  const float delta_c = b.mean_c - a.mean_c, delta_v = b.mean_v - a.mean_v;
  return {count,
          a.mean_c + delta_c * weight_b,
          a.mean_v + delta_v * weight_b,
          a.m_cc + b.m_cc + delta_c * delta_c * weight,
          a.m_vv + b.m_vv + delta_v * delta_v * weight,
          a.m_cv + b.m_cv + delta_c * delta_v * weight};
}

// One thread's running sums of the stats pass: its elements shifted by its first one
// (k_c, k_v, set before the first add), so that the differences are exact for nearby values.
struct ShiftedSums {
  float count, k_c, k_v, c, v, cc, vv, cv;
};

// Adds (c, v) to the shifted sums.
FG_HOST_DEVICE void add_shifted(ShiftedSums& s, float c, float v) {
  const float dc = c - s.k_c, dv = v - s.k_v;
  s.count += 1.0f;
  s.c += dc;
  s.v += dv;
  s.cc += dc * dc;
  s.vv += dv * dv;
  s.cv += dc * dv;
}

// A thread's moments, means about the reference (ref_c, ref_v): μ − r = (k − r) + S1/n
// (k − r exact for nearby values), M = S2 − S1·S1'/n. As k is one of the n elements,
// n(μ − k)² ≤ (n − 1)·M: M loses at most a factor n (the thread's elements, a part's
// / 256; about 2 for a typical k) to cancellation, where E[x²] − E[x]² loses (μ/σ)².
FG_HOST_DEVICE Moments shifted_moments(const ShiftedSums& s, float ref_c, float ref_v) {
  if (s.count == 0.0f) return {};
  const float inv = 1.0f / s.count;
  return {s.count, (s.k_c - ref_c) + s.c * inv, (s.k_v - ref_v) + s.v * inv,
          s.cc - s.c * s.c * inv, s.vv - s.v * s.v * inv, s.cv - s.c * s.v * inv};
}

struct SampleCoefficients {
  float alpha_c, alpha_v, f;
};
constexpr int kCoefficientFields = 3;  // floats of one sample's SampleCoefficients in `coefficients`

// (α_c, α_v, f) of one sample from its `parts` partials, merged in double in a fixed
// order (deterministic): about the first part's mean μ₀, S1 = Σ n_p(μ_p − μ₀),
// S2 = Σ M_p + n_p(μ_p − μ₀)(μ_p − μ₀)', M = S2 − S1·S1'/n (what cancels there is
// (μ − μ₀)²/σ², nothing next to double's precision). The Gram entries are
// Σxy = Mxy + n·μx·μy with u = c − v. CFG-Zero*'s partials are of the pair (c, u) instead
// (stats_inputs_at), as ‖u‖² = Mcc − 2Mcv + Mvv keeps no digit where ‖u‖ ≪ ‖c‖.
template <bool kPerturbed>
FG_HOST_DEVICE SampleCoefficients sample_coefficients(const GuidedStepParams& p, const float* sample_partials) {
  const double ref_c = double(sample_partials[1]) + sample_partials[3];
  const double ref_v = double(sample_partials[2]) + sample_partials[4];
  double n = 0.0, s_c = 0.0, s_v = 0.0, s_cc = 0.0, s_vv = 0.0, s_cv = 0.0;
  for (int part = 0; part < p.parts; ++part) {
    const float* row = sample_partials + part * kStatsPerSample;
    const double count = row[0];
    const double d_c = (double(row[1]) + row[3]) - ref_c, d_v = (double(row[2]) + row[4]) - ref_v;
    n += count;
    s_c += count * d_c;
    s_v += count * d_v;
    s_cc += row[5] + count * d_c * d_c;
    s_vv += row[6] + count * d_v * d_v;
    s_cv += row[7] + count * d_c * d_v;
  }
  const double mean_c = ref_c + s_c / n, mean_v = ref_v + s_v / n;
  const double m_cc = s_cc - s_c * s_c / n, m_vv = s_vv - s_v * s_v / n, m_cv = s_cv - s_c * s_v / n;
  const bool zero_star = p.stats == kStatsZeroStar;
  // With zero_star the moments named v are u's (mean_u, m_uu, m_cu below).
  const double mean_u = zero_star ? mean_v : mean_c - mean_v;
  const double cc = m_cc + n * mean_c * mean_c, vv = m_vv + n * mean_v * mean_v, cv = m_cv + n * mean_c * mean_v;
  const double cu = zero_star ? cv : (m_cc - m_cv) + n * mean_c * mean_u;
  const double uu = zero_star ? vv : (m_cc - 2.0 * m_cv + m_vv) + n * mean_u * mean_u;
  const double w = p.combine.scale;
  // Plain CFG; with a perturbed prediction v is the whole guidance term, m₀ = c + v.
  double alpha_c = 1.0, alpha_v = kPerturbed ? 1.0 : w - 1.0, f = 1.0;
  double s_star = 0.0;
  if (zero_star) {
    s_star = cu / (uu + 1e-8);
    // m₀ = w·c + (1 − w)s*·u, first in the pair (c, u) of the moments (for the rescale).
    alpha_c = w;
    alpha_v = (1.0 - w) * s_star;
  } else if (p.stats == kStatsTangential) {
    // u ← (u·v₁)v₁ = β(a₀c + a₁u), (a₀, a₁) the top eigenvector of [[c·c, c·u], [c·u, u·u]].
    const double half_gap = cv - 0.5 * vv;  // (c·c − u·u)/2
    const double root = sqrt(half_gap * half_gap + cu * cu);
    const double top = 0.5 * (cc + uu) + root;
    const double a0 = half_gap >= 0.0 ? root + half_gap : cu;  // top − u·u or c·u: the form that does not cancel
    const double a1 = half_gap >= 0.0 ? cu : root - half_gap;  // c·u or top − c·c
    const double denominator = top * (a0 * a0 + a1 * a1);
    const double beta = denominator > 0.0 ? (a0 * cu + a1 * uu) / denominator : 0.0;
    alpha_c = w + (1.0 - w) * beta * (a0 + a1);
    alpha_v = -(1.0 - w) * beta * a1;
  } else if (p.stats == kStatsApg) {
    double clip = 1.0;
    if (p.combine.apg_norm_threshold > 0.0f) {
      clip = fmin(clip, static_cast<double>(p.combine.apg_norm_threshold) / sqrt(vv));
    }
    alpha_c = 1.0 + (w - 1.0) * clip * (static_cast<double>(p.combine.apg_eta) - 1.0) * cv / fmax(cc, 1e-24);
    alpha_v = (w - 1.0) * clip;
  }
  if (p.rescale) {
    // (n − 1)·var(m₀) of m₀ = α_c·c + α_v·v; the 1/(n − 1) cancels in the ratio.
    const double m_mm = alpha_c * alpha_c * m_cc + 2.0 * alpha_c * alpha_v * m_cv + alpha_v * alpha_v * m_vv;
    const double phi = p.combine.rescale;
    // A constant guided prediction (std 0) is left as it is; NaN still propagates.
    f = m_mm <= 0.0 ? 1.0 : phi * sqrt(m_cc / m_mm) + 1.0 - phi;
  }
  if (zero_star) {  // then as the elementwise pass forms it, from c and v
    alpha_c = w + (1.0 - w) * s_star;
    alpha_v = (w - 1.0) * s_star;
  }
  return {static_cast<float>(alpha_c), static_cast<float>(alpha_v), static_cast<float>(f)};
}

// The coefficients when no reduction is needed: plain CFG (or the bare prediction).
FG_HOST_DEVICE SampleCoefficients plain_coefficients(const GuidedStepParams& p) {
  return {1.0f, p.combine.scale - 1.0f, 1.0f};
}

// One element's inputs and outputs, in fp32. Unused inputs are ignored.
struct StepInputs {
  float c, u, perturbed, buffer, x, noise, grad, var_value;
  float history[kMaxHistory];
};
struct StepOutputs {
  float x_next, x0, buffer;
};

// v = c − u, plus momentum·buffer for APG with momentum (the new buffer).
template <typename Reads = RuntimeReads>
FG_HOST_DEVICE float guidance_difference(const GuidedStepParams& p, float c, float u, float buffer) {
  float v = c - u;
  if (Reads::momentum(p)) v += p.combine.apg_momentum * buffer;
  return v;
}

// With a perturbed prediction (PAG, SLG): the whole guidance term g = (w − 1)·v + s·(c − p),
// m = c + g, which the statistics are taken of in place of v.
FG_HOST_DEVICE float perturbed_guidance(const GuidedStepParams& p, float c, float v, float perturbed) {
  return (p.combine.scale - 1.0f) * v + p.combine.perturbed_scale * (c - perturbed);
}

// x0 from a prediction m of x = alpha·x0 + sigma·eps by the prediction type's linear map,
// with no term of zero coefficient (0·inf would be NaN), expression for expression as
// guided_element derives the step's x0 from the guided prediction: the similarity
// output's x0 of c and of u.
FG_HOST_DEVICE float predicted_x0(const GuidedStepParams& p, float m, float x) {
  switch (p.prediction_type) {
    case kEpsilon:
      return (x - p.step.sigma * m) * p.inv_alpha;
    case kVPrediction:
      return p.step.alpha * x - p.step.sigma * m;
    case kFlowPrediction:  // m = eps − x0 on a path with alpha + sigma = 1
      return x - p.step.sigma * m;
    default:  // kSample
      return m;
  }
}

// The similarity output's terms of one element: the x0 predictions of c and u, each alone.
FG_HOST_DEVICE void add_similarity_at(const GuidedStepParams& p, SimilaritySums& s, const StepInputs& in) {
  add_similarity(s, predicted_x0(p, in.c, in.x), predicted_x0(p, in.u, in.x));
}

template <bool kPerturbed, typename Reads = RuntimeReads>
FG_HOST_DEVICE StepOutputs guided_element(const GuidedStepParams& p, const SampleCoefficients& k, const StepInputs& in) {
  StepOutputs result{0.0f, 0.0f, in.buffer};
  float m = in.c;
  if (p.guided) {
    if constexpr (kPerturbed) {  // "cfg" only: no APG momentum
      const float v = in.c - in.u;
      // As the reference writes it, u + w·(c − u) + s·(c − p), so that infinities agree.
      m = !reduced(p)
              ? in.u + p.combine.scale * v + p.combine.perturbed_scale * (in.c - in.perturbed)
              : k.f * (k.alpha_c * in.c + k.alpha_v * perturbed_guidance(p, in.c, v, in.perturbed));
    } else {
      const float v = guidance_difference<Reads>(p, in.c, in.u, in.buffer);
      result.buffer = v;
      // Plain CFG as the reference writes it, u + w·(c − u), so that infinities agree.
      m = !reduced(p) ? in.u + p.combine.scale * v : k.f * (k.alpha_c * in.c + k.alpha_v * v);
    }
  }
  // x0 and eps from m with no term of zero coefficient (0·inf would be NaN).
  // (x0 as predicted_x0 writes it; spelled out here so that the instances without the
  // similarity output compile as they always did.)
  float x0, eps;
  switch (p.prediction_type) {
    case kEpsilon:
      x0 = (in.x - p.step.sigma * m) * p.inv_alpha;
      eps = m;
      break;
    case kVPrediction:
      x0 = p.step.alpha * in.x - p.step.sigma * m;
      eps = p.step.sigma * in.x + p.step.alpha * m;
      break;
    case kFlowPrediction:  // m = eps − x0 on a path with alpha + sigma = 1
      x0 = in.x - p.step.sigma * m;
      eps = in.x + p.step.alpha * m;
      break;
    default:  // kSample
      x0 = m;
      eps = (in.x - p.step.alpha * m) * p.inv_sigma;
      break;
  }
  if (p.clip) {
    // Finite x0 only: fminf/fmaxf would drop a NaN, and clamping ±inf would hide it.
    x0 = fabsf(x0) < INFINITY ? fminf(fmaxf(x0, -1.0f), 1.0f) : x0;
    eps = (in.x - p.step.alpha * x0) * p.inv_sigma;
  }
  if (Reads::grad_eps(p)) {
    eps -= p.step.grad_eps_scale * in.grad;
    x0 = (in.x - p.step.sigma * eps) * p.inv_alpha;
  }
  // Terms with a zero coefficient are absent, as in the reference.
  float x_next = 0.0f;
  if (p.step.k_x != 0.0f) x_next += p.step.k_x * in.x;
  if (p.step.k_x0 != 0.0f) x_next += p.step.k_x0 * x0;
  if (p.step.k_eps != 0.0f) x_next += p.step.k_eps * eps;
  if (p.guided && p.step.k_guide_eps != 0.0f) {  // CFG++: renoise with the guiding prediction's own eps
    const float guide_eps = p.prediction_type == kEpsilon        ? in.u
                            : p.prediction_type == kVPrediction ? p.step.sigma * in.x + p.step.alpha * in.u
                            : p.prediction_type == kFlowPrediction ? in.x + p.step.alpha * in.u
                                                                 : (in.x - p.step.alpha * in.u) * p.inv_sigma;
    x_next += p.step.k_guide_eps * guide_eps;
  }
  float noise_coef = p.step.k_noise, grad_coef = p.step.k_grad;
  if (Reads::learned_var(p)) {
    // ADM's learned range: ℓ = frac·max + (1 − frac)·min, frac = (v + 1)/2.
    const float frac = (in.var_value + 1.0f) * 0.5f;
    const float log_var = frac * p.log_var_max + (1.0f - frac) * p.log_var_min;
    noise_coef *= expf(0.5f * log_var);
    grad_coef *= expf(log_var);
  }
  // Fixed trip count with a guard: the history stays in registers (no dynamic indexing).
  FG_UNROLL
  for (int i = 0; i < kMaxHistory; ++i) {
    if (i < p.num_history && p.k_history[i] != 0.0f) x_next += p.k_history[i] * in.history[i];
  }
  if (Reads::noise(p)) x_next += noise_coef * in.noise;
  if (Reads::grad_term(p)) x_next += grad_coef * in.grad;
  result.x_next = x_next;
  result.x0 = x0;
  return result;
}

// c and v = c − u (+ momentum·buffer; the whole guidance term with kPerturbed) of element j
// of sample b; with kZeroStar, c and u itself (u = c − v would round away a u much smaller
// than c; see sample_coefficients). A perturbed prediction comes with the model output
// [c; u; p]: u and p are read at B-row block offsets from c (one live pointer where three
// would be), and there is no APG buffer ("cfg" only).
template <typename T, bool kPerturbed, bool kZeroStar>
FG_HOST_DEVICE void stats_inputs_at(const GuidedStepParams& p, const GuidedStepTensors<T>& t, int64_t b, int64_t j,
                                    float& c, float& v) {
  const int64_t mo = b * p.mo_sample_stride + j;
  c = to_float(t.model_output[mo]);
  if constexpr (kPerturbed) {
    const float u = to_float(t.model_output[mo + p.mo_block]);
    v = perturbed_guidance(p, c, c - u, to_float(t.model_output[mo + 2 * p.mo_block]));
  } else {
    const float u = to_float(t.uncond[b * p.uncond_sample_stride + j]);
    if constexpr (kZeroStar) {
      v = u;
    } else {
      const float buffer = p.apg_momentum_on ? t.apg_buffer[b * p.sample_elems + j] : 0.0f;
      v = guidance_difference(p, c, u, buffer);
    }
  }
}

// Adds element j of sample b to a thread's shifted sums.
template <typename T, bool kPerturbed, bool kZeroStar>
FG_HOST_DEVICE void accumulate_stats_at(const GuidedStepParams& p, const GuidedStepTensors<T>& t, int64_t b,
                                        int64_t j, ShiftedSums& sums) {
  float c, v;
  stats_inputs_at<T, kPerturbed, kZeroStar>(p, t, b, j, c, v);
  add_shifted(sums, c, v);
}

// Elements per part of the stats pass: a multiple of `vec`, so vector loads stay aligned.
FG_HOST_DEVICE int64_t stats_part_elems(const GuidedStepParams& p, int vec) {
  const int64_t per_part = (p.sample_elems + p.parts - 1) / p.parts;
  return (per_part + vec - 1) / vec * vec;
}

// The whole step for element j of sample b, one element at a time (the kernels' scalar
// path, and the CPU harness); with kSimilarity its x0 predictions of c and u are also
// added to `similarity`.
template <typename T, bool kPerturbed, bool kSimilarity>
FG_HOST_DEVICE void guided_step_at(const GuidedStepParams& p, const GuidedStepTensors<T>& t,
                                   const SampleCoefficients& k, int64_t b, int64_t j,
                                   [[maybe_unused]] SimilaritySums& similarity) {
  const int64_t here = b * p.sample_elems + j;  // offset in every x-shaped tensor
  const int64_t mo = b * p.mo_sample_stride + j;
  StepInputs in{};
  in.c = to_float(t.model_output[mo]);
  if constexpr (kPerturbed) {  // [c; u; p]: u and p at B-row block offsets from c (stats_inputs_at)
    in.u = to_float(t.model_output[mo + p.mo_block]);
    in.perturbed = to_float(t.model_output[mo + 2 * p.mo_block]);
  } else if (p.guided) {
    in.u = to_float(t.uncond[b * p.uncond_sample_stride + j]);
  }
  const bool momentum = !kPerturbed && p.apg_momentum_on;  // APG's, never with a perturbed prediction
  if (momentum) in.buffer = t.apg_buffer[here];
  in.x = to_float(t.x[here]);
  FG_UNROLL
  for (int i = 0; i < kMaxHistory; ++i) {
    if (i < p.num_history) in.history[i] = to_float(t.history[i][here]);
  }
  if (p.has_noise) in.noise = to_float(t.noise[here]);
  if (p.grad_eps || p.has_grad_term) in.grad = to_float(t.grad[here]);
  if (p.learned_var) in.var_value = to_float(t.model_output[p.var_offset + mo]);
  if constexpr (kSimilarity) add_similarity_at(p, similarity, in);
  const StepOutputs r = guided_element<kPerturbed>(p, k, in);
  if (momentum) t.apg_buffer[here] = r.buffer;
  t.out[here] = from_float<T>(r.x_next);
  if (p.out_2b) {
    t.out[p.out_block_offset + here] = from_float<T>(r.x_next);
    if (p.out_3b) t.out[2 * p.out_block_offset + here] = from_float<T>(r.x_next);
  }
  if (p.has_x0_out) t.x0_out[here] = from_float<T>(r.x0);
}

// Launches the stats pass (when p.stats != none) and the elementwise pass on `stream`
// (a cudaStream_t). Every x-shaped tensor is of `dtype`, apg_buffer and partials are fp32.
// Returns 0 or a cudaError_t code.
int launch_guided_step(StorageType dtype, const GuidedStepParams& p, const GuidedStepTensors<void>& t, void* stream);

// Blocks per sample of the elementwise pass with the similarity output for these tensors
// (16-byte vectors or not): the rows of t.similarity_partials per sample, which the caller
// allocates before the launch.
int64_t guided_step_blocks(StorageType dtype, const GuidedStepParams& p, const GuidedStepTensors<void>& t);

}  // namespace fastguide
