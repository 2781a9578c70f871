// Bit-exact arithmetic shared by the C++ (CPU) and CUDA token samplers.
//
// Everything a sampled token depends on is computed here with IEEE-754
// add/sub/mul/div in round-to-nearest-even, integer ops and exact bit
// manipulation only: no libm call, no fused multiply-add, no flush-to-zero. So
// the CPU code, the CUDA kernel and the PyTorch reference
// (kernels/sample_tokens.py, which spells out the same operations on tensors)
// produce the same bits, hence the same tokens, on any machine.
//
//  * Host code: GCC/Clang may contract a*b+c into an FMA on targets that have
//    one (aarch64, x86 with -mfma). Every product goes through DAR_OPAQUE, an
//    empty asm that forces the rounded product into a register, so nothing can
//    fuse with it. Plain x86-64 (no FMA in the baseline ISA) needs no barrier.
//  * Device code: the extension is built with --use_fast_math (contraction on,
//    flush-to-zero, approximate division). Float ops use inline PTX with an
//    explicit rounding modifier (never contracted, never flushed: nvcc flags do
//    not rewrite inline PTX); double ops use the __d*_rn intrinsics, which are
//    never contracted (ftz and approximate division concern float only).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DAR_HD __host__ __device__ __forceinline__
#else
#define DAR_HD inline
#endif

#if !defined(__CUDA_ARCH__)
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__FMA__)
#define DAR_OPAQUE(x) ((void)0)  // no FMA instruction in the target ISA: nothing to prevent
#elif defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DAR_OPAQUE(x) __asm__("" : "+x"(x))
#elif defined(__GNUC__) && defined(__aarch64__)
#define DAR_OPAQUE(x) __asm__("" : "+w"(x))
#else
#define DAR_OPAQUE(x)                 \
  do {                                \
    volatile auto dar_opaque_ = (x);  \
    (x) = dar_opaque_;                \
  } while (0)
#endif
#endif

namespace dar_fast {
namespace sampler {

// ----------------------------------------------------------------------------- bit casts

DAR_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t r;
  std::memcpy(&r, &x, sizeof r);
  return r;
#endif
}

DAR_HD float bits_f32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(x);
#else
  float r;
  std::memcpy(&r, &x, sizeof r);
  return r;
#endif
}

DAR_HD uint64_t f64_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t r;
  std::memcpy(&r, &x, sizeof r);
  return r;
#endif
}

DAR_HD double bits_f64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(x));
#else
  double r;
  std::memcpy(&r, &x, sizeof r);
  return r;
#endif
}

// ----------------------------------------------------------------------------- IEEE ops, never fused

DAR_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a + b;
#endif
}

DAR_HD float f_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a - b;
#endif
}

DAR_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  float r = a * b;
  DAR_OPAQUE(r);
  return r;
#endif
}

DAR_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

DAR_HD double d_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

DAR_HD double d_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

DAR_HD double d_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  double r = a * b;
  DAR_OPAQUE(r);
  return r;
#endif
}

DAR_HD double d_div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// float -> double, exact (and no flush-to-zero of subnormals on the device).
DAR_HD double to_f64(float x) {
#if defined(__CUDA_ARCH__)
  double r;
  asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
  return r;
#else
  return static_cast<double>(x);
#endif
}

// ----------------------------------------------------------------------------- Philox4x32-10

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

DAR_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Random123's philox4x32_R(10, ctr, key): round r uses key + r * (W0, W1).
DAR_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.v[0], hi0, lo0);
    mulhilo32(kPhiloxM1, c.v[2], hi1, lo1);
    c = U32x4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

// The four words for vocabulary entries 4g .. 4g+3 of one (seed, sample id, position) row.
DAR_HD U32x4 philox_group(uint32_t group, uint32_t pos, uint32_t sid_lo, uint32_t sid_hi, uint32_t seed_lo,
                          uint32_t seed_hi) {
  return philox4x32_10(U32x4{{group, pos, sid_lo, sid_hi}}, seed_lo, seed_hi);
}

// ----------------------------------------------------------------------------- log and exp (fdlibm)

// fdlibm e_log.c / e_exp.c constants, given by their bits (not decimal literals).
#define DAR_F64(bits) bits_f64(bits##ULL)

// log(x) for a positive normal finite double: fdlibm's __ieee754_log reduced to
// its general branch (x = 2^k (1+f), sqrt(2)/2 <= 1+f < sqrt(2), s = f/(2+f)),
// written as a fixed sequence of IEEE ops. Faithfully rounded: within 1 ulp of
// torch.log on the samples of tests/test_sample_tokens.py (equal in ~98%).
DAR_HD double log_f64(double x) {
  const double ln2_hi = DAR_F64(0x3FE62E42FEE00000), ln2_lo = DAR_F64(0x3DEA39EF35793C76);
  const double lg1 = DAR_F64(0x3FE5555555555593), lg2 = DAR_F64(0x3FD999999997FA04);
  const double lg3 = DAR_F64(0x3FD2492494229359), lg4 = DAR_F64(0x3FCC71C51D8E78AF);
  const double lg5 = DAR_F64(0x3FC7466496CB03DE), lg6 = DAR_F64(0x3FC39A09D078C69F);
  const double lg7 = DAR_F64(0x3FC2F112DF3E5244);
  const uint64_t bits = f64_bits(x);
  int32_t hx = static_cast<int32_t>(bits >> 32);
  int32_t k = (hx >> 20) - 1023;
  hx &= 0x000fffff;
  const int32_t i = (hx + 0x95f64) & 0x100000;  // 0x100000 when the mantissa is >= ~sqrt(2)
  k += i >> 20;
  const uint64_t ybits = (static_cast<uint64_t>(static_cast<uint32_t>(hx | (i ^ 0x3ff00000))) << 32) |
                         (bits & 0xffffffffULL);
  const double f = d_sub(bits_f64(ybits), 1.0);
  const double s = d_div(f, d_add(2.0, f));
  const double dk = static_cast<double>(k);
  const double z = d_mul(s, s);
  const double w = d_mul(z, z);
  const double t1 = d_mul(w, d_add(lg2, d_mul(w, d_add(lg4, d_mul(w, lg6)))));
  const double t2 = d_mul(z, d_add(lg1, d_mul(w, d_add(lg3, d_mul(w, d_add(lg5, d_mul(w, lg7)))))));
  const double R = d_add(t2, t1);
  const double hfsq = d_mul(d_mul(0.5, f), f);
  // dk*ln2_hi - ((hfsq - (s*(hfsq+R) + dk*ln2_lo)) - f)
  return d_sub(d_mul(dk, ln2_hi), d_sub(d_sub(hfsq, d_add(d_mul(s, d_add(hfsq, R)), d_mul(dk, ln2_lo))), f));
}

