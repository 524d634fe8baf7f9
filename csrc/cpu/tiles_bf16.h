// AVX512-BF16 register tiles for the products of bf16 inputs (forward and backward).
//
// vdpbf16ps multiplies pairs of bf16 values and adds both products into a float lane: 16
// lanes, 64 flops per instruction, twice the fp32 FMA rate on CPUs that have it (as
// measured on Zen 4: benchmarks/RESULTS.md). The products of two bf16 values are exact in
// float and are summed in float, so S = Q K^T is as accurate as the fp32 tiles' on widened
// inputs (another summation order). P is rounded to bf16 for P V, as flash-attn's GPU
// kernels and torch's CPU flash kernel do for 16-bit inputs; the row sums l use the float
// P. Operands are packed as pairs of bf16 along the reduced dimension, one 32-bit word
// per pair (low half the even element):
//   Q  (pack_q):  row groups of tiles::MR rows, pair e of row r at [e * MR + r]
//   K  (pack_k):  panels of 16 keys, pair e of key c at [e * 16 + c]
//   V  (pack_v):  panels of 16 columns, keys 2i and 2i+1 of column c at [i * 16 + c]
//   P  (to_pairs): rows of key pairs; P^T, dS^T (to_row_pairs): pairs of query rows
// A head dim or key count that is odd gets a zero partner. A tile is up to MR rows x 32
// columns in 12 accumulators.
#pragma once

#include <cstring>

#include "tiles.h"

#if defined(FLASHATTN_CPU_TILES) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FLASHATTN_CPU_BF16_DOT 1

namespace flashattn::cpu::tiles_bf16 {

using tiles::MR;
constexpr int64_t NR = 16;  // keys per K panel, columns per V panel: one vector of floats

// False when FLASHATTN_CPU_BF16_DOT=0 sends bf16 to the fp32 tiles (switches.h).
inline bool enabled() { return switches().bf16_dot; }

inline int64_t pairs(int64_t n) { return (n + 1) / 2; }

inline uint32_t bits(const c10::BFloat16* x, int64_t i) { return x[i].x; }

// Elements e and e + 1 of row x (d elements) as one pair; past d is 0.
inline uint32_t pair(const c10::BFloat16* x, int64_t e, int64_t d) {
  return bits(x, e) | (e + 1 < d ? bits(x, e + 1) << 16 : 0u);
}

// out[0, 16) = pairs (x_c, y_c) of two vectors of 16 bf16: the pairs of two rows.
inline void store_pairs(uint32_t* out, __m256i x, __m256i y) {
  const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);  // per 128-bit lane
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// Pairs e .. e + 7 of row x (elements 2e .. 2e + 15) as 8 words, in a float register
// for tiles::transpose8.
inline __m256 load_pairs8(const c10::BFloat16* x, int64_t e) {
  return _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 2 * e)));
}

// The packers move whole pairs in 8 x 8 word blocks through tiles::transpose8, as
// tiles.h's do (a last panel's missing keys as zero rows), and the rest (an odd d's last
// pair) pair by pair (faster than pair by pair throughout: benchmarks/RESULTS.md 'What was
// tried').
// Q rows [0, rows) (row stride ld, d columns), unscaled: the layout above; rows past
// `rows` in the last group are zero.
inline void pack_q(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t d, uint32_t* dst) {
  const int64_t d2 = pairs(d), whole = d / 2;  // pairs, pairs with both elements in the row
  for (int64_t g0 = 0; g0 < rows; g0 += MR) {
    uint32_t* group = dst + g0 * d2;
    const int64_t n = std::min(MR, rows - g0);
    int64_t e0 = 0;
    for (; e0 + 8 <= whole; e0 += 8) {
      tiles::prefetch_rows_ahead(src, ld, g0, MR, rows, 2 * e0);
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = i < n ? load_pairs8(src + (g0 + i) * ld, e0) : _mm256_setzero_ps();
      tiles::transpose8(r);
      for (int64_t i = 0; i < 8; ++i) {  // pair e0 + i of the MR rows (as float lanes)
        tiles::store_group_column(reinterpret_cast<float*>(group + (e0 + i) * MR), r[i]);
      }
    }
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t e = e0; e < d2; ++e) group[e * MR + r] = r < n ? pair(src + (g0 + r) * ld, 2 * e, d) : 0u;
    }
  }
}

