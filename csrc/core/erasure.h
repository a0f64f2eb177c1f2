// Reed-Solomon erasure coding over GF(2^8) for in-memory snapshots (issue 8): k data chunks and m
// parity chunks of equal length, any k of the k + m restore the data.
//
// The code is systematic: the data chunks are stored as they are, and parity chunk i is
// sum_j P[i][j] * data_j. P is a Cauchy matrix, P[i][j] = 1 / (x_i + y_j) with x_i = k + i and
// y_j = j (ISA-L's gf_gen_cauchy1_matrix), with each column scaled so that row 0 is all ones. Every
// square submatrix of a Cauchy matrix is invertible, scaling columns keeps it so, and that makes
// every k x k submatrix of [I; P] invertible: any k survivors determine the data. Row 0 of ones
// makes the first parity chunk the XOR of the data (RAID-5 parity); with m = 1 encoding is XOR.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/gf_matmul.h"

namespace offload {

// k + m is at most 256: the Cauchy construction needs k + m distinct field elements.
constexpr int kMaxEcChunks = 256;

// The m x k parity matrix P, row-major. Throws std::invalid_argument for k < 1, m < 1 or
// k + m > kMaxEcChunks.
std::vector<uint8_t> ec_parity_matrix(int k, int m);

// parity[i] = sum_j P[i][j] * data[j] over len bytes, for i < m. isa and threads as in gf_matmul.
void ec_encode(const uint8_t* const* data, int k, uint8_t* const* parity, int m, size_t len, Isa isa, int threads);

// chunks: k + m pointers, data then parity, null for each lost chunk. Writes each lost data chunk
// t to data_out[t] (which must then be non-null; the others are not read). Lost parity chunks are
// not rebuilt. Throws std::invalid_argument when more than m chunks are lost.
void ec_decode(const uint8_t* const* chunks, int k, int m, uint8_t* const* data_out, size_t len, Isa isa, int threads);

}  // namespace offload
