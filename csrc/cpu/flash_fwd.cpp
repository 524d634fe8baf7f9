// Fused attention forward on the CPU: tiled, online softmax, no Sq x Sk buffer.
//
// One task is one (batch, head, block of BLOCK_Q query rows). It streams the visible
// key/value blocks of BLOCK_K rows: S = scale * Q K^T through BLAS, the score transform
// and online-softmax update per row (vectorised exp), then O += P V through BLAS. Memory
// per thread is a few blocks, plus for 16-bit inputs up to 16 MiB of widened K and V;
// nothing is Sq x Sk.
#include "flash_cpu.h"

#include "blas.h"

#include <vector>

namespace flashattn::cpu {

namespace {
// Large blocks amortise BLAS packing; a 256 x 512 float score block (512 KiB) still
// stays in L2 on current x86 cores.
constexpr int64_t BLOCK_Q = 256;
constexpr int64_t BLOCK_K = 512;
// Rows per panel where a block is only partly visible (causal diagonal, windows).
constexpr int64_t PANEL_Q = 64;

// 16-bit inputs: K and V rows widened to float for BLAS. When a head has several query
// blocks and its float copy fits in CACHE_BYTES, the thread keeps the copy of the head it
// is working on, widened in 64-key chunks on first use: the queue hands out a head's
// query blocks in a row, so each thread widens a key about once per head instead of once
// per query block. Otherwise (one query block per head, as in decoding, or a very long
// head) only the current key block is widened, as memory stays a few blocks per thread.
template <typename acc>
struct WidenedKV {
  static constexpr int64_t CHUNK = 64;                // keys
  static constexpr int64_t CACHE_BYTES = 16 << 20;  // per thread
  const bool whole_head;
  Scratch<acc> k, v;
  std::vector<char> ready;  // per chunk (whole-head mode)
  int64_t head = -1;        // b * Hk + hk of the cached head, -1 for none

  WidenedKV(const FlashParams& p, int64_t block_k, bool several_q_blocks)
      : whole_head(several_q_blocks &&
                   p.seqlen_k * (p.head_dim + p.head_dim_v) * static_cast<int64_t>(sizeof(acc)) <= CACHE_BYTES),
        k(scratch<acc>((whole_head ? p.seqlen_k : block_k) * p.head_dim)),
        v(scratch<acc>((whole_head ? p.seqlen_k : block_k) * p.head_dim_v)),
        ready(whole_head ? (p.seqlen_k + CHUNK - 1) / CHUNK : 0, 0) {}

