// Flash attention forward (sm80+): one CTA per (query block, head, sequence), on a 1-D grid
// (grid_pos, flash_common.cuh) sized by the longest sequence; every sequence is addressed
// through seq_view (flash_params.h), so one launch serves dense batches, packed sequences
// (cu_seqlens_q / _k, seqused_k, bottom_right) and paged K / V (block_table: each key row
// looked up, load_kv_tile), KV caches (kv_batch_idx, leftpad_k: seq_view / key_offset) and
// split-KV (flash-decoding: kSplit below, merged by flash_fwd.cu's combine kernel). A CTA
// whose query block starts past its sequence exits.
//
// The Q tile stays in shared memory; K and V tiles stream through shared memory with
// cp.async, interleaved so one load always overlaps compute (the K and V buffers
// alternate as a two-stage pipeline):
//     wait K_n -> issue V_n -> S = Q K_n^T -> online softmax -> wait V_n -> issue K_{n+1} -> O += P V_n
// The split-KV kernel (decoding) issues K_{n+1} right after S instead, before the softmax.
// S and O live in registers (mma.sync m16n8k16, f32 accumulate); each warp owns
// kMT * 16 query rows. Softmax runs in the log2 domain (scale * log2(e) folded in).
// Only key blocks that can hold a visible key are visited; the per-element mask runs
// on blocks that straddle a window edge or the end of the keys.
//
// Bias / bool mask, dropout and paged K / V live in a second instantiation of the kernel
// (kExt), so the plain path keeps its registers: the bias is read from global memory per score
// element (any strides, 0 on broadcast dims), dropout draws Philox4x32-10 per group of
// 4 keys (philox.cuh, the CPU kernel's generator) after the row sum, so the normaliser
// uses the undropped probabilities.
//
// This header holds the kernel templates; flash_fwd_hdim<kD>.cu instantiate them per
// head-dim bucket (so the build parallelises) and flash_fwd.cu dispatches.
#pragma once

#include "flash_fwd_launch.h"

