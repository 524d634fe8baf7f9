// flashattn::kvcache_write on CUDA tensors (ops_cuda.cpp): flash_attn_with_kvcache's append
// in one launch, the indices read on the device (no host read, so a decoding step still
// captures in a CUDA graph), through the CPU op's kvcache_destination (flash_params.h).
#include <cstdint>

#include "flash_api.h"

namespace flashattn {

namespace {

// One CTA per new row (b, i): its destination (kvcache_destination), then the row's heads x
// width elements of K, then of V, thread by thread (E: an unsigned integer of the element's
// size).
template <typename E>
__global__ void kvcache_write_kernel(KvcacheWriteParams p) {
  const int64_t b = blockIdx.x / p.new_keys, i = blockIdx.x % p.new_keys;
  int64_t entry, row;
  kvcache_destination(p, b, i, &entry, &row);
  for (int which = 0; which < 2; ++which) {
    const KvcacheWriteParams::Rows& r = which == 0 ? p.k : p.v;
    const E* src = static_cast<const E*>(r.src) + b * r.src_stride[0] + i * r.src_stride[1];
    E* dst = static_cast<E*>(r.dst) + entry * r.dst_stride[0] + row * r.dst_stride[1];
    for (int64_t t = threadIdx.x; t < p.heads * r.width; t += blockDim.x) {
      const int64_t h = t / r.width, e = t % r.width;
      dst[h * r.dst_stride[2] + e * r.dst_stride[3]] = src[h * r.src_stride[2] + e * r.src_stride[3]];
    }
  }
}

}  // namespace

cudaError_t run_kvcache_write(const KvcacheWriteParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.new_keys;
  if (rows == 0 || kvcache_capacity(p) == 0 || p.entries == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows)), block(128);
  switch (p.element_size) {
    case 2: kvcache_write_kernel<uint16_t><<<grid, block, 0, stream>>>(p); break;
    case 4: kvcache_write_kernel<uint32_t><<<grid, block, 0, stream>>>(p); break;
    case 8: kvcache_write_kernel<uint64_t><<<grid, block, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace flashattn
