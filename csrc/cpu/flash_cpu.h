// Fused attention on the CPU: forward and backward over FlashParams (csrc/flash_params.h).
//
// Shared pieces of flash_fwd.cpp and flash_bwd.cpp: element-type plumbing, the per-row
// score transform (scale is applied by the GEMM; softcap, ALiBi, visibility here), and a
// dynamic work queue over torch's intra-op threads (torch::stable::parallel_for).
//
// Only the stable / header-only torch surface (setup.py builds these libraries with
// TORCH_TARGET_VERSION): the vector loops use simd.h, not ATen/cpu/vec.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>

#include "../flash_params.h"
#include "dropout.h"
#include "kernel_table.h"
#include "simd.h"
#include "switches.h"
#include "tiles.h"
#include "tiles_amx.h"
#include "tiles_bf16.h"

namespace flashattn::cpu {

template <typename scalar_t>
void flash_fwd(const FlashParams& params);
template <typename scalar_t>
void flash_bwd(const FlashBwdParams& params);

// Which block products a call runs: BLAS, the AVX2 tiles (tiles.h) or, for bf16, AMX
// (tiles_amx.h) or the AVX512-BF16 tiles (tiles_bf16.h); and whether the forward goes row
// by row (few queries: flash_fwd.cpp RowOperands), which its backward mirrors when it
// recomputes S. A call with gradients gets its path once, before its forward
// (flashattn_py/ops.py asks choose_path() through the kernel table), and passes it to the
// forward and to its backward as FlashParams::cpu_path: both run the same products, so the
// backward recomputes the very scores the forward's lse summed. Calls given none (0: traced
// calls, the partial.py primitives, calls whose inputs need no gradient, the latter with
// FORWARD_ONLY) get choose_path() of their problem, which their backward, asking the same
// problem, gets again.
enum class Products { Blas, Tiles, Bf16Dot, Amx };
struct KernelPath {
  bool rows = false;
  Products products = Products::Blas;
};

// FlashParams::cpu_path: 0 = none given, else 1 + (products << 1 | rows); plus FORWARD_ONLY
// (kernel_table.h) for a call that no backward follows.
inline bool forward_only(const FlashParams& p) { return (p.cpu_path & FORWARD_ONLY) != 0; }

inline int64_t encode_path(KernelPath path) {
  return 1 + (static_cast<int64_t>(path.products) << 1 | static_cast<int64_t>(path.rows));
}
inline KernelPath decode_path(int64_t code) {
  return {((code - 1) & 1) != 0, static_cast<Products>((code - 1) >> 1)};
}

// The path for a problem with T elements, seqlen_q query rows per head (the longest
// sequence's) and head dim head_dim, under the process's switches (switches.h).
template <typename T>
inline KernelPath choose_path(int64_t seqlen_q, int64_t head_dim) {
  KernelPath path;
#ifdef FLASHATTN_CPU_TILES
  if constexpr (!std::is_same_v<T, double>) {
    if constexpr (tiles::has_load8<T>()) path.rows = tiles::use_rows(seqlen_q, head_dim);
    if (tiles::use_tiles<T>(seqlen_q)) {
      path.products = Products::Tiles;
#ifdef FLASHATTN_CPU_BF16_DOT
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (tiles_bf16::enabled()) path.products = Products::Bf16Dot;
#ifdef FLASHATTN_CPU_AMX
        if (tiles_amx::enabled()) path.products = Products::Amx;
#endif
      }
#endif
    }
  }
#else
  (void)seqlen_q, (void)head_dim;
#endif
  return path;
}

// Whether this build's kernels for T run `code` (an encode_path() value) on this CPU,
// whatever the switches say: a path passed in is run as given.
template <typename T>
inline bool path_runs(int64_t code) {
  if (code > 0 && (code & FORWARD_ONLY) != 0) {
    code &= ~FORWARD_ONLY;
    if (code == 0) return true;  // (FORWARD_ONLY alone: the path chosen per call)
  }
  if (code < 1 || code > encode_path({true, Products::Amx})) return false;
  const KernelPath path = decode_path(code);
#ifdef FLASHATTN_CPU_TILES
  if (path.rows && !tiles::has_load8<T>()) return false;
  switch (path.products) {
    case Products::Blas: return true;
    case Products::Tiles: return !std::is_same_v<T, double>;
#ifdef FLASHATTN_CPU_BF16_DOT
    case Products::Bf16Dot: return std::is_same_v<T, c10::BFloat16>;
#endif
#ifdef FLASHATTN_CPU_AMX
    case Products::Amx: return std::is_same_v<T, c10::BFloat16> && tiles_amx::usable();
#endif
    default: return false;
  }
#else
  return !path.rows && path.products == Products::Blas;
#endif
}

// The call's path: the one it was given (the ops checked path_runs), else choose_path().
template <typename T>
inline KernelPath kernel_path(const FlashParams& p) {
  const int64_t code = p.cpu_path > 0 ? p.cpu_path & ~FORWARD_ONLY : p.cpu_path;
  return code > 0 ? decode_path(code) : choose_path<T>(p.seqlen_q, p.head_dim);
}

// Accumulation type: float for 16- and 32-bit inputs, double for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

template <typename acc>
using Vec = simd::Vec<acc>;

// Workspace buffers start on a cache line (new[] only guarantees 16 bytes), as torch's
// own CPU allocations do, for the vector loops and BLAS's packing.
struct FreeDeleter {
  void operator()(void* ptr) const { std::free(ptr); }
};
template <typename acc>
using Scratch = std::unique_ptr<acc[], FreeDeleter>;

// n <= 0 (a buffer the call does not use) gives a null pointer, no allocation: a
// decode-sized call's buffers cost about as much as its kernel.
template <typename acc>
inline Scratch<acc> scratch(int64_t n) {
  if (n <= 0) return Scratch<acc>();
  constexpr size_t line = 64;
  const size_t bytes = (static_cast<size_t>(n) * sizeof(acc) + line - 1) / line * line;
  void* ptr = std::aligned_alloc(line, bytes);
  if (ptr == nullptr) throw std::bad_alloc();
  return Scratch<acc>(static_cast<acc*>(ptr));
}

