// The flashattn custom ops: schemas, and their CPU implementations (tensor -> params ->
// kernel). CUDA implementations of the same schemas live in ops_cuda.cpp.
//
// Built against PyTorch's LibTorch stable ABI (torch/csrc/stable, TORCH_TARGET_VERSION =
// torch 2.11; setup.py), and as a limited-API (abi3) Python module: one binary loads on
// every torch from 2.11 on and every CPython from 3.10 on.
//
// These ops are internal: flashattn_py/api.py validates user input and normalises the
// layout before calling them, so the checks here guard only the kernels' preconditions.
// A failed check raises RuntimeError.
#include <Python.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/dropout.h"
#include "cpu/isa_select.h"
#include "cpu_output_memory.h"
#include "flash_params.h"
#include "params_from_tensors.h"

namespace flashattn {

namespace {

int32_t lse_dtype(const TensorInfo& q) { return q.dtype == codes().f64 ? codes().f64 : codes().f32; }

// The kernel tables' index of q's element type (kernel_table.h).
int cpu_dtype(const TensorInfo& q) {
  const ShimCodes& c = codes();
  if (q.dtype == c.f32) return static_cast<int>(cpu::Dtype::Float);
  if (q.dtype == c.f64) return static_cast<int>(cpu::Dtype::Double);
  if (q.dtype == c.bf16) return static_cast<int>(cpu::Dtype::BFloat16);
  if (q.dtype == c.f16) return static_cast<int>(cpu::Dtype::Half);
  STD_TORCH_CHECK(false, "flashattn: CPU kernels take float32, float64, bfloat16 or float16, got ", dtype_name(q.dtype));
  return -1;
}

// The CPU kernels of the selected instruction set.
const cpu::KernelTable& cpu_kernels() {
  try {
    return cpu::kernels();
  } catch (const std::exception& e) {
    STD_TORCH_CHECK(false, e.what());
  }
  throw std::logic_error("unreachable");
}

// A path given for the call (flashattn_py/ops.py: the one choose_cpu_path() gave for its
// forward, kept for its backward) must be one these kernels run on this CPU.
// A backward never takes FORWARD_ONLY (kernel_table.h): its forward said no backward follows.
void check_cpu_path(const cpu::KernelTable& table, const FlashParams& p, int dtype, bool backward = false) {
  STD_TORCH_CHECK(p.cpu_path == 0 || table.path_runs[dtype](p.cpu_path), "flashattn: cpu_path ", p.cpu_path,
                  " is not a path the ", table.isa, " CPU kernels run for ", cpu::kDtypeNames[dtype],
                  " (0: chosen per call)");
  STD_TORCH_CHECK(!backward || p.cpu_path < 0 || (p.cpu_path & cpu::FORWARD_ONLY) == 0, "flashattn: cpu_path ",
                  p.cpu_path, " marks a forward that no backward follows (CPU_FORWARD_ONLY): not a backward's");
}

// A new CPU tensor of `dtype` with `sizes` and dense `strides` (non-overlapping, the
// storage exactly numel elements): in CpuOutputMemory's blocks from
// 8 MiB on (cpu_output_memory.h), its storage's deleter handing the block back; smaller
// ones (or where no block can be mapped) from torch.
Tensor new_cpu_output(int64_t ndim, const int64_t* sizes, const int64_t* strides, int32_t dtype,
                      const TensorInfo& like) {
  int64_t numel = 1;
  for (int64_t d = 0; d < ndim; ++d) numel *= sizes[d];
  const size_t bytes = static_cast<size_t>(numel) * aoti_torch_dtype_element_size(dtype);
  AtenTensorHandle h = nullptr;
  if (bytes >= CpuOutputMemory::MIN_BYTES) {
    const auto [block, block_size] = CpuOutputMemory::instance().take(bytes);
    if (block != nullptr) {
      auto give_back = [](void* data, void* size) {
        CpuOutputMemory::instance().give(data, reinterpret_cast<uintptr_t>(size));
      };
      void* size = reinterpret_cast<void*>(static_cast<uintptr_t>(block_size));
      // (On failure the block is not handed back: the deleter may have run already.)
      FLASHATTN_SHIM(torch_from_blob(block, ndim, sizes, strides, 0, dtype, like.device_type, like.device_index, &h,
                                     aoti_torch_layout_strided(), nullptr, 0, give_back, size));
      return Tensor(h);
    }
  }
  FLASHATTN_SHIM(aoti_torch_empty_strided(ndim, sizes, strides, dtype, like.device_type, like.device_index, &h));
  return Tensor(h);
}

// The same for 4-D (B, S, H, D) or, with `layout` heads first, (B, H, S, D) sizes over
// (B, S, H, D) memory (the forward's out in q's layout).
Tensor new_cpu_output(const int64_t (&bshd)[4], int32_t dtype, const TensorInfo& like, Layout layout = Layout{}) {
  const int64_t B = bshd[0], S = bshd[1], H = bshd[2], D = bshd[3];
  if (layout.seq == 1) {
    int64_t strides[4];
    contiguous_strides(4, bshd, strides);
    return new_cpu_output(4, bshd, strides, dtype, like);
  }
  const int64_t sizes[4] = {B, H, S, D}, strides[4] = {S * H * D, D, H * D, 1};
  return new_cpu_output(4, sizes, strides, dtype, like);
}

// Packed sequences on the CPU: the first row (of `total`) the kernels do not write, the
// end of the last sequence when the offsets `cu` rise from 0 in steps of at most
// `max_len` (each sequence's rows are then written by its tasks: the forward's query
// rows, the backward's dq, dk and dv rows), else 0.
int64_t unwritten_rows_from(const int32_t* cu, int64_t batch, int64_t max_len, int64_t total) {
  if (cu[0] != 0) return 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (cu[b + 1] < cu[b] || cu[b + 1] - int64_t(cu[b]) > max_len) return 0;
  }
  return std::min<int64_t>(cu[batch], total);
}

// Clears rows [first, end) of t along dimension `seq` (all of t when first is 0).
void zero_rows_from(Tensor t, int64_t seq, int64_t first) {
  const int64_t end = TensorInfo(t).size(seq);
  if (first < end) zero(first == 0 ? t : torch::stable::narrow(t, seq, first, end - first));
}

// The forward on q, k, v in `layout`; out comes back in the same layout (its memory
// (B, Sq, H, Dv) either way).
std::tuple<Tensor, Tensor> fwd_cpu_layout(const AttnArgs& args, Layout layout) {
  FlashParams p;
  const TensorInfo q = fill_params(p, args, layout);
  const int dtype = cpu_dtype(q);  // (before anything is written)
  const auto [B, Sq] = q_rows(p);
  const int64_t H = p.num_heads, Dv = p.head_dim_v;
  Tensor out = new_cpu_output({B, Sq, H, Dv}, q.dtype, q, layout);
  Tensor lse = new_tensor({B, H, Sq}, lse_dtype(q), q);
  if (args.cu_seqlens_q.has_value()) {  // rows in no sequence are never written: defined as out 0, lse -inf
    // Offsets rising from 0 (the API's check) leave only the rows after the last
    // sequence; any other values (the op called directly) get everything cleared.
    const int64_t first = unwritten_rows_from(p.cu_seqlens_q, p.batch, p.seqlen_q, p.total_q);
    zero_rows_from(out, layout.seq, first);
    torch::stable::fill_(first == 0 ? lse : torch::stable::narrow(lse, 2, first, p.total_q - first),
                         -std::numeric_limits<double>::infinity());
  }
  fill_output(p, out, lse, layout);
  const cpu::KernelTable& kernels = cpu_kernels();
  check_cpu_path(kernels, p, dtype);
  kernels.fwd[dtype](p);
  return {out, lse};
}

std::tuple<Tensor, Tensor> fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v FLASHATTN_PROBLEM_PARAMS) {
  return fwd_cpu_layout({q, k, v FLASHATTN_PROBLEM_NAMES}, Layout{});
}

