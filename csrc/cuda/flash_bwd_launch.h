// Backward launch interface shared by the dispatch (flash_bwd.cu) and the per-head-dim
// instantiation files (flash_bwd_hdim*_{fp16,bf16}.cu): the kernel arguments and one
// launcher per (dtype, head-dim bucket). Kernel templates: flash_bwd_kernel.cuh.
#pragma once

#include "flash_api.h"
#include "flash_common.cuh"

namespace flashattn {
namespace cuda_impl {

struct BwdArgs {
  FlashBwdParams p;
  float scale_log2, cap_in, cap_out;
  int heads_per_kv;
  bool vec_q, vec_k, vec_v, vec_do, vec_dq, vec_dk, vec_dv;
  float* dq_accum;  // (B, H, Sq, D)
  float* dsum;      // (B, H, Sq)
  Dropout drop;     // used when p.dropout_p > 0 (kExt kernels only)
};

// Launches steps 2 and 3 of the backward (main kernel, then deterministic dQ or the dq_accum
// conversion) for head dims in the bucket kD (round_head_dim: 32, 64, 96, 128, 256), plain
// or kExt variant by args. Defined in flash_bwd_kernel.cuh, explicitly instantiated in
// flash_bwd_hdim<kD>_{fp16,bf16}.cu.
template <typename T, int kD>
cudaError_t run_bwd_hdim(const BwdArgs& args, cudaStream_t stream);

}  // namespace cuda_impl
}  // namespace flashattn
