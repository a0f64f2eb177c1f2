// GF(2^8) tables and Gauss-Jordan inversion (see gf256.h).
#include "core/gf256.h"

#include <memory>
#include <stdexcept>
#include <utility>

namespace offload::gf256 {

namespace {

Tables build_tables() {
  Tables t{};
  // 2 generates the multiplicative group of GF(2^8) modulo 0x11d, so its powers visit every
  // non-zero element once.
  unsigned x = 1;
  for (int i = 0; i < 255; ++i) {
    t.exp[i] = static_cast<uint8_t>(x);
    t.exp[i + 255] = static_cast<uint8_t>(x);
    t.log[x] = static_cast<uint8_t>(i);
    x <<= 1;
    if (x & 0x100) x ^= kPolynomial;
  }
  for (int a = 1; a < 256; ++a) {
    t.inv[a] = t.exp[255 - t.log[a]];
    for (int b = 1; b < 256; ++b) t.mul[a][b] = t.exp[t.log[a] + t.log[b]];
  }
  return t;
}

}  // namespace

const Tables& tables() {
  static const Tables t = build_tables();
  return t;
}

uint8_t inv(uint8_t a) {
  if (a == 0) throw std::domain_error("gf256: 0 has no inverse");
  return tables().inv[a];
}

bool invert(uint8_t* a, int n) {
  const Tables& t = tables();
  // Start from the identity in `b` and apply to it every row operation that turns `a` into the
  // identity; `b` then holds the inverse.
  auto b = std::make_unique<uint8_t[]>(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i) b[static_cast<size_t>(i) * n + i] = 1;
  auto row_a = [&](int r) { return a + static_cast<size_t>(r) * n; };
  auto row_b = [&](int r) { return b.get() + static_cast<size_t>(r) * n; };
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    while (pivot < n && row_a(pivot)[col] == 0) ++pivot;
    if (pivot == n) return false;
    if (pivot != col) {
      for (int j = 0; j < n; ++j) {
        std::swap(row_a(pivot)[j], row_a(col)[j]);
        std::swap(row_b(pivot)[j], row_b(col)[j]);
      }
    }
    const uint8_t* scale = t.mul[t.inv[row_a(col)[col]]];
    for (int j = 0; j < n; ++j) {
      row_a(col)[j] = scale[row_a(col)[j]];
      row_b(col)[j] = scale[row_b(col)[j]];
    }
    for (int r = 0; r < n; ++r) {
      const uint8_t f = row_a(r)[col];
      if (r == col || f == 0) continue;
      const uint8_t* by = t.mul[f];
      for (int j = 0; j < n; ++j) {
        row_a(r)[j] ^= by[row_a(col)[j]];
        row_b(r)[j] ^= by[row_b(col)[j]];
      }
    }
  }
  for (size_t i = 0; i < static_cast<size_t>(n) * n; ++i) a[i] = b[i];
  return true;
}

void nibble_tables(uint8_t c, uint8_t out[32]) {
  const uint8_t* by = tables().mul[c];
  for (int i = 0; i < 16; ++i) {
    out[i] = by[i];
    out[16 + i] = by[i << 4];
  }
}

uint64_t affine_matrix(uint8_t c) {
  // Multiplication by c is linear over GF(2): bit i of c * x is the parity of x AND row_i, where
  // bit j of row_i is bit i of c * 2^j.
  const uint8_t* by = tables().mul[c];
  uint64_t m = 0;
  for (int i = 0; i < 8; ++i) {
    uint64_t row = 0;
    for (int j = 0; j < 8; ++j) row |= static_cast<uint64_t>((by[1u << j] >> i) & 1u) << j;
    m |= row << (8 * (7 - i));
  }
  return m;
}

}  // namespace offload::gf256