// An empty tensor like t (torch.empty_like: t's strides where t is dense, which
// is then exactly the memory t's elements take; else torch's choice, unless that has no
// unit stride in the last dim, as for overlapping rows: then contiguous, since the kernels
// write a gradient's rows element after element).
Tensor grad_like(const Tensor& t) {
  const TensorInfo ti(t);
  std::vector<int64_t> order(ti.dim);
  for (int64_t d = 0; d < ti.dim; ++d) order[d] = d;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ti.stride(a) > ti.stride(b); });
  bool dense = true;
  int64_t expected = 1;
  for (int64_t i = ti.dim - 1; i >= 0; --i) {  // dims from the smallest stride outwards
    const int64_t size = ti.size(order[i]);
    dense &= size == 1 || ti.stride(order[i]) == expected;
    expected *= size;
  }
  Tensor g = dense && expected > 0 ? new_cpu_output(ti.dim, ti.sizes_, ti.strides_, ti.dtype, ti)
                                   : torch::stable::empty_like(t);
  if (ti.dim > 0 && ti.size(-1) > 1 && TensorInfo(g).stride(-1) != 1) {
    std::vector<int64_t> strides(ti.dim);
    contiguous_strides(ti.dim, ti.sizes_, strides.data());
    g = new_cpu_output(ti.dim, ti.sizes_, strides.data(), ti.dtype, ti);
  }
  return g;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& out,
                                                   const Tensor& lse FLASHATTN_PROBLEM_PARAMS, bool deterministic,
                                                   bool bias_requires_grad) {
  (void)num_splits;  // (the CPU backward splits keys by its own heuristic)
  STD_TORCH_CHECK(!block_table.has_value() && !kv_batch_idx.has_value() && !leftpad_k.has_value(),
                  "flashattn: the backward of KV-cache calls (block_table, kv_batch_idx, leftpad_k) is not supported");
  const Tensor lse_c = TensorInfo(lse).is_contiguous() ? lse : torch::stable::contiguous(lse);  // the params point into it
  cpu_dtype(TensorInfo(q));  // (a CPU dtype, before anything is written)
  const Tensor dq = grad_like(q), dk = grad_like(k), dv = grad_like(v);
  const AttnArgs args{q, k, v FLASHATTN_PROBLEM_NAMES};
  FlashBwdParams p;
  const TensorInfo qi = fill_params(p, args);
  // The kernel writes every row of every sequence of dq, dk and dv (keys no query sees as
  // 0), from its tasks, one per query head. Rows outside every sequence (and keys past
  // seqused_k) get nothing: zeros. Offsets rising from 0 (the API's check) leave only the
  // rows after the last sequence (dq: packed queries; dk, dv: packed keys without
  // seqused_k); other offsets clear the whole gradient first, as do dense queries over
  // packed keys (dq) and calls without query heads (dk, dv: no task runs).
  if (cu_seqlens_q.has_value()) {
    zero_rows_from(dq, 1, unwritten_rows_from(p.cu_seqlens_q, p.batch, p.seqlen_q, p.total_q));
  } else if (cu_seqlens_k.has_value() || seqused_k.has_value()) {
    zero(dq);
  }
  if (cu_seqlens_k.has_value() || seqused_k.has_value() || p.num_heads == 0) {
    const int64_t first_k = cu_seqlens_k.has_value() && !seqused_k.has_value() && p.num_heads > 0
                                ? unwritten_rows_from(p.cu_seqlens_k, p.batch, p.seqlen_k, p.total_k)
                                : 0;
    zero_rows_from(dk, 1, first_k);
    zero_rows_from(dv, 1, first_k);
  }
  STD_TORCH_CHECK(TensorInfo(lse_c).dtype == lse_dtype(qi), "flashattn: lse dtype does not match q");
  fill_output(p, out, lse_c);
  fill_grads(p, dout, dq, dk, dv);
  Tensor dbias = make_dbias(p, qi, attn_bias, bias_requires_grad);
  p.deterministic = deterministic;
  const int dtype = cpu_dtype(qi);
  const cpu::KernelTable& kernels = cpu_kernels();
  check_cpu_path(kernels, p, dtype, /*backward=*/true);
  kernels.bwd[dtype](p);
  return {dq, dk, dv, dbias};
}

