// Registers the CUDA kernels as the ops of the `fastguide_cuda` library. fastguide's
// public ops (fastguide.ops, namespace `fastguide`) call these when the cuda backend is
// chosen (fastguide/ops/cuda_backend.py prepares dense tensors first, x-shaped ones in
// x's dtype; the norms' parameters keep theirs), so
// torch.compile sees the same `fastguide::` op whichever backend runs under it.
//
// Built with -DFASTGUIDE_HOST_HARNESS, the same bindings register the kernels compiled
// for the CPU emulation (tests/cuda_emulation/) for CPU tensors: the whole path from the
// Python glue through these bindings and the kernels is then tested without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "group_norm.cuh"
#include "guided_step.cuh"
#include "layer_norm.cuh"

// The harness registers its own namespace, so that it can load beside the real extension.
#ifdef FASTGUIDE_HOST_HARNESS
#define FASTGUIDE_DISPATCH_KEY CPU
#define FASTGUIDE_OPS_NAMESPACE fastguide_cuda_host
#else
#define FASTGUIDE_OPS_NAMESPACE fastguide_cuda
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#define FASTGUIDE_DISPATCH_KEY CUDA
#endif

namespace fastguide {
namespace {

StorageType storage_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return StorageType::kFloat32;
    case at::kHalf:
      return StorageType::kFloat16;
    case at::kBFloat16:
      return StorageType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastguide_cuda: expected float32, float16 or bfloat16 tensors, got ", t.scalar_type());
  }
}

#ifdef FASTGUIDE_HOST_HARNESS
void* current_stream(const at::Tensor&) { return nullptr; }
int multiprocessors(const at::Tensor&) { return 8; }  // small, but enough to exercise the split
void check_launch(int code) { TORCH_CHECK(code == 0, "fastguide CUDA emulation: launch failed with code ", code); }
#else
void* current_stream(const at::Tensor&) { return c10::cuda::getCurrentCUDAStream().stream(); }
int multiprocessors(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
}
void check_launch(int code) {
  TORCH_CHECK(code == 0, "fastguide CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(code)));
}
#endif

template <typename T = void>
T* pointer_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// x's dense layout, which every tensor of a step shares: the kernels index them all with
// one set of offsets.
at::MemoryFormat dense_format(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "fastguide_cuda: x must be contiguous or channels_last");
  return x.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
}

void check_same(const at::Tensor& like, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), "fastguide_cuda: ", name, " must have dtype ",
              like.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == like.device(), "fastguide_cuda: ", name, " must be on ", like.device());
  TORCH_CHECK(t->is_contiguous(dense_format(like)), "fastguide_cuda: ", name, " must be dense in x's memory format");
}

// t's sizes: `rows` rows (any of them, where several are allowed), `channels` channels
// (likewise), and x's sizes past the channels.
void check_rows_channels(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name,
                         std::initializer_list<int64_t> rows, std::initializer_list<int64_t> channels) {
  if (!t.has_value()) return;
  const auto in = [](int64_t value, std::initializer_list<int64_t> allowed) {
    return std::find(allowed.begin(), allowed.end(), value) != allowed.end();
  };
  TORCH_CHECK(t->dim() == x.dim() && in(t->size(0), rows) && in(t->size(1), channels) &&
                  t->sizes().slice(2) == x.sizes().slice(2),
              "fastguide_cuda::guided_step: ", name, " has shape ", t->sizes(), ", which does not fit x of shape ",
              x.sizes());
}

// Copies a contract type's float[] into its C++ struct (fields in the same order).
template <typename Scalars>
Scalars scalars_from(at::ArrayRef<double> values, const char* name) {
  constexpr size_t count = sizeof(Scalars) / sizeof(float);
  static_assert(sizeof(Scalars) == count * sizeof(float), "a contract struct holds floats only");
  TORCH_CHECK(values.size() == count, "fastguide_cuda::guided_step: expected ", count, " ", name, " scalars, got ",
              values.size());
  float packed[count];
  for (size_t i = 0; i < count; ++i) packed[i] = static_cast<float>(values[i]);
  Scalars result;
  std::memcpy(&result, packed, sizeof(Scalars));
  return result;
}

