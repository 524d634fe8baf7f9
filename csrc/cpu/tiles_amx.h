// AMX tiles for the block products of bf16 inputs, forward and backward (Intel Sapphire
// Rapids and later: AMX-TILE and AMX-BF16).
//
// One tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 float
// accumulators: 8,192 multiply-adds per instruction, where the AVX512-BF16 tiles do 32.
// The operands are tiles_bf16's pair layouts, which are AMX's: a B tile row is 16 pairs
// of one reduced index, 64 bytes, so a pair panel of 16 keys (K) or 16 columns (V) is a
// column of B tiles, 16 pairs apart; A tiles are 16 rows of 16 pairs read in place (Q
// rows as pairs, P as to_pairs writes it). Products are summed in float as on the
// AVX512-BF16 tiles (another order; P rounded to bf16 the same way).
//
// Tile registers of the block products (their shapes loaded by configure() where the
// thread's tiles hold other shapes: `loaded` below):
//   0-3  accumulators C, 16 rows x 16 floats;
//   4, 5 A and B over 16 pairs of the reduced dimension;
//   6, 7 A and B over the last n % 16 pairs.
#pragma once

#include "tiles_bf16.h"

#if defined(FLASHATTN_CPU_BF16_DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FLASHATTN_CPU_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <utility>

namespace flashattn::cpu::tiles_amx {

constexpr int64_t TM = 16;  // rows of a tile; pairs per A row and B column; columns of C

// Whether this CPU has AMX-BF16 and Linux lets this process use the tile registers (asked
// once: the kernel enables the large tile state only on request, ARCH_REQ_XCOMP_PERM).
inline bool usable() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// False when the switches keep bf16 off the AMX tiles (FLASHATTN_CPU_AMX=0, or a set
// FLASHATTN_CPU_BF16_DOT: switches.h), or where the CPU or the OS does not offer them.
inline bool enabled() { return switches().amx && usable(); }

// Loads tile shapes: tile t of rows[t] rows of words[t] 32-bit words (0: unused).
inline void load_shapes(const int64_t (&rows)[8], const int64_t (&words)[8]) {
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]), cfg.colsb[t] = static_cast<uint16_t>(words[t] * 4);
  }
  _tile_loadconfig(&cfg);
}

// The shapes this thread's tile registers hold: 1 + n % TM for the block products'
// (configure), ROW_SHAPES + m for the row path's (rows::configure), 0 for none known.
// Loading shapes costs about as much as a small product (a short sequence's head has a
// few: benchmarks/RESULTS.md), so they stay loaded from one product to the next. A kernel's workspace holds a Use: made, it forgets the shapes
// (other code on the thread, e.g. oneDNN's matrix products, loads its own between kernel
// calls); destroyed, it releases the tiles (a thread done with them has no tile state to
// save), on the thread that runs the workspace's tasks.
inline thread_local int64_t loaded = 0;
constexpr int64_t ROW_SHAPES = 32;

inline void release() {
  if (loaded != 0) _tile_release();
  loaded = 0;
}

struct Use {
  Use() { loaded = 0; }
  ~Use() { release(); }
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;
};

// The tile shapes above, for a reduced dimension of n pairs.
inline void configure(int64_t n) {
  const int64_t tail = n % TM;
  if (loaded == 1 + tail) return;
  load_shapes({TM, TM, TM, TM, TM, TM, tail > 0 ? TM : 0, tail}, {TM, TM, TM, TM, TM, TM, tail, tail > 0 ? TM : 0});
  loaded = 1 + tail;
}

