// Host-side declarations shared by the CPU (sample_tokens.cpp) and CUDA (sample_tokens_cuda.cu)
// implementations of dar_fast::sample_tokens. Semantics: kernels/sample_tokens.py.
#pragma once

#include <ATen/ATen.h>
#include <optional>

#define DAR_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "dar_fast::sample_tokens: ", __VA_ARGS__)
#define DAR_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, "dar_fast::sample_tokens: ", __VA_ARGS__)
#define DAR_CHECK_DEVICE(t, dev, name) \
  DAR_CHECK((t).device() == (dev), "logits are on ", (dev), " but " name " is on ", (t).device())
#define DAR_CHECK_ROWS(t, B, name) \
  DAR_CHECK((t).dim() == 1 && (t).size(0) == (B), name " must have shape (", (B), "), got ", (t).sizes())

namespace dar_fast {

// Op schema (registered in sample_tokens.cpp):
//   sample_tokens(Tensor logits, Tensor? uncond, Tensor? cfg_scale_t, float cfg_scale, float temperature,
//                 int top_k, float top_p, Tensor seeds, Tensor sample_ids, Tensor? positions_t,
//                 int position) -> Tensor
// cfg_scale_t (B,) float32 overrides cfg_scale; positions_t (B,) int64 overrides position.
// top_k >= V counts as off. Returns (B,) int64 on logits' device.
using OptTensor = std::optional<at::Tensor>;

// Checks shared by both devices (the Python wrapper checks first and gives friendlier messages).
inline void check_sample_args(const at::Tensor& logits, const OptTensor& uncond, const OptTensor& scale_t,
                              double temperature, int64_t top_k, double top_p, const at::Tensor& seeds,
                              const at::Tensor& sample_ids, const OptTensor& positions_t) {
  DAR_CHECK(logits.dim() == 2 && logits.size(1) >= 1, "logits must be (B, V) with V >= 1, got ", logits.sizes());
  DAR_CHECK(logits.size(1) < (int64_t{1} << 31), "vocabulary too large: ", logits.size(1));
  DAR_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "logits must be a float tensor, got ",
                 logits.scalar_type());
  const auto dev = logits.device();
  const int64_t B = logits.size(0);
  if (uncond.has_value()) {
    DAR_CHECK(uncond->sizes() == logits.sizes(), "uncond has shape ", uncond->sizes(), " but logits ",
              logits.sizes());
    DAR_CHECK_TYPE(uncond->scalar_type() == logits.scalar_type(), "uncond dtype ", uncond->scalar_type(),
                   " differs from logits dtype ", logits.scalar_type());
    DAR_CHECK_DEVICE(*uncond, dev, "uncond");
  }
  if (scale_t.has_value()) {
    DAR_CHECK_ROWS(*scale_t, B, "cfg_scale_t");
    DAR_CHECK_TYPE(scale_t->scalar_type() == at::kFloat, "cfg_scale_t must be float32");
    DAR_CHECK_DEVICE(*scale_t, dev, "cfg_scale_t");
  }
  const float t32 = static_cast<float>(temperature);
  DAR_CHECK(t32 >= 1.17549435e-38f && t32 <= 3.40282347e38f,
            "temperature must be a finite number > 0 (a normal float32), got ", temperature);
  DAR_CHECK(top_k >= 0, "top_k must be >= 0 (0 = off), got ", top_k);
  DAR_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1] (1 = off), got ", top_p);
  DAR_CHECK_ROWS(seeds, B, "seeds");
  DAR_CHECK_ROWS(sample_ids, B, "sample_ids");
  DAR_CHECK_TYPE(seeds.scalar_type() == at::kLong && sample_ids.scalar_type() == at::kLong,
                 "seeds and sample_ids must be int64");
  DAR_CHECK_DEVICE(seeds, dev, "seeds");
  DAR_CHECK_DEVICE(sample_ids, dev, "sample_ids");
  if (positions_t.has_value()) {
    DAR_CHECK_ROWS(*positions_t, B, "positions_t");
    DAR_CHECK_TYPE(positions_t->scalar_type() == at::kLong, "positions_t must be int64");
    DAR_CHECK_DEVICE(*positions_t, dev, "positions_t");
  }
}

// Rows of unit stride (any row stride): what both implementations read.
inline at::Tensor with_unit_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// _philox4x32_10 (a test hook) takes (N, 4) counters and (N, 2) keys.
inline void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  DAR_CHECK(counter.dim() == 2 && counter.size(1) == 4 && key.dim() == 2 && key.size(1) == 2 &&
                key.size(0) == counter.size(0),
            "_philox4x32_10 takes (N, 4) counters and (N, 2) keys");
}

}  // namespace dar_fast
