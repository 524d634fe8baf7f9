// AVX2/FMA register tiles for the CPU kernels' block products (the forward's S = Q K^T
// and O += P V, the backward's five), in fp32 with no per-call packing.
//
// BLAS packs both operands of every call, and in attention one operand (P, dS) is as
// large as the product's output. Here the small operands are packed once (pack_q per
// query block or head with the scale folded in, pack_k / pack_v per head into 16-column
// panels) and P / dS are read in place, one broadcast per element. A tile is up to
// MR x 16 outputs in 12 8-lane accumulators, or with AVX-512 MR x 32 over two panels in
// 12 16-lane ones.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define FLASHATTN_CPU_TILES 1
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "switches.h"

namespace flashattn::cpu::tiles {

constexpr int64_t NR = 16;  // output columns per tile: two 8-float vectors
constexpr int64_t MR = 6;   // output rows per tile

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Below this many query rows per head, float inputs do not use the tiles (the forward's
// row path where use_rows says so, else BLAS): the tiles pack all of K and V, as much
// memory traffic as the products themselves.
constexpr int64_t MIN_TILE_QUERIES = 16;

// At most this many query rows per head go through the forward's row-by-row path
// (flash_fwd.cpp RowOperands: K and V read once, in place); from 5 rows on only with head
// dims of at least ROW_MIN_HEAD_DIM: there it is faster than BLAS and the tiles; with
// more rows, or smaller head dims, it is slower (the row path's per-score horizontal sums
// and tails, which the tiles do not have). Numbers: benchmarks/RESULTS.md 'What was tried'.
constexpr int64_t MAX_ROW_QUERIES = 8;
constexpr int64_t ROW_MIN_HEAD_DIM = 32;

// False when FLASHATTN_CPU_TILES=0 forces BLAS for every call (switches.h).
inline bool enabled() { return switches().tiles; }

// Whether a call with float or 16-bit elements T and seqlen_q query rows per head runs on
// the tiles (the forward asks after its row path, flash_fwd.cpp).
template <typename T>
inline bool use_tiles(int64_t seqlen_q) {
  return enabled() && (!std::is_same_v<T, float> || seqlen_q >= MIN_TILE_QUERIES);
}

// Whether a forward with seqlen_q query rows per head and head dim d goes row by row (and
// its backward recomputes S the same way): rows_fit, unless the switches say BLAS.
inline bool rows_fit(int64_t seqlen_q, int64_t d) {
  return seqlen_q <= 4 || (seqlen_q <= MAX_ROW_QUERIES && d >= ROW_MIN_HEAD_DIM);
}
inline bool use_rows(int64_t seqlen_q, int64_t d) { return enabled() && rows_fit(seqlen_q, d); }

// Eight elements of x as floats (bf16: the top half of a float; fp16: F16C's conversion).
template <typename T>
inline __m256 load8(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  }
}

// Whether load8 handles T here (float and bf16; fp16 needs F16C, which every AVX2 CPU
// has in practice).
template <typename T>
constexpr bool has_load8() {
#ifdef __F16C__
  constexpr bool half = true;
#else
  constexpr bool half = false;
#endif
  return std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || (half && std::is_same_v<T, c10::Half>);
}

// The sum of v's eight lanes.
inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// y[e] += alpha x[e], e < n. (Tails one by one: a zero-padded vector through a stack
// buffer, or masked loads and stores, measured slower here: store forwarding stalls, and
// AMD's masked stores are microcoded.)
template <typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) _mm256_storeu_ps(y + e, _mm256_fmadd_ps(va, load8(x + e), _mm256_loadu_ps(y + e)));
  for (; e < n; ++e) y[e] = std::fma(alpha, static_cast<float>(x[e]), y[e]);  // (as dot_tail)
}

// o[r * ldo + e] += sum_j p[r * ldp + j] v[j * ldv + e] for r < R, j < KB, e < n: KB V rows
// (T, widened in registers) added into R output rows 8 columns at a time, each output
// vector loaded and stored once for the KB keys (axpy does so for every key: on cores
// with one 128-bit store per cycle, Zen 1, those stores bound the row path's P V). Per
// output element axpy's FMAs in key order (the last n % 8 columns one by one, as axpy's
// tail), so bitwise KB calls of axpy.
template <int R, int KB, typename T>
__attribute__((always_inline)) inline void axpy_keys(const float* p, int64_t ldp, const T* v, int64_t ldv, int64_t n,
                                                     float* o, int64_t ldo) {
  __m256 a[R][KB];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < KB; ++j) a[r][j] = _mm256_set1_ps(p[r * ldp + j]);
  }
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    __m256 x[KB];
#pragma GCC unroll 4
    for (int j = 0; j < KB; ++j) x[j] = load8(v + j * ldv + e);
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      __m256 y = _mm256_loadu_ps(o + r * ldo + e);
#pragma GCC unroll 4
      for (int j = 0; j < KB; ++j) y = _mm256_fmadd_ps(a[r][j], x[j], y);
      _mm256_storeu_ps(o + r * ldo + e, y);
    }
  }
  for (; e < n; ++e) {
    for (int r = 0; r < R; ++r) {
      float y = o[r * ldo + e];
      for (int j = 0; j < KB; ++j) y = std::fma(p[r * ldp + j], static_cast<float>(v[j * ldv + e]), y);
      o[r * ldo + e] = y;
    }
  }
}

// Prefetches a row of n elements. The packers and row_scores fetch a few rows ahead of
// the one they read: in (B, S, H, D) tensors a head's rows are H * D elements apart, a new
// page every row or two, where the hardware prefetchers stop, so without it they would
// wait on every row.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
}

// The next key block's K (or V) rows of a head, row j at rows[j] (j < n; paged caches put
// them anywhere), which a block's row products prefetch into L2 a few at a time as they go
// (flash_fwd.cpp's decoding across heads): from memory those rows arrive late otherwise,
// and the same prefetches issued in one burst per block stall the products behind them
// while the burst waits for miss buffers (benchmarks/RESULTS.md).
template <typename T>
struct RowsAhead {
  const T* const* rows = nullptr;
  int64_t n = 0;
};

// Prefetches bytes [b0, b1) of rows [r0, r1) of `ahead` (none past its n) into L2.
template <typename T>
inline void prefetch_ahead(const RowsAhead<T>& ahead, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  for (int64_t r = r0; r < std::min(r1, ahead.n); ++r) {
    const char* row = reinterpret_cast<const char*>(ahead.rows[r]);
    for (int64_t b = b0; b < b1; b += 64) __builtin_prefetch(row + b, 0, 1);
  }
}

// The lines of `ahead`'s rows (bytes [0, bytes) of each), prefetched into L2 one per
// step(), row after row: a product's loop takes steps as it goes, so that the lines go out
// while it computes (a burst of them before it stalled the products behind the miss
// buffers: benchmarks/RESULTS.md); rest() prefetches those its loop left.
template <typename T>
struct AheadLines {
  const T* const* rows;
  int64_t n, bytes, row = 0, at = 0;
  AheadLines(const RowsAhead<T>& ahead, int64_t row_bytes)
      : rows(ahead.rows), n(row_bytes > 0 ? ahead.n : 0), bytes(row_bytes) {}
  // Steps per iteration that spread every line over a loop of `iterations` (0 for none).
  int64_t steps_over(int64_t iterations) const {
    return n > 0 && iterations > 0 ? (n * ((bytes + 63) / 64) + iterations - 1) / iterations : 0;
  }
  __attribute__((always_inline)) void step() {
    if (row >= n) return;
    __builtin_prefetch(reinterpret_cast<const char*>(rows[row]) + at, 0, 1);
    at += 64;
    if (at >= bytes) at = 0, ++row;
  }
  void rest() {
    while (row < n) step();
  }
};

// sum + q[t] k[t] for t in [e, d), one by one: the tails of the dot products below. One
// fused multiply-add per element, in order: `sum += q * k` let GCC vectorise the products
// and round them apart from the sums, differently for each vector width (the AVX2 and
// AVX-512 libraries) and possibly for each inlined copy.
template <typename T>
__attribute__((always_inline)) inline float dot_tail(float sum, const float* q, const T* k, int64_t e, int64_t d) {
  for (int64_t t = e; t < d; ++t) sum = std::fma(q[t], static_cast<float>(k[t]), sum);
  return sum;
}

// s[r * lds] = q_r . k for r < M: M float query rows d apart against one K row (T,
// widened in registers), the row loaded once for all M. Each dot product is summed the
// same way whatever M is (two accumulators, even and odd 8-element halves of every 16,
// the last 8 into the first, then the last d % 8 one by one), so a row's score does not
// depend on how many rows it was computed with.
template <int M, typename T>
__attribute__((always_inline)) inline void dot_rows(const float* q, int64_t d, const T* k, float* s, int64_t lds) {
  __m256 acc0[M], acc1[M];
#pragma GCC unroll 4
  for (int r = 0; r < M; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= d; e += 16) {
    const __m256 k0 = load8(k + e), k1 = load8(k + e + 8);
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r) {
      acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * d + e), k0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * d + e + 8), k1, acc1[r]);
    }
  }
  if (e + 8 <= d) {
    const __m256 k0 = load8(k + e);
#pragma GCC unroll 4
    for (int r = 0; r < M; ++r) acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * d + e), k0, acc0[r]);
    e += 8;
  }
#pragma GCC unroll 4
  for (int r = 0; r < M; ++r) s[r * lds] = dot_tail(hsum(_mm256_add_ps(acc0[r], acc1[r])), q + r * d, k, e, d);
}

