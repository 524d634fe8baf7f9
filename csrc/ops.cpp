// The flashattn custom ops: schemas, and their CPU implementations (tensor -> params ->
// kernel). CUDA implementations of the same schemas live in ops_cuda.cpp.
//
// These ops are internal: flashattn_py/api.py validates user input and normalises the
// layout before calling them, so the checks here guard only the kernels' preconditions.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cpu/flash_cpu.h"
#include "flash_params.h"

// A Python module, so that `import flashattn_py._C` loads the library and runs the
// registrations below (the pattern of pytorch/extension-cpp).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace flashattn {

namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flashattn: q, k, v must be 4-D (B, S, H, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flashattn: q, k, v must share a dtype");
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1,
              "flashattn: the head dimension must be contiguous (stride 1)");
  TORCH_CHECK(q.size(0) == k.size(0) && k.sizes().slice(0, 3) == v.sizes().slice(0, 3),
              "flashattn: batch / seqlen / heads of q, k, v disagree");
  TORCH_CHECK(q.size(3) == k.size(3), "flashattn: q and k head dims differ");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "flashattn: num_heads must be a multiple of num_heads_k");
}

void fill_common(FlashParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
                 double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset,
                 double dropout_p, const std::optional<at::Tensor>& rng_state) {
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
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.stride(-1) == 1, "flashattn: alibi_slopes must be float32, contiguous");
    TORCH_CHECK(a.size(-1) == p.num_heads && (a.dim() == 1 || (a.dim() == 2 && a.size(0) == p.batch)),
                "flashattn: alibi_slopes must be (H,) or (B, H)");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? a.stride(0) : 0;
  }
  if (attn_bias.has_value()) {
    const at::Tensor& m = *attn_bias;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.batch && m.size(1) == p.num_heads && m.size(2) == p.seqlen_q &&
                    m.size(3) == p.seqlen_k,
                "flashattn: attn_bias must be (B, H, Sq, Sk) (broadcast dims with stride 0)");
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                "flashattn: attn_bias must be bool or the dtype of q");
    p.bias = m.data_ptr();
    p.bias_is_bool = m.scalar_type() == at::kBool;
    p.bias_batch_stride = m.stride(0), p.bias_head_stride = m.stride(1);
    p.bias_row_stride = m.stride(2), p.bias_col_stride = m.stride(3);
  }
  p.dropout_p = static_cast<float>(dropout_p);
  if (dropout_p > 0) {
    TORCH_CHECK(rng_state.has_value() && rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 &&
                    rng_state->device().is_cpu(),
                "flashattn: dropout needs rng_state, an int64 CPU tensor [seed, offset]");
    const at::Tensor st = rng_state->contiguous();
    p.dropout_seed = static_cast<uint64_t>(st.data_ptr<int64_t>()[0]);
    p.dropout_offset = static_cast<uint64_t>(st.data_ptr<int64_t>()[1]);
  }
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

#define FLASHATTN_DISPATCH_CPU(dtype, NAME, ...)                                          \
  AT_DISPATCH_SWITCH(dtype, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)               \
                         AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__)                        \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                 AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& alibi_slopes,
                                           const std::optional<at::Tensor>& attn_bias, double scale, double softcap,
                                           int64_t window_left, int64_t window_right, int64_t diag_offset,
                                           double dropout_p, const std::optional<at::Tensor>& rng_state) {
  check_inputs(q, k, v);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_dtype(q)));
  FlashParams p;
  fill_common(p, q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset, dropout_p,
              rng_state);
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.lse = lse.data_ptr();
  FLASHATTN_DISPATCH_CPU(q.scalar_type(), "flashattn::fwd", [&] { cpu::flash_fwd<scalar_t>(p); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
    double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset, double dropout_p,
    const std::optional<at::Tensor>& rng_state, bool deterministic, bool bias_requires_grad) {
  check_inputs(q, k, v);
  TORCH_CHECK(dout.sizes() == out.sizes() && dout.stride(-1) == 1 && out.stride(-1) == 1,
              "flashattn: dout must match out, with a contiguous head dimension");
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q), "flashattn: lse dtype does not match q");
  at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  FlashBwdParams p;
  fill_common(p, q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset, dropout_p,
              rng_state);
  // The bias gradient in the expanded (B, H, Sq, Sk) shape; the caller sums broadcast dims.
  at::Tensor dbias = bias_requires_grad
                         ? at::zeros({q.size(0), q.size(2), q.size(1), k.size(1)}, q.options().dtype(at::kFloat))
                         : at::empty({0}, q.options().dtype(at::kFloat));
  TORCH_CHECK(!bias_requires_grad || (attn_bias.has_value() && attn_bias->scalar_type() != at::kBool),
              "flashattn: bias_requires_grad needs a float attn_bias");
  p.dbias = bias_requires_grad ? dbias.data_ptr<float>() : nullptr;
  p.out = const_cast<void*>(out.data_ptr());
  p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
  p.lse = lse_c.data_ptr();
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dq = dq.data_ptr();
  p.dq_batch_stride = dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk = dk.data_ptr();
  p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  p.dv = dv.data_ptr();
  p.dv_batch_stride = dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
  p.deterministic = deterministic;
  FLASHATTN_DISPATCH_CPU(q.scalar_type(), "flashattn::bwd", [&] { cpu::flash_bwd<scalar_t>(p); });
  return {dq, dk, dv, dbias};
}

// The test hook: the keep-mask (B, H, Sq, Sk) that the CPU kernels draw for rng_state.
at::Tensor dropout_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t num_heads, int64_t seqlen_q,
                            int64_t seqlen_k, double dropout_p) {
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2, "flashattn: rng_state must be int64[2]");
  const at::Tensor st = rng_state.contiguous();
  const uint64_t seed = st.data_ptr<int64_t>()[0], offset = st.data_ptr<int64_t>()[1];
  at::Tensor keep = at::empty({batch, num_heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, batch * num_heads * seqlen_q, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      cpu::dropout_keep_row(seed, offset, static_cast<float>(dropout_p), seqlen_k, row, 0, seqlen_k,
                            out + row * seqlen_k);
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY(flashattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, Tensor? attn_bias, float scale, float softcap, "
      "int window_left, int window_right, int diag_offset, float dropout_p, Tensor? rng_state) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? alibi_slopes, "
      "Tensor? attn_bias, float scale, float softcap, int window_left, int window_right, int diag_offset, "
      "float dropout_p, Tensor? rng_state, bool deterministic, bool bias_requires_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  m.def("dropout_mask(Tensor rng_state, int batch, int num_heads, int seqlen_q, int seqlen_k, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashattn, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace flashattn
