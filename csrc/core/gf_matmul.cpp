// GF(2^8) matrix times byte buffers (see gf_matmul.h): the scalar, AVX2, AVX-512BW and GFNI
// kernels, the stripe walk and the thread split.
#include "core/gf_matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "core/gf256.h"

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 intrinsics trip its own -Wmaybe-uninitialized (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define OFFLOAD_EC_X86 1
#endif

namespace offload {

namespace {

// The coefficients of one call, in the forms the kernels multiply with.
struct Plan {
  const uint8_t* coeffs;  // n_out x n_in, row-major
  int n_in;
  int n_out;
  const uint8_t* const* in;
  uint8_t* const* out;
  std::vector<uint8_t> nibbles;  // input-major: entry (j, r) at (j * n_out + r) * 32, see nibble_tables
  std::vector<uint64_t> affine;  // input-major: entry (j, r) at j * n_out + r
};

// Rows [r0, r0 + R) of the product over bytes [begin, end).
using RowsFn = void (*)(const Plan&, int r0, size_t begin, size_t end);
// out[0] = XOR of every input over bytes [begin, end).
using XorFn = void (*)(const Plan&, size_t begin, size_t end);

constexpr int kMaxGroup = 8;

struct Kernel {
  int group;               // output rows per pass over a stripe (the SIMD kernels keep them in registers)
  RowsFn rows[kMaxGroup];  // rows[R - 1] handles R rows
  XorFn xor_all;
  bool nibbles;
  bool affine;
};

void scalar_rows(const Plan& p, int r0, int count, size_t begin, size_t end) {
  const auto& mul = gf256::tables().mul;
  for (int r = r0; r < r0 + count; ++r) {
    uint8_t* o = p.out[r];
    const uint8_t* c = p.coeffs + static_cast<size_t>(r) * p.n_in;
    const uint8_t* by = mul[c[0]];
    for (size_t i = begin; i < end; ++i) o[i] = by[p.in[0][i]];
    for (int j = 1; j < p.n_in; ++j) {
      by = mul[c[j]];
      const uint8_t* x = p.in[j];
      for (size_t i = begin; i < end; ++i) o[i] ^= by[x[i]];
    }
  }
}

template <int R>
void scalar_group(const Plan& p, int r0, size_t begin, size_t end) {
  scalar_rows(p, r0, R, begin, end);
}

void scalar_xor(const Plan& p, size_t begin, size_t end) {
  uint8_t* o = p.out[0];
  size_t i = begin;
  for (; i + 8 <= end; i += 8) {
    uint64_t acc = 0;
    for (int j = 0; j < p.n_in; ++j) {
      uint64_t x;
      std::memcpy(&x, p.in[j] + i, 8);
      acc ^= x;
    }
    std::memcpy(o + i, &acc, 8);
  }
  for (; i < end; ++i) {
    uint8_t acc = 0;
    for (int j = 0; j < p.n_in; ++j) acc ^= p.in[j][i];
    o[i] = acc;
  }
}

#ifdef OFFLOAD_EC_X86

// Each SIMD kernel keeps 2 x R accumulators in registers (two vectors of each of R rows), loads
// each input's two vectors once, multiplies them by the R coefficients of its column (one table or
// matrix load serves both vectors) and leaves the bytes past the last pair of vectors to the scalar
// loop (only the end of the last range has any). Two vectors a pass measured 10-25% faster than one.

template <int R>
__attribute__((target("avx2"))) void avx2_group(const Plan& p, int r0, size_t begin, size_t end) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const size_t stride = static_cast<size_t>(p.n_out) * 32;
  size_t i = begin;
  for (; i + 64 <= end; i += 64) {
    __m256i acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_si256();
    const uint8_t* t = p.nibbles.data() + static_cast<size_t>(r0) * 32;
    for (int j = 0; j < p.n_in; ++j, t += stride) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.in[j] + i));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.in[j] + i + 32));
      const __m256i lo0 = _mm256_and_si256(x0, mask);
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi64(x0, 4), mask);
      const __m256i lo1 = _mm256_and_si256(x1, mask);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi64(x1, 4), mask);
      for (int r = 0; r < R; ++r) {
        const __m256i tl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 * r)));
        const __m256i th =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 * r + 16)));
        acc[0][r] =
            _mm256_xor_si256(acc[0][r], _mm256_xor_si256(_mm256_shuffle_epi8(tl, lo0), _mm256_shuffle_epi8(th, hi0)));
        acc[1][r] =
            _mm256_xor_si256(acc[1][r], _mm256_xor_si256(_mm256_shuffle_epi8(tl, lo1), _mm256_shuffle_epi8(th, hi1)));
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.out[r0 + r] + i), acc[0][r]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.out[r0 + r] + i + 32), acc[1][r]);
    }
  }
  scalar_rows(p, r0, R, i, end);
}

