// Slicing-by-16: sixteen 256-entry tables turn 16 input bytes into one table lookup each, so
// the loop carries no byte-serial dependency (about 4-6 GB/s a core, near zlib's braided code).
// Table k holds the CRC of a byte followed by k zero bytes.
#include "core/crc32.h"

#include <array>
#include <cstring>

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

}  // namespace

uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n) { return ~update_raw(~crc, p, n); }

uint32_t copy_crc32(uint8_t* dst, const uint8_t* src, size_t n, uint32_t crc) {
  uint32_t c = ~crc;
  for (size_t at = 0; at < n; at += kBlock) {
    const size_t k = n - at < kBlock ? n - at : kBlock;
    std::memcpy(dst + at, src + at, k);
    c = update_raw(c, dst + at, k);  // the copy, hot in cache: the bytes that will be written
  }
  return ~c;
}

}  // namespace offload