// C[j] += sum over the reduced dimension of A (16 rows from a, row stride lda words) times
// the B tiles of column j (pair e's 16 words at b + j * b_stride + e * ldb), j < NB, over
// n pairs.
template <int NB>
__attribute__((always_inline)) inline void multiply(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                                                    int64_t b_stride, int64_t n) {
  const int64_t whole = n / TM * TM;
  for (int64_t e = 0; e < whole; e += TM) {
    _tile_loadd(4, a + e, lda * 4);
    _tile_loadd(5, b + e * ldb, ldb * 4);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NB > 1) {
      _tile_loadd(5, b + b_stride + e * ldb, ldb * 4);
      _tile_dpbf16ps(1, 4, 5);
    }
    if constexpr (NB > 2) {
      _tile_loadd(5, b + 2 * b_stride + e * ldb, ldb * 4);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NB > 3) {
      _tile_loadd(5, b + 3 * b_stride + e * ldb, ldb * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  if (whole < n) {
    _tile_loadd(6, a + whole, lda * 4);
    _tile_loadd(7, b + whole * ldb, ldb * 4);
    _tile_dpbf16ps(0, 6, 7);
    if constexpr (NB > 1) {
      _tile_loadd(7, b + b_stride + whole * ldb, ldb * 4);
      _tile_dpbf16ps(1, 6, 7);
    }
    if constexpr (NB > 2) {
      _tile_loadd(7, b + 2 * b_stride + whole * ldb, ldb * 4);
      _tile_dpbf16ps(2, 6, 7);
    }
    if constexpr (NB > 3) {
      _tile_loadd(7, b + 3 * b_stride + whole * ldb, ldb * 4);
      _tile_dpbf16ps(3, 6, 7);
    }
  }
}

// Accumulator j to / from c (16 rows, row stride ldc floats).
inline void store(int j, float* c, int64_t ldc) {
  switch (j) {
    case 0: _tile_stored(0, c, ldc * 4); break;
    case 1: _tile_stored(1, c, ldc * 4); break;
    case 2: _tile_stored(2, c, ldc * 4); break;
    default: _tile_stored(3, c, ldc * 4); break;
  }
}
inline void load(int j, const float* c, int64_t ldc) {
  switch (j) {
    case 0: _tile_loadd(0, c, ldc * 4); break;
    case 1: _tile_loadd(1, c, ldc * 4); break;
    case 2: _tile_loadd(2, c, ldc * 4); break;
    default: _tile_loadd(3, c, ldc * 4); break;
  }
}

inline void zero(int j) {
  switch (j) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
  }
}

inline void multiply_any(int nb, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t b_stride,
                         int64_t n) {
  switch (nb) {
    case 4: return multiply<4>(a, lda, b, ldb, b_stride, n);
    case 3: return multiply<3>(a, lda, b, ldb, b_stride, n);
    case 2: return multiply<2>(a, lda, b, ldb, b_stride, n);
    default: return multiply<1>(a, lda, b, ldb, b_stride, n);
  }
}

using tiles::transpose16;

// out[c * ld + e] += t[e * ldt + c] for c < cols, e < rows (t readable in whole 16 x 16
// blocks: rows up to rows rounded up to 16, columns to cols rounded up to 16), 16 x 16 at a
// time through registers.
inline void add_transposed(const float* t, int64_t ldt, int64_t rows, int64_t cols, float* out, int64_t ld) {
  for (int64_t e0 = 0; e0 < rows; e0 += TM) {
    const __mmask16 lanes = rows - e0 >= TM ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (rows - e0)) - 1u);
    for (int64_t c0 = 0; c0 < cols; c0 += TM) {
      __m512 col[TM];
      transpose16(t + e0 * ldt + c0, ldt, col);
      for (int64_t c = 0; c < std::min(TM, cols - c0); ++c) {
        float* o = out + (c0 + c) * ld + e0;
        _mm512_mask_storeu_ps(o, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, o), col[c]));
      }
    }
  }
}

// Q rows [0, rows) (row stride ld, d elements) as pairs, row r at dst[r * pairs(d)] (an odd
// d's last pair gets a zero partner): the A tiles of qk_block read them in place.
inline void pack_q(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t d, uint32_t* dst) {
  const int64_t d2 = tiles_bf16::pairs(d);
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t* out = dst + r * d2;
    std::memcpy(out, src + r * ld, (d / 2) * 4);  // (pairs are two neighbouring bf16, low half the even one)
    if (d % 2 != 0) out[d2 - 1] = tiles_bf16::pair(src + r * ld, d - 1, d);
  }
}