// K rows [0, n) as panels of 16 keys (key 16p + c, pair e at dst[p * 16 * d2 + e * 16 + c]);
// keys past n in the last panel are zero.
inline void pack_k(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t d, uint32_t* dst) {
  const int64_t d2 = pairs(d), whole = d / 2;
  for (int64_t p0 = 0; p0 < n; p0 += NR) {
    uint32_t* panel = dst + p0 * d2;
    const int64_t keys = std::min(NR, n - p0);
    int64_t e0 = 0;
    // (the last panel's missing keys as zero rows, in a copy of the loop of its own, as
    // tiles::pack_k)
    auto whole_blocks = [&](auto partial) {
      for (; e0 + 8 <= whole; e0 += 8) {
        tiles::prefetch_rows_ahead(src, ld, p0, NR, n, 2 * e0);
        for (int64_t half = 0; half < NR; half += 8) {  // keys p0 + half + (0..7)
          __m256 r[8];
          for (int64_t i = 0; i < 8; ++i) {
            r[i] = !partial || half + i < keys ? load_pairs8(src + (p0 + half + i) * ld, e0) : _mm256_setzero_ps();
          }
          tiles::transpose8(r);
          for (int64_t i = 0; i < 8; ++i) {
            _mm256_storeu_ps(reinterpret_cast<float*>(panel + (e0 + i) * NR + half), r[i]);
          }
        }
      }
    };
    if (keys == NR) {
      whole_blocks(std::false_type{});
    } else {
      whole_blocks(std::true_type{});
    }
    for (int64_t c = 0; c < NR; ++c) {
      for (int64_t e = e0; e < d2; ++e) panel[e * NR + c] = c < keys ? pair(src + (p0 + c) * ld, 2 * e, d) : 0u;
    }
  }
}

// V rows [0, n) (n even or the last key's partner zero) as panels of 16 columns, `panel_stride`
// words apart: keys 2i, 2i + 1 of column 16j + c at dst[j * panel_stride + i * 16 + c].
// Columns past dv are zero. Returns whether every element is finite (the forward's P - bf16(P)
// product would turn an infinite V into NaN: 0 x inf; flash_fwd.cpp Bf16PairOperands).
inline bool pack_v(const c10::BFloat16* src, int64_t ld, int64_t n, int64_t dv, uint32_t* dst, int64_t panel_stride) {
  const __m256i exponent = _mm256_set1_epi16(0x7f80);  // all ones in an inf or NaN
  __m256i nonfinite = _mm256_setzero_si256();
  bool tail_finite = true;
  for (int64_t i = 0; 2 * i < n; ++i) {
    const c10::BFloat16* a = src + 2 * i * ld;
    const c10::BFloat16* b = 2 * i + 1 < n ? a + ld : nullptr;
    if (2 * i + 8 < n) tiles::prefetch_row(a + 8 * ld, dv);
    for (int64_t j0 = 0; j0 < dv; j0 += NR) {
      uint32_t* out = dst + (j0 / NR) * panel_stride + i * NR;
      if (b != nullptr && j0 + NR <= dv) {  // 16 columns of the two rows at once
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + j0));
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j0));
        nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi16(_mm256_and_si256(x, exponent), exponent));
        nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpeq_epi16(_mm256_and_si256(y, exponent), exponent));
        store_pairs(out, x, y);
        continue;
      }
      for (int64_t c = 0; c < NR; ++c) {
        const int64_t col = j0 + c;
        out[c] = col < dv ? bits(a, col) | (b != nullptr ? bits(b, col) << 16 : 0u) : 0u;
        tail_finite = tail_finite && ((out[c] & 0x7f80u) != 0x7f80u) && ((out[c] & 0x7f800000u) != 0x7f800000u);
      }
    }
  }
  return tail_finite && _mm256_testz_si256(nonfinite, nonfinite);
}

