// CUDA implementation of dar_fast::sample_tokens (registered for the CUDA dispatch key).
// Semantics (the spec): kernels/sample_tokens.py. Arithmetic: sample_tokens_math.h, shared with
// the CPU code, written so that both produce the same bits.
//
// One 512-thread block per row; thread t owns the groups of 4 entries g = t, t + 512, ... (one
// Philox call each). No host synchronisation and no host-visible allocation: per-row scale and
// position are read from device pointers, the output and the scratch come from the caching
// allocator, so the launch can be captured in a CUDA graph.
//
//  * plain kernel (no top-k, no top-p): one pass over the logits. Each thread keeps its best
//    (z, index) and a threshold thr = the best z seen in its warp (shared once after the first
//    group) or by itself; a group whose largest logit + 23 < thr skips Philox, an entry whose
//    logit + an upper bound of its noise < thr skips the two float64 logs. Skipping only entries
//    that cannot reach an achieved z is exact. Then a block arg-max (ties -> lowest index).
//  * filtered kernel: the row's float32 l is staged in a (B, V) scratch (L1/L2-resident while
//    the block works on it). Top-k and top-p thresholds come from a radix-style search that
//    decides 2 bits per pass (3 block-reduced probes), 16 passes for 32 bits:
//      top-k: kth = the largest key t with #{key >= t} >= k (the k-th largest, ties kept);
//      top-p: cut = the largest t with float64(sum of q >= t) >= p * float64(sum q), which is
//             exactly the sorted definition's q_(n) (masses are exact integers).
//    Then the same race over the kept entries.
#if defined(DAR_FAST_WITH_CUDA)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "sample_tokens.h"
#include "sample_tokens_math.h"

namespace dar_fast {
namespace {

using namespace sampler;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 2;                   // threshold bits decided per search pass
constexpr int kProbes = (1 << kDigitBits) - 1;  // thresholds counted per pass
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  return static_cast<float>(x);  // exact for float, Half and BFloat16
}

template <>
__device__ __forceinline__ float to_f32<double>(double x) {
  float r;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));  // no flush-to-zero
  return r;
}

template <typename T>
struct Params {
  const T* cond;
  const T* uncond;  // nullptr: no guidance
  int64_t cond_stride, uncond_stride;
  const float* scale_t;  // (B,) or nullptr -> scale
  float scale;
  float temperature;
  int top_k;     // 0 = off (< V)
  double top_p;  // 1 = off
  const int64_t* seeds;
  const int64_t* sample_ids;
  const int64_t* pos_t;  // (B,) or nullptr -> pos
  int64_t pos;
  int V;
  bool vec;         // rows are 4-element aligned: vector loads
  float* lbuf;      // (B, V) scratch for the filtered kernel
  uint32_t* qbuf;   // (B, V) scratch for top-p masses
  int64_t* out;
};

struct RowCtx {
  uint32_t seed_lo, seed_hi, sid_lo, sid_hi, pos;
  float scale;
};

template <typename T>
__device__ __forceinline__ RowCtx row_ctx(const Params<T>& p, int row) {
  const auto s = static_cast<uint64_t>(p.seeds[row]), i = static_cast<uint64_t>(p.sample_ids[row]);
  const auto pos = static_cast<uint64_t>(p.pos_t ? p.pos_t[row] : p.pos);
  return RowCtx{static_cast<uint32_t>(s),      static_cast<uint32_t>(s >> 32), static_cast<uint32_t>(i),
                static_cast<uint32_t>(i >> 32), static_cast<uint32_t>(pos),
                p.scale_t ? p.scale_t[row] : p.scale};
}

template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ row, int base, int V, bool vec, float (&x)[4]) {
  if (vec && base + 4 <= V) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(row + base);
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = to_f32(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = base + j < V ? to_f32(row[base + j]) : 0.0f;
  }
}

// Steps 1-2 for entries base .. base+3 (entries past V -> -inf).
template <typename T>
__device__ __forceinline__ void logits4(const Params<T>& p, const T* c, const T* u, float scale, int base,
                                        float (&l)[4]) {
  float x[4];
  load4(c, base, p.V, p.vec, x);
  if (u) {
    float y[4];
    load4(u, base, p.V, p.vec, y);
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = guided(x[j], y[j], scale);
  }
  if (p.temperature != 1.0f) {
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = f_div(x[j], p.temperature);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) l[j] = base + j < p.V ? x[j] : -INFINITY;
}

// A thread's state in the Gumbel race: best (z, index) so far and the skip threshold (an achieved z).
struct Race {
  double z;
  int i;
  double thr;
};

