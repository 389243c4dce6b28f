// AVX2 + FMA + F16C AdamW and sum of squares: 8 lanes; the last n % 8 elements go through the scalar
// reference, which performs the same IEEE operations (Note [adam exactness]), so they round identically.
#include <immintrin.h>

#include "adam.h"

#define OFFLOAD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace offload {
namespace {

// Note [rounding barrier] (adam.h).
OFFLOAD_AVX2 inline __m256 rounded(__m256 x) {
  asm("" : "+x"(x));
  return x;
}

template <Dtype G>
OFFLOAD_AVX2 inline __m256 load_grad(const void* p, size_t i) {
  if constexpr (G == Dtype::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (G == Dtype::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// Round to nearest even, NaN quieted with sign and top payload kept (f32_to_bf16 in adam.cpp).
OFFLOAD_AVX2 inline __m128i to_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rne = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i h = _mm256_blendv_epi8(rne, quiet, nan);  // each lane < 0x10000: packus keeps it
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08));
}

template <Dtype O>
OFFLOAD_AVX2 inline void store_out(void* p, size_t i, __m256 x) {
  if constexpr (O == Dtype::F32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, x);
  } else {
    const __m128i h = O == Dtype::F16 ? _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                      : to_bf16(x);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
  }
}

struct Vc {
  __m256 scale, decay, coeff, beta2, omb2, bc2_sqrt, eps, neg_step;
};

// Note [adam exactness] (adam.h): the same IEEE operations, in the same order, as adamw_scalar.
template <Dtype G, Dtype O, bool Out, bool Small>
OFFLOAD_AVX2 inline void step8(const AdamBuffers& b, const Vc& c, size_t i) {
  const __m256 g = rounded(_mm256_mul_ps(load_grad<G>(b.grad, i), c.scale));
  const __m256 p0 = rounded(_mm256_mul_ps(_mm256_loadu_ps(b.master + i), c.decay));
  const __m256 m0 = _mm256_loadu_ps(b.exp_avg + i);
  const __m256 v0 = _mm256_loadu_ps(b.exp_avg_sq + i);
  const __m256 m = _mm256_fmadd_ps(c.coeff, _mm256_sub_ps(g, m0), Small ? m0 : g);
  const __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(c.omb2, g), g, _mm256_mul_ps(v0, c.beta2));
  const __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), c.bc2_sqrt), c.eps);
  const __m256 p = _mm256_add_ps(p0, _mm256_div_ps(_mm256_mul_ps(c.neg_step, m), den));
  _mm256_storeu_ps(b.master + i, p);
  _mm256_storeu_ps(b.exp_avg + i, m);
  _mm256_storeu_ps(b.exp_avg_sq + i, v);
  if constexpr (Out) store_out<O>(b.out, i, p);
}

template <Dtype G, Dtype O, bool Out, bool Small>
OFFLOAD_AVX2 void run(const AdamBuffers& b, const AdamCoeffs& s, size_t begin, size_t end) {
  const Vc c{_mm256_set1_ps(s.scale), _mm256_set1_ps(s.decay),    _mm256_set1_ps(s.coeff),
             _mm256_set1_ps(s.beta2), _mm256_set1_ps(s.omb2),     _mm256_set1_ps(s.bc2_sqrt),
             _mm256_set1_ps(s.eps),   _mm256_set1_ps(s.neg_step)};
  size_t i = begin;
  for (; i + 16 <= end; i += 16) {  // two vectors a trip: one 64-byte line of each fp32 stream
    step8<G, O, Out, Small>(b, c, i);
    step8<G, O, Out, Small>(b, c, i + 8);
  }
  for (; i + 8 <= end; i += 8) step8<G, O, Out, Small>(b, c, i);
  if (i < end) adamw_scalar(b, s, i, end);
}

template <Dtype G, Dtype O, bool Out>
AdamKernel pick_small(bool small) {
  return small ? run<G, O, Out, true> : run<G, O, Out, false>;
}

template <Dtype G>
AdamKernel pick_out(const AdamBuffers& b, bool small) {
  if (!b.out) return pick_small<G, Dtype::F32, false>(small);
  switch (b.out_dtype) {
    case Dtype::BF16: return pick_small<G, Dtype::BF16, true>(small);
    case Dtype::F16: return pick_small<G, Dtype::F16, true>(small);
    default: return pick_small<G, Dtype::F32, true>(small);
  }
}

template <Dtype G>
OFFLOAD_AVX2 double sumsq(const void* p, Dtype dtype, size_t begin, size_t end) {
  // Four double accumulators hide the FMA latency; squares in double never overflow from fp32 inputs.
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  size_t i = begin;
  for (; i + 16 <= end; i += 16) {
    for (int h = 0; h < 2; ++h) {
      const __m256 x = load_grad<G>(p, i + 8 * h);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
      acc[2 * h] = _mm256_fmadd_pd(lo, lo, acc[2 * h]);
      acc[2 * h + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * h + 1]);
    }
  }
  const __m256d s = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
  const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2))) + sumsq_scalar(p, dtype, i, end);
}

}  // namespace

void adamw_avx2(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end) {
  AdamKernel k = b.grad_dtype == Dtype::BF16  ? pick_out<Dtype::BF16>(b, c.lerp_small)
                 : b.grad_dtype == Dtype::F16 ? pick_out<Dtype::F16>(b, c.lerp_small)
                                              : pick_out<Dtype::F32>(b, c.lerp_small);
  k(b, c, begin, end);
}

double sumsq_avx2(const void* grad, Dtype dtype, size_t begin, size_t end) {
  switch (dtype) {
    case Dtype::BF16: return sumsq<Dtype::BF16>(grad, dtype, begin, end);
    case Dtype::F16: return sumsq<Dtype::F16>(grad, dtype, begin, end);
    default: return sumsq<Dtype::F32>(grad, dtype, begin, end);
  }
}

}  // namespace offload
