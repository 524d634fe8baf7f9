// Fused attention forward on the CPU: tiled, online softmax, no Sq x Sk buffer.
//
// One task is one (batch, head, block of query rows), or, for many short sequences on the
// tiles, several heads of one sequence packed side by side (run_fwd's pack_heads). It
// streams the visible key/value blocks: S = scale * Q K^T, the score transform and
// online-softmax update per row (vectorised exp), then O += P V. The two products run on
// the AVX2 tiles of tiles.h for float and 16-bit inputs on x86 (Q, K, V packed once,
// nothing per call; bf16 on the AMX tiles of tiles_amx.h or, by default on AMD's CPUs, the
// AVX512-BF16 tiles of tiles_bf16.h where the CPU has them: switches.h), except calls with few
// queries per head (decoding, speculative decoding: at most 4, or 5-8 with head dims of
// at least 32), which go row by row over K and V in place (RowOperands; with one query
// block per head a task does every head of its sequence, reading the keys' rows of all
// heads front to back), and other float calls with under 16 queries, which go through
// BLAS (packing K and V would cost as much as the products); double and other CPUs
// through BLAS. Memory per thread is a few blocks plus up to 16 MiB of packed or widened
// K and V; nothing is Sq x Sk.
#include "flash_cpu.h"

#include "blas.h"
#include "tiles.h"
#include "tiles_amx.h"
#include "tiles_bf16.h"

#include <memory>
#include <vector>

namespace flashattn::cpu {

namespace {

// The most rows of a GQA-packed view (flash_fwd below): one query block of the row path.
constexpr int64_t MAX_PACKED_ROWS = 16;
// The most bytes of packed Q, K, V and O per task in run_fwd's pack_heads (about L2).
constexpr int64_t PACK_HEADS_BYTES = 1536 << 10;
// K and V copied into a float (or double) layout the block products read: a thread keeps
// the copy of the head it is working on, filled in 64-key chunks on first use, when the
// head has several query blocks and the copy fits in CACHE_BYTES (the queue hands out a
// head's query blocks in a row, so each key is copied about once per thread and head).
// Otherwise (one query block per head, as in decoding, or a very long head) only the
// current key block is copied, so memory stays a few blocks per thread. `Layout` says
// where a key's K and V elements go (dense rows for BLAS, panels for the tiles).
template <typename acc, typename Layout>
struct KVCopy {
  static constexpr int64_t CHUNK = 64;              // keys
  static constexpr int64_t CACHE_BYTES = 16 << 20;  // per thread
  const bool whole_head;
  const int64_t capacity;  // keys
  Scratch<acc> k, v;
  std::vector<char> ready;  // per chunk (whole-head mode)
  int64_t head = -1;        // b * Hk + hk of the cached head, -1 for none
  bool v_finite = true;     // every V element copied (of the block, or of the head's chunks) is finite

  KVCopy(const FlashParams& p, int64_t block_k, bool several_q_blocks)
      : whole_head(several_q_blocks && Layout::round_keys(p.seqlen_k) * (Layout::k_width(p) + Layout::v_width(p)) *
                                                   static_cast<int64_t>(sizeof(acc)) <=
                                           CACHE_BYTES),
        capacity(Layout::round_keys(whole_head ? p.seqlen_k : block_k)),
        k(scratch<acc>(capacity * Layout::k_width(p))),
        v(scratch<acc>(capacity * Layout::v_width(p))),
        ready(whole_head ? (p.seqlen_k + CHUNK - 1) / CHUNK : 0, 0) {}

  // Copy keys [lo, hi) of head `head_id` (at most one key block). Returns `base`, the key
  // at position 0 of the copy.
  template <typename T>
  int64_t load(const FlashParams& p, int64_t head_id, const KeyRows<T>& kv, int64_t lo, int64_t hi) {
    if (!whole_head) {
      v_finite = copy_keys(p, kv, lo, hi - lo, 0);
      return lo;
    }
    if (head != head_id) {
      std::fill(ready.begin(), ready.end(), 0);
      head = head_id;
      v_finite = true;
    }
    for (int64_t c = lo / CHUNK; c * CHUNK < hi; ++c) {
      if (ready[c]) continue;
      const int64_t key0 = c * CHUNK;
      v_finite = copy_keys(p, kv, key0, std::min(CHUNK, kv.seqlen_k - key0), key0) && v_finite;
      ready[c] = 1;
    }
    return 0;
  }

  // Keys [key0, key0 + n) to position `at` of the copy. Returns whether their V is finite
  // (where the layout says; else true).
  template <typename T>
  bool copy_keys(const FlashParams& p, const KeyRows<T>& kv, int64_t key0, int64_t n, int64_t at) {
    return Layout::copy(p, kv, key0, n, k.get(), v.get(), at, capacity);
  }
};

// Dense rows: key j's K row at k + j * D, V row at v + j * Dv.
struct DenseRows {
  static int64_t round_keys(int64_t n) { return n; }
  static int64_t k_width(const FlashParams& p) { return p.head_dim; }
  static int64_t v_width(const FlashParams& p) { return p.head_dim_v; }
  template <typename T, typename acc>
  static bool copy(const FlashParams& p, const KeyRows<T>& kv, int64_t key0, int64_t n, acc* k, acc* v, int64_t at,
                   int64_t) {
    load_rows(kv.k_row(key0), kv.k_stride, n, p.head_dim, k + at * p.head_dim, p.head_dim);
    load_rows(kv.v_row(key0), kv.v_stride, n, p.head_dim_v, v + at * p.head_dim_v, p.head_dim_v);
    return true;  // (not checked: no product here needs it)
  }
};

// The block products through BLAS: Q, K and V read in place for float and double
// (row stride as leading dimension; copying strided (B, S, H, D) rows to dense ones first
// was measured and did not pay), widened to float rows for 16-bit inputs (Q per task,
// K and V by KVCopy).
template <typename T, typename acc>
struct BlasOperands {
  // Large blocks amortise BLAS's packing of both operands on every call; the 256 x 512
  // float score block (512 KiB) about fills L2. Blocks only partly visible (causal
  // diagonal, windows) are done in panels of PANEL_Q rows.
  static constexpr int64_t BLOCK_Q = 256, BLOCK_K = 512, PANEL_Q = 64, EDGE_PANEL_Q = PANEL_Q;
  static constexpr bool always_panels = false;
  static constexpr bool pages_in_place = false;  // paged K/V: gathered per head (PagedHead)
  static constexpr int64_t HEADS_BLOCK_K = 0;  // one head per task (run_fwd's heads_together)
  static constexpr bool ACROSS_HEADS = false;  // (run_fwd: decoding across heads)
  static constexpr bool PACKS_HEADS = false;   // (run_fwd's pack_heads)
  static constexpr bool in_place = std::is_same_v<T, acc>;
  std::unique_ptr<KVCopy<acc, DenseRows>> copy;
  Scratch<acc> q_copy;
  const acc *q = nullptr, *k = nullptr, *v = nullptr;  // rows of the task's first query, key col0
  int64_t ldq = 0, ldk = 0, ldv = 0;
  const int64_t D, Dv;
  const acc scale;

  BlasOperands(const FlashParams& p, int64_t block_q, int64_t block_k, bool several_q_blocks)
      : copy(in_place ? nullptr : std::make_unique<KVCopy<acc, DenseRows>>(p, block_k, several_q_blocks)),
        q_copy(scratch<acc>(in_place ? 0 : block_q * p.head_dim)),
        D(p.head_dim),
        Dv(p.head_dim_v),
        scale(static_cast<acc>(p.scale64)) {}

  int64_t o_stride() const { return Dv; }

  void load_q(const FlashParams& p, const T* q_rows, int64_t rows) {
    if constexpr (in_place) {
      q = q_rows, ldq = p.q_row_stride;
    } else {
      load_rows(q_rows, p.q_row_stride, rows, D, q_copy.get(), D);
      q = q_copy.get(), ldq = D;
    }
  }

  void load_kv(const FlashParams& p, int64_t head_id, const KeyRows<T>& kv, int64_t col0, int64_t cols) {
    if constexpr (in_place) {
      k = kv.k_row(col0), ldk = kv.k_stride;
      v = kv.v_row(col0), ldv = kv.v_stride;
    } else {
      const int64_t base = copy->load(p, head_id, kv, col0, col0 + cols);
      k = copy->k.get() + (col0 - base) * D, ldk = D;
      v = copy->v.get() + (col0 - base) * Dv, ldv = Dv;
    }
  }

  // s[r * lds + c] = scale * q_(r0 + r) . k_c for r < rows and block columns c in [lo, hi).
  void scores(int64_t r0, int64_t rows, int64_t lo, int64_t hi, acc* s, int64_t lds) const {
    gemm<acc>(Op::N, Op::T, rows, hi - lo, D, scale, q + r0 * ldq, ldq, k + lo * ldk, ldk, acc(0), s + lo, lds);
  }

  // o_r += sum over block columns c in [lo, hi) of pr[r * ldp + c] * v_c. (fewest: the
  // fewest of these keys a row keeps, for the operands that round P: Bf16PairOperands.
  // fresh: o_r = the sum, O not zeroed before, for operands whose OVERWRITES is true; not
  // these, whose O run_fwd zeroes.)
  static constexpr bool OVERWRITES = false;
  void accumulate(int64_t rows, const acc* pr, int64_t ldp, int64_t lo, int64_t hi, int64_t /*fewest*/, acc* o,
                  int64_t ldo, bool /*fresh*/) const {
    gemm<acc>(Op::N, Op::N, rows, Dv, hi - lo, acc(1), pr + lo, ldp, v + lo * ldv, ldv, acc(1), o, ldo);
  }
};

#ifdef FLASHATTN_CPU_TILES
// Panels for tiles.h: K as transposed panels of 16 keys, V as panels of 16 columns
// `capacity * 16` floats apart.
struct TilePanels {
  static int64_t round_keys(int64_t n) { return tiles::round_up(n, 64); }
  static int64_t k_width(const FlashParams& p) { return p.head_dim; }
  static int64_t v_width(const FlashParams& p) { return tiles::round_up(p.head_dim_v, tiles::NR); }
  template <typename T>
  static bool copy(const FlashParams& p, const KeyRows<T>& kv, int64_t key0, int64_t n, float* k, float* v,
                   int64_t at, int64_t capacity) {
    tiles::pack_k(kv.k_row(key0), kv.k_stride, n, p.head_dim, k + at * p.head_dim);
    tiles::pack_v(kv.v_row(key0), kv.v_stride, n, p.head_dim_v, v + at * tiles::NR, capacity * tiles::NR);
    return true;  // (not checked: no product here needs it)
  }
};

// The block products on the AVX2 tiles (fp32 math for float and 16-bit inputs): Q packed
// per task, K and V packed per head (KVCopy).
template <typename T>
struct TileOperands {
  // Nothing is packed per block, so blocks can be small: a 60-row panel's score rows
  // (60 x 256 floats, 60 KiB) and the block's packed K and V stay in L2 from the Q K^T
  // product through the softmax to the P V product. Every block is done in panels, and
  // panels are whole tile row groups (multiples of tiles::MR). Rows across an edge of
  // the visible band (a causal diagonal, a sliding window's sides) go one row group at a
  // time, each over only the keys its rows see (faster than 60-row panels there, most
  // for narrow windows: benchmarks/RESULTS.md 'What was tried').
  static constexpr int64_t BLOCK_Q = 240, BLOCK_K = 256, PANEL_Q = 60, EDGE_PANEL_Q = tiles::MR;
  static constexpr bool always_panels = true;
  static constexpr bool pages_in_place = false;  // paged K/V: gathered per head (PagedHead)
  static constexpr int64_t HEADS_BLOCK_K = 0;  // one head per task (run_fwd's heads_together)
  static constexpr bool ACROSS_HEADS = false;  // (run_fwd: decoding across heads)
  static constexpr bool PACKS_HEADS = true;  // load_q_part, load_kv_part (run_fwd's pack_heads)
  static_assert(PANEL_Q % tiles::MR == 0 && BLOCK_Q % PANEL_Q == 0);
  KVCopy<float, TilePanels> copy;
  Scratch<float> q;
  const float *k = nullptr, *v = nullptr;  // panels at key col0
  const int64_t D, dv_panels;
  const float scale;