// Float P rows [0, rows) (row stride ldp), keys [lo, hi), to bf16 pairs: pair i of row r at
// dst[r * ld + i] holds keys lo2 + 2i and lo2 + 2i + 1, lo2 = lo rounded down to even, for
// i < pairs(hi - lo2); keys outside [lo, hi) are 0. With `residual`, also P - bf16(P) as
// bf16 pairs there (the same layout): P V from both parts is then as exact as in float.
inline __m512 widen_low(__m512i pairs) {  // the even (low-half) bf16 of each pair as floats
  return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
}
inline __m512 widen_high(__m512i pairs) {  // the odd (high-half) bf16 of each pair
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline void to_pairs(const float* p, int64_t ldp, int64_t rows, int64_t lo, int64_t hi, uint32_t* dst, int64_t ld,
                     uint32_t* residual = nullptr) {
  const int64_t lo2 = lo / 2 * 2, n2 = pairs(hi - lo2);
  // Even and odd keys of 16 pairs: x0 holds keys c..c+15 and x1 keys c+16..c+31; the
  // conversion packs them as 32 bf16 in key order, which read as words are the pairs.
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = p + r * ldp;
    uint32_t* out = dst + r * ld;
    for (int64_t c = lo2; c < lo2 + 2 * n2; c += 2 * NR) {
      auto valid = [&](int64_t c0) {  // lanes c0 + l inside [lo, hi)
        uint32_t m = 0xffffu;
        if (c0 < lo) m &= ~((1u << (lo - c0)) - 1u);
        if (c0 + NR > hi) m &= hi > c0 ? (1u << (hi - c0)) - 1u : 0u;
        return static_cast<__mmask16>(m);
      };
      const __m512 x0 = _mm512_maskz_loadu_ps(valid(c), src + c);
      const __m512 x1 = _mm512_maskz_loadu_ps(valid(c + NR), src + c + NR);
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);  // x0's in the low half
      const int64_t at = (c - lo2) / 2;
      const __mmask16 store = static_cast<__mmask16>((1u << std::min<int64_t>(NR, n2 - at)) - 1u);
      _mm512_mask_storeu_epi32(out + at, store, both);
      if (residual != nullptr) {
        // Back to floats in key order: word w holds keys c + 2w (low) and c + 2w + 1 (high).
        const __m512i idx_even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i idx_odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        const __m512 lo_part = widen_low(both), hi_part = widen_high(both);  // keys c+2w, c+2w+1
        const __m512 back0 = _mm512_permutex2var_ps(lo_part, idx_even, hi_part);  // keys c .. c+15
        const __m512 back1 = _mm512_permutex2var_ps(lo_part, idx_odd, hi_part);   // keys c+16 .. c+31
        const __m512i rest = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, back1), _mm512_sub_ps(x0, back0));
        _mm512_mask_storeu_epi32(residual + r * ld + at, store, rest);
      }
    }
  }
}

// mult * float rows [0, rows) x columns [0, cols) (row stride ldp) to bf16 pairs of rows:
// pair i of column c at dst[i * ld + c] holds rows 2i and 2i + 1 (a row at or past `rows`
// is 0), for i < pairs(rows), c < cols rounded up to 16 (the extra columns are 0); ld is
// a multiple of 16. The A operand of P^T dO and dS^T Q in the backward.
inline void to_row_pairs(const float* p, int64_t ldp, int64_t rows, int64_t cols, float mult, uint32_t* dst,
                         int64_t ld) {
  const __m512 vmult = _mm512_set1_ps(mult);
  for (int64_t i = 0; 2 * i < rows; ++i) {
    const float* x = p + 2 * i * ldp;
    const float* y = 2 * i + 1 < rows ? x + ldp : nullptr;
    uint32_t* out = dst + i * ld;
    for (int64_t c = 0; c < cols; c += NR) {
      const __mmask16 lanes = static_cast<__mmask16>(c + NR <= cols ? 0xffffu : (1u << (cols - c)) - 1u);
      const __m512 vx = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + c), vmult);
      const __m512 vy = y != nullptr ? _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, y + c), vmult) : _mm512_setzero_ps();
      store_pairs(out + c, (__m256i)_mm512_cvtneps_pbh(vx), (__m256i)_mm512_cvtneps_pbh(vy));
    }
  }
}

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// s[r][0, 16 NP) = scale * sum_e a-pair(e, r) . k-pair(e, column), r < M: NP panels of K.
template <int M, int NP, bool PREFETCH = false>
__attribute__((always_inline)) inline void qk_tile(const uint32_t* a, const uint32_t* k, int64_t d2, float scale,
                                                   float* s, int64_t lds, const uint32_t* next) {
  __m512 acc[M][NP];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t e = 0; e < d2; ++e) {
    __m512i b[NP];
    for (int j = 0; j < NP; ++j) {
      b[j] = _mm512_loadu_si512(k + j * NR * d2 + e * NR);
      if constexpr (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(next + j * NR * d2 + e * NR), _MM_HINT_T0);
    }
    const uint32_t* ae = a + e * MR;
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(ae[r])));
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, as_bh(b[j]));
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    for (int j = 0; j < NP; ++j) _mm512_storeu_ps(s + r * lds + j * NR, _mm512_mul_ps(acc[r][j], vscale));
  }
}

