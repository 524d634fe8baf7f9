// Fused attention backward on the CPU: recomputes P from the forward's lse, block by
// block; no Sq x Sk buffer.
//
// Per query head: for each key block it loops over the query blocks that can see it
// (FlashAttention-2 order):
//   S = scale Q K^T -> logits (softcap, ALiBi, mask) -> P = exp(logits - lse)
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta) [* softcap'],
//   dK += scale dS^T Q,  dQ += scale dS K   (dQ for the whole head in an fp32 buffer).
// One task is one (batch, KV head): it does the query heads of the KV head's group in
// turn, each as above, and sums their dK/dV per key in head order (in acc, with GQA) before
// storing them; where that would leave the threads too few tasks, parts of a group (run_bwd).
// Every task owns its rows of dQ and its KV head's dK/dV (or a part's sums of them), so the
// result does not depend on thread timing (always deterministic), and GQA needs no
// per-query-head dK/dV buffer: a thread's sums hold its keys of one KV head.
//
// The five products run on the AVX2 tiles of tiles.h for float and 16-bit inputs on x86
// (Q and dO packed once per query head, K and V once per run of a group's heads on a
// thread), bf16 on the AMX tiles of tiles_amx.h or the AVX512-BF16 tiles of tiles_bf16.h
// as the forward (switches.h), else through BLAS (double, other CPUs, float calls with
// under 16 queries).
#include "flash_cpu.h"

#include "blas.h"
#include "tiles.h"
#include "tiles_amx.h"
#include "tiles_bf16.h"

#include <vector>

namespace flashattn::cpu {

namespace {
// A view of one head's rows as BLAS operands: in place for float/double, else widened.
template <typename T, typename acc>
inline const acc* operand(const T* src, int64_t row_stride, int64_t rows, int64_t cols, acc* widened,
                          int64_t& ld) {
  if constexpr (std::is_same_v<T, acc>) {
    ld = row_stride;
    return src;
  } else {
    load_rows(src, row_stride, rows, cols, widened, cols);
    ld = cols;
    return widened;
  }
}

// The products through BLAS on one head's Q, K, V, dO (in place for float and double,
// widened for 16-bit inputs). Row and key offsets are absolute within the head; score
// blocks have row stride lds; dK/dV/dQ rows have the strides dk_stride() etc.
template <typename T, typename acc>
struct BlasBwdOperands {
  // Two score-sized blocks (P and dP) live at once: 128 x 256 floats each. Pairs only
  // partly visible (causal diagonal, windows) are done in panels of PANEL_Q rows.
  static constexpr int64_t BLOCK_Q = 128, BLOCK_K = 256, PANEL_Q = 64, ROW_ALIGN = 1, KEY_ALIGN = 1;
  static constexpr bool widen = !std::is_same_v<T, acc>;
  Scratch<acc> qw, kw, vw, dow;
  const acc *q = nullptr, *k = nullptr, *v = nullptr, *dout = nullptr;
  int64_t ldq = 0, ldk = 0, ldv = 0, lddo = 0;
  const int64_t D, Dv;
  const acc scale;

  explicit BlasBwdOperands(const FlashParams& p)
      : qw(scratch<acc>(widen ? p.seqlen_q * p.head_dim : 0)),
        kw(scratch<acc>(widen ? p.seqlen_k * p.head_dim : 0)),
        vw(scratch<acc>(widen ? p.seqlen_k * p.head_dim_v : 0)),
        dow(scratch<acc>(widen ? p.seqlen_q * p.head_dim_v : 0)),
        D(p.head_dim),
        Dv(p.head_dim_v),
        scale(static_cast<acc>(p.scale64)) {}

  int64_t dk_stride() const { return D; }
  int64_t dv_stride() const { return Dv; }
  int64_t dq_stride() const { return D; }

  // (kv_loaded: K and V are those of the last load, another query head of their group)
  void load(const FlashBwdParams& p, const Band& w, const T* q_head, const T* k_head, const T* v_head, const T* do_head,
            bool kv_loaded) {
    q = operand<T, acc>(q_head, p.q_row_stride, w.seqlen_q, D, qw.get(), ldq);
    if (!kv_loaded) {
      k = operand<T, acc>(k_head, p.k_row_stride, w.seqlen_k, D, kw.get(), ldk);
      v = operand<T, acc>(v_head, p.v_row_stride, w.seqlen_k, Dv, vw.get(), ldv);
    }
    dout = operand<T, acc>(do_head, p.do_row_stride, w.seqlen_q, Dv, dow.get(), lddo);
  }
  // s = scale Q K^T
  void scores(int64_t row0, int64_t rows, int64_t key0, int64_t cols, acc* s, int64_t lds) const {
    gemm<acc>(Op::N, Op::T, rows, cols, D, scale, q + row0 * ldq, ldq, k + key0 * ldk, ldk, acc(0), s, lds);
  }
  // dp = dO V^T
  void dprobs(int64_t row0, int64_t rows, int64_t key0, int64_t cols, acc* dp, int64_t lds) const {
    gemm<acc>(Op::N, Op::T, rows, cols, Dv, acc(1), dout + row0 * lddo, lddo, v + key0 * ldv, ldv, acc(0), dp, lds);
  }
  // dv (rows of keys key0..) += P^T dO
  void add_dv(int64_t row0, int64_t rows, int64_t cols, const acc* pr, int64_t lds, acc* dv, int64_t) const {
    gemm<acc>(Op::T, Op::N, cols, Dv, rows, acc(1), pr, lds, dout + row0 * lddo, lddo, acc(1), dv, Dv);
  }
  // dk (rows of keys key0..) += scale dS^T Q
  void add_dk(int64_t row0, int64_t rows, int64_t cols, const acc* ds, int64_t lds, acc* dk, int64_t) const {
    gemm<acc>(Op::T, Op::N, cols, D, rows, scale, ds, lds, q + row0 * ldq, ldq, acc(1), dk, D);
  }
  // (dK and dV accumulate in place.)
  void finish_key_block(int64_t, acc*, int64_t, acc*, int64_t) {}
  // dq (rows row0..) += dS K (scaled when stored)
  void add_dq(int64_t rows, int64_t key0, int64_t cols, const acc* ds, int64_t lds, acc* dq) const {
    gemm<acc>(Op::N, Op::N, rows, D, cols, acc(1), ds, lds, k + key0 * ldk, ldk, acc(1), dq, D);
  }
};

#ifdef FLASHATTN_CPU_TILES
// The products on the AVX2 tiles, fp32 math. Per head, every operand is packed once in
// the layout its products read: Q (scaled) and dO as pack_q row groups, K and V as
// transposed key panels (pack_k), K, Q and dO as 16-column panels (pack_v). Row blocks
// start on whole row groups and key ranges on whole key panels.
template <typename T>
struct TileBwdOperands {
  // P and dP blocks of 240 x 128 floats (120 KiB each) stay in L2 together; faster than
  // 120 x 256 and 480 x 64 here (benchmarks/RESULTS.md 'What was tried').
  static constexpr int64_t BLOCK_Q = 240, BLOCK_K = 128, PANEL_Q = 60, ROW_ALIGN = tiles::MR, KEY_ALIGN = tiles::NR;
  static_assert(PANEL_Q % tiles::MR == 0 && BLOCK_Q % PANEL_Q == 0);
  const int64_t D, Dv, D16, Dv16, sq16, sk16;
  const float scale;
  Scratch<float> q_groups, do_groups, k_panels, v_panels, k_cols, q_cols, do_cols;

  explicit TileBwdOperands(const FlashParams& p)
      : D(p.head_dim),
        Dv(p.head_dim_v),
        D16(tiles::round_up(D, tiles::NR)),
        Dv16(tiles::round_up(Dv, tiles::NR)),
        sq16(tiles::round_up(p.seqlen_q, 48)),  // whole row groups (6) and panels (16)
        sk16(tiles::round_up(p.seqlen_k, tiles::NR)),
        scale(p.scale),
        q_groups(scratch<float>(sq16 * D)),
        do_groups(scratch<float>(sq16 * Dv)),
        k_panels(scratch<float>(sk16 * D)),
        v_panels(scratch<float>(sk16 * Dv)),
        k_cols(scratch<float>(sk16 * D16)),
        q_cols(scratch<float>(sq16 * D16)),
        do_cols(scratch<float>(sq16 * Dv16)) {}

  int64_t dk_stride() const { return D16; }
  int64_t dv_stride() const { return Dv16; }
  int64_t dq_stride() const { return D16; }

  void load(const FlashBwdParams& p, const Band& w, const T* q_head, const T* k_head, const T* v_head, const T* do_head,
            bool kv_loaded) {
    const int64_t Sq = w.seqlen_q, Sk = w.seqlen_k;
    tiles::pack_q(q_head, p.q_row_stride, Sq, D, scale, q_groups.get());
    tiles::pack_q(do_head, p.do_row_stride, Sq, Dv, 1.f, do_groups.get());
    if (!kv_loaded) {
      tiles::pack_k(k_head, p.k_row_stride, Sk, D, k_panels.get());
      tiles::pack_k(v_head, p.v_row_stride, Sk, Dv, v_panels.get());
      tiles::pack_v(k_head, p.k_row_stride, Sk, D, k_cols.get(), sk16 * tiles::NR);
    }
    tiles::pack_v(q_head, p.q_row_stride, Sq, D, q_cols.get(), sq16 * tiles::NR);
    tiles::pack_v(do_head, p.do_row_stride, Sq, Dv, do_cols.get(), sq16 * tiles::NR);
  }
  // Whole key panels: columns past `cols` (up to the next multiple of 16) are computed
  // too; score rows are wide enough and those columns are not read.
  void scores(int64_t row0, int64_t rows, int64_t key0, int64_t cols, float* s, int64_t lds) const {
    tiles::qk_block(rows, q_groups.get() + row0 * D, k_panels.get() + key0 * D, (cols + tiles::NR - 1) / tiles::NR, D, s, lds);
  }
  void dprobs(int64_t row0, int64_t rows, int64_t key0, int64_t cols, float* dp, int64_t lds) const {
    tiles::qk_block(rows, do_groups.get() + row0 * Dv, v_panels.get() + key0 * Dv, (cols + tiles::NR - 1) / tiles::NR, Dv, dp, lds);
  }
  void add_dv(int64_t row0, int64_t rows, int64_t cols, const float* pr, int64_t lds, float* dv, int64_t) const {
    tiles::kr_block<true>(cols, pr, 1, lds, do_cols.get() + row0 * tiles::NR, Dv16 / tiles::NR,
                          sq16 * tiles::NR, rows, 1.f, dv, Dv16);
  }
  void add_dk(int64_t row0, int64_t rows, int64_t cols, const float* ds, int64_t lds, float* dk, int64_t) const {
    tiles::kr_block<true>(cols, ds, 1, lds, q_cols.get() + row0 * tiles::NR, D16 / tiles::NR, sq16 * tiles::NR,
                          rows, scale, dk, D16);
  }
  // (dK and dV accumulate in place.)
  void finish_key_block(int64_t, float*, int64_t, float*, int64_t) {}
  void add_dq(int64_t rows, int64_t key0, int64_t cols, const float* ds, int64_t lds, float* dq) const {
    tiles::pv_block(rows, ds, lds, k_cols.get() + key0 * tiles::NR, sk16 * tiles::NR, cols, D16 / tiles::NR, dq,
                    D16);
  }
};
#endif

#ifdef FLASHATTN_CPU_BF16_DOT
// The five products of bf16 inputs on the AVX512-BF16 tiles (tiles_bf16.h): bf16 pairs
// multiplied and summed in float, P and dS rounded to bf16 for the products that take
// them (dV, dK, dQ), as flash-attn's GPU backward does. S is recomputed as the forward's
// Bf16DotOperands computed it (same pairs, order and scaling), so exp(S - lse) uses the
// very scores lse summed. Per head, every operand is packed once in pairs: Q and dO as
// row groups (pack_q), K and V as key panels (pack_k), K, Q and dO as column panels
// (pack_v). Row blocks start on whole row groups (even rows) and key ranges on whole
// key panels.
struct Bf16DotBwdOperands {
  using Fp32Tiles = TileBwdOperands<c10::BFloat16>;  // (the same blocks)
  static constexpr int64_t BLOCK_Q = Fp32Tiles::BLOCK_Q, BLOCK_K = Fp32Tiles::BLOCK_K, PANEL_Q = Fp32Tiles::PANEL_Q,
                           ROW_ALIGN = Fp32Tiles::ROW_ALIGN, KEY_ALIGN = tiles_bf16::NR;
  static constexpr int64_t LD_ROW_PAIRS = BLOCK_K, LD_KEY_PAIRS = BLOCK_K / 2;  // words per row
  static_assert(BLOCK_K % tiles_bf16::NR == 0 && PANEL_Q % tiles::MR == 0 && BLOCK_Q % PANEL_Q == 0);
  const int64_t d2, dv2, D16, Dv16, sq16, sk16;
  const float scale;
  Scratch<uint32_t> q_groups, do_groups, k_panels, v_panels, k_cols, q_cols, do_cols;
  Scratch<uint32_t> block_pairs;  // P^T or dS^T as pairs of rows, or dS as pairs of keys

  explicit Bf16DotBwdOperands(const FlashParams& p)
      : d2(tiles_bf16::pairs(p.head_dim)),
        dv2(tiles_bf16::pairs(p.head_dim_v)),
        D16(tiles::round_up(p.head_dim, tiles_bf16::NR)),
        Dv16(tiles::round_up(p.head_dim_v, tiles_bf16::NR)),
        sq16(tiles::round_up(p.seqlen_q, 48)),  // whole row groups (6) and panels (16)
        sk16(tiles::round_up(p.seqlen_k, tiles_bf16::NR)),
        scale(p.scale),
        q_groups(scratch<uint32_t>(sq16 * d2)),
        do_groups(scratch<uint32_t>(sq16 * dv2)),
        k_panels(scratch<uint32_t>(sk16 * d2)),
        v_panels(scratch<uint32_t>(sk16 * dv2)),
        k_cols(scratch<uint32_t>(sk16 / 2 * D16)),
        q_cols(scratch<uint32_t>(sq16 / 2 * D16)),
        do_cols(scratch<uint32_t>(sq16 / 2 * Dv16)),
        block_pairs(scratch<uint32_t>(std::max(BLOCK_Q / 2 * LD_ROW_PAIRS, BLOCK_Q * LD_KEY_PAIRS))) {}

  int64_t dk_stride() const { return D16; }
  int64_t dv_stride() const { return Dv16; }
  int64_t dq_stride() const { return D16; }

  void load(const FlashBwdParams& p, const Band& w, const c10::BFloat16* q_head, const c10::BFloat16* k_head,
            const c10::BFloat16* v_head, const c10::BFloat16* do_head, bool kv_loaded) {
    const int64_t Sq = w.seqlen_q, Sk = w.seqlen_k, D = p.head_dim, Dv = p.head_dim_v;
    tiles_bf16::pack_q(q_head, p.q_row_stride, Sq, D, q_groups.get());
    tiles_bf16::pack_q(do_head, p.do_row_stride, Sq, Dv, do_groups.get());
    if (!kv_loaded) {
      tiles_bf16::pack_k(k_head, p.k_row_stride, Sk, D, k_panels.get());
      tiles_bf16::pack_k(v_head, p.v_row_stride, Sk, Dv, v_panels.get());
      tiles_bf16::pack_v(k_head, p.k_row_stride, Sk, D, k_cols.get(), sk16 * tiles_bf16::NR / 2);
    }
    tiles_bf16::pack_v(q_head, p.q_row_stride, Sq, D, q_cols.get(), sq16 * tiles_bf16::NR / 2);
    tiles_bf16::pack_v(do_head, p.do_row_stride, Sq, Dv, do_cols.get(), sq16 * tiles_bf16::NR / 2);
  }
  // Whole key panels, as TileBwdOperands.
  void scores(int64_t row0, int64_t rows, int64_t key0, int64_t cols, float* s, int64_t lds) const {
    tiles_bf16::qk_block(rows, q_groups.get() + row0 * d2, k_panels.get() + key0 * d2, panels(cols), d2, scale, s,
                         lds);
  }
  void dprobs(int64_t row0, int64_t rows, int64_t key0, int64_t cols, float* dp, int64_t lds) const {
    tiles_bf16::qk_block(rows, do_groups.get() + row0 * dv2, v_panels.get() + key0 * dv2, panels(cols), dv2, 1.f,
                         dp, lds);
  }
  void add_dv(int64_t row0, int64_t rows, int64_t cols, const float* pr, int64_t lds, float* dv, int64_t) const {
    tiles_bf16::to_row_pairs(pr, lds, rows, cols, 1.f, block_pairs.get(), LD_ROW_PAIRS);
    tiles_bf16::pv_block(cols, block_pairs.get(), 1, LD_ROW_PAIRS, do_cols.get() + row0 / 2 * tiles_bf16::NR,
                         sq16 * tiles_bf16::NR / 2, tiles_bf16::pairs(rows), Dv16 / tiles_bf16::NR, dv, Dv16);
  }
  void add_dk(int64_t row0, int64_t rows, int64_t cols, const float* ds, int64_t lds, float* dk, int64_t) const {
    tiles_bf16::to_row_pairs(ds, lds, rows, cols, scale, block_pairs.get(), LD_ROW_PAIRS);
    tiles_bf16::pv_block(cols, block_pairs.get(), 1, LD_ROW_PAIRS, q_cols.get() + row0 / 2 * tiles_bf16::NR,
                         sq16 * tiles_bf16::NR / 2, tiles_bf16::pairs(rows), D16 / tiles_bf16::NR, dk, D16);
  }
  // (dK and dV accumulate in place.)
  void finish_key_block(int64_t, float*, int64_t, float*, int64_t) {}
  void add_dq(int64_t rows, int64_t key0, int64_t cols, const float* ds, int64_t lds, float* dq) const {
    tiles_bf16::to_pairs(ds, lds, rows, 0, cols, block_pairs.get(), LD_KEY_PAIRS);
    tiles_bf16::pv_block(rows, block_pairs.get(), LD_KEY_PAIRS, 1, k_cols.get() + key0 / 2 * tiles_bf16::NR,
                         sk16 * tiles_bf16::NR / 2, tiles_bf16::pairs(cols), D16 / tiles_bf16::NR, dq, D16);
  }

 private:
  static int64_t panels(int64_t cols) { return (cols + tiles_bf16::NR - 1) / tiles_bf16::NR; }
};
#endif

#ifdef FLASHATTN_CPU_AMX
// The five products of bf16 inputs on AMX tiles (tiles_amx.h), with Bf16DotBwdOperands'
// roundings (P and dS to bf16 for the products that take them). S is recomputed as the
// forward's AmxOperands computed it (the same Q pairs and K pair panels, order and
// scaling), so exp(S - lse) uses the very scores lse summed. AMX reads its A operand by
// rows, so dK and dV are accumulated transposed (dK^T += Q^T dS, dV^T += dO^T P, with Q^T
// and dO^T packed once per head) in dk_t / dv_t over a key block, and added into the
// block's rows by finish_key_block. Row blocks start on whole tiles (16 rows, so row
// pairs of Q^T and dO^T start there too) and key ranges on whole key panels.
struct AmxBwdOperands {
  static constexpr int64_t BLOCK_Q = 256, BLOCK_K = 128, PANEL_Q = 64, ROW_ALIGN = tiles_amx::TM,
                           KEY_ALIGN = tiles_bf16::NR;
  static constexpr int64_t LD_ROW_PAIRS = BLOCK_K, LD_KEY_PAIRS = BLOCK_K / 2;  // words per row
  static_assert(BLOCK_Q % PANEL_Q == 0 && PANEL_Q % ROW_ALIGN == 0 && BLOCK_K % tiles_bf16::NR == 0);
  tiles_amx::Use tile_use;
  const int64_t D, Dv, d2, dv2, D16, Dv16, sq16, sk16;
  const float scale;
  // Q and dO as rows of pairs, K and V as key panels (pack_k), K as column panels
  // (pack_v), Q^T and dO^T as rows of row pairs (pack_t, sq16 / 2 words per row).
  Scratch<uint32_t> q_pairs, do_pairs, k_panels, v_panels, k_cols, q_t, do_t;
  Scratch<uint32_t> block_pairs;  // P^T or dS^T as pairs of rows, or dS as pairs of keys
  Scratch<float> dk_t, dv_t;       // the key block's dK^T (D16 rows), dV^T (Dv16), BLOCK_K wide

  explicit AmxBwdOperands(const FlashParams& p)
      : D(p.head_dim),
        Dv(p.head_dim_v),
        d2(tiles_bf16::pairs(D)),
        dv2(tiles_bf16::pairs(Dv)),
        D16(tiles::round_up(D, tiles_amx::TM)),
        Dv16(tiles::round_up(Dv, tiles_amx::TM)),
        sq16(tiles::round_up(p.seqlen_q, tiles_amx::TM)),
        sk16(tiles::round_up(p.seqlen_k, tiles_bf16::NR)),
        scale(p.scale),
        q_pairs(scratch<uint32_t>(sq16 * d2)),
        do_pairs(scratch<uint32_t>(sq16 * dv2)),
        k_panels(scratch<uint32_t>(sk16 * d2)),
        v_panels(scratch<uint32_t>(sk16 * dv2)),
        k_cols(scratch<uint32_t>(sk16 / 2 * D16)),
        q_t(scratch<uint32_t>(D16 * sq16 / 2)),
        do_t(scratch<uint32_t>(Dv16 * sq16 / 2)),
        block_pairs(scratch<uint32_t>(std::max(BLOCK_Q / 2 * LD_ROW_PAIRS, BLOCK_Q * LD_KEY_PAIRS))),
        dk_t(scratch<float>(D16 * BLOCK_K)),
        dv_t(scratch<float>(Dv16 * BLOCK_K)) {
    std::fill(dk_t.get(), dk_t.get() + D16 * BLOCK_K, 0.f);
    std::fill(dv_t.get(), dv_t.get() + Dv16 * BLOCK_K, 0.f);
  }

  int64_t dk_stride() const { return D16; }
  int64_t dv_stride() const { return Dv16; }
  int64_t dq_stride() const { return D16; }

  void load(const FlashBwdParams& p, const Band& w, const c10::BFloat16* q_head, const c10::BFloat16* k_head,
            const c10::BFloat16* v_head, const c10::BFloat16* do_head, bool kv_loaded) {
    const int64_t Sq = w.seqlen_q, Sk = w.seqlen_k;
    tiles_amx::pack_q(q_head, p.q_row_stride, Sq, D, q_pairs.get());
    tiles_amx::pack_q(do_head, p.do_row_stride, Sq, Dv, do_pairs.get());
    if (!kv_loaded) {
      tiles_bf16::pack_k(k_head, p.k_row_stride, Sk, D, k_panels.get());
      tiles_bf16::pack_k(v_head, p.v_row_stride, Sk, Dv, v_panels.get());
      tiles_bf16::pack_v(k_head, p.k_row_stride, Sk, D, k_cols.get(), sk16 * tiles_bf16::NR / 2);
    }
    tiles_amx::pack_t(q_head, p.q_row_stride, Sq, D, D16, q_t.get(), sq16 / 2);
    tiles_amx::pack_t(do_head, p.do_row_stride, Sq, Dv, Dv16, do_t.get(), sq16 / 2);
  }
  // Whole key panels, as TileBwdOperands.
  void scores(int64_t row0, int64_t rows, int64_t key0, int64_t cols, float* s, int64_t lds) const {
    tiles_amx::qk_block(rows, q_pairs.get() + row0 * d2, k_panels.get() + key0 * d2, panels(cols), d2, scale, s, lds);
  }
  void dprobs(int64_t row0, int64_t rows, int64_t key0, int64_t cols, float* dp, int64_t lds) const {
    tiles_amx::qk_block(rows, do_pairs.get() + row0 * dv2, v_panels.get() + key0 * dv2, panels(cols), dv2, 1.f, dp,
                        lds);
  }
  // dV^T (columns block_key..) += dO^T P: P as B operand pairs of rows.
  void add_dv(int64_t row0, int64_t rows, int64_t cols, const float* pr, int64_t lds, float*, int64_t block_key) const {
    tiles_bf16::to_row_pairs(pr, lds, rows, cols, 1.f, block_pairs.get(), LD_ROW_PAIRS);
    tiles_amx::pv_block(Dv16, do_t.get() + row0 / 2, sq16 / 2, block_pairs.get(), LD_ROW_PAIRS, tiles_bf16::NR,
                        tiles_bf16::pairs(rows), panels(cols), dv_t.get() + block_key, BLOCK_K);
  }
  // dK^T (columns block_key..) += Q^T (scale dS).
  void add_dk(int64_t row0, int64_t rows, int64_t cols, const float* ds, int64_t lds, float*, int64_t block_key) const {
    tiles_bf16::to_row_pairs(ds, lds, rows, cols, scale, block_pairs.get(), LD_ROW_PAIRS);
    tiles_amx::pv_block(D16, q_t.get() + row0 / 2, sq16 / 2, block_pairs.get(), LD_ROW_PAIRS, tiles_bf16::NR,
                        tiles_bf16::pairs(rows), panels(cols), dk_t.get() + block_key, BLOCK_K);
  }
  // dK, dV rows [0, cols) of the key block += dK^T, dV^T; those back to 0 (the products
  // add to whole key panels: the columns up to cols rounded up to 16).
  void finish_key_block(int64_t cols, float* dk, int64_t ldk, float* dv, int64_t ldv) {
    tiles_amx::add_transposed(dk_t.get(), BLOCK_K, D, cols, dk, ldk);
    tiles_amx::add_transposed(dv_t.get(), BLOCK_K, Dv, cols, dv, ldv);
    const int64_t used = panels(cols) * tiles_bf16::NR;
    for (int64_t e = 0; e < D16; ++e) std::fill(dk_t.get() + e * BLOCK_K, dk_t.get() + e * BLOCK_K + used, 0.f);
    for (int64_t e = 0; e < Dv16; ++e) std::fill(dv_t.get() + e * BLOCK_K, dv_t.get() + e * BLOCK_K + used, 0.f);
  }
  void add_dq(int64_t rows, int64_t key0, int64_t cols, const float* ds, int64_t lds, float* dq) const {
    tiles_bf16::to_pairs(ds, lds, rows, 0, cols, block_pairs.get(), LD_KEY_PAIRS);
    tiles_amx::pv_block(rows, block_pairs.get(), LD_KEY_PAIRS, k_cols.get() + key0 / 2 * tiles_bf16::NR,
                        tiles_bf16::NR, sk16 * tiles_bf16::NR / 2, tiles_bf16::pairs(cols), D16 / tiles_bf16::NR, dq,
                        D16);
  }

 private:
  static int64_t panels(int64_t cols) { return (cols + tiles_bf16::NR - 1) / tiles_bf16::NR; }
};
#endif

// dst = (first ? 0 : dst) + src, element by element: one step of a sum over query heads
// in their order (from 0, so that a -0 term gives +0 as any sum starting at 0 does).
template <typename acc>
inline void add_row(const acc* src, int64_t n, bool first, acc* dst) {
  if (first) {
    for (int64_t d = 0; d < n; ++d) dst[d] = acc(0) + src[d];
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] += src[d];
  }
}

template <typename acc, typename Ops>
struct BwdWorkspace {
  Ops ops;
  // The head's dQ and delta (and Q for row_scores); per block pair P, dP, dK, dV and the
  // optional extras; with GQA the sums over the group of dK / dV for the task's keys
  // (`sum_keys` rows each).
  Scratch<acc> dq, delta, q_rows, s, dp, dcap, dk, dv, pz, dk_sum, dv_sum;
  std::unique_ptr<bool[]> keep;  // dropout decisions of one row
  int64_t head = -1;             // b * H + h whose operands and delta are loaded
  int64_t kv_head = -1;          // b * Hk + hk whose K and V are (a group's heads share them)
  BwdWorkspace(const FlashParams& p, bool row_scores, int64_t sum_keys)
      : ops(p),
        dq(scratch<acc>(p.seqlen_q * ops.dq_stride())),
        delta(scratch<acc>(p.seqlen_q)),
        q_rows(scratch<acc>(row_scores ? p.seqlen_q * p.head_dim : 0)),
        s(scratch<acc>(Ops::BLOCK_Q * Ops::BLOCK_K)),
        dp(scratch<acc>(Ops::BLOCK_Q * Ops::BLOCK_K)),
        dcap(scratch<acc>(p.softcap > 0.f ? Ops::BLOCK_Q * Ops::BLOCK_K : 0)),
        dk(scratch<acc>(Ops::BLOCK_K * ops.dk_stride())),
        dv(scratch<acc>(Ops::BLOCK_K * ops.dv_stride())),
        pz(scratch<acc>(p.dropout_p > 0.f ? Ops::BLOCK_Q * Ops::BLOCK_K : 0)),
        dk_sum(scratch<acc>(sum_keys * p.head_dim)),
        dv_sum(scratch<acc>(sum_keys * p.head_dim_v)),
        keep(new bool[Ops::BLOCK_K]) {}
};

// sum_d a_d b_d in acc: on the AVX2 tiles' CPUs in two 8-lane partial sums (16-bit
// elements widened in registers), added at the end (faster than the element-by-element
// sum it replaces, see benchmarks/RESULTS.md 'What was tried').
template <typename T, typename acc>
inline acc row_dot(const T* a, const T* b, int64_t n) {
  int64_t d = 0;
  acc sum = 0;
#ifdef FLASHATTN_CPU_TILES
  if constexpr (tiles::has_load8<T>()) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; d + 16 <= n; d += 16) {
      s0 = _mm256_fmadd_ps(tiles::load8(a + d), tiles::load8(b + d), s0);
      s1 = _mm256_fmadd_ps(tiles::load8(a + d + 8), tiles::load8(b + d + 8), s1);
    }
    if (d + 8 <= n) {
      s0 = _mm256_fmadd_ps(tiles::load8(a + d), tiles::load8(b + d), s0);
      d += 8;
    }
    sum = tiles::hsum(_mm256_add_ps(s0, s1));
  }
#endif
  for (; d < n; ++d) sum += static_cast<acc>(a[d]) * static_cast<acc>(b[d]);
  return sum;
}