// The test hook: the keep-mask (B, H, Sq, Sk) that the CPU kernels draw for rng_state.
Tensor dropout_mask_cpu(const Tensor& rng_state, int64_t batch, int64_t num_heads, int64_t seqlen_q, int64_t seqlen_k,
                        double dropout_p) {
  const TensorInfo r(rng_state);
  STD_TORCH_CHECK(r.dtype == codes().i64 && r.numel() == 2 && r.is_cpu(), "flashattn: rng_state must be int64[2]");
  const Tensor st = r.is_contiguous() ? rng_state : torch::stable::contiguous(rng_state);
  const int64_t* state = static_cast<const int64_t*>(TensorInfo(st).data);
  const uint64_t seed = state[0], offset = state[1];
  Tensor keep = new_tensor({batch, num_heads, seqlen_q, seqlen_k}, codes().b, r);
  bool* out = static_cast<bool*>(keep.data_ptr());
  torch::stable::parallel_for(0, batch * num_heads * seqlen_q, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      cpu::dropout_keep_row(seed, offset, static_cast<float>(dropout_p), seqlen_k, row, 0, seqlen_k,
                            out + row * seqlen_k);
    }
  });
  return keep;
}

// flashattn::kvcache_write(k_cache!, v_cache!, k, v, cache_seqlens, cache_batch_idx?,
//     block_table?) -> ()
// flash_attn_with_kvcache's append (flashattn_py/kvcache.py; CUDA impl in ops_cuda.cpp):
// new keys and values k, v (B, S_new, Hk, D / Dv) written in place at slots
// cache_seqlens[b] + i of batch entry b's cache row (cache_batch_idx[b], else b; dense
// caches (B_cache, S_cache, Hk, D)) or of its pages (block_table[b]; paged caches
// (num_blocks, page_size, Hk, D)), every index clamped into the caches
// (flash_params.h kvcache_destination, which the CUDA kernel runs too), so no value writes
// out of bounds. Values are checked only by the Python caller, where it can read them (CPU
// tensors, not while torch.compile traces): where clamping maps several rows onto one
// slot, which of them lands there is unspecified (as with index_put_). One op instead of
// the dozen tensor ops that computed the indices and scattered the rows (95-140 us a
// decoding step on the development VM's CPU, about 15 us now).
namespace {
// Row (b, i) of `r.src` (heads x r.width elements) into row `row` of `r.dst`'s entry `entry`.
void copy_row(const KvcacheWriteParams::Rows& r, int64_t heads, int64_t b, int64_t i, int64_t entry, int64_t row,
              int64_t element_size) {
  const char* from = static_cast<const char*>(r.src) + (b * r.src_stride[0] + i * r.src_stride[1]) * element_size;
  char* to = static_cast<char*>(r.dst) + (entry * r.dst_stride[0] + row * r.dst_stride[1]) * element_size;
  for (int64_t h = 0; h < heads; ++h) {
    const char* f = from + h * r.src_stride[2] * element_size;
    char* t = to + h * r.dst_stride[2] * element_size;
    if (r.src_stride[3] == 1 && r.dst_stride[3] == 1) {
      std::memcpy(t, f, r.width * element_size);
    } else {
      for (int64_t e = 0; e < r.width; ++e) {
        std::memcpy(t + e * r.dst_stride[3] * element_size, f + e * r.src_stride[3] * element_size, element_size);
      }
    }
  }
}
}  // namespace

