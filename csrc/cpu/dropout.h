// Counter-based dropout for the CPU kernels: Philox4x32-10, keyed by the seed.
//
// Keys are grouped four to a counter: for query row r = (b * H + h) * Sq + i and key
// column j, the counter is (row-major index of (r, j / 4), dropout_offset) and lane j % 4
// of the output decides. The same (seed, offset) gives the same mask in the forward, the
// backward and flashattn::dropout_mask (the test hook), on any thread count.
#pragma once
#include <cstdint>

namespace flashattn::cpu {

struct Philox {
  static inline void round(uint32_t c[4], const uint32_t k[2]) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k[0], n2 = hi0 ^ c[3] ^ k[1];
    c[0] = n0, c[1] = lo1, c[2] = n2, c[3] = lo0;
  }
  // Philox4x32-10 of counter (ctr, offset) under key seed.
  static inline void generate(uint64_t seed, uint64_t ctr, uint64_t offset, uint32_t out[4]) {
    uint32_t c[4] = {uint32_t(ctr), uint32_t(ctr >> 32), uint32_t(offset), uint32_t(offset >> 32)};
    uint32_t k[2] = {uint32_t(seed), uint32_t(seed >> 32)};
    for (int r = 0; r < 10; ++r) {
      round(c, k);
      if (r < 9) {
        k[0] += 0x9E3779B9u;
        k[1] += 0xBB67AE85u;
      }
    }
    out[0] = c[0], out[1] = c[1], out[2] = c[2], out[3] = c[3];
  }
};

// keep[c] for keys j0 .. j0+n-1 of query row `row` = (b * H + h) * Sq + i.
inline void dropout_keep_row(uint64_t seed, uint64_t offset, float p, int64_t seqlen_k, int64_t row, int64_t j0,
                             int64_t n, bool* keep) {
  const int64_t groups_per_row = (seqlen_k + 3) / 4;
  // Keep iff the 32-bit draw >= p * 2^32.
  const uint64_t threshold = static_cast<uint64_t>(static_cast<double>(p) * 4294967296.0);
  uint32_t draw[4];
  int64_t group = -1;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = j0 + c;
    if (j / 4 != group) {
      group = j / 4;
      Philox::generate(seed, static_cast<uint64_t>(row * groups_per_row + group), offset, draw);
    }
    keep[c] = draw[j % 4] >= threshold;
  }
}

}  // namespace flashattn::cpu
