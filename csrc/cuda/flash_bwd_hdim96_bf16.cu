// Backward instantiations for head-dim bucket 96, bf16.
#include "flash_bwd_kernel.cuh"

namespace flashattn {
namespace cuda_impl {
template cudaError_t run_bwd_hdim<__nv_bfloat16, 96>(const BwdArgs&, cudaStream_t);
}  // namespace cuda_impl
}  // namespace flashattn
