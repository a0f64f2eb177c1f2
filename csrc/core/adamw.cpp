// Fused AdamW (see adamw.h): one plain C++ loop body that GCC auto-vectorises, compiled three times
// (AVX-512, AVX2+FMA, baseline x86-64) and picked once per process from the CPU's features.
// Other compilers and architectures get the baseline variant only.
//
// Exactness. Each variant repeats the rounding of torch's kernel built for the same level (read
// from torch 2.13's FusedAdamKernel.cpp and the disassembly of libtorch_cpu, whose AVX-512
// dispatch runs the AVX2 build of this kernel). That build fuses multiply-adds in three places:
// where its source calls vec::fmadd (the lerp of exp_avg), where GCC contracted
// `v * beta2 + c2 * g * g` into fma(g, c2 * g, v * beta2), and in the double `1 - lr * wd`. Its
// baseline build has no FMA unit, so nothing is fused there. Our FMA variants fuse at exactly
// those places, the baseline variant multiplies and adds, and this file is compiled with
// fp-contract=off so GCC fuses nothing else. Torch's scalar remainder loop (the last numel % 8
// elements of each chunk it hands a thread) was contracted the other way, fma(v, beta2, c2*g*g);
// we use the vector-loop form for every element, so our results do not depend on where chunks end.
// Those remainder elements are the only ones where we and torch can differ (by an ulp of
// exp_avg_sq, and what follows from it).
//
// NaN in the wire copy: torch's vectorised fp32 -> bf16 conversion writes 0xFFFF for every NaN, its
// scalar conversion (all its baseline build uses) 0x7FC0. Each variant writes what torch writes at
// its level, so the wire copy equals master.to(torch.bfloat16) bit for bit, NaNs included.
//
// OFFLOAD_ADAMW_ISA=avx512|avx2|default forces a variant (for tests and comparisons); asking for
// one the CPU lacks is an error.
#include "core/adamw.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// See the header comment: GCC must fuse only where we say so (C++ defaults to fp-contract=fast).
#pragma GCC optimize("fp-contract=off")
#define OFFLOAD_GCC_MULTIVERSION 1
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

// Without -fno-math-errno (the build does not pass it) sqrtf stays a call that may set errno, and a
// call stops vectorisation. Declared const, it becomes vsqrtps: correctly rounded like sqrtf, and
// its argument here is never negative, so there is no errno to lose.
extern "C" float sqrtf(float) noexcept __attribute__((const));

#if defined(__GNUC__)
#define OFFLOAD_INLINE inline __attribute__((always_inline))
#else
#define OFFLOAD_INLINE inline
#endif

#if defined(__x86_64__) && defined(OFFLOAD_GCC_MULTIVERSION)
#define OFFLOAD_X86_CLONES 1
#endif