// s[j] = q . k_j for the 4 K rows k_j = k + j * ldk (T, widened in registers) and one
// float query row: per key exactly dot_rows<1>'s arithmetic (the same accumulators, hsum's
// order of lane additions done for the 4 keys together, the same tail), so the scores
// are bitwise dot_rows<1>'s, at a quarter of its horizontal sums and with 8 independent
// FMA chains where one key has 2.
template <typename T>
__attribute__((always_inline)) inline void dot_keys4(const float* q, int64_t d, const T* k, int64_t ldk, float* s) {
  __m256 acc0[4], acc1[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= d; e += 16) {
    const __m256 q0 = _mm256_loadu_ps(q + e), q1 = _mm256_loadu_ps(q + e + 8);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      acc0[j] = _mm256_fmadd_ps(q0, load8(k + j * ldk + e), acc0[j]);
      acc1[j] = _mm256_fmadd_ps(q1, load8(k + j * ldk + e + 8), acc1[j]);
    }
  }
  if (e + 8 <= d) {
    const __m256 q0 = _mm256_loadu_ps(q + e);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc0[j] = _mm256_fmadd_ps(q0, load8(k + j * ldk + e), acc0[j]);
    e += 8;
  }
  const __m256 a = _mm256_add_ps(acc0[0], acc1[0]), b = _mm256_add_ps(acc0[1], acc1[1]);
  const __m256 c = _mm256_add_ps(acc0[2], acc1[2]), dd = _mm256_add_ps(acc0[3], acc1[3]);
  // hsum: lanes i + (i + 4), then (0 + 2, 1 + 3), then 0 + 1. For two keys at once:
  // [x_lo | y_lo] + [x_hi | y_hi].
  const __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  const __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, dd, 0x20), _mm256_permute2f128_ps(c, dd, 0x31));
  // Per 128-bit half: [ab0 + ab2, ab1 + ab3, cd0 + cd2, cd1 + cd3] (a and c low, b and d high).
  const __m256 h = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  // [h0 + h1, h2 + h3] per half: lanes 0, 1 are a, c; lanes 4, 5 are b, d.
  const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(h, h, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm256_shuffle_ps(h, h, _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  s[0] = dot_tail(lanes[0], q, k, e, d);
  s[1] = dot_tail(lanes[4], q, k + ldk, e, d);
  s[2] = dot_tail(lanes[1], q, k + 2 * ldk, e, d);
  s[3] = dot_tail(lanes[5], q, k + 3 * ldk, e, d);
}

// How far ahead of the row path's reads its prefetches go: about 4 KiB of K or V rows.
constexpr int64_t ROW_AHEAD_BYTES = 4096;

#ifdef __AVX512F__
// The AVX-512 row path: the same products in 16-lane registers, bitwise the 8-lane
// code's. A 16-lane accumulator over elements [e, e + 16) holds dot_rows' two 8-lane
// ones side by side (the same FMA chains per lane), and hsums below adds its lanes in
// hsum's order, for up to 16 accumulators at once.

// 16 elements of x as floats (bf16 widened, fp16 converted), or the first 8 with lanes
// 8-15 zero (load8_512: dot_rows' last 8 elements, which go to its first accumulator).
template <typename T>
inline __m512 load16(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
}
template <typename T>
inline __m512 load8_512(const T* x) {
  return _mm512_zextps256_ps512(load8(x));
}

// The elements of x in `mask`'s lanes as floats, the other lanes zero (nothing else is read).
template <typename T>
inline __m512 load16_masked(const T* x, __mmask16 mask) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mask, x);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, x));
  }
}

