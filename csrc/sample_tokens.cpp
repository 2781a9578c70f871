// dar_fast::sample_tokens: op registration, the CPU implementation, and the Python module
// dar_fast._C. Semantics (the spec): kernels/sample_tokens.py; the arithmetic is in
// sample_tokens_math.h, shared with the CUDA kernel (sample_tokens_cuda.cu).
//
// One row at a time (at::parallel_for over rows), each in a few passes over a float32 copy:
//   1. l = guided, tempered logits, and the row maximum (as an order-preserving key);
//   2. top-k: std::nth_element over the keys, drop l < k-th largest;
//   3. top-p: integer masses q = exp_mass(l - max); sort the non-zero ones, cut at the first
//      prefix reaching p * sum q, drop q < cut;
//   4. Gumbel race in index order, 4 entries per Philox call; a group whose best logit + 23
//      (the largest possible noise) is below the best value so far is skipped without Philox,
//      and an entry's exact noise (two float64 logs) is only computed when a cheap upper
//      bound could still win: a few dozen of 16384 entries on typical rows.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "sample_tokens.h"
#include "sample_tokens_math.h"

namespace dar_fast {
namespace {

using namespace sampler;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The Philox key and counter words of one row.
struct RowKey {
  uint32_t seed_lo, seed_hi, sid_lo, sid_hi, pos;
};

RowKey row_key(int64_t seed, int64_t sid, int64_t pos) {
  const auto s = static_cast<uint64_t>(seed), i = static_cast<uint64_t>(sid);
  return RowKey{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), static_cast<uint32_t>(i),
                static_cast<uint32_t>(i >> 32), static_cast<uint32_t>(static_cast<uint64_t>(pos))};
}

struct Workspace {
  std::vector<float> l;          // the row's logits after each step
  std::vector<uint32_t> keys;    // top-k selection
  std::vector<uint32_t> mass;    // top-p masses
  std::vector<uint32_t> sorted;  // the non-zero masses, descending
};

// Step 5: argmax(l + Gumbel) with the lowest index on ties; dropped tokens are -inf.
int64_t gumbel_race(const float* l, int64_t V, const RowKey& key) {
  double best = -INFINITY;
  int64_t best_i = -1;
  for (int64_t base = 0; base < V; base += 4) {
    const int n = static_cast<int>(std::min<int64_t>(4, V - base));
    float m = l[base];
    for (int j = 1; j < n; ++j) m = std::max(m, l[base + j]);
    if (m == kNegInf || d_add(to_f64(m), kGumbelMax) < best) continue;
    const U32x4 x = philox_group(static_cast<uint32_t>(base >> 2), key.pos, key.sid_lo, key.sid_hi,
                                 key.seed_lo, key.seed_hi);
    for (int j = 0; j < n; ++j) {
      const float lj = l[base + j];
      if (lj == kNegInf) continue;
      const double ld = to_f64(lj);
      if (d_add(ld, gumbel_upper_f64(x.v[j])) < best) continue;  // cannot win: skip the logs
      const double z = d_add(ld, gumbel_f64(x.v[j]));
      if (z > best) {  // strict: an earlier (lower) index keeps a tie
        best = z;
        best_i = base + j;
      }
    }
  }
  return best_i < 0 ? 0 : best_i;  // all -inf: token 0, like argmax
}

template <typename T>
int64_t sample_row(const T* c, const T* u, float scale, float temperature, int64_t top_k, double top_p,
                   const RowKey& key, int64_t V, Workspace& ws) {
  float* l = ws.l.data();
  uint32_t kmax = 0;
  const bool tempered = temperature != 1.0f;
  for (int64_t i = 0; i < V; ++i) {  // steps 1-2
    float x = static_cast<float>(c[i]);
    if (u) x = guided(x, static_cast<float>(u[i]), scale);
    if (tempered) x = f_div(x, temperature);
    l[i] = x;
    kmax = std::max(kmax, float_key(x));
  }
  if (top_k > 0 && top_k < V) {  // step 3
    ws.keys.resize(V);
    for (int64_t i = 0; i < V; ++i) ws.keys[i] = float_key(l[i]);
    std::nth_element(ws.keys.begin(), ws.keys.begin() + (top_k - 1), ws.keys.end(), std::greater<uint32_t>());
    const uint32_t kth = ws.keys[top_k - 1];
    for (int64_t i = 0; i < V; ++i)
      if (float_key(l[i]) < kth) l[i] = kNegInf;
  }
  const float lmax = key_float(kmax);  // top-k keeps the maximum
  if (top_p < 1.0 && lmax != kNegInf) {  // step 4 (a row of -inf has nothing to cut)
    ws.mass.resize(V);
    ws.sorted.clear();
    const double dmax = to_f64(lmax);
    uint64_t total = 0;
    for (int64_t i = 0; i < V; ++i) {
      const uint32_t q = exp_mass(d_sub(to_f64(l[i]), dmax));
      ws.mass[i] = q;
      if (q) {
        total += q;
        ws.sorted.push_back(q);
      }
    }
    std::sort(ws.sorted.begin(), ws.sorted.end(), std::greater<uint32_t>());
    const double need = d_mul(static_cast<double>(total), top_p);
    uint64_t cum = 0;
    uint32_t cut = 0;
    for (const uint32_t q : ws.sorted) {
      cum += q;
      if (static_cast<double>(cum) >= need) {
        cut = q;
        break;
      }
    }
    for (int64_t i = 0; i < V; ++i)
      if (ws.mass[i] < cut) l[i] = kNegInf;
  }
  return gumbel_race(l, V, key);
}

at::Tensor sample_tokens_cpu(const at::Tensor& logits_in, const OptTensor& uncond_in, const OptTensor& cfg_scale_t,
                             double cfg_scale, double temperature, int64_t top_k, double top_p,
                             const at::Tensor& seeds_in, const at::Tensor& sample_ids_in,
                             const OptTensor& positions_t, int64_t position) {
  check_sample_args(logits_in, uncond_in, cfg_scale_t, temperature, top_k, top_p, seeds_in, sample_ids_in,
                    positions_t);
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  at::Tensor out = at::empty({B}, logits_in.options().dtype(at::kLong));
  if (B == 0) return out;
  const at::Tensor logits = with_unit_stride(logits_in);
  const at::Tensor uncond = uncond_in.has_value() ? with_unit_stride(*uncond_in) : at::Tensor();
  const at::Tensor seeds = seeds_in.contiguous(), sids = sample_ids_in.contiguous();
  const at::Tensor scales = cfg_scale_t.has_value() ? cfg_scale_t->contiguous() : at::Tensor();
  const at::Tensor positions = positions_t.has_value() ? positions_t->contiguous() : at::Tensor();
  const int64_t* seed_p = seeds.data_ptr<int64_t>();
  const int64_t* sid_p = sids.data_ptr<int64_t>();
  const float* scale_p = scales.defined() ? scales.data_ptr<float>() : nullptr;
  const int64_t* pos_p = positions.defined() ? positions.data_ptr<int64_t>() : nullptr;
  int64_t* out_p = out.data_ptr<int64_t>();
  const float scale0 = static_cast<float>(cfg_scale), temp = static_cast<float>(temperature);
  const int64_t k = top_k < V ? top_k : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_tokens_cpu", [&] {
    const scalar_t* c_p = logits.data_ptr<scalar_t>();
    const scalar_t* u_p = uncond.defined() ? uncond.data_ptr<scalar_t>() : nullptr;
    const int64_t c_stride = logits.stride(0), u_stride = uncond.defined() ? uncond.stride(0) : 0;
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / V), [&](int64_t b0, int64_t b1) {
      Workspace ws;
      ws.l.resize(V);
      for (int64_t b = b0; b < b1; ++b) {
        const RowKey key = row_key(seed_p[b], sid_p[b], pos_p ? pos_p[b] : position);
        out_p[b] = sample_row<scalar_t>(c_p + b * c_stride, u_p ? u_p + b * u_stride : nullptr,
                                        scale_p ? scale_p[b] : scale0, temp, k, top_p, key, V, ws);
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- building blocks, for tests

at::Tensor philox_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const at::Tensor c = counter.to(at::kLong).contiguous(), k = key.to(at::kLong).contiguous();
  at::Tensor out = at::empty({c.size(0), 4}, c.options());
  const int64_t *cp = c.data_ptr<int64_t>(), *kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t n = 0; n < c.size(0); ++n) {
    U32x4 x{{static_cast<uint32_t>(cp[4 * n]), static_cast<uint32_t>(cp[4 * n + 1]),
             static_cast<uint32_t>(cp[4 * n + 2]), static_cast<uint32_t>(cp[4 * n + 3])}};
    x = philox4x32_10(x, static_cast<uint32_t>(kp[2 * n]), static_cast<uint32_t>(kp[2 * n + 1]));
    for (int j = 0; j < 4; ++j) op[4 * n + j] = x.v[j];
  }
  return out;
}

at::Tensor gumbel_noise_cpu(const at::Tensor& words) {
  const at::Tensor w = words.to(at::kLong).contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kDouble));
  const int64_t* wp = w.data_ptr<int64_t>();
  double* op = out.data_ptr<double>();
  for (int64_t i = 0; i < w.numel(); ++i) op[i] = gumbel_f64(static_cast<uint32_t>(wp[i]));
  return out;
}

