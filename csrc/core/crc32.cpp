// Slicing-by-16 (the portable code): sixteen 256-entry tables turn 16 input bytes into one table
// lookup each, so the loop carries no byte-serial dependency (3.2 GB/s a core here, about zlib's).
// Table k holds the CRC of a byte followed by k zero bytes.
#include "core/crc32.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace offload {
namespace {

constexpr uint32_t kPoly = 0xEDB88320u;  // x^32 + x^26 + ... + 1, bits reflected
constexpr size_t kSlices = 16;
constexpr size_t kBlock = 64 << 10;  // bytes copied, then summed, at a time: stays in L2

using Tables = std::array<std::array<uint32_t, 256>, kSlices>;

Tables make_tables() {
  Tables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[0][b] = c;
  }
  for (uint32_t b = 0; b < 256; ++b)
    for (size_t k = 1; k < kSlices; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  return t;
}

const Tables& tables() {
  static const Tables t = make_tables();
  return t;
}

inline uint32_t load_le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// The inverted register over [p, p + n).
uint32_t update_raw(uint32_t c, const uint8_t* p, size_t n) {
  const Tables& t = tables();
  while (n >= kSlices) {
    const uint32_t a = load_le32(p) ^ c;
    const uint32_t b = load_le32(p + 4);
    const uint32_t d = load_le32(p + 8);
    const uint32_t e = load_le32(p + 12);
    c = t[15][a & 0xFF] ^ t[14][(a >> 8) & 0xFF] ^ t[13][(a >> 16) & 0xFF] ^ t[12][a >> 24] ^
        t[11][b & 0xFF] ^ t[10][(b >> 8) & 0xFF] ^ t[9][(b >> 16) & 0xFF] ^ t[8][b >> 24] ^
        t[7][d & 0xFF] ^ t[6][(d >> 8) & 0xFF] ^ t[5][(d >> 16) & 0xFF] ^ t[4][d >> 24] ^
        t[3][e & 0xFF] ^ t[2][(e >> 8) & 0xFF] ^ t[1][(e >> 16) & 0xFF] ^ t[0][e >> 24];
    p += kSlices;
    n -= kSlices;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return c;
}

#if defined(__x86_64__)
// Carry-less multiplication folding (Gopal et al., "Fast CRC Computation for Generic Polynomials
// Using PCLMULQDQ Instruction", Intel, 2009), in the bit-reflected domain zlib's CRC lives in. Four
// 128-bit lanes are folded forward 512 bits at a time, then into one lane, then 128 -> 64 -> 32
// bits, and a Barrett reduction gives the register. The constants are powers of x modulo the
// polynomial (x^(4*128+32), x^(4*128-32), x^(128+32), x^(128-32), x^64), then P(x) and
// floor(x^64 / P(x)), all bit-reflected. Takes n >= 64, a multiple of 16.
#define OFFLOAD_PCLMUL __attribute__((target("pclmul,sse4.1")))

OFFLOAD_PCLMUL inline __m128i load(const uint8_t* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); }

// x times x^(k's high power) plus x times x^(k's low power), plus next: x carried 128 bits on.
OFFLOAD_PCLMUL inline __m128i fold(__m128i x, __m128i k, __m128i next) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

OFFLOAD_PCLMUL uint32_t fold_pclmul(uint32_t c, const uint8_t* p, size_t n) {
  const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);
  const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);
  const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);
  const __m128i poly = _mm_set_epi64x(0x1f7011641, 0x1db710641);
  const __m128i low32 = _mm_set_epi32(0, ~0, 0, ~0);
  __m128i x1 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(c)));
  __m128i x2 = load(p + 16), x3 = load(p + 32), x4 = load(p + 48);
  p += 64;
  n -= 64;
  for (; n >= 64; p += 64, n -= 64) {
    x1 = fold(x1, k1k2, load(p));
    x2 = fold(x2, k1k2, load(p + 16));
    x3 = fold(x3, k1k2, load(p + 32));
    x4 = fold(x4, k1k2, load(p + 48));
  }
  x1 = fold(x1, k3k4, x2);
  x1 = fold(x1, k3k4, x3);
  x1 = fold(x1, k3k4, x4);
  for (; n >= 16; p += 16, n -= 16) x1 = fold(x1, k3k4, load(p));
  // 128 -> 64 bits: the low half times x^(128-32) onto the high half.
  __m128i x = _mm_xor_si128(_mm_srli_si128(x1, 8), _mm_clmulepi64_si128(x1, k3k4, 0x10));
  // 64 -> 32 bits.
  x = _mm_xor_si128(_mm_srli_si128(x, 4), _mm_clmulepi64_si128(_mm_and_si128(x, low32), k5, 0x00));
  // Barrett reduction to the 32-bit register.
  __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x, low32), poly, 0x10);
  t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), poly, 0x00);
  return static_cast<uint32_t>(_mm_extract_epi32(_mm_xor_si128(x, t), 1));
}

const bool kPclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif

// The register over [p, p + n): the folding code for the bulk where the CPU has it.
uint32_t update_fast(uint32_t c, const uint8_t* p, size_t n) {
#if defined(__x86_64__)
  if (kPclmul && n >= 64) {
    const size_t bulk = n & ~size_t{15};
    c = fold_pclmul(c, p, bulk);
    p += bulk;
    n -= bulk;
  }
#endif
  return update_raw(c, p, n);
}

}  // namespace

uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n) { return ~update_fast(~crc, p, n); }

uint32_t crc32_portable(uint32_t crc, const uint8_t* p, size_t n) { return ~update_raw(~crc, p, n); }

uint32_t copy_crc32(uint8_t* dst, const uint8_t* src, size_t n, uint32_t crc) {
  uint32_t c = ~crc;
  for (size_t at = 0; at < n; at += kBlock) {
    const size_t k = n - at < kBlock ? n - at : kBlock;
    std::memcpy(dst + at, src + at, k);
    c = update_fast(c, dst + at, k);  // the copy, hot in cache: the bytes that will be written
  }
  return ~c;
}

}  // namespace offload