__attribute__((target("avx2"))) void avx2_xor(const Plan& p, size_t begin, size_t end) {
  size_t i = begin;
  for (; i + 32 <= end; i += 32) {
    __m256i acc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.in[0] + i));
    for (int j = 1; j < p.n_in; ++j)
      acc = _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.in[j] + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.out[0] + i), acc);
  }
  scalar_xor(p, i, end);
}

template <int R>
__attribute__((target("avx512f,avx512bw"))) void avx512_group(const Plan& p, int r0, size_t begin, size_t end) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const size_t stride = static_cast<size_t>(p.n_out) * 32;
  size_t i = begin;
  for (; i + 128 <= end; i += 128) {
    __m512i acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_si512();
    const uint8_t* t = p.nibbles.data() + static_cast<size_t>(r0) * 32;
    for (int j = 0; j < p.n_in; ++j, t += stride) {
      const __m512i x0 = _mm512_loadu_si512(p.in[j] + i);
      const __m512i x1 = _mm512_loadu_si512(p.in[j] + i + 64);
      const __m512i lo0 = _mm512_and_si512(x0, mask);
      const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi64(x0, 4), mask);
      const __m512i lo1 = _mm512_and_si512(x1, mask);
      const __m512i hi1 = _mm512_and_si512(_mm512_srli_epi64(x1, 4), mask);
      for (int r = 0; r < R; ++r) {
        const __m512i tl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 * r)));
        const __m512i th = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 * r + 16)));
        acc[0][r] =
            _mm512_ternarylogic_epi64(acc[0][r], _mm512_shuffle_epi8(tl, lo0), _mm512_shuffle_epi8(th, hi0), 0x96);
        acc[1][r] =
            _mm512_ternarylogic_epi64(acc[1][r], _mm512_shuffle_epi8(tl, lo1), _mm512_shuffle_epi8(th, hi1), 0x96);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_si512(p.out[r0 + r] + i, acc[0][r]);
      _mm512_storeu_si512(p.out[r0 + r] + i + 64, acc[1][r]);
    }
  }
  scalar_rows(p, r0, R, i, end);
}

__attribute__((target("avx512f,avx512bw"))) void avx512_xor(const Plan& p, size_t begin, size_t end) {
  size_t i = begin;
  for (; i + 64 <= end; i += 64) {
    __m512i acc = _mm512_loadu_si512(p.in[0] + i);
    for (int j = 1; j < p.n_in; ++j) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(p.in[j] + i));
    _mm512_storeu_si512(p.out[0] + i, acc);
  }
  scalar_xor(p, i, end);
}

