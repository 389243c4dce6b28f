// CPU AdamW over flat fp32 master / exp_avg / exp_avg_sq, with fp32/bf16/fp16 grads in and an optional
// fp32/bf16/fp16 copy of the updated params out, written in the same pass.
//
// Note [adam exactness]: the update reproduces torch.optim.AdamW (foreach=False, the single-tensor path)
// op for op, in fp32, with each op rounded where torch's vectorised CPU kernels round it:
//   g   = float(grad) * scale
//   p   = p * decay                                  decay = float(1 - lr * wd)
//   m   = fma(coeff, g - m, base)                    torch's lerp_vec: coeff = w, base = m when |w| < 0.5,
//                                                    else coeff = w - 1, base = g (w = float(1 - beta1))
//   v   = fma(omb2 * g, g, v * beta2)                mul_ then addcmul_, whose `self + s * t1 * t2` torch's
//                                                    GCC build contracts into one FMA (measured: bitwise)
//   den = sqrt(v) / bc2_sqrt + eps
//   p   = p + (neg_step * m) / den                   addcdiv_
// The bias corrections are computed in double from the caller's step, as torch's Python scalars are, then
// cast to float as torch's CPU kernels cast scalar arguments. Every path (scalar, AVX2, AVX-512) performs
// exactly these IEEE operations, so they agree bitwise with each other and with any thread count.
// One op cannot be reproduced: torch's CPU sqrt goes through MKL VML, which is within 1 ulp but not
// correctly rounded (it differs from IEEE sqrt on ~15% of inputs); ours is IEEE. m and v never read the
// sqrt, so they equal torch's bitwise; p can differ by an ulp of the update (tests/test_adam.py bounds it).
//
// Note [rounding barrier]: GCC contracts a*b+c into an FMA by default (-ffp-contract=fast), even across
// vector intrinsics, which would round once where torch rounds twice. Each product that feeds an add goes
// through rounded(), an empty asm the compiler cannot see through, so it stays a separate rounded multiply.
//
// Core sources include no Python headers: tools/native_tests.sh links them into csrc/tests/adam_test.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

namespace offload {

enum class Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };
enum class Simd : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

inline size_t dtype_size(Dtype d) { return d == Dtype::F32 ? 4 : 2; }
const char* simd_name(Simd s);
Simd simd_best();                // the widest level this CPU runs, detected once at load time
bool simd_supported(Simd s);

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // 1 on the first update, as torch's state["step"] after its increment
  double grad_scale = 1.0;
};

// The fp32 scalars of one step, derived from AdamHyper exactly as torch derives them (Note [adam exactness]).
struct AdamCoeffs {
  float scale, decay, coeff, beta2, omb2, bc2_sqrt, eps, neg_step;
  bool lerp_small;
};
AdamCoeffs adam_coeffs(const AdamHyper& h);

// One call's buffers. grad and out are raw bytes of their dtype; out may be null.
struct AdamBuffers {
  float* master;
  float* exp_avg;
  float* exp_avg_sq;
  const void* grad;
  void* out;
  size_t n;
  Dtype grad_dtype, out_dtype;
};

// Elements [begin, end) of one call; each SIMD file defines one of these (none throws or allocates).
using AdamKernel = void (*)(const AdamBuffers&, const AdamCoeffs&, size_t begin, size_t end);
void adamw_scalar(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end);
void adamw_avx2(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end);
void adamw_avx512(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end);

// Sum of squares of grad[begin, end) in double; inf and nan propagate.
using SumsqKernel = double (*)(const void* grad, Dtype dtype, size_t begin, size_t end);
double sumsq_scalar(const void* grad, Dtype dtype, size_t begin, size_t end);
double sumsq_avx2(const void* grad, Dtype dtype, size_t begin, size_t end);
double sumsq_avx512(const void* grad, Dtype dtype, size_t begin, size_t end);

// The public entry points: split n over the persistent pool (threads == 0: its default size; small n runs
// on the calling thread). Both give bitwise the same result for any thread count. The caller has checked
// sizes, dtypes, hyperparameters and that `simd` is supported.
void adamw_step(const AdamBuffers& b, const AdamHyper& h, Simd simd, int threads);
double grad_sumsq(const void* grad, Dtype dtype, size_t n, Simd simd, int threads);

void set_adam_threads(int n);  // n >= 1; resizes the pool
int adam_threads();

// Conversions shared by the scalar path and the tests; NaN handling matches the hardware instructions the
// vector paths use (vcvtps2ph / vcvtph2ps): quieted, sign and top payload bits kept.
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // round to nearest even, like torch's .to(torch.bfloat16)
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);   // IEEE binary16, round to nearest even

}  // namespace offload