PredictionType prediction_type_from(c10::string_view name) {
  if (name == "epsilon") return kEpsilon;
  if (name == "v_prediction") return kVPrediction;
  if (name == "flow_prediction") return kFlowPrediction;
  TORCH_CHECK(name == "sample", "fastguide_cuda::guided_step: unknown prediction type ", name);
  return kSample;
}

// Runs the step; with `similarity`, returns the elementwise pass's per-block sums
// (batch, blocks, 3) of x̂0_c·x̂0_u, x̂0_c², x̂0_u² (fp32; x̂0_c, x̂0_u the x0 predictions of c
// and u, each by the step's prediction-type map), which the Python glue merges into
// cos(x̂0_c, x̂0_u) per sample (fastguide.ops.layout.merge_similarity, as the Triton
// launcher does).
std::optional<at::Tensor> guided_step(
    const at::Tensor& model_output, const std::optional<at::Tensor>& guide, const at::Tensor& x,
    at::TensorList history, const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& apg_buffer, const at::Tensor& out, const std::optional<at::Tensor>& x0_out,
    at::ArrayRef<double> step_scalars, at::ArrayRef<double> k_history, c10::string_view prediction_type, bool clip,
    std::optional<at::ArrayRef<double>> log_variance_range, std::optional<at::ArrayRef<double>> combine_scalars,
    int64_t stats, bool similarity) {
  TORCH_CHECK(history.size() == k_history.size() && history.size() <= static_cast<size_t>(kMaxHistory),
              "fastguide_cuda::guided_step: history and k_history must have one length up to ", kMaxHistory);
  // (fastguide.ops sends an empty step to the torch backend: a zero-sized grid is no launch)
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0, "fastguide_cuda::guided_step: x must be a non-empty (B, C, ...) tensor");
  const int64_t batch = x.size(0), channels = x.size(1);
  const bool guided = combine_scalars.has_value();
  const CombineScalars combine = guided ? scalars_from<CombineScalars>(*combine_scalars, "combine") : CombineScalars{};
  // [c; u; p] rows wherever the caller's (double) scale is nonzero, as fastguide.ops checks
  // them: one below float32's range runs the kernel unperturbed on the same rows.
  constexpr size_t kPerturbedScale = offsetof(CombineScalars, perturbed_scale) / sizeof(float);
  const bool perturbed = guided && (*combine_scalars)[kPerturbedScale] != 0.0;
  const int64_t rows = perturbed ? 3 * batch : guided && !guide.has_value() ? 2 * batch : batch;
  check_rows_channels(x, model_output, "model_output", {rows}, {channels, 2 * channels});
  check_rows_channels(x, guide, "guide", {batch}, {channels, model_output.size(1)});
  for (const at::Tensor& h : history) check_rows_channels(x, h, "history", {batch}, {channels});
  for (const auto& [t, name] :
       {std::pair{&noise, "noise"}, {&grad, "grad"}, {&x0_out, "x0_out"}, {&apg_buffer, "apg_buffer"}}) {
    check_rows_channels(x, *t, name, {batch}, {channels});
  }
  check_rows_channels(x, out, "out", {batch, 2 * batch, 3 * batch}, {channels});
  check_same(x, model_output, "model_output");
  check_same(x, guide, "guide");
  // The kernels read element j of a sample at j in every x-shaped tensor: channels_last puts
  // a pixel's channels together, so a 2C prediction (a learned variance) is read there only
  // contiguous (the Python glue makes it so).
  const bool contiguous = dense_format(x) == at::MemoryFormat::Contiguous;
  TORCH_CHECK(contiguous || (model_output.size(1) == channels && (!guide.has_value() || guide->size(1) == channels)),
              "fastguide_cuda::guided_step: a prediction of 2C channels needs contiguous tensors, not channels_last");
  for (const at::Tensor& h : history) check_same(x, h, "history");
  for (const auto& [t, name] : {std::pair{&noise, "noise"}, {&grad, "grad"}, {&x0_out, "x0_out"}}) {
    check_same(x, *t, name);
  }
  check_same(x, out, "out");
  if (apg_buffer.has_value()) {
    TORCH_CHECK(apg_buffer->scalar_type() == at::kFloat && apg_buffer->device() == x.device() &&
                    apg_buffer->is_contiguous(dense_format(x)),
                "fastguide_cuda::guided_step: apg_buffer must be float32, on x's device, dense in x's memory format");
  }
