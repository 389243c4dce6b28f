// Native AdamW tests: every vector path against the scalar reference (bitwise), thread-count invariance,
// the dtype conversions against the hardware instructions, sum of squares. Run: tools/native_tests.sh
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../adam.h"
#include "check.h"

using namespace offload;

namespace {

uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

struct Rng {
  uint64_t s;
  uint64_t next() { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
  float uniform() { return float(next() >> 40) * 0x1p-24f; }             // [0, 1)
  float signed_mag(float scale) { return (uniform() * 2 - 1) * scale; }
};

// One AdamW problem: fp32 state plus a grad of any dtype and an out buffer of any dtype.
struct Problem {
  size_t n;
  Dtype gd, od;
  bool has_out;
  std::vector<float> p, m, v;
  std::vector<uint8_t> g, out;
  Problem(size_t n_, Dtype gd_, Dtype od_, bool has_out_, uint64_t seed)
      : n(n_), gd(gd_), od(od_), has_out(has_out_), p(n), m(n), v(n), g(n * dtype_size(gd)),
        out(has_out ? n * dtype_size(od) : 0) {
    Rng r{seed | 1};
    for (size_t i = 0; i < n; ++i) {
      p[i] = r.signed_mag(1.0f);
      m[i] = r.signed_mag(1e-2f);
      v[i] = r.uniform() * 1e-4f;
      const float gi = (i % 97 == 3) ? 0.0f : r.signed_mag(i % 5 ? 1e-2f : 10.0f);
      if (gd == Dtype::F32) std::memcpy(&g[4 * i], &gi, 4);
      else {
        const uint16_t h = gd == Dtype::BF16 ? f32_to_bf16(gi) : f32_to_f16(gi);
        std::memcpy(&g[2 * i], &h, 2);
      }
    }
  }
  AdamBuffers buffers() {
    return AdamBuffers{p.data(), m.data(), v.data(), g.data(), has_out ? out.data() : nullptr, n, gd, od};
  }
  bool same_as(const Problem& o) const {
    auto same = [&](const std::vector<float>& x, const std::vector<float>& y) {  // bitwise: NaN-safe
      return n == 0 || std::memcmp(x.data(), y.data(), 4 * n) == 0;
    };
    return same(p, o.p) && same(m, o.m) && same(v, o.v) && out == o.out;
  }
};

AdamHyper hyper(int64_t step, double beta1 = 0.9) {
  AdamHyper h{1e-3, beta1, 0.999, 1e-8, 0.01, step};
  h.grad_scale = 0.75;
  return h;
}

const Dtype kDtypes[] = {Dtype::F32, Dtype::BF16, Dtype::F16};
const size_t kSizes[] = {0, 1, 7, 15, 16, 17, 31, 33, 65535, 65537, 1000003};

// Runs `level` and the scalar kernel on identical problems for a few steps and compares them bitwise.
bool matches_scalar(Simd level, size_t n, Dtype gd, Dtype od, bool has_out, double beta1) {
  Problem a(n, gd, od, has_out, 42 + n), b(n, gd, od, has_out, 42 + n);
  for (int64_t t = 1; t <= 3; ++t) {
    const AdamCoeffs c = adam_coeffs(hyper(t, beta1));
    (level == Simd::Avx512 ? adamw_avx512 : adamw_avx2)(a.buffers(), c, 0, n);
    adamw_scalar(b.buffers(), c, 0, n);
  }
  return a.same_as(b);
}

check::Result vector_vs_scalar(Simd level) {
  if (!simd_supported(level)) {
    std::printf("  %s not supported by this CPU\n", simd_name(level));
    return check::SKIP;
  }
  for (size_t n : kSizes)
    for (Dtype gd : kDtypes) {
      EXPECT(matches_scalar(level, n, gd, Dtype::F32, false, 0.9));
      for (Dtype od : kDtypes) EXPECT(matches_scalar(level, n, gd, od, true, 0.9));
    }
  EXPECT(matches_scalar(level, 1000003, Dtype::BF16, Dtype::BF16, true, 0.3));  // lerp's large-weight branch
  return check::PASS;
}

__attribute__((target("avx2,fma,f16c"))) float hw_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
__attribute__((target("avx2,fma,f16c"))) uint16_t hw_f32_to_f16(float f) {
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

}  // namespace

TEST(adam_avx512_matches_scalar_bitwise) { return vector_vs_scalar(Simd::Avx512); }
TEST(adam_avx2_matches_scalar_bitwise) { return vector_vs_scalar(Simd::Avx2); }

TEST(adam_result_independent_of_thread_count) {
  for (Dtype od : kDtypes) {
    Problem a(1000003, Dtype::BF16, od, true, 7), b(1000003, Dtype::BF16, od, true, 7);
    for (int64_t t = 1; t <= 2; ++t) {
      adamw_step(a.buffers(), hyper(t), simd_best(), 1);
      adamw_step(b.buffers(), hyper(t), simd_best(), 4);
    }
    EXPECT(a.same_as(b));
  }
  return check::PASS;
}

TEST(adam_first_step_moves_by_lr) {
  // m = v = 0, g = 1, t = 1: m_hat / sqrt(v_hat) = 1, so p = p * (1 - lr * wd) - lr (up to eps).
  std::vector<float> p{2.0f}, m{0.0f}, v{0.0f}, g{1.0f / 0.75f};
  adamw_step(AdamBuffers{p.data(), m.data(), v.data(), g.data(), nullptr, 1, Dtype::F32, Dtype::F32}, hyper(1),
             Simd::Scalar, 1);
  EXPECT(std::fabs(p[0] - (2.0f * (1 - 1e-5f) - 1e-3f)) < 1e-6f);
  return check::PASS;
}

TEST(bf16_rounds_to_nearest_even) {
  EXPECT(f32_to_bf16(from_bits(0x3F808000u)) == 0x3F80);  // tie, even below: down
  EXPECT(f32_to_bf16(from_bits(0x3F818000u)) == 0x3F82);  // tie, odd below: up
  EXPECT(f32_to_bf16(from_bits(0x3F808001u)) == 0x3F81);  // above the tie: up
  EXPECT(f32_to_bf16(from_bits(0x3F807FFFu)) == 0x3F80);  // below the tie: down
  EXPECT(f32_to_bf16(from_bits(0xBF818000u)) == 0xBF82);  // sign symmetric
  EXPECT(f32_to_bf16(from_bits(0x7F7FFFFFu)) == 0x7F80);  // max float rounds up to inf
  EXPECT(f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7F80);
  EXPECT(f32_to_bf16(-std::numeric_limits<float>::infinity()) == 0xFF80);
  EXPECT(f32_to_bf16(from_bits(0x00008000u)) == 0x0000);  // subnormal tie to even zero
  EXPECT(f32_to_bf16(from_bits(0x7F800001u)) == 0x7FC0);  // signalling NaN quieted, never inf
  EXPECT(f32_to_bf16(from_bits(0xFFFFFFFFu)) == 0xFFFF);
  for (uint32_t h = 0; h < 0x10000u; ++h)                // exact round trip of every bf16 but NaNs
    if ((h & 0x7FFFu) <= 0x7F80u) EXPECT(f32_to_bf16(bf16_to_f32(uint16_t(h))) == h);
  return check::PASS;
}

TEST(f16_conversions_match_f16c) {
  if (!simd_supported(Simd::Avx2)) return check::SKIP;
  for (uint32_t h = 0; h < 0x10000u; ++h) EXPECT(bits(f16_to_f32(uint16_t(h))) == bits(hw_f16_to_f32(uint16_t(h))));
  for (uint64_t u = 0; u < (uint64_t(1) << 32); u += 4093) {  // a stride prime to every field boundary
    const float f = from_bits(uint32_t(u));
    EXPECT(f32_to_f16(f) == hw_f32_to_f16(f));
  }
  const uint32_t edges[] = {0x477FE000u, 0x477FEFFFu, 0x477FF000u, 0x33000000u, 0x33000001u, 0x387FE000u,
                            0x387FF000u, 0x38800000u, 0x7F800000u, 0x7FC00000u, 0x7F800001u};
  for (uint32_t e : edges)
    for (uint32_t s : {0u, 0x80000000u}) EXPECT(f32_to_f16(from_bits(e | s)) == hw_f32_to_f16(from_bits(e | s)));
  return check::PASS;
}

TEST(grad_sumsq_matches_scalar_and_is_thread_invariant) {
  for (Dtype gd : kDtypes) {
    Problem a(1000003, gd, Dtype::F32, false, 9);
    const double ref = sumsq_scalar(a.g.data(), gd, 0, a.n);
    for (int level = 0; level <= int(simd_best()); ++level) {
      const double s1 = grad_sumsq(a.g.data(), gd, a.n, Simd(level), 1);
      EXPECT(std::fabs(s1 - ref) <= 1e-10 * ref);  // summation order differs; n * eps bounds it
      EXPECT(s1 == grad_sumsq(a.g.data(), gd, a.n, Simd(level), 3));
    }
  }
  return check::PASS;
}

TEST(grad_sumsq_propagates_inf_and_nan) {
  for (int level = 0; level <= int(simd_best()); ++level)
    for (size_t n : {size_t(1), size_t(17), size_t(200001)}) {
      std::vector<float> g(n, 0.5f);
      EXPECT(grad_sumsq(g.data(), Dtype::F32, n, Simd(level), 2) == 0.25 * double(n));
      g[n / 2] = -std::numeric_limits<float>::infinity();
      EXPECT(std::isinf(grad_sumsq(g.data(), Dtype::F32, n, Simd(level), 2)));
      g[n - 1] = std::numeric_limits<float>::quiet_NaN();
      EXPECT(std::isnan(grad_sumsq(g.data(), Dtype::F32, n, Simd(level), 2)));
    }
  return check::PASS;
}

TEST(adam_pool_resizes) {
  set_adam_threads(3);
  EXPECT(adam_threads() == 3);
  Problem a(300000, Dtype::F32, Dtype::BF16, true, 5), b(300000, Dtype::F32, Dtype::BF16, true, 5);
  adamw_step(a.buffers(), hyper(4), simd_best(), 0);
  set_adam_threads(1);
  adamw_step(b.buffers(), hyper(4), simd_best(), 0);
  EXPECT(a.same_as(b));
  return check::PASS;
}

TEST_MAIN()
