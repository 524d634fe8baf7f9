// Flash attention backward (sm80+). Every sequence is addressed through seq_view
// (flash_params.h): dense batches and packed sequences (cu_seqlens_q / _k, seqused_k,
// bottom_right) in one launch; not paged K / V (run_flash_bwd refuses a block table).
// Per-row workspaces (delta, dq_accum) are indexed like lse (lse_rows). Three steps:
//   1. preprocess: delta[lse row] = sum_d dO * O (float32), dq_accum zeroed.
//   2. main kernel, one CTA per (64-key block, query head, sequence) on a 1-D grid (grid_pos,
//      flash_common.cuh) sized by the longest sequence, exiting when its block starts past
//      its sequence's keys (those dk / dv rows are left to the caller, flash_api.h): K, V
//      stay in shared
//      memory; Q, dO, lse, delta of each visible query block stream through (cp.async,
//      dO and Q in separate groups so the next block's loads overlap the dQ product).
//      Each warp owns 16 key rows and works on transposed scores:
//          dP^T = V dO^T,  S^T = K Q^T,  P^T = exp2(S^T - lse),  dS^T = P^T (dP^T - delta)
//          dV += P^T dO,   dK += dS^T Q  (registers, f32)
//      dS^T goes to shared memory, and dQ_blk = dS K is added with atomicAdd into the
//      float32 dq_accum, later scaled and converted (step 3).
//      For head dim 256 two warps share 16 key rows, each owning half of dK / dV's
//      columns (they both compute the 16 x 64 scores), keeping accumulators in registers.
//   deterministic: the main kernel skips dQ; a separate kernel (one CTA per query block,
//   looping over key blocks with double-buffered K / V) computes dQ without atomics.
//   Bias / bool mask / dropout / dbias: second instantiations (kExt) of both kernels.
//   With Z the scaled keep mask (Philox, philox.cuh, the forward's draws):
//          dV += (P∘Z)^T dO,  dP = (dO V^T)∘Z,  dS = P∘(dP - delta);
//   dbias (float32 (B, H, Sq, Sk)) = dS before the softcap derivative, written by the
//   main kernel for every (query, key) pair of the blocks it visits.
//
// This header holds the kernel templates of steps 2 and 3; flash_bwd_hdim<kD>_<dtype>.cu
// instantiate them per head-dim bucket and dtype (so the build parallelises), and
// flash_bwd.cu holds step 1 and the dispatch.
#pragma once

#include "flash_bwd_launch.h"

