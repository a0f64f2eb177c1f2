// CRC-32 as zlib computes it (IEEE 802.3 polynomial, reflected, pre- and post-inverted), and a
// copy that sums the bytes it copies. On x86-64 with PCLMULQDQ the bulk is folded with carry-less
// multiplies (about 10 GB/s a core, 3x zlib); elsewhere, and for tails, slicing-by-16 tables.
//
// The checkpoint writer copies each record into its staging ring and then summed the staged
// bytes on other threads: a second read of every byte from memory, once the 64 MiB chunk had
// left the caches. copy_crc32 copies a block that fits in L1/L2, then sums the copy while it is
// still there, so each byte crosses the memory bus once each way, with no Python in between.
#pragma once

#include <cstddef>
#include <cstdint>

namespace offload {

// zlib.crc32(data, crc): crc of the bytes before (0 for none), continued over [p, p + n).
uint32_t crc32_update(uint32_t crc, const uint8_t* p, size_t n);

// The same from the portable table code alone (what crc32_update runs where the CPU lacks PCLMUL).
uint32_t crc32_portable(uint32_t crc, const uint8_t* p, size_t n);

// memcpy(dst, src, n), and crc32_update(crc, src, n) of the bytes copied. dst and src must not
// overlap.
uint32_t copy_crc32(uint8_t* dst, const uint8_t* src, size_t n, uint32_t crc);

}  // namespace offload