// Step 5 for entries base .. base+3 (dropped entries are -inf).
__device__ __forceinline__ void race4(Race& r, const float (&l)[4], int base, const RowCtx& k) {
  const float m = fmaxf(fmaxf(l[0], l[1]), fmaxf(l[2], l[3]));
  if (m == -INFINITY || d_add(to_f64(m), kGumbelMax) < r.thr) return;
  const U32x4 x = philox_group(static_cast<uint32_t>(base >> 2), k.pos, k.sid_lo, k.sid_hi, k.seed_lo, k.seed_hi);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (l[j] == -INFINITY) continue;
    const double lj = to_f64(l[j]);
    if (d_add(lj, gumbel_upper_f64(x.v[j])) < r.thr) continue;  // cannot win: skip the logs
    const double z = d_add(lj, gumbel_f64(x.v[j]));
    if (z > r.z) {  // strict: an earlier (lower) index keeps a tie
      r.z = z;
      r.i = base + j;
      r.thr = fmax(r.thr, z);
    }
  }
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sums of N values; every thread gets the totals. red: kWarps * N shared slots.
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N], T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v[n] += __shfl_xor_sync(kFullMask, v[n], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) red[warp * N + n] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    T s = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w * N + n];
    v[n] = s;
  }
  __syncthreads();  // red may be reused right away
}

__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) v = max(v, red[w]);
  __syncthreads();
  return v;
}

__device__ __forceinline__ bool beats(double z, int i, double bz, int bi) { return z > bz || (z == bz && i < bi); }

// Arg-max of (z, i) over the block, ties -> lowest i; INT_MAX (nothing kept) -> 0. Thread 0 writes it.
__device__ __forceinline__ void block_argmax_store(double z, int i, double* red_z, int* red_i, int64_t* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    const double oz = __shfl_xor_sync(kFullMask, z, o);
    const int oi = __shfl_xor_sync(kFullMask, i, o);
    if (beats(oz, oi, z, i)) {
      z = oz;
      i = oi;
    }
  }
  if (lane == 0) {
    red_z[warp] = z;
    red_i[warp] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w)
      if (beats(red_z[w], red_i[w], z, i)) {
        z = red_z[w];
        i = red_i[w];
      }
    *out = i == INT_MAX ? 0 : i;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_plain_kernel(const Params<T> p) {
  __shared__ double red_z[kWarps];
  __shared__ int red_i[kWarps];
  const int row = blockIdx.x;
  const RowCtx k = row_ctx(p, row);
  const T* c = p.cond + row * p.cond_stride;
  const T* u = p.uncond ? p.uncond + row * p.uncond_stride : nullptr;
  const int G = (p.V + 3) >> 2;
  Race r{-INFINITY, INT_MAX, -INFINITY};
  int g = threadIdx.x;
  if (g < G) {
    float l[4];
    logits4(p, c, u, k.scale, 4 * g, l);
    race4(r, l, 4 * g, k);
  }
  r.thr = warp_max(r.thr);  // every lane gets a good threshold before the bulk of the row
  for (g += kThreads; g < G; g += kThreads) {
    float l[4];
    logits4(p, c, u, k.scale, 4 * g, l);
    race4(r, l, 4 * g, k);
  }
  block_argmax_store(r.z, r.i, red_z, red_i, p.out + row);
}