// out[i] = hsum(low 8 lanes of a[i] + high 8 lanes) for i < N (a multiple of 4, at most
// 16), in hsum's order of additions: lanes i + (i + 8), then i + (i + 4), then (0 + 2,
// 1 + 3), then 0 + 1; each step done for several accumulators in one register.
template <int N>
__attribute__((always_inline)) inline void hsums(const __m512* a, float* out) {
  static_assert(N % 4 == 0 && N <= 16);
  // [x low 8 | y low 8] + [x high 8 | y high 8]: 8 partial sums of a[2i], then of a[2i + 1].
  __m512 h8[N / 2];
#pragma GCC unroll 8
  for (int i = 0; i < N / 2; ++i) {
    h8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // 128-bit chunk c: 4 partial sums of a[4j + c].
  __m512 h4[N / 4];
#pragma GCC unroll 4
  for (int j = 0; j < N / 4; ++j) {
    h4[j] = _mm512_add_ps(_mm512_shuffle_f32x4(h8[2 * j], h8[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(h8[2 * j], h8[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // Chunk c: [(0 + 2), (1 + 3)] of a[c] (and a[8 + c]), then of a[4 + c] (a[12 + c]).
  const __m512 x0 = h4[0], y0 = N >= 8 ? h4[1] : h4[0];
  const __m512 h2a = _mm512_add_ps(_mm512_shuffle_ps(x0, y0, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(x0, y0, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 h2b = h2a;
  if constexpr (N > 8) {
    const __m512 x1 = h4[2], y1 = N == 16 ? h4[3] : h4[2];
    h2b = _mm512_add_ps(_mm512_shuffle_ps(x1, y1, _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_shuffle_ps(x1, y1, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Lane 4c + t: the sum of a[c + 4t].
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(h2a, h2b, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(h2a, h2b, _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sums);
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) out[i] = lanes[4 * (i % 4) + i / 4];
}

// s[r * lds + j] = q_r . k_j for R float query rows d apart and KB K rows ldk apart (T,
// widened in registers): per score bitwise dot_rows<1>, R x KB 16-lane accumulators
// (R * KB a multiple of 4, at most 16), each K row loaded once for the R rows.
template <int R, int KB, typename T>
__attribute__((always_inline)) inline void dot_block(const float* q, int64_t d, const T* k, int64_t ldk, float* s,
                                                     int64_t lds) {
  constexpr int N = (R * KB + 3) / 4 * 4;
  static_assert(N <= 16);
  __m512 acc[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) acc[i] = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= d; e += 16) {
    __m512 kv[KB];
#pragma GCC unroll 16
    for (int j = 0; j < KB; ++j) kv[j] = load16(k + j * ldk + e);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + r * d + e);
#pragma GCC unroll 16
      for (int j = 0; j < KB; ++j) acc[r * KB + j] = _mm512_fmadd_ps(qv, kv[j], acc[r * KB + j]);
    }
  }
  if (e + 8 <= d) {  // lanes 0-7 only
    __m512 kv[KB];
#pragma GCC unroll 16
    for (int j = 0; j < KB; ++j) kv[j] = load8_512(k + j * ldk + e);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 qv = _mm512_zextps256_ps512(_mm256_loadu_ps(q + r * d + e));
#pragma GCC unroll 16
      for (int j = 0; j < KB; ++j) acc[r * KB + j] = _mm512_mask3_fmadd_ps(qv, kv[j], acc[r * KB + j], 0xFF);
    }
    e += 8;
  }
  float sums[N];
  hsums<N>(acc, sums);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int j = 0; j < KB; ++j) s[r * lds + j] = dot_tail(sums[r * KB + j], q + r * d, k + j * ldk, e, d);
  }
}

#endif

// s[r * lds] = q_r . k for the `rows` query rows and one K row: dot_rows in groups of 4.
template <typename T>
__attribute__((always_inline)) inline void dot_rows_any(const float* q, int64_t rows, int64_t d, const T* k, float* s,
                                                        int64_t lds) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_rows<4>(q + r * d, d, k, s + r * lds, lds);
  switch (rows - r) {
    case 3: dot_rows<3>(q + r * d, d, k, s + r * lds, lds); break;
    case 2: dot_rows<2>(q + r * d, d, k, s + r * lds, lds); break;
    case 1: dot_rows<1>(q + r * d, d, k, s + r * lds, lds); break;
    default: break;
  }
}

#ifdef __AVX512F__
// row_scores for R <= 4 rows: KB = 16 / R keys at a time (16 accumulators; 3 rows: 4
// keys), prefetching the K rows a block ahead (and KB of the rows `ahead` per KB keys);
// the last cols % KB keys by dot_rows.
template <int R, typename T>
inline void row_scores_r(const float* q, const T* k, int64_t ldk, int64_t cols, int64_t d, float* s, int64_t lds,
                         const RowsAhead<T>& ahead) {
  constexpr int KB = R == 3 ? 4 : 16 / R;
  const int64_t AHEAD = std::clamp<int64_t>(ROW_AHEAD_BYTES / (d * sizeof(T)), 4, 32);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  int64_t c = 0;
  for (; c + KB <= cols; c += KB) {
    for (int64_t j = c + AHEAD; j < std::min(c + AHEAD + KB, cols); ++j) prefetch_row(k + j * ldk, d);
    prefetch_ahead(ahead, c, c + KB, 0, bytes);
    dot_block<R, KB>(q, d, k + c * ldk, ldk, s + c, lds);
  }
  prefetch_ahead(ahead, c, ahead.n, 0, bytes);
  for (; c < cols; ++c) dot_rows<R>(q, d, k + c * ldk, s + c, lds);
}
#endif

// s[r * lds + c] = q_r . k_c for r < rows, c < cols: float query rows d apart, K rows
// (T, widened in registers) ldk apart, read in place, each loaded once per 4 query rows
// (dot_rows; with AVX-512 dot_block), a few keys behind a prefetch (the rows of
// (B, S, H, D) tensors are a page apart or more). The forward's row path and the backward
// of its calls both form S here, so the backward's P = exp(S - lse) uses the very scores
// the forward's lse summed; every score is dot_rows<1>'s, whatever the number of rows.
// (Forward-only calls of 9-16 rows take column_scores below instead.) The rows `ahead`
// are prefetched as the keys go: with AVX-512 as many as keys done, the rest before the
// last few; without, a few lines per key (AheadLines).
template <typename T>
inline void row_scores(const float* q, int64_t rows, const T* k, int64_t ldk, int64_t cols, int64_t d, float* s,
                       int64_t lds, const RowsAhead<T>& ahead = {}) {
  constexpr int64_t AHEAD = 8;
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  int64_t c = 0;
#ifdef __AVX512F__
  switch (rows) {
    case 1: return row_scores_r<1>(q, k, ldk, cols, d, s, lds, ahead);
    case 2: return row_scores_r<2>(q, k, ldk, cols, d, s, lds, ahead);
    case 3: return row_scores_r<3>(q, k, ldk, cols, d, s, lds, ahead);
    case 4: return row_scores_r<4>(q, k, ldk, cols, d, s, lds, ahead);
    default: break;
  }
  // More rows: 4 keys at a time, the 4 K rows dotted with every group of 4 query rows
  // while they are in L1.
  for (; c + 4 <= cols; c += 4) {
    for (int64_t j = c + AHEAD; j < std::min(c + AHEAD + 4, cols); ++j) prefetch_row(k + j * ldk, d);
    prefetch_ahead(ahead, c, c + 4, 0, bytes);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) dot_block<4, 4>(q + r * d, d, k + c * ldk, ldk, s + r * lds + c, lds);
    switch (rows - r) {
      case 3: dot_block<3, 4>(q + r * d, d, k + c * ldk, ldk, s + r * lds + c, lds); break;
      case 2: dot_block<2, 4>(q + r * d, d, k + c * ldk, ldk, s + r * lds + c, lds); break;
      case 1: dot_block<1, 4>(q + r * d, d, k + c * ldk, ldk, s + r * lds + c, lds); break;
      default: break;
    }
  }
  prefetch_ahead(ahead, c, ahead.n, 0, bytes);
#else
  // (the rows `ahead`: a few lines per key, AheadLines)
  AheadLines<T> lines(ahead, bytes);
  const int64_t steps = lines.steps_over(cols);
  if (rows == 1) {  // decoding: 4 keys at a time (dot_keys4), bitwise dot_rows<1>
    for (; c + 4 <= cols; c += 4) {
      for (int64_t j = c + AHEAD; j < std::min(c + AHEAD + 4, cols); ++j) prefetch_row(k + j * ldk, d);
      for (int64_t t = 0; t < 4 * steps; ++t) lines.step();
      dot_keys4(q, d, k + c * ldk, ldk, s + c);
    }
  }
#endif
  for (; c < cols; ++c) {
    const T* kc = k + c * ldk;
    if (c + AHEAD < cols) prefetch_row(kc + AHEAD * ldk, d);
#ifndef __AVX512F__
    for (int64_t t = 0; t < steps; ++t) lines.step();
#endif
    dot_rows_any(q, rows, d, kc, s + c, lds);
  }
#ifndef __AVX512F__
  lines.rest();
#endif
}

#ifdef __AVX512F__
// 16 x 16 floats transposed in registers: out[c] lane r = in[r] lane c.
inline void transpose16(const __m512 in[16], __m512 out[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(in[i], in[i + 1]), t[i + 1] = _mm512_unpackhi_ps(in[i], in[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c]: column c of each 4-column lane, rows i..i+3
    const __m512d t0 = _mm512_castps_pd(t[i]), t1 = _mm512_castps_pd(t[i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[i + 2]), t3 = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)), u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)), u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int c = 0; c < 4; ++c) {  // lanes L of u[c], u[4 + c], u[8 + c], u[12 + c] make column 4L + c
    const __m512 even0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 even1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 odd0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 odd1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    out[c] = _mm512_shuffle_f32x4(even0, even1, 0x88), out[8 + c] = _mm512_shuffle_f32x4(even0, even1, 0xDD);
    out[4 + c] = _mm512_shuffle_f32x4(odd0, odd1, 0x88), out[12 + c] = _mm512_shuffle_f32x4(odd0, odd1, 0xDD);
  }
}

// 16 x 16 floats (row stride ld) transposed in registers: out[c][r] = in[r * ld + c].
inline void transpose16(const float* in, int64_t ld, __m512 out[16]) {
  __m512 rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_ps(in + i * ld);
  transpose16(rows, out);
}
#endif

// Scores with the query rows in the lanes: for calls no backward follows (a backward
// recomputes S by row_scores, which sums each score in another order) with more rows than
// row_scores serves well (its 4 x 4 blocks spend about a fifth of their instructions on
// horizontal sums; here there are none). Query rows: COLUMN_ROWS at most, and more than
// half of them (fewer would leave most lanes idle: row_scores).
constexpr int64_t COLUMN_ROWS = 16;
inline bool use_columns(int64_t rows) { return rows > COLUMN_ROWS / 2 && rows <= COLUMN_ROWS; }

// A column score's lane sums its row's products in element order in blocks of this many
// elements, each block's sum from 0 and then added to the running total: one chain over
// every element rounded against a total that grew with them (fp32, logits of about 10:
// 2.2x the naive formula's error, a third of the calls past the tests' rule), the blocks
// about as row_scores' 16 partial sums.
constexpr int64_t COLUMN_BLOCK = 16;

// The query rows (d elements, row stride d) transposed for column_scores: element e of
// row r at qt[e * COLUMN_ROWS + r], the lanes of rows past `rows` 0.
inline void transpose_rows(const float* q, int64_t rows, int64_t d, float* qt) {
  for (int64_t e = 0; e < d; ++e) {
    for (int64_t r = 0; r < COLUMN_ROWS; ++r) qt[e * COLUMN_ROWS + r] = r < rows ? q[r * d + e] : 0.f;
  }
}

#ifdef __AVX512F__
// column_scores' frame for one element type: cols[j] = the dots of key j (key j's row at
// krow[j]) for j < 16, one lane per query row. dots(k, cols) puts 8 keys' dots (key i's row
// at k[i]) in cols[i]'s lanes; keys past n (at most 16) repeat key n - 1 (read in bounds,
// their lanes left to the caller), a half past n is 0.
template <typename K, typename Dots>
__attribute__((always_inline)) inline void column_dots_by(const K* const* krow, int64_t n, const Dots& dots,
                                                          __m512 cols[16]) {
  for (int64_t j0 = 0; j0 < 16; j0 += 8) {
    if (j0 >= n) {
      for (int j = 0; j < 8; ++j) cols[j0 + j] = _mm512_setzero_ps();
      continue;
    }
    const K* k[8];
    for (int64_t j = 0; j < 8; ++j) k[j] = krow[std::min(j0 + j, n - 1)];
    dots(k, cols + j0);
  }
}

// s[r * lds + j] = scale * (the dots of key j) for r < rows, j < n (at most 16): the
// columns of column_dots_by, a 16 x 16 transpose makes the score rows.
template <typename K, typename Dots>
__attribute__((always_inline)) inline void column_scores_by(const K* const* krow, int64_t rows, int64_t n, float scale,
                                                            float* s, int64_t lds, const Dots& dots) {
  __m512 cols[16], out[16];
  column_dots_by(krow, n, dots, cols);
  transpose16(cols, out);
  const __mmask16 keys = n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) _mm512_mask_storeu_ps(s + r * lds, keys, _mm512_mul_ps(vscale, out[r]));
}

// The same scores left in columns, as a block's column_softmax takes them: st[j *
// COLUMN_ROWS + r] = scale * (the dots of key j) for j < n (at most 16), every lane (rows
// past the query rows hold the dots of their zero lanes of q).
template <typename K, typename Dots>
__attribute__((always_inline)) inline void column_scores_to_by(const K* const* krow, int64_t n, float scale,
                                                               float* st, const Dots& dots) {
  __m512 cols[16];
  column_dots_by(krow, n, dots, cols);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; ++j) _mm512_storeu_ps(st + j * COLUMN_ROWS, _mm512_mul_ps(vscale, cols[j]));
}

// s[r * lds + j] = q_r . k_j for r < rows (at most COLUMN_ROWS), j < n (at most 16): qt the
// rows transposed (transpose_rows, q already scaled), key j's float row at krow[j]; each
// lane the FMAs of its row's d products in element order, in COLUMN_BLOCKs, 8 keys in
// flight (8 chains cover the FMA latency); a line of `ahead` prefetched every other element
// (16 rows of `ahead` take a 16-key group's two calls of 8 keys).
inline void column_scores(const float* qt, int64_t rows, const float* const* krow, int64_t n, int64_t d, float* s,
                          int64_t lds, AheadLines<float>& ahead) {
  column_scores_by(krow, rows, n, 1.f, s, lds, [&](const float* const* k, __m512* cols) {
    for (int64_t e0 = 0; e0 < d; e0 += COLUMN_BLOCK) {
      __m512 acc[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t e = e0; e < std::min(d, e0 + COLUMN_BLOCK); ++e) {
        if (e & 1) ahead.step();
        const __m512 qv = _mm512_load_ps(qt + e * COLUMN_ROWS);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_set1_ps(k[j][e]), acc[j]);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) cols[j] = e0 == 0 ? acc[j] : _mm512_add_ps(cols[j], acc[j]);
    }
  });
}

// Scores in columns masked by each row's visible keys: st[j * COLUMN_ROWS + r] = -inf
// unless key_lo[r] <= j < key_hi[r] (j < n; COLUMN_ROWS bounds each).
inline void mask_columns(float* st, int64_t n, const int32_t* key_lo, const int32_t* key_hi) {
  const __m512i lo = _mm512_loadu_si512(key_lo), hi = _mm512_loadu_si512(key_hi);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; ++j) {
    const __m512i key = _mm512_set1_epi32(static_cast<int>(j));
    const __mmask16 hidden = _mm512_cmpgt_epi32_mask(lo, key) | _mm512_cmple_epi32_mask(hi, key);
    _mm512_mask_storeu_ps(st + j * COLUMN_ROWS, hidden, neg_inf);
  }
}