// Copy `rows` rows of `cols` elements from strided `src` into dense acc-typed `dst`.
template <typename T, typename acc>
inline void load_rows(const T* src, int64_t row_stride, int64_t rows, int64_t cols, acc* dst,
                      int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    acc* d = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc>(s[c]);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 floats rounded to bf16 as c10::BFloat16(float) rounds them (to nearest even, any NaN
// to 0x7FC0): the same bits.
inline __m256i round_to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __m512i bits =
      _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(bits);
}
#endif

#if defined(__AVX2__)
// 8 floats rounded to bf16 as c10::BFloat16(float) rounds them, in the low 16 bits of
// each 32-bit lane (round_to_bf16's arithmetic on 8 lanes).
inline __m256i round_to_bf16_lanes(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}
#endif

template <typename T, typename acc>
inline void store_row(const acc* src, int64_t cols, acc mult, T* dst) {
  int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // bf16 16 at a time (the loop below: the compiler widens it 8 at a time).
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc, float>) {
    const __m512 vmult = _mm512_set1_ps(mult);
    for (; c + 16 <= cols; c += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                          round_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(src + c), vmult)));
    }
  }
#endif
  for (; c < cols; ++c) dst[c] = static_cast<T>(src[c] * mult);
}

// Outputs of this many bytes or more are written with non-temporal (streaming) stores
// where the element type allows (float; bf16 on AVX-512 or AVX2): they do not stay in the caches
// anyway, and an ordinary store that misses first reads the line it overwrites
// (benchmarks/RESULTS.md: from 8 MiB, a packed bf16 backward's three 19 MB gradients, and
// fp32 ones of 16 MB, took 10-13 % less time than from 32 MiB). (Fixed, not the cache's
// size: a CPU whose L3 holds such an output loses its reuse there.)
constexpr int64_t STREAM_BYTES = int64_t(8) << 20;

// Whether an output of `elements` T is streamed (STREAM_BYTES).
template <typename T>
inline bool streamed(int64_t elements) {
  return elements * static_cast<int64_t>(sizeof(T)) >= STREAM_BYTES;
}

// store_row, or with `stream` float rows (AVX-512 or AVX) and bf16 rows (AVX-512 or AVX2) streamed
// a whole 64-byte line at a time from their first line boundary on (plain stores before
// and after it): the same values. A task that streamed calls stream_fence() before its
// stores may be read by another thread (the end of the task).
template <typename T, typename acc>
inline void store_row_maybe_streaming(bool stream, const acc* src, int64_t cols, acc mult, T* dst) {
#if defined(__AVX512F__) || defined(__AVX__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc, float>) {
    if (stream) {
      constexpr int64_t LINE = 64 / sizeof(float);
      const uintptr_t offset = reinterpret_cast<uintptr_t>(dst) % 64;
      const int64_t head = std::min<int64_t>(cols, (64 - offset) % 64 / sizeof(float));
      int64_t c = 0;
      for (; c < head; ++c) dst[c] = src[c] * mult;
#if defined(__AVX512F__)
      const __m512 m = _mm512_set1_ps(mult);
      for (; c + LINE <= cols; c += LINE) _mm512_stream_ps(dst + c, _mm512_mul_ps(_mm512_loadu_ps(src + c), m));
#else
      const __m256 m = _mm256_set1_ps(mult);
      for (; c + LINE <= cols; c += LINE) {
        _mm256_stream_ps(dst + c, _mm256_mul_ps(_mm256_loadu_ps(src + c), m));
        _mm256_stream_ps(dst + c + 8, _mm256_mul_ps(_mm256_loadu_ps(src + c + 8), m));
      }
#endif
      for (; c < cols; ++c) dst[c] = src[c] * mult;
      return;
    }
  }
#endif
#if (defined(__AVX512F__) && defined(__AVX512BW__)) || defined(__AVX2__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc, float>) {
    if (stream) {
      constexpr int64_t LINE = 64 / sizeof(T);
      const uintptr_t offset = reinterpret_cast<uintptr_t>(dst) % 64;
      const int64_t head = offset % 2 == 0 ? std::min<int64_t>(cols, (64 - offset) % 64 / sizeof(T)) : cols;
      store_row<T, acc>(src, head, mult, dst);
      int64_t c = head;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512 m = _mm512_set1_ps(mult);
      for (; c + LINE <= cols; c += LINE) {
        const __m256i lo = round_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(src + c), m));
        const __m256i hi = round_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(src + c + 16), m));
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + c), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
      }
#else
      // Two 32-byte halves of the line, each packed from 16 rounded lanes (packus works
      // per 128-bit half: the permute puts the 8 + 8 results back in order).
      const __m256 m = _mm256_set1_ps(mult);
      for (; c + LINE <= cols; c += LINE) {
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {
          const float* s = src + c + 16 * half;
          const __m256i packed = _mm256_packus_epi32(round_to_bf16_lanes(_mm256_mul_ps(_mm256_loadu_ps(s), m)),
                                                     round_to_bf16_lanes(_mm256_mul_ps(_mm256_loadu_ps(s + 8), m)));
          _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + c + 16 * half), _mm256_permute4x64_epi64(packed, 0xD8));
        }
      }
#endif
      store_row<T, acc>(src + c, cols - c, mult, dst + c);
      return;
    }
  }
#endif
  (void)stream;
  store_row<T, acc>(src, cols, mult, dst);
}

// Orders this thread's streaming stores before its later stores (x86 sfence).
inline void stream_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
}

