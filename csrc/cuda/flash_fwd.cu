// Flash attention forward: host entry point run_flash_fwd (flash_api.h), which fills the
// kernel arguments and dispatches on dtype and head-dim bucket to the launchers
// instantiated in flash_fwd_hdim*.cu. Kernels: flash_fwd_kernel.cuh.
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

}  // namespace
}  // namespace cuda_impl

cudaError_t run_flash_fwd(const FlashParams& params, bool is_bf16, cudaStream_t stream) {
  using namespace cuda_impl;
  if (params.batch == 0 || params.seqlen_q == 0 || params.num_heads == 0) return cudaSuccess;
  if (params.head_dim > 256 || params.head_dim_v > 256 || params.num_heads_k <= 0) return cudaErrorInvalidValue;
  FwdArgs args;
  args.p = params;
  fill_shared_args(args, params);
  const auto& p = params;
  args.vec_o = q_rows_aligned16(p, p.out, p.o_batch_stride, p.o_row_stride, p.num_heads, p.o_head_stride,
                                p.head_dim_v);
  // (seqlen_k == 0: the kernel visits no key block and writes out = 0, lse = -inf)
  return is_bf16 ? dispatch_fwd<__nv_bfloat16>(args, stream) : dispatch_fwd<__half>(args, stream);
}

}  // namespace flashattn
