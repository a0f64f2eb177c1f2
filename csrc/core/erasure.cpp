// Systematic Reed-Solomon encode and decode (see erasure.h); the byte loops are gf_matmul's.
#include "core/erasure.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "core/gf256.h"

namespace offload {

namespace {

void check_shape(int k, int m) {
  if (k < 1) throw std::invalid_argument("erasure code: k must be >= 1; got " + std::to_string(k));
  if (m < 1) throw std::invalid_argument("erasure code: m must be >= 1; got " + std::to_string(m));
  if (k + m > kMaxEcChunks)
    throw std::invalid_argument("erasure code: k + m must be <= " + std::to_string(kMaxEcChunks) + "; got " +
                                std::to_string(k) + " + " + std::to_string(m));
}

}  // namespace

std::vector<uint8_t> ec_parity_matrix(int k, int m) {
  check_shape(k, m);
  std::vector<uint8_t> p(static_cast<size_t>(m) * k);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < k; ++j) {
      // 1 / ((k + i) ^ j), divided by row 0's 1 / (k ^ j).
      const uint8_t cauchy = gf256::inv(static_cast<uint8_t>((k + i) ^ j));
      p[static_cast<size_t>(i) * k + j] = gf256::mul(cauchy, static_cast<uint8_t>(k ^ j));
    }
  }
  return p;
}

void ec_encode(const uint8_t* const* data, int k, uint8_t* const* parity, int m, size_t len, Isa isa, int threads) {
  const std::vector<uint8_t> p = ec_parity_matrix(k, m);
  gf_matmul(p.data(), k, m, data, parity, len, isa, threads);
}

void ec_decode(const uint8_t* const* chunks, int k, int m, uint8_t* const* data_out, size_t len, Isa isa, int threads) {
  const std::vector<uint8_t> p = ec_parity_matrix(k, m);
  std::vector<int> lost_data;
  std::vector<int> survivors;
  int lost = 0;
  for (int c = 0; c < k + m; ++c) {
    if (chunks[c] == nullptr) {
      ++lost;
      if (c < k) lost_data.push_back(c);
    } else if (static_cast<int>(survivors.size()) < k) {
      survivors.push_back(c);  // data first, then parity in order: as many identity rows as possible
    }
  }
  if (lost > m)
    throw std::invalid_argument("erasure code: " + std::to_string(lost) + " chunks lost; m = " + std::to_string(m) +
                                " parity chunks restore at most " + std::to_string(m));
  if (lost_data.empty()) return;
  for (int t : lost_data)
    if (data_out[t] == nullptr) throw std::invalid_argument("erasure code: no output buffer for lost data chunk");

  // Row r of `b` says how survivor r was made from the data: a unit row for a data chunk, a row of
  // P for a parity chunk. Its inverse makes the data from the survivors.
  std::vector<uint8_t> b(static_cast<size_t>(k) * k, 0);
  for (int r = 0; r < k; ++r) {
    uint8_t* row = b.data() + static_cast<size_t>(r) * k;
    const int s = survivors[r];
    if (s < k)
      row[s] = 1;
    else
      std::copy(p.begin() + static_cast<ptrdiff_t>(s - k) * k, p.begin() + static_cast<ptrdiff_t>(s - k + 1) * k, row);
  }
  if (!gf256::invert(b.data(), k)) throw std::logic_error("erasure code: singular decode matrix (a bug)");

  std::vector<uint8_t> rows;
  std::vector<uint8_t*> out;
  std::vector<const uint8_t*> in;
  for (int t : lost_data) {
    rows.insert(rows.end(), b.begin() + static_cast<ptrdiff_t>(t) * k, b.begin() + static_cast<ptrdiff_t>(t + 1) * k);
    out.push_back(data_out[t]);
  }
  for (int s : survivors) in.push_back(chunks[s]);
  gf_matmul(rows.data(), k, static_cast<int>(lost_data.size()), in.data(), out.data(), len, isa, threads);
}

}  // namespace offload