#ifndef FASTGUIDE_HOST_HARNESS
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  GuidedStepParams p{};
  p.guided = combine_scalars.has_value();
  p.step = scalars_from<StepScalars>(step_scalars, "step");
  if (p.guided) p.combine = combine;
  p.prediction_type = prediction_type_from(prediction_type);
  derive_step_constants(p);
  p.num_history = static_cast<int>(history.size());
  for (int i = 0; i < p.num_history; ++i) p.k_history[i] = static_cast<float>(k_history[i]);
  // The learned variance scales the noise and gradient terms alone: without them it is not
  // read (and the step can run a CommonReads instance).
  p.learned_var = log_variance_range.has_value() && (noise.has_value() || (grad.has_value() && p.step.k_grad != 0.0f));
  if (p.learned_var) {
    TORCH_CHECK(log_variance_range->size() == 2, "fastguide_cuda::guided_step: log_variance_range is (min, max)");
    TORCH_CHECK(model_output.size(1) == 2 * x.size(1),
                "fastguide_cuda::guided_step: a learned variance needs model_output of 2C channels");
    p.log_var_min = static_cast<float>((*log_variance_range)[0]);
    p.log_var_max = static_cast<float>((*log_variance_range)[1]);
  }
  p.batch = x.size(0);
  p.sample_elems = x.numel() / std::max<int64_t>(p.batch, 1);
  p.mo_sample_stride = model_output.numel() / model_output.size(0);
  const at::Tensor* uncond = guide.has_value() ? &*guide : &model_output;
  p.uncond_sample_stride = uncond->numel() / uncond->size(0);
  p.mo_block = p.batch * p.mo_sample_stride;
  p.var_offset = x.size(1) * (p.mo_sample_stride / model_output.size(1));
  p.out_block_offset = p.batch * p.sample_elems;
  TORCH_CHECK(stats >= kStatsNone && stats <= kStatsTangential && (stats == kStatsNone || p.guided),
              "fastguide_cuda::guided_step: stats must be 0 to 4, and 0 without a combine, got ", stats);
  p.stats = static_cast<int>(stats);
  p.parts = static_cast<int>(std::clamp<int64_t>((p.sample_elems + 2047) / 2048, 1, kMaxParts));
  p.rescale = p.guided && p.combine.rescale > 0.0f;
  p.perturbed = p.guided && p.combine.perturbed_scale != 0.0f;
  TORCH_CHECK(!p.perturbed || (!guide.has_value() && model_output.size(0) == 3 * p.batch),
              "fastguide_cuda::guided_step: a perturbed prediction needs model_output [c; u; p] and no guide");
  TORCH_CHECK(!similarity || (p.guided && !p.perturbed),
              "fastguide_cuda::guided_step: similarity needs a guided step without a perturbed prediction");
  p.apg_momentum_on = apg_buffer.has_value();
  p.clip = clip;
  p.grad_eps = grad.has_value() && p.step.grad_eps_scale != 0.0f;
  p.has_noise = noise.has_value();
  p.has_grad_term = grad.has_value() && p.step.k_grad != 0.0f;
  p.out_2b = out.size(0) >= 2 * p.batch;  // a 2B or 3B out: x_next in each B-row block
  p.out_3b = out.size(0) == 3 * p.batch;
  p.has_x0_out = x0_out.has_value();

  at::Tensor partials, coefficients;
  if (p.stats != kStatsNone) {
    partials = at::empty({p.batch, p.parts, kStatsPerSample}, x.options().dtype(at::kFloat));
    coefficients = at::empty({p.batch, kCoefficientFields}, x.options().dtype(at::kFloat));
  }
  GuidedStepTensors<void> tensors{};
  tensors.model_output = model_output.data_ptr();
  // The guiding prediction: a separate tensor, or the model output's second B rows (the
  // perturbed kernels read u and p of [c; u; p] at p.mo_block offsets from c themselves).
  if (p.guided) {
    tensors.uncond = guide.has_value() ? guide->data_ptr()
                                       : static_cast<const char*>(model_output.data_ptr()) +
                                             p.mo_block * model_output.element_size();
  }
  tensors.x = x.data_ptr();
  for (int i = 0; i < p.num_history; ++i) tensors.history[i] = history[i].data_ptr();
  tensors.noise = pointer_or_null<const void>(noise);
  tensors.grad = pointer_or_null<const void>(grad);
  tensors.apg_buffer = pointer_or_null<float>(apg_buffer);
  tensors.out = out.data_ptr();
  tensors.x0_out = pointer_or_null(x0_out);
  tensors.partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  tensors.coefficients = coefficients.defined() ? coefficients.data_ptr<float>() : nullptr;
  std::optional<at::Tensor> similarity_partials;
  if (similarity) {  // one row per block of the elementwise pass, each written by its block
    similarity_partials = at::empty({p.batch, guided_step_blocks(storage_type(x), p, tensors), kSimilarityFields},
                                    x.options().dtype(at::kFloat));
    tensors.similarity_partials = similarity_partials->data_ptr<float>();
  }
  check_launch(launch_guided_step(storage_type(x), p, tensors, current_stream(x)));
  return similarity_partials;
}

bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// lane_channels: the channels a lane of the channels_last per-channel pass reads (the
// backward's pairs: 2 where C is even; the forward's statistics: 1).
GroupNormParams norm_params(const at::Tensor& x, int64_t num_groups, bool silu, double eps,
                            const GroupNormAffine& affine, int64_t lane_channels) {
  TORCH_CHECK(x.is_contiguous() || is_channels_last(x), "fastguide_cuda: x must be contiguous or channels_last");
  TORCH_CHECK(x.dim() >= 2, "fastguide_cuda: group_norm needs x of (N, C, ...), got ", x.sizes());
  // The per-channel statistics run a block per (n, c) (NCHW) in the grid's x, below 2^31.
  TORCH_CHECK(x.size(0) * x.size(1) < (int64_t{1} << 31), "fastguide_cuda: group_norm needs batch × channels below ",
              "2^31, got ", x.size(0), " × ", x.size(1));
  // (fastguide.ops sends an empty x to the torch backend: an empty group has no statistics)
  TORCH_CHECK(x.numel() > 0, "fastguide_cuda: group_norm needs a non-empty x, got ", x.sizes());
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, "fastguide_cuda: group_norm needs num_groups dividing ",
              "the ", x.size(1), " channels, got ", num_groups);
  GroupNormParams p{};
  p.n = x.size(0);
  p.c = x.size(1);
  p.s = x.numel() / std::max<int64_t>(p.n * p.c, 1);
  p.groups = num_groups;
  p.channels_per_group = p.c / num_groups;
  p.channels_last = is_channels_last(x);
  p.has_weight = affine.weight.present();
  p.has_bias = affine.bias.present();
  p.has_scale = affine.scale.present();
  p.has_shift = affine.shift.present();
  p.silu = silu;
  p.eps = static_cast<float>(eps);
  // Split each channel's reduction over spatial chunks until ~4 blocks per multiprocessor.
  const int64_t tile = 32 * lane_channels;
  const int64_t blocks = p.channels_last ? p.n * ((p.c + tile - 1) / tile) : p.n * p.c;
  const int64_t wanted = (4 * static_cast<int64_t>(multiprocessors(x)) + blocks - 1) / blocks;
  p.chunks = static_cast<int>(std::clamp<int64_t>(std::min(wanted, (p.s + 255) / 256), 1, 32));
  // (a block per group: the grid's x holds fewer than 2^31)
  p.group_in_registers = !p.channels_last && p.n * p.groups >= 2 * static_cast<int64_t>(multiprocessors(x)) &&
                         p.n * p.groups < (int64_t{1} << 31);
  return p;
}