// Which keys each query row of one sequence sees (the causal / window band of
// docs/design.md, closed bounds: key j is visible to row i when i + diag - window_left <= j
// <= i + diag + window_right, unbounded sides -1), with the sequence's own lengths and
// diagonal (flash_params.h seq_view). Dense calls have one band for every batch entry.
// q_group query rows per position (FlashParams::q_group): row i is at position i / q_group,
// and seqlen_q counts rows; the diagonal is the positions' (bottom-right: seqlen_k minus
// the positions).
struct Band {
  int64_t seqlen_q, seqlen_k, diag_offset, window_left, window_right, q_group;
};
inline Band band(const FlashParams& p, const SeqView& s) {
  return {s.seqlen_q, s.seqlen_k, s.diag_offset, p.window_left, p.window_right, p.q_group};
}

// Keys visible to query row i: [lo, hi), empty when hi <= lo.
struct KeyRange {
  int64_t lo, hi;
};
inline KeyRange visible_keys(const Band& w, int64_t i) {
  const int64_t pos = i / w.q_group;
  int64_t lo = 0, hi = w.seqlen_k;
  if (w.window_left >= 0) lo = std::max<int64_t>(lo, pos + w.diag_offset - w.window_left);
  if (w.window_right >= 0) hi = std::min<int64_t>(hi, pos + w.diag_offset + w.window_right + 1);
  lo = std::min<int64_t>(lo, w.seqlen_k);
  return {lo, std::max(lo, hi)};
}

// Keys visible to any of the rows [row0, row1).
inline KeyRange visible_keys(const Band& w, int64_t row0, int64_t row1) {
  KeyRange first = visible_keys(w, row0), last = visible_keys(w, row1 - 1);
  // Both bounds grow with i, so the union is [first.lo, last.hi) (clipped if empty).
  if (last.hi <= first.lo) return {first.lo, first.lo};
  return {first.lo, last.hi};
}

// Query rows that see at least one key of [col0, col1): the inverse of visible_keys.
inline KeyRange visible_rows(const Band& w, int64_t col0, int64_t col1) {
  int64_t lo = 0, hi = w.seqlen_q;  // (the first and past the last positions, in rows)
  if (w.window_right >= 0) lo = std::max<int64_t>(lo, (col0 - w.diag_offset - w.window_right) * w.q_group);
  if (w.window_left >= 0) hi = std::min<int64_t>(hi, (col1 - 1 - w.diag_offset + w.window_left + 1) * w.q_group);
  lo = std::min<int64_t>(lo, w.seqlen_q);
  return {lo, std::max(lo, hi)};
}

// `r` as offsets into the key block [col0, col0 + cols), clipped to it.
inline KeyRange clip(KeyRange r, int64_t col0, int64_t cols) {
  const int64_t lo = std::clamp<int64_t>(r.lo - col0, 0, cols);
  return {lo, std::clamp<int64_t>(r.hi - col0, lo, cols)};
}

// True when every row of [row0, row0 + rows) sees every key of [col0, col0 + cols) under
// the causal / window rule (masks and biases aside). Both bounds of visible_keys grow
// with the row, so the last row has the highest lower bound and the first the lowest
// upper bound.
inline bool all_rows_see(const Band& w, int64_t row0, int64_t rows, int64_t col0, int64_t cols) {
  return visible_keys(w, row0 + rows - 1).lo <= col0 && visible_keys(w, row0).hi >= col0 + cols;
}

// Index in lse (and the dropout stream's row) of query row i of head h of sequence `s`.
inline int64_t lse_index(const FlashParams& p, const SeqView& s, int64_t h, int64_t i) {
  return s.lse_row + h * lse_head_stride(p) + i;
}

// One (sequence, kv head)'s keys as the block products read them: rows of K and V with
// their strides, key `first` at k / v (a whole head from key 0, or one page's run of keys).
template <typename T>
struct KeyRows {
  const T *k, *v;
  int64_t k_stride, v_stride, seqlen_k;
  int64_t first = 0;
  // Paged K/V read in place (operands with pages_in_place): k / v unused, the keys of kv
  // head hk of sequence b (view *seq) are found run by run in their pages (page_slot,
  // page_rows, page_run).
  const FlashParams* pages = nullptr;
  const SeqView* seq = nullptr;
  int64_t b = 0, hk = 0;
  const T* k_row(int64_t j) const { return k + (j - first) * k_stride; }
  const T* v_row(int64_t j) const { return v + (j - first) * v_stride; }
};

// Paged K/V (block_table) gathered into contiguous rows, one (sequence, kv head) per
// thread at a time (tasks of one head come in a row): the products then read it as they
// read a dense head. Room for the most keys a sequence uses, not the table's capacity
// (a table may reuse pages: more than 2^30 slots in a few MB).
template <typename T>
struct PagedHead {
  Scratch<T> k, v;
  int64_t head = -1;  // the gathered b * Hk + hk
  PagedHead(const FlashParams& p, bool used)
      : k(scratch<T>(p.block_table && used ? most_keys(p) * p.head_dim : 0)),
        v(scratch<T>(p.block_table && used ? most_keys(p) * p.head_dim_v : 0)) {}
  static int64_t most_keys(const FlashParams& p) {
    int64_t keys = 0;
    for (int64_t b = 0; b < p.batch; ++b) keys = std::max(keys, seq_view(p, b).seqlen_k);
    return keys;
  }

  // All keys of kv head hk of sequence b.
  KeyRows<T> rows(const FlashParams& p, const SeqView& s, int64_t b, int64_t hk) {
    const int64_t id = b * p.num_heads_k + hk, n = s.seqlen_k;
    if (head != id) {
      const T* k_src = static_cast<const T*>(p.k) + hk * p.k_head_stride;
      const T* v_src = static_cast<const T*>(p.v) + hk * p.v_head_stride;
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = k_src + key_offset(p, s, b, j, 0, p.k_batch_stride, p.k_row_stride);
        const T* vr = v_src + key_offset(p, s, b, j, 0, p.v_batch_stride, p.v_row_stride);
        std::copy(kr, kr + p.head_dim, k.get() + j * p.head_dim);
        std::copy(vr, vr + p.head_dim_v, v.get() + j * p.head_dim_v);
      }
      head = id;
    }
    return {k.get(), v.get(), p.head_dim, p.head_dim_v, s.seqlen_k};
  }
};