namespace flashattn {
namespace cuda_impl {
namespace {

template <typename T, int kD, int kBM, int kBN, int kWarps, bool kExt = false>
struct FwdTraits {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMT = kBM / (16 * kWarps);  // m16 tiles per warp
  static constexpr int kNT = kBN / 8;              // n8 tiles of S per warp
  static constexpr int kDT = kD / 8;               // n8 tiles of O per warp
  static constexpr int kStride = kD + kPad;
  static constexpr int kSmem = (kBM + 2 * kBN) * kStride * int(sizeof(T));
  // CTAs per SM the register budget is sized for (255 / 128 / 168 registers per thread).
  // The kExt variant (bias / dropout / paged K, V) gets one CTA per SM less where that avoids spills.
  static constexpr int kMinBlocks = kD > 128 ? 1 : (kWarps == 8 ? (kExt ? 1 : 2) : (kExt ? 2 : 3));
  static_assert(kMT >= 1 && kBM == kMT * 16 * kWarps, "bad block M");
  static_assert(kBN % 16 == 0 && kD % 16 == 0, "bad tile");
};

// mma16816_x2 for each of a warp's kMT m tiles: n8 tiles 2 np and 2 np + 1 of acc[mt] +=
// a[mt] times the B fragments b of one ldmatrix_x4.
template <typename T, int kMT, int kN>
__device__ __forceinline__ void mma16816_x2_mt(float (&acc)[kMT][kN][4], int np, const uint32_t (&a)[kMT][4],
                                               const uint32_t (&b)[4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) mma16816_x2<T>(acc[mt][2 * np], acc[mt][2 * np + 1], a[mt], b);
}

// lse (natural log) of a row from its max m (log2 domain) and its total l: -inf for a
// row with no visible key.
__device__ __forceinline__ float row_lse(float m, float l) {
  // (a NaN l, from NaN scores, gives NaN: the max skips NaN, so m may still be -inf there)
  return l != l ? l : (l > 0.f && m != -INFINITY) ? (m + __log2f(l)) * kLn2 : -INFINITY;
}

// kSplit: split-KV (flash-decoding, p.num_splits > 1 splits): the grid has num_splits CTAs
// per query block, CTA `split` attends the split-th of num_splits equal runs of the key
// blocks its query block visits, and writes its normalised O and lse in float32 to the
// workspaces (args.oaccum / lse_accum) for flash_fwd_combine_kernel. Paged K / V as kExt;
// no bias or dropout (the host never splits those).
template <typename T, int kD, int kBM, int kBN, int kWarps, bool kExt, bool kSplit>
__global__ void __launch_bounds__(kWarps * 32, FwdTraits<T, kD, kBM, kBN, kWarps, kExt || kSplit>::kMinBlocks)
    flash_fwd_kernel(const FwdArgs args) {
  using Tr = FwdTraits<T, kD, kBM, kBN, kWarps, kExt || kSplit>;
  static_assert(!(kExt && kSplit), "the split-KV kernel has no bias / dropout");
  constexpr bool kPaged = kExt || kSplit;
  constexpr int kThreads = Tr::kThreads, kMT = Tr::kMT, kNT = Tr::kNT, kDT = Tr::kDT, kStride = Tr::kStride;
  const FlashParams& p = args.p;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * kStride;
  T* sV = sK + kBN * kStride;

  // Grid blocks per (b, h): query blocks, times the key splits when splitting.
  const int64_t n_mblocks = (p.seqlen_q + kBM - 1) / kBM * (kSplit ? p.num_splits : 1);
  const GridPos pos = grid_pos(n_mblocks, p.num_heads);
  const int m_block = kSplit ? pos.block / static_cast<int>(p.num_splits) : pos.block, h = pos.h, b = pos.b;
  const SeqView s = seq_view(p, b);
  const int m0 = m_block * kBM;
  if (m0 >= s.seqlen_q) return;  // the grid covers the longest sequence
  const auto [warp, lane, g, t4] = lane_ids();
  const auto [Sq, Sk, D, Dv, q_base, k_base, v_base] = head_view<T>(p, s, h, args.heads_per_kv);
  // b again for paged K / V tiles, re-read rather than kept live across the main loop.
  const auto seq_b = [&] { return grid_pos(n_mblocks, p.num_heads).b; };

  const Window win = seq_window(p, s);
  const int m_last = min(m0 + kBM, Sq) - 1;
  // The key blocks holding a key that some row of this block can see: [lo(m0), hi(m_last)).
  auto [nb_begin, nb_end] = block_range<kBN>(win.lo(m0), win.hi(m_last));
  if constexpr (kSplit) {  // this CTA's run of [nb_begin, nb_end): ceil(count / splits) blocks
    const int ns = static_cast<int>(p.num_splits), split = pos.block - m_block * ns;
    const int per = (nb_end - nb_begin + ns - 1) / ns;
    const int lo = min(nb_begin + split * per, nb_end);
    nb_end = min(lo + per, nb_end);
    nb_begin = lo;
  }

  // Per-row visible keys [j_lo, j_hi) of this thread's rows (row g and g + 8 of each m tile).
  const int warp_row0 = warp * kMT * 16;
  int j_lo[kMT][2], j_hi[kMT][2];
  float slope_log2 = 0.f;
  if (p.alibi_slopes != nullptr) slope_log2 = p.alibi_slopes[b * p.alibi_batch_stride + h] * kLog2e;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = m0 + warp_row0 + mt * 16 + g + 8 * r;
      j_lo[mt][r] = clamp_int(win.lo(i));
      j_hi[mt][r] = clamp_int(win.hi(i));
    }
  }

  // Prologue: Q, and the first K block.
  load_tile<T, kBM, kD, kThreads>(sQ, q_base + m0 * p.q_row_stride, p.q_row_stride, Sq - m0, D, args.vec_q);
  if (nb_begin < nb_end) {
    const int n0 = nb_begin * kBN;
    load_kv_tile<T, kBN, kD, kThreads, kPaged>(sK, k_base, p, seq_b, n0, p.k_batch_stride, p.k_row_stride, Sk - n0, D,
                                       args.vec_k);
  }
  cp_async_commit();

