// The flashattn custom ops: schemas, and their CPU implementations (tensor -> params ->
// kernel). CUDA implementations of the same schemas live in ops_cuda.cpp.
//
// These ops are internal: flashattn_py/api.py validates user input and normalises the
// layout before calling them, so the checks here guard only the kernels' preconditions.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cpu/dropout.h"
#include "cpu/isa_select.h"
#include "flash_params.h"
#include "params_from_tensors.h"

namespace flashattn {

namespace {

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernel tables' index of q's element type (kernel_table.h).
int cpu_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return static_cast<int>(cpu::Dtype::Float);
    case at::kDouble: return static_cast<int>(cpu::Dtype::Double);
    case at::kBFloat16: return static_cast<int>(cpu::Dtype::BFloat16);
    case at::kHalf: return static_cast<int>(cpu::Dtype::Half);
    default: TORCH_CHECK(false, "flashattn: CPU kernels take float32, float64, bfloat16 or float16, got ", q.scalar_type());
  }
}

// The CPU kernels of the selected instruction set (errors as Python's ValueError / RuntimeError).
const cpu::KernelTable& cpu_kernels() {
  try {
    return cpu::kernels();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

// The forward on q, k, v in `layout`; out comes back in the same layout (its memory
// (B, Sq, H, Dv) either way).
std::tuple<at::Tensor, at::Tensor> fwd_cpu_layout(const AttnArgs& args, Layout layout) {
  const at::Tensor& q = args.q;
  FlashParams p;
  fill_params(p, args, layout);
  const auto [B, Sq] = q_rows(p);
  const int64_t H = p.num_heads, Dv = p.head_dim_v;
  at::Tensor out = layout.seq == 1 ? at::empty({B, Sq, H, Dv}, q.options())
                                   : at::empty_strided({B, H, Sq, Dv}, {Sq * H * Dv, Dv, H * Dv, 1}, q.options());
  at::Tensor lse = at::empty({B, H, Sq}, q.options().dtype(lse_dtype(q)));
  if (args.cu_seqlens_q.has_value()) {  // rows in no sequence are never written: defined as out 0, lse -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  fill_output(p, out, lse, layout);
  cpu_kernels().fwd[cpu_dtype(q)](p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v FLASHATTN_PROBLEM_PARAMS) {
  return fwd_cpu_layout({q, k, v FLASHATTN_PROBLEM_NAMES}, Layout{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse FLASHATTN_PROBLEM_PARAMS, bool deterministic, bool bias_requires_grad) {
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q), "flashattn: lse dtype does not match q");
  TORCH_CHECK(!block_table.has_value() && !kv_batch_idx.has_value() && !leftpad_k.has_value(),
              "flashattn: the backward of KV-cache calls (block_table, kv_batch_idx, leftpad_k) is not supported");
  (void)num_splits;  // (the CPU backward splits keys by its own heuristic)
  const at::Tensor lse_c = lse.contiguous();  // kept alive: the params point into it
  // Rows outside every sequence (and keys past seqused_k) get no gradient from the
  // kernel: zeros.
  const bool partial = cu_seqlens_q.has_value() || cu_seqlens_k.has_value() || seqused_k.has_value();
  at::Tensor dq = partial ? at::zeros_like(q) : at::empty_like(q), dk = partial ? at::zeros_like(k) : at::empty_like(k),
             dv = partial ? at::zeros_like(v) : at::empty_like(v);
  const AttnArgs args{q, k, v FLASHATTN_PROBLEM_NAMES};
  FlashBwdParams p;
  fill_params(p, args);
  fill_output(p, out, lse_c);
  fill_grads(p, dout, dq, dk, dv);
  at::Tensor dbias = make_dbias(p, q, attn_bias, bias_requires_grad);
  p.deterministic = deterministic;
  cpu_kernels().bwd[cpu_dtype(q)](p);
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

// flashattn_py._C.fwd_inference(q, k, v, alibi_slopes, attn_bias, scale, softcap,
//     window_left, window_right, diag_offset, dropout_p, rng_state, heads_first) -> (out, lse)
// flashattn::fwd on CPU tensors for eager calls that need no autograd and no tracing
// (flashattn_py/ops.py decides), called straight from Python: torch.ops' boxed call
// (argument matching, the torch-function and autograd fallbacks) costs about as much as
// a decode-sized kernel. heads_first takes q, k, v (and returns out) as (B, H, S, D), SDPA's
// layout, so its callers need no transposes either. q, k, v and alibi_slopes with a strided
// last dimension are copied first (as the op's Python callers do); attn_bias is read through
// its strides (a mask broadcast over keys has stride 0 there: no copy).
PyObject* fwd_inference(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *q, *k, *v, *alibi_slopes, *attn_bias, *rng_state;
  double scale, softcap, dropout_p;
  long long window_left, window_right, diag_offset;
  int heads_first;
  if (!PyArg_ParseTuple(args, "OOOOOddLLLdOp", &q, &k, &v, &alibi_slopes, &attn_bias, &scale, &softcap, &window_left,
                        &window_right, &diag_offset, &dropout_p, &rng_state, &heads_first)) {
    return nullptr;
  }
  auto tensor = [](PyObject* obj, const char* name) {
    TORCH_CHECK_TYPE(THPVariable_Check(obj), "flashattn: ", name, " must be a tensor");
    return THPVariable_Unpack(obj);
  };
  // fill_params wants rows with a contiguous last dimension.
  auto rows = [&](PyObject* obj, const char* name) {
    const at::Tensor& t = tensor(obj, name);
    return t.dim() > 0 && t.stride(-1) != 1 ? t.contiguous() : t;
  };
  auto optional = [&](PyObject* obj, const char* name) -> std::optional<at::Tensor> {
    if (obj == Py_None) return std::nullopt;
    return tensor(obj, name);
  };
  const at::Tensor qt = rows(q, "q"), kt = rows(k, "k"), vt = rows(v, "v");
  TORCH_CHECK(qt.device().is_cpu(), "flashattn: fwd_inference runs on CPU tensors");
  const auto bias = optional(attn_bias, "attn_bias"), rng = optional(rng_state, "rng_state");
  std::optional<at::Tensor> slopes;
  if (alibi_slopes != Py_None) slopes = rows(alibi_slopes, "alibi_slopes");
  std::tuple<at::Tensor, at::Tensor> result;
  {
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("flashattn::fwd", std::vector<c10::IValue>({qt, kt, vt}));
    result = fwd_cpu_layout({qt, kt, vt, slopes, bias, scale, softcap, window_left, window_right, diag_offset,
                             dropout_p, rng},
                            heads_first ? HEADS_FIRST : Layout{});
  }
  PyObject* pair = PyTuple_New(2);
  if (pair == nullptr) return nullptr;
  PyTuple_SET_ITEM(pair, 0, THPVariable_Wrap(std::get<0>(result)));
  PyTuple_SET_ITEM(pair, 1, THPVariable_Wrap(std::get<1>(result)));
  return pair;
  END_HANDLE_TH_ERRORS
}

// The module's CPU_ISA (the instruction set of the CPU kernels in use) and CPU_KERNELS
// (that, and the paths its kernels have): benchmarks record them, tests ask which paths to
// expect. A bad FLASHATTN_CPU_ISA raises ValueError.
bool publish_cpu_kernels(PyObject* module) {
  const cpu::KernelTable* table;
  try {
    table = &cpu::select_kernels();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return false;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return false;
  }
  const std::string kernels = std::string(table->isa) + ": " + table->features;
  return PyModule_AddStringConstant(module, "CPU_ISA", table->isa) == 0 &&
         PyModule_AddStringConstant(module, "CPU_KERNELS", kernels.c_str()) == 0;
}

// flashattn_py._C.reload_cpu_switches(): choose the CPU kernels again, reading
// FLASHATTN_CPU_ISA, FLASHATTN_CPU_TILES and FLASHATTN_CPU_BF16_DOT (each read once
// otherwise), for tests and benchmarks that compare paths.
PyObject* reload_cpu_switches(PyObject* module, PyObject* /*args*/) {
  if (!publish_cpu_kernels(module)) return nullptr;
  Py_RETURN_NONE;
}

}  // namespace

TORCH_LIBRARY(flashattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, Tensor? attn_bias, float scale, float softcap, "
      "int window_left, int window_right, int diag_offset, float dropout_p, Tensor? rng_state, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, Tensor? block_table, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, bool bottom_right, Tensor? kv_batch_idx, Tensor? leftpad_k, int num_splits) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? alibi_slopes, "
      "Tensor? attn_bias, float scale, float softcap, int window_left, int window_right, int diag_offset, "
      "float dropout_p, Tensor? rng_state, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, "
      "Tensor? block_table, SymInt max_seqlen_q, SymInt max_seqlen_k, bool bottom_right, Tensor? kv_batch_idx, "
      "Tensor? leftpad_k, int num_splits, bool deterministic, bool bias_requires_grad) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  m.def("dropout_mask(Tensor rng_state, int batch, int num_heads, int seqlen_q, int seqlen_k, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashattn, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace flashattn

// A Python module, so that `import flashattn_py._C` loads the library and runs the
// registrations above (the pattern of pytorch/extension-cpp), with the inference entry.
extern "C" {
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"fwd_inference", flashattn::fwd_inference, METH_VARARGS, "flashattn::fwd for eager inference calls"},
      {"reload_cpu_switches", flashattn::reload_cpu_switches, METH_NOARGS,
       "choose the CPU kernels again (FLASHATTN_CPU_ISA, FLASHATTN_CPU_TILES, FLASHATTN_CPU_BF16_DOT)"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && !flashattn::publish_cpu_kernels(module)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