// row_scores: the forward went row by row (KernelPath::rows; few queries, flash_fwd.cpp
// RowOperands). S is then recomputed the same way (tiles::row_scores on Q widened and
// scaled as RowOperands::load_q does), so that exp(S - lse) uses the very scores the
// forward's lse summed: another summation order is an ulp of S off, which the gradients
// amplify.
template <typename T, typename Ops>
void run_bwd(const FlashBwdParams& p, bool row_scores) {
  using acc = acc_t<T>;
  constexpr int64_t BLOCK_Q = Ops::BLOCK_Q, BLOCK_K = Ops::BLOCK_K, PANEL_Q = Ops::PANEL_Q;
  // Sizes of the workspaces and the GQA scratch: the longest sequence's (p.seqlen_q / _k).
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Sq_max = p.seqlen_q, Sk_max = p.seqlen_k;
  const int64_t H = p.num_heads, Hk = p.num_heads_k, group = H / Hk;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  const acc* lse = static_cast<const acc*>(p.lse);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const acc scale = static_cast<acc>(p.scale64);  // (float: the same value as p.scale)

  // Gradients larger than the caches are streamed (store_row_maybe_streaming), as the
  // forward's out.
  const int64_t q_rows = p.cu_seqlens_q ? p.total_q : p.batch * Sq_max;
  const int64_t key_rows = p.cu_seqlens_k ? p.total_k : p.batch * Sk_max;  // (as in k: packed, or B x Sk)
  const bool stream_dq = streamed<T>(q_rows * H * D), stream_dk = streamed<T>(key_rows * Hk * D),
             stream_dv = streamed<T>(key_rows * Hk * Dv);

  // Tasks are (sequence, KV head, part of its group of query heads). The group stays whole
  // (parts = 1) unless its largest task would then be over 1 / (2 x threads) of the call's
  // work (few KV heads, or one long sequence among short packed ones): then it is dealt
  // into up to `group` parts of neighbouring heads, whose dK / dV sums go to a buffer of
  // parts x KV heads' rows (parts = group: one per query head) and are added in part order
  // at the end. With fewer than two tasks per thread (one head on a many-core CPU), each
  // task's key blocks are also dealt round-robin into `splits` tasks (round-robin so that
  // causal masks leave them equal work); each such task sums its own dQ of each query head,
  // and those are added in split order at the end. The result does not depend on which
  // thread ran what. Memory: the dQ parts, splits x B x H x Sq x D (under 4 x threads
  // heads' worth); a whole group's sums, a task's keys of one KV head per thread; parts
  // of groups, parts x B x Hk x Sk x (D + Dv), parts about 2 x threads / (B x Hk).
  const int64_t heads = p.batch * H, max_k_blocks = (Sk_max + BLOCK_K - 1) / BLOCK_K;
  // (flash_cpu.h PARALLEL_MIN_WORK's estimate, at most: the five products and the scores
  // recomputed; a double, which cannot overflow)
  const double call_work = static_cast<double>(heads) * Sq_max * static_cast<double>(std::max<int64_t>(1, Sk_max)) *
                          (3 * D + 2 * Dv + 2 * SCORE_WORK) +
                      static_cast<double>(heads) * TASK_WORK;
  const int64_t parts = [&]() -> int64_t {
    if (group <= 1) return 1;  // (0: no query heads, nothing to sum)
    double work = 0, largest = 0;  // (rows x keys per sequence)
    for (int64_t b = 0; b < p.batch; ++b) {
      const SeqView sv = seq_view(p, b);
      const double w = static_cast<double>(sv.seqlen_q) * static_cast<double>(std::max<int64_t>(1, sv.seqlen_k));
      work += w, largest = std::max(largest, w);
    }
    if (work == 0) return 1;
    // (the threads for_each_task will run the tasks on: one for a small call)
    const int64_t threads = call_work < PARALLEL_MIN_WORK ? 1 : torch::stable::get_num_threads();
    if (threads == 1) return 1;
    const double wanted = std::ceil(2.0 * threads * group * largest / (H * work));
    return std::clamp<int64_t>(static_cast<int64_t>(wanted), 1, group);
  }();
  const int64_t splits = key_splits(p.batch * Hk * parts, max_k_blocks);
  Scratch<acc> dq_parts = scratch<acc>(splits > 1 ? splits * heads * Sq_max * D : 0);
  // The sums of a task's query heads: a whole group's in the workspace (key block kb of a
  // task at its (kb / splits)-th block), to be stored; a part's in dk_parts / dv_parts,
  // part j of KV head hk at rows (j * Hk + hk) * key_rows + key_row, to be added up below.
  auto key_row = [&](int64_t b, const SeqView& sv, int64_t j) { return p.cu_seqlens_k ? sv.k_start + j : b * Sk_max + j; };
  const int64_t sum_keys = group > 1 && parts == 1 ? (max_k_blocks + splits - 1) / splits * BLOCK_K : 0;
  Scratch<acc> dk_parts, dv_parts;
  if (parts > 1) {
    dk_parts = scratch<acc>(parts * Hk * key_rows * D);
    dv_parts = scratch<acc>(parts * Hk * key_rows * Dv);
  }

  using Workspace = BwdWorkspace<acc, Ops>;
  auto body = [&](int64_t task, Workspace& ws) {
    // (with parts = group, task = (b * H + h) * splits + split: one query head per task)
    const int64_t bhk_part = task / splits, split = task % splits;
    const int64_t bhk = bhk_part / parts, part = bhk_part % parts;
    const int64_t b = bhk / Hk, hk = bhk % Hk;
    const SeqView sv = seq_view(p, b);
    const Band w = band(p, sv);
    const int64_t Sq = sv.seqlen_q, Sk = sv.seqlen_k, num_k_blocks = (Sk + BLOCK_K - 1) / BLOCK_K;
    const T* k_head = k + sv.k_offset + hk * p.k_head_stride;
    const T* v_head = v + sv.v_offset + hk * p.v_head_stride;
    // Where the sums of key block kb's rows go (row stride D, Dv).
    auto dk_sums = [&](int64_t kb) {
      return parts == 1 ? ws.dk_sum.get() + kb / splits * BLOCK_K * D
                        : dk_parts.get() + ((part * Hk + hk) * key_rows + key_row(b, sv, kb * BLOCK_K)) * D;
    };
    auto dv_sums = [&](int64_t kb) {
      return parts == 1 ? ws.dv_sum.get() + kb / splits * BLOCK_K * Dv
                        : dv_parts.get() + ((part * Hk + hk) * key_rows + key_row(b, sv, kb * BLOCK_K)) * Dv;
    };
    const int64_t g0 = part * group / parts, g1 = (part + 1) * group / parts;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t h = hk * group + g, bh = b * H + h;
      const T* q_head = q + sv.q_offset + h * p.q_head_stride;
      const T* o_head = out + b * p.o_batch_stride + sv.q_start * p.o_row_stride + h * p.o_head_stride;
      const T* do_head = dout + b * p.do_batch_stride + sv.q_start * p.do_row_stride + h * p.do_head_stride;
      const acc* lse_head = lse + lse_index(p, sv, h, 0);
      acc* delta = ws.delta.get();
      if (ws.head != bh) {  // (a thread running several splits of a head alone, no group, loads it once)
        ws.ops.load(p, w, q_head, k_head, v_head, do_head, ws.kv_head == bhk);
        if (row_scores) {
          load_rows(q_head, p.q_row_stride, Sq, D, ws.q_rows.get(), D);
          scale_row(ws.q_rows.get(), Sq * D, scale);
        }
        for (int64_t i = 0; i < Sq; ++i) {  // delta_i = sum_d dO_id * O_id
          delta[i] = row_dot<T, acc>(do_head + i * p.do_row_stride, o_head + i * p.o_row_stride, Dv);
        }
        ws.head = bh, ws.kv_head = bhk;
      }
      const int64_t ldq_grad = ws.ops.dq_stride(), ldk_grad = ws.ops.dk_stride(), ldv_grad = ws.ops.dv_stride();
      constexpr int64_t lds = BLOCK_K;  // score row stride
      acc* dqa = ws.dq.get();
      std::fill(dqa, dqa + Sq * ldq_grad, acc(0));
      const float slope = alibi_slope(p, b, h);
      acc *s = ws.s.get(), *dp = ws.dp.get(), *dka = ws.dk.get(), *dva = ws.dv.get();
      acc* dcap = p.softcap > 0.f ? ws.dcap.get() : nullptr;

      for (int64_t kb = split; kb < num_k_blocks; kb += splits) {
        const int64_t col0 = kb * BLOCK_K, block_cols = std::min(BLOCK_K, Sk - col0);
        std::fill(dka, dka + block_cols * ldk_grad, acc(0));
        std::fill(dva, dva + block_cols * ldv_grad, acc(0));
        const KeyRange rows_seen =
            keys_all_masked(p, b, h, col0, block_cols) ? KeyRange{0, 0} : visible_rows(w, col0, col0 + block_cols);
        // One block pair: query rows [row0, row0 + rows) against keys [key0, key0 + cols),
        // which lie inside the key block at col0.
        auto block_pair = [&](int64_t row0, int64_t rows, int64_t key0, int64_t cols) {
          acc* dk_part = dka + (key0 - col0) * ldk_grad;
          acc* dv_part = dva + (key0 - col0) * ldv_grad;
          bool scored = false;
  #ifdef FLASHATTN_CPU_TILES
          if constexpr (tiles::has_load8<T>()) {
            if (row_scores) {
              tiles::row_scores(ws.q_rows.get() + row0 * D, rows, k_head + key0 * p.k_row_stride, p.k_row_stride,
                                cols, D, s, lds);
              scored = true;
            }
          }
  #endif
          if (!scored) ws.ops.scores(row0, rows, key0, cols, s, lds);
          // As in the forward: the common case needs no per-row transform, and a row the band
          // masks only computes P up to its last visible key (0 after it).
          const bool transform = scores_need_transform(p, slope);
          const bool logits = !transform && all_rows_see(w, row0, rows, key0, cols);
          for (int64_t r = 0; r < rows; ++r) {
            acc* srow = s + r * lds;
            int64_t row_n = cols;  // the row's P [0, row_n) of the block's cols; the rest are 0
            if (transform) {
              transform_scores<T, acc>(p, w, srow, cols, row0 + r, key0, slope, bias_row<T>(p, b, h, row0 + r),
                                       dcap ? dcap + r * lds : nullptr);
            } else if (!logits) {
              row_n = mask_band_start(w, srow, cols, row0 + r, key0);
            }
            const acc row_lse = lse_head[row0 + r];
            if (row_lse == neg_inf) {
              std::fill(srow, srow + cols, acc(0));
            } else {
              exp_shift_sum(srow, row_n, row_lse);  // P, in place
              std::fill(srow + row_n, srow + cols, acc(0));
            }
          }
          ws.ops.dprobs(row0, rows, key0, cols, dp, lds);  // dP = dO V^T
          if (p.dropout_p > 0.f) {
            // With Z the scaled keep mask: dV += (P*Z)^T dO (P*Z into `pz`) and dP *= Z.
            for (int64_t r = 0; r < rows; ++r) {
              acc* pz = ws.pz.get() + r * lds;
              std::copy(s + r * lds, s + r * lds + cols, pz);
              apply_dropout(p, pz, cols, lse_index(p, sv, h, row0 + r), key0, ws.keep.get());
              acc* drow = dp + r * lds;
              keep_scale_row(drow, ws.keep.get(), cols, dropout_scale<acc>(p));
            }
          }
          // dV += (P [* Z])^T dO
          ws.ops.add_dv(row0, rows, cols, p.dropout_p > 0.f ? ws.pz.get() : s, lds, dv_part, key0 - col0);
          using V = Vec<acc>;
          for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta) [* softcap']
            acc* prow = s + r * lds;
            acc* drow = dp + r * lds;
            const V vdelta(delta[row0 + r]);
            int64_t c = 0;
            // A row that sees no key: dS 0 (its P is 0, but 0 times the dP of an infinite V
            // is NaN), so that its gradients are 0 (docs/design.md).
            if (lse_head[row0 + r] == neg_inf) {
              std::fill(drow, drow + cols, acc(0));
              c = cols;
            }
            for (; c + V::size() <= cols; c += V::size()) {
              (V::loadu(prow + c) * (V::loadu(drow + c) - vdelta)).store(drow + c);
            }
            for (; c < cols; ++c) drow[c] = prow[c] * (drow[c] - delta[row0 + r]);
            if (p.dbias) {  // the bias is added to the final logits: dBias = dS before softcap'
              float* db = p.dbias + ((bh * Sq) + row0 + r) * Sk + key0;
              for (c = 0; c < cols; ++c) db[c] = static_cast<float>(drow[c]);
            }
            if (dcap) {
              const acc* crow = dcap + r * lds;
              for (c = 0; c < cols; ++c) drow[c] *= crow[c];
            }
          }
          // dK += scale dS^T Q;  dQ += dS K (scaled when stored)
          ws.ops.add_dk(row0, rows, cols, dp, lds, dk_part, key0 - col0);
          ws.ops.add_dq(rows, key0, cols, dp, lds, dqa + row0 * ldq_grad);
        };
        // Causal or windowed pairs are done in panels of PANEL_Q rows, each over only the
        // keys its rows can see (the masked corner of a diagonal pair is not computed).
        // Row blocks start on a multiple of ROW_ALIGN and key ranges on a multiple of
        // KEY_ALIGN (the tiles' row groups and key panels); the extra rows and keys are
        // invisible, so their P and dS are 0.
        for (int64_t row0 = rows_seen.lo / Ops::ROW_ALIGN * Ops::ROW_ALIGN; row0 < rows_seen.hi; row0 += BLOCK_Q) {
          const int64_t rows = std::min(BLOCK_Q, rows_seen.hi - row0);
          if (all_rows_see(w, row0, rows, col0, block_cols)) {
            block_pair(row0, rows, col0, block_cols);
            continue;
          }
          for (int64_t r0 = row0; r0 < row0 + rows; r0 += PANEL_Q) {
            const int64_t r1 = std::min(row0 + rows, r0 + PANEL_Q);
            const KeyRange seen = clip(visible_keys(w, r0, r1), col0, block_cols);
            const int64_t lo = seen.lo / Ops::KEY_ALIGN * Ops::KEY_ALIGN;
            if (seen.hi > seen.lo) block_pair(r0, r1 - r0, col0 + lo, seen.hi - lo);
          }
        }
        ws.ops.finish_key_block(block_cols, dka, ldk_grad, dva, ldv_grad);
        if (group == 1) {
          T* dk_blk = dk + b * p.dk_batch_stride + h * p.dk_head_stride + (sv.k_start + col0) * p.dk_row_stride;
          T* dv_blk = dv + b * p.dv_batch_stride + h * p.dv_head_stride + (sv.k_start + col0) * p.dv_row_stride;
          for (int64_t c = 0; c < block_cols; ++c) {
            store_row_maybe_streaming<T, acc>(stream_dk, dka + c * ldk_grad, D, acc(1), dk_blk + c * p.dk_row_stride);
            store_row_maybe_streaming<T, acc>(stream_dv, dva + c * ldv_grad, Dv, acc(1), dv_blk + c * p.dv_row_stride);
          }
        } else {  // summed over the task's heads, in head order (from 0: 0 + x, as a sum starts)
          acc* dk_sum = dk_sums(kb);
          acc* dv_sum = dv_sums(kb);
          for (int64_t c = 0; c < block_cols; ++c) {
            add_row(dka + c * ldk_grad, D, g == g0, dk_sum + c * D);
            add_row(dva + c * ldv_grad, Dv, g == g0, dv_sum + c * Dv);
          }
        }
      }
      if (splits == 1) {
        T* dq_head = dq + b * p.dq_batch_stride + sv.q_start * p.dq_row_stride + h * p.dq_head_stride;
        for (int64_t i = 0; i < Sq; ++i) {
          store_row_maybe_streaming<T, acc>(stream_dq, dqa + i * ldq_grad, D, scale, dq_head + i * p.dq_row_stride);
        }
      } else {
        acc* part = dq_parts.get() + (bh * splits + split) * Sq_max * D;
        for (int64_t i = 0; i < Sq; ++i) std::copy(dqa + i * ldq_grad, dqa + i * ldq_grad + D, part + i * D);
      }
    }  // (the task's query heads)
    if (group > 1 && parts == 1) {  // the KV head's dK / dV: its sums over the group
      for (int64_t kb = split; kb < num_k_blocks; kb += splits) {
        const int64_t col0 = kb * BLOCK_K, block_cols = std::min(BLOCK_K, Sk - col0);
        const acc* dk_sum = dk_sums(kb);
        const acc* dv_sum = dv_sums(kb);
        T* dk_blk = dk + b * p.dk_batch_stride + hk * p.dk_head_stride + (sv.k_start + col0) * p.dk_row_stride;
        T* dv_blk = dv + b * p.dv_batch_stride + hk * p.dv_head_stride + (sv.k_start + col0) * p.dv_row_stride;
        for (int64_t c = 0; c < block_cols; ++c) {
          store_row_maybe_streaming<T, acc>(stream_dk, dk_sum + c * D, D, acc(1), dk_blk + c * p.dk_row_stride);
          store_row_maybe_streaming<T, acc>(stream_dv, dv_sum + c * Dv, Dv, acc(1), dv_blk + c * p.dv_row_stride);
        }
      }
    }
    if (stream_dq || (parts == 1 && (stream_dk || stream_dv))) stream_fence();
  };

  for_each_task(
      p.batch * Hk * parts * splits, call_work, [&] { return Workspace(p, row_scores, sum_keys); }, body);

  if (splits > 1) {  // dQ = scale * (sum of the parts, in split order)
    parallel_for(0, heads * Sq_max, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc> row(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bh = r / Sq_max, i = r % Sq_max, b = bh / H, h = bh % H;
        const SeqView sv = seq_view(p, b);
        if (i >= sv.seqlen_q) continue;
        std::fill(row.begin(), row.end(), acc(0));
        for (int64_t sp = 0; sp < splits; ++sp) {
          const acc* part = dq_parts.get() + ((bh * splits + sp) * Sq_max + i) * D;
          for (int64_t d = 0; d < D; ++d) row[d] += part[d];
        }
        store_row_maybe_streaming<T, acc>(
            stream_dq, row.data(), D, scale,
            dq + b * p.dq_batch_stride + h * p.dq_head_stride + (sv.q_start + i) * p.dq_row_stride);
      }
      if (stream_dq) stream_fence();
    });
  }

  if (parts > 1) {  // dK/dV of a kv head = sum over its parts' sums, in part order
    parallel_for(0, p.batch * Hk, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> sum(std::max(D, Dv));
      for (int64_t bhk = begin; bhk < end; ++bhk) {
        const int64_t b = bhk / Hk, hk = bhk % Hk;
        const SeqView sv = seq_view(p, b);
        for (int64_t j = 0; j < sv.seqlen_k; ++j) {
          const int64_t row = sv.k_start + j, sum_row = hk * key_rows + key_row(b, sv, j);  // (part 0's)
          T* dk_row = dk + b * p.dk_batch_stride + hk * p.dk_head_stride + row * p.dk_row_stride;
          T* dv_row = dv + b * p.dv_batch_stride + hk * p.dv_head_stride + row * p.dv_row_stride;
          for (int64_t d = 0; d < D; ++d) {
            sum[d] = 0;
            for (int64_t j2 = 0; j2 < parts; ++j2) sum[d] += dk_parts[(j2 * Hk * key_rows + sum_row) * D + d];
          }
          store_row_maybe_streaming<T, acc>(stream_dk, sum.data(), D, acc(1), dk_row);
          for (int64_t d = 0; d < Dv; ++d) {
            sum[d] = 0;
            for (int64_t j2 = 0; j2 < parts; ++j2) sum[d] += dv_parts[(j2 * Hk * key_rows + sum_row) * Dv + d];
          }
          store_row_maybe_streaming<T, acc>(stream_dv, sum.data(), Dv, acc(1), dv_row);
        }
      }
      if (stream_dk || stream_dv) stream_fence();
    });
  }
}
}  // namespace

template <typename T>
void flash_bwd(const FlashBwdParams& p) {
  const KernelPath path = kernel_path<T>(p);  // the forward's (flash_cpu.h)
#ifdef FLASHATTN_CPU_TILES
  if constexpr (!std::is_same_v<T, double>) {
#ifdef FLASHATTN_CPU_BF16_DOT
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (path.products == Products::Bf16Dot) return run_bwd<T, Bf16DotBwdOperands>(p, path.rows);
#ifdef FLASHATTN_CPU_AMX
      if (path.products == Products::Amx) return run_bwd<T, AmxBwdOperands>(p, path.rows);
#endif
    }
#endif
    if (path.products == Products::Tiles) return run_bwd<T, TileBwdOperands<T>>(p, path.rows);
  }
#endif
  run_bwd<T, BlasBwdOperands<T, acc_t<T>>>(p, path.rows);
}

template void flash_bwd<float>(const FlashBwdParams&);
template void flash_bwd<double>(const FlashBwdParams&);
template void flash_bwd<c10::BFloat16>(const FlashBwdParams&);
template void flash_bwd<c10::Half>(const FlashBwdParams&);

}  // namespace flashattn::cpu