  float acc_o[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  const bool has_softcap = p.softcap > 0.f;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const int64_t off = s.diag_offset;
  const int64_t bias_base = int64_t(b) * p.bias_batch_stride + int64_t(h) * p.bias_head_stride;
  const int64_t drop_row0 = s.lse_row + h * lse_head_stride(p);

  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int n0 = nb * kBN;
    cp_async_wait<0>();
    __syncthreads();  // K_nb (and Q) landed; every warp is done with V_{nb-1}
    load_kv_tile<T, kBN, kD, kThreads, kPaged>(sV, v_base, p, seq_b, n0, p.v_batch_stride, p.v_row_stride, Sk - n0, Dv,
                                       args.vec_v);
    cp_async_commit();

    // S = Q K^T
    float acc_s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], sQ + a_off(lane, warp_row0 + mt * 16, ks * 16, kStride));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, sK + bn_off(lane, np * 16, ks * 16, kStride));
        mma16816_x2_mt<T>(acc_s, np, a, bb);
      }
    }
    if constexpr (kSplit) {
      // Split-KV (decoding, bandwidth-bound): K_{nb+1} goes out as soon as every warp is
      // done with K_nb, so two tiles are in flight during the softmax instead of one.
      __syncthreads();
      if (nb + 1 < nb_end) {
        const int n1 = n0 + kBN;
        load_kv_tile<T, kBN, kD, kThreads, kPaged>(sK, k_base, p, seq_b, n1, p.k_batch_stride, p.k_row_stride,
                                                   Sk - n1, D, args.vec_k);
      }
      cp_async_commit();
    }

    // Scores in the log2 domain, masks. A block needs the element mask unless every
    // (row, key) pair of it is visible.
    const bool full = (n0 + kBN <= Sk) && (p.window_left < 0 || n0 >= int64_t(m_last) + off - p.window_left) &&
                      (p.window_right < 0 || int64_t(n0) + kBN - 1 <= int64_t(m0) + off + p.window_right);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float x = acc_s[mt][nt][e];
          if (has_softcap) {
            x = args.cap_out * softcap_tanh(x * args.cap_in);
          } else {
            x *= args.scale_log2;
          }
          const int j = n0 + nt * 8 + 2 * t4 + (e & 1);
          if (has_alibi) {
            const int64_t i = m0 + warp_row0 + mt * 16 + g + 8 * r;
            const int64_t dist = i + off - j;
            x -= slope_log2 * static_cast<float>(dist < 0 ? -dist : dist);
          }
          if constexpr (kExt) {
            if (p.bias != nullptr) {
              const int i = m0 + warp_row0 + mt * 16 + g + 8 * r;
              if (i < Sq && j < Sk) x = add_bias_log2<T>(p, bias_base, i, j, x);
            }
          }
          if (!full && (j < j_lo[mt][r] || j >= j_hi[mt][r])) x = -INFINITY;
          acc_s[mt][nt][e] = x;
        }
      }
    }

    // Online softmax (rows g and g + 8; a row's 4 owners are lanes 4g..4g+3).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * r], acc_s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = fast_exp2(row_max[mt][r] - m_use);
        row_max[mt][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const float p0 = fast_exp2(acc_s[mt][nt][2 * r] - m_use);
          const float p1 = fast_exp2(acc_s[mt][nt][2 * r + 1] - m_use);
          acc_s[mt][nt][2 * r] = p0;
          acc_s[mt][nt][2 * r + 1] = p1;
          sum += p0 + p1;
        }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
        if constexpr (kExt) {
          if (p.dropout_p > 0.f) {
            // Columns 2 t4, 2 t4 + 1 of each n8 tile: key group (n0 + 8 nt) / 4 + t4 / 2,
            // lanes 2 (t4 & 1) and 2 (t4 & 1) + 1.
            const int64_t row = drop_row0 + m0 + warp_row0 + mt * 16 + g + 8 * r;
            const int lane0 = 2 * (t4 & 1);
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
              uint32_t d[4];
              args.drop.draws(row, (n0 + nt * 8) / 4 + (t4 >> 1), d);
              acc_s[mt][nt][2 * r] *= args.drop.factor(d, lane0);
              acc_s[mt][nt][2 * r + 1] *= args.drop.factor(d, lane0 + 1);
            }
          }
        }
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          acc_o[mt][dt][2 * r] *= alpha;
          acc_o[mt][dt][2 * r + 1] *= alpha;
        }
      }
    }

    if constexpr (kSplit) {
      cp_async_wait<1>();  // V_nb landed (K_{nb+1}, the newest group, may still be in flight)
      __syncthreads();
    } else {
      cp_async_wait<0>();
      __syncthreads();  // V_nb landed; every warp is done reading K_nb
      if (nb + 1 < nb_end) {
        const int n1 = n0 + kBN;
        load_kv_tile<T, kBN, kD, kThreads, kPaged>(sK, k_base, p, seq_b, n1, p.k_batch_stride, p.k_row_stride, Sk - n1,
                                                   D, args.vec_k);
      }
      cp_async_commit();
    }

    // O += P V