  TileOperands(const FlashParams& p, int64_t block_q, int64_t block_k, bool several_q_blocks)
      : copy(p, block_k, several_q_blocks),
        q(scratch<float>(tiles::round_up(block_q, tiles::MR) * p.head_dim)),
        D(p.head_dim),
        dv_panels(TilePanels::v_width(p) / tiles::NR),
        scale(p.scale) {}

  int64_t o_stride() const { return dv_panels * tiles::NR; }

  void load_q(const FlashParams& p, const T* q_rows, int64_t rows) { load_q_part(p, q_rows, 0, rows); }

  void load_kv(const FlashParams& p, int64_t head_id, const KeyRows<T>& kv, int64_t col0, int64_t cols) {
    const int64_t base = copy.load(p, head_id, kv, col0, col0 + cols);
    k = copy.k.get() + (col0 - base) * D;
    v = copy.v.get() + (col0 - base) * tiles::NR;
  }

  // A task doing several heads of one sequence (run_fwd's pack_heads) packs them a few
  // rows at a time, head after head, instead of load_q and load_kv: Q rows [r0, r0 + n)
  // (r0 a multiple of Q_PART: whole row groups), and keys col0 + [c0, c0 + n) of the
  // task's one key block (c0 a multiple of 16: whole panels). The panels come out as
  // load_q's and load_kv's. Then use_kv with the slot that packed this head's K and V
  // (GQA: the first query head of the KV head).
  static constexpr int64_t Q_PART = tiles::MR;
  void load_q_part(const FlashParams& p, const T* q_rows, int64_t r0, int64_t n) {
    tiles::pack_q(q_rows + r0 * p.q_row_stride, p.q_row_stride, n, D, scale, q.get() + r0 * D);
  }
  void load_kv_part(const FlashParams& p, const KeyRows<T>& kv, int64_t col0, int64_t c0, int64_t n) {
    copy.copy_keys(p, kv, col0 + c0, n, c0);
  }

  void use_kv(const TileOperands& packed) {
    k = packed.copy.k.get();
    v = packed.copy.v.get();
  }

  // r0 is a multiple of tiles::MR (a pack_q group). Computes whole 16-key panels: columns
  // [lo, hi) rounded out to multiples of 16 (the score rows are wide enough, the extra
  // columns are not read).
  void scores(int64_t r0, int64_t rows, int64_t lo, int64_t hi, float* s, int64_t lds) const {
    const int64_t lo16 = lo / tiles::NR * tiles::NR;
    const int64_t panels = (hi - lo16 + tiles::NR - 1) / tiles::NR;
    tiles::qk_block(rows, q.get() + r0 * D, k + lo16 * D, panels, D, s + lo16, lds);
  }

  static constexpr bool OVERWRITES = true;
  void accumulate(int64_t rows, const float* pr, int64_t ldp, int64_t lo, int64_t hi, int64_t /*fewest*/, float* o,
                  int64_t ldo, bool fresh) const {
    tiles::pv_block(rows, pr + lo, ldp, v + lo * tiles::NR, copy.capacity * tiles::NR, hi - lo, dv_panels, o, ldo,
                    fresh);
  }
};
#endif

#ifdef FLASHATTN_CPU_BF16_DOT
// K and V of bf16 inputs as tiles_bf16's pair panels, in 32-bit words: d2 words per key of
// K, 8 per key and 16-column panel of V (a pair of keys fills 16 words of a panel).
struct Bf16Panels {
  static int64_t round_keys(int64_t n) { return tiles::round_up(n, 64); }
  static int64_t k_width(const FlashParams& p) { return tiles_bf16::pairs(p.head_dim); }
  static int64_t v_width(const FlashParams& p) { return tiles::round_up(p.head_dim_v, tiles_bf16::NR) / 2; }
  static bool copy(const FlashParams& p, const KeyRows<c10::BFloat16>& kv, int64_t key0, int64_t n, uint32_t* k,
                   uint32_t* v, int64_t at, int64_t capacity) {
    tiles_bf16::pack_k(kv.k_row(key0), kv.k_stride, n, p.head_dim, k + at * k_width(p));
    return tiles_bf16::pack_v(kv.v_row(key0), kv.v_stride, n, p.head_dim_v, v + at * tiles_bf16::NR / 2,
                              capacity * tiles_bf16::NR / 2);
  }
};

// The block products of bf16 inputs on bf16 pair tiles: the AVX512-BF16 tiles
// (tiles_bf16.h) or AMX (tiles_amx.h), as `Tiles` below says. bf16 pairs multiplied and
// summed in float, P rounded to bf16 for P V. Blocks, panels and the softmax between the
// products as TileOperands; K and V copied as pair panels (Bf16Panels), which both read.
//
// Rounding P costs each output up to 2^-9 of the V rows it weighs, while l sums the float
// P: where a row keeps many keys that averages out, but a row that keeps few (tiny key
// counts, a causal diagonal's first rows, narrow windows, masks, dropout) would be only as
// accurate as the naive bf16 formula, which also rounds P (independent reviews found the
// test rule's 2x margin broken on rows keeping 2-3 and 9-16 keys with tiny head dims;
// benchmarks/RESULTS.md). Panels where a row keeps at most EXACT_P_KEYS of the block's
// keys (the band's, or counted by run_fwd's softmax under masks and dropout) therefore add
// P - bf16(P) V as a second product: P V as exact as in float, for the price of a second
// P V on small blocks; not where the block's V holds an inf or NaN (0 x inf would make a
// row that should come out inf NaN: the packing says, KVCopy::v_finite). (At 64 keys
// the second product took a tenth of packed short documents' forward.)
template <typename Tiles>
struct Bf16PairOperands {
  static constexpr int64_t BLOCK_Q = Tiles::BLOCK_Q, BLOCK_K = TileOperands<c10::BFloat16>::BLOCK_K,
                           PANEL_Q = Tiles::PANEL_Q, EDGE_PANEL_Q = Tiles::EDGE_PANEL_Q;
  static constexpr int64_t EXACT_P_KEYS = 16;
  static constexpr bool always_panels = true;  // (p_pairs holds one panel: PANEL_Q rows)
  static constexpr bool pages_in_place = false;  // paged K/V: gathered per head (PagedHead)
  static constexpr int64_t HEADS_BLOCK_K = 0;  // one head per task (run_fwd's heads_together)
  static constexpr bool ACROSS_HEADS = false;  // (run_fwd: decoding across heads)
  static constexpr bool PACKS_HEADS = true;    // as TileOperands
  static_assert(PANEL_Q % Tiles::ROWS == 0 && BLOCK_Q % PANEL_Q == 0 && BLOCK_K % tiles_bf16::NR == 0);
  typename Tiles::Use tile_use;  // (AMX: tiles_amx::Use)
  KVCopy<uint32_t, Bf16Panels> copy;
  const int64_t D, d2, dv_panels, ldp;  // ldp: words per row of the P pairs
  // The task's Q pairs; one panel's P pairs, P - bf16(P). In whole row groups of
  // Tiles::ROWS (AMX tiles read 16 rows from every 16th: rows past a panel's are computed
  // and dropped).
  Scratch<uint32_t> q, p_pairs, p_rest;
  const uint32_t *k = nullptr, *v = nullptr;  // panels at key col0
  bool v_finite = true;                         // (of the panels k and v point into)
  const float scale;

  Bf16PairOperands(const FlashParams& p, int64_t block_q, int64_t block_k, bool several_q_blocks)
      : copy(p, block_k, several_q_blocks),
        D(p.head_dim),
        d2(tiles_bf16::pairs(p.head_dim)),
        dv_panels(tiles::round_up(p.head_dim_v, tiles_bf16::NR) / tiles_bf16::NR),
        ldp(tiles::round_up(tiles_bf16::pairs(block_k), tiles_bf16::NR)),
        q(scratch<uint32_t>(tiles::round_up(block_q, Tiles::ROWS) * d2)),
        p_pairs(scratch<uint32_t>(tiles::round_up(std::min(block_q, PANEL_Q), Tiles::ROWS) * ldp)),
        p_rest(scratch<uint32_t>(tiles::round_up(std::min(block_q, PANEL_Q), Tiles::ROWS) * ldp)),
        scale(p.scale) {}

  int64_t o_stride() const { return dv_panels * tiles_bf16::NR; }

  void load_q(const FlashParams& p, const c10::BFloat16* q_rows, int64_t rows) { load_q_part(p, q_rows, 0, rows); }

  void load_kv(const FlashParams& p, int64_t head_id, const KeyRows<c10::BFloat16>& kv, int64_t col0, int64_t cols) {
    const int64_t base = copy.load(p, head_id, kv, col0, col0 + cols);
    k = copy.k.get() + (col0 - base) * d2;
    v = copy.v.get() + (col0 - base) * tiles_bf16::NR / 2;
    v_finite = copy.v_finite;
  }

  // As TileOperands' (Q in row groups of Tiles::ROWS).
  static constexpr int64_t Q_PART = Tiles::ROWS;
  void load_q_part(const FlashParams& p, const c10::BFloat16* q_rows, int64_t r0, int64_t n) {
    Tiles::pack_q(q_rows + r0 * p.q_row_stride, p.q_row_stride, n, D, q.get() + r0 * d2);
  }
  void load_kv_part(const FlashParams& p, const KeyRows<c10::BFloat16>& kv, int64_t col0, int64_t c0, int64_t n) {
    const bool finite = copy.copy_keys(p, kv, col0 + c0, n, c0);
    copy.v_finite = finite && (c0 == 0 || copy.v_finite);  // (c0 = 0: the block's first part)
  }

  void use_kv(const Bf16PairOperands& packed) {
    k = packed.copy.k.get();
    v = packed.copy.v.get();
    v_finite = packed.copy.v_finite;
  }

  // As TileOperands::scores: whole 16-key panels from lo rounded down to 16. r0 starts a
  // row group.
  void scores(int64_t r0, int64_t rows, int64_t lo, int64_t hi, float* s, int64_t lds) const {
    const int64_t lo16 = lo / tiles_bf16::NR * tiles_bf16::NR;
    const int64_t panels = (hi - lo16 + tiles_bf16::NR - 1) / tiles_bf16::NR;
    Tiles::qk_block(rows, q.get() + r0 * d2, k + lo16 * d2, panels, d2, scale, s + lo16, lds);
  }