namespace flashattn {
namespace cuda_impl {
namespace {

// A score x = q . k in the log2 domain: softcapped, th its tanh (the softcap's derivative
// needs it), or scaled (th untouched).
__device__ __forceinline__ float score_log2(const BwdArgs& args, bool has_softcap, float x, float& th) {
  if (has_softcap) {
    th = softcap_tanh(x * args.cap_in);
    return args.cap_out * th;
  }
  return x * args.scale_log2;
}

// dO at the sequence's row 0 and head h; row0, the lse row of its query 0 (lse, delta,
// dq_accum, dbias and the dropout draws count rows from it), and lse and delta there.
template <typename T>
struct BwdRows {
  const T* dout;
  int64_t row0;
  const float *lse, *dsum;
};
template <typename T>
__device__ __forceinline__ BwdRows<T> bwd_rows(const BwdArgs& args, const SeqView& s, int b, int h) {
  const FlashBwdParams& p = args.p;
  const int64_t row0 = s.lse_row + h * lse_head_stride(p);
  return BwdRows<T>{
      static_cast<const T*>(p.dout) + b * p.do_batch_stride + s.q_start * p.do_row_stride + h * p.do_head_stride,
      row0, static_cast<const float*>(p.lse) + row0, args.dsum + row0};
}

// lse (log2 domain, +inf for rows past Sq or with no visible key so P = 0) and delta of
// query rows [m0, m0 + n) into shared memory.
template <int kN, int kThreads>
__device__ __forceinline__ void load_row_stats(float* sLse, float* sDelta, const float* lse, const float* dsum,
                                               int m0, int Sq) {
  for (int idx = threadIdx.x; idx < kN; idx += kThreads) {
    const int i = m0 + idx;
    float l = i < Sq ? lse[i] : -INFINITY;
    sLse[idx] = l == -INFINITY ? INFINITY : l * kLog2e;
    sDelta[idx] = i < Sq ? dsum[i] : 0.f;
  }
}

template <typename T, int kD, int kBM, int kBN, int kWarps, int kDSplit>
struct BwdTraits {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStride = kD + kPad;
  static constexpr int kSStride = kBM + kPad;
  static constexpr int kSmem = (2 * kBN + 2 * kBM) * kStride * int(sizeof(T)) + kBN * kSStride * int(sizeof(T)) +
                               2 * kBM * int(sizeof(float));
  static_assert(kBN == 16 * (kWarps / kDSplit), "each row group of warps owns 16 key rows");
  static_assert(kWarps % (kBM / 16) == 0, "dQ tiles must divide among warps");
};

// ---------------------------------------------------------------------------------
// Step 2: dK, dV (and dQ via atomics).
template <typename T, int kD, int kBM, int kBN, int kWarps, int kDSplit, bool kExt>
// minBlocks 1: without it ptxas caps some instantiations at 168 registers (three CTAs of
// 128 threads per SM) and spills; the graph-safe dropout loads (Dropout::draws) and the
// 1-D grid pushed several just past that (benchmarks/RESULTS.md, issue 19).
__global__ void __launch_bounds__(kWarps * 32, 1) flash_bwd_kernel(const BwdArgs args) {
  using Tr = BwdTraits<T, kD, kBM, kBN, kWarps, kDSplit>;
  constexpr int kThreads = Tr::kThreads, kStride = Tr::kStride, kSStride = Tr::kSStride;
  constexpr int kDP = kD / kDSplit;  // dK / dV columns of one warp
  constexpr int kST = kBM / 8;       // n8 tiles of S^T (query columns)
  const FlashBwdParams& p = args.p;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * kStride;
  T* sQ = sV + kBN * kStride;
  T* sdO = sQ + kBM * kStride;
  T* sdS = sdO + kBM * kStride;  // dS^T, [key][query]
  float* sLse = reinterpret_cast<float*>(sdS + kBN * kSStride);
  float* sDelta = sLse + kBM;

  const int64_t n_nblocks = (p.seqlen_k + kBN - 1) / kBN;
  const GridPos pos = grid_pos(n_nblocks, p.num_heads);
  const int n_block = pos.block, h = pos.h, b = pos.b;
  const SeqView s = seq_view(p, b);
  const int n0 = n_block * kBN;
  if (n0 >= s.seqlen_k) return;  // the grid covers the longest sequence
  const auto [warp, lane, g, t4] = lane_ids();
  const int rg = warp / kDSplit, dpart = warp % kDSplit;
  const auto [Sq, Sk, D, Dv, q_base, k_base, v_base] = head_view<T>(p, s, h, args.heads_per_kv);
  // The sequence again inside the main loop, re-derived (dense: the params; packed:
  // cu_seqlens reads, L1 hits) rather than its lengths and diagonal held in registers
  // across it: the kernel sits at its register cap.
  const auto seq_now = [&] { return seq_view(p, grid_pos(n_nblocks, p.num_heads).b); };
  const bool compute_dq = !p.deterministic;
  const auto [do_base, row0, lse, dsum] = bwd_rows<T>(args, s, b, h);

  const Window win = seq_window(p, s);
  const int n_last = min(n0 + kBN, Sk) - 1;
  // The query blocks holding a query that can see some key of this block.
  const auto [mb_begin, mb_end] = block_range<kBM>(win.qlo(n0), win.qhi(n_last));

  // This thread's key rows (g, g + 8 of the warp's 16): the queries [q_lo, q_hi) that see them.
  int q_lo[2], q_hi[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = n0 + rg * 16 + g + 8 * r;
    q_lo[r] = clamp_int(win.qlo(j));
    q_hi[r] = j < Sk ? clamp_int(win.qhi(j)) : 0;
  }
  float slope_log2 = 0.f;
  if (p.alibi_slopes != nullptr) slope_log2 = p.alibi_slopes[b * p.alibi_batch_stride + h] * kLog2e;
  const bool has_softcap = p.softcap > 0.f;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const int off = clamp_int(s.diag_offset);  // only ALiBi reads it (q_lo, q_hi hold the window)

  // Prologue: group 0 = K, V, dO of the first block; group 1 = Q of the first block.
  load_tile<T, kBN, kD, kThreads>(sK, k_base + n0 * p.k_row_stride, p.k_row_stride, Sk - n0, D, args.vec_k);
  load_tile<T, kBN, kD, kThreads>(sV, v_base + n0 * p.v_row_stride, p.v_row_stride, Sk - n0, Dv, args.vec_v);
  if (mb_begin < mb_end) {
    const int m0 = mb_begin * kBM;
    load_tile<T, kBM, kD, kThreads>(sdO, do_base + m0 * p.do_row_stride, p.do_row_stride, Sq - m0, Dv, args.vec_do);
  }
  cp_async_commit();
  if (mb_begin < mb_end) {
    const int m0 = mb_begin * kBM;
    load_tile<T, kBM, kD, kThreads>(sQ, q_base + m0 * p.q_row_stride, p.q_row_stride, Sq - m0, D, args.vec_q);
    load_row_stats<kBM, kThreads>(sLse, sDelta, lse, dsum, m0, Sq);
  }
  cp_async_commit();

  float acc_dk[kDP / 8][4], acc_dv[kDP / 8][4];
#pragma unroll
  for (int dt = 0; dt < kDP / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[dt][e] = acc_dv[dt][e] = 0.f;

  for (int mb = mb_begin; mb < mb_end; ++mb) {
    const int m0 = mb * kBM;
    cp_async_wait<1>();
    __syncthreads();  // dO (and K, V) landed

    // dP^T = V dO^T  (16 key rows x kBM queries)
    float acc_dp[kST][4];
    float acc_s[kST][4];
#pragma unroll
    for (int nt = 0; nt < kST; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dp[nt][e] = acc_s[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, sV + a_off(lane, rg * 16, ks * 16, kStride));
#pragma unroll
      for (int np = 0; np < kST / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, sdO + bn_off(lane, np * 16, ks * 16, kStride));
        mma16816_x2<T>(acc_dp[2 * np], acc_dp[2 * np + 1], a, bb);
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // Q, lse, delta landed

    // S^T = K Q^T
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, sK + a_off(lane, rg * 16, ks * 16, kStride));
#pragma unroll
      for (int np = 0; np < kST / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, sQ + bn_off(lane, np * 16, ks * 16, kStride));
        mma16816_x2<T>(acc_s[2 * np], acc_s[2 * np + 1], a, bb);
      }
    }

    // P^T and dS^T, elementwise. A block needs the element mask unless every (query, key)
    // pair of it is visible: from the sequence re-derived (kExt), or per thread from its key
    // rows' query ranges (plain; keys past the sequence have q_hi = 0). Each form is the
    // one that keeps that variant's spills down.
    bool full;
    if constexpr (kExt) {
      const SeqView sn = seq_now();
      full = (n0 + kBN <= sn.seqlen_k) &&
             (p.window_left < 0 || int64_t(n0) >= int64_t(m0) + kBM - 1 + sn.diag_offset - p.window_left) &&
             (p.window_right < 0 || int64_t(n0) + kBN - 1 <= int64_t(m0) + sn.diag_offset + p.window_right);
    } else {
      full = q_lo[0] <= m0 && q_lo[1] <= m0 && q_hi[0] >= m0 + kBM && q_hi[1] >= m0 + kBM;
    }
    // The bias offset of (b, h), per block from the position re-derived (not held across the
    // loop: registers).
    int64_t bias_base = 0;
    if constexpr (kExt) {
      const GridPos bp = grid_pos(n_nblocks, p.num_heads);
      bias_base = int64_t(bp.b) * p.bias_batch_stride + int64_t(bp.h) * p.bias_head_stride;
    }
#pragma unroll
    for (int nt = 0; nt < kST; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int il = nt * 8 + 2 * t4 + (e & 1);
        const int i = m0 + il;
        float th = 0.f;
        float x = score_log2(args, has_softcap, acc_s[nt][e], th);
        if (has_alibi) {
          const int dist = i + off - (n0 + rg * 16 + g + 8 * r);
          x -= slope_log2 * static_cast<float>(dist < 0 ? -dist : dist);
        }
        if constexpr (kExt) {
          const int j = n0 + rg * 16 + g + 8 * r;
          // (dense lengths: a bias never comes with packed sequences)
          if (p.bias != nullptr && i < p.seqlen_q && j < p.seqlen_k) x = add_bias_log2<T>(p, bias_base, i, j, x);
          if (!full && (i < q_lo[r] || i >= q_hi[r])) x = -INFINITY;
          const float pr = fast_exp2(x - sLse[il]);
          float z = 1.f;
          if (p.dropout_p > 0.f) z = args.drop.factor_of(row0 + i, j);
          // a row that sees no key (sLse +inf) gets dS 0, not 0 x the dP of an infinite V
          float ds = sLse[il] == INFINITY ? 0.f : pr * (acc_dp[nt][e] * z - sDelta[il]);
          if (p.dbias != nullptr && dpart == 0 && i < p.seqlen_q && j < p.seqlen_k) {
            p.dbias[(row0 + i) * p.seqlen_k + j] = ds;  // dense: row0 = (b * H + h) * Sq
          }
          if (has_softcap) ds *= 1.f - th * th;
          acc_s[nt][e] = pr * z;
          acc_dp[nt][e] = ds;
        } else {
          if (!full && (i < q_lo[r] || i >= q_hi[r])) x = -INFINITY;
          const float pr = fast_exp2(x - sLse[il]);
          float ds = sLse[il] == INFINITY ? 0.f : pr * (acc_dp[nt][e] - sDelta[il]);
          if (has_softcap) ds *= 1.f - th * th;
          acc_s[nt][e] = pr;
          acc_dp[nt][e] = ds;
        }
      }
    }