// The row groups of `rows` over NP panels; the first full group prefetches `next`.
template <int NP>
inline void qk_panels(int64_t rows, const uint32_t* q, const uint32_t* k, int64_t d2, float scale, float* s,
                      int64_t lds, const uint32_t* next) {
  tiles::for_row_groups(rows, [&](auto m, int64_t r) {
    constexpr int M = decltype(m)::value;
    if (M == MR && r == 0 && next != nullptr) {
      qk_tile<M, NP, true>(q, k, d2, scale, s, lds, next);
    } else {
      qk_tile<M, NP>(q + r * d2, k, d2, scale, s + r * lds, lds, nullptr);
    }
  });
}

// S (rows x 16 * panels, row stride lds) = scale * Q K^T: Q from pack_q, `panels` K panels
// from pack_k. Two panels at a time, each pair staying in L1 while the row groups pass.
inline void qk_block(int64_t rows, const uint32_t* q, const uint32_t* k_panels, int64_t panels, int64_t d2,
                     float scale, float* s, int64_t lds) {
  for (int64_t j = 0; j < panels; j += 2) {
    const uint32_t* k = k_panels + j * NR * d2;
    const uint32_t* next = j + 2 < panels ? k + 2 * NR * d2 : nullptr;
    if (j + 1 < panels) {
      qk_panels<2>(rows, q, k, d2, scale, s + j * NR, lds, next);
    } else {
      qk_panels<1>(rows, q, k, d2, scale, s + j * NR, lds, next);
    }
  }
}

// o[r][0, 16 NP) += sum_i a-pair(r, i) . v-pair(i, column), r < M, i < n2, with a-pair(r, i)
// at a[r * a_rs + i * a_ks]: NP V panels `panel_stride` apart (o = the sum with `overwrite`).
template <int M, int NP, bool PREFETCH = false>
__attribute__((always_inline)) inline void pv_tile(const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* v,
                                                   int64_t panel_stride, int64_t n2, float* o, int64_t ldo,
                                                   const uint32_t* next, bool overwrite) {
  __m512 acc[M][NP];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < n2; ++i) {
    __m512i b[NP];
    for (int j = 0; j < NP; ++j) {
      b[j] = _mm512_loadu_si512(v + j * panel_stride + i * NR);
      if constexpr (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(next + j * panel_stride + i * NR), _MM_HINT_T0);
    }
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(a[r * a_rs + i * a_ks])));
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, as_bh(b[j]));
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    for (int j = 0; j < NP; ++j) {
      float* out = o + r * ldo + j * NR;
      _mm512_storeu_ps(out, overwrite ? acc[r][j] : _mm512_add_ps(_mm512_loadu_ps(out), acc[r][j]));
    }
  }
}

template <int NP>
inline void pv_panels(int64_t rows, const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* v,
                      int64_t panel_stride, int64_t n2, float* o, int64_t ldo, const uint32_t* next, bool overwrite) {
  tiles::for_row_groups(rows, [&](auto m, int64_t r) {
    constexpr int M = decltype(m)::value;
    if (M == MR && r == 0 && next != nullptr) {
      pv_tile<M, NP, true>(a, a_rs, a_ks, v, panel_stride, n2, o, ldo, next, overwrite);
    } else {
      pv_tile<M, NP>(a + r * a_rs, a_rs, a_ks, v, panel_stride, n2, o + r * ldo, ldo, nullptr, overwrite);
    }
  });
}