namespace offload {

namespace {

// Every per-element constant, rounded to float where and how torch rounds it.
struct Coeffs {
  float grad_scale;
  float decay;           // 1 - lr * weight_decay; exactly 1 when torch skips the multiply
  float lerp_coeff;      // exp_avg.lerp_(grad, 1 - beta1), written torch's way (see update_span)
  uint32_t lerp_on_m;    // all ones when |1 - beta1| < 0.5 (the lerp starts from m), else zero
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
};

Coeffs make_coeffs(const AdamWParams& p, bool fused) {
  // Torch reads the step counter as a float (state_step.item<float>()), then works in double.
  const double step = static_cast<float>(p.step);
  const double bias_correction1 = 1 - std::pow(p.beta1, step);
  const double bias_correction2 = 1 - std::pow(p.beta2, step);
  const float w = static_cast<float>(1 - p.beta1);
  Coeffs c{};
  c.grad_scale = p.grad_scale;
  c.decay = static_cast<float>(fused ? std::fma(-p.lr, p.weight_decay, 1.0) : 1 - p.lr * p.weight_decay);
  const bool small = std::fabs(w) < 0.5f;
  c.lerp_coeff = small ? w : w - 1.0f;
  c.lerp_on_m = small ? ~uint32_t{0} : 0;
  c.beta2 = static_cast<float>(p.beta2);
  c.one_minus_beta2 = static_cast<float>(1 - p.beta2);
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  c.eps = static_cast<float>(p.eps);
  c.neg_step_size = -static_cast<float>(p.lr / bias_correction1);
  return c;
}

// Torch's vectorised kernels (AVX2, AVX-512) against its baseline one.
struct FmaLevel {
  static constexpr bool kFma = true;
  static constexpr uint16_t kNanBits = 0xFFFF;
};
struct BaseLevel {
  static constexpr bool kFma = false;
  static constexpr uint16_t kNanBits = 0x7FC0;
};

template <bool kFma>
OFFLOAD_INLINE float madd(float a, float b, float c) {
  if constexpr (kFma) return __builtin_fmaf(a, b, c);
  return a * b + c;
}

OFFLOAD_INLINE uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

OFFLOAD_INLINE float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// a where mask is all ones, b where it is zero. Bit operations, because GCC cannot vectorise a
// select on a loop-invariant bool in every vector mode.
OFFLOAD_INLINE float select(uint32_t mask, float a, float b) {
  return float_of((bits_of(a) & mask) | (bits_of(b) & ~mask));
}

OFFLOAD_INLINE float to_float(float x) { return x; }

OFFLOAD_INLINE float to_float(uint16_t bf16) { return float_of(static_cast<uint32_t>(bf16) << 16); }

// Round to nearest even on the bit pattern; a NaN would carry into the exponent (or become inf),
// so it is replaced by kNanBits with a select, not a branch.
template <uint16_t kNanBits>
OFFLOAD_INLINE uint16_t to_bf16(float x) {
  const uint32_t bits = bits_of(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? kNanBits : static_cast<uint16_t>(rounded);
}

// The loop GCC vectorises: restrict pointers, no calls, no branches (the NaN ternary becomes a
// blend). Coeffs comes by value so its fields live in registers, not behind a pointer. sqrtf and
// __builtin_fmaf rather than std::sqrt / std::fma: those are header functions compiled without this
// file's optimize pragma, which GCC then refuses to inline.
template <class Level, class Grad, bool kWire>
OFFLOAD_INLINE void update_span(float* __restrict param, float* __restrict exp_avg, float* __restrict exp_avg_sq,
                                const Grad* __restrict grad, uint16_t* __restrict wire, int64_t n,
                                const Coeffs c) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(grad[i]) * c.grad_scale;
    const float m0 = exp_avg[i];
    // Torch's lerp: m + w * (g - m) for a small weight, else g + (w - 1) * (g - m).
    const float m = madd<Level::kFma>(c.lerp_coeff, g - m0, select(c.lerp_on_m, m0, g));
    const float v = madd<Level::kFma>(g, c.one_minus_beta2 * g, exp_avg_sq[i] * c.beta2);
    const float denom = sqrtf(v) / c.bias_correction2_sqrt + c.eps;
    const float p = param[i] * c.decay + (c.neg_step_size * m) / denom;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p;
    if constexpr (kWire) wire[i] = to_bf16<Level::kNanBits>(p);
  }
}

struct Buffers {
  float* param;
  float* exp_avg;
  float* exp_avg_sq;
  const void* grad;
  GradDtype grad_dtype;
  uint16_t* wire;
};

template <class Level, class Grad>
OFFLOAD_INLINE void update_range(const Buffers& b, const Coeffs& c, int64_t begin, int64_t end) {
  const Grad* grad = static_cast<const Grad*>(b.grad) + begin;
  float* param = b.param + begin;
  float* m = b.exp_avg + begin;
  float* v = b.exp_avg_sq + begin;
  if (b.wire)
    update_span<Level, Grad, true>(param, m, v, grad, b.wire + begin, end - begin, c);
  else
    update_span<Level, Grad, false>(param, m, v, grad, nullptr, end - begin, c);
}

template <class Level>
OFFLOAD_INLINE void update_any(const Buffers& b, const Coeffs& c, int64_t begin, int64_t end) {
  if (b.grad_dtype == GradDtype::BF16)
    update_range<Level, uint16_t>(b, c, begin, end);
  else
    update_range<Level, float>(b, c, begin, end);
}

using RangeFn = void (*)(const Buffers&, const Coeffs&, int64_t, int64_t);

void update_baseline(const Buffers& b, const Coeffs& c, int64_t begin, int64_t end) {
  update_any<BaseLevel>(b, c, begin, end);
}

#ifdef OFFLOAD_X86_CLONES
__attribute__((target("avx2,fma"))) void update_avx2(const Buffers& b, const Coeffs& c, int64_t begin,
                                                     int64_t end) {
  update_any<FmaLevel>(b, c, begin, end);
}

// avx512bw: without it GCC cannot hold 32 bf16 values in a zmm and falls back to 256-bit vectors.
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,prefer-vector-width=512"))) void update_avx512(
    const Buffers& b, const Coeffs& c, int64_t begin, int64_t end) {
  update_any<FmaLevel>(b, c, begin, end);
}
#endif