  // Widen keys [lo, hi) of head `head_id` (at most one key block). Returns `base`: key j's
  // rows are then at k.get() + (j - base) * d and v.get() + (j - base) * dv.
  template <typename T>
  int64_t widen(const FlashParams& p, int64_t head_id, const T* k_head, const T* v_head, int64_t lo, int64_t hi) {
    const int64_t d = p.head_dim, dv = p.head_dim_v;
    if (!whole_head) {
      load_rows(k_head + lo * p.k_row_stride, p.k_row_stride, hi - lo, d, k.get(), d);
      load_rows(v_head + lo * p.v_row_stride, p.v_row_stride, hi - lo, dv, v.get(), dv);
      return lo;
    }
    if (head != head_id) {
      std::fill(ready.begin(), ready.end(), 0);
      head = head_id;
    }
    for (int64_t c = lo / CHUNK; c * CHUNK < hi; ++c) {
      if (ready[c]) continue;
      const int64_t key0 = c * CHUNK, n = std::min(CHUNK, p.seqlen_k - key0);
      load_rows(k_head + key0 * p.k_row_stride, p.k_row_stride, n, d, k.get() + key0 * d, d);
      load_rows(v_head + key0 * p.v_row_stride, p.v_row_stride, n, dv, v.get() + key0 * dv, dv);
      ready[c] = 1;
    }
    return 0;
  }
};

// Sized to the problem's blocks (bq <= BLOCK_Q rows, bk <= BLOCK_K keys): small calls
// (decoding) then neither map nor fault in the full-size buffers.
template <typename acc>
struct FwdWorkspace {
  Scratch<acc> q, s, o, m, l;
  std::unique_ptr<bool[]> keep;        // dropout decisions of one row
  std::unique_ptr<WidenedKV<acc>> kv;  // 16-bit inputs only
  FwdWorkspace(const FlashParams& p, int64_t bq, int64_t bk, int64_t num_q_blocks, bool widen)
      : q(scratch<acc>(bq * p.head_dim)), s(scratch<acc>(bq * bk)), o(scratch<acc>(bq * p.head_dim_v)),
        m(scratch<acc>(bq)), l(scratch<acc>(bq)), keep(new bool[bk]),
        kv(widen ? std::make_unique<WidenedKV<acc>>(p, bk, num_q_blocks > 1) : nullptr) {}
};
}  // namespace

template <typename T>
void flash_fwd(const FlashParams& p) {
  using acc = acc_t<T>;
  // float and double inputs feed BLAS in place (row stride as leading dimension; copying
  // strided (B, S, H, D) rows to dense ones first was measured and did not pay); 16-bit
  // inputs are widened: Q per task, K and V by WidenedKV.
  constexpr bool in_place = std::is_same_v<T, acc>;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t H = p.num_heads, group = p.num_heads / p.num_heads_k;
  const int64_t num_q_blocks = (p.seqlen_q + BLOCK_Q - 1) / BLOCK_Q;
  const int64_t block_q = std::min(BLOCK_Q, p.seqlen_q), block_k = std::min(BLOCK_K, p.seqlen_k);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  acc* lse = static_cast<acc*>(p.lse);
  const acc neg_inf = -std::numeric_limits<acc>::infinity();

  auto body = [&](int64_t task, FwdWorkspace<acc>& ws) {
    // Within a head, the last query blocks see the most keys under causal masks: hand
    // them out first.
    const int64_t bh = task / num_q_blocks;
    const int64_t q_block = num_q_blocks - 1 - task % num_q_blocks;
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    const int64_t row0 = q_block * BLOCK_Q, rows = std::min(block_q, p.seqlen_q - row0);

    const T* q_blk = q + b * p.q_batch_stride + h * p.q_head_stride + row0 * p.q_row_stride;
    const T* k_head = k + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* v_head = v + b * p.v_batch_stride + hk * p.v_head_stride;
    const acc* qa;
    int64_t ldq;
    if constexpr (in_place) {
      qa = q_blk, ldq = p.q_row_stride;
    } else {
      load_rows(q_blk, p.q_row_stride, rows, D, ws.q.get(), D);
      qa = ws.q.get(), ldq = D;
    }
    acc* s = ws.s.get();
    acc* o = ws.o.get();
    acc* m = ws.m.get();
    acc* l = ws.l.get();
    std::fill(o, o + rows * Dv, acc(0));
    std::fill(m, m + rows, neg_inf);
    std::fill(l, l + rows, acc(0));
    const float slope = alibi_slope(p, b, h);
    const KeyRange keys = visible_keys(p, row0, row0 + rows);

    for (int64_t col0 = keys.lo; col0 < keys.hi; col0 += block_k) {
      const int64_t cols = std::min(block_k, keys.hi - col0);
      if (keys_all_masked(p, b, h, col0, cols)) continue;
      const acc *ka, *va;
      int64_t ldk, ldv;
      if constexpr (in_place) {
        ka = k_head + col0 * p.k_row_stride, ldk = p.k_row_stride;
        va = v_head + col0 * p.v_row_stride, ldv = p.v_row_stride;
      } else {
        const int64_t base = ws.kv->widen(p, b * p.num_heads_k + hk, k_head, v_head, col0, col0 + cols);
        ka = ws.kv->k.get() + (col0 - base) * D, ldk = D;
        va = ws.kv->v.get() + (col0 - base) * Dv, ldv = Dv;
      }
      // Causal or windowed blocks are done in panels of PANEL_Q rows, each over only the
      // keys its rows can see (the masked corner of a diagonal block is not computed);
      // other blocks are one panel of all rows.
      const bool split = !all_rows_see(p, row0, rows, col0, cols);
      for (int64_t r0 = 0; r0 < rows; r0 += split ? PANEL_Q : rows) {
        const int64_t r1 = split ? std::min(rows, r0 + PANEL_Q) : rows;
        const KeyRange seen = split ? clip(visible_keys(p, row0 + r0, row0 + r1), col0, cols) : KeyRange{0, cols};
        const int64_t lo = seen.lo, n = seen.hi - seen.lo;
        if (n == 0) continue;  // these rows see none of this block
        acc* s_panel = s + r0 * block_k + lo;
        gemm<acc>(Op::N, Op::T, r1 - r0, n, D, acc(p.scale), qa + r0 * ldq, ldq, ka + lo * ldk, ldk, acc(0),
                  s_panel, block_k);
        for (int64_t r = r0; r < r1; ++r) {
          acc* srow = s + r * block_k + lo;
          transform_scores<T, acc>(p, srow, n, row0 + r, col0 + lo, slope, bias_row<T>(p, b, h, row0 + r), nullptr);
          const acc m_new = std::max(m[r], row_max(srow, n));
          if (m_new == neg_inf) {  // nothing visible to this row yet: contributes nothing
            std::fill(srow, srow + n, acc(0));
            continue;
          }
          const acc rescale = std::exp(m[r] - m_new);  // 0 when m[r] is -inf
          const acc sum = exp_shift_sum(srow, n, m_new);
          // The softmax is normalised before dropout: l sums the undropped probabilities.
          if (p.dropout_p > 0.f) apply_dropout(p, srow, n, b, h, row0 + r, col0 + lo, ws.keep.get());
          if (rescale != acc(1)) scale_row(o + r * Dv, Dv, rescale);
          l[r] = l[r] * rescale + sum;
          m[r] = m_new;
        }
        gemm<acc>(Op::N, Op::N, r1 - r0, Dv, n, acc(1), s_panel, block_k, va + lo * ldv, ldv, acc(1), o + r0 * Dv,
                  Dv);
      }
    }

    T* out_blk = out + b * p.o_batch_stride + h * p.o_head_stride + row0 * p.o_row_stride;
    acc* lse_blk = lse + (b * H + h) * p.seqlen_q + row0;
    for (int64_t r = 0; r < rows; ++r) {
      // A row that saw no key: out 0, lse -inf (never 0/0).
      const bool empty = l[r] == acc(0);
      store_row<T, acc>(o + r * Dv, Dv, empty ? acc(0) : acc(1) / l[r], out_blk + r * p.o_row_stride);
      lse_blk[r] = empty ? neg_inf : m[r] + std::log(l[r]);
    }
  };

  for_each_task(
      p.batch * H * num_q_blocks, [&] { return FwdWorkspace<acc>(p, block_q, block_k, num_q_blocks, !in_place); }, body);
}

template void flash_fwd<float>(const FlashParams&);
template void flash_fwd<double>(const FlashParams&);
template void flash_fwd<c10::BFloat16>(const FlashParams&);
template void flash_fwd<c10::Half>(const FlashParams&);

}  // namespace flashattn::cpu