// Row `row` of page `index` of sequence b's block table, kv head hk (the page clamped into
// the pool, as key_offset does): K's and V's. Page rows lie k_row_stride / v_row_stride apart.
template <typename T>
struct PageRows {
  const T *k, *v;
};
template <typename T>
inline PageRows<T> page_rows(const FlashParams& p, int64_t b, int64_t hk, int64_t index, int64_t row) {
  const int64_t page = clamp_len(p.block_table[b * p.block_table_batch_stride + index], p.num_pages - 1);
  return {static_cast<const T*>(p.k) + hk * p.k_head_stride + page * p.k_batch_stride + row * p.k_row_stride,
          static_cast<const T*>(p.v) + hk * p.v_head_stride + page * p.v_batch_stride + row * p.v_row_stride};
}

// Where key j of sequence view s lies in its block table: entry `index`, row `row` of that page.
struct PageSlot {
  int64_t index, row;
};
inline PageSlot page_slot(const FlashParams& p, const SeqView& s, int64_t j) {
  const int64_t slot = s.k_start + j, index = slot / p.page_size;
  return {index, slot - index * p.page_size};
}

// Keys [j, j + n) of sequence b's kv head hk from its pages, n up to the end of key j's
// page: rows of one page, read in place.
template <typename T>
inline KeyRows<T> page_run(const FlashParams& p, const SeqView& s, int64_t b, int64_t hk, int64_t j, int64_t& n) {
  const PageSlot at = page_slot(p, s, j);
  n = std::min(n, p.page_size - at.row);
  const PageRows<T> rows = page_rows<T>(p, b, hk, at.index, at.row);
  return {rows.k, rows.v, p.k_row_stride, p.v_row_stride, s.seqlen_k, j};
}

// f(j, K row, V row) for keys [lo, hi) of `kv` (paged: page run by page run).
template <typename T, typename F>
__attribute__((always_inline)) inline void for_key_rows(const KeyRows<T>& kv, int64_t lo, int64_t hi, const F& f) {
  for (int64_t c = lo, n = 0; c < hi; c += n) {
    n = hi - c;
    const KeyRows<T> run = kv.pages ? page_run<T>(*kv.pages, *kv.seq, kv.b, kv.hk, c, n) : kv;
    for (int64_t j = c; j < c + n; ++j) f(j, run.k_row(j), run.v_row(j));
  }
}

// The paged keys of sequence b's kv head hk, for operands that read pages in place.
template <typename T>
inline KeyRows<T> paged_keys(const FlashParams& p, const SeqView& s, int64_t b, int64_t hk) {
  KeyRows<T> kv{nullptr, nullptr, p.k_row_stride, p.v_row_stride, s.seqlen_k};
  kv.pages = &p, kv.seq = &s, kv.b = b, kv.hk = hk;
  return kv;
}

// Sequence b's kv head hk: in place, or gathered from pages into `paged`.
template <typename T>
inline KeyRows<T> key_rows(const FlashParams& p, const SeqView& s, int64_t b, int64_t hk, PagedHead<T>& paged) {
  if (p.block_table) return paged.rows(p, s, b, hk);
  return {static_cast<const T*>(p.k) + s.k_offset + hk * p.k_head_stride,
          static_cast<const T*>(p.v) + s.v_offset + hk * p.v_head_stride, p.k_row_stride, p.v_row_stride,
          s.seqlen_k};
}

inline float alibi_slope(const FlashParams& p, int64_t b, int64_t h) {
  return p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
}

// The bias / mask entries of one query row: element j at ptr[j * col_stride].
template <typename T>
struct BiasRow {
  const T* add = nullptr;        // float bias in the inputs' element type
  const float* add32 = nullptr;  // float bias in float32 (16-bit inputs: bias_is_float32)
  const bool* keep = nullptr;    // bool mask
  int64_t col_stride = 0;
};

template <typename T>
inline BiasRow<T> bias_row(const FlashParams& p, int64_t b, int64_t h, int64_t i) {
  BiasRow<T> row;
  if (!p.bias) return row;
  const int64_t off = b * p.bias_batch_stride + h * p.bias_head_stride + i * p.bias_row_stride;
  if (p.bias_is_bool) {
    row.keep = static_cast<const bool*>(p.bias) + off;
  } else if (p.bias_is_float32) {
    row.add32 = static_cast<const float*>(p.bias) + off;
  } else {
    row.add = static_cast<const T*>(p.bias) + off;
  }
  row.col_stride = p.bias_col_stride;
  return row;
}

// A key padding mask (bool, the same for every query row): true when it removes every key
// of [col0, col0 + cols), so the whole block can be skipped.
inline bool keys_all_masked(const FlashParams& p, int64_t b, int64_t h, int64_t col0, int64_t cols) {
  if (!p.bias || !p.bias_is_bool || p.bias_row_stride != 0) return false;
  const bool* keep = static_cast<const bool*>(p.bias) + b * p.bias_batch_stride + h * p.bias_head_stride;
  for (int64_t j = col0; j < col0 + cols; ++j) {
    if (keep[j * p.bias_col_stride]) return false;
  }
  return true;
}

#ifdef FLASHATTN_VEC_AVX2
// tanh of 4 floats, computed in double and rounded once: 1 - 2 / (e^2|x| + 1) with SLEEF's
// 1-ulp exp (simd.h), x itself below 2^-12 (tanh x = x (1 - x^2 / 3 + ...) rounds to x
// there, and the formula would cancel), the sign put back. Infinities give +-1, a NaN
// stays NaN.
inline __m128 tanh4(__m128 xf) {
  const __m256d x = _mm256_cvtps_pd(xf), sign = _mm256_set1_pd(-0.0), one = _mm256_set1_pd(1.0);
  const __m256d ax = _mm256_andnot_pd(sign, x);
  const __m256d e = simd::sleef_expd4_u10(_mm256_add_pd(ax, ax));
  __m256d t = _mm256_sub_pd(one, _mm256_div_pd(_mm256_set1_pd(2.0), _mm256_add_pd(e, one)));
  t = _mm256_blendv_pd(t, ax, _mm256_cmp_pd(ax, _mm256_set1_pd(0x1p-12), _CMP_LT_OQ));
  return _mm256_cvtpd_ps(_mm256_or_pd(t, _mm256_and_pd(x, sign)));
}
#endif

