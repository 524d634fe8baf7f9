// CUDA implementations of the flashattn ops (schemas in ops.cpp): tensor -> params ->
// csrc/cuda kernels. Built only with CUDA. The ops are internal (flashattn_py/api.py
// validates user input), so the checks here guard only the kernels' preconditions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/flash_api.h"
#include "flash_params.h"

namespace flashattn {

namespace {

void check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flashattn (cuda): q, k, v must be 4-D (B, S, H, D)");
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "flashattn (cuda): q, k, v must be CUDA tensors");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "flashattn (cuda): q, k, v must share a device");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "flashattn (cuda): dtype must be float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "flashattn (cuda): q, k, v must share a dtype");
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1,
              "flashattn (cuda): the head dimension must be contiguous (stride 1)");
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2),
              "flashattn (cuda): batch / seqlen / heads of q, k, v disagree");
  TORCH_CHECK(q.size(3) == k.size(3), "flashattn (cuda): q and k head dims differ");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256 && v.size(3) >= 1 && v.size(3) <= 256,
              "flashattn (cuda): head dims must be in [1, 256], got ", q.size(3), " and ", v.size(3));
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "flashattn (cuda): num_heads must be a multiple of num_heads_k");
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(prop->major >= 8, "flashattn (cuda): needs an sm80+ GPU, got sm", prop->major, prop->minor);
}

void fill_common(FlashParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& alibi_slopes, double scale, double softcap, int64_t window_left,
                 int64_t window_right, int64_t diag_offset) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.batch = q.size(0), p.seqlen_q = q.size(1), p.seqlen_k = k.size(1);
  p.num_heads = q.size(2), p.num_heads_k = k.size(2);
  p.head_dim = q.size(3), p.head_dim_v = v.size(3);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = window_left, p.window_right = window_right, p.diag_offset = diag_offset;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device() == q.device(), "flashattn (cuda): alibi_slopes must be on q's device");
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.stride(-1) == 1,
                "flashattn (cuda): alibi_slopes must be float32 with a contiguous last dim");
    TORCH_CHECK(a.size(-1) == p.num_heads && (a.dim() == 1 || (a.dim() == 2 && a.size(0) == p.batch)),
                "flashattn (cuda): alibi_slopes must be (H,) or (B, H)");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? a.stride(0) : 0;
  }
}

