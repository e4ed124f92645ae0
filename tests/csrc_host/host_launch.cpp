// CPU stand-ins for the CUDA launchers of csrc/: the same host/device functions the
// kernels call, driven by plain loops in the kernels' order of partial sums (per part /
// chunk, then merged). Built with csrc/bindings.cpp and -DFASTGUIDE_HOST_HARNESS into a
// CPU extension, so tests/test_cuda_backend.py runs the cuda backend's whole path (Python
// glue, bindings, element math) against the float64 reference without a GPU.
// float32 storage only: the host has no half types; fp16/bf16 run in the GPU tests.
#include <algorithm>

#include "../../csrc/group_norm.cuh"
#include "../../csrc/guided_step.cuh"

namespace fastguide {

constexpr int kUnsupported = 1;

int launch_guided_step(StorageType dtype, const GuidedStepParams& p, const GuidedStepTensors<void>& untyped, void*) {
  if (dtype != StorageType::kFloat32) return kUnsupported;
  const GuidedStepTensors<float> t{
      static_cast<const float*>(untyped.model_output), static_cast<const float*>(untyped.x),
      static_cast<const float*>(untyped.prev),         static_cast<const float*>(untyped.noise),
      static_cast<const float*>(untyped.grad),         untyped.apg_buffer,
      static_cast<float*>(untyped.out),                static_cast<float*>(untyped.x0_out),
      untyped.partials};
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.stats != kStatsNone) {
      const int64_t per_part = stats_part_elems(p, 1);
      for (int part = 0; part < p.parts; ++part) {
        float acc[kStatsPerSample] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        const int64_t end = std::min((part + 1) * per_part, p.sample_elems);
        for (int64_t j = part * per_part; j < end; ++j) accumulate_stats_at(p, t, b, j, acc);
        std::copy(acc, acc + kStatsPerSample, t.partials + (b * p.parts + part) * kStatsPerSample);
      }
    }
    const SampleCoefficients k =
        p.stats == kStatsNone ? plain_coefficients(p) : sample_coefficients(p, t.partials + b * p.parts * kStatsPerSample);
    for (int64_t j = 0; j < p.sample_elems; ++j) guided_step_at(p, t, k, b, j);
  }
  return 0;
}

namespace {

// The per-channel reduction of both passes, chunk by chunk; `add` folds one position in.
template <typename Add>
void channel_sums(const GroupNormParams& p, float* partials, Add add) {
  const int64_t per_chunk = chunk_positions(p, 1);
  for (int64_t n = 0; n < p.n; ++n) {
    for (int64_t c = 0; c < p.c; ++c) {
      for (int chunk = 0; chunk < p.chunks; ++chunk) {
        float acc[2] = {0.0f, 0.0f};
        const int64_t end = std::min((chunk + 1) * per_chunk, p.s);
        for (int64_t s = chunk * per_chunk; s < end; ++s) add(n, c, s, acc);
        float* out = partials + ((n * p.c + c) * p.chunks + chunk) * 2;
        out[0] = acc[0];
        out[1] = acc[1];
      }
    }
  }
}

int64_t group_of(const GroupNormParams& p, int64_t i) {
  return (i / (p.c * p.s)) * p.groups + channel_of(p, i) / p.channels_per_group;
}

}  // namespace

int launch_group_norm_forward(StorageType dtype, const GroupNormParams& p, const void* x_untyped,
                              const GroupNormAffine& a, void* y_untyped, float* mean, float* rstd, float* partials,
                              float* shifts, void*) {
  if (dtype != StorageType::kFloat32) return kUnsupported;
  const float* x = static_cast<const float*>(x_untyped);
  float* y = static_cast<float*>(y_untyped);
  for (int64_t n = 0; n < p.n; ++n) {
    for (int64_t c = 0; c < p.c; ++c) shifts[n * p.c + c] = x[element_offset(p, n, c, 0)];
  }
  channel_sums(p, partials, [&](int64_t n, int64_t c, int64_t s, float(&acc)[2]) {
    add_moments(x[element_offset(p, n, c, s)], shifts[n * p.c + c], acc);
  });
  for (int64_t group = 0; group < p.n * p.groups; ++group) {
    group_statistics(p, partials, shifts, group / p.groups, group % p.groups, mean[group], rstd[group]);
  }
  for (int64_t i = 0; i < p.n * p.c * p.s; ++i) {
    const int64_t group = group_of(p, i);
    const ChannelAffine k = channel_affine(p, a, i / (p.c * p.s), channel_of(p, i));
    y[i] = normalize_element(p, k, x[i], mean[group], rstd[group]);
  }
  return 0;
}

int launch_group_norm_backward(StorageType dtype, const GroupNormParams& p, const void* dy_untyped,
                               const void* x_untyped, const GroupNormAffine& a, const float* mean, const float* rstd,
                               void* dx_untyped, float* sums, float* partials, float* group_sums, void*) {
  if (dtype != StorageType::kFloat32) return kUnsupported;
  const float* dy = static_cast<const float*>(dy_untyped);
  const float* x = static_cast<const float*>(x_untyped);
  float* dx = static_cast<float*>(dx_untyped);
  channel_sums(p, partials, [&](int64_t n, int64_t c, int64_t s, float(&acc)[2]) {
    const int64_t group = n * p.groups + c / p.channels_per_group;
    const int64_t offset = element_offset(p, n, c, s);
    add_backward_sums(p, channel_affine(p, a, n, c), dy[offset], x[offset], mean[group], rstd[group], acc);
  });
  for (int64_t group = 0; group < p.n * p.groups; ++group) {
    backward_group_sums(p, a, partials, sums, group / p.groups, group % p.groups, group_sums[2 * group],
                        group_sums[2 * group + 1]);
  }
  for (int64_t i = 0; i < p.n * p.c * p.s; ++i) {
    const int64_t group = group_of(p, i);
    const ChannelAffine k = channel_affine(p, a, i / (p.c * p.s), channel_of(p, i));
    const float x_hat = (x[i] - mean[group]) * rstd[group];
    const float dz = backward_dz(p, k, dy[i], x_hat);
    dx[i] = backward_dx(k, dz, x_hat, rstd[group], group_sums[2 * group], group_sums[2 * group + 1]);
  }
  return 0;
}

}  // namespace fastguide