    // dV += P^T dO, dK += dS^T Q  (k = the kBM queries)
#pragma unroll
    for (int kt = 0; kt < kBM / 16; ++kt) {
      uint32_t ap[4], ad[4];
      pack_a<T>(ap, acc_s[2 * kt], acc_s[2 * kt + 1]);
      pack_a<T>(ad, acc_dp[2 * kt], acc_dp[2 * kt + 1]);
      if (compute_dq && dpart == 0) {
        T* dst = sdS + (rg * 16 + g) * kSStride + kt * 16 + 2 * t4;
        *reinterpret_cast<uint32_t*>(dst) = ad[0];
        *reinterpret_cast<uint32_t*>(dst + 8 * kSStride) = ad[1];
        *reinterpret_cast<uint32_t*>(dst + 8) = ad[2];
        *reinterpret_cast<uint32_t*>(dst + 8 * kSStride + 8) = ad[3];
      }
#pragma unroll
      for (int dp = 0; dp < kDP / 16; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, sdO + bk_off(lane, kt * 16, dpart * kDP + dp * 16, kStride));
        mma16816_x2<T>(acc_dv[2 * dp], acc_dv[2 * dp + 1], ap, bb);
        ldmatrix_x4_trans(bb, sQ + bk_off(lane, kt * 16, dpart * kDP + dp * 16, kStride));
        mma16816_x2<T>(acc_dk[2 * dp], acc_dk[2 * dp + 1], ad, bb);
      }
    }