#else
// The AVX2 column_scores' frame for one element type: keys 4 at a time (past n: key n - 1
// again, not stored), each lane's sums in COLUMN_BLOCKs (the first stored to cols, the
// others added), then the columns of n keys as score rows: s[r * lds + j] = cols[j][r] for
// r < rows. block(k, e0, end, lo, hi) adds the FMAs of elements [e0, end) of the 4 keys
// (key j's row at k[j]) to lo[j] (rows 0-7) and hi[j] (rows 8-15), from 0.
template <typename K, typename Block>
__attribute__((always_inline)) inline void column_scores_by(const K* const* krow, int64_t rows, int64_t n, int64_t d,
                                                            float* s, int64_t lds, const Block& block) {
  alignas(32) float cols[16][COLUMN_ROWS];  // cols[j][r]: key j's dot with row r
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const K* k[4];
    for (int64_t j = 0; j < 4; ++j) k[j] = krow[std::min(j0 + j, n - 1)];
    for (int64_t e0 = 0; e0 < d; e0 += COLUMN_BLOCK) {
      __m256 lo[4], hi[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
      block(k, e0, std::min(d, e0 + COLUMN_BLOCK), lo, hi);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        float* c = cols[j0 + j];
        _mm256_store_ps(c, e0 == 0 ? lo[j] : _mm256_add_ps(_mm256_load_ps(c), lo[j]));
        _mm256_store_ps(c + 8, e0 == 0 ? hi[j] : _mm256_add_ps(_mm256_load_ps(c + 8), hi[j]));
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) s[r * lds + j] = cols[j][r];
  }
}

// column_scores (as above, the same FMAs per lane in the same order: bitwise the AVX-512
// scores) in two 8-lane vectors of rows, 4 keys at a time (8 chains cover the FMA latency;
// 6 loads per 8 FMAs, where row_scores' dot_rows take 10 and a horizontal sum per score);
// a line of `ahead` every fourth element.
inline void column_scores(const float* qt, int64_t rows, const float* const* krow, int64_t n, int64_t d, float* s,
                          int64_t lds, AheadLines<float>& ahead) {
  column_scores_by(krow, rows, n, d, s, lds, [&](const float* const* k, int64_t e0, int64_t end, __m256* lo, __m256* hi) {
    for (int64_t e = e0; e < end; ++e) {
      if ((e & 3) == 3) ahead.step();
      const __m256 qa = _mm256_load_ps(qt + e * COLUMN_ROWS), qb = _mm256_load_ps(qt + e * COLUMN_ROWS + 8);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 kv = _mm256_broadcast_ss(k[j] + e);
        lo[j] = _mm256_fmadd_ps(qa, kv, lo[j]);
        hi[j] = _mm256_fmadd_ps(qb, kv, hi[j]);
      }
    }
  });
}

// column_scores for bf16 K rows: each pair of elements (e, e + 1) of a key is one 32-bit
// load broadcast to every lane and widened by a shift (e) and a mask (e + 1), so that each
// lane takes the float code's FMAs in the same order on the widened K (blocks start at
// even elements, so pairs stay whole; an odd d's last element alone).
inline void column_scores(const float* qt, int64_t rows, const c10::BFloat16* const* krow, int64_t n, int64_t d,
                          float* s, int64_t lds, AheadLines<c10::BFloat16>& ahead) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  column_scores_by(krow, rows, n, d, s, lds,
                   [&](const c10::BFloat16* const* k, int64_t e0, int64_t end, __m256* lo, __m256* hi) {
    int64_t e = e0;
    for (; e + 2 <= end; e += 2) {
      if ((e & 7) == 6) ahead.step();
      const __m256 qa0 = _mm256_load_ps(qt + e * COLUMN_ROWS), qb0 = _mm256_load_ps(qt + e * COLUMN_ROWS + 8);
      const __m256 qa1 = _mm256_load_ps(qt + (e + 1) * COLUMN_ROWS);
      const __m256 qb1 = _mm256_load_ps(qt + (e + 1) * COLUMN_ROWS + 8);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        int32_t pair;
        std::memcpy(&pair, k[j] + e, sizeof(pair));
        const __m256i both = _mm256_set1_epi32(pair);
        const __m256 k0 = _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
        const __m256 k1 = _mm256_castsi256_ps(_mm256_and_si256(both, high));
        lo[j] = _mm256_fmadd_ps(qa0, k0, lo[j]);
        hi[j] = _mm256_fmadd_ps(qb0, k0, hi[j]);
        lo[j] = _mm256_fmadd_ps(qa1, k1, lo[j]);
        hi[j] = _mm256_fmadd_ps(qb1, k1, hi[j]);
      }
    }
    if (e < end) {
      const __m256 qa = _mm256_load_ps(qt + e * COLUMN_ROWS), qb = _mm256_load_ps(qt + e * COLUMN_ROWS + 8);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 kv = _mm256_set1_ps(static_cast<float>(k[j][e]));
        lo[j] = _mm256_fmadd_ps(qa, kv, lo[j]);
        hi[j] = _mm256_fmadd_ps(qb, kv, hi[j]);
      }
    }
  });
}
#endif

// Keys per chunk of row_pv's sums (the note below).
constexpr int64_t ROW_PV_CHUNK = 32;

// The P V tiles and strips sum a call's keys from 0 in registers and add that sum to O at
// the end, rather than continuing O's own chain of FMAs: O's chain ran over every key of
// the row, and with attention spread over thousands of keys each FMA rounded against an
// O that had grown with the keys (fp32, 16K keys: 10-25x the naive formula's error, past
// the tests' rule). Now O is added to once per call (at most 128 keys: pv_block's chunks).

// o[r][0, 16) += sum_k p[r * ldp + k] b[k * ldb + (0, 16)] for r < M, k < n, the sum held
// in registers, then added to o: B's rows of 16 elements ldb apart (T, widened in
// registers), the forward's packed V panels (ldb = 16) and the row path's V rows in place.
// With PREFETCH, also prefetches next_len elements at `next` + k * ldb at each of the
// first fetch_n steps (a line of the panel the following tiles read, or a V row a few keys
// ahead).
// With `overwrite`, the sum is stored as o instead (o's rows untouched before: the first
// product into them, which then need not be zeroed).
template <int M, bool PREFETCH = false, typename T = float>
__attribute__((always_inline)) inline void pv_tile(const float* p, int64_t ldp, const T* b, int64_t ldb, int64_t n,
                                                   float* o, int64_t ldo, const T* next = nullptr,
                                                   int64_t next_len = NR, int64_t fetch_n = INT64_MAX,
                                                   bool overwrite = false) {
  __m256 c0[M], c1[M];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
    const T* bk = b + k * ldb;
    const __m256 b0 = load8(bk), b1 = load8(bk + 8);
    if constexpr (PREFETCH) {
      if (k < fetch_n) prefetch_row(next + k * ldb, next_len);
    }
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m256 a = _mm256_broadcast_ss(p + r * ldp + k);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    _mm256_storeu_ps(o + r * ldo, overwrite ? c0[r] : _mm256_add_ps(_mm256_loadu_ps(o + r * ldo), c0[r]));
    _mm256_storeu_ps(o + r * ldo + 8, overwrite ? c1[r] : _mm256_add_ps(_mm256_loadu_ps(o + r * ldo + 8), c1[r]));
  }
}