  // P's keys [lo, hi) to bf16 pairs from the even key at or below lo, then O += P V (O =
  // P V when fresh; and O += (P - bf16(P)) V where a row sees few keys).
  static constexpr bool OVERWRITES = true;
  void accumulate(int64_t rows, const float* pr, int64_t lds, int64_t lo, int64_t hi, int64_t fewest, float* o,
                  int64_t ldo, bool fresh) const {
    const int64_t lo2 = lo / 2 * 2, n2 = tiles_bf16::pairs(hi - lo2);
    const bool exact = fewest <= EXACT_P_KEYS && v_finite;  // (a row's keys lie inside [lo, hi))
    tiles_bf16::to_pairs(pr, lds, rows, lo, hi, p_pairs.get(), ldp, exact ? p_rest.get() : nullptr);
    const uint32_t* v_lo2 = v + lo2 * tiles_bf16::NR / 2;
    const int64_t v_stride = copy.capacity * tiles_bf16::NR / 2;
    Tiles::pv_block(rows, p_pairs.get(), ldp, v_lo2, v_stride, n2, dv_panels, o, ldo, fresh);
    if (exact) Tiles::pv_block(rows, p_rest.get(), ldp, v_lo2, v_stride, n2, dv_panels, o, ldo, false);
  }
};

// The AVX512-BF16 tiles: TileOperands' blocks and panels (Q packed in row groups of MR).
struct DotTiles {
  static constexpr int64_t BLOCK_Q = TileOperands<c10::BFloat16>::BLOCK_Q,
                           PANEL_Q = TileOperands<c10::BFloat16>::PANEL_Q, ROWS = tiles::MR, EDGE_PANEL_Q = ROWS;
  struct Use {};  // (no tile state)
  static void pack_q(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t d, uint32_t* dst) {
    tiles_bf16::pack_q(src, ld, rows, d, dst);
  }
  static void qk_block(int64_t rows, const uint32_t* q, const uint32_t* k, int64_t panels, int64_t d2, float scale,
                       float* s, int64_t lds) {
    tiles_bf16::qk_block(rows, q, k, panels, d2, scale, s, lds);
  }
  static void pv_block(int64_t rows, const uint32_t* a, int64_t lda, const uint32_t* v, int64_t panel_stride,
                       int64_t n2, int64_t dv_panels, float* o, int64_t ldo, bool overwrite) {
    tiles_bf16::pv_block(rows, a, lda, 1, v, panel_stride, n2, dv_panels, o, ldo, overwrite);
  }
};
using Bf16DotOperands = Bf16PairOperands<DotTiles>;

#ifdef FLASHATTN_CPU_AMX
// AMX: blocks of 256 queries in panels of 64 rows, also along a causal diagonal or window
// edge, where the products then take the masked corner too: AMX does them at a fraction of
// the cost of the softmax between them, and panels of one tile (16 rows) there made a
// product's latency (tile loads, multiply, stores, a few tiles per call) the cost on short
// sequences (benchmarks/RESULTS.md); Q as rows of pairs.
struct AmxTiles {
  static constexpr int64_t BLOCK_Q = 256, PANEL_Q = 64, ROWS = tiles_amx::TM, EDGE_PANEL_Q = PANEL_Q;
  using Use = tiles_amx::Use;
  static void pack_q(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t d, uint32_t* dst) {
    tiles_amx::pack_q(src, ld, rows, d, dst);
  }
  static void qk_block(int64_t rows, const uint32_t* q, const uint32_t* k, int64_t panels, int64_t d2, float scale,
                       float* s, int64_t lds) {
    tiles_amx::qk_block(rows, q, k, panels, d2, scale, s, lds);
  }
  static void pv_block(int64_t rows, const uint32_t* a, int64_t lda, const uint32_t* v, int64_t panel_stride,
                       int64_t n2, int64_t dv_panels, float* o, int64_t ldo, bool overwrite) {
    tiles_amx::pv_block(rows, a, lda, v, tiles_bf16::NR, panel_stride, n2, dv_panels, o, ldo, overwrite);
  }
};
using AmxOperands = Bf16PairOperands<AmxTiles>;
#endif
#endif

#ifdef FLASHATTN_CPU_TILES
// Calls with few query rows per head (tiles::use_rows: decoding): each
// key's K row is dotted with the few query rows (tiles::row_scores; calls no backward
// follows with 9-16 rows: tiles::column_scores, the rows in the lanes) and the V rows added
// into their outputs (tiles::row_pv), K and V read in place (16-bit elements widened in
// registers). Few queries make these products bound by reading K and V; BLAS's small
// products pack the key block on every call, and the tiles copy it into panels, each
// about half the memory rate.
template <typename T>
struct RowOperands {
  // (A call's query blocks have at most tiles::MAX_ROW_QUERIES rows; GQA-packed views up
  // to MAX_PACKED_ROWS, flash_fwd below.)
  static constexpr int64_t BLOCK_Q = MAX_PACKED_ROWS, BLOCK_K = 512, PANEL_Q = BLOCK_Q, EDGE_PANEL_Q = PANEL_Q;
  static_assert(BLOCK_Q <= tiles::COLUMN_ROWS);  // (column_scores: a block's rows in one vector)
  // Keys per block when a task does every head of a sequence (run_fwd's heads_together).
  static constexpr int64_t HEADS_BLOCK_K = 32;
  // Float K/V: a block of every head in steps of ACROSS_KEYS keys of each head in turn
  // (run_fwd; accumulate_sums, tiles::row_pv_sums). 16-bit rows gain nothing that way
  // (their products, with the widening, bound them more than the reads), and steps of 4 or
  // 8 keys cost more per step than the memory order saves (benchmarks/RESULTS.md).
  static constexpr bool ACROSS_HEADS = std::is_same_v<T, float>;
  static constexpr int64_t ACROSS_KEYS = 16;
  static_assert(HEADS_BLOCK_K <= tiles::ROW_PV_CHUNK);  // (a block's P V is one chunk of row_pv's)
  static constexpr bool PACKS_HEADS = false;  // (run_fwd's pack_heads)
  static constexpr bool always_panels = false;
  static constexpr bool pages_in_place = true;  // paged K/V: each page's run of rows read in place
  Scratch<float> q;                    // the task's query rows, widened, times the scale
  const T *k = nullptr, *v = nullptr;  // rows of key col0 (not paged)
  int64_t ldk = 0, ldv = 0;
  KeyRows<T> paged{nullptr, nullptr, 0, 0, 0};  // paged: the head's keys (KeyRows::pages)
  int64_t col0 = 0;
  bool prefetch_runs = true;
  // Decoding across heads (run_fwd's heads_together): the next block's K and V rows of this
  // head (or its share of the block's, spread_next_block), which this block's products
  // prefetch as they go (the rows' addresses in ahead_rows: max_block_k of K's, then V's,
  // then spread_next_block's key rows). The AVX2 build spreads 16-bit rows only: float rows
  // were 8-16 % slower that way on Zen 3 than with no prefetch at all, 16-bit rows 2-23 %
  // faster than with the burst (benchmarks/RESULTS.md).
#ifdef __AVX512F__
  static constexpr bool SPREADS_AHEAD = true;
#else
  static constexpr bool SPREADS_AHEAD = sizeof(T) == 2;
#endif
  tiles::RowsAhead<T> k_ahead, v_ahead;
  std::unique_ptr<const T*[]> ahead_rows;
  const int64_t max_block_k;  // (the keys of a block, at most)
  PageRows<T> next_block_rows{nullptr, nullptr};  // paged: the next block's first rows,
  int64_t next_block_ahead = 0;                    // how many (0: no next block)
  const int64_t D, Dv;
  const float scale;
  // Calls no backward follows with more than half a vector of query rows (decoding several
  // tokens of a GQA group, tiles::use_columns), float, and bf16 in the AVX2 build (with
  // AVX-512, bf16 calls of 9-16 rows go to DotRowOperands' columns where the CPU has
  // AVX512-BF16): the scores by tiles::column_scores, from q transposed (allocated for such
  // calls only).
#ifdef __AVX512F__
  static constexpr bool COLUMN_SCORES = std::is_same_v<T, float>;
#else
  static constexpr bool COLUMN_SCORES = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
#endif
  Scratch<float> q_transposed;

  RowOperands(const FlashParams& p, int64_t bq, int64_t bk, bool)
      : q(scratch<float>(bq * p.head_dim)), max_block_k(bk), D(p.head_dim), Dv(p.head_dim_v), scale(p.scale) {
    if constexpr (COLUMN_SCORES) {
      if (forward_only(p) && tiles::use_columns(bq)) {
        q_transposed = scratch<float>(p.head_dim * tiles::COLUMN_ROWS);
        keep_key_rows(bk);
      }
    }
  }

  int64_t o_stride() const { return Dv; }

  void load_q(const FlashParams& p, const T* q_rows, int64_t rows) {
    load_rows(q_rows, p.q_row_stride, rows, D, q.get(), D);
    scale_row(q.get(), rows * D, scale);
    if constexpr (COLUMN_SCORES) {
      if (q_transposed && tiles::use_columns(rows)) tiles::transpose_rows(q.get(), rows, D, q_transposed.get());
    }
  }

  // The first key of the block this task reads next for this head, or -1; whether paged
  // runs prefetch the rows read after them (for_runs): the next block's first rows are
  // prefetched while the current block's last run is read. (run_fwd passes -1 where the
  // products take the next block's rows, spread_next_block, and false for blocks read
  // across heads.)
  void set_next_block(int64_t col, bool prefetch) {
    prefetch_runs = prefetch, next_block_ahead = 0;
    if (!paged.pages || !prefetch || col < 0) return;
    next_block_ahead = std::min(RUN_AHEAD, paged.seqlen_k - col);
    const KeyRows<T> run = page_run<T>(*paged.pages, *paged.seq, paged.b, paged.hk, col, next_block_ahead);
    next_block_rows = {run.k, run.v};
  }

  // The next block's keys [col, col + n) of this head (kv head hk; n at most max_block_k;
  // its keys, paged: through its pages), which run_fwd prefetches: left to this block's
  // products (k_ahead, v_ahead) where SPREADS_AHEAD, the current block's products being
  // over all of its keys (the next block has at most as many); returns how many (n or 0).
  // 16-bit rows whose heads lie side by side (a (B, S, Hk, D) cache or its pages) take
  // their share of the next block in memory order instead of their own head's rows: head
  // hk's products the rows hk * n + [0, n) of the block's n keys x Hk heads, so that the
  // heads in turn prefetch the block front to back (bf16 one query 2-23 % faster than
  // each head its own rows, which read D elements out of every Hk * D; fp32 rows 2-12 %
  // slower: benchmarks/RESULTS.md).
  int64_t spread_next_block(const FlashParams& p, int64_t hk, const KeyRows<T>& keys, int64_t col, int64_t n) {
    k_ahead = v_ahead = {};
    // (Float calls of 9-16 rows, on column scores: their products bound them, not the
    // reads, and these prefetches cost them 3-7 %.)
    const bool float_columns = std::is_same_v<T, float> && q_transposed;
    if (!SPREADS_AHEAD || n <= 0 || float_columns) return 0;
    // (keys in the cache itself, rows p's strides apart: head 0's row of a key is then
    // D elements before head 1's)
    const int64_t Hk = p.num_heads_k;
    const bool memory_order = sizeof(T) == 2 && Hk > 1 && p.k_head_stride == D && p.v_head_stride == Dv &&
                              keys.k_stride == p.k_row_stride && keys.v_stride == p.v_row_stride;
    if (!ahead_rows) ahead_rows.reset(new const T*[4 * max_block_k]);
    const T** k_rows = ahead_rows.get();
    const T** v_rows = k_rows + max_block_k;
    if (memory_order) {
      const T** key_k = v_rows + max_block_k;  // key col + i's row of head 0
      const T** key_v = key_k + max_block_k;
      for_key_rows(keys, col, col + n, [&](int64_t j, const T* k_row, const T* v_row) {
        key_k[j - col] = k_row - hk * D, key_v[j - col] = v_row - hk * Dv;
      });
      // (row hk * n + i: key (hk * n + i) / Hk, head (hk * n + i) % Hk; counted, not divided)
      for (int64_t i = 0, key = hk * n / Hk, head = hk * n % Hk; i < n; ++i) {
        k_rows[i] = key_k[key] + head * D;
        v_rows[i] = key_v[key] + head * Dv;
        if (++head == Hk) head = 0, ++key;
      }
    } else {
      for_key_rows(keys, col, col + n, [&](int64_t j, const T* k_row, const T* v_row) {
        k_rows[j - col] = k_row, v_rows[j - col] = v_row;
      });
    }
    k_ahead = {k_rows, n};
    v_ahead = {v_rows, n};
    return n;
  }

  // The rows of `ahead` that the products of this block's keys [lo, hi) prefetch: as many as
  // keys, at the same offsets.
  static tiles::RowsAhead<T> ahead_of(const tiles::RowsAhead<T>& ahead, int64_t lo, int64_t hi) {
    const int64_t end = std::min(hi, ahead.n);
    if (end <= lo) return {};
    return {ahead.rows + lo, end - lo};
  }

  void load_kv(const FlashParams&, int64_t, const KeyRows<T>& kv, int64_t block_col0, int64_t) {
    col0 = block_col0;
    if (kv.pages) {
      paged = kv;
      return;
    }
    paged.pages = nullptr;
    k = kv.k_row(col0), ldk = kv.k_stride;
    v = kv.v_row(col0), ldv = kv.v_stride;
  }

