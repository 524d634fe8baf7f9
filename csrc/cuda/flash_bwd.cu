// Flash attention backward: host entry point run_flash_bwd (flash_api.h) and step 1 (the
// delta preprocess); steps 2 and 3 are launched per dtype and head-dim bucket by the
// launchers instantiated in flash_bwd_hdim*_{fp16,bf16}.cu. Kernels and the algorithm:
// flash_bwd_kernel.cuh.
#include "flash_api.h"
#include "flash_bwd_launch.h"
#include "flash_common.cuh"

namespace flashattn {
namespace cuda_impl {
namespace {

// ---------------------------------------------------------------------------------
// Step 1: delta = rowsum(dO * O), one warp per (b, i, h) row, at its lse row. Packed
// queries: out / dout read as batch 1 of total_q rows (rows in no sequence too, harmless).
template <typename T>
__global__ void __launch_bounds__(256) flash_bwd_preprocess_kernel(const BwdArgs args) {
  const FlashBwdParams& p = args.p;
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t total = lse_rows(p);
  if (row >= total) return;
  const int64_t Sq = p.cu_seqlens_q ? p.total_q : p.seqlen_q;
  const int64_t h = row % p.num_heads;
  const int64_t i = (row / p.num_heads) % Sq;
  const int64_t b = row / (p.num_heads * Sq);
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride;
  float s = 0.f;
  for (int d = lane; d < p.head_dim_v; d += 32) s += Elem<T>::to_float(o[d]) * Elem<T>::to_float(dout[d]);
#pragma unroll
  for (int w = 16; w >= 1; w >>= 1) s += __shfl_xor_sync(0xffffffffu, s, w);
  if (lane == 0) args.dsum[(b * p.num_heads + h) * Sq + i] = s;
}

template <typename T>
cudaError_t dispatch_bwd(const BwdArgs& args, cudaStream_t stream) {
  const FlashBwdParams& p = args.p;
  cudaError_t e;
  if (!p.deterministic && p.seqlen_q > 0) {
    e = cudaMemsetAsync(args.dq_accum, 0, sizeof(float) * lse_rows(p) * p.head_dim, stream);
    if (e != cudaSuccess) return e;
  }
  {
    const int64_t rows = lse_rows(p);
    if (rows > 0) {
      if ((rows + 7) / 8 > INT_MAX) return cudaErrorInvalidConfiguration;
      flash_bwd_preprocess_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(args);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
  }
  const int64_t d = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  switch (round_head_dim(d)) {
    case 32: return run_bwd_hdim<T, 32>(args, stream);
    case 64: return run_bwd_hdim<T, 64>(args, stream);
    case 96: return run_bwd_hdim<T, 96>(args, stream);
    case 128: return run_bwd_hdim<T, 128>(args, stream);
    default: return run_bwd_hdim<T, 256>(args, stream);
  }
}

}  // namespace
}  // namespace cuda_impl

cudaError_t run_flash_bwd(const FlashBwdParams& params, bool is_bf16, float* dq_accum, float* softmax_d,
                          cudaStream_t stream) {
  using namespace cuda_impl;
  if (params.batch == 0 || params.num_heads == 0) return cudaSuccess;
  if (params.head_dim > 256 || params.head_dim_v > 256 || params.num_heads_k <= 0) return cudaErrorInvalidValue;
  if (params.seqlen_k == 0 && params.seqlen_q == 0) return cudaSuccess;
  if (!params.deterministic && dq_accum == nullptr && params.seqlen_q > 0) return cudaErrorInvalidValue;
  if (params.block_table != nullptr) return cudaErrorInvalidValue;  // paged K / V: forward only
  BwdArgs args;
  args.p = params;
  fill_shared_args(args, params);
  const auto& p = params;
  // dk / dv are per query head (num_heads), see flash_api.h.
  args.vec_do = q_rows_aligned16(p, p.dout, p.do_batch_stride, p.do_row_stride, p.num_heads, p.do_head_stride,
                                 p.head_dim_v);
  args.vec_dq =
      q_rows_aligned16(p, p.dq, p.dq_batch_stride, p.dq_row_stride, p.num_heads, p.dq_head_stride, p.head_dim);
  args.vec_dk =
      k_rows_aligned16(p, p.dk, p.dk_batch_stride, p.dk_row_stride, p.num_heads, p.dk_head_stride, p.head_dim);
  args.vec_dv =
      k_rows_aligned16(p, p.dv, p.dv_batch_stride, p.dv_row_stride, p.num_heads, p.dv_head_stride, p.head_dim_v);
  args.dq_accum = dq_accum;
  args.dsum = softmax_d;
  return is_bf16 ? dispatch_bwd<__nv_bfloat16>(args, stream) : dispatch_bwd<__half>(args, stream);
}

}  // namespace flashattn