// O (rows x 16 * dv_panels, row stride ldo) += A V over n2 pairs: pair i of A's row r at
// a[r * a_rs + i * a_ks] (P from to_pairs: a_rs its row stride, a_ks 1; a transposed block
// from to_row_pairs: a_rs 1, a_ks its row stride), V panels from pack_v `panel_stride`
// apart, each starting at the first pair. In chunks of PV_PAIRS pairs, so two V panels'
// chunk (8 KiB) stays in L1 while the row groups pass; the first row group prefetches the
// chunk that follows. With `overwrite`, O = A V (O's prior values neither read nor needed).
constexpr int64_t PV_PAIRS = 64;
inline void pv_block(int64_t rows, const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* v_panels,
                     int64_t panel_stride, int64_t n2, int64_t dv_panels, float* o, int64_t ldo,
                     bool overwrite = false) {
  for (int64_t i0 = 0; i0 < n2; i0 += PV_PAIRS) {
    const int64_t count = std::min(PV_PAIRS, n2 - i0);
    const bool first = overwrite && i0 == 0;
    for (int64_t j = 0; j < dv_panels; j += 2) {
      const uint32_t* v = v_panels + j * panel_stride + i0 * NR;
      const uint32_t* next = j + 2 < dv_panels ? v + 2 * panel_stride
                             : i0 + PV_PAIRS < n2 ? v_panels + (i0 + PV_PAIRS) * NR
                                                  : nullptr;
      if (j + 1 < dv_panels) {
        pv_panels<2>(rows, a + i0 * a_ks, a_rs, a_ks, v, panel_stride, count, o + j * NR, ldo, next, first);
      } else {
        pv_panels<1>(rows, a + i0 * a_ks, a_rs, a_ks, v, panel_stride, count, o + j * NR, ldo, next, first);
      }
    }
  }
}

// The row path's products on vdpbf16ps (flash_fwd.cpp DotRowOperands: decoding from a bf16
// cache, calls no backward follows): K and V rows read in place, as tiles::row_scores and
// tiles::row_pv read them, at about half their instructions (no widening, two products per
// lane and instruction). Head dims whole multiples of 32 (one 64-byte vector of bf16).
namespace rows {

using RowsAhead = tiles::RowsAhead<c10::BFloat16>;
using tiles::prefetch_ahead;

// s[r * lds + j] = scale * q_r . k_j for r < R, j < KB: bf16 query rows d apart (unscaled),
// K rows ldk apart, in R x KB 16-lane accumulators (each K vector loaded once for the R
// rows), each lane summing pairs of products.
template <int R, int KB>
__attribute__((always_inline)) inline void dot_block(const c10::BFloat16* q, int64_t d, const c10::BFloat16* k,
                                                     int64_t ldk, float scale, float* s, int64_t lds) {
  constexpr int N = (R * KB + 3) / 4 * 4;
  static_assert(N <= 16);
  __m512 acc[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t e = 0; e < d; e += 32) {
    __m512i kv[KB];
#pragma GCC unroll 16
    for (int j = 0; j < KB; ++j) kv[j] = _mm512_loadu_si512(k + j * ldk + e);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = as_bh(_mm512_loadu_si512(q + r * d + e));
#pragma GCC unroll 16
      for (int j = 0; j < KB; ++j) acc[r * KB + j] = _mm512_dpbf16_ps(acc[r * KB + j], qv, as_bh(kv[j]));
    }
  }
  float sums[N];
  tiles::hsums<N>(acc, sums);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < KB; ++j) s[r * lds + j] = scale * sums[r * KB + j];
  }
}