  // f(offset in the block, n, rows) for the runs of the block's keys [lo, hi) within one
  // page each: one run when not paged. Scores are per key, so they do not depend on where
  // the runs end; row_pv adds each run to O in chunks of 32 keys from the run's first, so
  // O's rounding does (a paged call is within the rule of the contiguous one, not bitwise;
  // run_fwd's across-heads blocks sum a block's runs together and add them to O once).
  // Paged, with prefetch_runs, the first rows of the next run (another page, anywhere in
  // memory: no stream for the hardware prefetcher), or at the last run the next block's
  // (set_next_block), are prefetched before the current run is read (`values`: V's rows,
  // else K's). A call divides by the page size once (a run after the first starts its page).
  template <typename F>
  void for_runs(int64_t lo, int64_t hi, bool values, const F& f) const {
    if (!paged.pages) return f(lo, hi - lo, k + lo * ldk, v + lo * ldv);
    const FlashParams& p = *paged.pages;
    const PageSlot first = page_slot(p, *paged.seq, col0 + lo);
    int64_t page = first.index, row = first.row;
    for (int64_t at = lo; at < hi;) {
      const int64_t n = std::min(hi - at, p.page_size - row);
      const PageRows<T> run = page_rows<T>(p, paged.b, paged.hk, page, row);
      if (prefetch_runs) {
        if (at + n < hi) {
          const PageRows<T> next = page_rows<T>(p, paged.b, paged.hk, page + 1, 0);
          prefetch_first_rows(values, next, std::min({RUN_AHEAD, hi - at - n, p.page_size}));
        } else {
          prefetch_first_rows(values, next_block_rows, next_block_ahead);
        }
      }
      f(at, n, run.k, run.v);
      at += n, ++page, row = 0;
    }
  }

  // Rows prefetched at the start of a paged run (for_runs). (Inlined: as a call, bf16
  // decoding from pages was 5-14% slower, benchmarks/RESULTS.md.)
  static constexpr int64_t RUN_AHEAD = 8;
  __attribute__((always_inline)) void prefetch_first_rows(bool values, const PageRows<T>& rows, int64_t n) const {
    const T* first = values ? rows.v : rows.k;
    const int64_t ld = values ? paged.v_stride : paged.k_stride, width = values ? Dv : D;
    for (int64_t r = 0; r < n; ++r) tiles::prefetch_row(first + r * ld, width);
  }

  // The row stride of K (or V, `values`) rows in a run.
  int64_t run_stride(bool values) const {
    return values ? (paged.pages ? paged.v_stride : ldv) : (paged.pages ? paged.k_stride : ldk);
  }

  // The K (or V) rows of the block's keys [lo, hi), key lo + j's at [j] (at most the bk keys
  // of keep_key_rows): the runs of a paged block side by side (for_runs, which prefetches
  // the next run's first rows), so that products can take several keys at a time across pages.
  const T* const* key_rows(int64_t lo, int64_t hi, bool values) const {
    const int64_t ld = run_stride(values);
    for_runs(lo, hi, values, [&](int64_t at, int64_t n, const T* k_run, const T* v_run) {
      const T* first = values ? v_run : k_run;
      for (int64_t j = 0; j < n; ++j) row_ptrs[at - lo + j] = first + j * ld;
    });
    return row_ptrs.get();
  }
  void keep_key_rows(int64_t bk) { row_ptrs.reset(new const T*[bk]); }

  // f(key rows, n, c) for the block's keys [lo, hi) 16 at a time (key c's row first, n of
  // them), the next 16 keys' K rows prefetched before each ((B, S, H, D) rows are a page
  // apart or more): column scores, of every row of the block at once (r0 is 0 there: a
  // panel is every row, PANEL_Q = EDGE_PANEL_Q = BLOCK_Q).
  template <typename F>
  void for_column_groups(int64_t lo, int64_t hi, const F& f) const {
    const T* const* krow = key_rows(lo, hi, false);
    for (int64_t c = lo; c < hi; c += 16) {
      for (int64_t j = c + 16; j < std::min(c + 32, hi); ++j) tiles::prefetch_row(krow[j - lo], D);
      f(krow + (c - lo), std::min<int64_t>(16, hi - c), c);
    }
  }

  // for_column_groups, each group of keys prefetching its rows of k_ahead (ahead_of) as it
  // goes: f(krow, n, c, lines) steps `lines` through its products.
  template <typename F>
  void column_groups(int64_t lo, int64_t hi, const F& f) const {
    for_column_groups(lo, hi, [&](const T* const* krow, int64_t n, int64_t c) {
      tiles::AheadLines<T> lines(ahead_of(k_ahead, c, c + n), D * static_cast<int64_t>(sizeof(T)));
      f(krow, n, c, lines);
      lines.rest();
    });
  }

  void scores(int64_t r0, int64_t rows, int64_t lo, int64_t hi, float* s, int64_t lds) const {
    if constexpr (COLUMN_SCORES) {
      if (q_transposed && tiles::use_columns(rows)) {
        column_groups(lo, hi, [&](const T* const* krow, int64_t n, int64_t c, tiles::AheadLines<T>& lines) {
          tiles::column_scores(q_transposed.get(), rows, krow, n, D, s + c, lds, lines);
        });
        return;
      }
    }
    const int64_t ld = run_stride(false);
    for_runs(lo, hi, false, [&](int64_t at, int64_t n, const T* k_run, const T*) {
      tiles::row_scores(q.get() + r0 * D, rows, k_run, ld, n, D, s + at, lds, ahead_of(k_ahead, at, at + n));
    });
  }

  static constexpr bool OVERWRITES = false;
  void accumulate(int64_t rows, const float* pr, int64_t ldp, int64_t lo, int64_t hi, int64_t /*fewest*/, float* o,
                  int64_t ldo, bool /*fresh*/) const {
    const int64_t ld = run_stride(true);
    for_runs(lo, hi, true, [&](int64_t at, int64_t n, const T*, const T* v_run) {
      tiles::row_pv(pr + at, ldp, rows, v_run, ld, n, Dv, o, ldo, ahead_of(v_ahead, at, at + n));
    });
  }

  // accumulate's product for keys [lo, hi) continuing the running sums c (tiles::row_pv_sums),
  // which the caller adds to O at the block's end.
  void accumulate_sums(int64_t rows, const float* pr, int64_t ldp, int64_t lo, int64_t hi, float* c,
                       int64_t ldc) const {
    const int64_t ld = run_stride(true);
    for_runs(lo, hi, true, [&](int64_t at, int64_t n, const T*, const T* v_run) {
      tiles::row_pv_sums(pr + at, ldp, rows, v_run, ld, n, Dv, c, ldc, ahead_of(v_ahead, at, at + n));
    });
  }

  // o += c for the rows (Dv columns, in one rounding: row_pv's addition of its sums), c back to 0.
  void add_sums(int64_t rows, float* c, int64_t ldc, float* o, int64_t ldo) const {
    for (int64_t r = 0; r < rows; ++r) {
      tiles::axpy(1.f, c + r * ldc, o + r * ldo, Dv);
      std::fill(c + r * ldc, c + r * ldc + Dv, 0.f);
    }
  }

 private:
  std::unique_ptr<const T*[]> row_ptrs;  // key_rows'
};

// Whether a call's rows may keep only a few keys: dropout, a bias, a band of at most 16
// keys or at most 16 keys in all (seqlen_k: a KV cache's capacity). The row path's bf16
// products (DotRowOperands, AMX rows) round P for P V, which broke the test rule on such
// rows (as Bf16PairOperands' EXACT_P_KEYS; the row path's blocks are too short to count a
// row's keys per block): these calls keep P in float.
inline bool rows_may_keep_few_keys(const FlashParams& p) {
  return p.dropout_p > 0.f || p.bias != nullptr || p.seqlen_k <= 16 ||
         (p.window_left >= 0 && p.window_right >= 0 && p.window_left + p.window_right < 16);
}
#endif

#ifdef FLASHATTN_CPU_BF16_DOT
// The row path's operands with the products on vdpbf16ps (tiles_bf16::rows), for bf16 calls
// that no backward follows (flash_fwd below; a backward recomputes S on the row path, which
// sums it in another order): the same blocks, runs and prefetches. Q stays in bf16, the
// scale applied to the sums; P is rounded to bf16 for P V, as on AMX.
struct DotRowOperands : RowOperands<c10::BFloat16> {
  using Base = RowOperands<c10::BFloat16>;
  // (Head by head: across heads measured no faster for these products, benchmarks/RESULTS.md.)
  static constexpr bool ACROSS_HEADS = false;
  // Every head of a sequence 16 keys at a time (run_fwd's heads_together): 3-12% faster
  // than 32 from memory (float rows, across heads: 32; benchmarks/RESULTS.md).
  static constexpr int64_t HEADS_BLOCK_K = 16;
  Scratch<c10::BFloat16> qb;  // the task's query rows, unscaled
  Scratch<uint32_t> pp;       // a run's P as key pairs
  // Rows for tiles::use_columns: the scores by tiles_bf16::rows::column_scores, from the
  // query pairs transposed (allocated for such calls only).
  Scratch<uint32_t> qb_transposed;
  // Rows for tiles::use_columns, where no row may keep few keys (not float_p: no dropout
  // or bias either): blocks whose scores need no transform in columns (column_block), a
  // row in each lane: the scores, then P; P's key pairs transposed.
  static constexpr bool COLUMN_BLOCKS = true;
  Scratch<float> block_columns;
  Scratch<uint32_t> pair_columns;

  // P V in float (RowOperands' product) in calls whose rows may keep only a few keys
  // (rows_may_keep_few_keys).
  const bool float_p;

  DotRowOperands(const FlashParams& p, int64_t bq, int64_t bk, bool several_q_blocks)
      : Base(p, bq, bk, several_q_blocks),
        qb(scratch<c10::BFloat16>(bq * p.head_dim)),
        pp(scratch<uint32_t>(bq * tiles_bf16::pairs(bk))),
        float_p(rows_may_keep_few_keys(p)) {
    if (tiles::use_columns(bq)) {
      qb_transposed = scratch<uint32_t>(p.head_dim / 2 * tiles::COLUMN_ROWS);
      keep_key_rows(bk);
      if (!float_p) {
        block_columns = scratch<float>(bk * tiles::COLUMN_ROWS);
        pair_columns = scratch<uint32_t>(tiles_bf16::pairs(bk) * tiles::COLUMN_ROWS);
      }
    }
  }

  void load_q(const FlashParams& p, const c10::BFloat16* q_rows, int64_t rows) {
    load_rows(q_rows, p.q_row_stride, rows, D, qb.get(), D);
    if (qb_transposed && tiles::use_columns(rows)) {
      tiles_bf16::rows::transpose_rows(qb.get(), rows, D, qb_transposed.get());
    }
  }

  void scores(int64_t r0, int64_t rows, int64_t lo, int64_t hi, float* s, int64_t lds) const {
    if (qb_transposed && tiles::use_columns(rows)) {
      column_groups(lo, hi, [&](const c10::BFloat16* const* krow, int64_t n, int64_t c,
                                tiles::AheadLines<c10::BFloat16>& lines) {
        tiles_bf16::rows::column_scores(qb_transposed.get(), rows, krow, n, D, scale, s + c, lds, lines);
      });
      return;
    }
    const int64_t ld = run_stride(false);
    for_runs(lo, hi, false, [&](int64_t at, int64_t n, const c10::BFloat16* k_run, const c10::BFloat16*) {
      tiles_bf16::rows::scores(qb.get() + r0 * D, rows, k_run, ld, n, D, scale, s + at, lds,
                               ahead_of(k_ahead, at, at + n));
    });
  }

  // Whether column_block serves a block of `rows` query rows.
  bool columns(int64_t rows) const { return block_columns && tiles::use_columns(rows); }