// A norm's parameter as the kernels read it: contiguous on x's device, in float32, float16
// or bfloat16 (its own dtype, which may differ from x's and from the other parameters'),
// `shaped` as the op needs (`shape` names that in the error).
Parameter parameter(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name, bool shaped = true,
                    const char* shape = "") {
  if (!t.has_value()) return {nullptr, StorageType::kFloat32};
  const at::ScalarType dtype = t->scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && t->is_contiguous() &&
                  t->device() == x.device() && shaped,
              "fastguide_cuda: ", name, " must be a contiguous float32, float16 or bfloat16 ", shape, "tensor on ",
              x.device());
  return {t->data_ptr(), storage_type(*t)};
}

GroupNormAffine norm_affine(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift) {
  // weight and bias per channel, scale and shift per (sample, channel)
  const auto holds = [](const std::optional<at::Tensor>& t, int64_t count) {
    return !t.has_value() || t->numel() == count;
  };
  const int64_t c = x.dim() >= 2 ? x.size(1) : 0, nc = x.dim() >= 2 ? x.size(0) * c : 0;
  return {parameter(x, weight, "weight", holds(weight, c), "(C,) "),
          parameter(x, bias, "bias", holds(bias, c), "(C,) "),
          parameter(x, scale, "scale", holds(scale, nc), "(N, C) "),
          parameter(x, shift, "shift", holds(shift, nc), "(N, C) ")};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool silu) {
#ifndef FASTGUIDE_HOST_HARNESS
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const GroupNormAffine affine = norm_affine(x, weight, bias, scale, shift);
  const GroupNormParams p = norm_params(x, num_groups, silu, eps, affine, 1);
  const auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({p.n, p.groups}, fp32);
  at::Tensor rstd = at::empty({p.n, p.groups}, fp32);
  at::Tensor partials = at::empty({p.n, p.c, p.chunks, kMomentFields}, fp32);
  at::Tensor shifts = at::empty({p.n, p.c}, fp32);
  at::Tensor maps = at::empty({p.n, p.c, 2}, fp32);
  check_launch(launch_group_norm_forward(storage_type(x), p, x.data_ptr(), affine, y.data_ptr(),
                                         mean.data_ptr<float>(), rstd.data_ptr<float>(), partials.data_ptr<float>(),
                                         shifts.data_ptr<float>(), maps.data_ptr<float>(), current_stream(x)));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  check_same(x, grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && is_channels_last(grad_y) == is_channels_last(x) &&
                  (grad_y.is_contiguous() || is_channels_last(grad_y)),
              "fastguide_cuda: grad_y must have x's shape and dense memory layout");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  rstd.is_contiguous() && x.dim() >= 2 && mean.numel() == x.size(0) * num_groups &&
                  rstd.numel() == mean.numel(),
              "fastguide_cuda: mean and rstd must be contiguous float32 of (N, num_groups)");
#ifndef FASTGUIDE_HOST_HARNESS
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const GroupNormAffine affine = norm_affine(x, weight, bias, scale, shift);
  const GroupNormParams p = norm_params(x, num_groups, silu, 0.0, affine, x.size(1) % 2 == 0 ? 2 : 1);
  const auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor sums = at::empty({p.n, p.c, 2}, fp32);
  at::Tensor partials = at::empty({p.n, p.c, p.chunks, 2}, fp32);
  at::Tensor maps = at::empty({p.n, p.c, 4}, fp32);
  check_launch(launch_group_norm_backward(storage_type(x), p, grad_y.data_ptr(), x.data_ptr(), affine,
                                          mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                                          sums.data_ptr<float>(), partials.data_ptr<float>(), maps.data_ptr<float>(),
                                          current_stream(x)));
  return {dx, sums};
}