void kvcache_write_cpu(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                       const Tensor& cache_seqlens, const OptTensor& cache_batch_idx, const OptTensor& block_table) {
  const KvcacheWriteArgs a(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table);
  STD_TORCH_CHECK(a.k_cache.is_cpu(), "flashattn: kvcache_write's CPU impl takes CPU tensors");
  KvcacheWriteParams p = a.params();
  if (p.batch * p.new_keys == 0 || kvcache_capacity(p) == 0 || p.entries == 0) return;
  // New keys / values in the caches' own memory (k = k_cache[:, 3:6]; a compiler may also
  // drop the caller's copy) are read from a copy taken first: written in place, rows read
  // later would be ones already overwritten.
  std::vector<char> staged;
  if (a.new_rows_overlap_caches()) {
    const int64_t rows = p.batch * p.new_keys, k_bytes = p.heads * p.k.width * p.element_size;
    staged.resize(static_cast<size_t>(rows * (k_bytes + p.heads * p.v.width * p.element_size)));
    char* at = staged.data();
    for (KvcacheWriteParams::Rows* r : {&p.k, &p.v}) {
      KvcacheWriteParams::Rows copy = *r;  // rows (b, i) of the new keys to entry b, row i, packed
      copy.dst = at;
      const int64_t strides[4] = {p.new_keys * p.heads * r->width, p.heads * r->width, r->width, 1};
      std::copy(strides, strides + 4, copy.dst_stride);
      for (int64_t idx = 0; idx < rows; ++idx) {
        copy_row(copy, p.heads, idx / p.new_keys, idx % p.new_keys, idx / p.new_keys, idx % p.new_keys,
                 p.element_size);
      }
      r->src = at;
      std::copy(strides, strides + 4, r->src_stride);
      at += rows * p.heads * r->width * p.element_size;
    }
  }
  // (rows of Hk x D elements: small appends (decoding) stay on the calling thread)
  const int64_t row_bytes = std::max<int64_t>(1, p.heads * p.k.width * p.element_size);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / row_bytes);
  torch::stable::parallel_for(0, p.batch * p.new_keys, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / p.new_keys, i = idx % p.new_keys;
      int64_t entry, row;
      kvcache_destination(p, b, i, &entry, &row);
      copy_row(p.k, p.heads, b, i, entry, row, p.element_size);
      copy_row(p.v, p.heads, b, i, entry, row, p.element_size);
    }
  });
}

