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
// Tile registers (their shapes are loaded by configure() at the start of every product,
// since other code on the same thread, e.g. oneDNN's matrix products, loads its own; and
// released at its end, so that a thread not using them has no tile state to save):
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

// The tile shapes above, for a reduced dimension of n pairs.
inline void configure(int64_t n) {
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 6; ++t) cfg.rows[t] = TM, cfg.colsb[t] = TM * 4;
  const int64_t tail = n % TM;
  if (tail > 0) {
    cfg.rows[6] = TM, cfg.colsb[6] = static_cast<uint16_t>(tail * 4);
    cfg.rows[7] = static_cast<uint8_t>(tail), cfg.colsb[7] = TM * 4;
  }
  _tile_loadconfig(&cfg);
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
inline void pack_t(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t d, int64_t d_rows, uint32_t* dst,
                   int64_t ld_dst) {
  if (d_rows * ld_dst > 0) std::memset(dst, 0, d_rows * ld_dst * sizeof(uint32_t));  // (dst is null when empty)
  for (int64_t i = 0; 2 * i < rows; ++i) {
    const c10::BFloat16* x = src + 2 * i * ld;
    const c10::BFloat16* y = 2 * i + 1 < rows ? x + ld : nullptr;
    for (int64_t c = 0; c < d; ++c) {
      dst[c * ld_dst + i] = tiles_bf16::bits(x, c) | (y != nullptr ? uint32_t(tiles_bf16::bits(y, c)) << 16 : 0u);
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
  _tile_release();
}

// o[r][0, 16 dv_panels) += sum over pairs i < n2 of a[r * lda + i] . (B panels of 16
// columns at v, panel_stride apart, pair i of column c at [i * ldb + c]) for r < rows: e.g.
// P pairs from tiles_bf16::to_pairs times V pair panels (ldb 16). 16 rows readable from a
// at every 16th row, as qk_block's q; rows that are whole tiles are added in place.
inline void pv_block(int64_t rows, const uint32_t* a, int64_t lda, const uint32_t* v, int64_t ldb, int64_t panel_stride,
                     int64_t n2, int64_t dv_panels, float* o, int64_t ldo) {
  if (n2 <= 0) return;
  configure(n2);
  alignas(64) float part[4][TM * TM];
  for (int64_t r0 = 0; r0 < rows; r0 += TM) {
    const int64_t n = std::min(TM, rows - r0);
    for (int64_t j0 = 0; j0 < dv_panels; j0 += 4) {
      const int nb = static_cast<int>(std::min<int64_t>(4, dv_panels - j0));
      float* out = o + r0 * ldo + j0 * TM;
      for (int j = 0; j < nb; ++j) {
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
  _tile_release();
}

}  // namespace flashattn::cpu::tiles_amx
#endif
