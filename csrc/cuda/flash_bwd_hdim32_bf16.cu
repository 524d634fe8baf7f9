// Backward instantiations for head-dim bucket 32, bf16.
#include "flash_bwd_kernel.cuh"

namespace flashattn {
namespace cuda_impl {
template cudaError_t run_bwd_hdim<__nv_bfloat16, 32>(const BwdArgs&, cudaStream_t);
}  // namespace cuda_impl
}  // namespace flashattn