// LayerNorm: x (N, L, D) dense in its storage type; every parameter a contiguous tensor
// in its own (fp32, fp16 or bf16), scale, shift and gate (N, 1, D) per sample or (N, L, D)
// per token.
LayerNormParams layer_norm_params(const at::Tensor& x, double eps, const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& gate) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "fastguide_cuda: x must be a contiguous (N, L, D) tensor");
  // The kernels index a row's columns with int (fewer registers than int64).
  TORCH_CHECK(x.size(2) < (int64_t{1} << 30), "fastguide_cuda: the normalized size D must be below 2^30, got ",
              x.size(2));
  LayerNormParams p{};
  p.rows = x.size(0) * x.size(1);
  p.tokens = x.size(1);
  p.d = x.size(2);
  p.eps = static_cast<float>(eps);
  const auto per_token = [&](const std::optional<at::Tensor>& t) { return t.has_value() && t->size(1) > 1; };
  p.scale_per_token = per_token(scale);
  p.shift_per_token = per_token(shift);
  p.gate_per_token = per_token(gate);
  // Backward column sums: split each sample's tokens until the grid fills each
  // multiprocessor about once: 8 blocks of 64, what an SM holds of the 16-bit vector
  // instance at 124-128 registers a thread (fp32's holds 10), a thread a 16-byte vector of
  // columns, which the tensors allow almost always. More chunks would only add partials
  // (16·D bytes a chunk and sample).
  const int64_t column_threads = (p.d * x.element_size() + 15) / 16;
  const int64_t blocks = std::max<int64_t>(x.size(0) * ((column_threads + 63) / 64), 1);
  const int64_t wanted = (8 * static_cast<int64_t>(multiprocessors(x)) + blocks - 1) / blocks;
  p.chunks = static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(wanted, p.tokens), 1, 64));
  return p;
}

