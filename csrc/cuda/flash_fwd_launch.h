// Forward launch interface shared by the dispatch (flash_fwd.cu) and the per-head-dim
// instantiation files (flash_fwd_hdim*.cu): the kernel arguments and one launcher per
// (dtype, head-dim bucket). Kernel templates: flash_fwd_kernel.cuh.
#pragma once

#include "flash_api.h"
#include "flash_common.cuh"

namespace flashattn {
namespace cuda_impl {

struct FwdArgs {
  FlashParams p;
  float scale_log2;   // scale * log2(e)
  float cap_in;       // scale / softcap
  float cap_out;      // softcap * log2(e)
  int heads_per_kv;   // H / Hk
  bool vec_q, vec_k, vec_v, vec_o;
  Dropout drop;       // used when p.dropout_p > 0 (kExt kernels only)
  // Split-KV (p.num_splits > 1, flash_api.h): per-split O (normalised, fp32, oaccum_row
  // floats per row) and lse, index split * lse_rows(p) + lse row.
  float* oaccum = nullptr;
  float* lse_accum = nullptr;
  int64_t oaccum_row = 0;
};

// Launches the forward for head dims in the bucket kD (round_head_dim: 32, 64, 96, 128,
// 256), plain, kExt (bias / dropout / paged K, V) or split-KV variant by args. Defined in flash_fwd_kernel.cuh,
// explicitly instantiated for __half and __nv_bfloat16 in flash_fwd_hdim<kD>.cu.
template <typename T, int kD>
cudaError_t run_fwd_hdim(const FwdArgs& args, cudaStream_t stream);

}  // namespace cuda_impl
}  // namespace flashattn