// Kept logits of entries base .. base+3 after top-k (key >= kth) and top-p (q >= cut); others -inf.
__device__ __forceinline__ void kept4(const float* lrow, const uint32_t* qrow, int base, int V, uint32_t kth,
                                      bool top_p_on, uint32_t cut, float (&l)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = base + j;
    float v = -INFINITY;
    if (i < V) {
      const float li = lrow[i];
      if (float_key(li) >= kth && (!top_p_on || qrow[i] >= cut)) v = li;
    }
    l[j] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_filtered_kernel(const Params<T> p) {
  __shared__ uint64_t red64[kWarps * kProbes];
  __shared__ uint32_t red32[kWarps * kProbes];
  __shared__ double red_z[kWarps];
  __shared__ int red_i[kWarps];
  const int row = blockIdx.x, tid = threadIdx.x, V = p.V;
  const RowCtx k = row_ctx(p, row);
  const T* c = p.cond + row * p.cond_stride;
  const T* u = p.uncond ? p.uncond + row * p.uncond_stride : nullptr;
  float* lrow = p.lbuf + static_cast<int64_t>(row) * V;
  uint32_t* qrow = p.qbuf ? p.qbuf + static_cast<int64_t>(row) * V : nullptr;
  const int G = (V + 3) >> 2;

  // Steps 1-2: stage l, find its maximum (as a key).
  uint32_t kmax = 0;
  for (int g = tid; g < G; g += kThreads) {
    float l[4];
    logits4(p, c, u, k.scale, 4 * g, l);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (4 * g + j < V) {
        lrow[4 * g + j] = l[j];
        kmax = max(kmax, float_key(l[j]));
      }
  }
  kmax = block_max(kmax, red32);  // its __syncthreads also publishes lrow to the block

  // Step 3: kth = the largest key t with #{key >= t} >= top_k, i.e. the k-th largest key.
  uint32_t kth = 0;
  if (p.top_k > 0) {
    for (int shift = 32 - kDigitBits; shift >= 0; shift -= kDigitBits) {
      uint32_t cnt[kProbes] = {};
      for (int i = tid; i < V; i += kThreads) {
        const uint32_t key = float_key(lrow[i]);
#pragma unroll
        for (int d = 0; d < kProbes; ++d) cnt[d] += key >= kth + (static_cast<uint32_t>(d + 1) << shift);
      }
      block_sum(cnt, red32);
      int sel = 0;
#pragma unroll
      for (int d = 0; d < kProbes; ++d)
        if (cnt[d] >= static_cast<uint32_t>(p.top_k)) sel = d + 1;
      kth += static_cast<uint32_t>(sel) << shift;
    }
  }

  // Step 4: cut = the largest t with float64(sum_{q >= t} q) >= top_p * float64(sum q).
  const float lmax = key_float(kmax);  // top-k keeps the maximum
  const bool top_p_on = p.top_p < 1.0 && lmax != -INFINITY;
  uint32_t cut = 0;
  if (top_p_on) {
    const double dmax = to_f64(lmax);
    uint64_t total[1] = {0};
    for (int i = tid; i < V; i += kThreads) {
      const float li = lrow[i];
      const uint32_t q = float_key(li) >= kth ? exp_mass(d_sub(to_f64(li), dmax)) : 0u;
      qrow[i] = q;
      total[0] += q;
    }
    block_sum(total, red64);  // also publishes qrow
    const double need = d_mul(static_cast<double>(total[0]), p.top_p);
    for (int shift = 32 - kDigitBits; shift >= 0; shift -= kDigitBits) {
      uint64_t mass[kProbes] = {};
      for (int i = tid; i < V; i += kThreads) {
        const uint32_t q = qrow[i];
#pragma unroll
        for (int d = 0; d < kProbes; ++d) mass[d] += q >= cut + (static_cast<uint32_t>(d + 1) << shift) ? q : 0u;
      }
      block_sum(mass, red64);
      int sel = 0;
#pragma unroll
      for (int d = 0; d < kProbes; ++d)
        if (static_cast<double>(mass[d]) >= need) sel = d + 1;
      cut += static_cast<uint32_t>(sel) << shift;
    }
  }

  // Step 5 over the kept entries.
  Race r{-INFINITY, INT_MAX, -INFINITY};
  int g = tid;
  if (g < G) {
    float l[4];
    kept4(lrow, qrow, 4 * g, V, kth, top_p_on, cut, l);
    race4(r, l, 4 * g, k);
  }
  r.thr = warp_max(r.thr);
  for (g += kThreads; g < G; g += kThreads) {
    float l[4];
    kept4(lrow, qrow, 4 * g, V, kth, top_p_on, cut, l);
    race4(r, l, 4 * g, k);
  }
  block_argmax_store(r.z, r.i, red_z, red_i, p.out + row);
}

// ----------------------------------------------------------------------------- building blocks, for tests

__global__ void philox_kernel(const int64_t* c, const int64_t* key, int64_t* out, int64_t n) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    U32x4 x{{static_cast<uint32_t>(c[4 * t]), static_cast<uint32_t>(c[4 * t + 1]), static_cast<uint32_t>(c[4 * t + 2]),
             static_cast<uint32_t>(c[4 * t + 3])}};
    x = philox4x32_10(x, static_cast<uint32_t>(key[2 * t]), static_cast<uint32_t>(key[2 * t + 1]));
    for (int j = 0; j < 4; ++j) out[4 * t + j] = x.v[j];
  }
}

__global__ void gumbel_kernel(const int64_t* w, double* out, int64_t n) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[t] = gumbel_f64(static_cast<uint32_t>(w[t]));
}

__global__ void mass_kernel(const double* d, int64_t* out, int64_t n) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[t] = exp_mass(d[t]);
}

int elementwise_blocks(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096)); }