  // scores, run_fwd's softmax and accumulate for the block's keys [lo, hi) in columns: the
  // scores stay in their lanes (no transpose), masked to row r's keys [key_lo[r], key_hi[r])
  // from lo where given (else every row sees every key); the softmax's max and sum take no
  // horizontal steps per row (column_softmax); P V from P's pairs in lanes. The rows' m, l
  // and O (rows x Dv, ldo apart) updated.
  void column_block(int64_t rows, int64_t lo, int64_t hi, const int32_t* key_lo, const int32_t* key_hi, float* m,
                    float* l, float* o, int64_t ldo) const {
    float* st = block_columns.get();
    column_groups(lo, hi, [&](const c10::BFloat16* const* krow, int64_t n, int64_t c,
                              tiles::AheadLines<c10::BFloat16>& lines) {
      tiles_bf16::rows::column_scores_to(qb_transposed.get(), krow, n, D, scale, st + (c - lo) * tiles::COLUMN_ROWS,
                                         lines);
    });
    if (key_lo) tiles::mask_columns(st, hi - lo, key_lo, key_hi);
    column_softmax(st, hi - lo, rows, m, l, o, ldo, Dv);
    tiles_bf16::rows::column_pairs(st, hi - lo, pair_columns.get());
    tiles_bf16::rows::pv_columns(pair_columns.get(), rows, key_rows(lo, hi, true), hi - lo, Dv, o, ldo,
                                 ahead_of(v_ahead, lo, hi));
  }

  void accumulate(int64_t rows, const float* pr, int64_t ldp, int64_t lo, int64_t hi, int64_t fewest, float* o,
                  int64_t ldo, bool fresh) const {
    if (float_p) {
      Base::accumulate(rows, pr, ldp, lo, hi, fewest, o, ldo, fresh);
      return;
    }
    const int64_t ld = run_stride(true);
    for_runs(lo, hi, true, [&](int64_t at, int64_t n, const c10::BFloat16*, const c10::BFloat16* v_run) {
      tiles_bf16::rows::pv(pr + at, ldp, rows, v_run, ld, n, Dv, o, ldo, pp.get(), ahead_of(v_ahead, at, at + n));
    });
  }
};
#endif

#ifdef FLASHATTN_CPU_AMX
// The row path's operands with the products on AMX (tiles_amx::rows), for bf16 calls that
// no backward follows (flash_fwd below): the same blocks, runs and prefetches.
struct AmxRowOperands : RowOperands<c10::BFloat16> {
  using Base = RowOperands<c10::BFloat16>;
  static constexpr bool ACROSS_HEADS = false;  // (its own products, head by head)
  // (Its products take no rows ahead: run_fwd's burst.)
  int64_t spread_next_block(const FlashParams&, int64_t, const KeyRows<c10::BFloat16>&, int64_t, int64_t) { return 0; }
  // The products' buffers, one set for every head of a workspace (a head's chunk is done
  // before the next one's starts), so that they stay in L1 (a set per head was 5% slower:
  // benchmarks/RESULTS.md).
  struct Buffers {
    Scratch<uint32_t> vp, pp;     // a chunk's V pairs; its P pairs
    Scratch<c10::BFloat16> kbuf;  // 16-key chunks copied (across pages, or under 16 keys)
  };
  tiles_amx::Use tile_use;
  Scratch<uint32_t> qt;  // Q^T
  int64_t m = 0;         // the task's rows
  std::shared_ptr<Buffers> buffers;

  AmxRowOperands(const FlashParams& p, int64_t bq, int64_t bk, bool several_q_blocks)
      : Base(p, bq, bk, several_q_blocks),
        qt(scratch<uint32_t>(p.head_dim / 2 * tiles_amx::TM)) {
    keep_key_rows(bk);
    // The workspace's slots are made one after another on its thread: the first makes the
    // buffers, the others share them (they go when the workspace does).
    static thread_local std::weak_ptr<Buffers> shared;
    buffers = shared.lock();
    if (!buffers) {
      buffers = std::make_shared<Buffers>(Buffers{scratch<uint32_t>(p.head_dim_v * tiles_amx::TM),
                                                  scratch<uint32_t>(tiles_amx::TM * tiles_amx::TM),
                                                  scratch<c10::BFloat16>(tiles_amx::rows::KEYS * p.head_dim)});
      shared = buffers;
    }
  }
  void load_q(const FlashParams& p, const c10::BFloat16* q_rows, int64_t rows) {
    m = rows;
    tiles_amx::rows::pack_qt(q_rows, p.q_row_stride, rows, D, qt.get());
  }

  // (One panel of all the task's rows: BLOCK_Q = PANEL_Q = EDGE_PANEL_Q.)
  void scores(int64_t, int64_t, int64_t lo, int64_t hi, float* s, int64_t lds) const {
    tiles_amx::rows::scores(qt.get(), m, key_rows(lo, hi, false), hi - lo, D, scale, s + lo, lds, buffers->kbuf.get());
  }

  void accumulate(int64_t, const float* pr, int64_t ldp, int64_t lo, int64_t hi, int64_t /*fewest*/, float* o,
                  int64_t ldo, bool /*fresh*/) const {
    tiles_amx::rows::pv(pr + lo, ldp, m, key_rows(lo, hi, true), hi - lo, Dv, o, ldo, buffers->vp.get(),
                        buffers->pp.get());
  }
};
#endif

// Sized to the problem's blocks (bq <= BLOCK_Q rows, bk <= BLOCK_K keys of KV), for
// `heads` heads per task (slot j: operands kv[j], its rows of o, m, l from j * bq): small
// calls (decoding) then neither map nor fault in the full-size buffers.
template <typename T, typename acc, typename KV>
struct FwdWorkspace {
  std::vector<std::unique_ptr<KV>> kv;
  std::vector<KeyRows<T>> keys;  // slot j's head
  std::vector<float> slope;      // slot j's ALiBi slope
  PagedHead<T> paged;
  const int64_t lds;  // score row stride: bk rounded up to whole 16-key panels
  // (Operands with across-heads steps: scores of every head, bq rows each from s, and
  // their P V sums, zero between blocks.)
  Scratch<acc> s, o, m, l, sums;
  std::unique_ptr<bool[]> keep;  // dropout decisions of one row
  FwdWorkspace(const FlashParams& p, int64_t bq, int64_t bk, int64_t num_q_blocks, int64_t heads)
      : keys(heads, KeyRows<T>{nullptr, nullptr, 0, 0, 0}),
        slope(heads, 0.f),
        paged(p, !KV::pages_in_place),
        lds((bk + 15) / 16 * 16),
        s(scratch<acc>((KV::ACROSS_HEADS ? heads : 1) * bq * lds)),
        m(scratch<acc>(heads * bq)),
        l(scratch<acc>(heads * bq)),
        keep(new bool[bk]) {
    for (int64_t j = 0; j < heads; ++j) kv.push_back(std::make_unique<KV>(p, bq, bk, num_q_blocks > 1));
    o = scratch<acc>(heads * bq * kv[0]->o_stride());
    if constexpr (KV::ACROSS_HEADS) {
      sums = scratch<acc>(heads * bq * kv[0]->o_stride());
      std::fill(sums.get(), sums.get() + heads * bq * kv[0]->o_stride(), acc(0));
    }
  }
};

// Prefetches keys [lo, hi)'s K and V rows (d, dv elements; paged: page run by page run)
// into L2 / L3 (not L1: the task reads other rows until it gets to these), a line of
// each in turn.
template <typename T>
__attribute__((always_inline)) inline void prefetch_rows(const KeyRows<T>& kv, int64_t lo, int64_t hi, int64_t d,
                                                         int64_t dv) {
  const int64_t k_bytes = d * static_cast<int64_t>(sizeof(T)), v_bytes = dv * static_cast<int64_t>(sizeof(T));
  for_key_rows(kv, lo, hi, [&](int64_t, const T* k_row, const T* v_row) {
    const char* k = reinterpret_cast<const char*>(k_row);
    const char* v = reinterpret_cast<const char*>(v_row);
    int64_t b = 0;
    for (; b < std::min(k_bytes, v_bytes); b += 64) {
      __builtin_prefetch(k + b, 0, 1);
      __builtin_prefetch(v + b, 0, 1);
    }
    for (int64_t e = b; e < k_bytes; e += 64) __builtin_prefetch(k + e, 0, 1);
    for (int64_t e = b; e < v_bytes; e += 64) __builtin_prefetch(v + e, 0, 1);
  });
}

// Operands' COLUMN_BLOCKS (DotRowOperands: column_block), false where they have none.
template <typename KV, typename = void>
struct ColumnBlocks : std::false_type {};
template <typename KV>
struct ColumnBlocks<KV, std::void_t<decltype(KV::COLUMN_BLOCKS)>> : std::bool_constant<KV::COLUMN_BLOCKS> {};

// Operands' EXACT_P_KEYS (Bf16PairOperands), 0 where they have none.
template <typename KV, typename = void>
struct ExactPKeys {
  static constexpr int64_t value = 0;
};
template <typename KV>
struct ExactPKeys<KV, std::void_t<decltype(KV::EXACT_P_KEYS)>> {
  static constexpr int64_t value = KV::EXACT_P_KEYS;
};

// The cache lines of a task's inputs, prefetched in memory order, all at once (`all`) or
// a few at a time (`some`, resuming where the last call stopped): up to three sets of
// rows, each rows [0, n) (row stride ld) of `heads` heads (head stride hs) from `first`,
// d elements each, a row's heads in turn (in (S, H, D) tensors: memory order), every line
// they touch once (heads side by side, hs == d: one span per row).
class InputLines {
 public:
  template <typename T>
  void add(const T* first, int64_t n, int64_t ld, int64_t heads, int64_t hs, int64_t d) {
    const bool side_by_side = hs == d;
    const int64_t e = static_cast<int64_t>(sizeof(T));
    sets_[count_++] = {reinterpret_cast<const char*>(first), n, ld * e, side_by_side ? 1 : heads, hs * e,
                       (side_by_side ? heads : 1) * d * e};
    lines_ += n * (side_by_side ? 1 : heads) * ((side_by_side ? heads : 1) * d * e / 64 + 1);
  }
  int64_t lines() const { return lines_; }  // (about: a span's first line may not start it)

  // into_l1: prefetcht0 (lines read next); else prefetcht2 (lines read a while later:
  // not into L1, where they would evict the lines read until then).
  void some(int64_t n, bool into_l1) {
    for (; n > 0; --n) {
      if (line_ >= end_ && !next_span()) return;
      if (into_l1) {
        __builtin_prefetch(reinterpret_cast<const void*>(line_), 0, 3);
      } else {
        __builtin_prefetch(reinterpret_cast<const void*>(line_), 0, 1);
      }
      line_ += 64;
    }
  }
  void all(bool into_l1) { some(std::numeric_limits<int64_t>::max(), into_l1); }

 private:
  struct Rows {
    const char* first;
    int64_t n, ld, spans, hs, bytes;  // strides and span in bytes; spans per row
  };
  Rows sets_[3];
  int count_ = 0, set_ = 0;
  int64_t lines_ = 0, row_ = 0, span_ = 0;
  uintptr_t line_ = 0, end_ = 0;  // the current span's next line, and its end

