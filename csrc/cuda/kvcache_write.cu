// flashattn::kvcache_write on CUDA tensors (ops_cuda.cpp): flash_attn_with_kvcache's append
// in one launch, the indices computed on the device (no host read, so a decoding step
// still captures in a CUDA graph). Same semantics as the CPU op (ops.cpp): row (b, i) of
// the new keys / values goes to slot cache_seqlens[b] + i of entry b's cache row or pages,
// every index clamped into the caches.
#include <cstdint>

#include "flash_api.h"

namespace flashattn {

namespace {

__device__ __forceinline__ int64_t read_index(const void* t, bool is_int64, int64_t at) {
  return is_int64 ? static_cast<const int64_t*>(t)[at] : static_cast<const int32_t*>(t)[at];
}

__device__ __forceinline__ int64_t clamp_to(int64_t x, int64_t hi) { return x < 0 ? 0 : (x > hi ? hi : x); }

// One CTA per new row (b, i): its destination first, then the row's heads x width
// elements of K, then of V, thread by thread (E: an unsigned integer of the element's size).
template <typename E>
__global__ void kvcache_write_kernel(KvcacheWriteParams p) {
  const int64_t b = blockIdx.x / p.new_keys, i = blockIdx.x % p.new_keys;
  const int64_t capacity = p.block_table ? p.table_width * p.slots : p.slots;
  const int64_t slot = clamp_to(read_index(p.cache_seqlens, p.seqlens_int64, b * p.seqlens_stride) + i, capacity - 1);
  int64_t entry, row;
  if (p.block_table) {
    const int64_t at = b * p.table_stride0 + (slot / p.slots) * p.table_stride1;
    entry = clamp_to(read_index(p.block_table, p.table_int64, at), p.entries - 1);
    row = slot % p.slots;
  } else {
    entry = clamp_to(p.cache_batch_idx ? read_index(p.cache_batch_idx, p.rows_int64, b * p.rows_stride) : b,
                     p.entries - 1);
    row = slot;
  }
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
  const int64_t capacity = p.block_table ? p.table_width * p.slots : p.slots;
  if (rows == 0 || capacity == 0 || p.entries == 0) return cudaSuccess;
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
