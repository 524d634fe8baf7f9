// Host entry points of the CUDA flash kernels. No torch headers: the ops layer
// (csrc/ops_cuda.cpp) fills the params from tensors, allocates outputs/workspace, and
// checks the returned cudaError_t (cudaSuccess on success).
#pragma once

#include <cuda_runtime.h>

#include "flash_params.h"

namespace flashattn {

// Forward. Preconditions (the ops layer checks them): q/k/v/out fp16 or bf16 (is_bf16
// selects), head-dim stride 1, 1 <= head_dim, head_dim_v <= 256, out (B, Sq, H, Dv),
// lse float32 contiguous (B, H, Sq), device sm80+. Packed sequences / paged K / V
// (flash_params.h): out (1, total_q, H, Dv) with o_batch_stride 0, lse (1, H, total_q);
// q / k / v batch strides 0 where packed, k / v batch stride = page stride when paged;
// seqlen_k <= max_blocks * page_size. Out rows in no sequence are not written.
cudaError_t run_flash_fwd(const FlashParams& params, bool is_bf16, cudaStream_t stream);

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

}  // namespace flashattn
