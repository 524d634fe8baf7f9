// CUDA implementations of the flashattn ops (schemas in ops.cpp): tensor -> params ->
// csrc/cuda kernels. Built only with CUDA (and -DUSE_CUDA, for the stable C shim's CUDA
// stream function). LibTorch stable ABI, like ops.cpp. The ops are internal
// (flashattn_py/api.py validates user input), so the checks here guard only the kernels'
// preconditions.
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>

#include "cuda/flash_api.h"
#include "cuda/flash_configs.h"
#include "flash_params.h"
#include "params_from_tensors.h"

namespace flashattn {

namespace {

// A device's properties, read once per device (the stable ABI has no at::cuda::getDeviceProperties).
const cudaDeviceProp& device_properties(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static cudaDeviceProp props[kMaxDevices];
  STD_TORCH_CHECK(device >= 0 && device < kMaxDevices, "flashattn (cuda): device index ", device, " out of range");
  std::call_once(once[device], [device] {
    const cudaError_t err = cudaGetDeviceProperties(&props[device], device);
    STD_TORCH_CHECK(err == cudaSuccess, "flashattn (cuda): cudaGetDeviceProperties: ", cudaGetErrorString(err));
  });
  return props[device];
}

cudaStream_t current_stream(const TensorInfo& q) {
  void* stream = nullptr;
  FLASHATTN_SHIM(aoti_torch_get_current_cuda_stream(q.device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// What the CUDA kernels need beyond fill_params' shape checks, on q's device: sm80+ and
// the shared memory the launches ask for (sm86 / sm89 have 99 KB per block, less than the
// D = 256 backward and the deterministic dQ kernels of D >= 128 take; flashattn_py's
// supports() falls back before this is reached).
TensorInfo check_cuda_inputs(const Tensor& q_t, const Tensor& k_t, const Tensor& v_t, bool backward,
                             bool deterministic) {
  const TensorInfo q(q_t), k(k_t), v(v_t);
  STD_TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "flashattn (cuda): q, k, v must be CUDA tensors");
  STD_TORCH_CHECK(q.dtype == codes().f16 || q.dtype == codes().bf16,
                  "flashattn (cuda): dtype must be float16 or bfloat16, got ", dtype_name(q.dtype));
  STD_TORCH_CHECK(q.dim == 4 && k.dim == 4 && v.dim == 4 && k.size(2) > 0,
                  "flashattn (cuda): q, k, v must be 4-D (B, S, H, D) with at least one K/V head");
  const cudaDeviceProp& prop = device_properties(q.device_index);
  STD_TORCH_CHECK(prop.major >= 8, "flashattn (cuda): needs an sm80+ GPU, got sm", prop.major, prop.minor, " (",
                  q.device_str(), ")");
  const int64_t d = std::max(q.size(3), v.size(3));
  const int need = cfg::smem_bytes(d, backward, deterministic);
  STD_TORCH_CHECK(static_cast<size_t>(need) <= prop.sharedMemPerBlockOptin, "flashattn (cuda): head dim ", d,
                  backward ? (deterministic ? " (deterministic backward)" : " (backward)") : " (forward)", " needs ",
                  need, " bytes of shared memory per block; ", q.device_str(), " (sm", prop.major, prop.minor,
                  ") has ", prop.sharedMemPerBlockOptin);
  return q;
}

// The kernels hold key and query bounds in 32 bits, clamped at 2^30 (flash_common.cuh
// clamp_int): longer sequences are refused here rather than masked wrongly there.
void check_lengths(const FlashParams& p) {
  constexpr int64_t MAX_POSITIONS = int64_t(1) << 30;
  STD_TORCH_CHECK(p.seqlen_q <= MAX_POSITIONS && p.seqlen_k <= MAX_POSITIONS,
                  "flashattn (cuda): sequences of at most 2^30 positions, got seqlen_q ", p.seqlen_q, ", seqlen_k ",
                  p.seqlen_k, " (packed: max_seqlen_q / max_seqlen_k, else the totals; paged: at most the block "
                  "table's pages x page size); the triton backend takes longer ones");
}

// A CUDA error left pending by an earlier call would be read back by the cudaGetLastError
// after our launches and reported as theirs: raise it here, named as what it is.
void check_no_pending_error() {
  const cudaError_t prior = cudaGetLastError();
  STD_TORCH_CHECK(prior == cudaSuccess,
                  "flashattn (cuda): a CUDA error was pending before the flashattn launch (from an "
                  "earlier call): ",
                  cudaGetErrorString(prior));
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q_t, const Tensor& k, const Tensor& v FLASHATTN_PROBLEM_PARAMS) {
  const TensorInfo q = check_cuda_inputs(q_t, k, v, /*backward=*/false, /*deterministic=*/false);
  torch::stable::accelerator::DeviceGuard guard(q.device_index);
  const int64_t Dv = TensorInfo(v).size(3);
  Tensor out = new_tensor({q.size(0), q.size(1), q.size(2), Dv}, q.dtype, q);
  Tensor lse = new_tensor({q.size(0), q.size(2), q.size(1)}, codes().f32, q);
  if (cu_seqlens_q.has_value()) {  // rows in no sequence are never written: defined as out 0, lse -inf
    zero(out);
    torch::stable::fill_(lse, -std::numeric_limits<float>::infinity());
  }
  FlashParams p;
  const AttnArgs args{q_t, k, v FLASHATTN_PROBLEM_NAMES};
  fill_params(p, args);
  check_lengths(p);
  fill_output(p, out, lse);
  // Split-KV (flash-decoding): the key splits for this problem on this device, and their
  // float32 workspaces (flash_api.h).
  p.num_splits = flash_fwd_num_splits(p, device_properties(q.device_index).multiProcessorCount);
  Tensor oaccum, lse_accum;
  if (p.num_splits > 1) {
    const int64_t rows = q.size(0) * q.size(2) * q.size(1);  // lse.numel()
    lse_accum = new_tensor({p.num_splits, rows}, codes().f32, q);
    oaccum = new_tensor({p.num_splits, rows, fwd_oaccum_row(p)}, codes().f32, q);
  }
  check_no_pending_error();
  const cudaError_t err =
      run_flash_fwd(p, q.dtype == codes().bf16, current_stream(q),
                    p.num_splits > 1 ? static_cast<float*>(oaccum.data_ptr()) : nullptr,
                    p.num_splits > 1 ? static_cast<float*>(lse_accum.data_ptr()) : nullptr);
  STD_TORCH_CHECK(err == cudaSuccess, "flashattn::fwd CUDA kernel failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_cuda(const Tensor& dout_t, const Tensor& q_t, const Tensor& k_t,
                                                    const Tensor& v_t, const Tensor& out_t,
                                                    const Tensor& lse_t FLASHATTN_PROBLEM_PARAMS, bool deterministic,
                                                    bool bias_requires_grad) {
  const TensorInfo q = check_cuda_inputs(q_t, k_t, v_t, /*backward=*/true, deterministic);
  STD_TORCH_CHECK(!block_table.has_value() && !kv_batch_idx.has_value() && !leftpad_k.has_value(),
                  "flashattn: the backward of KV-cache calls (block_table, kv_batch_idx, leftpad_k) is not supported");
  torch::stable::accelerator::DeviceGuard guard(q.device_index);
  const TensorInfo k(k_t), v(v_t), dout(dout_t), out(out_t), lse(lse_t);
  STD_TORCH_CHECK(dout.dim == 4 && out.dim == 4 && dout.size(0) == out.size(0) && dout.size(1) == out.size(1) &&
                      dout.size(2) == out.size(2) && dout.size(3) == out.size(3) && out.size(3) == v.size(3) &&
                      out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2),
                  "flashattn (cuda): dout / out must be (B, Sq, H, Dv)");
  STD_TORCH_CHECK(dout.dtype == q.dtype && out.dtype == q.dtype, "flashattn (cuda): dout / out must have q's dtype");
  STD_TORCH_CHECK(dout.same_device(q) && out.same_device(q) && lse.same_device(q),
                  "flashattn (cuda): dout, out, lse must be on q's device");
  STD_TORCH_CHECK(dout.stride(-1) == 1 && out.stride(-1) == 1,
                  "flashattn (cuda): dout / out need a contiguous head dimension");
  STD_TORCH_CHECK(lse.dtype == codes().f32, "flashattn (cuda): lse must be float32");
  STD_TORCH_CHECK(lse.dim == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
                  "flashattn (cuda): lse must be (B, H, Sq)");
  const Tensor lse_c = lse.is_contiguous() ? lse_t : torch::stable::contiguous(lse_t);

  // (dK / dV follow k's rows: B x Sk dense, 1 x total_k packed)
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Bk = k.size(0), Sk = k.size(1), Hk = k.size(2), Dv = v.size(3);
  const int64_t group = H / Hk;

  // Rows outside every sequence (and keys past seqused_k) get no gradient from the
  // kernels: zeros.
  const bool partial = cu_seqlens_q.has_value() || cu_seqlens_k.has_value() || seqused_k.has_value();
  auto grad_buffer = [&](std::initializer_list<int64_t> sizes) {
    Tensor t = new_tensor(sizes, q.dtype, q);
    if (partial) zero(t);
    return t;
  };
  Tensor dq = grad_buffer({B, Sq, H, D});
  // dK / dV per query head; for GQA reduced over each group below (in float32).
  Tensor dk_h = grad_buffer({Bk, Sk, H, D});
  Tensor dv_h = grad_buffer({Bk, Sk, H, Dv});
  Tensor softmax_d = new_tensor({B, H, Sq}, codes().f32, q);
  Tensor dq_accum;
  if (!deterministic) dq_accum = new_tensor({B, H, Sq, D}, codes().f32, q);

  FlashBwdParams p;
  const AttnArgs args{q_t, k_t, v_t FLASHATTN_PROBLEM_NAMES};
  fill_params(p, args);
  check_lengths(p);
  fill_output(p, out_t, lse_c);
  fill_grads(p, dout_t, dq, dk_h, dv_h);
  Tensor dbias = make_dbias(p, q, attn_bias, bias_requires_grad);
  p.deterministic = deterministic;

  check_no_pending_error();
  const cudaError_t err =
      run_flash_bwd(p, q.dtype == codes().bf16, deterministic ? nullptr : static_cast<float*>(dq_accum.data_ptr()),
                    static_cast<float*>(softmax_d.data_ptr()), current_stream(q));
  STD_TORCH_CHECK(err == cudaSuccess, "flashattn::bwd CUDA kernel failed: ", cudaGetErrorString(err));

  Tensor dk = dk_h, dv = dv_h;
  if (group > 1) {
    // Query head h = hk * group + r reads kv head hk.
    using torch::headeronly::ScalarType;
    const ScalarType dtype = q.dtype == codes().bf16 ? ScalarType::BFloat16 : ScalarType::Half;
    const int64_t sum_dim[] = {3};
    const int64_t dk_shape[] = {Bk, Sk, Hk, group, D}, dv_shape[] = {Bk, Sk, Hk, group, Dv};
    dk = torch::stable::to(torch::stable::sum(torch::stable::view(dk_h, dk_shape), sum_dim, /*keepdim=*/false,
                                              ScalarType::Float),
                           dtype);
    dv = torch::stable::to(torch::stable::sum(torch::stable::view(dv_h, dv_shape), sum_dim, /*keepdim=*/false,
                                              ScalarType::Float),
                           dtype);
  }
  return {dq, dk, dv, dbias};
}

// flashattn::kvcache_write (schema and CPU impl in ops.cpp): one launch on the caches'
// device and current stream (cuda/kvcache_write.cu), nothing read on the host.
void kvcache_write_cuda(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                        const Tensor& cache_seqlens, const OptTensor& cache_batch_idx, const OptTensor& block_table) {
  const KvcacheWriteArgs a(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table);
  STD_TORCH_CHECK(a.k_cache.is_cuda(), "flashattn: kvcache_write's CUDA impl takes CUDA tensors");
  torch::stable::accelerator::DeviceGuard guard(a.k_cache.device_index);
  // (the CPU impl reads such rows from a copy; here the launch's rows would race with
  // their own writes: the caller, flash_attn_with_kvcache, copies them, unless a compiler
  // dropped that copy)
  STD_TORCH_CHECK(!a.new_rows_overlap_caches(), "flashattn: kvcache_write: the new keys / values share memory with "
                  "the caches; pass copies (k.clone())");
  const KvcacheWriteParams p = a.params();
  check_no_pending_error();
  const cudaError_t err = run_kvcache_write(p, current_stream(a.k_cache));
  STD_TORCH_CHECK(err == cudaSuccess, "flashattn::kvcache_write CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

// dropout_mask and fwd_inference have no CUDA impl: ops.dropout_keep_mask (dropout_mask's
// only caller) passes rng_state as a CPU tensor, so dispatch goes to the CPU impl, whose
// Philox draws are the CUDA kernels' (cuda/philox.cuh) bit for bit; fwd_inference is the
// CPU backend's eager entry.
STABLE_TORCH_LIBRARY_IMPL(flashattn, CUDA, m) {
  m.impl("fwd", TORCH_BOX(&fwd_cuda));
  m.impl("bwd", TORCH_BOX(&bwd_cuda));
  m.impl("kvcache_write", TORCH_BOX(&kvcache_write_cuda));
}

}  // namespace flashattn