#ifdef __AVX512F__
// o[r][j] += sum_k p[r * ldp + k] v[k * ldv + j] for r < M, k < n and the W * 16 columns
// j from 0 (only those in `mask[w]` of the w-th 16 when MASKED): the sums in M x W 16-lane
// registers from 0, then added to o, each V row (T, widened in registers) loaded once for
// the M rows. Per output element the FMAs of axpy (into row_pv's zeroed sums) / pv_tile
// in the same key order (bitwise theirs).
// With PREFETCH, also prefetches next_len elements at next + k * ldv at each of the first
// fetch_n steps; every key takes `steps` steps of `lines`. With SUMS, o holds running sums
// instead: they are loaded, the keys' FMAs continue them and they are stored back (o = o +
// sum over the keys in one chain, where the default adds a sum from 0 to o), so that a
// chunk's sums can be taken in parts.
template <int M, int W, bool MASKED, bool PREFETCH, typename T, bool SUMS = false>
__attribute__((always_inline)) inline void pv_strip(const float* p, int64_t ldp, const T* v, int64_t ldv, int64_t n,
                                                    float* o, int64_t ldo, const __mmask16* mask, const T* next,
                                                    int64_t next_len, int64_t fetch_n, AheadLines<T>& lines,
                                                    int64_t steps) {
  // Whole bf16 strips in pairs of registers: c[r][2i] the even columns of 32, c[r][2i + 1]
  // the odd ones, so one 64-byte load of 32 V elements widens with a shift (even) and a
  // mask (odd) instead of two zero-extensions and shifts; the outputs are split into even
  // and odd columns once per strip (the same FMAs per output element).
  // (Running sums stay in column order: SUMS widens bf16 as the other types.)
  constexpr bool PAIRS = std::is_same_v<T, c10::BFloat16> && !MASKED && W % 2 == 0 && !SUMS;
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  __m512 c[M][W];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) {
      float* ow = o + r * ldo + w * NR;
      if constexpr (!SUMS) {
        c[r][w] = _mm512_setzero_ps();
      } else {
        c[r][w] = MASKED ? _mm512_maskz_loadu_ps(mask[w], ow) : _mm512_loadu_ps(ow);
      }
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    const T* vk = v + k * ldv;
    __m512 b[W];
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) {
      if constexpr (PAIRS) {
        if (w % 2 == 0) {
          const __m512i x = _mm512_loadu_si512(vk + w * NR);
          b[w] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
          b[w + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
        }
      } else {
        b[w] = MASKED ? load16_masked(vk + w * NR, mask[w]) : load16(vk + w * NR);
      }
    }
    if constexpr (PREFETCH) {
      if (k < fetch_n) prefetch_row(next + k * ldv, next_len);
    }
    for (int64_t i = 0; i < steps; ++i) lines.step();
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(p[r * ldp + k]);
#pragma GCC unroll 8
      for (int w = 0; w < W; ++w) c[r][w] = _mm512_fmadd_ps(x, b[w], c[r][w]);
    }
  }
  // (o + c, or c alone when o held the sums)
  auto out = [&](const float* ow, __m512 x, __mmask16 m) {
    return SUMS ? x : _mm512_add_ps(MASKED ? _mm512_maskz_loadu_ps(m, ow) : _mm512_loadu_ps(ow), x);
  };
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) {
      float* ow = o + r * ldo + w * NR;
      if constexpr (PAIRS) {
        if (w % 2 == 0) {
          _mm512_storeu_ps(ow, out(ow, _mm512_permutex2var_ps(c[r][w], lo_idx, c[r][w + 1]), 0xFFFF));
          _mm512_storeu_ps(ow + NR, out(ow + NR, _mm512_permutex2var_ps(c[r][w], hi_idx, c[r][w + 1]), 0xFFFF));
        }
      } else if (MASKED) {
        _mm512_mask_storeu_ps(ow, mask[w], out(ow, c[r][w], mask[w]));
      } else {
        _mm512_storeu_ps(ow, out(ow, c[r][w], 0xFFFF));
      }
    }
  }
}

// row_pv_m's strips for m rows: W registers of 16 columns each.
constexpr int row_pv_width(int64_t m) { return m <= 2 ? 8 : (m <= 4 ? 4 : 2); }

// row_pv for M rows: strips of W * 16 output columns (M * W <= 16 registers; the last
// strip masked), keys in chunks of CHUNK so a chunk's V rows stay in L1 across the
// strips, the first strip of a chunk prefetching the V rows AHEAD keys on (all columns);
// each key of a strip takes `steps` steps through `lines` (row_pv_groups').
// With SUMS, o holds running sums that the keys continue (row_pv_sums).
template <int M, typename T, bool SUMS = false>
inline void row_pv_m(const float* p, int64_t ldp, const T* v, int64_t ldv, int64_t n, int64_t dv, float* o,
                     int64_t ldo, AheadLines<T>& lines, int64_t steps) {
  constexpr int W = row_pv_width(M);
  constexpr int64_t CHUNK = ROW_PV_CHUNK, STRIP = W * NR;
  const int64_t AHEAD = std::clamp<int64_t>(ROW_AHEAD_BYTES / (dv * sizeof(T)), 4, 32);
  const int64_t full = dv / STRIP * STRIP;
  __mmask16 mask[W];
  for (int w = 0; w < W; ++w) {
    const int64_t cols = std::clamp<int64_t>(dv - full - w * NR, 0, NR);
    mask[w] = static_cast<__mmask16>((1u << cols) - 1);
  }
  for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {
    const int64_t keys = std::min(CHUNK, n - k0);
    // The first strip prefetches rows k0 + AHEAD + k for its first `fetched` keys.
    const int64_t fetched = std::max<int64_t>(0, std::min(keys, n - k0 - AHEAD));
    const float* pk = p + k0;
    const T* vk = v + k0 * ldv;
    for (int64_t j = 0; j < dv; j += STRIP) {
      auto strip = [&](auto masked) {
        constexpr bool MASKED = decltype(masked)::value;
        if (j == 0 && fetched > 0) {
          pv_strip<M, W, MASKED, true, T, SUMS>(pk, ldp, vk, ldv, keys, o, ldo, mask, vk + AHEAD * ldv, dv, fetched,
                                                lines, steps);
        } else {
          pv_strip<M, W, MASKED, false, T, SUMS>(pk, ldp, vk + j, ldv, keys, o + j, ldo, mask, vk, 0, 0, lines, steps);
        }
      };
      if (j < full) {
        strip(std::false_type{});
      } else {
        strip(std::true_type{});
      }
    }
  }
}
// row_pv_m over `rows` rows in groups of up to 8 (GQA-packed views: up to 16 rows), the
// rows `ahead` prefetched through every group's strips a few lines a key (AheadLines; a
// burst per strip of the first group before, which stalled the products behind it: float
// one query 6-12% slower, benchmarks/RESULTS.md).
template <typename T, bool SUMS>
inline void row_pv_groups(const float* p, int64_t ldp, int64_t rows, const T* v, int64_t ldv, int64_t n, int64_t dv,
                          float* o, int64_t ldo, const RowsAhead<T>& ahead) {
  AheadLines<T> lines(ahead, dv * static_cast<int64_t>(sizeof(T)));
  int64_t key_steps = 0;  // (every group's strips' keys)
  for (int64_t r = 0; r < rows; r += 8) {
    const int64_t strip = row_pv_width(std::min<int64_t>(8, rows - r)) * NR;
    key_steps += (dv + strip - 1) / strip * n;
  }
  const int64_t steps = lines.steps_over(key_steps);
  for (int64_t r = 0; r < rows; r += 8) {
    const float* pr = p + r * ldp;
    float* orow = o + r * ldo;
    switch (std::min<int64_t>(8, rows - r)) {
      case 8: row_pv_m<8, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
      case 7: row_pv_m<7, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
      case 6: row_pv_m<6, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
      case 5: row_pv_m<5, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
      case 4: row_pv_m<4, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
      case 3: row_pv_m<3, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
      case 2: row_pv_m<2, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
      default: row_pv_m<1, T, SUMS>(pr, ldp, v, ldv, n, dv, orow, ldo, lines, steps); break;
    }
  }
  lines.rest();
}
#else
// sums[r * lds + e] += sum_k p[r * ldp + k] v[k * ldv + e] for r < rows, k < n, e < dv, key
// by key: 4 keys at a time into pairs of rows (axpy_keys), the last n % 4 by axpy; with
// `prefetch`, V rows 8 keys on, up to key fetch_n. Each 4 keys also take their share of
// `lines` (steps_over the call's n / 4 groups: a call of several chunks or row passes,
// row_pv's, issues them all in its first; under 4 keys, none: the caller's rest()).
template <typename T>
inline void axpy_sums(const float* p, int64_t ldp, int64_t rows, const T* v, int64_t ldv, int64_t n, int64_t dv,
                      float* sums, int64_t lds, bool prefetch, int64_t fetch_n, AheadLines<T>& lines) {
  constexpr int64_t AHEAD = 8, KEYS = 4;
  const int64_t steps = lines.steps_over(n / KEYS);
  int64_t c = 0;
  for (; c + KEYS <= n; c += KEYS) {
    const T* vc = v + c * ldv;
    if (prefetch) {
      for (int64_t j = c + AHEAD; j < std::min(c + AHEAD + KEYS, fetch_n); ++j) prefetch_row(v + j * ldv, dv);
    }
    for (int64_t t = 0; t < steps; ++t) lines.step();
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) axpy_keys<2, KEYS>(p + r * ldp + c, ldp, vc, ldv, dv, sums + r * lds, lds);
    if (r < rows) axpy_keys<1, KEYS>(p + r * ldp + c, ldp, vc, ldv, dv, sums + r * lds, lds);
  }
  for (; c < n; ++c) {  // (the last keys % 4: their rows were prefetched above)
    for (int64_t r = 0; r < rows; ++r) axpy(p[r * ldp + c], v + c * ldv, sums + r * lds, dv);
  }
}
#endif

