// Arithmetic in GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), the field of the
// erasure codec (erasure.h). Addition is XOR; multiplication goes through log/exp tables built
// once per process. Also the two per-constant forms the SIMD kernels multiply with: split-nibble
// tables (for vpshufb) and an 8x8 bit matrix (for GFNI's vgf2p8affineqb).
#pragma once

#include <cstdint>

namespace offload::gf256 {

constexpr unsigned kPolynomial = 0x11d;

// Every product, the log/exp tables and every inverse; built on first use (thread-safe).
struct Tables {
  uint8_t exp[510];  // exp[i] = 2^i, doubled so exp[log a + log b] needs no modulo
  uint8_t log[256];  // log[0] is unused
  uint8_t inv[256];  // inv[0] is unused
  uint8_t mul[256][256];
};

const Tables& tables();

inline uint8_t mul(uint8_t a, uint8_t b) { return tables().mul[a][b]; }

// Throws std::domain_error for 0.
uint8_t inv(uint8_t a);

// Inverts the n x n row-major matrix a in place (Gauss-Jordan). Returns false, leaving a in an
// unspecified state, when a is singular.
bool invert(uint8_t* a, int n);

// out[0..16) = c * i and out[16..32) = c * (i << 4) for i in 0..15: c * x is the XOR of the entry
// for x's low nibble and the entry for its high nibble.
void nibble_tables(uint8_t c, uint8_t out[32]);

// The 8x8 bit matrix of x -> c * x in vgf2p8affineqb's layout: byte 7 - i holds the row that
// computes bit i of the product.
uint64_t affine_matrix(uint8_t c);

}  // namespace offload::gf256