// x[c] = tanh(x[c]) for c < n. Floats 4 at a time where the library has AVX2 (glibc's
// scalar tanhf took 40 % of a softcapped forward), the last n % 4 through the same
// vector (a key's value does not depend on where its row's block ends: the backward
// recomputes the forward's probabilities bitwise).
template <typename acc>
inline void tanh_row(acc* x, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] = std::tanh(x[c]);
}

#ifdef FLASHATTN_VEC_AVX2
template <>
inline void tanh_row<float>(float* x, int64_t n) {
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) _mm_storeu_ps(x + c, tanh4(_mm_loadu_ps(x + c)));
  if (c < n) {
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    std::copy(x + c, x + n, tail);
    _mm_storeu_ps(tail, tanh4(_mm_loadu_ps(tail)));
    std::copy(tail, tail + (n - c), x + c);
  }
}
#endif

// s[c] = -inf where keep[c] is false, c < n. Floats 8 at a time where the library has AVX2
// (the compiler made the plain loop a branch per key).
template <typename acc>
inline void mask_row(acc* s, const bool* keep, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    if (!keep[c]) s[c] = -std::numeric_limits<acc>::infinity();
  }
}

#ifdef FLASHATTN_VEC_AVX2
// 8 bools as 32-bit lanes (0 or 1).
inline __m256i bool_lanes8(const bool* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

template <>
inline void mask_row<float>(float* s, const bool* keep, int64_t n) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 drop = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bool_lanes8(keep + c), _mm256_setzero_si256()));
    _mm256_storeu_ps(s + c, _mm256_blendv_ps(_mm256_loadu_ps(s + c), neg_inf, drop));
  }
  for (; c < n; ++c) {
    if (!keep[c]) s[c] = -std::numeric_limits<float>::infinity();
  }
}
#endif

// x[c] = keep[c] ? x[c] * mult : 0 for c < n (dropout's kept values scaled, the others
// 0). Floats 8 at a time where the library has AVX2, as mask_row.
template <typename acc>
inline void keep_scale_row(acc* x, const bool* keep, int64_t n, acc mult) {
  for (int64_t c = 0; c < n; ++c) x[c] = keep[c] ? x[c] * mult : acc(0);
}

#ifdef FLASHATTN_VEC_AVX2
template <>
inline void keep_scale_row<float>(float* x, const bool* keep, int64_t n, float mult) {
  const __m256 vm = _mm256_set1_ps(mult);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 kept = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bool_lanes8(keep + c), _mm256_setzero_si256()));
    _mm256_storeu_ps(x + c, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(x + c), vm), kept));
  }
  for (; c < n; ++c) x[c] = keep[c] ? x[c] * mult : 0.f;
}
#endif

// Turn the scaled scores s[0, n) of query row i against keys j0 .. j0+n-1 into final
// logits: softcap, minus ALiBi, plus bias / bool mask, -inf where not visible. With
// softcap, `dcap` (if given) receives d(capped)/d(raw) = 1 - tanh^2 for the backward.
// (Loops the compiler vectorises: this runs on every score of such calls.)
template <typename T, typename acc>
inline void transform_scores(const FlashParams& p, const Band& w, acc* s, int64_t n, int64_t i, int64_t j0,
                             float slope, const BiasRow<T>& bias, acc* dcap) {
  if (p.softcap > 0.f) {
    const acc cap = static_cast<acc>(p.softcap64), inv = acc(1) / cap;
    for (int64_t c = 0; c < n; ++c) s[c] *= inv;
    tanh_row(s, n);
    if (dcap) {
      for (int64_t c = 0; c < n; ++c) dcap[c] = acc(1) - s[c] * s[c];
    }
    for (int64_t c = 0; c < n; ++c) s[c] *= cap;
  }
  if (slope != 0.f) {
    // |qpos - j| in double: exact (positions are below 2^42, fill_params), and converted to
    // acc as the integer would be
    const acc sl = static_cast<acc>(slope);
    const double base = static_cast<double>(i / w.q_group + w.diag_offset - j0);
    const int32_t cols = static_cast<int32_t>(n);  // (n: one key block, at most a few hundred keys)
    for (int32_t c = 0; c < cols; ++c) s[c] -= sl * static_cast<acc>(std::fabs(base - static_cast<double>(c)));
  }
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  auto add_bias = [&](const auto* add) {
    add += j0 * bias.col_stride;
    if (bias.col_stride == 1) {
      for (int64_t c = 0; c < n; ++c) s[c] += static_cast<acc>(add[c]);
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] += static_cast<acc>(add[c * bias.col_stride]);
    }
  };
  if (bias.add) {
    add_bias(bias.add);
  } else if (bias.add32) {
    add_bias(bias.add32);
  } else if (bias.keep) {
    const bool* keep = bias.keep + j0 * bias.col_stride;
    if (bias.col_stride == 1) {
      mask_row(s, keep, n);
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] = keep[c * bias.col_stride] ? s[c] : neg_inf;
    }
  }
  const KeyRange r = clip(visible_keys(w, i), j0, n);
  for (int64_t c = 0; c < r.lo; ++c) s[c] = neg_inf;
  for (int64_t c = r.hi; c < n; ++c) s[c] = neg_inf;
}

// Whether scores need transform_scores beyond the band's mask (softcap, ALiBi or a bias).
inline bool scores_need_transform(const FlashParams& p, float slope) {
  return p.softcap > 0.f || slope != 0.f || p.bias;
}