  bool next_span() {
    for (; set_ < count_; ++set_, row_ = 0) {
      const Rows& r = sets_[set_];
      if (row_ < r.n) {
        const uintptr_t start = reinterpret_cast<uintptr_t>(r.first + row_ * r.ld + span_ * r.hs);
        line_ = start / 64 * 64, end_ = start + r.bytes;
        if (++span_ == r.spans) span_ = 0, ++row_;
        return true;
      }
    }
    return false;
  }
};

template <typename T, typename KV>
void run_fwd(const FlashParams& p) {
  using acc = acc_t<T>;
  const int64_t Dv = p.head_dim_v;
  const int64_t H = p.num_heads, group = p.num_heads / p.num_heads_k;
  const int64_t num_q_blocks = (p.seqlen_q + KV::BLOCK_Q - 1) / KV::BLOCK_Q;
  // Decoding on the row path (one query block per head): all heads of a sequence in one
  // task, which goes over the keys HEADS_BLOCK_K at a time, every head's rows of them in
  // turn. A (B, S, Hk, D) cache or a page holds a key's rows of all heads side by side, so
  // the task reads K and V front to back; one head per task reads a few lines out of every
  // Hk * D elements, where the hardware prefetchers do not follow (benchmarks/RESULTS.md).
  // (Keys that fit one ordinary block have nothing to read front to back: one head per
  // task there, so that the heads still spread over the threads.)
  static_assert(KV::HEADS_BLOCK_K == 0 || KV::pages_in_place);  // (ws.paged gathers one head)
  const bool heads_together = KV::HEADS_BLOCK_K > 0 && num_q_blocks == 1 && H > 1 && p.seqlen_k > KV::BLOCK_K;
  // (At least 1 each: an empty query or key sequence has no blocks, and no division by 0.)
  const int64_t block_q = std::max<int64_t>(1, std::min(KV::BLOCK_Q, p.seqlen_q));
  const int64_t block_k = std::max<int64_t>(1, std::min(heads_together ? KV::HEADS_BLOCK_K : KV::BLOCK_K, p.seqlen_k));
  // Many short sequences on the tiles (one query and one key block each, packed documents):
  // a task does pack_heads query heads of a sequence (a divisor of H and a multiple of
  // the GQA group, whose packed Q, K, V and O take about PACK_HEADS_BYTES), packing their
  // panels a row group or key panel at a time, head after head (load_q_part,
  // load_kv_part), and storing their output rows side by side: in (S, H, D) tensors it
  // reads and writes the rows front to back, where one head per task reads D elements out
  // of every H * D (a new page every few rows, which the hardware prefetchers do not
  // follow). Measured: benchmarks/RESULTS.md. Only with enough tasks for the threads (8
  // each, counting sequences with queries) and none too large for them to share (a task
  // at most a quarter of a thread's part of the work, by rows x keys); not paged (ws.paged
  // gathers one head). (One key block: no key splits, splits == 1.)
  const int64_t pack_heads = [&]() -> int64_t {
    if constexpr (!KV::PACKS_HEADS) {
      return 1;
    } else {
      if (heads_together || num_q_blocks != 1 || p.seqlen_k > KV::BLOCK_K || p.block_table || H == 1) return 1;
      int64_t sequences = 0, work = 0, largest = 0;  // sequences with queries; rows x keys
      for (int64_t b = 0; b < p.batch; ++b) {
        const SeqView sv = seq_view(p, b);
        if (sv.seqlen_q == 0) continue;
        const int64_t w = sv.seqlen_q * std::max<int64_t>(1, sv.seqlen_k);
        ++sequences, work += w, largest = std::max(largest, w);
      }
      auto up = [](int64_t x, int64_t m) { return (x + m - 1) / m * m; };  // (the panels' roundings)
      const int64_t slot_bytes = static_cast<int64_t>(sizeof(float)) * (up(block_q, 16) + up(block_k, 64)) *
                                 (p.head_dim + up(Dv, 16));
      const int64_t threads = torch::stable::get_num_threads();
      for (int64_t n = H; n > 1; --n) {
        if (H % n == 0 && n % group == 0 && n * slot_bytes <= PACK_HEADS_BYTES &&
            sequences * (H / n) >= 8 * threads && 4 * threads * n * largest <= work * H) {
          return n;
        }
      }
      return 1;
    }
  }();
  const int64_t heads_per_task = heads_together ? H : pack_heads;
  const int64_t task_rows = heads_per_task * block_q;  // slot j's rows from j * block_q
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);
  acc* lse = static_cast<acc*>(p.lse);
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  using Workspace = FwdWorkspace<T, acc, KV>;

