// Flash attention forward: host entry point run_flash_fwd (flash_api.h), which fills the
// kernel arguments and dispatches on dtype and head-dim bucket to the launchers
// instantiated in flash_fwd_hdim*.cu, the split-KV planning (flash_fwd_num_splits) and the
// kernel that combines the splits. Main kernels: flash_fwd_kernel.cuh.
#include <algorithm>
#include <climits>
#include <cmath>

#include "flash_api.h"
#include "flash_common.cuh"
#include "flash_fwd_launch.h"

namespace flashattn {
namespace cuda_impl {
namespace {

template <typename T>
cudaError_t dispatch_fwd(const FwdArgs& args, cudaStream_t stream) {
  const int64_t d = args.p.head_dim > args.p.head_dim_v ? args.p.head_dim : args.p.head_dim_v;
  switch (round_head_dim(d)) {
    case 32: return run_fwd_hdim<T, 32>(args, stream);
    case 64: return run_fwd_hdim<T, 64>(args, stream);
    case 96: return run_fwd_hdim<T, 96>(args, stream);
    case 128: return run_fwd_hdim<T, 128>(args, stream);
    default: return run_fwd_hdim<T, 256>(args, stream);
  }
}

// GQA packing for decoding: with one query per sequence (Sq == 1, dense q) and H = group *
// Hk, the group query heads of KV head hk become the group query rows of one problem
// (B, Sq' = group, H' = Hk): row r of head hk is query head hk * group + r (q / out row
// stride = their head stride, head stride = group of those), so one CTA computes them all
// from one load of K / V instead of each head loading it again. lse (B, H, 1) is already
// the (B, Hk, group) layout. Only when every row sees every key of its sequence (no
// left window; a right window that reaches the last key) and nothing depends on the head
// (ALiBi, bias) or on the row (dropout): then the view drops the window.
FlashParams gqa_decode_view(const FlashParams& p) {
  const int64_t group = p.num_heads_k > 0 ? p.num_heads / p.num_heads_k : 1;
  const bool all_keys =
      p.window_left < 0 && (p.window_right < 0 || (p.bottom_right && p.diag_offset + p.window_right >= 0));
  if (group <= 1 || p.seqlen_q != 1 || p.cu_seqlens_q != nullptr || !all_keys || p.alibi_slopes != nullptr ||
      p.bias != nullptr || p.dropout_p > 0.f) {
    return p;
  }
  FlashParams v = p;
  v.seqlen_q = v.total_q = group;
  v.num_heads = p.num_heads_k;
  v.q_row_stride = p.q_head_stride, v.q_head_stride = group * p.q_head_stride;
  v.o_row_stride = p.o_head_stride, v.o_head_stride = group * p.o_head_stride;
  v.window_left = v.window_right = -1, v.diag_offset = 0;
  return v;
}

// flash-attn 2's num_splits_heuristic: `ctas` CTAs on `slots` concurrent CTA slots. No
// split once they fill 80% of the slots; else the fewest splits whose wave efficiency
// (n_waves / ceil(n_waves)) is within 85% of the best, among split counts that change the
// key blocks per split.
int64_t num_splits_heuristic(int64_t ctas, int64_t slots, int64_t n_kblocks, int64_t max_splits) {
  if (ctas >= 0.8 * slots) return 1;
  max_splits = std::min({max_splits, slots, n_kblocks});
  auto ceildiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  auto eligible = [&](int64_t n) { return n == 1 || ceildiv(n_kblocks, n) != ceildiv(n_kblocks, n - 1); };
  auto efficiency = [&](int64_t n) {
    const double waves = double(ctas * n) / double(slots);
    return waves / std::ceil(waves);
  };
  double best = 0.0;
  for (int64_t n = 1; n <= max_splits; ++n) {
    if (eligible(n)) best = std::max(best, efficiency(n));
  }
  for (int64_t n = 1; n <= max_splits; ++n) {
    if (eligible(n) && efficiency(n) >= 0.85 * best) return n;
  }
  return 1;
}

// Merges the key splits of the split-KV forward: per query row (one warp each, 4 rows per
// CTA, on the 1-D grid of grid_pos), lse = log sum_s exp(lse_s), out = sum_s exp(lse_s -
// lse) O_s (splits without keys, lse_s = -inf, count 0; no keys at all: out 0, lse -inf;
// a NaN lse_s: out and lse NaN).
template <typename T>
__global__ void __launch_bounds__(128) flash_fwd_combine_kernel(const FwdArgs args) {
  constexpr int kRows = 4;
  const FlashParams& p = args.p;
  const GridPos pos = grid_pos((p.seqlen_q + kRows - 1) / kRows, p.num_heads);
  const SeqView s = seq_view(p, pos.b);
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(pos.block) * kRows + (threadIdx.x >> 5);
  if (i >= s.seqlen_q) return;
  const int ns = static_cast<int>(p.num_splits);
  const int64_t rows = lse_rows(p);
  const int64_t idx = s.lse_row + pos.h * lse_head_stride(p) + i;
  const float* lse_s = args.lse_accum + idx;
  // (fmaxf drops a NaN: a split's NaN lse, a NaN score's row, is carried apart so that
  // the row stays NaN, as unsplit)
  float m = -INFINITY;
  bool nan = false;
  for (int sp = lane; sp < ns; sp += 32) {
    const float l = lse_s[sp * rows];
    nan |= l != l;
    m = fmaxf(m, l);
  }
  nan = __any_sync(0xffffffffu, nan);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int sp = lane; sp < ns; sp += 32) sum += __expf(lse_s[sp * rows] - m);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float lse = nan ? __int_as_float(0x7fc00000) : (m != -INFINITY && sum > 0.f) ? m + __logf(sum) : -INFINITY;
  if (lane == 0) static_cast<float*>(p.lse)[idx] = lse;
  T* out = static_cast<T*>(p.out) + pos.b * p.o_batch_stride + (s.q_start + i) * p.o_row_stride +
           pos.h * p.o_head_stride;
  const float* o_s = args.oaccum + idx * args.oaccum_row;
  const int64_t split_stride = rows * args.oaccum_row;
  for (int c = lane; c < p.head_dim_v; c += 32) {
    float acc = 0.f;
    if (lse != -INFINITY) {
      for (int sp = 0; sp < ns; ++sp) {
        const float l = lse_s[sp * rows];
        if (l != -INFINITY) acc += __expf(l - lse) * o_s[sp * split_stride + c];
      }
    }
    out[c] = Elem<T>::from_float(acc);
  }
}

template <typename T>
cudaError_t run_fwd(const FwdArgs& args, cudaStream_t stream) {
  cudaError_t e = dispatch_fwd<T>(args, stream);
  if (e != cudaSuccess || args.p.num_splits <= 1) return e;
  const unsigned grid = grid_1d((args.p.seqlen_q + 3) / 4, args.p.batch, args.p.num_heads);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  flash_fwd_combine_kernel<T><<<grid, 128, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda_impl

int64_t flash_fwd_num_splits(const FlashParams& params, int num_sms) {
  using namespace cuda_impl;
  if (params.num_splits == 1 || params.bias != nullptr || params.dropout_p > 0.f) return 1;
  if (params.batch == 0 || params.seqlen_q == 0 || params.num_heads == 0 || params.num_heads_k <= 0 ||
      lse_rows(params) == 0) {
    return 1;
  }
  const FlashParams p = gqa_decode_view(params);
  const int d = round_head_dim(p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v);
  const cfg::Fwd c = cfg::fwd_split(d);  // (the blocks of the kernel that runs when split)
  const int64_t n_kblocks = (p.seqlen_k + c.bn - 1) / c.bn;
  const int64_t ctas = p.batch * p.num_heads * ((p.seqlen_q + c.bm - 1) / c.bm);
  // Capped by the key blocks (a split without any is wasted) and the 1-D grid.
  const int64_t cap = std::min({n_kblocks, kMaxFwdSplits, int64_t(INT_MAX) / std::max<int64_t>(ctas, 1)});
  if (cap <= 1) return 1;
  if (params.num_splits > 1) return std::min(params.num_splits, cap);
  // Concurrent CTAs: the split kernel runs 2 per SM up to head dim 128 on sm90 (flash-attn 2
  // also counts 2 per SM), 1 above. Its shared memory fits only 1 per SM at D = 128 on sm80
  // and at D = 96 / 128 on sm86 / sm89 (flash_configs.h): counted as 2 there too, which splits
  // more than needed (speed only; unmeasured there).
  const int64_t slots = int64_t(std::max(num_sms, 1)) * (d > 128 ? 1 : 2);
  return num_splits_heuristic(ctas, slots, n_kblocks, cap);
}

cudaError_t run_flash_fwd(const FlashParams& params, bool is_bf16, cudaStream_t stream, float* oaccum,
                          float* lse_accum) {
  using namespace cuda_impl;
  if (params.batch == 0 || params.seqlen_q == 0 || params.num_heads == 0) return cudaSuccess;
  if (params.head_dim > 256 || params.head_dim_v > 256 || params.num_heads_k <= 0) return cudaErrorInvalidValue;
  if (params.num_splits > 1 && (oaccum == nullptr || lse_accum == nullptr)) return cudaErrorInvalidValue;
  FwdArgs args;
  args.p = gqa_decode_view(params);
  if (args.p.num_splits < 1) args.p.num_splits = 1;
  args.oaccum = oaccum, args.lse_accum = lse_accum, args.oaccum_row = fwd_oaccum_row(params);
  fill_shared_args(args, args.p);
  const auto& p = args.p;
  args.vec_o = q_rows_aligned16(p, p.out, p.o_batch_stride, p.o_row_stride, p.num_heads, p.o_head_stride,
                                p.head_dim_v);
  // (seqlen_k == 0: the kernel visits no key block and writes out = 0, lse = -inf)
  return is_bf16 ? run_fwd<__nv_bfloat16>(args, stream) : run_fwd<__half>(args, stream);
}

}  // namespace flashattn
