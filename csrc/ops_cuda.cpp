// CUDA implementations of the flashattn ops (schemas in ops.cpp): tensor -> params ->
// csrc/cuda kernels. Built only with CUDA. The ops are internal (flashattn_py/api.py
// validates user input), so the checks here guard only the kernels' preconditions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda/flash_api.h"
#include "cuda/flash_configs.h"
#include "flash_params.h"
#include "params_from_tensors.h"

namespace flashattn {

namespace {

// What the CUDA kernels need beyond fill_params' shape checks, on q's device: sm80+ and
// the shared memory the launches ask for (sm86 / sm89 have 99 KB per block, less than the
// D = 256 backward and the deterministic dQ kernels of D >= 128 take; flashattn_py's
// supports() falls back before this is reached).
void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool backward,
                       bool deterministic) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "flashattn (cuda): q, k, v must be CUDA tensors");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "flashattn (cuda): dtype must be float16 or bfloat16, got ", dt);
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(prop->major >= 8, "flashattn (cuda): needs an sm80+ GPU, got sm", prop->major, prop->minor, " (",
              q.device(), ")");
  const int64_t d = std::max(q.size(3), v.size(3));
  const int need = cfg::smem_bytes(d, backward, deterministic);
  TORCH_CHECK(static_cast<size_t>(need) <= prop->sharedMemPerBlockOptin, "flashattn (cuda): head dim ", d,
              backward ? (deterministic ? " (deterministic backward)" : " (backward)") : " (forward)", " needs ",
              need, " bytes of shared memory per block; ", q.device(), " (sm", prop->major, prop->minor,
              ") has ", prop->sharedMemPerBlockOptin);
}

// A CUDA error left pending by an earlier call would be read back by the cudaGetLastError
// after our launches and reported as theirs: raise it here, named as what it is.
void check_no_pending_error() {
  const cudaError_t prior = cudaGetLastError();
  TORCH_CHECK(prior == cudaSuccess, "flashattn (cuda): a CUDA error was pending before the flashattn launch (from an "
              "earlier call): ", cudaGetErrorString(prior));
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v FLASHATTN_PROBLEM_PARAMS) {
  check_cuda_inputs(q, k, v, /*backward=*/false, /*deterministic=*/false);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (cu_seqlens_q.has_value()) {  // rows in no sequence are never written: defined as out 0, lse -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  FlashParams p;
  const AttnArgs args{q, k, v FLASHATTN_PROBLEM_NAMES};
  fill_params(p, args);
  fill_output(p, out, lse);
  // Split-KV (flash-decoding): the key splits for this problem on this device, and their
  // float32 workspaces (flash_api.h).
  p.num_splits = flash_fwd_num_splits(p, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor oaccum, lse_accum;
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    lse_accum = at::empty({p.num_splits, lse.numel()}, f32);
    oaccum = at::empty({p.num_splits, lse.numel(), fwd_oaccum_row(p)}, f32);
  }
  check_no_pending_error();
  const cudaError_t err =
      run_flash_fwd(p, q.scalar_type() == at::kBFloat16, at::cuda::getCurrentCUDAStream().stream(),
                    p.num_splits > 1 ? oaccum.data_ptr<float>() : nullptr,
                    p.num_splits > 1 ? lse_accum.data_ptr<float>() : nullptr);
  TORCH_CHECK(err == cudaSuccess, "flashattn::fwd CUDA kernel failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse FLASHATTN_PROBLEM_PARAMS, bool deterministic, bool bias_requires_grad) {
  check_cuda_inputs(q, k, v, /*backward=*/true, deterministic);
  TORCH_CHECK(!block_table.has_value() && !kv_batch_idx.has_value() && !leftpad_k.has_value(),
              "flashattn: the backward of KV-cache calls (block_table, kv_batch_idx, leftpad_k) is not supported");
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(dout.sizes() == out.sizes() && out.dim() == 4 && out.size(3) == v.size(3) &&
                  out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2),
              "flashattn (cuda): dout / out must be (B, Sq, H, Dv)");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "flashattn (cuda): dout / out must have q's dtype");
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "flashattn (cuda): dout, out, lse must be on q's device");
  TORCH_CHECK(dout.stride(-1) == 1 && out.stride(-1) == 1,
              "flashattn (cuda): dout / out need a contiguous head dimension");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "flashattn (cuda): lse must be float32");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(1),
              "flashattn (cuda): lse must be (B, H, Sq)");
  const at::Tensor lse_c = lse.contiguous();

  // (dK / dV follow k's rows: B x Sk dense, 1 x total_k packed)
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Bk = k.size(0), Sk = k.size(1), Hk = k.size(2), Dv = v.size(3);
  const int64_t group = H / Hk;

  // Rows outside every sequence (and keys past seqused_k) get no gradient from the
  // kernels: zeros.
  const bool partial = cu_seqlens_q.has_value() || cu_seqlens_k.has_value() || seqused_k.has_value();
  auto grad_buffer = [&](at::IntArrayRef sizes) {
    return partial ? at::zeros(sizes, q.options()) : at::empty(sizes, q.options());
  };
  at::Tensor dq = grad_buffer(q.sizes());
  // dK / dV per query head; for GQA reduced over each group below (in float32).
  at::Tensor dk_h = grad_buffer({Bk, Sk, H, D});
  at::Tensor dv_h = grad_buffer({Bk, Sk, H, Dv});
  at::Tensor softmax_d = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!deterministic) dq_accum = at::empty({B, H, Sq, D}, q.options().dtype(at::kFloat));

  FlashBwdParams p;
  const AttnArgs args{q, k, v FLASHATTN_PROBLEM_NAMES};
  fill_params(p, args);
  fill_output(p, out, lse_c);
  fill_grads(p, dout, dq, dk_h, dv_h);
  at::Tensor dbias = make_dbias(p, q, attn_bias, bias_requires_grad);
  p.deterministic = deterministic;

  check_no_pending_error();
  const cudaError_t err =
      run_flash_bwd(p, q.scalar_type() == at::kBFloat16, deterministic ? nullptr : dq_accum.data_ptr<float>(),
                    softmax_d.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "flashattn::bwd CUDA kernel failed: ", cudaGetErrorString(err));

  at::Tensor dk = dk_h, dv = dv_h;
  if (group > 1) {
    // Query head h = hk * group + r reads kv head hk.
    dk = dk_h.view({Bk, Sk, Hk, group, D}).sum(3, /*keepdim=*/false, at::kFloat).to(q.scalar_type());
    dv = dv_h.view({Bk, Sk, Hk, group, Dv}).sum(3, /*keepdim=*/false, at::kFloat).to(q.scalar_type());
  }
  return {dq, dk, dv, dbias};
}

}  // namespace

// dropout_mask has no CUDA impl: ops.dropout_keep_mask (its only caller) passes rng_state
// as a CPU tensor, so dispatch goes to the CPU impl, whose Philox draws are the CUDA
// kernels' (cuda/philox.cuh) bit for bit.
TORCH_LIBRARY_IMPL(flashattn, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
}

}  // namespace flashattn