// o[r * ldo + e] += sum_c p[r * ldp + c] v[c * ldv + e] for r < rows, c < n, e < dv: the
// forward's row path's P V, V rows (T, widened in registers) read in place.
// Float, few rows, or V rows under 16 columns: 4 keys at a time into every pair of output
// rows (axpy_keys) while their V rows are in L1, a prefetch 8 keys ahead, the last n % 4
// keys one by one (axpy). More 16-bit rows: 16 output columns of up to 6 rows at a time in
// registers (pv_tile), keys in chunks of 32 so a chunk's V rows stay in L1 across the
// strips and row groups, the first strip of a chunk prefetching the V rows 8 keys ahead
// (all their columns); columns past the last multiple of 16 by axpy. axpy_keys loads and
// stores the outputs once per 4 keys and widens a 16-bit V row once per pair of output
// rows; the strips pass over each chunk's rows dv / 16 times and widen once. Which is
// faster depends on the element type and the row count; within MAX_ROW_QUERIES float
// stays with axpy_keys, faster than the strips when the V rows come from memory (the
// strips read them dv / 16 times, axpy_keys once) (benchmarks/RESULTS.md 'What was tried').
// Either way a chunk of 32 keys is summed from 0 and added to O once (the note above
// pv_tile): axpy_keys into a buffer. With AVX-512 every type and row count goes through
// row_pv_m's register strips (up to 128 columns of a row in 16-lane registers, no per-key
// loads and stores of the outputs): the same FMAs per output element in the same order,
// so bitwise the 8-lane code's.
// (The rows `ahead`: prefetched through row_pv_m's strips, row_pv_groups; without AVX-512
// a few lines before each pv_tile, or each 4 keys of axpy_sums.)
template <typename T>
inline void row_pv(const float* p, int64_t ldp, int64_t rows, const T* v, int64_t ldv, int64_t n, int64_t dv, float* o,
                   int64_t ldo, const RowsAhead<T>& ahead = {}) {
#ifdef __AVX512F__
  row_pv_groups<T, false>(p, ldp, rows, v, ldv, n, dv, o, ldo, ahead);
#else
  AheadLines<T> lines(ahead, dv * static_cast<int64_t>(sizeof(T)));
  // The more widening a V element costs (bf16 2 instructions per 8, fp16 1), the sooner
  // the strips win.
  constexpr int64_t AXPY_ROWS = std::is_same_v<T, c10::Half> ? 6 : 2;
  // Keys per strip pass: the strips read a chunk's V rows once per 16 columns, so the chunk
  // (32 rows of up to 512 bytes) stays in L1 between the passes.
  constexpr int64_t CHUNK = ROW_PV_CHUNK, AHEAD = 8;
  if constexpr (!std::is_same_v<T, float>) {
    if (rows > AXPY_ROWS && dv >= NR) {
      const int64_t dv16 = dv / NR * NR;
      // (the rows `ahead`: a few lines before each tile)
      const int64_t steps = lines.steps_over(((n + CHUNK - 1) / CHUNK) * (dv16 / NR) * ((rows + MR - 1) / MR));
      for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {
        const int64_t keys = std::min(CHUNK, n - k0);
        // The first tile prefetches rows k0 + AHEAD + k for its first `fetched` keys.
        const int64_t fetched = std::max<int64_t>(0, std::min(keys, n - k0 - AHEAD));
        for (int64_t j = 0; j < dv16; j += NR) {
          for (int64_t r = 0; r < rows; r += MR) {
            const float* pr = p + r * ldp + k0;
            const T* vj = v + k0 * ldv + j;
            float* orow = o + r * ldo + j;
            for (int64_t t = 0; t < steps; ++t) lines.step();
            auto tile = [&](auto m) {
              constexpr int M = decltype(m)::value;
              if (j == 0 && r == 0 && fetched > 0) {
                pv_tile<M, true>(pr, ldp, vj, ldv, keys, orow, ldo, v + (k0 + AHEAD) * ldv, dv, fetched);
              } else {
                pv_tile<M>(pr, ldp, vj, ldv, keys, orow, ldo);
              }
            };
            switch (std::min(MR, rows - r)) {
              case 6: tile(std::integral_constant<int, 6>{}); break;
              case 5: tile(std::integral_constant<int, 5>{}); break;
              case 4: tile(std::integral_constant<int, 4>{}); break;
              case 3: tile(std::integral_constant<int, 3>{}); break;
              case 2: tile(std::integral_constant<int, 2>{}); break;
              default: tile(std::integral_constant<int, 1>{}); break;
            }
          }
        }
        if (dv16 < dv) {  // columns [dv16, dv), summed from 0 as the strips, 16 rows at a time
          const int64_t nc = dv - dv16;
          for (int64_t r0 = 0; r0 < rows; r0 += 16) {
            const int64_t nr = std::min<int64_t>(16, rows - r0);
            alignas(32) float tail[16 * NR];
            std::fill(tail, tail + nr * NR, 0.f);
            for (int64_t c = k0; c < k0 + keys; ++c) {
              for (int64_t r = 0; r < nr; ++r) axpy(p[(r0 + r) * ldp + c], v + c * ldv + dv16, tail + r * NR, nc);
            }
            for (int64_t r = 0; r < nr; ++r) axpy(1.f, tail + r * NR, o + (r0 + r) * ldo + dv16, nc);
          }
        }
      }
      lines.rest();
      return;
    }
  }
  // Key by key into `sum` from 0, CHUNK keys at a time, each chunk's sum then added to O
  // once (as the strips do: the note above pv_tile), for as many rows as `sum` holds.
  alignas(32) float sum[4096];
  const int64_t pass_rows = std::max<int64_t>(1, std::min<int64_t>(rows, 4096 / std::max<int64_t>(dv, 1)));
  for (int64_t r0 = 0; r0 < rows; r0 += pass_rows) {
    const int64_t nr = std::min(pass_rows, rows - r0);
    const float* pr = p + r0 * ldp;
    for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {
      const int64_t k1 = std::min(n, k0 + CHUNK);
      std::fill(sum, sum + nr * dv, 0.f);
      axpy_sums(pr + k0, ldp, nr, v + k0 * ldv, ldv, k1 - k0, dv, sum, dv, r0 == 0, n - k0, lines);
      // (o + 1 * sum in one rounding: the strips' addition)
      for (int64_t r = 0; r < nr; ++r) axpy(1.f, sum + r * dv, o + (r0 + r) * ldo, dv);
    }
  }
  lines.rest();
#endif
}

// c[r * ldc + e] += sum_k p[r * ldp + k] v[k * ldv + e], continuing the running sums in c
// (row_pv's chunk sums, held in memory): a chunk of row_pv's keys taken in parts (of a
// multiple of 4 keys, but the last), each part's FMAs continuing the sums, then c added to
// o once, gives row_pv's o bitwise (for chunks starting where row_pv's do; without
// AVX-512 for float V, whose row_pv goes key by key). For decoding across heads
// (flash_fwd.cpp), where a head's keys come in parts between the other heads'.
template <typename T>
inline void row_pv_sums(const float* p, int64_t ldp, int64_t rows, const T* v, int64_t ldv, int64_t n, int64_t dv,
                        float* c, int64_t ldc, const RowsAhead<T>& ahead = {}) {
#ifdef __AVX512F__
  row_pv_groups<T, true>(p, ldp, rows, v, ldv, n, dv, c, ldc, ahead);
#else
  AheadLines<T> lines(ahead, dv * static_cast<int64_t>(sizeof(T)));
  axpy_sums(p, ldp, rows, v, ldv, n, dv, c, ldc, true, n, lines);  // (row_pv's float path, c its sum buffer)
  lines.rest();
#endif
}

// Transposes the 8 x 8 block in r: afterwards r[i] holds element i of the 8 rows.
__attribute__((always_inline)) inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {  // pairs of rows, elements (0, 1, 4, 5) and (2, 3, 6, 7)
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // quads of rows, elements (0, 4), (1, 5), (2, 6), (3, 7)
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {  // rows 0-3 and 4-7 of element i and i + 4
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// The packers below move whole 8 x 8 blocks through transpose8 and the rest element by
// element: faster than the element-by-element transposes they replace, which showed in
// a causal forward where each thread packs every head's K and V (benchmarks/RESULTS.md
// 'What was tried').

// Prefetches rows [row + ahead, row + 2 ahead) (below `rows`) at element e, a line per
// row, when e starts a line: the rows the packer reads next.
template <typename T>
inline void prefetch_rows_ahead(const T* src, int64_t ld, int64_t row, int64_t ahead, int64_t rows, int64_t e) {
  if ((e * static_cast<int64_t>(sizeof(T))) % 64 != 0) return;
  for (int64_t r = row + ahead; r < std::min(rows, row + 2 * ahead); ++r) __builtin_prefetch(src + r * ld + e);
}

// Lanes 0-5 of x (element e of a group's MR rows after transpose8) to out[0, MR).
__attribute__((always_inline)) inline void store_group_column(float* out, __m256 x) {
  static_assert(MR == 6, "4 + 2 lanes");
  _mm_storeu_ps(out, _mm256_castps256_ps128(x));
  _mm_storel_pi(reinterpret_cast<__m64*>(out + 4), _mm256_extractf128_ps(x, 1));
}

#ifdef __AVX512F__
// pack_q's group layout with AVX-512: 8 elements of a group's MR = 6 rows are 48
// consecutive floats, three whole vectors. Lane l of vector v (j = 16 v + l) holds
// element j / 6 of row j % 6, taken from rows (0, 1) and (2, 3) by one two-source
// permute (`ab`: row r's 8 elements at lanes 8 (r % 2) of the pair's vector, the second
// pair from 16) and from rows (4, 5) by a masked one (`c`, lanes in `c_mask`).
struct GroupLanes {
  int32_t ab[3][16], c[3][16];
  uint16_t c_mask[3];
};
constexpr GroupLanes group_lanes() {
  static_assert(MR == 6, "three vectors of 16 per 8 elements");
  GroupLanes t{};
  for (int v = 0; v < 3; ++v) {
    for (int l = 0; l < 16; ++l) {
      const int j = 16 * v + l, e = j / 6, row = j % 6;
      t.ab[v][l] = row < 2 ? row * 8 + e : (row < 4 ? 16 + (row - 2) * 8 + e : 0);
      t.c[v][l] = row >= 4 ? (row - 4) * 8 + e : 0;
      if (row >= 4) t.c_mask[v] = static_cast<uint16_t>(t.c_mask[v] | (1u << l));
    }
  }
  return t;
}
inline constexpr GroupLanes GROUP_LANES = group_lanes();

__attribute__((always_inline)) inline __m512 two_rows(__m256 lo, __m256 hi) {
  const __m512d low = _mm512_castpd256_pd512(_mm256_castps_pd(lo));
  return _mm512_castpd_ps(_mm512_insertf64x4(low, _mm256_castps_pd(hi), 1));
}
#endif

// Q rows [0, rows) (row stride ld, d columns), times `scale`, in groups of MR rows
// interleaved: row MR g + r, element e at dst[g * MR * d + e * MR + r]; rows past `rows`
// in the last group are zero. The tile then broadcasts from one sequential stream instead
// of MR rows whose strides can map onto the same few L1 sets.
template <typename T>
inline void pack_q(const T* src, int64_t ld, int64_t rows, int64_t d, float scale, float* dst) {
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t g0 = 0; g0 < rows; g0 += MR) {
    float* group = dst + g0 * d;
    const int64_t n = std::min(MR, rows - g0);
    int64_t e0 = 0;
#ifdef __AVX512F__
    // (whole vectors out: the 8 x 8 transpose below stores 6 lanes a column, 4 + 2, a
    // third of them across cache lines; this packs set A's Q at about the rate of a copy,
    // benchmarks/RESULTS.md)
    for (; e0 + 8 <= d; e0 += 8) {
      prefetch_rows_ahead(src, ld, g0, MR, rows, e0);
      __m256 r[MR];
      for (int64_t i = 0; i < MR; ++i) {
        r[i] = i < n ? _mm256_mul_ps(load8(src + (g0 + i) * ld + e0), vscale) : _mm256_setzero_ps();
      }
      const __m512 a = two_rows(r[0], r[1]), b = two_rows(r[2], r[3]), c = two_rows(r[4], r[5]);
      float* out = group + e0 * MR;
      for (int v = 0; v < 3; ++v) {
        const __m512 ab = _mm512_permutex2var_ps(a, _mm512_loadu_si512(GROUP_LANES.ab[v]), b);
        const __m512i from_c = _mm512_loadu_si512(GROUP_LANES.c[v]);
        _mm512_storeu_ps(out + 16 * v, _mm512_mask_permutexvar_ps(ab, GROUP_LANES.c_mask[v], from_c, c));
      }
    }
#endif
    for (; e0 + 8 <= d; e0 += 8) {  // 8 elements of the MR rows (and 2 zero rows)
      prefetch_rows_ahead(src, ld, g0, MR, rows, e0);
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) {
        r[i] = i < n ? _mm256_mul_ps(load8(src + (g0 + i) * ld + e0), vscale) : _mm256_setzero_ps();
      }
      transpose8(r);
      for (int64_t i = 0; i < 8; ++i) store_group_column(group + (e0 + i) * MR, r[i]);
    }
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t e = e0; e < d; ++e) group[e * MR + r] = r < n ? static_cast<float>(src[(g0 + r) * ld + e]) * scale : 0.f;
    }
  }
}