template <int R>
__attribute__((target("avx512f,avx512bw,gfni"))) void gfni_group(const Plan& p, int r0, size_t begin, size_t end) {
  size_t i = begin;
  for (; i + 128 <= end; i += 128) {
    __m512i acc[2][R];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_si512();
    const uint64_t* a = p.affine.data() + r0;
    for (int j = 0; j < p.n_in; ++j, a += p.n_out) {
      const __m512i x0 = _mm512_loadu_si512(p.in[j] + i);
      const __m512i x1 = _mm512_loadu_si512(p.in[j] + i + 64);
      for (int r = 0; r < R; ++r) {
        const __m512i mat = _mm512_set1_epi64(static_cast<long long>(a[r]));
        acc[0][r] = _mm512_xor_si512(acc[0][r], _mm512_gf2p8affine_epi64_epi8(x0, mat, 0));
        acc[1][r] = _mm512_xor_si512(acc[1][r], _mm512_gf2p8affine_epi64_epi8(x1, mat, 0));
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_si512(p.out[r0 + r] + i, acc[0][r]);
      _mm512_storeu_si512(p.out[r0 + r] + i + 64, acc[1][r]);
    }
  }
  scalar_rows(p, r0, R, i, end);
}

#endif  // OFFLOAD_EC_X86

// rows[R - 1] = fn<R> for R = 1..8 (function templates cannot be template arguments).
#define OFFLOAD_EC_GROUPS(fn) {fn<1>, fn<2>, fn<3>, fn<4>, fn<5>, fn<6>, fn<7>, fn<8>}

const Kernel& kernel(Isa isa) {
  static const Kernel scalar{kMaxGroup, OFFLOAD_EC_GROUPS(scalar_group), &scalar_xor, false, false};
#ifdef OFFLOAD_EC_X86
  // 4 rows: 8 accumulators, 2 input vectors, their 4 nibble vectors, the mask and 2 tables are one more
  // than AVX2's 16 registers; GCC keeps one accumulator on the stack, and it still beats 2 rows a pass.
  static const Kernel avx2{4, OFFLOAD_EC_GROUPS(avx2_group), &avx2_xor, true, false};
  static const Kernel avx512{kMaxGroup, OFFLOAD_EC_GROUPS(avx512_group), &avx512_xor, true, false};
  static const Kernel gfni{kMaxGroup, OFFLOAD_EC_GROUPS(gfni_group), &avx512_xor, false, true};
  if (isa == Isa::Avx2) return avx2;
  if (isa == Isa::Avx512) return avx512;
  if (isa == Isa::Gfni) return gfni;
#endif
  (void)isa;
  return scalar;
}

#undef OFFLOAD_EC_GROUPS

Plan make_plan(const Kernel& k, const uint8_t* coeffs, int n_in, int n_out, const uint8_t* const* in,
               uint8_t* const* out) {
  Plan p{coeffs, n_in, n_out, in, out, {}, {}};
  const size_t cells = static_cast<size_t>(n_in) * n_out;
  if (k.nibbles) p.nibbles.resize(cells * 32);
  if (k.affine) p.affine.resize(cells);
  for (int j = 0; j < n_in; ++j) {
    for (int r = 0; r < n_out; ++r) {
      const uint8_t c = coeffs[static_cast<size_t>(r) * n_in + j];
      const size_t cell = static_cast<size_t>(j) * n_out + r;
      if (k.nibbles) gf256::nibble_tables(c, p.nibbles.data() + cell * 32);
      if (k.affine) p.affine[cell] = gf256::affine_matrix(c);
    }
  }
  return p;
}

bool is_xor(const uint8_t* coeffs, int n_in, int n_out) {
  return n_out == 1 && std::all_of(coeffs, coeffs + n_in, [](uint8_t c) { return c == 1; });
}

// 64 bytes: whole cache lines and whole vectors of every variant at the range and stripe edges.
constexpr size_t kAlign = 64;
// Inputs of one stripe: half of a small (1 MiB) L2, so they stay there while each row group reads them.
constexpr size_t kStripeInputBytes = size_t{512} << 10;
// Below this a thread costs more to start than its share saves.
constexpr size_t kMinThreadBytes = size_t{64} << 10;

void run_range(const Kernel& k, const Plan& p, bool xor_only, size_t begin, size_t end) {
  if (xor_only) {
    k.xor_all(p, begin, end);
    return;
  }
  // One stripe at a time, every row group of it before the next: with one group that is a single
  // pass anyway, with several (or the scalar loop, which reads the inputs once per output row) the
  // later reads of the stripe's inputs hit L2.
  const size_t stripe = std::max(kAlign, kStripeInputBytes / static_cast<size_t>(p.n_in) / kAlign * kAlign);
  for (size_t s = begin; s < end; s += stripe) {
    const size_t e = std::min(end, s + stripe);
    for (int r0 = 0; r0 < p.n_out; r0 += k.group) k.rows[std::min(k.group, p.n_out - r0) - 1](p, r0, s, e);
  }
}

}  // namespace