#pragma unroll
    for (int kt = 0; kt < kBN / 16; ++kt) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pack_a<T>(a[mt], acc_s[mt][2 * kt], acc_s[mt][2 * kt + 1]);
      }
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, sV + bk_off(lane, kt * 16, dp * 16, kStride));
        mma16816_x2_mt<T>(acc_o, dp, a, bb);
      }
    }
  }

  // Epilogue: normalise, write lse and O. Split-KV: O (normalised) and lse of this split,
  // float32, straight from the registers to the workspaces; otherwise O is staged through
  // this warp's own rows of sQ.
  cp_async_wait<0>();
  __syncthreads();
  // Position and sequence re-derived (not kept live across the main loop: registers).
  const GridPos epos = grid_pos(n_mblocks, p.num_heads);
  const SeqView es = seq_view(p, epos.b);
  const int ns = kSplit ? static_cast<int>(p.num_splits) : 1, em_block = epos.block / ns;
  const int em0 = em_block * kBM, eSq = static_cast<int>(es.seqlen_q);
  // Split: the workspace row (lse_accum, oaccum) of the block's first row, in this split's rows.
  const int64_t row0 = int64_t(epos.block - em_block * ns) * lse_rows(p) + es.lse_row +
                       epos.h * lse_head_stride(p) + em0;
  // Not split: lse of the sequence at head h.
  float* lse = static_cast<float*>(p.lse) + es.lse_row + epos.h * lse_head_stride(p);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      // A row that sees no key (l = 0) is written as 0: its acc holds 0 x V, NaN beside an
      // infinite V, so it is replaced rather than scaled. (A NaN l, from a NaN score, is
      // not 0: that row stays NaN, as on the CPU and in Triton.)
      const bool seen = l != 0.f;
      const float inv = 1.f / l;  // (used only where seen)
      const auto o_of = [&](float a) { return seen ? a * inv : 0.f; };
      const int row = warp_row0 + mt * 16 + g + 8 * r;
      if constexpr (kSplit) {
        if (em0 + row < eSq) {
          if (t4 == 0) args.lse_accum[row0 + row] = row_lse(row_max[mt][r], l);
          float* o = args.oaccum + (row0 + row) * args.oaccum_row + 2 * t4;
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            *reinterpret_cast<float2*>(o + dt * 8) =
                make_float2(o_of(acc_o[mt][dt][2 * r]), o_of(acc_o[mt][dt][2 * r + 1]));
          }
        }
      } else {
        if (t4 == 0 && em0 + row < eSq) lse[em0 + row] = row_lse(row_max[mt][r], l);
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          *reinterpret_cast<uint32_t*>(sQ + row * kStride + dt * 8 + 2 * t4) =
              Elem<T>::pack(o_of(acc_o[mt][dt][2 * r]), o_of(acc_o[mt][dt][2 * r + 1]));
        }
      }
    }
  }
  if constexpr (kSplit) return;
  __syncthreads();
  T* o_base = static_cast<T*>(p.out) + epos.b * p.o_batch_stride + (es.q_start + em0) * p.o_row_stride +
              epos.h * p.o_head_stride;
  store_tile<T, kBM, kD, kThreads>(o_base, sQ, p.o_row_stride, eSq - em0, Dv, args.vec_o);
}

template <typename T, int kD, int kBM, int kBN, int kWarps, bool kExt, bool kSplit>
cudaError_t launch_fwd_kernel(const FwdArgs& args, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD, kBM, kBN, kWarps, kExt || kSplit>;
  static_assert(Tr::kSmem == (kSplit ? cfg::fwd_split_smem(kD) : cfg::fwd_smem(kD)),
                "flash_configs.h must describe this launch");
  auto kernel = flash_fwd_kernel<T, kD, kBM, kBN, kWarps, kExt, kSplit>;
  static SmemAttribute smem_attr;
  cudaError_t e = smem_attr.ensure(reinterpret_cast<const void*>(kernel), Tr::kSmem);
  if (e != cudaSuccess) return e;
  const FlashParams& p = args.p;
  const unsigned grid = grid_1d((p.seqlen_q + kBM - 1) / kBM * (kSplit ? p.num_splits : 1), p.batch, p.num_heads);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int kD, int kBM, int kBN, int kWarps>
cudaError_t launch_fwd(const FwdArgs& args, cudaStream_t stream) {
  if (args.p.num_splits > 1) {  // (flash_fwd_num_splits never splits with a bias or dropout)
    if (args.p.bias != nullptr || args.p.dropout_p > 0.f) return cudaErrorInvalidValue;
    constexpr cfg::Fwd s = cfg::fwd_split(kD);
    return launch_fwd_kernel<T, kD, s.bm, s.bn, s.warps, false, true>(args, stream);
  }
  if (args.p.bias != nullptr || args.p.dropout_p > 0.f || args.p.block_table != nullptr) {
    return launch_fwd_kernel<T, kD, kBM, kBN, kWarps, true, false>(args, stream);
  }
  return launch_fwd_kernel<T, kD, kBM, kBN, kWarps, false, false>(args, stream);
}

}  // namespace

// Block sizes per head-dim bucket: cfg::fwd, and cfg::fwd_split when split (flash_configs.h).
template <typename T, int kD>
cudaError_t run_fwd_hdim(const FwdArgs& args, cudaStream_t stream) {
  static_assert(kD == 32 || kD == 64 || kD == 96 || kD == 128 || kD == 256,
                "head-dim bucket must be 32, 64, 96, 128 or 256");
  constexpr cfg::Fwd c = cfg::fwd(kD);
  return launch_fwd<T, kD, c.bm, c.bn, c.warps>(args, stream);
}

}  // namespace cuda_impl
}  // namespace flashattn