template <int R>
inline void scores_r(const c10::BFloat16* q, const c10::BFloat16* k, int64_t ldk, int64_t cols, int64_t d,
                     float scale, float* s, int64_t lds, const RowsAhead& ahead) {
  constexpr int KB = R == 3 ? 4 : 16 / R;
  const int64_t AHEAD = std::clamp<int64_t>(tiles::ROW_AHEAD_BYTES / (d * 2), 4, 32);
  int64_t c = 0;
  for (; c + KB <= cols; c += KB) {
    for (int64_t j = c + AHEAD; j < std::min(c + AHEAD + KB, cols); ++j) tiles::prefetch_row(k + j * ldk, d);
    prefetch_ahead(ahead, c, c + KB, 0, 2 * d);
    dot_block<R, KB>(q, d, k + c * ldk, ldk, scale, s + c, lds);
  }
  prefetch_ahead(ahead, c, ahead.n, 0, 2 * d);
  for (; c < cols; ++c) dot_block<R, 1>(q, d, k + c * ldk, ldk, scale, s + c, lds);
}

// s[r * lds + c] = scale * q_r . k_c for r < rows, c < cols (d a multiple of 32); the rows
// `ahead` prefetched as the keys go (as many as keys done, the rest before the last few).
inline void scores(const c10::BFloat16* q, int64_t rows, const c10::BFloat16* k, int64_t ldk, int64_t cols,
                   int64_t d, float scale, float* s, int64_t lds, const RowsAhead& ahead = {}) {
  switch (rows) {
    case 1: return scores_r<1>(q, k, ldk, cols, d, scale, s, lds, ahead);
    case 2: return scores_r<2>(q, k, ldk, cols, d, scale, s, lds, ahead);
    case 3: return scores_r<3>(q, k, ldk, cols, d, scale, s, lds, ahead);
    case 4: return scores_r<4>(q, k, ldk, cols, d, scale, s, lds, ahead);
    default: break;
  }
  // More rows: 4 keys at a time, dotted with every group of 4 query rows while in L1.
  const int64_t AHEAD = std::clamp<int64_t>(tiles::ROW_AHEAD_BYTES / (d * 2), 4, 32);
  int64_t c = 0;
  auto groups = [&](auto keys) {
    constexpr int KB = decltype(keys)::value;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) dot_block<4, KB>(q + r * d, d, k + c * ldk, ldk, scale, s + r * lds + c, lds);
    switch (rows - r) {
      case 3: dot_block<3, KB>(q + r * d, d, k + c * ldk, ldk, scale, s + r * lds + c, lds); break;
      case 2: dot_block<2, KB>(q + r * d, d, k + c * ldk, ldk, scale, s + r * lds + c, lds); break;
      case 1: dot_block<1, KB>(q + r * d, d, k + c * ldk, ldk, scale, s + r * lds + c, lds); break;
      default: break;
    }
  };
  for (; c + 4 <= cols; c += 4) {
    for (int64_t j = c + AHEAD; j < std::min(c + AHEAD + 4, cols); ++j) tiles::prefetch_row(k + j * ldk, d);
    prefetch_ahead(ahead, c, c + 4, 0, 2 * d);
    groups(std::integral_constant<int, 4>{});
  }
  prefetch_ahead(ahead, c, ahead.n, 0, 2 * d);
  for (; c < cols; ++c) groups(std::integral_constant<int, 1>{});
}

// The query rows (d elements, row stride d, d even) as pairs transposed for column_scores:
// pair t of row r at qt[t * COLUMN_ROWS + r], the lanes of rows past `rows` 0.
inline void transpose_rows(const c10::BFloat16* q, int64_t rows, int64_t d, uint32_t* qt) {
  using tiles::COLUMN_ROWS;
  for (int64_t t = 0; t < d / 2; ++t) {
    for (int64_t r = 0; r < COLUMN_ROWS; ++r) qt[t * COLUMN_ROWS + r] = r < rows ? pair(q + r * d, 2 * t, d) : 0u;
  }
}