struct Variant {
  const char* name;
  bool available;
  RangeFn fn;
  bool fused;
};

// Best first.
std::vector<Variant> variants() {
#ifdef OFFLOAD_X86_CLONES
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  return {{"avx512", avx512, &update_avx512, true},
          {"avx2", avx2, &update_avx2, true},
          {"default", true, &update_baseline, false}};
#else
  return {{"default", true, &update_baseline, false}};
#endif
}

Variant pick_variant() {
  const char* env = std::getenv("OFFLOAD_ADAMW_ISA");
  const std::string want = env && *env ? env : "";
  std::string names;
  for (const Variant& v : variants()) {
    if (want.empty() && v.available) return v;
    if (want == v.name) {
      if (!v.available) throw std::invalid_argument("OFFLOAD_ADAMW_ISA=" + want + ": this CPU lacks it");
      return v;
    }
    names += names.empty() ? v.name : std::string(", ") + v.name;
  }
  throw std::invalid_argument("OFFLOAD_ADAMW_ISA must be one of " + names + "; got '" + want + "'");
}

const Variant& chosen_variant() {
  static const Variant v = pick_variant();  // thread-safe; a throw leaves it to the next call
  return v;
}

// 64 elements: whole cache lines in every array (256 B of fp32, 128 B of bf16), so no two threads
// write the same line. Below kMinChunk elements a thread costs more to start than its share saves.
constexpr int64_t kAlign = 64;
constexpr int64_t kMinChunk = int64_t{1} << 15;

template <class Fn>
void for_each_chunk(int64_t n, int threads, const Fn& fn) {
  const int64_t parts = std::max(threads, 1);
  const int64_t per_part = (n + parts - 1) / parts;
  const int64_t chunk = std::max((per_part + kAlign - 1) / kAlign * kAlign, kMinChunk);
  const int64_t count = (n + chunk - 1) / chunk;
  if (count <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(count - 1));
  // Joins whatever was started, also when starting a thread throws.
  struct JoinAll {
    std::vector<std::thread>& threads;
    ~JoinAll() {
      for (auto& t : threads) t.join();
    }
  } join_all{workers};
  for (int64_t k = 1; k < count; ++k) workers.emplace_back(fn, k * chunk, std::min(n, (k + 1) * chunk));
  fn(int64_t{0}, chunk);
}

}  // namespace

void adamw_step(float* param, float* exp_avg, float* exp_avg_sq, const void* grad, GradDtype grad_dtype,
                uint16_t* wire_bf16, int64_t n, const AdamWParams& p, int threads) {
  if (n < 0) throw std::invalid_argument("adamw_step: n must be >= 0; got " + std::to_string(n));
  if (p.step < 1) throw std::invalid_argument("adamw_step: step must be >= 1; got " + std::to_string(p.step));
  if (n == 0) return;
  if (!param || !exp_avg || !exp_avg_sq || !grad)
    throw std::invalid_argument("adamw_step: param, exp_avg, exp_avg_sq and grad must be non-null");
  const Variant& v = chosen_variant();
  const Coeffs c = make_coeffs(p, v.fused);
  const Buffers b{param, exp_avg, exp_avg_sq, grad, grad_dtype, wire_bf16};
  for_each_chunk(n, threads, [&](int64_t begin, int64_t end) { v.fn(b, c, begin, end); });
}

}  // namespace offload
