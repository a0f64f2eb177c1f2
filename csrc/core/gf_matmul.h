// The one loop behind erasure encoding and decoding: a small GF(2^8) coefficient matrix times a
// set of equal-length byte buffers, out[r] = sum_j c[r][j] * in[j] (sum is XOR).
//
// Four variants, picked per call: a scalar one (a 256-byte product row per coefficient), AVX2 and
// AVX-512BW ones (split-nibble tables and vpshufb: 2 shuffles per byte vector and coefficient),
// and AVX-512 + GFNI (one vgf2p8affineqb per byte vector and coefficient, with the 8x8 bit matrix
// of the multiplication; GFNI's vgf2p8mulb multiplies in the AES field 0x11b, not ours). Each is
// compiled with a function-level target attribute, so the build flags stay generic, and the CPU is
// asked at run time which it can run. A matrix of one all-ones row (XOR parity) takes an XOR loop.
//
// Memory: every output row that fits in the variant's registers is accumulated in one pass over
// the inputs (ISA-L's scheme). With more rows than that, the buffers are walked in stripes small
// enough that the inputs of a stripe stay in L2 while each group of rows reads them, so main memory
// still sees each input once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace offload {

enum class Isa { Auto, Scalar, Avx2, Avx512, Gfni };

struct IsaSupport {
  Isa isa;
  const char* name;  // scalar, avx2, avx512, gfni
  bool available;    // this CPU (and this build) can run it
};

// Every variant, best first.
const std::vector<IsaSupport>& isa_support();

// "" or "auto" -> Auto; otherwise a variant's name. Throws std::invalid_argument for other names.
Isa parse_isa(const std::string& name);

// Auto becomes the variant named by OFFLOAD_EC_ISA if set, else the best available one. Throws
// std::invalid_argument when the variant is unknown or this CPU cannot run it.
Isa resolve_isa(Isa isa);

const char* isa_name(Isa isa);

// out[r][i] = XOR over j of coeffs[r * n_in + j] * in[j][i], for r < n_out and i < len. No output
// may overlap an input or another output. threads <= 1 runs on the calling thread; otherwise len is
// split into 64-byte aligned ranges, one std::thread each, joined before returning.
void gf_matmul(const uint8_t* coeffs, int n_in, int n_out, const uint8_t* const* in, uint8_t* const* out, size_t len,
               Isa isa, int threads);

}  // namespace offload