LayerNormAffine layer_norm_affine(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& gate) {
  const int64_t n = x.size(0), tokens = x.size(1), d = x.size(2);
  const auto columns = [&](const std::optional<at::Tensor>& t, const char* name) {
    return parameter(x, t, name, t.has_value() && t->dim() == 1 && t->size(0) == d, "(D,) ");
  };
  const auto rows = [&](const std::optional<at::Tensor>& t, const char* name) {
    const bool shaped = t.has_value() && t->dim() == 3 && t->size(0) == n &&
                        (t->size(1) == 1 || t->size(1) == tokens) && t->size(2) == d;
    return parameter(x, t, name, shaped, "(N, 1, D) or (N, L, D) ");
  };
  return {columns(weight, "weight"), columns(bias, "bias"), rows(scale, "scale"), rows(shift, "shift"),
          rows(gate, "gate")};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_impl(
    const at::Tensor& x, const std::optional<at::Tensor>& branch, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, double eps) {
#ifndef FASTGUIDE_HOST_HARNESS
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  TORCH_CHECK(branch.has_value() == gate.has_value(), "fastguide_cuda: branch and gate come together");
  check_same(x, branch, "branch");
  if (branch.has_value()) TORCH_CHECK(branch->sizes() == x.sizes(), "fastguide_cuda: branch must have x's shape");
  const LayerNormAffine affine = layer_norm_affine(x, weight, bias, scale, shift, gate);
  const LayerNormParams p = layer_norm_params(x, eps, scale, shift, gate);
  at::Tensor y = at::empty_like(x);
  at::Tensor h_new = branch.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (p.rows > 0) {
    check_launch(launch_layer_norm_forward(storage_type(x), p, x.data_ptr(), pointer_or_null<const void>(branch),
                                           affine, branch.has_value() ? h_new.data_ptr() : nullptr, y.data_ptr(),
                                           mean.data_ptr<float>(), rstd.data_ptr<float>(), current_stream(x)));
  }
  return {h_new, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, double eps) {
  const auto result = layer_norm_forward_impl(x, std::nullopt, std::nullopt, weight, bias, scale, shift, eps);
  return {std::get<1>(result), std::get<2>(result), std::get<3>(result)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_layer_norm_forward(
    const at::Tensor& h, const at::Tensor& branch, const at::Tensor& gate, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, double eps) {
  return layer_norm_forward_impl(h, branch, gate, weight, bias, scale, shift, eps);
}

// (dx, partial sums (N, chunks, 4, D), per-token dscale, per-token dshift); the last two
// empty unless that modulation is per token.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd) {
  check_same(x, grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous(), "fastguide_cuda: grad_y must be x-shaped, dense");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.numel() == x.size(0) * x.size(1) && rstd.numel() == mean.numel(),
              "fastguide_cuda: mean and rstd must be contiguous float32 (N, L)");
#ifndef FASTGUIDE_HOST_HARNESS
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const LayerNormAffine affine = layer_norm_affine(x, weight, bias, scale, shift, std::nullopt);
  const LayerNormParams p = layer_norm_params(x, 0.0, scale, shift, std::nullopt);
  const auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor partials = at::empty({x.size(0), p.chunks, 4, p.d}, fp32);
  at::Tensor dscale = p.scale_per_token ? at::empty(x.sizes(), fp32) : at::empty({0}, fp32);
  at::Tensor dshift = p.shift_per_token ? at::empty(x.sizes(), fp32) : at::empty({0}, fp32);
  if (p.rows > 0) {
    check_launch(launch_layer_norm_backward(storage_type(x), p, grad_y.data_ptr(), x.data_ptr(), affine,
                                            mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                                            p.scale_per_token ? dscale.data_ptr<float>() : nullptr,
                                            p.shift_per_token ? dshift.data_ptr<float>() : nullptr,
                                            partials.data_ptr<float>(), current_stream(x)));
  }
  return {dx, partials, dscale, dshift};
}

}  // namespace
}  // namespace fastguide

// One level of indirection so that the namespace macro expands before TORCH_LIBRARY
// stringifies its argument.
#define FASTGUIDE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FASTGUIDE_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

FASTGUIDE_LIBRARY(FASTGUIDE_OPS_NAMESPACE, m) {
  m.def(
      "guided_step(Tensor model_output, Tensor? guide, Tensor x, Tensor[] history, Tensor? noise, Tensor? grad, "
      "Tensor(a!)? apg_buffer, Tensor(b!) out, Tensor(c!)? x0_out, float[] step_scalars, float[] k_history, "
      "str prediction_type, bool clip, float[]? log_variance_range, float[]? combine_scalars, int stats, "
      "bool similarity) -> Tensor?");
  m.def(
      "group_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, int num_groups, "
      "float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "Tensor mean, Tensor rstd, int num_groups, bool silu) -> (Tensor, Tensor)");
  m.def(
      "layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gated_residual_layer_norm_forward(Tensor h, Tensor branch, Tensor gate, Tensor? weight, Tensor? bias, "
      "Tensor? scale, Tensor? shift, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor)");
}

FASTGUIDE_LIBRARY_IMPL(FASTGUIDE_OPS_NAMESPACE, FASTGUIDE_DISPATCH_KEY, m) {
  m.impl("guided_step", &fastguide::guided_step);
  m.impl("group_norm_forward", &fastguide::group_norm_forward);
  m.impl("group_norm_backward", &fastguide::group_norm_backward);
  m.impl("layer_norm_forward", &fastguide::layer_norm_forward);
  m.impl("gated_residual_layer_norm_forward", &fastguide::gated_residual_layer_norm_forward);
  m.impl("layer_norm_backward", &fastguide::layer_norm_backward);
}