// K rows [0, n) (row stride ld, d columns) as panels of 16 keys, transposed: key 16p + c,
// element e at dst[p * 16 * d + e * 16 + c]. Keys past n in the last panel are zero.
template <typename T>
inline void pack_k(const T* src, int64_t ld, int64_t n, int64_t d, float* dst) {
  for (int64_t p0 = 0; p0 < n; p0 += NR) {
    float* panel = dst + p0 * d;
    const int64_t keys = std::min(NR, n - p0);
    int64_t e0 = 0;
    // (the last panel's missing keys as zero rows, in a copy of the loop of its own so
    // that whole panels load without a test per key)
    auto whole_blocks = [&](auto partial) {
      for (; e0 + 8 <= d; e0 += 8) {
        prefetch_rows_ahead(src, ld, p0, NR, n, e0);
        for (int64_t half = 0; half < NR; half += 8) {  // keys p0 + half + (0..7)
          __m256 r[8];
          for (int64_t i = 0; i < 8; ++i) {
            r[i] = !partial || half + i < keys ? load8(src + (p0 + half + i) * ld + e0) : _mm256_setzero_ps();
          }
          transpose8(r);
          for (int64_t i = 0; i < 8; ++i) _mm256_store_ps(panel + (e0 + i) * NR + half, r[i]);
        }
      }
    };
    if (keys == NR) {
      whole_blocks(std::false_type{});
    } else {
      whole_blocks(std::true_type{});
    }
    for (int64_t c = 0; c < NR; ++c) {
      for (int64_t e = e0; e < d; ++e) panel[e * NR + c] = c < keys ? static_cast<float>(src[(p0 + c) * ld + e]) : 0.f;
    }
  }
}

// V rows [0, n) (row stride ld, dv columns) as panels of 16 columns: column 16j + c of
// key k at dst[j * panel_stride + k * 16 + c]. Columns past dv are zero.
template <typename T>
inline void pack_v(const T* src, int64_t ld, int64_t n, int64_t dv, float* dst, int64_t panel_stride) {
  for (int64_t k = 0; k < n; ++k) {
    const T* row = src + k * ld;
    if (k + 8 < n) prefetch_row(row + 8 * ld, dv);
    for (int64_t j0 = 0; j0 < dv; j0 += NR) {
      float* out = dst + (j0 / NR) * panel_stride + k * NR;
      const int64_t cols = std::min(NR, dv - j0);
      if (cols == NR) {
        _mm256_storeu_ps(out, load8(row + j0));
        _mm256_storeu_ps(out + 8, load8(row + j0 + 8));
        continue;
      }
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<float>(row[j0 + c]);
      for (int64_t c = cols; c < NR; ++c) out[c] = 0.f;
    }
  }
}

// With RUNS, the kr tiles sum their n products in runs of SUM_RUN, each run's sum added to
// the total of the runs before it (qk_block: the scores). One chain of FMAs over a whole
// head dim (128 steps) rounds a score about twice as far from the exact sum as BLAS's
// blocked sums or the row path's lanes, and exp() carries that into P: with scales of
// 0.3-0.6 a query row's output came out up to 5x as far from the float64 formula as the
// naive float one (beyond the tests' rule). Runs of 32: one more addition per 32 FMAs.
constexpr int64_t SUM_RUN = 32;

// c[r][0, 16) = (or += alpha *) sum_k a[k * a_ks + r] * panel[k][0, 16) for r < M,
// k < n: A's M rows lie side by side (a pack_q group with a_ks = MR, or a transposed
// row-major block with a_ks its row stride); with RUNS the sum in runs of SUM_RUN. With
// PREFETCH, also prefetches `next`, the n x 16 panel the following tiles read (one cache
// line per step).
template <int M, bool ACCUMULATE, bool PREFETCH = false, bool RUNS = false>
__attribute__((always_inline)) inline void kr_tile(const float* a, int64_t a_ks, const float* panel, int64_t n,
                                                   float alpha, float* c, int64_t ldc, const float* next = nullptr) {
  __m256 c0[M], c1[M];
  alignas(32) float total[M][NR];  // the runs before this one (no registers left for them)
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  const int64_t run = RUNS ? SUM_RUN : n;
  for (int64_t k0 = 0; k0 < n; k0 += run) {
    if (k0 > 0) {
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        _mm256_store_ps(total[r], c0[r]);
        _mm256_store_ps(total[r] + 8, c1[r]);
        c0[r] = c1[r] = _mm256_setzero_ps();
      }
    }
    for (int64_t k = k0; k < std::min(n, k0 + run); ++k) {
      const __m256 b0 = _mm256_load_ps(panel + k * NR), b1 = _mm256_load_ps(panel + k * NR + 8);
      const float* ak = a + k * a_ks;
      if constexpr (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(next + k * NR), _MM_HINT_T0);
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        const __m256 x = _mm256_broadcast_ss(ak + r);
        c0[r] = _mm256_fmadd_ps(x, b0, c0[r]);
        c1[r] = _mm256_fmadd_ps(x, b1, c1[r]);
      }
    }
    if (k0 > 0) {  // this run plus the ones before
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        c0[r] = _mm256_add_ps(_mm256_load_ps(total[r]), c0[r]);
        c1[r] = _mm256_add_ps(_mm256_load_ps(total[r] + 8), c1[r]);
      }
    }
  }
  // alpha is applied after the loop: a broadcast held through it would leave the
  // accumulators one register short.
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    if constexpr (ACCUMULATE) {
      const __m256 va = _mm256_set1_ps(alpha);
      _mm256_storeu_ps(c + r * ldc, _mm256_fmadd_ps(c0[r], va, _mm256_loadu_ps(c + r * ldc)));
      _mm256_storeu_ps(c + r * ldc + 8, _mm256_fmadd_ps(c1[r], va, _mm256_loadu_ps(c + r * ldc + 8)));
    } else {
      _mm256_storeu_ps(c + r * ldc, c0[r]);
      _mm256_storeu_ps(c + r * ldc + 8, c1[r]);
    }
  }
}

#ifdef __AVX512F__
// With AVX-512 the products' tiles span two neighbouring panels: MR x 32 outputs in 12
// 16-lane registers, half the loads and loop steps per FMA of the 8-lane tiles, and each
// row group's A rows (Q, P, dS; streamed from L2) read once per two panels instead of
// once per panel. Products are bitwise the 8-lane tiles' (the same FMA chains). Faster
// than one panel per tile (least in causal calls, where many row groups are the 6-row
// panels along the diagonal) and than tiles of 12 rows x 32 (24 registers):
// benchmarks/RESULTS.md 'What was tried'.