    __syncthreads();  // everyone is done with sdO, sQ, sLse, sDelta; sdS is complete
    // The next block's dO and Q: do_base / q_base re-derived here from the position and
    // sequence (as the prologue's), not held across the loop (registers).
    if (mb + 1 < mb_end) {
      const int m1 = m0 + kBM;
      const GridPos gp = grid_pos(n_nblocks, p.num_heads);
      const SeqView sn = seq_view(p, gp.b);
      const int sq_now = static_cast<int>(sn.seqlen_q);
      const T* do_now = static_cast<const T*>(p.dout) + gp.b * p.do_batch_stride + sn.q_start * p.do_row_stride +
                        gp.h * p.do_head_stride;
      load_tile<T, kBM, kD, kThreads>(sdO, do_now + m1 * p.do_row_stride, p.do_row_stride, sq_now - m1, Dv,
                                      args.vec_do);
    }
    cp_async_commit();
    if (mb + 1 < mb_end) {
      const int m1 = m0 + kBM;
      const GridPos gp = grid_pos(n_nblocks, p.num_heads);
      const SeqView sn = seq_view(p, gp.b);
      const int sq_now = static_cast<int>(sn.seqlen_q);
      const T* q_now = static_cast<const T*>(p.q) + sn.q_offset + gp.h * p.q_head_stride;
      load_tile<T, kBM, kD, kThreads>(sQ, q_now + m1 * p.q_row_stride, p.q_row_stride, sq_now - m1, D, args.vec_q);
      load_row_stats<kBM, kThreads>(sLse, sDelta, lse, dsum, m1, sq_now);
    }
    cp_async_commit();