at::Tensor exp_mass_cpu(const at::Tensor& d) {
  const at::Tensor x = d.to(at::kDouble).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kLong));
  const double* xp = x.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < x.numel(); ++i) op[i] = exp_mass(xp[i]);
  return out;
}

}  // namespace
}  // namespace dar_fast

TORCH_LIBRARY_FRAGMENT(dar_fast, m) {
  m.def(
      "sample_tokens(Tensor logits, Tensor? uncond, Tensor? cfg_scale_t, float cfg_scale, float temperature, "
      "int top_k, float top_p, Tensor seeds, Tensor sample_ids, Tensor? positions_t, int position) -> Tensor");
  // The sampler's building blocks, exposed so tests can compare them bit for bit with the reference.
  m.def("_philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  m.def("_gumbel_noise(Tensor words) -> Tensor");
  m.def("_exp_mass(Tensor d) -> Tensor");
}

TORCH_LIBRARY_IMPL(dar_fast, CPU, m) {
  m.impl("sample_tokens", &dar_fast::sample_tokens_cpu);
  m.impl("_philox4x32_10", &dar_fast::philox_cpu);
  m.impl("_gumbel_noise", &dar_fast::gumbel_noise_cpu);
  m.impl("_exp_mass", &dar_fast::exp_mass_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dar-fast compiled ops (registered as torch.ops.dar_fast.*): the fused token sampler";
#if defined(DAR_FAST_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