const std::vector<IsaSupport>& isa_support() {
  static const std::vector<IsaSupport> support = [] {
#ifdef OFFLOAD_EC_X86
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    const bool gfni = avx512 && __builtin_cpu_supports("gfni");
#else
    const bool avx2 = false, avx512 = false, gfni = false;
#endif
    return std::vector<IsaSupport>{{Isa::Gfni, "gfni", gfni},
                                   {Isa::Avx512, "avx512", avx512},
                                   {Isa::Avx2, "avx2", avx2},
                                   {Isa::Scalar, "scalar", true}};
  }();
  return support;
}

const char* isa_name(Isa isa) {
  for (const IsaSupport& s : isa_support())
    if (s.isa == isa) return s.name;
  return "auto";
}

Isa parse_isa(const std::string& name) {
  if (name.empty() || name == "auto") return Isa::Auto;
  std::string names = "auto";
  for (const IsaSupport& s : isa_support()) {
    if (name == s.name) return s.isa;
    names += std::string(", ") + s.name;
  }
  throw std::invalid_argument("erasure codec ISA must be one of " + names + "; got '" + name + "'");
}

Isa resolve_isa(Isa isa) {
  if (isa == Isa::Auto) {
    const char* env = std::getenv("OFFLOAD_EC_ISA");
    try {
      if (env && *env) isa = parse_isa(env);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("OFFLOAD_EC_ISA: ") + e.what());
    }
  }
  for (const IsaSupport& s : isa_support()) {
    if (isa == Isa::Auto && s.available) return s.isa;
    if (isa == s.isa && !s.available)
      throw std::invalid_argument(std::string("erasure codec ISA ") + s.name + ": this CPU lacks it");
  }
  return isa;
}

void gf_matmul(const uint8_t* coeffs, int n_in, int n_out, const uint8_t* const* in, uint8_t* const* out, size_t len,
               Isa isa, int threads) {
  if (n_in < 1 || n_out < 1) throw std::invalid_argument("gf_matmul: need at least one input and one output");
  if (len == 0) return;
  const Kernel& k = kernel(resolve_isa(isa));
  const Plan p = make_plan(k, coeffs, n_in, n_out, in, out);
  const bool xor_only = is_xor(coeffs, n_in, n_out);
  const size_t parts = static_cast<size_t>(std::max(threads, 1));
  const size_t per_part = std::max(kMinThreadBytes, ((len + parts - 1) / parts + kAlign - 1) / kAlign * kAlign);
  std::vector<std::thread> workers;
  // Joins whatever was started, also when starting a thread throws.
  struct JoinAll {
    std::vector<std::thread>& threads;
    ~JoinAll() {
      for (auto& t : threads) t.join();
    }
  } join_all{workers};
  for (size_t begin = per_part; begin < len; begin += per_part)
    workers.emplace_back(run_range, std::cref(k), std::cref(p), xor_only, begin, std::min(len, begin + per_part));
  run_range(k, p, xor_only, 0, std::min(len, per_part));
}

}  // namespace offload