// The dots of column_scores on bf16 pairs (tiles::column_dots_by's `dots`): qt the query
// pairs transposed (transpose_rows), each lane summing its row's pair products in order,
// 8 keys in flight; a line of `ahead` prefetched every other pair (16 rows of `ahead` take
// a 16-key group's two calls).
inline auto pair_dots(const uint32_t* qt, int64_t d, tiles::AheadLines<c10::BFloat16>& ahead) {
  return [qt, d, &ahead](const c10::BFloat16* const* k, __m512* cols) __attribute__((always_inline)) {
    __m512 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < d / 2; ++t) {
      if (t & 1) ahead.step();
      const __m512bh qv = as_bh(_mm512_loadu_si512(qt + t * tiles::COLUMN_ROWS));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        uint32_t k_pair;
        std::memcpy(&k_pair, k[j] + 2 * t, sizeof(k_pair));
        acc[j] = _mm512_dpbf16_ps(acc[j], qv, as_bh(_mm512_set1_epi32(static_cast<int>(k_pair))));
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) cols[j] = acc[j];
  };
}

// tiles::column_scores for bf16 rows on pairs (calls no backward follows; d even, as the
// dot rows' whole 32s are): s[r * lds + j] = scale * q_r . k_j.
inline void column_scores(const uint32_t* qt, int64_t rows, const c10::BFloat16* const* krow, int64_t n, int64_t d,
                          float scale, float* s, int64_t lds, tiles::AheadLines<c10::BFloat16>& ahead) {
  tiles::column_scores_by(krow, rows, n, scale, s, lds, pair_dots(qt, d, ahead));
}

// The same scores of keys [0, n) (n at most 16) left in columns for a block's
// column_softmax: st[j * COLUMN_ROWS + r] = scale * q_r . k_j.
inline void column_scores_to(const uint32_t* qt, const c10::BFloat16* const* krow, int64_t n, int64_t d, float scale,
                             float* st, tiles::AheadLines<c10::BFloat16>& ahead) {
  tiles::column_scores_to_by(krow, n, scale, st, pair_dots(qt, d, ahead));
}

// P in columns (st[j * COLUMN_ROWS + r], j < n) as key pairs transposed: ppt[t *
// COLUMN_ROWS + r] holds keys 2t and 2t + 1 of row r as bf16 (the low half the even key,
// rounded as to_pairs does), a last odd key's partner 0.
inline void column_pairs(const float* st, int64_t n, uint32_t* ppt) {
  using tiles::COLUMN_ROWS;
  // word 2r of the interleaved pairs from word r of the even key's half, 2r + 1 from the odd's
  alignas(64) static constexpr int16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                         8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(interleave);
  for (int64_t t = 0; 2 * t < n; ++t) {
    const __m512 even = _mm512_loadu_ps(st + 2 * t * COLUMN_ROWS);
    const __m512 odd = 2 * t + 1 < n ? _mm512_loadu_ps(st + (2 * t + 1) * COLUMN_ROWS) : _mm512_setzero_ps();
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // even's 16 in the low half
    _mm512_storeu_si512(ppt + t * COLUMN_ROWS, _mm512_permutexvar_epi16(idx, both));
  }
}

// o[0, 32) += the 32 sums in lo and hi, in column order: lane 4L + i of lo holds column
// 8L + i, of hi column 8L + 4 + i (L a 128-bit lane, i < 4), as unpacklo / unpackhi
// interleave V's rows.
__attribute__((always_inline)) inline void add_in_order(__m512 lo, __m512 hi, float* o) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_permutex2var_ps(lo, first, hi)));
  _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_loadu_ps(o + 16), _mm512_permutex2var_ps(lo, second, hi)));
}

// o[r][0, 32) += sum_k bf16(p[r][k]) v[k][0, 32) for r < M, k < n: key pairs (pair t of
// row r at pp[r * row_step + t * pair_step]: P's keys 2t, 2t + 1 as bf16) against V's rows
// 2t and 2t + 1 (key k's at vrow(k)) interleaved in registers (unpacklo / unpackhi: columns
// {0-3, 8-11, ...} and {4-7, 12-15, ...} of each 128-bit lane), the sums from 0 in 2M
// registers, put back in column order and added to o. A last odd key's partner is a zero row.
template <int M, typename VRow>
__attribute__((always_inline)) inline void pv_strip(const uint32_t* pp, int64_t row_step, int64_t pair_step,
                                                    const VRow& vrow, int64_t n, float* o, int64_t ldo,
                                                    tiles::AheadLines<c10::BFloat16>& lines, int64_t steps) {
  __m512 lo[M], hi[M];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t t = 0; 2 * t < n; ++t) {
    for (int64_t i = 0; i < steps; ++i) lines.step();
    const __m512i v0 = _mm512_loadu_si512(vrow(2 * t));
    const __m512i v1 = 2 * t + 1 < n ? _mm512_loadu_si512(vrow(2 * t + 1)) : _mm512_setzero_si512();
    const __m512bh a = as_bh(_mm512_unpacklo_epi16(v0, v1)), b = as_bh(_mm512_unpackhi_epi16(v0, v1));
    const uint32_t* pt = pp + t * pair_step;
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(pt[r * row_step])));
      lo[r] = _mm512_dpbf16_ps(lo[r], x, a);
      hi[r] = _mm512_dpbf16_ps(hi[r], x, b);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) add_in_order(lo[r], hi[r], o + r * ldo);
}

