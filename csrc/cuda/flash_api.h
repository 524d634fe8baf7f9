// Host entry points of the CUDA flash kernels. No torch headers: the ops layer
// (csrc/ops_cuda.cpp) fills the params from tensors, allocates outputs/workspace, and
// checks the returned cudaError_t (cudaSuccess on success).
#pragma once

#include <cuda_runtime.h>

#include "flash_params.h"

namespace flashattn {

// Forward. Preconditions (the ops layer checks them): q/k/v/out fp16 or bf16 (is_bf16
// selects), head-dim stride 1, 1 <= head_dim, head_dim_v <= 256, out (B, Sq, H, Dv),
// lse float32 contiguous (B, H, Sq), device sm80+.
cudaError_t run_flash_fwd(const FlashParams& params, bool is_bf16, cudaStream_t stream);

// Backward. Workspace (allocated by the caller, any initial contents):
//   dq_accum  float32, batch * num_heads * seqlen_q * head_dim elements ((B, H, Sq, D)
//             contiguous); zeroed and used only when !params.deterministic (may be null then).
//   softmax_d float32, batch * num_heads * seqlen_q elements ((B, H, Sq)): rowsum(dO * O).
// dk / dv are written per *query* head h at dk + b*dk_batch_stride + j*dk_row_stride +
// h*dk_head_stride: for GQA (num_heads_k < num_heads) pass (B, Sk, H, D) buffers and sum
// over each group of H / Hk heads afterwards.
cudaError_t run_flash_bwd(const FlashBwdParams& params, bool is_bf16, float* dq_accum, float* softmax_d,
                          cudaStream_t stream);

}  // namespace flashattn