at::Tensor philox_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.to(at::kLong).contiguous(), k = key.to(at::kLong).contiguous();
  at::Tensor out = at::empty({c.size(0), 4}, c.options());
  if (c.size(0) == 0) return out;
  philox_kernel<<<elementwise_blocks(c.size(0)), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), out.data_ptr<int64_t>(), c.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gumbel_noise_cuda(const at::Tensor& words) {
  const c10::cuda::CUDAGuard guard(words.device());
  const at::Tensor w = words.to(at::kLong).contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kDouble));
  if (w.numel() == 0) return out;
  gumbel_kernel<<<elementwise_blocks(w.numel()), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      w.data_ptr<int64_t>(), out.data_ptr<double>(), w.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor exp_mass_cuda(const at::Tensor& d) {
  const c10::cuda::CUDAGuard guard(d.device());
  const at::Tensor x = d.to(at::kDouble).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kLong));
  if (x.numel() == 0) return out;
  mass_kernel<<<elementwise_blocks(x.numel()), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<double>(), out.data_ptr<int64_t>(), x.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ----------------------------------------------------------------------------- the op

template <typename T>
bool aligned4(const T* ptr, int64_t stride) {
  return reinterpret_cast<uintptr_t>(ptr) % (4 * sizeof(T)) == 0 && stride % 4 == 0;
}

at::Tensor sample_tokens_cuda(const at::Tensor& logits_in, const OptTensor& uncond_in, const OptTensor& cfg_scale_t,
                              double cfg_scale, double temperature, int64_t top_k, double top_p,
                              const at::Tensor& seeds_in, const at::Tensor& sample_ids_in,
                              const OptTensor& positions_t, int64_t position) {
  check_sample_args(logits_in, uncond_in, cfg_scale_t, temperature, top_k, top_p, seeds_in, sample_ids_in,
                    positions_t);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  at::Tensor out = at::empty({B}, logits_in.options().dtype(at::kLong));
  if (B == 0) return out;
  DAR_CHECK(B < (int64_t{1} << 31), "batch too large for one launch: ", B);
  const at::Tensor logits = with_unit_stride(logits_in);
  const at::Tensor uncond = uncond_in.has_value() ? with_unit_stride(*uncond_in) : at::Tensor();
  const at::Tensor seeds = seeds_in.contiguous(), sids = sample_ids_in.contiguous();
  const at::Tensor scales = cfg_scale_t.has_value() ? cfg_scale_t->contiguous() : at::Tensor();
  const at::Tensor positions = positions_t.has_value() ? positions_t->contiguous() : at::Tensor();
  const int64_t k = top_k < V ? top_k : 0;
  const bool filtered = k > 0 || top_p < 1.0;
  const at::Tensor lbuf = filtered ? at::empty({B, V}, logits.options().dtype(at::kFloat)) : at::Tensor();
  const at::Tensor qbuf = top_p < 1.0 ? at::empty({B, V}, logits.options().dtype(at::kInt)) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_tokens_cuda", [&] {
    Params<scalar_t> p;
    p.cond = logits.data_ptr<scalar_t>();
    p.uncond = uncond.defined() ? uncond.data_ptr<scalar_t>() : nullptr;
    p.cond_stride = logits.stride(0);
    p.uncond_stride = uncond.defined() ? uncond.stride(0) : 0;
    p.scale_t = scales.defined() ? scales.data_ptr<float>() : nullptr;
    p.scale = static_cast<float>(cfg_scale);
    p.temperature = static_cast<float>(temperature);
    p.top_k = static_cast<int>(k);
    p.top_p = top_p;
    p.seeds = seeds.data_ptr<int64_t>();
    p.sample_ids = sids.data_ptr<int64_t>();
    p.pos_t = positions.defined() ? positions.data_ptr<int64_t>() : nullptr;
    p.pos = position;
    p.V = static_cast<int>(V);
    p.vec = V % 4 == 0 && aligned4(p.cond, p.cond_stride) && (!p.uncond || aligned4(p.uncond, p.uncond_stride));
    p.lbuf = filtered ? lbuf.data_ptr<float>() : nullptr;
    p.qbuf = qbuf.defined() ? reinterpret_cast<uint32_t*>(qbuf.data_ptr<int32_t>()) : nullptr;
    p.out = out.data_ptr<int64_t>();
    if (filtered)
      sample_filtered_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(p);
    else
      sample_plain_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace dar_fast

TORCH_LIBRARY_IMPL(dar_fast, CUDA, m) {
  m.impl("sample_tokens", &dar_fast::sample_tokens_cuda);
  m.impl("_philox4x32_10", &dar_fast::philox_cuda);
  m.impl("_gumbel_noise", &dar_fast::gumbel_noise_cuda);
  m.impl("_exp_mass", &dar_fast::exp_mass_cuda);
}

#endif  // DAR_FAST_WITH_CUDA