// o[r * ldo + e] += sum_k bf16(p[r][k]) v[k][e] for r < rows, k < n, e < dv (dv a multiple
// of 32), P as pv_strip's pairs: strips of 32 columns for up to 8 rows at a time (the
// block's V rows stay in L1 across the strips); the key pairs of every strip prefetch the
// rows `ahead` a line or two at a time (tiles::AheadLines), spread over all of them.
template <typename VRow>
inline void pv_pairs(const uint32_t* pp, int64_t row_step, int64_t pair_step, int64_t rows, const VRow& vrow,
                     int64_t n, int64_t dv, float* o, int64_t ldo, const RowsAhead& ahead) {
  tiles::AheadLines<c10::BFloat16> lines(ahead, 2 * dv);
  // (lines per key pair of a strip: e.g. 16 rows of 128 columns ahead, 16 keys: 1 for
  // 9-16 rows, 2 for up to 8)
  const int64_t steps = lines.steps_over((rows + 7) / 8 * (dv / 32) * ((n + 1) / 2));
  for (int64_t r = 0; r < rows; r += 8) {
    const uint32_t* pr = pp + r * row_step;
    float* orow = o + r * ldo;
    for (int64_t c0 = 0; c0 < dv; c0 += 32) {
      auto vcol = [&](int64_t k) { return vrow(k) + c0; };
      switch (std::min<int64_t>(8, rows - r)) {
        case 8: pv_strip<8>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
        case 7: pv_strip<7>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
        case 6: pv_strip<6>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
        case 5: pv_strip<5>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
        case 4: pv_strip<4>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
        case 3: pv_strip<3>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
        case 2: pv_strip<2>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
        default: pv_strip<1>(pr, row_step, pair_step, vcol, n, orow + c0, ldo, lines, steps); break;
      }
    }
  }
  lines.rest();
}

// o[r * ldo + e] += sum_k bf16(p[r * ldp + k]) v[k * ldv + e] for r < rows, k < n, e < dv
// (dv a multiple of 32): P rounded to bf16 pairs into pp (rows x pairs(n) words), then
// pv_pairs.
inline void pv(const float* p, int64_t ldp, int64_t rows, const c10::BFloat16* v, int64_t ldv, int64_t n,
               int64_t dv, float* o, int64_t ldo, uint32_t* pp, const RowsAhead& ahead = {}) {
  if (n == 0) return;
  const int64_t ldpp = pairs(n);
  to_pairs(p, ldp, rows, 0, n, pp, ldpp);
  pv_pairs(pp, ldpp, 1, rows, [v, ldv](int64_t k) { return v + k * ldv; }, n, dv, o, ldo, ahead);
}

// The same product from P's key pairs transposed (column_pairs: pair t of row r at ppt[t *
// COLUMN_ROWS + r]), key k's V row at vrow[k] (a block's keys across pages).
inline void pv_columns(const uint32_t* ppt, int64_t rows, const c10::BFloat16* const* vrow, int64_t n, int64_t dv,
                       float* o, int64_t ldo, const RowsAhead& ahead) {
  if (n == 0) return;
  pv_pairs(ppt, 1, tiles::COLUMN_ROWS, rows, [vrow](int64_t k) { return vrow[k]; }, n, dv, o, ldo, ahead);
}

}  // namespace rows

}  // namespace flashattn::cpu::tiles_bf16
#endif