  // Tasks are (sequence, heads, query block). With fewer than two per thread (decoding one
  // sequence, few heads, many cores) each one's key blocks are also dealt round-robin into
  // `splits` tasks (as flash-decoding does): each keeps its unnormalised O, row max and
  // row sum, and the parts are merged in split order at the end (the result does not
  // depend on which thread ran what). Part memory: under 4 x threads query blocks' O, of
  // every head of a sequence where a task does them all (e.g. 16 MiB at 128 threads, 64
  // query heads of one query, Dv 128).
  // Packed sequences each have their own number of query blocks: one table of all their
  // tasks (the CPU reads cu_seqlens directly), first_task[b] the first of sequence b.
  const int64_t head_groups = H / heads_per_task;
  std::vector<int64_t> first_task;
  if (p.cu_seqlens_q) {
    first_task.assign(p.batch + 1, 0);
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t blocks = (seq_view(p, b).seqlen_q + KV::BLOCK_Q - 1) / KV::BLOCK_Q;
      first_task[b + 1] = first_task[b] + head_groups * blocks;
    }
  }
  const int64_t row_tasks = p.cu_seqlens_q ? first_task[p.batch] : p.batch * head_groups * num_q_blocks;
  // Row task -> (sequence, first head, query block); within a head, the last query blocks
  // see the most keys under causal masks: they come first.
  struct RowTask {
    int64_t b, h0, q_block;
  };
  auto row_task_at = [&](int64_t t) -> RowTask {
    if (first_task.empty()) {
      const int64_t bh = t / num_q_blocks;
      return {bh / head_groups, bh % head_groups * heads_per_task, num_q_blocks - 1 - t % num_q_blocks};
    }
    // (the last sequence starting at or before t: empty sequences own no tasks)
    const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), t) - first_task.begin() - 1;
    const int64_t blocks = (first_task[b + 1] - first_task[b]) / head_groups, rest = t - first_task[b];
    return {b, rest / blocks * heads_per_task, blocks - 1 - rest % blocks};
  };
  const int64_t num_k_blocks = (p.seqlen_k + block_k - 1) / block_k;
  // (flash_cpu.h PARALLEL_MIN_WORK's estimate, at most: every row against the longest key
  // sequence, or a cache's capacity; a double, which cannot overflow)
  const double call_work = static_cast<double>(p.cu_seqlens_q ? p.total_q : p.batch * p.seqlen_q) * H *
                          static_cast<double>(std::max<int64_t>(1, p.seqlen_k)) * (p.head_dim + Dv + SCORE_WORK) +
                      static_cast<double>(row_tasks) * TASK_WORK;
  const int64_t splits = p.num_splits > 0 ? std::max<int64_t>(1, std::min(p.num_splits, num_k_blocks))
                                          : key_splits(row_tasks, num_k_blocks);
  const int64_t part_rows = splits > 1 ? row_tasks * splits * task_rows : 0;
  Scratch<acc> part_o = scratch<acc>(part_rows * Dv), part_m = scratch<acc>(part_rows),
               part_l = scratch<acc>(part_rows);

  // Query row i of head h of sequence b (view sv) done: out = O / l, lse = m + log l; a
  // row that saw no key gets out 0, lse -inf (never 0/0; its O may hold 0 times an
  // infinite V of a key its panel's other rows see: written as zeros, not O * 0).
  // (Outputs larger than the caches: streamed, store_row_maybe_streaming.)
  const int64_t out_rows = p.cu_seqlens_q ? p.total_q : p.batch * p.seqlen_q;
  const bool stream_out = streamed<T>(out_rows * H * Dv);
  auto store_out = [&](const acc* o_row, acc m_row, acc l_row, int64_t b, int64_t h, const SeqView& sv, int64_t i) {
    const bool empty = l_row == acc(0);
    T* dst = out + b * p.o_batch_stride + h * p.o_head_stride + (sv.q_start + i) * p.o_row_stride;
    if (empty) {
      std::fill(dst, dst + Dv, T(0));
    } else {
      store_row_maybe_streaming<T, acc>(stream_out, o_row, Dv, acc(1) / l_row, dst);
    }
    lse[lse_index(p, sv, h, i)] = empty ? neg_inf : m_row + std::log(l_row);
  };

  // Row task t: its sequence (view sv, band w), query rows [row0, row0 + rows) of its
  // heads from h0, the keys they see, and its first key block's keys [first_col,
  // first_col + first_cols) (key blocks start on a multiple of 16 keys, where the tiles'
  // key panels start: keys before keys.lo are then clipped like any other invisible ones).
  struct TaskRows {
    RowTask at;
    SeqView sv;
    Band w;
    int64_t row0, rows;
    KeyRange keys;
    int64_t first_col, first_cols;
  };
  auto task_rows_of = [&](int64_t row_task) {
    TaskRows t;
    t.at = row_task_at(row_task);
    t.sv = seq_view(p, t.at.b);
    t.w = band(p, t.sv);
    t.row0 = t.at.q_block * KV::BLOCK_Q, t.rows = std::min(block_q, t.sv.seqlen_q - t.row0);
    t.keys = visible_keys(t.w, t.row0, t.row0 + t.rows);
    t.first_col = t.keys.lo / 16 * 16;
    t.first_cols = std::max<int64_t>(0, std::min(block_k, t.keys.hi - t.first_col));
    return t;
  };

  // A packed-heads task's inputs (pack_heads): the Q rows and the one key block's K and V
  // rows of its heads. (Never paged, pack_heads, so key_rows does not gather into ws.paged:
  // prefetching another task's inputs leaves this task's keys as they are.)
  auto task_inputs = [&](const TaskRows& t, Workspace& ws) {
    InputLines lines;
    lines.add(q + t.sv.q_offset + t.at.h0 * p.q_head_stride + t.row0 * p.q_row_stride, t.rows, p.q_row_stride,
              heads_per_task, p.q_head_stride, p.head_dim);
    if (t.first_cols > 0) {
      const KeyRows<T> kv = key_rows(p, t.sv, t.at.b, t.at.h0 / group, ws.paged);
      const int64_t kv_heads = heads_per_task / group;
      lines.add(kv.k_row(t.first_col), t.first_cols, p.k_row_stride, kv_heads, p.k_head_stride, p.head_dim);
      lines.add(kv.v_row(t.first_col), t.first_cols, p.v_row_stride, kv_heads, p.v_head_stride, Dv);
    }
    return lines;
  };

  auto body = [&](int64_t task, int64_t next_task, Workspace& ws) {
    const int64_t row_task = task / splits, split = task % splits;
    const TaskRows task_at = task_rows_of(row_task);  // (plain names: the lambdas below capture them)
    const int64_t b = task_at.at.b, h0 = task_at.at.h0;
    const SeqView sv = task_at.sv;
    const Band w = task_at.w;
    const int64_t row0 = task_at.row0, rows = task_at.rows;
    const KeyRange keys = task_at.keys;
    const int64_t lds = ws.lds, ldo = ws.kv[0]->o_stride();
    acc* s = ws.s.get();

    // A split takes every splits-th key block, or, doing every head (whose blocks are small
    // and cost the same), a run of neighbouring blocks, which it then reads front to back.
    const int64_t first_col = task_at.first_col;
    const int64_t seq_blocks = keys.hi > first_col ? (keys.hi - first_col + block_k - 1) / block_k : 0;
    // Over one key block (short sequences, packed documents) a row's O gets one P V, from
    // the one panel the row is in: where the operands can store that product instead of
    // adding it, O is not zeroed first (a row whose panel is skipped has l = 0: written as
    // zeros, its O not read).
    const bool fresh = KV::OVERWRITES && splits == 1 && seq_blocks <= 1;

    auto q_rows = [&](int64_t h) { return q + sv.q_offset + h * p.q_head_stride + row0 * p.q_row_stride; };
    for (int64_t j = 0; j < heads_per_task; ++j) {
      const int64_t h = h0 + j, hk = h / group;
      if (pack_heads == 1) ws.kv[j]->load_q(p, q_rows(h), rows);
      if (!fresh) std::fill(ws.o.get() + j * block_q * ldo, ws.o.get() + (j * block_q + rows) * ldo, acc(0));
      std::fill(ws.m.get() + j * block_q, ws.m.get() + j * block_q + rows, neg_inf);
      std::fill(ws.l.get() + j * block_q, ws.l.get() + j * block_q + rows, acc(0));
      ws.slope[j] = alibi_slope(p, b, h);
      // Paged K/V: operands that read rows in place take them page by page; the others read
      // the head gathered into contiguous rows.
      ws.keys[j] = KV::pages_in_place && p.block_table ? paged_keys<T>(p, sv, b, hk) : key_rows(p, sv, b, hk, ws.paged);
    }

    const int64_t run_blocks = (seq_blocks + splits - 1) / splits;
    const int64_t block_step = heads_together ? 1 : splits;
    int64_t block_index = heads_together ? split * run_blocks : split;
    const int64_t block_end = heads_together ? std::min(seq_blocks, block_index + run_blocks) : seq_blocks;
    InputLines ahead;
    int64_t ahead_per_row = 0;
    if constexpr (KV::PACKS_HEADS) {
      if (pack_heads > 1) {  // Q and the one key block's K and V of every head
        const int64_t cols = task_at.first_cols;
        // All of them prefetched first, in memory order, in one burst: the reads then wait
        // on their lines together, not one by one in the packers (whose own prefetches
        // reach a few rows ahead in one head's panel).
        task_inputs(task_at, ws).all(true);
        for (int64_t r0 = 0; r0 < rows; r0 += KV::Q_PART) {
          for (int64_t j = 0; j < heads_per_task; ++j) {
            ws.kv[j]->load_q_part(p, q_rows(h0 + j), r0, std::min(KV::Q_PART, rows - r0));
          }
        }
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
          for (int64_t j = 0; j < heads_per_task; j += group) {
            ws.kv[j]->load_kv_part(p, ws.keys[j], first_col, c0, std::min<int64_t>(16, cols - c0));
          }
        }
        for (int64_t j = 0; j < heads_per_task; ++j) ws.kv[j]->use_kv(*ws.kv[j - j % group]);
        // The thread's next task's inputs then prefetched (into L2) while this one works,
        // a few lines after each panel, all of them by about half of its rows: without,
        // every task waited on its inputs in its burst (a quarter to a third of packed
        // short documents' time, the cores fetching lines no faster there than the
        // products take them afterwards); into L1 they would evict this task's panels
        // (measured: benchmarks/RESULTS.md).
        if (next_task >= 0) {
          ahead = task_inputs(task_rows_of(next_task / splits), ws);
          ahead_per_row = (2 * ahead.lines() + heads_per_task * rows - 1) / (heads_per_task * rows);
        }
      }
    }
    // The online softmax of rows [r0, r1) of slot j (head h0 + j) over their scores srows
    // (row r at srows + r * lds) of the block's keys [col0 + lo, col0 + lo + n): the row max
    // and sum updated, O rescaled, the scores turned into P (transform: softcap, ALiBi or
    // bias applied first; logits: every row sees all n keys).
    // With count_to > 0 it returns the fewest keys a row keeps (probabilities over 2^-16 of
    // the row's largest, which float biases of -20 or so leave nonzero; counted up to past
    // count_to, 16 at a time; rows that keep none do not count), else n.
    auto softmax_rows = [&](int64_t j, int64_t r0, int64_t r1, acc* srows, int64_t col0, int64_t lo, int64_t n,
                            bool transform, bool logits, int64_t count_to) {
      int64_t fewest_kept = n;
      const int64_t h = h0 + j;
      acc* o = ws.o.get() + j * block_q * ldo;
      acc* m = ws.m.get() + j * block_q;
      acc* l = ws.l.get() + j * block_q;
      const float slope = ws.slope[j];
      for (int64_t r = r0; r < r1; ++r) {
        acc* srow = srows + r * lds + lo;
        int64_t row_n = n;  // the row's scores [0, row_n) of the panel's n; the rest are 0
        if (transform) {
          transform_scores<T, acc>(p, w, srow, n, row0 + r, col0 + lo, slope, bias_row<T>(p, b, h, row0 + r), nullptr);
        } else if (!logits) {
          row_n = mask_band_start(w, srow, n, row0 + r, col0 + lo);
        }
        // Not std::max, which would drop a NaN row maximum: NaN in, NaN out.
        const acc row_m = row_max(srow, row_n), m_new = row_m < m[r] ? m[r] : row_m;
        if (m_new == neg_inf) {  // nothing visible to this row yet: contributes nothing,
          // unless row_max dropped a NaN (a NaN query row): then the row's output is NaN.
          if (std::any_of(srow, srow + row_n, [](acc x) { return std::isnan(x); })) {
            m[r] = l[r] = std::numeric_limits<acc>::quiet_NaN();
          }
          std::fill(srow, srow + n, acc(0));
          continue;
        }
        // (The row's first visible keys: its O is still 0 (or NaN, 0 times an infinite V),
        // nothing to rescale.)
        const acc rescale = m_new == m[r] || m[r] == neg_inf ? acc(1) : std::exp(m[r] - m_new);
        const acc sum = exp_shift_sum(srow, row_n, m_new);
        std::fill(srow + row_n, srow + n, acc(0));
        // The softmax is normalised before dropout: l sums the undropped probabilities.
        if (p.dropout_p > 0.f) {
          apply_dropout(p, srow, n, lse_index(p, sv, h, row0 + r), col0 + lo, ws.keep.get());
        }
        if (count_to > 0) {
          int64_t kept = 0;
          for (int64_t c0 = 0; c0 < row_n && kept <= count_to; c0 += 16) {
            for (int64_t c = c0; c < std::min(row_n, c0 + 16); ++c) kept += srow[c] > acc(0x1p-16);
          }
          if (kept > 0) fewest_kept = std::min(fewest_kept, kept);
        }
        if (rescale != acc(1)) scale_row(o + r * ldo, Dv, rescale);
        l[r] = l[r] * rescale + sum;
        m[r] = m_new;
      }
      return fewest_kept;
    };
    // The bf16 pair tiles' exact P V goes by the fewest keys a row of a panel keeps
    // (Bf16PairOperands::accumulate): a bias (a bool mask, -inf or large negative values)
    // or dropout removes keys inside the band, so there the softmax counts them.
    const int64_t count_kept = p.bias || p.dropout_p > 0.f ? ExactPKeys<KV>::value : 0;

    // Decoding across heads: the next block's K and V rows of slot j's KV head (dense or
    // paged; once, at the first of its query heads; 16-bit rows with heads side by side:
    // its share of every head's rows, spread_next_block) prefetched (into L2 / L3) while the
    // head works on this block: by its products, a few rows at a time, where they take them
    // (spread_next_block: AVX-512, and 16-bit rows on AVX2), else, 16-bit rows, in one burst
    // now (float rows on AVX2: none, RowOperands::SPREADS_AHEAD). Without, the rows
    // arrive late; a burst stalls the products behind it while it waits for miss buffers.
    // Measured from memory on Zen 4 (AVX-512): bf16 burst 8-12% faster than none, spread
    // 7-33% faster than the burst; float rows 7-17% slower with the burst, 10-19% faster
    // spread (one query; on Zen 3's AVX2 build spread float rows were slower:
    // benchmarks/RESULTS.md). Not spread from a block the band clips at its start (a
    // window's first): its products start past its first keys, and would leave the next
    // block's first rows out (ahead_of). Returns how many were left to the products.
    auto prefetch_next_block = [&](int64_t j, int64_t col0, int64_t block_index) -> int64_t {
      if constexpr (KV::HEADS_BLOCK_K > 0) {
        if (!heads_together) return 0;
        const int64_t next0 = col0 + block_k;
        const int64_t next_n =
            block_index + 1 < block_end && (h0 + j) % group == 0 ? std::min(next0 + block_k, keys.hi) - next0 : 0;
        const int64_t spread = ws.kv[j]->spread_next_block(p, (h0 + j) / group, ws.keys[j], next0, col0 < keys.lo ? 0 : next_n);
        if (spread == 0 && sizeof(T) == 2) prefetch_rows(ws.keys[j], next0, next0 + next_n, p.head_dim, p.head_dim_v);
        return spread;
      } else {
        return 0;
      }
    };

    for (; block_index < block_end; block_index += block_step) {
      const int64_t col0 = first_col + block_index * block_k, cols = std::min(block_k, keys.hi - col0);
      // Decoding across heads: a (B, S, Hk, D) cache or a page holds a key's rows of all heads
      // side by side, so a block taken head by head reads a few lines of each of its keys'
      // rows per pass, in an order the hardware prefetchers follow poorly (without any
      // products, one thread reads K and V that way at about half the rate of one pass in
      // memory order: benchmarks/RESULTS.md). Operands that can (KV::ACROSS_HEADS) go
      // ACROSS_KEYS keys of every head at a time instead, scores then P V into running sums
      // (added to O at the block's end), each head's softmax between: bitwise the
      // head-by-head results (paged: a block's page runs summed together, not run by run).
      // For blocks every row sees whole, without softcap, ALiBi, bias or dropout (their
      // transforms are per head); the others head by head. Paged, these steps take no
      // software prefetches (for_runs): 8 rows ahead for each step of each head cost more
      // load slots than the page jumps lose (benchmarks/RESULTS.md 'Paged decoding at the
      // contiguous rate').
      if constexpr (KV::ACROSS_HEADS) {
        if (heads_together && p.softcap == 0.f && !p.alibi_slopes && !p.bias && p.dropout_p == 0.f &&
            all_rows_see(w, row0, rows, col0, cols)) {
          for (int64_t j = 0; j < heads_per_task; ++j) {
            ws.kv[j]->load_kv(p, b * p.num_heads_k + (h0 + j) / group, ws.keys[j], col0, cols);
            ws.kv[j]->set_next_block(block_index + block_step < block_end ? col0 + block_step * block_k : -1, false);
            prefetch_next_block(j, col0, block_index);
          }
          for (int64_t c = 0; c < cols; c += KV::ACROSS_KEYS) {
            for (int64_t j = 0; j < heads_per_task; ++j) {
              ws.kv[j]->scores(0, rows, c, std::min(cols, c + KV::ACROSS_KEYS), s + j * block_q * lds, lds);
            }
          }
          for (int64_t j = 0; j < heads_per_task; ++j) {
            softmax_rows(j, 0, rows, s + j * block_q * lds, col0, 0, cols, false, true, 0);
          }
          for (int64_t c = 0; c < cols; c += KV::ACROSS_KEYS) {
            for (int64_t j = 0; j < heads_per_task; ++j) {
              ws.kv[j]->accumulate_sums(rows, s + j * block_q * lds, lds, c, std::min(cols, c + KV::ACROSS_KEYS),
                                        ws.sums.get() + j * block_q * ldo, ldo);
            }
          }
          for (int64_t j = 0; j < heads_per_task; ++j) {  // O + sums, the sums back to 0
            ws.kv[j]->add_sums(rows, ws.sums.get() + j * block_q * ldo, ldo, ws.o.get() + j * block_q * ldo, ldo);
          }
          continue;
        }
      }
      for (int64_t j = 0; j < heads_per_task; ++j) {
        const int64_t h = h0 + j;
        if (keys_all_masked(p, b, h, col0, cols)) continue;
        KV& kv = *ws.kv[j];
        const int64_t spread = prefetch_next_block(j, col0, block_index);
        acc* o = ws.o.get() + j * block_q * ldo;
        if (pack_heads == 1) kv.load_kv(p, b * p.num_heads_k + h / group, ws.keys[j], col0, cols);
        if constexpr (KV::pages_in_place) {
          // (Not where this block's products prefetch the next one's rows: for_runs would
          // fetch its first rows into L1 besides, which cost paged decoding 5-25 %.)
          kv.set_next_block(block_index + block_step < block_end && spread == 0 ? col0 + block_step * block_k : -1, true);
        }
        // In panels of PANEL_Q rows (EDGE_PANEL_Q where the panel's rows do not all see the
        // whole block), each over only the keys its rows can see (the masked corner of a
        // causal diagonal block outside them is not computed), or one panel of all rows.
        const bool in_panels = KV::always_panels || !all_rows_see(w, row0, rows, col0, cols);
        for (int64_t r0 = 0, r1 = 0; r0 < rows; r0 = r1) {
          r1 = in_panels ? std::min(rows, r0 + KV::PANEL_Q) : rows;
          if (in_panels && !all_rows_see(w, row0 + r0, r1 - r0, col0, cols)) r1 = std::min(rows, r0 + KV::EDGE_PANEL_Q);
          const KeyRange seen =
              in_panels ? clip(visible_keys(w, row0 + r0, row0 + r1), col0, cols) : KeyRange{0, cols};
          const int64_t lo = seen.lo, n = seen.hi - seen.lo;
          if (n == 0) continue;  // these rows see none of this block
          // Without softcap, ALiBi or bias the scores are the logits, masked only by the band
          // (the common case), and with every row seeing all n keys nothing is masked; else
          // a row's max and exp go up to its last visible key only (mask_band_start).
          const bool transform = scores_need_transform(p, ws.slope[j]);
          const bool logits = !transform && all_rows_see(w, row0 + r0, r1 - r0, col0 + lo, n);
          auto block_keys = [&](int64_t i) { return clip(visible_keys(w, row0 + i), col0, cols); };
          if constexpr (ColumnBlocks<KV>::value) {
            // The block in columns (operands that keep P in float under dropout have none):
            // the scores as they are, masked by the band unless every row sees all n keys
            // (each row's keys counted from lo).
            if (!transform && kv.columns(r1 - r0)) {
              alignas(64) int32_t key_lo[16] = {}, key_hi[16] = {};  // (columns(): at most 16 rows)
              if (!logits) {
                for (int64_t r = r0; r < r1; ++r) {
                  const KeyRange row_keys = block_keys(r);
                  key_lo[r - r0] = static_cast<int32_t>(row_keys.lo - lo);
                  key_hi[r - r0] = static_cast<int32_t>(row_keys.hi - lo);
                }
              }
              kv.column_block(r1 - r0, lo, seen.hi, logits ? nullptr : key_lo, key_hi, ws.m.get() + j * block_q + r0,
                              ws.l.get() + j * block_q + r0, o + r0 * ldo, ldo);
              continue;
            }
          }
          kv.scores(r0, r1 - r0, lo, seen.hi, s + r0 * lds, lds);
          // (The fewest keys of the block a row of the panel sees: a row's count grows, then
          // shrinks with the row (both bounds of visible_keys grow), fewest at an end row;
          // counted by the softmax only where the band leaves more than that.)
          auto seen_by = [&](int64_t i) {
            const KeyRange row_keys = block_keys(i);
            return row_keys.hi - row_keys.lo;
          };
          const int64_t band_fewest = std::min(seen_by(r0), seen_by(r1 - 1));
          const int64_t kept = softmax_rows(j, r0, r1, s, col0, lo, n, transform, logits,
                                            band_fewest > count_kept ? count_kept : 0);
          const int64_t fewest = std::min(band_fewest, kept);
          kv.accumulate(r1 - r0, s + r0 * lds, lds, lo, seen.hi, fewest, o + r0 * ldo, ldo, fresh);
          ahead.some(ahead_per_row * (r1 - r0), false);
        }
      }
    }
    ahead.all(false);

    if (splits > 1) {  // this split's part of each head, merged below
      for (int64_t j = 0; j < heads_per_task; ++j) {
        const acc* o = ws.o.get() + j * block_q * ldo;
        const acc* m = ws.m.get() + j * block_q;
        const acc* l = ws.l.get() + j * block_q;
        const int64_t part0 = (row_task * splits + split) * task_rows + j * block_q;
        for (int64_t r = 0; r < rows; ++r) std::copy(o + r * ldo, o + r * ldo + Dv, part_o.get() + (part0 + r) * Dv);
        std::copy(m, m + rows, part_m.get() + part0);
        std::copy(l, l + rows, part_l.get() + part0);
      }
    } else {  // (a row's heads side by side in out)
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < heads_per_task; ++j) {
          const int64_t at = j * block_q + r;
          store_out(ws.o.get() + at * ldo, ws.m[at], ws.l[at], b, h0 + j, sv, row0 + r);
        }
      }
    }
    if (stream_out) stream_fence();
  };

  for_each_task_ahead(
      row_tasks * splits, call_work, pack_heads > 1,
      [&] { return Workspace(p, block_q, block_k, num_q_blocks, heads_per_task); }, body);

  if (splits > 1) {  // out = sum_s O_s e^(m_s - m) / sum_s l_s e^(m_s - m), m = max_s m_s
    parallel_for(0, row_tasks * task_rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc> row(Dv);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t row_task = idx / task_rows, slot_row = idx % task_rows;
        const int64_t j = slot_row / block_q, r = slot_row % block_q;
        const auto [b, h0, q_block] = row_task_at(row_task);
        const SeqView sv = seq_view(p, b);
        const int64_t i = q_block * KV::BLOCK_Q + r;
        if (i >= sv.seqlen_q) continue;  // past the last block's rows
        const int64_t first = row_task * splits * task_rows + slot_row;  // part s: first + s * task_rows
        acc m = neg_inf;
        for (int64_t sp = 0; sp < splits; ++sp) {  // a NaN maximum (NaN query row) is kept
          const acc part = part_m[first + sp * task_rows];
          if (part > m || std::isnan(part)) m = std::isnan(m) ? m : part;
        }
        acc l = 0;
        std::fill(row.begin(), row.end(), acc(0));
        if (m != neg_inf) {
          for (int64_t sp = 0; sp < splits; ++sp) {
            const int64_t at = first + sp * task_rows;
            if (part_m[at] == neg_inf) continue;  // this split saw no key of the row
            const acc w = std::exp(part_m[at] - m);
            l += part_l[at] * w;
            for (int64_t d = 0; d < Dv; ++d) row[d] += part_o[at * Dv + d] * w;
          }
        }
        store_out(row.data(), m, l, b, h0 + j, sv, i);
      }
      if (stream_out) stream_fence();
    });
  }
}
}  // namespace