// Rows [0, rows) of src (row stride ld, d elements) transposed into pairs of rows: column
// c's rows 2i and 2i + 1 at dst[c * ld_dst + i] (a row at or past `rows` is 0), for c < d;
// rows of dst from d up to d_rows are 0. The A operand of dK^T += Q^T dS and
// dV^T += dO^T P in the backward (ld_dst words per row, at least pairs(rows)).
// 16 row pairs by 16 columns at a time: each pair's 16 words widened from its two rows in
// registers, then transposed (transpose16) into 16 words of 16 columns' rows.
inline void pack_t(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t d, int64_t d_rows, uint32_t* dst,
                   int64_t ld_dst) {
  if (d_rows * ld_dst > 0) std::memset(dst, 0, d_rows * ld_dst * sizeof(uint32_t));  // (dst is null when empty)
  const int64_t row_pairs = tiles_bf16::pairs(rows);
  auto row = [&](int64_t r, int64_t c0, __mmask16 cols) {  // 16 elements widened to words; 0 past the last row
    if (r >= rows) return _mm512_setzero_si512();
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, static_cast<const void*>(src + r * ld + c0)));
  };
  alignas(64) float words[TM * TM];  // (pair i's 16 words at [i * 16])
  for (int64_t i0 = 0; i0 < row_pairs; i0 += TM) {
    const int64_t n = std::min(TM, row_pairs - i0);
    const __mmask16 pair_lanes = static_cast<__mmask16>((1u << n) - 1u);
    for (int64_t c0 = 0; c0 < d; c0 += TM) {
      const int64_t m = std::min(TM, d - c0);
      const __mmask16 cols = static_cast<__mmask16>((1u << m) - 1u);
      for (int64_t i = 0; i < TM; ++i) {
        const int64_t r = 2 * (i0 + i);
        const __m512i w = _mm512_or_si512(row(r, c0, cols), _mm512_slli_epi32(row(r + 1, c0, cols), 16));
        _mm512_store_si512(words + i * TM, w);
      }
      __m512 t[TM];
      transpose16(words, TM, t);  // t[c]: column c0 + c of the 16 pairs
      for (int64_t c = 0; c < m; ++c) {
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(dst + (c0 + c) * ld_dst + i0), pair_lanes, t[c]);
      }
    }
  }
}

// s[r][0, 16 panels) = scale * q_r . k_c for r < rows: q rows from pack_q (16 rows
// readable from q at every 16th row: rows past `rows` are computed and dropped), K as
// tiles_bf16::pack_k's panels of 16 keys.
inline void qk_block(int64_t rows, const uint32_t* q, const uint32_t* k, int64_t panels, int64_t d2, float scale,
                     float* s, int64_t lds) {
  configure(d2);
  alignas(64) float part[TM * TM];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += TM) {
    const int64_t n = std::min(TM, rows - r0);
    for (int64_t p0 = 0; p0 < panels; p0 += 4) {
      const int nb = static_cast<int>(std::min<int64_t>(4, panels - p0));
      for (int j = 0; j < nb; ++j) zero(j);
      multiply_any(nb, q + r0 * d2, d2, k + p0 * TM * d2, TM, TM * d2, d2);
      for (int j = 0; j < nb; ++j) {
        store(j, part, TM);
        float* out = s + r0 * lds + (p0 + j) * TM;
        for (int64_t r = 0; r < n; ++r) _mm512_storeu_ps(out + r * lds, _mm512_mul_ps(_mm512_load_ps(part + r * TM), vscale));
      }
    }
  }
}

// o[r][0, 16 dv_panels) += (with `overwrite`: =) sum over pairs i < n2 of a[r * lda + i] .
// (B panels of 16 columns at v, panel_stride apart, pair i of column c at [i * ldb + c]) for
// r < rows: e.g. P pairs from tiles_bf16::to_pairs times V pair panels (ldb 16). 16 rows
// readable from a at every 16th row, as qk_block's q; rows that are whole tiles are added in
// place (o's prior values neither read nor needed with `overwrite`).
inline void pv_block(int64_t rows, const uint32_t* a, int64_t lda, const uint32_t* v, int64_t ldb, int64_t panel_stride,
                     int64_t n2, int64_t dv_panels, float* o, int64_t ldo, bool overwrite = false) {
  if (n2 <= 0) return;
  configure(n2);
  alignas(64) float part[4][TM * TM];
  for (int64_t r0 = 0; r0 < rows; r0 += TM) {
    const int64_t n = std::min(TM, rows - r0);
    for (int64_t j0 = 0; j0 < dv_panels; j0 += 4) {
      const int nb = static_cast<int>(std::min<int64_t>(4, dv_panels - j0));
      float* out = o + r0 * ldo + j0 * TM;
      for (int j = 0; j < nb; ++j) {
        if (overwrite) {
          zero(j);
          continue;
        }
        if (n == TM) {
          load(j, out + j * TM, ldo);
          continue;
        }
        for (int64_t r = 0; r < TM; ++r) {  // the rows past `rows` are o's next panel's: not touched
          _mm512_store_ps(part[j] + r * TM, r < n ? _mm512_loadu_ps(out + r * ldo + j * TM) : _mm512_setzero_ps());
        }
        load(j, part[j], TM);
      }
      multiply_any(nb, a + r0 * lda, lda, v + j0 * panel_stride, ldb, panel_stride, n2);
      for (int j = 0; j < nb; ++j) {
        if (n == TM) {
          store(j, out + j * TM, ldo);
          continue;
        }
        store(j, part[j], TM);
        for (int64_t r = 0; r < n; ++r) _mm512_storeu_ps(out + r * ldo + j * TM, _mm512_load_ps(part[j] + r * TM));
      }
    }
  }
}

