// Forward instantiations for head-dim bucket 64 (fp16 and bf16).
#include "flash_fwd_kernel.cuh"

namespace flashattn {
namespace cuda_impl {
template cudaError_t run_fwd_hdim<__half, 64>(const FwdArgs&, cudaStream_t);
template cudaError_t run_fwd_hdim<__nv_bfloat16, 64>(const FwdArgs&, cudaStream_t);
}  // namespace cuda_impl
}  // namespace flashattn