    // dQ_blk (kBM x kD) = dS (kBM x kBN) K (kBN x kD), added atomically in float32.
    if (compute_dq) {
      constexpr int kITiles = kBM / 16;
      constexpr int kDGroups = kWarps / kITiles;
      constexpr int kDQ = kD / kDGroups;
      constexpr int kCW = kDQ % 32 == 0 ? 32 : 16;  // columns per chunk
      static_assert(kDQ % kCW == 0, "dQ column chunks");
      const int it = warp % kITiles, dg = warp / kITiles;
      const int sq_now = static_cast<int>(seq_now().seqlen_q);
#pragma unroll
      for (int c = 0; c < kDQ / kCW; ++c) {
        const int dbase = dg * kDQ + c * kCW;
        if (dbase >= D) break;
        float acc[kCW / 8][4];
#pragma unroll
        for (int nt = 0; nt < kCW / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
        for (int kt = 0; kt < kBN / 16; ++kt) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, sdS + at_off(lane, kt * 16, it * 16, kSStride));
#pragma unroll
          for (int dp = 0; dp < kCW / 16; ++dp) {
            uint32_t bb[4];
            ldmatrix_x4_trans(bb, sK + bk_off(lane, kt * 16, dbase + dp * 16, kStride));
            mma16816_x2<T>(acc[2 * dp], acc[2 * dp + 1], a, bb);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = m0 + it * 16 + g + 8 * r;
          if (i >= sq_now) continue;
          float* row = args.dq_accum + (row0 + i) * D;  // from row0 (no dq_acc pointer held)
#pragma unroll
          for (int nt = 0; nt < kCW / 8; ++nt) {
            const int d = dbase + nt * 8 + 2 * t4;
            if (d < D) atomicAdd(row + d, acc[nt][2 * r]);
            if (d + 1 < D) atomicAdd(row + d + 1, acc[nt][2 * r + 1]);
          }
        }
      }
    }
  }

  // Epilogue: dK * scale and dV, staged through sK / sV, written at query head h.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int dt = 0; dt < kDP / 8; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int off_s = (rg * 16 + g + 8 * r) * kStride + dpart * kDP + dt * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(sK + off_s) =
          Elem<T>::pack(acc_dk[dt][2 * r] * p.scale, acc_dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(sV + off_s) = Elem<T>::pack(acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]);
    }
  }
  __syncthreads();
  // Position and sequence re-derived (not kept live: registers).
  const GridPos epos = grid_pos(n_nblocks, p.num_heads);
  const SeqView es = seq_view(p, epos.b);
  const int64_t en0 = int64_t(epos.block) * kBN, ek = es.k_start + en0;
  const int eSk = static_cast<int>(es.seqlen_k - en0);
  T* dk_base = static_cast<T*>(p.dk) + epos.b * p.dk_batch_stride + epos.h * p.dk_head_stride + ek * p.dk_row_stride;
  T* dv_base = static_cast<T*>(p.dv) + epos.b * p.dv_batch_stride + epos.h * p.dv_head_stride + ek * p.dv_row_stride;
  store_tile<T, kBN, kD, kThreads>(dk_base, sK, p.dk_row_stride, eSk, D, args.vec_dk);
  store_tile<T, kBN, kD, kThreads>(dv_base, sV, p.dv_row_stride, eSk, Dv, args.vec_dv);
}

// ---------------------------------------------------------------------------------
// Deterministic dQ: one CTA per query block, each warp owns 16 query rows, K / V
// double-buffered (cp.async), dQ in registers, written once.
template <typename T, int kD, int kBM, int kBN, int kWarps>
struct BwdDqTraits {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStride = kD + kPad;
  static constexpr int kSmem = (2 * kBM + 4 * kBN) * kStride * int(sizeof(T));
  static_assert(kBM == 16 * kWarps, "one m16 tile per warp");
};

