// Fused attention backward on the CPU: recomputes P from the forward's lse, block by
// block; no Sq x Sk buffer.
//
// One task is one (batch, query head). For each key block it loops over the query blocks
// that can see it (FlashAttention-2 order):
//   S = scale Q K^T -> logits (softcap, ALiBi, mask) -> P = exp(logits - lse)
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta) [* softcap'],
//   dK += scale dS^T Q,  dQ += scale dS K   (dQ for the whole head in an fp32 buffer).
// Every task owns its rows of dQ and its head's dK/dV, so the result does not depend on
// thread timing (always deterministic). With GQA each query head's dK/dV go to a
// float scratch and are summed over the group afterwards in a fixed order.
#include "flash_cpu.h"

#include "blas.h"

namespace flashattn::cpu {

namespace {
// Two score-sized blocks (P and dP) live at once: 128 x 256 floats each.
constexpr int64_t BLOCK_Q = 128;
constexpr int64_t BLOCK_K = 256;
// Rows per panel where a block pair is only partly visible (causal diagonal, windows).
constexpr int64_t PANEL_Q = 64;

template <typename acc>
struct BwdWorkspace {
  // Whole-head operands (widened copies for 16-bit inputs), the head's dQ and delta.
  Scratch<acc> q, k, v, dout, dq, delta;
  // Per block pair.
  Scratch<acc> s, dp, dcap, dk, dv, pz;
  std::unique_ptr<bool[]> keep;  // dropout decisions of one row
  BwdWorkspace(const FlashParams& p, bool widen)
      : q(scratch<acc>(widen ? p.seqlen_q * p.head_dim : 0)),
        k(scratch<acc>(widen ? p.seqlen_k * p.head_dim : 0)),
        v(scratch<acc>(widen ? p.seqlen_k * p.head_dim_v : 0)),
        dout(scratch<acc>(widen ? p.seqlen_q * p.head_dim_v : 0)),
        dq(scratch<acc>(p.seqlen_q * p.head_dim)),
        delta(scratch<acc>(p.seqlen_q)),
        s(scratch<acc>(BLOCK_Q * BLOCK_K)),
        dp(scratch<acc>(BLOCK_Q * BLOCK_K)),
        dcap(scratch<acc>(p.softcap > 0.f ? BLOCK_Q * BLOCK_K : 0)),
        dk(scratch<acc>(BLOCK_K * p.head_dim)),
        dv(scratch<acc>(BLOCK_K * p.head_dim_v)),
        pz(scratch<acc>(p.dropout_p > 0.f ? BLOCK_Q * BLOCK_K : 0)),
        keep(new bool[BLOCK_K]) {}
};

// Query rows that see at least one key of [col0, col1): the inverse of visible_keys.
inline KeyRange visible_rows(const FlashParams& p, int64_t col0, int64_t col1) {
  int64_t lo = 0, hi = p.seqlen_q;
  if (p.window_right >= 0) lo = std::max<int64_t>(lo, col0 - p.diag_offset - p.window_right);
  if (p.window_left >= 0) hi = std::min<int64_t>(hi, col1 - 1 - p.diag_offset + p.window_left + 1);
  lo = std::min<int64_t>(lo, p.seqlen_q);
  return {lo, std::max(lo, hi)};
}

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
}  // namespace

template <typename T>
void flash_bwd(const FlashBwdParams& p) {
  using acc = acc_t<T>;
  constexpr bool widen = !std::is_same_v<T, acc>;
  const int64_t D = p.head_dim, Dv = p.head_dim_v, Sq = p.seqlen_q, Sk = p.seqlen_k;
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
  const acc scale = p.scale;

  // With GQA, per-query-head dK/dV (B, H, Sk, D) in acc, reduced over the group below.
  Scratch<acc> dk_heads, dv_heads;
  if (group > 1) {
    dk_heads = scratch<acc>(p.batch * H * Sk * D);
    dv_heads = scratch<acc>(p.batch * H * Sk * Dv);
  }

  auto body = [&](int64_t bh, BwdWorkspace<acc>& ws) {
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    const T* q_head = q + b * p.q_batch_stride + h * p.q_head_stride;
    const T* k_head = k + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* v_head = v + b * p.v_batch_stride + hk * p.v_head_stride;
    const T* o_head = out + b * p.o_batch_stride + h * p.o_head_stride;
    const T* do_head = dout + b * p.do_batch_stride + h * p.do_head_stride;
    const acc* lse_head = lse + bh * Sq;
    int64_t ldq, ldk, ldv, lddo;
    const acc* qa = operand<T, acc>(q_head, p.q_row_stride, Sq, D, ws.q.get(), ldq);
    const acc* ka = operand<T, acc>(k_head, p.k_row_stride, Sk, D, ws.k.get(), ldk);
    const acc* va = operand<T, acc>(v_head, p.v_row_stride, Sk, Dv, ws.v.get(), ldv);
    const acc* doa = operand<T, acc>(do_head, p.do_row_stride, Sq, Dv, ws.dout.get(), lddo);
    acc* delta = ws.delta.get();
    for (int64_t i = 0; i < Sq; ++i) {  // delta_i = sum_d dO_id * O_id
      const T* orow = o_head + i * p.o_row_stride;
      const acc* drow = doa + i * lddo;
      acc sum = 0;
      for (int64_t d = 0; d < Dv; ++d) sum += drow[d] * static_cast<acc>(orow[d]);
      delta[i] = sum;
    }
    acc* dqa = ws.dq.get();
    std::fill(dqa, dqa + Sq * D, acc(0));
    const float slope = alibi_slope(p, b, h);
    acc *s = ws.s.get(), *dp = ws.dp.get(), *dka = ws.dk.get(), *dva = ws.dv.get();
    acc* dcap = p.softcap > 0.f ? ws.dcap.get() : nullptr;

    for (int64_t col0 = 0; col0 < Sk; col0 += BLOCK_K) {
      const int64_t block_cols = std::min(BLOCK_K, Sk - col0);
      std::fill(dka, dka + block_cols * D, acc(0));
      std::fill(dva, dva + block_cols * Dv, acc(0));
      const KeyRange rows_seen =
          keys_all_masked(p, b, h, col0, block_cols) ? KeyRange{0, 0} : visible_rows(p, col0, col0 + block_cols);
      // One block pair: query rows [row0, row0 + rows) against keys [key0, key0 + cols),
      // which lie inside the key block at col0.
      auto block_pair = [&](int64_t row0, int64_t rows, int64_t key0, int64_t cols) {
        acc* dk_part = dka + (key0 - col0) * D;
        acc* dv_part = dva + (key0 - col0) * Dv;
        gemm<acc>(Op::N, Op::T, rows, cols, D, scale, qa + row0 * ldq, ldq, ka + key0 * ldk, ldk, acc(0), s,
                  BLOCK_K);
        for (int64_t r = 0; r < rows; ++r) {
          acc* srow = s + r * BLOCK_K;
          transform_scores<T, acc>(p, srow, cols, row0 + r, key0, slope, bias_row<T>(p, b, h, row0 + r),
                                   dcap ? dcap + r * BLOCK_K : nullptr);
          const acc row_lse = lse_head[row0 + r];
          if (row_lse == neg_inf) {
            std::fill(srow, srow + cols, acc(0));
          } else {
            exp_shift_sum(srow, cols, row_lse);  // P, in place
          }
        }
        // dP = dO V^T
        gemm<acc>(Op::N, Op::T, rows, cols, Dv, acc(1), doa + row0 * lddo, lddo, va + key0 * ldv, ldv, acc(0),
                  dp, BLOCK_K);
        if (p.dropout_p > 0.f) {
          // With Z the scaled keep mask: dV += (P*Z)^T dO (P*Z into `pz`) and dP *= Z.
          for (int64_t r = 0; r < rows; ++r) {
            acc* pz = ws.pz.get() + r * BLOCK_K;
            std::copy(s + r * BLOCK_K, s + r * BLOCK_K + cols, pz);
            apply_dropout(p, pz, cols, b, h, row0 + r, key0, ws.keep.get());
            acc* drow = dp + r * BLOCK_K;
            const acc mult = acc(1) / (acc(1) - static_cast<acc>(p.dropout_p));
            for (int64_t c = 0; c < cols; ++c) drow[c] = ws.keep[c] ? drow[c] * mult : acc(0);
          }
        }
        // dV += (P [* Z])^T dO
        gemm<acc>(Op::T, Op::N, cols, Dv, rows, acc(1), p.dropout_p > 0.f ? ws.pz.get() : s, BLOCK_K,
                  doa + row0 * lddo, lddo, acc(1), dv_part, Dv);
        using V = Vec<acc>;
        for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta) [* softcap']
          acc* prow = s + r * BLOCK_K;
          acc* drow = dp + r * BLOCK_K;
          const V vdelta(delta[row0 + r]);
          int64_t c = 0;
          for (; c + V::size() <= cols; c += V::size()) {
            (V::loadu(prow + c) * (V::loadu(drow + c) - vdelta)).store(drow + c);
          }
          for (; c < cols; ++c) drow[c] = prow[c] * (drow[c] - delta[row0 + r]);
          if (p.dbias) {  // the bias is added to the final logits: dBias = dS before softcap'
            float* db = p.dbias + ((bh * Sq) + row0 + r) * Sk + key0;
            for (c = 0; c < cols; ++c) db[c] = static_cast<float>(drow[c]);
          }
          if (dcap) {
            const acc* crow = dcap + r * BLOCK_K;
            for (c = 0; c < cols; ++c) drow[c] *= crow[c];
          }
        }
        // dK += scale dS^T Q;  dQ += scale dS K
        gemm<acc>(Op::T, Op::N, cols, D, rows, scale, dp, BLOCK_K, qa + row0 * ldq, ldq, acc(1), dk_part, D);
        gemm<acc>(Op::N, Op::N, rows, D, cols, scale, dp, BLOCK_K, ka + key0 * ldk, ldk, acc(1), dqa + row0 * D,
                  D);
      };
      // Causal or windowed pairs are done in panels of PANEL_Q rows, each over only the
      // keys its rows can see (the masked corner of a diagonal pair is not computed).
      for (int64_t row0 = rows_seen.lo; row0 < rows_seen.hi; row0 += BLOCK_Q) {
        const int64_t rows = std::min(BLOCK_Q, rows_seen.hi - row0);
        if (all_rows_see(p, row0, rows, col0, block_cols)) {
          block_pair(row0, rows, col0, block_cols);
          continue;
        }
        for (int64_t r0 = row0; r0 < row0 + rows; r0 += PANEL_Q) {
          const int64_t r1 = std::min(row0 + rows, r0 + PANEL_Q);
          const KeyRange seen = clip(visible_keys(p, r0, r1), col0, block_cols);
          if (seen.hi > seen.lo) block_pair(r0, r1 - r0, col0 + seen.lo, seen.hi - seen.lo);
        }
      }
      if (group == 1) {
        T* dk_blk = dk + b * p.dk_batch_stride + h * p.dk_head_stride + col0 * p.dk_row_stride;
        T* dv_blk = dv + b * p.dv_batch_stride + h * p.dv_head_stride + col0 * p.dv_row_stride;
        for (int64_t c = 0; c < block_cols; ++c) {
          store_row<T, acc>(dka + c * D, D, acc(1), dk_blk + c * p.dk_row_stride);
          store_row<T, acc>(dva + c * Dv, Dv, acc(1), dv_blk + c * p.dv_row_stride);
        }
      } else {
        std::copy(dka, dka + block_cols * D, dk_heads.get() + (bh * Sk + col0) * D);
        std::copy(dva, dva + block_cols * Dv, dv_heads.get() + (bh * Sk + col0) * Dv);
      }
    }
    T* dq_head = dq + b * p.dq_batch_stride + h * p.dq_head_stride;
    for (int64_t i = 0; i < Sq; ++i) store_row<T, acc>(dqa + i * D, D, acc(1), dq_head + i * p.dq_row_stride);
  };

  for_each_task(
      p.batch * H, [&] { return BwdWorkspace<acc>(p, widen); }, body);

  if (group > 1) {  // dK/dV of a kv head = sum over its query heads, in head order
    at::parallel_for(0, p.batch * Hk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bhk = begin; bhk < end; ++bhk) {
        const int64_t b = bhk / Hk, hk = bhk % Hk;
        const acc* dk0 = dk_heads.get() + (b * H + hk * group) * Sk * D;
        const acc* dv0 = dv_heads.get() + (b * H + hk * group) * Sk * Dv;
        for (int64_t j = 0; j < Sk; ++j) {
          T* dk_row = dk + b * p.dk_batch_stride + hk * p.dk_head_stride + j * p.dk_row_stride;
          T* dv_row = dv + b * p.dv_batch_stride + hk * p.dv_head_stride + j * p.dv_row_stride;
          for (int64_t d = 0; d < D; ++d) {
            acc sum = 0;
            for (int64_t g = 0; g < group; ++g) sum += dk0[(g * Sk + j) * D + d];
            dk_row[d] = static_cast<T>(sum);
          }
          for (int64_t d = 0; d < Dv; ++d) {
            acc sum = 0;
            for (int64_t g = 0; g < group; ++g) sum += dv0[(g * Sk + j) * Dv + d];
            dv_row[d] = static_cast<T>(sum);
          }
        }
      }
    });
  }
}

template void flash_bwd<float>(const FlashBwdParams&);
template void flash_bwd<double>(const FlashBwdParams&);
template void flash_bwd<c10::BFloat16>(const FlashBwdParams&);
template void flash_bwd<c10::Half>(const FlashBwdParams&);

}  // namespace flashattn::cpu