// Gumbel noise of one Philox word: u = (x + 0.5) * 2^-32 in (0, 1), g = -log(-log(u)).
// g lies in [-3.14, 22.88].
DAR_HD double gumbel_f64(uint32_t x) {
  const double u = d_mul(d_add(static_cast<double>(x), 0.5), 0x1p-32);
  return -log_f64(-log_f64(u));
}

// An upper bound of gumbel_f64(x) (above it by at least 1e-3 - 1e-7), a few ops
// instead of two logs: g = -log(-log u) <= -log(1 - u) < 32 ln2 - ln(2^32 - 1 - x), and
// log2(y) >= e + m for a float y = 2^e (1 + m). Only used to skip exact draws
// that cannot win the race, so it never changes a result.
DAR_HD double gumbel_upper_f64(uint32_t x) {
  const uint32_t y = ~x;  // 2^32 - 1 - x
  if (y == 0) return 1e300;
#if defined(__CUDA_ARCH__)
  const float fy = __uint2float_rn(y);
#else
  const float fy = static_cast<float>(y);
#endif
  const double log2_lower = static_cast<double>(f32_bits(fy)) * 0x1p-23 - 127.0;
  return (32.0 - log2_lower) * 0.6931471805599453 + 1e-3;
}

// Largest possible gumbel_f64 value, rounded up: a row entry whose logit l has
// l + kGumbelMax < z for an achieved z cannot win.
constexpr double kGumbelMax = 23.0;

// Top-p mass of a token, relative to the most likely one: d = l - l_max <= 0 (float64),
// q = floor(exp(d) * 2^31) as an integer in [0, 2^31], 0 when d < -22 (or d is NaN).
// exp is fdlibm's __ieee754_exp for this range (k = trunc(d/ln2 - 0.5), general branch).
constexpr int kMassBits = 31;
constexpr double kMassMinD = -22.0;

DAR_HD uint32_t exp_mass(double d) {
  if (!(d >= kMassMinD)) return 0;
  const double ln2_hi = DAR_F64(0x3FE62E42FEE00000), ln2_lo = DAR_F64(0x3DEA39EF35793C76);
  const double inv_ln2 = DAR_F64(0x3FF71547652B82FE);
  const double p1 = DAR_F64(0x3FC555555555553E), p2 = DAR_F64(0xBF66C16C16BEBD93);
  const double p3 = DAR_F64(0x3F11566AAF25DE2C), p4 = DAR_F64(0xBEBBBD41C5D26BF1);
  const double p5 = DAR_F64(0x3E66376972BEA4D0);
  const int k = static_cast<int>(d_sub(d_mul(d, inv_ln2), 0.5));  // truncation toward zero, in [-32, 0]
  const double t = static_cast<double>(k);
  const double hi = d_sub(d, d_mul(t, ln2_hi));
  const double lo = d_mul(t, ln2_lo);
  const double r = d_sub(hi, lo);
  const double rr = d_mul(r, r);
  // c = r - rr*(p1 + rr*(p2 + rr*(p3 + rr*(p4 + rr*p5))))
  const double poly = d_add(p1, d_mul(rr, d_add(p2, d_mul(rr, d_add(p3, d_mul(rr, d_add(p4, d_mul(rr, p5))))))));
  const double c = d_sub(r, d_mul(rr, poly));
  const double y = d_sub(1.0, d_sub(d_sub(lo, d_div(d_mul(r, c), d_sub(2.0, c))), hi));
  const double scale = bits_f64(static_cast<uint64_t>(k + 1023 + kMassBits) << 52);  // 2^(k+31), exact
  return static_cast<uint32_t>(d_mul(y, scale));                                  // truncation = floor
}

#undef DAR_F64

// ----------------------------------------------------------------------------- logits

// l = u + (c - u) * s in float32, in exactly that order.
DAR_HD float guided(float c, float u, float s) { return f_add(u, f_mul(f_sub(c, u), s)); }

// Order-preserving map float -> uint32 (a < b <=> key(a) < key(b) for non-NaN
// floats); -0.0 and +0.0 map to one key, as they compare equal.
DAR_HD uint32_t float_key(float x) {
  uint32_t b = f32_bits(x);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

DAR_HD float key_float(uint32_t k) { return bits_f32((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

}  // namespace sampler
}  // namespace dar_fast