template <typename T, int kD, int kBM, int kBN, int kWarps, bool kExt>
// minBlocks 1: without it ptxas caps some instantiations at 168 registers (three CTAs of
// 128 threads per SM) and spills; the graph-safe dropout loads (Dropout::draws) and the
// 1-D grid pushed several just past that (benchmarks/RESULTS.md, issue 19).
__global__ void __launch_bounds__(kWarps * 32, 1) flash_bwd_dq_kernel(const BwdArgs args) {
  using Tr = BwdDqTraits<T, kD, kBM, kBN, kWarps>;
  constexpr int kThreads = Tr::kThreads, kStride = Tr::kStride;
  constexpr int kNT = kBN / 8, kDT = kD / 8;
  const FlashBwdParams& p = args.p;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBM * kStride;
  T* sK0 = sdO + kBM * kStride;  // [2][kBN][kStride]
  T* sV0 = sK0 + 2 * kBN * kStride;

  const int64_t n_mblocks = (p.seqlen_q + kBM - 1) / kBM;
  const GridPos pos = grid_pos(n_mblocks, p.num_heads);
  const int m_block = pos.block, h = pos.h, b = pos.b;
  const SeqView s = seq_view(p, b);
  const int m0 = m_block * kBM;
  if (m0 >= s.seqlen_q) return;  // the grid covers the longest sequence
  const auto [warp, lane, g, t4] = lane_ids();
  const auto [Sq, Sk, D, Dv, q_base, k_base, v_base] = head_view<T>(p, s, h, args.heads_per_kv);
  const auto [do_base, row0, lse, dsum] = bwd_rows<T>(args, s, b, h);

  const Window win = seq_window(p, s);
  const int m_last = min(m0 + kBM, Sq) - 1;
  // The key blocks holding a key that some row of this block can see.
  const auto [nb_begin, nb_end] = block_range<kBN>(win.lo(m0), win.hi(m_last));

  const int warp_row0 = warp * 16;
  int j_lo[2], j_hi[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp_row0 + g + 8 * r;
    j_lo[r] = clamp_int(win.lo(i));
    j_hi[r] = clamp_int(win.hi(i));
    const float l = i < Sq ? lse[i] : -INFINITY;
    lse2[r] = l == -INFINITY ? INFINITY : l * kLog2e;
    delta[r] = i < Sq ? dsum[i] : 0.f;
  }
  float slope_log2 = 0.f;
  if (p.alibi_slopes != nullptr) slope_log2 = p.alibi_slopes[b * p.alibi_batch_stride + h] * kLog2e;
  const bool has_softcap = p.softcap > 0.f;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const int64_t off = s.diag_offset;
  const int64_t bias_base = int64_t(b) * p.bias_batch_stride + int64_t(h) * p.bias_head_stride;

  load_tile<T, kBM, kD, kThreads>(sQ, q_base + m0 * p.q_row_stride, p.q_row_stride, Sq - m0, D, args.vec_q);
  load_tile<T, kBM, kD, kThreads>(sdO, do_base + m0 * p.do_row_stride, p.do_row_stride, Sq - m0, Dv, args.vec_do);
  if (nb_begin < nb_end) {
    const int n0 = nb_begin * kBN;
    load_tile<T, kBN, kD, kThreads>(sK0, k_base + n0 * p.k_row_stride, p.k_row_stride, Sk - n0, D, args.vec_k);
    load_tile<T, kBN, kD, kThreads>(sV0, v_base + n0 * p.v_row_stride, p.v_row_stride, Sk - n0, Dv, args.vec_v);
  }
  cp_async_commit();

  float acc_dq[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[dt][e] = 0.f;

  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int n0 = nb * kBN;
    const int stage = (nb - nb_begin) & 1;
    T* sK = sK0 + stage * kBN * kStride;
    T* sV = sV0 + stage * kBN * kStride;
    cp_async_wait<0>();
    __syncthreads();  // stage ready; every warp is done with the other stage
    if (nb + 1 < nb_end) {
      const int n1 = n0 + kBN;
      T* sK1 = sK0 + (stage ^ 1) * kBN * kStride;
      T* sV1 = sV0 + (stage ^ 1) * kBN * kStride;
      load_tile<T, kBN, kD, kThreads>(sK1, k_base + n1 * p.k_row_stride, p.k_row_stride, Sk - n1, D, args.vec_k);
      load_tile<T, kBN, kD, kThreads>(sV1, v_base + n1 * p.v_row_stride, p.v_row_stride, Sk - n1, Dv, args.vec_v);
    }
    cp_async_commit();

    float acc_s[kNT][4], acc_dp[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[nt][e] = acc_dp[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t aq[4], ad[4];
      ldmatrix_x4(aq, sQ + a_off(lane, warp_row0, ks * 16, kStride));
      ldmatrix_x4(ad, sdO + a_off(lane, warp_row0, ks * 16, kStride));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, sK + bn_off(lane, np * 16, ks * 16, kStride));
        mma16816_x2<T>(acc_s[2 * np], acc_s[2 * np + 1], aq, bb);
        ldmatrix_x4(bb, sV + bn_off(lane, np * 16, ks * 16, kStride));
        mma16816_x2<T>(acc_dp[2 * np], acc_dp[2 * np + 1], ad, bb);
      }
    }

    const bool full = (n0 + kBN <= Sk) && (p.window_left < 0 || n0 >= int64_t(m_last) + off - p.window_left) &&
                      (p.window_right < 0 || int64_t(n0) + kBN - 1 <= int64_t(m0) + off + p.window_right);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int j = n0 + nt * 8 + 2 * t4 + (e & 1);
        float th = 0.f;
        float x = score_log2(args, has_softcap, acc_s[nt][e], th);
        if (has_alibi) {
          const int64_t dist = int64_t(m0 + warp_row0 + g + 8 * r) + off - j;
          x -= slope_log2 * static_cast<float>(dist < 0 ? -dist : dist);
        }
        float z = 1.f;
        if constexpr (kExt) {
          const int i = m0 + warp_row0 + g + 8 * r;
          if (p.bias != nullptr && i < Sq && j < Sk) x = add_bias_log2<T>(p, bias_base, i, j, x);
          if (p.dropout_p > 0.f) z = args.drop.factor_of(row0 + i, j);
        }
        if (!full && (j < j_lo[r] || j >= j_hi[r])) x = -INFINITY;
        const float pr = fast_exp2(x - lse2[r]);
        // a row that sees no key (lse2 +inf) gets dS 0 (hence dq 0), not 0 x an infinite dP
        float ds = lse2[r] == INFINITY ? 0.f : pr * (acc_dp[nt][e] * z - delta[r]);
        if (has_softcap) ds *= 1.f - th * th;
        acc_dp[nt][e] = ds;
      }
    }

    // dQ += dS K
