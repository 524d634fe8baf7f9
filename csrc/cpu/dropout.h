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
// The integer vector operations philox_lanes and keep_bytes take, in AVX2's 8 lanes and
// (the AVX-512 libraries) 16.
struct Lanes8 {
  using V = __m256i;
  static constexpr int N = 8;
  static V load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const V*>(p)); }
  static V set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static V mul_even(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V shr32(V a) { return _mm256_srli_epi64(a, 32); }
  static V shl32(V a) { return _mm256_slli_epi64(a, 32); }
  static V odd_from(V a, V b) { return _mm256_blend_epi32(a, b, 0b10101010); }  // a's even lanes, b's odd
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static V at_least(V x, V t) { return _mm256_cmpeq_epi32(_mm256_max_epu32(x, t), x); }  // unsigned x >= t
  static V unpacklo32(V a, V b) { return _mm256_unpacklo_epi32(a, b); }
  static V unpackhi32(V a, V b) { return _mm256_unpackhi_epi32(a, b); }
  static V unpacklo64(V a, V b) { return _mm256_unpacklo_epi64(a, b); }
  static V unpackhi64(V a, V b) { return _mm256_unpackhi_epi64(a, b); }
  static V packs32(V a, V b) { return _mm256_packs_epi32(a, b); }
  static void store_bits(bool* p, V a, V b) {  // bytes of 1 / 0 (saturating packs keep all ones)
    _mm256_storeu_si256(reinterpret_cast<V*>(p), _mm256_and_si256(_mm256_packs_epi16(a, b), _mm256_set1_epi8(1)));
  }
};

#ifdef __AVX512F__
struct Lanes16 {
  using V = __m512i;
  static constexpr int N = 16;
  static V load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static V set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static V mul_even(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V shr32(V a) { return _mm512_srli_epi64(a, 32); }
  static V shl32(V a) { return _mm512_slli_epi64(a, 32); }
  static V odd_from(V a, V b) { return _mm512_mask_blend_epi32(0xAAAA, a, b); }
  static V xor3(V a, V b, V c) { return _mm512_xor_si512(_mm512_xor_si512(a, b), c); }
  static V at_least(V x, V t) { return _mm512_maskz_set1_epi32(_mm512_cmpge_epu32_mask(x, t), -1); }
  static V unpacklo32(V a, V b) { return _mm512_unpacklo_epi32(a, b); }
  static V unpackhi32(V a, V b) { return _mm512_unpackhi_epi32(a, b); }
  static V unpacklo64(V a, V b) { return _mm512_unpacklo_epi64(a, b); }
  static V unpackhi64(V a, V b) { return _mm512_unpackhi_epi64(a, b); }
  static V packs32(V a, V b) { return _mm512_packs_epi32(a, b); }
  static void store_bits(bool* p, V a, V b) {
    _mm512_storeu_si512(p, _mm512_and_si512(_mm512_packs_epi16(a, b), _mm512_set1_epi8(1)));
  }
};
#endif

// Philox4x32-10 of the L::N counters ctr + 0 .. ctr + N - 1 (and offset), one per 32-bit
// lane, words in `out[4]` (word w of counter i in lane i): Philox::generate's arithmetic,
// the 32 x 32 -> 64-bit products of the even lanes and of the odd ones recombined.
template <typename L>
inline void philox_lanes(uint64_t seed, uint64_t ctr, uint64_t offset, typename L::V out[4]) {
  using V = typename L::V;
  uint32_t lo[L::N], hi[L::N];
  for (int i = 0; i < L::N; ++i) lo[i] = uint32_t(ctr + i), hi[i] = uint32_t((ctr + i) >> 32);
  V c0 = L::load(lo), c1 = L::load(hi), c2 = L::set1(uint32_t(offset)), c3 = L::set1(uint32_t(offset >> 32));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  const V m0 = L::set1(0xD2511F53u), m1 = L::set1(0xCD9E8D57u);
  for (int r = 0; r < 10; ++r) {
    const V p0e = L::mul_even(c0, m0), p0o = L::mul_even(L::shr32(c0), m0);
    const V p1e = L::mul_even(c2, m1), p1o = L::mul_even(L::shr32(c2), m1);
    const V hi0 = L::odd_from(L::shr32(p0e), p0o), lo0 = L::odd_from(p0e, L::shl32(p0o));
    const V hi1 = L::odd_from(L::shr32(p1e), p1o), lo1 = L::odd_from(p1e, L::shl32(p1o));
    c0 = L::xor3(hi1, c1, L::set1(k0)), c1 = lo1, c2 = L::xor3(hi0, c3, L::set1(k1)), c3 = lo0;
    k0 += 0x9E3779B9u;  // (a tenth increment is never used)
    k1 += 0xBB67AE85u;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// keep[0, 4 N): the draws `words` (philox_lanes') against the threshold t, in key order:
// lane g of word w is key 4 g + w; 4 x 4 transposes in each 128-bit lane (its 4 groups),
// then narrowed to bytes.
template <typename L>
inline void keep_bytes(const typename L::V words[4], typename L::V t, bool* keep) {
  using V = typename L::V;
  V kept[4];
  for (int w = 0; w < 4; ++w) kept[w] = L::at_least(words[w], t);
  const V a = L::unpacklo32(kept[0], kept[1]), b = L::unpackhi32(kept[0], kept[1]);
  const V e = L::unpacklo32(kept[2], kept[3]), f = L::unpackhi32(kept[2], kept[3]);
  L::store_bits(keep, L::packs32(L::unpacklo64(a, e), L::unpackhi64(a, e)),
                L::packs32(L::unpacklo64(b, f), L::unpackhi64(b, f)));
}

// Keys [c, n) of a row, 4 N at a time while whole chunks remain (c at a group's start);
// returns where it stopped.
template <typename L>
inline int64_t keep_chunks(uint64_t seed, uint64_t offset, uint64_t first, uint32_t threshold, int64_t j0,
                           int64_t c, int64_t n, bool* keep) {
  const typename L::V t = L::set1(threshold);
  for (; c + 4 * L::N <= n; c += 4 * L::N) {
    typename L::V words[4];
    philox_lanes<L>(seed, first + static_cast<uint64_t>((j0 + c) / 4), offset, words);
    keep_bytes<L>(words, t, keep + c);
  }
  return c;
}
#endif

// keep[c] for keys j0 .. j0+n-1 of query row `row` = (b * H + h) * Sq + i. Where the
// library has AVX2, 32 keys (8 counters) at a time through philox_lanes (64 with
// AVX-512), bitwise the same draws.
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
    c = keep_chunks<Lanes16>(seed, offset, first, static_cast<uint32_t>(threshold), j0, c, n, keep);
#endif
    c = keep_chunks<Lanes8>(seed, offset, first, static_cast<uint32_t>(threshold), j0, c, n, keep);
  }
#endif
  for (; c < n; ++c) scalar(c);
}

}  // namespace flashattn::cpu
