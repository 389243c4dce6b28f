// AdamW dispatch: the step's fp32 scalars, the scalar reference kernels, the dtype conversions, SIMD
// selection by CPU detection and the persistent worker pool that splits a call into chunks.
#include "adam.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace offload {

// Note [rounding barrier] (adam.h).
static inline float rounded(float x) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(x));
#elif defined(__aarch64__)
  asm("" : "+w"(x));
#endif
  return x;
}

// ---- step scalars -------------------------------------------------------------------------------------

AdamCoeffs adam_coeffs(const AdamHyper& h) {
  // Note [adam exactness]: double arithmetic as in torch's Python code, then float as its CPU kernels
  // take scalar arguments. pow(x, 0.5) rather than sqrt because torch writes bias_correction2 ** 0.5.
  const double t = double(h.step);
  const double bc1 = 1.0 - std::pow(h.beta1, t);
  const double bc2 = 1.0 - std::pow(h.beta2, t);
  AdamCoeffs c;
  c.scale = float(h.grad_scale);
  c.decay = float(1.0 - h.lr * h.weight_decay);
  const float w = float(1.0 - h.beta1);
  c.lerp_small = std::fabs(w) < 0.5f;       // torch's is_lerp_weight_small, on the float weight
  c.coeff = c.lerp_small ? w : w - 1.0f;
  c.beta2 = float(h.beta2);
  c.omb2 = float(1.0 - h.beta2);
  c.bc2_sqrt = float(std::pow(bc2, 0.5));
  c.eps = float(h.eps);
  c.neg_step = float(-(h.lr / bc1));
  return c;
}

// ---- conversions --------------------------------------------------------------------------------------

static inline uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

float bf16_to_f32(uint16_t h) { return from_bits(uint32_t(h) << 16); }

uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet the NaN
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return from_bits(sign | 0x7F800000u | (mant ? 0x00400000u | (mant << 13) : 0u));
  if (exp != 0) return from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  const float mag = float(mant) * 0x1p-24f;  // subnormal or zero: exact in fp32
  return from_bits(sign | bits(mag));
}

uint16_t f32_to_f16(float f) {
  uint32_t u = bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((u & 0x7FFFFFu) >> 13));
  if (u >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (u < 0x38800000u) {
    // Result is subnormal or zero: adding 0.5f aligns the half's last mantissa bit with the float's, so
    // the fp32 add itself rounds to nearest even.
    const float r = from_bits(u) + 0.5f;
    return uint16_t(sign | (bits(r) - bits(0.5f)));
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += (uint32_t(15 - 127) << 23) + 0xFFFu + odd;
  return uint16_t(sign | (u >> 13));
}

// ---- scalar reference ---------------------------------------------------------------------------------

static inline float load_as_f32(const void* p, Dtype d, size_t i) {
  switch (d) {
    case Dtype::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case Dtype::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

void adamw_scalar(const AdamBuffers& b, const AdamCoeffs& c, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    const float g = rounded(load_as_f32(b.grad, b.grad_dtype, i) * c.scale);
    float p = rounded(b.master[i] * c.decay);
    float m = b.exp_avg[i];
    m = std::fma(c.coeff, g - m, c.lerp_small ? m : g);
    const float v = std::fma(c.omb2 * g, g, b.exp_avg_sq[i] * c.beta2);
    const float den = std::sqrt(v) / c.bc2_sqrt + c.eps;
    p = p + (c.neg_step * m) / den;
    b.master[i] = p;
    b.exp_avg[i] = m;
    b.exp_avg_sq[i] = v;
    if (!b.out) continue;
    switch (b.out_dtype) {
      case Dtype::BF16: static_cast<uint16_t*>(b.out)[i] = f32_to_bf16(p); break;
      case Dtype::F16: static_cast<uint16_t*>(b.out)[i] = f32_to_f16(p); break;
      default: static_cast<float*>(b.out)[i] = p; break;
    }
  }
}

double sumsq_scalar(const void* grad, Dtype dtype, size_t begin, size_t end) {
  double s = 0.0;
  for (size_t i = begin; i < end; ++i) {
    const double x = load_as_f32(grad, dtype, i);
    s += x * x;
  }
  return s;
}

// ---- SIMD selection -----------------------------------------------------------------------------------

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::Avx512: return "avx512";
    case Simd::Avx2: return "avx2";
    default: return "scalar";
  }
}

static Simd detect_simd() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Simd::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Simd::Avx2;
#endif
  return Simd::Scalar;
}

static const Simd g_best = detect_simd();

Simd simd_best() { return g_best; }
bool simd_supported(Simd s) { return int(s) <= int(g_best); }

static AdamKernel adam_kernel(Simd s) {
  return s == Simd::Avx512 ? adamw_avx512 : s == Simd::Avx2 ? adamw_avx2 : adamw_scalar;
}
static SumsqKernel sumsq_kernel(Simd s) {
  return s == Simd::Avx512 ? sumsq_avx512 : s == Simd::Avx2 ? sumsq_avx2 : sumsq_scalar;
}

// ---- worker pool --------------------------------------------------------------------------------------