// Decoding with GQA (few queries per sequence, `group` query heads per KV head): the rows
// of a KV head's query heads as one query block, position by position (row i * group + g:
// query i of head hk * group + g; FlashParams::q_group), so each task reads its K/V once
// for all of them instead of once per head (the row path is bound by reading K/V). Only
// where every row of a position sees the same keys the same way: no ALiBi (a slope per
// head), bias or dropout; causal masks and windows are the positions' (flash_cpu.h Band).
// One query: the rows are q's heads in place (their stride is the head stride); more: q's
// rows are gathered in that order and out and lse scattered back (flash_fwd below).
inline bool gqa_packed_view(const FlashParams& p, FlashParams& view) {
  const int64_t group = p.num_heads_k > 0 ? p.num_heads / p.num_heads_k : 1;
  if (p.cu_seqlens_q || group == 1 || p.alibi_slopes || p.bias || p.dropout_p > 0.f) return false;
  view = p;
  view.num_heads = p.num_heads_k;
  view.seqlen_q = view.total_q = p.seqlen_q * group;
  view.q_group = group;
  if (p.seqlen_q == 1) {  // row r of head hk: query head hk * group + r
    view.q_row_stride = p.q_head_stride, view.q_head_stride = group * p.q_head_stride;
    view.o_row_stride = p.o_head_stride, view.o_head_stride = group * p.o_head_stride;
  }
  return true;
}

#ifdef FLASHATTN_CPU_AMX
// Rows of a bf16 call on AMX (AmxRowOperands) where no backward follows, the tiles are
// enabled and the head dims are whole 32-element tiles, from 4 query rows per task (e.g.
// a decoding step's 4 query heads per KV head, packed): there S^T and P V on AMX cost less
// than the row path's products (16 rows: B=8, 8K keys, 32/8 heads 35 -> 21 ms; 4 rows
// about even: benchmarks/RESULTS.md). Not where rows may keep only a few keys
// (rows_may_keep_few_keys: AMX rows round P), which go to the rows that keep P in float.
inline bool amx_rows(const FlashParams& p) {
  return forward_only(p) && tiles_amx::enabled() && p.head_dim % 32 == 0 && p.head_dim_v % 32 == 0 &&
         p.seqlen_q >= 4 && !rows_may_keep_few_keys(p);
}
#endif

#ifdef FLASHATTN_CPU_BF16_DOT
// Rows of a bf16 call on vdpbf16ps (DotRowOperands) where no backward follows, the AVX512-BF16
// products are chosen (switches.h: AMD's CPUs unless told) and the head dims are whole
// 32-element vectors.
inline bool dot_rows(const FlashParams& p) {
  return forward_only(p) && tiles_bf16::enabled() && p.head_dim % 32 == 0 && p.head_dim_v % 32 == 0;
}
#endif

template <typename T>
void run_path(const FlashParams& p) {
  [[maybe_unused]] const KernelPath path = kernel_path<T>(p);
#ifdef FLASHATTN_CPU_TILES
  if constexpr (tiles::has_load8<T>()) {  // float, bf16, fp16
#ifdef FLASHATTN_CPU_AMX
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (path.rows && amx_rows(p)) return run_fwd<T, AmxRowOperands>(p);
    }
#endif
#ifdef FLASHATTN_CPU_BF16_DOT
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (path.rows && dot_rows(p)) return run_fwd<T, DotRowOperands>(p);
    }
#endif
    if (path.rows) return run_fwd<T, RowOperands<T>>(p);
  }
  if constexpr (!std::is_same_v<T, double>) {
#ifdef FLASHATTN_CPU_BF16_DOT
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (path.products == Products::Bf16Dot) return run_fwd<T, Bf16DotOperands>(p);
#ifdef FLASHATTN_CPU_AMX
      if (path.products == Products::Amx) return run_fwd<T, AmxOperands>(p);
#endif
    }
#endif
    if (path.products == Products::Tiles) return run_fwd<T, TileOperands<T>>(p);
  }
#endif
  run_fwd<T, BlasOperands<T, acc_t<T>>>(p);
}

template <typename T>
void flash_fwd(const FlashParams& p) {
  // The packed view only where the call goes row by row and its rows make one of the row
  // path's query blocks: the row path's scores are per row, the very scores the backward
  // recomputes per head. (Out and lse are bitwise the unpacked call's unless the fewer
  // tasks split the keys differently, flash_cpu.h key_splits, or take other key blocks: one
  // KV head over 512 keys does not do every head in one task; or unless no backward follows
  // and the packed block's 9-16 rows take column scores (float; bf16 on the dot products or
  // in the AVX2 kernels),
  // or its bf16 rows go on AMX: then equal within rounding.)
  FlashParams view;
  const KernelPath path = kernel_path<T>(p);
  if (!path.rows || !gqa_packed_view(p, view) || view.seqlen_q > MAX_PACKED_ROWS) return run_path<T>(p);
  view.cpu_path = encode_path(path) | (forward_only(p) ? FORWARD_ONLY : 0);
  if (p.seqlen_q == 1) return run_path<T>(view);
  // Several queries: q's rows gathered per KV head, position by position, into (B, Hk,
  // Sq * group, D); out (B, Hk, Sq * group, Dv) and lse (B, Hk, Sq * group) written there,
  // then scattered back. (Few rows: Sq * H * D elements per sequence, next to its K/V.)
  using acc = acc_t<T>;
  const int64_t B = p.batch, Hk = p.num_heads_k, group = p.num_heads / Hk, Sq = p.seqlen_q;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, rows = Sq * group;
  Scratch<T> q_rows = scratch<T>(B * Hk * rows * D), o_rows = scratch<T>(B * Hk * rows * Dv);
  Scratch<acc> lse_rows = scratch<acc>(B * Hk * rows);
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);
  acc* lse = static_cast<acc*>(p.lse);
  // f(b, h, i, r): query i of head h of sequence b is row r of KV head h / group.
  auto for_rows = [&](const auto& f) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < p.num_heads; ++h) {
        for (int64_t i = 0; i < Sq; ++i) f(b, h, i, (b * Hk + h / group) * rows + i * group + h % group);
      }
    }
  };
  for_rows([&](int64_t b, int64_t h, int64_t i, int64_t r) {
    std::copy_n(q + b * p.q_batch_stride + h * p.q_head_stride + i * p.q_row_stride, D, q_rows.get() + r * D);
  });
  view.q = q_rows.get(), view.out = o_rows.get(), view.lse = lse_rows.get();
  view.q_batch_stride = Hk * rows * D, view.q_head_stride = rows * D, view.q_row_stride = D;
  view.o_batch_stride = Hk * rows * Dv, view.o_head_stride = rows * Dv, view.o_row_stride = Dv;
  run_path<T>(view);
  for_rows([&](int64_t b, int64_t h, int64_t i, int64_t r) {
    std::copy_n(o_rows.get() + r * Dv, Dv, out + b * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride);
    lse[lse_index(p, seq_view(p, b), h, i)] = lse_rows[r];
  });
}

template void flash_fwd<float>(const FlashParams&);
template void flash_fwd<double>(const FlashParams&);
template void flash_fwd<c10::BFloat16>(const FlashParams&);
template void flash_fwd<c10::Half>(const FlashParams&);

}  // namespace flashattn::cpu