#pragma unroll
    for (int kt = 0; kt < kBN / 16; ++kt) {
      uint32_t a[4];
      pack_a<T>(a, acc_dp[2 * kt], acc_dp[2 * kt + 1]);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, sK + bk_off(lane, kt * 16, dp * 16, kStride));
        mma16816_x2<T>(acc_dq[2 * dp], acc_dq[2 * dp + 1], a, bb);
      }
    }
  }

  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(sQ + (warp_row0 + g + 8 * r) * kStride + dt * 8 + 2 * t4) =
          Elem<T>::pack(acc_dq[dt][2 * r] * p.scale, acc_dq[dt][2 * r + 1] * p.scale);
    }
  }
  __syncthreads();
  // Position and sequence re-derived (not kept live: registers).
  const GridPos epos = grid_pos(n_mblocks, p.num_heads);
  const SeqView es = seq_view(p, epos.b);
  const int64_t em0 = int64_t(epos.block) * kBM;
  T* dq_base = static_cast<T*>(p.dq) + epos.b * p.dq_batch_stride + epos.h * p.dq_head_stride +
               (es.q_start + em0) * p.dq_row_stride;
  store_tile<T, kBM, kD, kThreads>(dq_base, sQ, p.dq_row_stride, static_cast<int>(es.seqlen_q - em0), D,
                                   args.vec_dq);
}