// Note [adam pool]: workers are created once and sleep on a condition variable between calls. A call runs
// fn(ctx, chunk) for every chunk, claimed through an atomic counter by the caller and by `want` workers;
// the caller returns only after each of those workers has checked out, so no worker touches the caller's
// stack context afterwards. Calls are serialised by g_mu: the kernels are memory-bound, two at once would
// only share the bandwidth. g_mu is also held across fork() (pthread_atfork), and a child drops the
// parent's pool (its threads do not exist there) and builds a new one on first use.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return int(threads_.size()) + 1; }

  void run(int threads, size_t chunks, void (*fn)(void*, size_t), void* ctx) {
    const int want = std::min<int>(threads - 1, int(std::min<size_t>(chunks, size_t(size()))) - 1);
    if (want <= 0) {
      for (size_t i = 0; i < chunks; ++i) fn(ctx, i);
      return;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      fn_ = fn; ctx_ = ctx; chunks_ = chunks; want_ = want; active_ = want;
      next_.store(0, std::memory_order_relaxed);
      ++gen_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> l(mu_);
    done_.wait(l, [this] { return active_ == 0; });
  }

 private:
  void work() {
    for (size_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < chunks_;) fn_(ctx_, i);
  }
  void loop(int idx) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      wake_.wait(l, [&] { return stop_ || gen_ != seen; });
      if (stop_) return;
      seen = gen_;
      if (idx >= want_) continue;
      l.unlock();
      work();
      l.lock();
      if (--active_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  uint64_t gen_ = 0;
  bool stop_ = false;
  void (*fn_)(void*, size_t) = nullptr;
  void* ctx_ = nullptr;
  size_t chunks_ = 0;
  int want_ = 0, active_ = 0;
  std::atomic<size_t> next_{0};
};

static std::mutex g_mu;
static Pool* g_pool = nullptr;  // leaked at exit on purpose: idle workers die with the process
static int g_default_threads = 0;

static int hw_threads() {
  const unsigned n = std::thread::hardware_concurrency();  // os.cpu_count()
  return n ? int(n) : 1;
}

static void register_fork_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { g_mu.lock(); }, [] { g_mu.unlock(); },
                   [] { g_pool = nullptr; g_mu.unlock(); });  // the parent's threads are gone here
  });
}

// Returns the pool, at least `threads` wide; call with g_mu held.
static Pool& pool_locked(int threads) {
  if (!g_pool || g_pool->size() < threads) {
    delete g_pool;
    g_pool = nullptr;
    g_pool = new Pool(threads - 1);
  }
  return *g_pool;
}

static int resolve_threads(int threads) {
  if (g_default_threads == 0) g_default_threads = hw_threads();
  return threads > 0 ? threads : g_default_threads;
}

void set_adam_threads(int n) {
  register_fork_handlers();
  std::lock_guard<std::mutex> l(g_mu);
  g_default_threads = n;
  delete g_pool;
  g_pool = nullptr;
  pool_locked(n);
}

int adam_threads() {
  std::lock_guard<std::mutex> l(g_mu);
  return resolve_threads(0);
}

// Chunk of work per claim: large enough that the counter and the wake-up cost nothing next to the ~1.8 MB
// of traffic a chunk streams, small enough to balance 16 threads on a few million elements. A multiple of
// 64 elements, so every chunk but the last starts 256-byte aligned relative to the buffers.
static constexpr size_t kChunk = size_t(1) << 16;

static void parallel_chunks(size_t n, int threads, void (*fn)(void*, size_t), void* ctx) {
  const size_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks <= 1) {
    if (chunks) fn(ctx, 0);
    return;
  }
  register_fork_handlers();
  std::lock_guard<std::mutex> l(g_mu);
  const int t = resolve_threads(threads);
  pool_locked(t).run(t, chunks, fn, ctx);
}

// ---- entry points -------------------------------------------------------------------------------------

void adamw_step(const AdamBuffers& b, const AdamHyper& h, Simd simd, int threads) {
  struct Ctx { const AdamBuffers* b; AdamCoeffs c; AdamKernel k; } ctx{&b, adam_coeffs(h), adam_kernel(simd)};
  parallel_chunks(b.n, threads, [](void* p, size_t chunk) {
    const Ctx& x = *static_cast<const Ctx*>(p);
    const size_t begin = chunk * kChunk;
    x.k(*x.b, x.c, begin, std::min(x.b->n, begin + kChunk));
  }, &ctx);
}

double grad_sumsq(const void* grad, Dtype dtype, size_t n, Simd simd, int threads) {
  // Partial sums per fixed chunk, added in chunk order: the result does not depend on the thread count.
  const size_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
  struct Ctx { const void* g; Dtype d; size_t n; SumsqKernel k; double* out; } ctx{grad, dtype, n,
                                                                                    sumsq_kernel(simd),
                                                                                    partial.data()};
  parallel_chunks(n, threads, [](void* p, size_t chunk) {
    const Ctx& x = *static_cast<const Ctx*>(p);
    const size_t begin = chunk * kChunk;
    x.out[chunk] = x.k(x.g, x.d, begin, std::min(x.n, begin + kChunk));
  }, &ctx);
  double s = 0.0;
  for (double v : partial) s += v;
  return s;
}

}  // namespace offload
