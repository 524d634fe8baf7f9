// Backward instantiations for head-dim bucket 128, fp16.
#include "flash_bwd_kernel.cuh"

namespace flashattn {
namespace cuda_impl {
template cudaError_t run_bwd_hdim<__half, 128>(const BwdArgs&, cudaStream_t);
}  // namespace cuda_impl
}  // namespace flashattn
