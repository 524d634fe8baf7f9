// Counter-based dropout for the CPU kernels: Philox4x32-10, keyed by the seed.
//
// Keys are grouped four to a counter: for query row r = (b * H + h) * Sq + i and key
// column j, the counter is (row-major index of (r, j / 4), dropout_offset) and lane j % 4
// of the output decides. The same (seed, offset) gives the same mask in the forward, the
// backward and flashattn::dropout_mask (the test hook), on any thread count.
#pragma once
#include <cstdint>

#ifdef FLASHATTN_VEC_AVX2
#include <immintrin.h>
#endif

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

#ifdef FLASHATTN_VEC_AVX2
// Philox4x32-10 of the 8 counters (ctr + 0 .. ctr + 7, offset), one per 32-bit lane,
// words in `out[4]` (word w of counter i in lane i): Philox::generate's arithmetic, the
// 32 x 32 -> 64-bit products of the even lanes and of the odd ones recombined.
inline void philox8(uint64_t seed, uint64_t ctr, uint64_t offset, __m256i out[4]) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int i = 0; i < 8; ++i) lo[i] = uint32_t(ctr + i), hi[i] = uint32_t((ctr + i) >> 32);
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(uint32_t(offset)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(uint32_t(offset >> 32)));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  constexpr int ODD = 0b10101010;
  for (int r = 0; r < 10; ++r) {
    const __m256i p0e = _mm256_mul_epu32(c0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
    const __m256i p1e = _mm256_mul_epu32(c2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, ODD);
    const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), ODD);
    const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, ODD);
    const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), ODD);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += 0x9E3779B9u;  // (a tenth increment is never used)
    k1 += 0xBB67AE85u;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}
#endif

#ifdef __AVX512F__
// philox8 in 16 lanes (the AVX-512 libraries).
inline void philox16(uint64_t seed, uint64_t ctr, uint64_t offset, __m512i out[4]) {
  alignas(64) uint32_t lo[16], hi[16];
  for (int i = 0; i < 16; ++i) lo[i] = uint32_t(ctr + i), hi[i] = uint32_t((ctr + i) >> 32);
  __m512i c0 = _mm512_load_si512(lo), c1 = _mm512_load_si512(hi);
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(uint32_t(offset)));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(uint32_t(offset >> 32)));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  constexpr __mmask16 ODD = 0xAAAA;
  for (int r = 0; r < 10; ++r) {
    const __m512i p0e = _mm512_mul_epu32(c0, m0), p0o = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
    const __m512i p1e = _mm512_mul_epu32(c2, m1), p1o = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
    const __m512i hi0 = _mm512_mask_blend_epi32(ODD, _mm512_srli_epi64(p0e, 32), p0o);
    const __m512i lo0 = _mm512_mask_blend_epi32(ODD, p0e, _mm512_slli_epi64(p0o, 32));
    const __m512i hi1 = _mm512_mask_blend_epi32(ODD, _mm512_srli_epi64(p1e, 32), p1o);
    const __m512i lo1 = _mm512_mask_blend_epi32(ODD, p1e, _mm512_slli_epi64(p1o, 32));
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}
#endif

// keep[c] for keys j0 .. j0+n-1 of query row `row` = (b * H + h) * Sq + i. Where the
// library has AVX2, 32 keys (8 counters) at a time through philox8 (64 through philox16
// with AVX-512), bitwise the same draws.
inline void dropout_keep_row(uint64_t seed, uint64_t offset, float p, int64_t seqlen_k, int64_t row, int64_t j0,
                             int64_t n, bool* keep) {
  const int64_t groups_per_row = (seqlen_k + 3) / 4;
  // Keep iff the 32-bit draw >= p * 2^32.
  const uint64_t threshold = static_cast<uint64_t>(static_cast<double>(p) * 4294967296.0);
  const uint64_t first = static_cast<uint64_t>(row * groups_per_row);
  uint32_t draw[4];
  int64_t group = -1;
  auto scalar = [&](int64_t c) {
    const int64_t j = j0 + c;
    if (j / 4 != group) {
      group = j / 4;
      Philox::generate(seed, first + static_cast<uint64_t>(group), offset, draw);
    }
    keep[c] = draw[j % 4] >= threshold;
  };
  int64_t c = 0;
#ifdef FLASHATTN_VEC_AVX2
  for (; c < n && (j0 + c) % 4 != 0; ++c) scalar(c);  // up to the first whole group
  if (threshold < 4294967296u) {  // (p < 1: the threshold fits the lanes' unsigned compare)
#ifdef __AVX512F__
    const __m512i t16 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(threshold)));
    for (; c + 64 <= n; c += 64) {
      __m512i words[4], kept[4];
      philox16(seed, first + static_cast<uint64_t>((j0 + c) / 4), offset, words);
      for (int w = 0; w < 4; ++w) kept[w] = _mm512_maskz_set1_epi32(_mm512_cmpge_epu32_mask(words[w], t16), -1);
      // (as below, each 128-bit lane holding 4 groups: bytes in key order)
      const __m512i a = _mm512_unpacklo_epi32(kept[0], kept[1]), b = _mm512_unpackhi_epi32(kept[0], kept[1]);
      const __m512i e = _mm512_unpacklo_epi32(kept[2], kept[3]), f = _mm512_unpackhi_epi32(kept[2], kept[3]);
      const __m512i g01 = _mm512_packs_epi32(_mm512_unpacklo_epi64(a, e), _mm512_unpackhi_epi64(a, e));
      const __m512i g23 = _mm512_packs_epi32(_mm512_unpacklo_epi64(b, f), _mm512_unpackhi_epi64(b, f));
      _mm512_storeu_si512(keep + c, _mm512_and_si512(_mm512_packs_epi16(g01, g23), _mm512_set1_epi8(1)));
    }
#endif
    const __m256i t = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(threshold)));
    for (; c + 32 <= n; c += 32) {
      __m256i words[4];
      philox8(seed, first + static_cast<uint64_t>((j0 + c) / 4), offset, words);
      __m256i kept[4];  // lane g of word w: key 4 g + w kept (all ones), or not (0)
      for (int w = 0; w < 4; ++w) {  // draw >= t, unsigned: max(draw, t) == draw
        kept[w] = _mm256_cmpeq_epi32(_mm256_max_epu32(words[w], t), words[w]);
      }
      // To key order (4 x 4 transposes in each 128-bit half: rows g, g + 4 of the groups
      // 0 .. 3 and 4 .. 7), then narrowed to bytes (saturating packs keep all ones) of 1 / 0.
      const __m256i a = _mm256_unpacklo_epi32(kept[0], kept[1]), b = _mm256_unpackhi_epi32(kept[0], kept[1]);
      const __m256i e = _mm256_unpacklo_epi32(kept[2], kept[3]), f = _mm256_unpackhi_epi32(kept[2], kept[3]);
      const __m256i g01 = _mm256_packs_epi32(_mm256_unpacklo_epi64(a, e), _mm256_unpackhi_epi64(a, e));
      const __m256i g23 = _mm256_packs_epi32(_mm256_unpacklo_epi64(b, f), _mm256_unpackhi_epi64(b, f));
      const __m256i bytes = _mm256_and_si256(_mm256_packs_epi16(g01, g23), _mm256_set1_epi8(1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + c), bytes);
    }
  }
#endif
  for (; c < n; ++c) scalar(c);
}

}  // namespace flashattn::cpu