// The band's mask alone on row i's scores of keys [j0, j0 + n), as transform_scores would
// apply it, but only up to the row's last visible key: keys before its first visible one
// are set to -inf and the returned end of its visible keys bounds its max and exp (the
// caller sets the keys from there on to 0, as exp(-inf) would be). exp_shift_sum keeps
// every key in its lane, so this gives transform_scores' values and sums bitwise.
template <typename acc>
inline int64_t mask_band_start(const Band& w, acc* s, int64_t n, int64_t i, int64_t j0) {
  const KeyRange r = clip(visible_keys(w, i), j0, n);
  std::fill(s, s + r.lo, -std::numeric_limits<acc>::infinity());
  return r.hi;
}

// The kept values' scale, 1 / (1 - p), rounded once (in float 1 - p would round first:
// 1 - 0.9f = 0.100000024, a scale of 9.9999981, 2e-7 off in every kept value).
template <typename acc>
inline acc dropout_scale(const FlashParams& p) {
  return static_cast<acc>(1.0 / (1.0 - p.dropout_p64));
}

// Dropout on one row of probabilities (in place): zero the dropped, scale the kept by
// 1/(1-p). `row_id` is the row's lse_index (its place in the Philox stream, rows of
// p.seqlen_k draws); `keep` is scratch of n bools.
template <typename acc>
inline void apply_dropout(const FlashParams& p, acc* row, int64_t n, int64_t row_id, int64_t j0, bool* keep) {
  dropout_keep_row(p.dropout_seed, p.dropout_offset, p.dropout_p, p.seqlen_k, row_id, j0, n, keep);
  keep_scale_row(row, keep, n, dropout_scale<acc>(p));
}

// Vectorised row primitives (simd.h: at::vec's arithmetic, exp included, bit for bit).
template <typename acc>
inline acc row_max(const acc* s, int64_t n) {
  using V = Vec<acc>;
  acc best = -std::numeric_limits<acc>::infinity();
  int64_t c = 0;
  if (n >= V::size()) {
    V vbest = V::loadu(s);
    for (c = V::size(); c + V::size() <= n; c += V::size()) vbest = simd::maximum(vbest, V::loadu(s + c));
    acc lanes[V::size()];
    vbest.store(lanes);
    for (int64_t l = 0; l < V::size(); ++l) best = std::max(best, lanes[l]);
  }
  for (; c < n; ++c) best = std::max(best, s[c]);
  return best;
}

// s[c] = exp(s[c] - shift) in place; returns the sum. exp(-inf) = 0. The last n % size
// elements go through one more vector padded with -inf (adding 0 to their lanes): element
// c is always in lane c % size and exp'd by the vector exp, so a row's values and sum do
// not depend on where n ends past its last nonzero element (run_fwd's band-masked rows).
template <typename acc>
inline acc exp_shift_sum(acc* s, int64_t n, acc shift) {
  using V = Vec<acc>;
  const V vshift(shift);
  V vsum(acc(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V x = (V::loadu(s + c) - vshift).exp_u20();  // torch's 20-ulp polynomial, inlined
    x.store(s + c);
    vsum = vsum + x;
  }
  if (c < n) {
    acc tail[V::size()];
    std::fill(tail, tail + V::size(), -std::numeric_limits<acc>::infinity());
    std::copy(s + c, s + n, tail);
    const V x = (V::loadu(tail) - vshift).exp_u20();
    x.store(tail);
    std::copy(tail, tail + (n - c), s + c);
    vsum = vsum + x;
  }
  acc lanes[V::size()];
  vsum.store(lanes);
  acc sum = 0;
  for (int64_t l = 0; l < V::size(); ++l) sum += lanes[l];
  return sum;
}

#ifdef FLASHATTN_CPU_TILES
// Lanes [0, k) of 8 set (all bits), the others clear: AVX2 masked loads and stores.
inline __m256i first_lanes8(int64_t k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// float versions on AVX2 without at::vec's NaN-propagating maximum (3 instructions where
// 1 does) and with a shorter exp: these two passes are most of the softmax's time.
// row_max may drop a NaN (max_ps returns its second operand); exp keeps it, so a row
// with other scores still sums to NaN, and run_fwd checks a row whose maximum came out
// -inf for NaN.
template <>
inline float row_max<float>(const float* s, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
#ifdef __AVX512F__
  // (The last n % 16 in masked lanes: rows along a causal diagonal end anywhere.)
  const __m512 none = _mm512_set1_ps(best);
  __m512 m0 = none, m1 = none;
  for (; c + 32 <= n; c += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + c));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + c + 16));
  }
  if (c + 16 <= n) m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + c)), c += 16;
  if (c < n) m1 = _mm512_max_ps(m1, _mm512_mask_loadu_ps(none, static_cast<__mmask16>((1u << (n - c)) - 1), s + c));
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
#else
  const __m256 none = _mm256_set1_ps(best);
  __m256 m0 = none, m1 = none;
  for (; c + 16 <= n; c += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(s + c));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(s + c + 8));
  }
  if (c + 8 <= n) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(s + c)), c += 8;
  if (c < n) {  // the last n % 8 in masked lanes (-inf in the others)
    const __m256i lanes = first_lanes8(n - c);
    const __m256 x = _mm256_blendv_ps(none, _mm256_maskload_ps(s + c, lanes), _mm256_castsi256_ps(lanes));
    m1 = _mm256_max_ps(m1, x);
  }
  const __m256 m = _mm256_max_ps(m0, m1);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
#endif
}