// The row path on AMX (flash_fwd.cpp AmxRowOperands): the few query rows of a decoding
// call's GQA-packed view (m <= 16: the query heads of one KV head at each position) against
// K and V rows read in place from the cache, 32 keys per chunk. Forward only: these sums
// are not the row path's, which its backward recomputes.
//   S^T = K Q^T: A tiles are 16 keys' rows of the cache as they are (16 pairs of the head
//   dim each), B tiles Q^T (pair e of every query row: qt[e * 16 + r]), one accumulator of
//   16 keys x m rows per 16 keys, transposed into the score rows.
//   O += P V: A tiles are P's rows rounded to bf16 as key pairs (tiles_bf16::to_pairs), as
//   the AMX tiles round them (l sums the float P); B tiles are V's rows paired key by key
//   into column panels (pair_rows). (Adding P - bf16(P) V as a second product, as the
//   tiles do over few keys, did not change the worst error against the float64 formula
//   on 1-70 key caches, whose bf16 outputs round further, and turns an infinite V into
//   NaN: benchmarks/RESULTS.md.)
// Tile registers for m rows (rows::configure):
//   0, 1 S^T accumulators, 16 keys x m; 2 K rows, 16 x 16 pairs; 3 Q^T, 16 pairs x m;
//   4 P pairs, m x 16; 5 V pairs, 16 x 16 columns; 6, 7 O accumulators, m x 16 columns.
namespace rows {

constexpr int64_t KEYS = 32;  // keys per chunk: two S^T tiles, 16 pairs of P

// The tile shapes above for m rows (tiles_amx::loaded).
inline void configure(int64_t m) {
  if (loaded == ROW_SHAPES + m) return;
  load_shapes({TM, TM, TM, TM, m, TM, m, m}, {m, m, TM, m, TM, TM, TM, TM});
  loaded = ROW_SHAPES + m;
}

// Q^T of rows [0, m) (row stride ld, d elements, d even): pair e of row r at
// qt[e * 16 + r]; rows m..15 are not read (the tiles are m wide).
inline void pack_qt(const c10::BFloat16* q, int64_t ld, int64_t m, int64_t d, uint32_t* qt) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t e = 0; e < d / 2; ++e) {
      std::memcpy(qt + e * TM + r, q + r * ld + 2 * e, 4);  // (a pair: low half the even element)
    }
  }
}


// The rows of 16 keys from key[0] on as one tile: (first row, row stride in bytes) where
// key[i] = key[0] + i * stride for i < n (one page run, or a contiguous cache), else a
// zero-padded copy in buf (16 x d elements: a chunk across pages, or under 16 keys, where
// the rows past the last may not be readable).
inline std::pair<const c10::BFloat16*, int64_t> key_tile(const c10::BFloat16* const* key, int64_t n, int64_t d,
                                                         c10::BFloat16* buf) {
  if (n == TM) {
    const int64_t stride = key[1] - key[0];
    bool strided = true;
    for (int64_t i = 2; i < TM; ++i) strided &= key[i] == key[0] + i * stride;
    if (strided) return {key[0], stride * static_cast<int64_t>(sizeof(c10::BFloat16))};
  }
  for (int64_t i = 0; i < TM; ++i) {
    if (i < n) {
      std::memcpy(static_cast<void*>(buf + i * d), key[i], d * sizeof(c10::BFloat16));
    } else {
      std::memset(static_cast<void*>(buf + i * d), 0, d * sizeof(c10::BFloat16));
    }
  }
  return {buf, d * static_cast<int64_t>(sizeof(c10::BFloat16))};
}

