// Host entry points of the CUDA flash kernels. No torch headers: the ops layer
// (csrc/ops_cuda.cpp) fills the params from tensors, allocates outputs/workspace, and
// checks the returned cudaError_t (cudaSuccess on success).
#pragma once

#include <cuda_runtime.h>

#include "flash_configs.h"
#include "flash_params.h"

namespace flashattn {

// Forward. Preconditions (the ops layer checks them): q/k/v/out fp16 or bf16 (is_bf16
// selects), head-dim stride 1, 1 <= head_dim, head_dim_v <= 256, out (B, Sq, H, Dv),
// lse float32 contiguous (B, H, Sq), device sm80+. Packed sequences / paged K / V
// (flash_params.h): out (1, total_q, H, Dv) with o_batch_stride 0, lse (1, H, total_q);
// q / k / v batch strides 0 where packed, k / v batch stride = page stride when paged;
// seqlen_k <= max_blocks * page_size. Out rows in no sequence are not written.
// KV caches: kv_batch_idx / leftpad_k as flash_params.h says.
//
// Split-KV (flash-decoding): params.num_splits must be what flash_fwd_num_splits returned
// for these params (<= 1: no split). With n > 1 splits each CTA attends one n-th of its
// query block's key blocks and writes its normalised O and its lse, float32, to the
// workspaces (allocated by the caller, any initial contents), and a combine kernel merges
// them into out and lse:
//   lse_accum float32, n * R elements,
//   oaccum    float32, n * R * fwd_oaccum_row(params) elements,
// R = lse rows (lse.numel(): B * H * Sq dense, H * total_q with cu_seqlens_q).
cudaError_t run_flash_fwd(const FlashParams& params, bool is_bf16, cudaStream_t stream, float* oaccum = nullptr,
                          float* lse_accum = nullptr);

// The key splits run_flash_fwd will use on a device with num_sms SMs: 1 with a bias or
// dropout (never split), params.num_splits when > 0, else a heuristic (flash-attn 2's
// num_splits_heuristic: split only when the CTAs of the call fill under 80% of the SMs,
// picking the smallest split count whose wave efficiency is within 85% of the best);
// always capped by the key blocks of the longest sequence and by kMaxFwdSplits.
constexpr int64_t kMaxFwdSplits = 128;
int64_t flash_fwd_num_splits(const FlashParams& params, int num_sms);

// Floats per row of the oaccum workspace: the head-dim bucket of max(head_dim, head_dim_v).
inline int64_t fwd_oaccum_row(const FlashParams& p) {
  return cfg::round_head_dim(p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v);
}

// Backward (no block table: cudaErrorInvalidValue). Workspace (allocated by the caller,
// any initial contents), R = lse rows (flash_common.cuh lse_rows: batch * num_heads *
// seqlen_q dense, num_heads * total_q with cu_seqlens_q):
//   dq_accum  float32, R * head_dim elements ((B, H, Sq, D) contiguous when dense); zeroed
//             and used only when !params.deterministic (may be null then).
//   softmax_d float32, R elements ((B, H, Sq) when dense): rowsum(dO * O).
// With cu_seqlens_k or seqused_k, only key rows inside sequences (the first seqlen_k of
// each) get dk / dv: the caller zero-fills dk / dv for the rest. With cu_seqlens_q, dq rows
// in no sequence are 0 unless deterministic (then not written).
// dk / dv are written per *query* head h at dk + b*dk_batch_stride + j*dk_row_stride +
// h*dk_head_stride: for GQA (num_heads_k < num_heads) pass (B, Sk, H, D) buffers and sum
// over each group of H / Hk heads afterwards.
cudaError_t run_flash_bwd(const FlashBwdParams& params, bool is_bf16, float* dq_accum, float* softmax_d,
                          cudaStream_t stream);

// flashattn::kvcache_write (flash_params.h KvcacheWriteParams; ops_cuda.cpp fills it): one
// launch, one CTA per new row.
cudaError_t run_kvcache_write(const KvcacheWriteParams& params, cudaStream_t stream);

}  // namespace flashattn