// exp(x) = 2^t, t = x log2(e) = n + f with n an integer and |f| <= 1/2: 2^f by a
// degree-5 polynomial (fitted for relative error: 2.3e-7 evaluated in float), 2^n
// written into a float's exponent. Rounding t itself adds |t| 2^-24, so the measured
// relative error is 2.6e-7 for x in [-1, 0] and grows to 1e-6 at -15 and 4e-6 at -80,
// where exp(x) is under 3e-7 and 2e-35 of a softmax row's largest term (torch's
// Cody-Waite exp_u20 stays near 3.6e-7 for two more instructions per vector; exp(0) is
// 1 + 2^-23 here). t is clamped to [-127, 128]: above, 2^n is infinity; below -126 the
// result is 0 (exp(-inf) = 0; denormals, which would slow the products that take them,
// exp_avx512 below, are 0 too).
constexpr float EXP2_POLY[6] = {0.00132765f, 0.00967554f, 0.05550713f, 0.2402212f, 0.69314697f, 1.00000007f};

inline __m256 exp_avx2(__m256 x_log2e) {
  const __m256 t = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), x_log2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 poly = _mm256_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 6; ++i) poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(EXP2_POLY[i]));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  // (poly >= 1 for f >= 0: t >= -126 gives a normal float; a NaN passes through)
  const __m256 normal = _mm256_cmp_ps(t, _mm256_set1_ps(-126.f), _CMP_NLT_UQ);
  return _mm256_and_ps(_mm256_mul_ps(poly, _mm256_castsi256_ps(two_n)), normal);
}

#ifdef __AVX512F__
// The same polynomial in 16 lanes, with 2^n applied by vscalefps: no clamp at the top (2^n
// overflows to infinity by itself), no conversion to an integer exponent, half the
// instructions per element (faster than exp_avx2: benchmarks/RESULTS.md 'What was
// tried'). Values are exp_avx2's bit for bit where exp_avx2's is a finite normal float
// (for t in (127.5, 128], where it overflowed, this one is finite; softmax arguments are
// at most 0). Below t = -126, where scalef would give a denormal, the result is 0: a
// softmax term under 2^-126 of the row's largest changes no sum, but denormal
// probabilities made the products that take them (P V, the backward's) several times
// slower on Intel's cores (ALiBi rows, whose far keys' logits fall by hundreds: 5x the
// forward's time; benchmarks/RESULTS.md). t is clamped at -160 so that -inf gives
// exactly 0 rather than the NaN of -inf - round(-inf); a NaN passes through.
inline __m512 exp_avx512(__m512 x_log2e) {
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-160.f), x_log2e);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 poly = _mm512_set1_ps(EXP2_POLY[0]);
  for (int i = 1; i < 6; ++i) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(EXP2_POLY[i]));
  // (poly >= 1 for f >= 0: t >= -126 gives a normal float)
  const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(normal, poly, n);
}
#endif

template <>
inline float exp_shift_sum<float>(float* s, int64_t n, float shift) {
  // x - shift first (exact when x is near shift), then the scaling: folding shift * log2(e)
  // into one FMA would round it, an error of |shift| 2^-24 in t.
  int64_t c = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  const __m512 vlog2e = _mm512_set1_ps(1.44269504088896341f), vshift = _mm512_set1_ps(shift);
  __m512 vsum = _mm512_setzero_ps();
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + c), vshift), vlog2e));
    _mm512_storeu_ps(s + c, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (c < n) {  // the last n % 16 in masked lanes (the others are neither stored nor summed)
    const __mmask16 lanes = static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, s + c);
    const __m512 e = exp_avx512(_mm512_mul_ps(_mm512_sub_ps(x, vshift), vlog2e));
    _mm512_mask_storeu_ps(s + c, lanes, e);
    vsum = _mm512_mask_add_ps(vsum, lanes, vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#else
  const __m256 vlog2e = _mm256_set1_ps(1.44269504088896341f), vshift = _mm256_set1_ps(shift);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  for (; c + 16 <= n; c += 16) {
    const __m256 e0 = exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + c), vshift), vlog2e));
    const __m256 e1 = exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + c + 8), vshift), vlog2e));
    _mm256_storeu_ps(s + c, e0);
    _mm256_storeu_ps(s + c + 8, e1);
    sum0 = _mm256_add_ps(sum0, e0);
    sum1 = _mm256_add_ps(sum1, e1);
  }
  for (; c + 8 <= n; c += 8) {
    const __m256 e0 = exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + c), vshift), vlog2e));
    _mm256_storeu_ps(s + c, e0);
    sum0 = _mm256_add_ps(sum0, e0);
  }
  if (c < n) {  // the last n % 8 in masked lanes, into the accumulator a longer row would use
    const __m256i lanes = first_lanes8(n - c);
    const __m256 x = _mm256_maskload_ps(s + c, lanes);
    const __m256 e = _mm256_and_ps(exp_avx2(_mm256_mul_ps(_mm256_sub_ps(x, vshift), vlog2e)),
                                   _mm256_castsi256_ps(lanes));
    _mm256_maskstore_ps(s + c, lanes, e);
    if (c % 16 == 0) {
      sum0 = _mm256_add_ps(sum0, e);
    } else {
      sum1 = _mm256_add_ps(sum1, e);
    }
  }
  sum = tiles::hsum(_mm256_add_ps(sum0, sum1));
#endif
  return sum;
}
#endif

template <typename acc>
inline void scale_row(acc* x, int64_t n, acc mult) {
  using V = Vec<acc>;
  const V vm(mult);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * vm).store(x + c);
  for (; c < n; ++c) x[c] *= mult;
}