// flashattn::fwd_inference(q, k, v, <the dense arguments of FLASHATTN_DENSE_ARGS>,
//     heads_first) -> (out, lse)
// flashattn::fwd for eager CPU calls that need no autograd and no tracing (flashattn_py/ops.py
// decides): the dense arguments only (a short schema: torch.ops parses fewer), registered
// for AutogradCPU as well as CPU, so the dispatcher reaches it at the first key with no
// autograd fallback and no redispatch. heads_first takes q, k, v (and returns out) as
// (B, H, S, D), SDPA's layout, so its callers need no transposes either. q, k, v and
// alibi_slopes with a strided last dimension are copied first (as the op's Python callers
// do); attn_bias is read through its strides (a mask broadcast over keys has stride 0 there:
// no copy).
std::tuple<Tensor, Tensor> fwd_inference(const Tensor& q, const Tensor& k, const Tensor& v FLASHATTN_DENSE_PARAMS,
                                         bool heads_first) {
  AttnArgs args{rows_contiguous(q), rows_contiguous(k), rows_contiguous(v) FLASHATTN_DENSE_NAMES};
  if (args.alibi_slopes.has_value()) args.alibi_slopes = rows_contiguous(*args.alibi_slopes);
  int32_t device_type = 0;
  FLASHATTN_SHIM(aoti_torch_get_device_type(args.q.get(), &device_type));
  STD_TORCH_CHECK(device_type == codes().cpu, "flashattn: fwd_inference runs on CPU tensors");
  args.cpu_path = cpu::FORWARD_ONLY;  // (no autograd: nothing differentiates this call)
  return fwd_cpu_layout(args, heads_first ? HEADS_FIRST : Layout{});
}

// The module's CPU_ISA (the instruction set of the CPU kernels in use) and CPU_KERNELS
// (that, and the paths its kernels have): benchmarks record them, tests ask which paths to
// expect. A bad FLASHATTN_CPU_ISA raises ValueError.
// A library that cannot be loaded raises `load_error` (ImportError on import, so the package
// falls back to its other backends; RuntimeError on a reload).
bool publish_cpu_kernels(PyObject* module, PyObject* load_error) {
  const cpu::KernelTable* table;
  try {
    table = &cpu::select_kernels();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return false;
  } catch (const std::exception& e) {
    PyErr_SetString(load_error, e.what());
    return false;
  }
  const std::string kernels = std::string(table->isa) + ": " + table->features;
  PyObject* dtypes = PyTuple_New(cpu::kNumDtypes);
  if (dtypes == nullptr) return false;
  for (int i = 0; i < cpu::kNumDtypes; ++i) {
    PyObject* name = PyUnicode_FromString(cpu::kDtypeNames[i]);
    if (name == nullptr || PyTuple_SetItem(dtypes, i, name) != 0) {
      Py_DECREF(dtypes);
      return false;
    }
  }
  // (PyModule_AddObject steals the reference only on success)
  if (PyModule_AddObject(module, "CPU_DTYPES", dtypes) != 0) {
    Py_DECREF(dtypes);
    return false;
  }
  return PyModule_AddIntConstant(module, "CPU_FORWARD_ONLY", cpu::FORWARD_ONLY) == 0 &&
         PyModule_AddStringConstant(module, "CPU_ISA", table->isa) == 0 &&
         PyModule_AddStringConstant(module, "CPU_KERNELS", kernels.c_str()) == 0;
}

// flashattn_py._C.reload_cpu_switches(): choose the CPU kernels again, reading
// FLASHATTN_CPU_ISA, FLASHATTN_CPU_TILES, FLASHATTN_CPU_BF16_DOT and FLASHATTN_CPU_AMX (each read once
// otherwise), for tests and benchmarks that compare paths.
PyObject* reload_cpu_switches(PyObject* module, PyObject* /*args*/) {
  if (!publish_cpu_kernels(module, PyExc_RuntimeError)) return nullptr;
  Py_RETURN_NONE;
}