// kr_tile over panels `panel` and `panel + panel_stride`: c[r][0, 32) (with RUNS, the runs'
// total in registers where they fit: 12 more for M = 6). With PREFETCH, prefetches `next`
// and `next + next_stride` (one line of each per step).
template <int M, bool ACCUMULATE, bool PREFETCH = false, bool RUNS = false>
__attribute__((always_inline)) inline void kr_tile_pair(const float* a, int64_t a_ks, const float* panel,
                                                        int64_t panel_stride, int64_t n, float alpha, float* c,
                                                        int64_t ldc, const float* next = nullptr,
                                                        int64_t next_stride = 0) {
  __m512 c0[M], c1[M], t0[M], t1[M];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  const int64_t run = RUNS ? SUM_RUN : n;
  for (int64_t k0 = 0; k0 < n; k0 += run) {
    if (k0 > 0) {
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) t0[r] = c0[r], t1[r] = c1[r], c0[r] = c1[r] = _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < std::min(n, k0 + run); ++k) {
      const __m512 b0 = _mm512_load_ps(panel + k * NR), b1 = _mm512_load_ps(panel + panel_stride + k * NR);
      const float* ak = a + k * a_ks;
      if constexpr (PREFETCH) {
        _mm_prefetch(reinterpret_cast<const char*>(next + k * NR), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next + next_stride + k * NR), _MM_HINT_T0);
      }
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) {
        const __m512 x = _mm512_set1_ps(ak[r]);
        c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
        c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
      }
    }
    if (k0 > 0) {  // this run plus the ones before (kr_tile's order of additions)
#pragma GCC unroll 6
      for (int r = 0; r < M; ++r) c0[r] = _mm512_add_ps(t0[r], c0[r]), c1[r] = _mm512_add_ps(t1[r], c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    if constexpr (ACCUMULATE) {
      const __m512 va = _mm512_set1_ps(alpha);
      _mm512_storeu_ps(c + r * ldc, _mm512_fmadd_ps(c0[r], va, _mm512_loadu_ps(c + r * ldc)));
      _mm512_storeu_ps(c + r * ldc + NR, _mm512_fmadd_ps(c1[r], va, _mm512_loadu_ps(c + r * ldc + NR)));
    } else {
      _mm512_storeu_ps(c + r * ldc, c0[r]);
      _mm512_storeu_ps(c + r * ldc + NR, c1[r]);
    }
  }
}

// pv_tile over the float panels `b` and `b + panel_stride` (16 floats per key each):
// o[r][0, 32) += sum_k p[r * ldp + k] (b[k] | b[panel_stride + k]), the sum from 0 in
// registers, then added to o (stored as o with `overwrite`, as pv_tile). Prefetches as
// kr_tile_pair.
template <int M, bool PREFETCH = false>
__attribute__((always_inline)) inline void pv_tile_pair(const float* p, int64_t ldp, const float* b,
                                                        int64_t panel_stride, int64_t n, float* o, int64_t ldo,
                                                        const float* next = nullptr, int64_t next_stride = 0,
                                                        bool overwrite = false) {
  __m512 c0[M], c1[M];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; ++k) {
    const __m512 b0 = _mm512_load_ps(b + k * NR), b1 = _mm512_load_ps(b + panel_stride + k * NR);
    if constexpr (PREFETCH) {
      _mm_prefetch(reinterpret_cast<const char*>(next + k * NR), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + next_stride + k * NR), _MM_HINT_T0);
    }
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(p[r * ldp + k]);
      c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    _mm512_storeu_ps(o + r * ldo, overwrite ? c0[r] : _mm512_add_ps(_mm512_loadu_ps(o + r * ldo), c0[r]));
    _mm512_storeu_ps(o + r * ldo + NR, overwrite ? c1[r] : _mm512_add_ps(_mm512_loadu_ps(o + r * ldo + NR), c1[r]));
  }
}
#endif

// tile(std::integral_constant<int, M>{}, r) for the row groups of `rows`: M = MR from
// r = 0 in steps of MR, then the last rows % MR rows.
template <typename Tile>
__attribute__((always_inline)) inline void for_row_groups(int64_t rows, Tile&& tile) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) tile(std::integral_constant<int, MR>{}, r);
  switch (rows - r) {
    case 5: tile(std::integral_constant<int, 5>{}, r); break;
    case 4: tile(std::integral_constant<int, 4>{}, r); break;
    case 3: tile(std::integral_constant<int, 3>{}, r); break;
    case 2: tile(std::integral_constant<int, 2>{}, r); break;
    case 1: tile(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// C (rows x 16 * panels, row stride ldc) = (or += alpha *) A B: A's row r, column k at
// a[(r / MR) * MR * a_rs + k * a_ks + r % MR] (row groups a_rs * MR apart), B as `panels`
// panels of n x 16, `panel_stride` apart. Panel by panel (by pairs of panels with
// AVX-512, the last odd one alone): a panel stays in L1 while the row groups stream past
// it, and the first full row group prefetches the next panel (it comes from L3 when the
// block is new, and the hardware prefetchers run too short a way ahead; see
// benchmarks/RESULTS.md 'What was tried').
template <bool ACCUMULATE, bool RUNS = false>
inline void kr_block(int64_t rows, const float* a, int64_t a_rs, int64_t a_ks, const float* panels_b, int64_t panels,
                     int64_t panel_stride, int64_t n, float alpha, float* c, int64_t ldc) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 2 <= panels; j += 2) {
    const float* bp = panels_b + j * panel_stride;
    const float* next = j + 2 < panels ? bp + 2 * panel_stride : nullptr;  // the next panel (pair)
    const int64_t next_stride = j + 3 < panels ? panel_stride : 0;
    for_row_groups(rows, [&](auto m, int64_t r) {
      constexpr int M = decltype(m)::value;
      if (M == MR && r == 0 && next != nullptr) {
        kr_tile_pair<M, ACCUMULATE, true, RUNS>(a, a_ks, bp, panel_stride, n, alpha, c + j * NR, ldc, next,
                                                next_stride);
      } else {
        kr_tile_pair<M, ACCUMULATE, false, RUNS>(a + r * a_rs, a_ks, bp, panel_stride, n, alpha, c + r * ldc + j * NR,
                                                 ldc);
      }
    });
  }
#endif
  for (; j < panels; ++j) {
    const float* bp = panels_b + j * panel_stride;
    const float* next = j + 1 < panels ? bp + panel_stride : nullptr;
    for_row_groups(rows, [&](auto m, int64_t r) {
      constexpr int M = decltype(m)::value;
      if (M == MR && r == 0 && next != nullptr) {
        kr_tile<M, ACCUMULATE, true, RUNS>(a, a_ks, bp, n, alpha, c + j * NR, ldc, next);
      } else {
        kr_tile<M, ACCUMULATE, false, RUNS>(a + r * a_rs, a_ks, bp, n, alpha, c + r * ldc + j * NR, ldc);
      }
    });
  }
}

// S (rows x 16 * panels, row stride lds) = Q K^T, Q packed by pack_q (scale included),
// K as `panels` panels from pack_k; summed in runs (SUM_RUN).
inline void qk_block(int64_t rows, const float* q, const float* k_panels, int64_t panels, int64_t d, float* s,
                     int64_t lds) {
  kr_block<false, true>(rows, q, d, MR, k_panels, panels, NR * d, d, 1.f, s, lds);
}

// O (rows x 16 * dv_panels, row stride ldo) += P (rows x n) V, V as packed column panels
// `panel_stride` apart, each starting at the block's first key. In chunks of PV_KEYS keys,
// so a chunk of a V panel (8 KiB) stays in L1 while the row groups stream past it; the
// first row group prefetches the chunk that follows (next panel or pair, or the next
// keys). With `overwrite`, O = P V (O's prior values neither read nor needed).
constexpr int64_t PV_KEYS = 128;
inline void pv_block(int64_t rows, const float* p, int64_t ldp, const float* v_panels, int64_t panel_stride,
                     int64_t n, int64_t dv_panels, float* o, int64_t ldo, bool overwrite = false) {
  for (int64_t k0 = 0; k0 < n; k0 += PV_KEYS) {
    const int64_t keys = std::min(PV_KEYS, n - k0);
    const bool first = overwrite && k0 == 0;
    const float* next_keys = k0 + PV_KEYS < n ? v_panels + (k0 + PV_KEYS) * NR : nullptr;
    int64_t j = 0;
#ifdef __AVX512F__
    for (; j + 2 <= dv_panels; j += 2) {
      const float* vp = v_panels + j * panel_stride + k0 * NR;
      const float* next = j + 2 < dv_panels ? vp + 2 * panel_stride : next_keys;
      const int64_t next_stride = j + 3 == dv_panels ? 0 : panel_stride;  // (the last odd panel: one)
      for_row_groups(rows, [&](auto m, int64_t r) {
        constexpr int M = decltype(m)::value;
        if (M == MR && r == 0 && next != nullptr) {
          pv_tile_pair<M, true>(p + k0, ldp, vp, panel_stride, keys, o + j * NR, ldo, next, next_stride, first);
        } else {
          pv_tile_pair<M>(p + r * ldp + k0, ldp, vp, panel_stride, keys, o + r * ldo + j * NR, ldo, nullptr, 0,
                          first);
        }
      });
    }
#endif
    for (; j < dv_panels; ++j) {
      const float* vp = v_panels + j * panel_stride + k0 * NR;
      const float* next = j + 1 < dv_panels ? vp + panel_stride : next_keys;
      for_row_groups(rows, [&](auto m, int64_t r) {
        constexpr int M = decltype(m)::value;
        if (M == MR && r == 0 && next != nullptr) {
          pv_tile<M, true>(p + k0, ldp, vp, NR, keys, o + j * NR, ldo, next, NR, INT64_MAX, first);
        } else {
          pv_tile<M>(p + r * ldp + k0, ldp, vp, NR, keys, o + r * ldo + j * NR, ldo, static_cast<const float*>(nullptr),
                     NR, INT64_MAX, first);
        }
      });
    }
  }
}

}  // namespace flashattn::cpu::tiles
#endif