#if defined(FLASHATTN_CPU_TILES) && defined(__AVX512F__)
// run_fwd's online softmax for a block whose scores are in columns (the row path's
// column_scores_to, calls no backward follows): st[j * COLUMN_ROWS + r] = row r's score of
// key j, j < n, keys a row does not see already -inf (tiles::mask_columns; no transform or
// dropout). The scores become P in place; the rows' max m and sum l (rows < `rows`: the
// other lanes are neither read nor written) are updated and their O rows (dv floats, ldo
// apart) rescaled, as run_fwd's softmax_rows does row by row, without a horizontal max or
// sum per row (l sums a row's keys in order in its lane; the rescale factor is this file's
// exp, not std::exp). A NaN score is left out of the max, as row_max may leave it, and
// makes the row's sum NaN; such a row's m is NaN too (softmax_rows sets it where the max
// came out -inf), so that a key split's merge cannot take the row for one that saw nothing.
inline void column_softmax(float* st, int64_t n, int64_t rows, float* m, float* l, float* o, int64_t ldo,
                           int64_t dv) {
  using tiles::COLUMN_ROWS;
  const __mmask16 live = rows >= COLUMN_ROWS ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rows) - 1u);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 one = _mm512_set1_ps(1.f), vlog2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 m_old = _mm512_mask_loadu_ps(neg_inf, live, m);
  __m512 m_new = m_old;
  // (max_ps returns its second operand where either is NaN: the running max is never lost)
  for (int64_t j = 0; j < n; ++j) m_new = _mm512_max_ps(_mm512_loadu_ps(st + j * COLUMN_ROWS), m_new);
  // Rows that have seen no key yet (all -inf) shift by 0: their P is exp(-inf) = 0.
  const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ), m_new, _mm512_setzero_ps());
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m512 e = exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(st + j * COLUMN_ROWS), shift), vlog2e));
    _mm512_storeu_ps(st + j * COLUMN_ROWS, e);
    sum = _mm512_add_ps(sum, e);
  }
  // O is rescaled where the max moved from a finite (or NaN) value: not on a row's first keys.
  const __mmask16 moved = _mm512_cmp_ps_mask(m_old, m_new, _CMP_NEQ_UQ) & _mm512_cmp_ps_mask(m_old, neg_inf, _CMP_NEQ_UQ);
  const __m512 rescale =
      _mm512_mask_blend_ps(moved, one, exp_avx512(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), vlog2e)));
  _mm512_mask_storeu_ps(l, live, _mm512_fmadd_ps(_mm512_mask_loadu_ps(one, live, l), rescale, sum));
  const __mmask16 nan_sum = _mm512_cmp_ps_mask(sum, sum, _CMP_UNORD_Q);
  _mm512_mask_storeu_ps(m, live, _mm512_mask_blend_ps(nan_sum, m_new, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN())));
  uint32_t scaled = moved & live;
  if (scaled == 0) return;
  alignas(64) float factor[COLUMN_ROWS];
  _mm512_store_ps(factor, rescale);
  for (; scaled != 0; scaled &= scaled - 1) {
    const int r = __builtin_ctz(scaled);
    scale_row(o + r * ldo, dv, factor[r]);
  }
}
#endif

// Below this much work (a call's estimate in multiply-adds, `work`) a call's tasks run on
// the calling thread alone: waking torch's other intra-op threads (an OpenMP parallel
// region) costs microseconds, tens of them when they have gone to sleep between a model's
// small calls (a decoding step's attention beside its matrix products), more than such
// work. (Only where they run: how a call is cut into tasks, key splits included, and so
// its results, do not depend on it; except the backward's parts of a GQA group, which follow
// the threads the call runs on, flash_bwd.cpp.) The estimate counts the products, each
// score's softmax (exp, max, masks: about
// SCORE_WORK multiply-adds' time) and each task's fixed cost (packing, workspace, output
// rows: TASK_WORK), so that calls of many small tasks (packed short documents) or of tiny
// head dims stay parallel.
constexpr double PARALLEL_MIN_WORK = 1 << 18, SCORE_WORK = 16, TASK_WORK = 4096;

// Into how many tasks each of `tasks` tasks deals its key blocks (num_k_blocks of them)
// so that every thread gets at least two tasks: 1 when there are enough already
// (flash-decoding's split, used by the forward and the backward alike).
inline int64_t key_splits(int64_t tasks, int64_t num_k_blocks) {
  const int64_t threads = torch::stable::get_num_threads();
  if (tasks == 0 || tasks >= 2 * threads) return 1;  // (no tasks: an empty batch or query)
  return std::max<int64_t>(1, std::min(num_k_blocks, (2 * threads + tasks - 1) / tasks));
}

// torch::stable::parallel_for, rethrowing here the first exception `f` threw on any thread
// (through the stable C boundary the loop itself would only report that it failed).
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  std::exception_ptr error;
  std::mutex error_lock;
  torch::stable::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    try {
      f(first, last);
    } catch (...) {
      std::lock_guard<std::mutex> guard(error_lock);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

// Run body(task, next, workspace) for task in [0, num_tasks) on torch's intra-op threads,
// each thread with its own workspace from make_workspace(), handing out tasks in order
// from a shared counter (list heavy tasks first for balance); on the calling thread alone
// when the call's `work` (multiply-adds) is under PARALLEL_MIN_WORK. With claim_ahead a
// thread claims its next task as it starts one, and `next` is that task (-1: none), so
// that a body can prefetch the next task's inputs while it works (run_fwd's packed
// heads); else `next` is -1. (Claiming ahead can leave the last tasks less evenly spread:
// for calls of many tasks.)
template <typename MakeWorkspace, typename Body>
inline void for_each_task_ahead(int64_t num_tasks, double work, bool claim_ahead, const MakeWorkspace& make_workspace,
                                const Body& body) {
  std::atomic<int64_t> counter{0};
  const int64_t threads = work < PARALLEL_MIN_WORK ? 1 : torch::stable::get_num_threads();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, num_tasks));
  parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto workspace = make_workspace();
    for (int64_t t = counter++; t < num_tasks;) {
      const int64_t after = claim_ahead ? counter++ : -1;
      body(t, after < num_tasks ? after : -1, workspace);
      t = claim_ahead ? after : counter++;
    }
  });
}

// for_each_task_ahead without claiming ahead: body(task, workspace).
template <typename MakeWorkspace, typename Body>
inline void for_each_task(int64_t num_tasks, double work, const MakeWorkspace& make_workspace, const Body& body) {
  for_each_task_ahead(num_tasks, work, false, make_workspace,
                      [&](int64_t task, int64_t, auto& workspace) { body(task, workspace); });
}

}  // namespace flashattn::cpu
