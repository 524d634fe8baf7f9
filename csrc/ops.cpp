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
#include "params_from_tensors.h"

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
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_dtype(q)));
  FlashParams p;
  fill_params(p, q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset, dropout_p,
              rng_state);
  fill_output(p, out, lse);
  FLASHATTN_DISPATCH_CPU(q.scalar_type(), "flashattn::fwd", [&] { cpu::flash_fwd<scalar_t>(p); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
    double scale, double softcap, int64_t window_left, int64_t window_right, int64_t diag_offset, double dropout_p,
    const std::optional<at::Tensor>& rng_state, bool deterministic, bool bias_requires_grad) {
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q), "flashattn: lse dtype does not match q");
  const at::Tensor lse_c = lse.contiguous();  // kept alive: the params point into it
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  FlashBwdParams p;
  fill_params(p, q, k, v, alibi_slopes, attn_bias, scale, softcap, window_left, window_right, diag_offset, dropout_p,
              rng_state);
  fill_output(p, out, lse_c);
  fill_grads(p, dout, dq, dk, dv);
  at::Tensor dbias = make_dbias(p, q, attn_bias, bias_requires_grad);
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
