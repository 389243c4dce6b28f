// AVX-512 AdamW and sum of squares: 16 lanes, full 64-byte loads and stores, masked tail (no scalar
// remainder, so the tail rounds exactly like the body). Chosen at load time by adam.cpp's CPU detection.
// GCC 12's AVX-512 headers build some intrinsics on _mm512_undefined_*(), which trips -Wuninitialized at
// every inlined use (a header false positive, GCC PR105593); silenced for the header's lines only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "adam.h"

#define OFFLOAD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace offload {
namespace {

// Note [rounding barrier] (adam.h).
OFFLOAD_AVX512 inline __m512 rounded(__m512 x) {
  asm("" : "+v"(x));
  return x;
}

template <Dtype G>
OFFLOAD_AVX512 inline __m512 load_grad(const void* p, size_t i, __mmask16 k) {
  if constexpr (G == Dtype::F32) {
    return _mm512_maskz_loadu_ps(k, static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p) + i);
    if constexpr (G == Dtype::F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Round to nearest even, NaN quieted with sign and top payload kept (f32_to_bf16 in adam.cpp).
OFFLOAD_AVX512 inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rne = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rne, quiet));
}

template <Dtype O>
OFFLOAD_AVX512 inline void store_out(void* p, size_t i, __mmask16 k, __m512 x) {
  if constexpr (O == Dtype::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, k, x);
  } else {
    const __m256i h = O == Dtype::F16 ? _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                      : to_bf16(x);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, k, h);
  }
}

struct Vc {
  __m512 scale, decay, coeff, beta2, omb2, bc2_sqrt, eps, neg_step;
};

// Note [adam exactness] (adam.h): the same IEEE operations, in the same order, as adamw_scalar.
template <Dtype G, Dtype O, bool Out, bool Small>
OFFLOAD_AVX512 inline void step16(const AdamBuffers& b, const Vc& c, size_t i, __mmask16 k) {
  const __m512 g = rounded(_mm512_mul_ps(load_grad<G>(b.grad, i, k), c.scale));
  const __m512 p0 = rounded(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, b.master + i), c.decay));
  const __m512 m0 = _mm512_maskz_loadu_ps(k, b.exp_avg + i);
  const __m512 v0 = _mm512_maskz_loadu_ps(k, b.exp_avg_sq + i);
  const __m512 m = _mm512_fmadd_ps(c.coeff, _mm512_sub_ps(g, m0), Small ? m0 : g);
  const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(c.omb2, g), g, _mm512_mul_ps(v0, c.beta2));
  const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), c.bc2_sqrt), c.eps);
  const __m512 p = _mm512_add_ps(p0, _mm512_div_ps(_mm512_mul_ps(c.neg_step, m), den));
  _mm512_mask_storeu_ps(b.master + i, k, p);
  _mm512_mask_storeu_ps(b.exp_avg + i, k, m);
  _mm512_mask_storeu_ps(b.exp_avg_sq + i, k, v);
  if constexpr (Out) store_out<O>(b.out, i, k, p);
}

template <Dtype G, Dtype O, bool Out, bool Small>
OFFLOAD_AVX512 void run(const AdamBuffers& b, const AdamCoeffs& s, size_t begin, size_t end) {
  const Vc c{_mm512_set1_ps(s.scale), _mm512_set1_ps(s.decay),    _mm512_set1_ps(s.coeff),
             _mm512_set1_ps(s.beta2), _mm512_set1_ps(s.omb2),     _mm512_set1_ps(s.bc2_sqrt),
             _mm512_set1_ps(s.eps),   _mm512_set1_ps(s.neg_step)};
  size_t i = begin;
  for (; i + 16 <= end; i += 16) step16<G, O, Out, Small>(b, c, i, 0xFFFF);
  if (i < end) step16<G, O, Out, Small>(b, c, i, __mmask16((1u << (end - i)) - 1));
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
OFFLOAD_AVX512 double sumsq(const void* p, size_t begin, size_t end) {
  // Four double accumulators hide the FMA latency; squares in double never overflow from fp32 inputs.
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  size_t i = begin;
  for (; i + 32 <= end; i += 32) {
    for (int h = 0; h < 2; ++h) {
      const __m512 x = load_grad<G>(p, i + 16 * h, 0xFFFF);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
      acc[2 * h] = _mm512_fmadd_pd(lo, lo, acc[2 * h]);
      acc[2 * h + 1] = _mm512_fmadd_pd(hi, hi, acc[2 * h + 1]);
    }
  }
  for (; i < end; i += 16) {
    const size_t left = end - i;
    const __mmask16 k = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 x = load_grad<G>(p, i, k);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    acc[0] = _mm512_fmadd_pd(lo, lo, acc[0]);
    acc[1] = _mm512_fmadd_pd(hi, hi, acc[1]);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
}

}  // namespace

void adamw_avx512(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end) {
  AdamKernel k = b.grad_dtype == Dtype::BF16  ? pick_out<Dtype::BF16>(b, c.lerp_small)
                 : b.grad_dtype == Dtype::F16 ? pick_out<Dtype::F16>(b, c.lerp_small)
                                              : pick_out<Dtype::F32>(b, c.lerp_small);
  k(b, c, begin, end);
}

double sumsq_avx512(const void* grad, Dtype dtype, size_t begin, size_t end) {
  switch (dtype) {
    case Dtype::BF16: return sumsq<Dtype::BF16>(grad, begin, end);
    case Dtype::F16: return sumsq<Dtype::F16>(grad, begin, end);
    default: return sumsq<Dtype::F32>(grad, begin, end);
  }
}

}  // namespace offload