// ---------------------------------------------------------------------------------
// Step 3: dq = dq_accum * scale, in the input dtype, at dq's strides. dq_accum rows are lse
// rows: (b, h, i) dense, (h, row of q) with packed queries, read as batch 1 of total_q rows
// (rows in no sequence get 0, the zeroed accumulator).
template <typename T>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_kernel(const BwdArgs args) {
  const FlashBwdParams& p = args.p;
  const int64_t D = p.head_dim, Sq = p.cu_seqlens_q ? p.total_q : p.seqlen_q, H = p.num_heads;
  const int64_t total = lse_rows(p) * D;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D;
    const int64_t i = (idx / D) % Sq;
    const int64_t h = (idx / (D * Sq)) % H;
    const int64_t b = idx / (D * Sq * H);
    static_cast<T*>(p.dq)[b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride + d] =
        Elem<T>::from_float(args.dq_accum[idx] * p.scale);
  }
}

// ---------------------------------------------------------------------------------
template <typename T, int kD, int kBM, int kBN, int kWarps, int kDSplit, int kQBM, int kQBN, int kQWarps, bool kExt>
cudaError_t launch_bwd_kernels(const BwdArgs& args, cudaStream_t stream) {
  const FlashBwdParams& p = args.p;
  cudaError_t e;
  {
    using Tr = BwdTraits<T, kD, kBM, kBN, kWarps, kDSplit>;
    static_assert(Tr::kSmem == cfg::bwd_smem(kD), "flash_configs.h must describe this launch");
    auto kernel = flash_bwd_kernel<T, kD, kBM, kBN, kWarps, kDSplit, kExt>;
    static SmemAttribute smem_attr;
    if ((e = smem_attr.ensure(reinterpret_cast<const void*>(kernel), Tr::kSmem)) != cudaSuccess) return e;
    const unsigned grid = grid_1d((p.seqlen_k + kBN - 1) / kBN, p.batch, p.num_heads);
    if (p.seqlen_k > 0) {
      if (grid == 0) return cudaErrorInvalidConfiguration;
      kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(args);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
  }
  if (p.seqlen_q == 0) return cudaSuccess;
  if (p.deterministic) {
    using Tr = BwdDqTraits<T, kD, kQBM, kQBN, kQWarps>;
    static_assert(Tr::kSmem == cfg::bwd_dq_smem(kD), "flash_configs.h must describe this launch");
    auto kernel = flash_bwd_dq_kernel<T, kD, kQBM, kQBN, kQWarps, kExt>;
    static SmemAttribute smem_attr;
    if ((e = smem_attr.ensure(reinterpret_cast<const void*>(kernel), Tr::kSmem)) != cudaSuccess) return e;
    const unsigned grid = grid_1d((p.seqlen_q + kQBM - 1) / kQBM, p.batch, p.num_heads);
    if (grid == 0) return cudaErrorInvalidConfiguration;
    kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(args);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  } else {
    const int64_t total = p.batch * p.num_heads * p.seqlen_q * p.head_dim;
    int64_t blocks = (total + 255) / 256;
    if (blocks > 65535 * 8) blocks = 65535 * 8;
    flash_bwd_convert_dq_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(args);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T, int kD, int kBM, int kBN, int kWarps, int kDSplit, int kQBM, int kQBN, int kQWarps>
cudaError_t launch_bwd(const BwdArgs& args, cudaStream_t stream) {
  const FlashBwdParams& p = args.p;
  if (p.bias != nullptr || p.dropout_p > 0.f || p.dbias != nullptr) {
    return launch_bwd_kernels<T, kD, kBM, kBN, kWarps, kDSplit, kQBM, kQBN, kQWarps, true>(args, stream);
  }
  return launch_bwd_kernels<T, kD, kBM, kBN, kWarps, kDSplit, kQBM, kQBN, kQWarps, false>(args, stream);
}

}  // namespace

// Block sizes per head-dim bucket: cfg::bwd (flash_configs.h), <bm, bn, warps, dsplit> of
// the main kernel and <qbm, qbn, qwarps> of the deterministic dQ kernel.
template <typename T, int kD>
cudaError_t run_bwd_hdim(const BwdArgs& args, cudaStream_t stream) {
  static_assert(kD == 32 || kD == 64 || kD == 96 || kD == 128 || kD == 256,
                "head-dim bucket must be 32, 64, 96, 128 or 256");
  constexpr cfg::Bwd c = cfg::bwd(kD);
  return launch_bwd<T, kD, c.bm, c.bn, c.warps, c.dsplit, c.qbm, c.qbn, c.qwarps>(args, stream);
}

}  // namespace cuda_impl
}  // namespace flashattn