// s[r][j] = scale * q_r . k_j for r < m, j < n: qt from pack_qt, key j's K row at k[j]
// (d elements, a multiple of 32). kbuf: 32 x d elements (key_tile's copies).
inline void scores(const uint32_t* qt, int64_t m, const c10::BFloat16* const* k, int64_t n, int64_t d, float scale,
                   float* s, int64_t lds, c10::BFloat16* kbuf) {
  configure(m);
  alignas(64) float part[2][TM * TM];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < n; c += KEYS) {
    const int64_t cnt[2] = {std::min(TM, n - c), std::min(TM, n - c - TM)};
    std::pair<const c10::BFloat16*, int64_t> tile[2];
    for (int h = 0; h < 2 && cnt[h] > 0; ++h) tile[h] = key_tile(k + c + h * TM, cnt[h], d, kbuf + h * TM * d);
    _tile_zero(0);
    if (cnt[1] > 0) _tile_zero(1);
    for (int64_t e = 0; e < d; e += 2 * TM) {  // 16 pairs of the head dim at a time
      _tile_loadd(3, qt + e / 2 * TM, TM * 4);
      _tile_loadd(2, tile[0].first + e, tile[0].second);
      _tile_dpbf16ps(0, 2, 3);
      if (cnt[1] > 0) {
        _tile_loadd(2, tile[1].first + e, tile[1].second);
        _tile_dpbf16ps(1, 2, 3);
      }
    }
    _tile_stored(0, part[0], TM * 4);
    if (cnt[1] > 0) _tile_stored(1, part[1], TM * 4);
    for (int h = 0; h < 2 && cnt[h] > 0; ++h) {
      __m512 t[16];
      transpose16(part[h], TM, t);  // row r of t: query row r's scores of these 16 keys
      const __mmask16 keys = static_cast<__mmask16>((1u << cnt[h]) - 1u);
      for (int64_t r = 0; r < m; ++r) {
        _mm512_mask_storeu_ps(s + r * lds + c + h * TM, keys, _mm512_mul_ps(t[r], vscale));
      }
    }
  }
}

// The V rows of keys [0, n) (n <= 32; key j's at v[j], dv a multiple of 32) paired key by
// key as B tiles: keys 2i and 2i + 1 of column 16j + c at vp[j * 256 + i * 16 + c]; pairs
// past n are 0 (a key with no partner gets 0).
inline void pair_rows(const c10::BFloat16* const* v, int64_t n, int64_t dv, uint32_t* vp) {
  // (permutex2var's words: element 2c takes x's column c, 2c + 1 y's (index 32 + c))
  alignas(64) static constexpr uint16_t order[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(order), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t i = 0; i < TM; ++i) {
    for (int64_t c = 0; c < dv; c += 2 * TM) {
      const __m512i xv = 2 * i < n ? _mm512_loadu_si512(v[2 * i] + c) : _mm512_setzero_si512();
      const __m512i yv = 2 * i + 1 < n ? _mm512_loadu_si512(v[2 * i + 1] + c) : _mm512_setzero_si512();
      _mm512_store_si512(vp + c / TM * TM * TM + i * TM, _mm512_permutex2var_epi16(xv, lo, yv));
      _mm512_store_si512(vp + (c / TM + 1) * TM * TM + i * TM, _mm512_permutex2var_epi16(xv, hi, yv));
    }
  }
}

// o[r][0, dv) += p[r][0, n) . V rows [0, n) for r < m (row stride ldp floats; key j's V
// row at v[j], dv a multiple of 32), P rounded to bf16. vp: dv * 16 words, 64-byte
// aligned; pp: 256 words.
inline void pv(const float* p, int64_t ldp, int64_t m, const c10::BFloat16* const* v, int64_t n, int64_t dv, float* o,
               int64_t ldo, uint32_t* vp, uint32_t* pp) {
  configure(m);
  for (int64_t c = 0; c < n; c += KEYS) {
    const int64_t cnt = std::min(KEYS, n - c), n2 = tiles_bf16::pairs(cnt);
    pair_rows(v + c, cnt, dv, vp);
    if (n2 < TM) {  // (pairs past n2: 0, never garbage against V's zero rows)
      for (int64_t r = 0; r < m; ++r) std::memset(pp + r * TM + n2, 0, (TM - n2) * 4);
    }
    tiles_bf16::to_pairs(p + c, ldp, m, 0, cnt, pp, TM);
    _tile_loadd(4, pp, TM * 4);
    for (int64_t j = 0; j < dv / TM; j += 2) {
      _tile_loadd(6, o + j * TM, ldo * 4);
      _tile_loadd(7, o + (j + 1) * TM, ldo * 4);
      _tile_loadd(5, vp + j * TM * TM, TM * 4);
      _tile_dpbf16ps(6, 4, 5);
      _tile_loadd(5, vp + (j + 1) * TM * TM, TM * 4);
      _tile_dpbf16ps(7, 4, 5);
      _tile_stored(6, o + j * TM, ldo * 4);
      _tile_stored(7, o + (j + 1) * TM, ldo * 4);
    }
  }
}

}  // namespace rows

}  // namespace flashattn::cpu::tiles_amx
#endif