// attn_bias (B, H, Sq, Sk) through strides (0 on broadcast dims), bool or q's dtype, on q's
// device; dropout's [seed, offset] from rng_state, an int64 CPU tensor read on the host.
void fill_bias_dropout(FlashParams& p, const at::Tensor& q, const std::optional<at::Tensor>& attn_bias,
                       double dropout_p, const std::optional<at::Tensor>& rng_state) {
  if (attn_bias.has_value()) {
    const at::Tensor& m = *attn_bias;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.batch && m.size(1) == p.num_heads && m.size(2) == p.seqlen_q &&
                    m.size(3) == p.seqlen_k,
                "flashattn (cuda): attn_bias must be (B, H, Sq, Sk) = (", p.batch, ", ", p.num_heads, ", ",
                p.seqlen_q, ", ", p.seqlen_k, ") (broadcast dims with stride 0), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                "flashattn (cuda): attn_bias must be bool or ", q.scalar_type(), ", got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), "flashattn (cuda): attn_bias must be on ", q.device(), ", got ",
                m.device());
    p.bias = m.data_ptr();
    p.bias_is_bool = m.scalar_type() == at::kBool;
    p.bias_batch_stride = m.stride(0), p.bias_head_stride = m.stride(1);
    p.bias_row_stride = m.stride(2), p.bias_col_stride = m.stride(3);
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "flashattn (cuda): dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p > 0) {
    TORCH_CHECK(rng_state.has_value() && rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 &&
                    rng_state->device().is_cpu(),
                "flashattn (cuda): dropout needs rng_state, an int64 CPU tensor [seed, offset]");
    const at::Tensor st = rng_state->contiguous();
    p.dropout_seed = static_cast<uint64_t>(st.data_ptr<int64_t>()[0]);
    p.dropout_offset = static_cast<uint64_t>(st.data_ptr<int64_t>()[1]);
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& alibi_slopes,
                                            const std::optional<at::Tensor>& attn_bias, double scale,
                                            double softcap, int64_t window_left, int64_t window_right,
                                            int64_t diag_offset, double dropout_p,
                                            const std::optional<at::Tensor>& rng_state) {
  check_cuda_inputs(q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  FlashParams p;
  fill_common(p, q, k, v, alibi_slopes, scale, softcap, window_left, window_right, diag_offset);
  fill_bias_dropout(p, q, attn_bias, dropout_p, rng_state);
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.lse = lse.data_ptr();
  const cudaError_t err =
      run_flash_fwd(p, q.scalar_type() == at::kBFloat16, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "flashattn::fwd CUDA kernel failed: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
    double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset, double dropout_p,
    const std::optional<at::Tensor>& rng_state, bool deterministic, bool bias_requires_grad) {
  check_cuda_inputs(q, k, v);
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

  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hk = k.size(2), Dv = v.size(3);
  const int64_t group = H / Hk;

  at::Tensor dq = at::empty(q.sizes(), q.options());
  // dK / dV per query head; for GQA reduced over each group below (in float32).
  at::Tensor dk_h = at::empty({B, Sk, H, D}, q.options());
  at::Tensor dv_h = at::empty({B, Sk, H, Dv}, q.options());
  at::Tensor softmax_d = at::empty({B, H, Sq}, q.options().dtype(at::kFloat));
  at::Tensor dq_accum;
  if (!deterministic) dq_accum = at::empty({B, H, Sq, D}, q.options().dtype(at::kFloat));

  FlashBwdParams p;
  fill_common(p, q, k, v, alibi_slopes, scale, softcap, window_left, window_right, diag_offset);
  fill_bias_dropout(p, q, attn_bias, dropout_p, rng_state);
  TORCH_CHECK(!bias_requires_grad || (attn_bias.has_value() && attn_bias->scalar_type() != at::kBool),
              "flashattn (cuda): bias_requires_grad needs a float attn_bias");
  // The bias gradient in the expanded (B, H, Sq, Sk) shape, zero where no key is visible;
  // the caller sums broadcast dims.
  at::Tensor dbias = bias_requires_grad ? at::zeros({B, H, Sq, Sk}, q.options().dtype(at::kFloat))
                                        : at::empty({0}, q.options().dtype(at::kFloat));
  p.dbias = bias_requires_grad ? dbias.data_ptr<float>() : nullptr;
  p.out = const_cast<void*>(out.data_ptr());
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.lse = const_cast<void*>(lse_c.data_ptr());
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dq = dq.data_ptr();
  p.dq_batch_stride = dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk = dk_h.data_ptr();
  p.dk_batch_stride = dk_h.stride(0), p.dk_row_stride = dk_h.stride(1), p.dk_head_stride = dk_h.stride(2);
  p.dv = dv_h.data_ptr();
  p.dv_batch_stride = dv_h.stride(0), p.dv_row_stride = dv_h.stride(1), p.dv_head_stride = dv_h.stride(2);
  p.deterministic = deterministic;

  const cudaError_t err =
      run_flash_bwd(p, q.scalar_type() == at::kBFloat16, deterministic ? nullptr : dq_accum.data_ptr<float>(),
                    softmax_d.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "flashattn::bwd CUDA kernel failed: ", cudaGetErrorString(err));

  at::Tensor dk = dk_h, dv = dv_h;
  if (group > 1) {
    // Query head h = hk * group + r reads kv head hk.
    dk = dk_h.view({B, Sk, Hk, group, D}).sum(3, /*keepdim=*/false, at::kFloat).to(q.scalar_type());
    dv = dv_h.view({B, Sk, Hk, group, Dv}).sum(3, /*keepdim=*/false, at::kFloat).to(q.scalar_type());
  }
  return {dq, dk, dv, dbias};
}

}  // namespace

// dropout_mask has no CUDA impl: its rng_state argument is a CPU tensor, so dispatch goes
// to the CPU impl, whose Philox draws are the CUDA kernels' (cuda/philox.cuh) bit for bit.
TORCH_LIBRARY_IMPL(flashattn, CUDA, m) {
  m.impl("fwd", &fwd_cuda);
  m.impl("bwd", &bwd_cuda);
}

}  // namespace flashattn