// flashattn_py._C.choose_cpu_path(dtype, seqlen_q, head_dim): the path (FlashParams::
// cpu_path) the CPU kernels choose for a problem with elements of type CPU_DTYPES[dtype],
// seqlen_q query rows per head (the longest sequence's) and head dim head_dim, under the
// switches in effect. A call with gradients asks it once and passes the answer to its
// forward and its backward.
PyObject* choose_cpu_path(PyObject* /*module*/, PyObject* args) {
  int dtype = 0;
  long long seqlen_q = 0, head_dim = 0;
  if (!PyArg_ParseTuple(args, "iLL", &dtype, &seqlen_q, &head_dim)) return nullptr;
  if (dtype < 0 || dtype >= cpu::kNumDtypes) {
    PyErr_SetString(PyExc_ValueError, "dtype: expected an index into CPU_DTYPES");
    return nullptr;
  }
  try {
    return PyLong_FromLongLong(cpu::kernels().choose_path[dtype](seqlen_q, head_dim));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// flashattn_py._C.release_cpu_memory(): unmaps the memory of freed large CPU outputs that
// the ops keep for the next ones (cpu_output_memory.h); returns its bytes.
PyObject* release_cpu_memory(PyObject* /*module*/, PyObject* /*args*/) {
  return PyLong_FromSize_t(CpuOutputMemory::instance().release());
}

}  // namespace

STABLE_TORCH_LIBRARY(flashattn, m) {
  // (the problem's arguments: params_from_tensors.h FLASHATTN_PROBLEM_ARGS)
  m.def("fwd(Tensor q, Tensor k, Tensor v" FLASHATTN_PROBLEM_SCHEMA ") -> (Tensor out, Tensor lse)");
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse" FLASHATTN_PROBLEM_SCHEMA
        ", bool deterministic, bool bias_requires_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  m.def("dropout_mask(Tensor rng_state, int batch, int num_heads, int seqlen_q, int seqlen_k, float dropout_p) -> Tensor");
  // fwd's dense arguments in fwd's order (tests/test_op_spec.py pins it), then heads_first
  m.def("fwd_inference(Tensor q, Tensor k, Tensor v" FLASHATTN_DENSE_SCHEMA
        ", bool heads_first) -> (Tensor out, Tensor lse)");
  m.def("kvcache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_seqlens, "
        "Tensor? cache_batch_idx, Tensor? block_table) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(flashattn, CPU, m) {
  m.impl("fwd", TORCH_BOX(&fwd_cpu));
  m.impl("bwd", TORCH_BOX(&bwd_cpu));
  m.impl("dropout_mask", TORCH_BOX(&dropout_mask_cpu));
  m.impl("fwd_inference", TORCH_BOX(&fwd_inference));
  m.impl("kvcache_write", TORCH_BOX(&kvcache_write_cpu));
}

// The inference op at the first key a CPU call reaches (flashattn_py/ops.py calls it only
// for inputs that need no gradient): no autograd fallback, no redispatch.
STABLE_TORCH_LIBRARY_IMPL(flashattn, AutogradCPU, m) {
  m.impl("fwd_inference", TORCH_BOX(&fwd_inference));
}

}  // namespace flashattn

// A Python module, so that `import flashattn_py._C` loads the library and runs the
// registrations above (the pattern of pytorch/extension-cpp). Limited API only.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"reload_cpu_switches", flashattn::reload_cpu_switches, METH_NOARGS,
       "choose the CPU kernels again (FLASHATTN_CPU_ISA, FLASHATTN_CPU_TILES, FLASHATTN_CPU_BF16_DOT, "
       "FLASHATTN_CPU_AMX)"},
      {"choose_cpu_path", flashattn::choose_cpu_path, METH_VARARGS,
       "choose_cpu_path(dtype, seqlen_q, head_dim): the CPU kernels' path for such a problem (the ops' cpu_path); "
       "dtype indexes CPU_DTYPES"},
      {"release_cpu_memory", flashattn::release_cpu_memory, METH_NOARGS,
       "unmap the memory kept from freed CPU outputs of 8 MiB or more; returns its bytes"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && !flashattn::publish_cpu_kernels(module, PyExc_ImportError)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
