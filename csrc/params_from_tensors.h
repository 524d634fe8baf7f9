// Tensor -> FlashParams, shared by the CPU (ops.cpp) and CUDA (ops_cuda.cpp) op impls.
// The ops are internal (flashattn_py/api.py validates user input); the checks here guard
// the kernels' preconditions only.
//
// LibTorch stable ABI (torch/csrc/stable, built with TORCH_TARGET_VERSION = torch 2.11):
// tensors are torch::stable::Tensor, whose every accessor is an out-of-line C call, so each
// tensor's sizes, strides, data pointer, dtype and device are read once (TensorInfo).
#pragma once
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include "flash_params.h"

namespace flashattn {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;

// (the stable Tensor is hidden: so are the structs holding one)
#define FLASHATTN_HIDDEN __attribute__((visibility("hidden")))

// A shim call that must succeed.
#define FLASHATTN_SHIM(call) STD_TORCH_CHECK((call) == AOTI_TORCH_SUCCESS, "flashattn: ", #call, " failed")

// The shim's dtype and device codes, read once.
struct ShimCodes {
  int32_t f32, f64, bf16, f16, i32, i64, b;
  int32_t cpu, cuda;
};
inline const ShimCodes& codes() {
  static const ShimCodes c{aoti_torch_dtype_float32(), aoti_torch_dtype_float64(), aoti_torch_dtype_bfloat16(),
                           aoti_torch_dtype_float16(), aoti_torch_dtype_int32(),   aoti_torch_dtype_int64(),
                           aoti_torch_dtype_bool(),    aoti_torch_device_type_cpu(), aoti_torch_device_type_cuda()};
  return c;
}

// A dtype code's name, for messages.
inline const char* dtype_name(int32_t dtype) {
  const ShimCodes& c = codes();
  if (dtype == c.f32) return "Float";
  if (dtype == c.f64) return "Double";
  if (dtype == c.bf16) return "BFloat16";
  if (dtype == c.f16) return "Half";
  if (dtype == c.i32) return "Int";
  if (dtype == c.i64) return "Long";
  if (dtype == c.b) return "Bool";
  return "(another dtype)";
}

// One tensor's metadata, read once (5-7 shim calls) and then used without calls. The
// pointers borrow from the tensor, which must outlive this.
struct FLASHATTN_HIDDEN TensorInfo {
  AtenTensorHandle handle = nullptr;
  void* data = nullptr;
  int64_t* sizes_ = nullptr;
  int64_t* strides_ = nullptr;
  int64_t dim = 0;
  int32_t dtype = 0, device_type = 0, device_index = 0;

  TensorInfo() = default;
  explicit TensorInfo(const Tensor& t) : handle(t.get()) {
    FLASHATTN_SHIM(aoti_torch_get_dim(handle, &dim));
    FLASHATTN_SHIM(aoti_torch_get_sizes(handle, &sizes_));
    FLASHATTN_SHIM(aoti_torch_get_strides(handle, &strides_));
    FLASHATTN_SHIM(aoti_torch_get_data_ptr(handle, &data));
    FLASHATTN_SHIM(aoti_torch_get_dtype(handle, &dtype));
    FLASHATTN_SHIM(aoti_torch_get_device_type(handle, &device_type));
    FLASHATTN_SHIM(aoti_torch_get_device_index(handle, &device_index));
  }
  int64_t size(int64_t d) const { return sizes_[d < 0 ? d + dim : d]; }
  int64_t stride(int64_t d) const { return strides_[d < 0 ? d + dim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d = 0; d < dim; ++d) n *= sizes_[d];
    return n;
  }
  bool same_device(const TensorInfo& o) const { return device_type == o.device_type && device_index == o.device_index; }
  bool is_cpu() const { return device_type == codes().cpu; }
  bool is_cuda() const { return device_type == codes().cuda; }
  bool is_contiguous() const {
    for (int64_t d = 0; d < dim; ++d) {
      if (sizes_[d] == 0) return true;  // (no elements: any strides, as torch's is_contiguous)
    }
    int64_t expected = 1;
    for (int64_t d = dim - 1; d >= 0; --d) {
      if (sizes_[d] == 1) continue;
      if (strides_[d] != expected) return false;
      expected *= sizes_[d];
    }
    return true;
  }
  std::string device_str() const {
    std::string s = is_cpu() ? "cpu" : is_cuda() ? "cuda" : "device type " + std::to_string(device_type);
    if (!is_cpu() && device_index >= 0) s += ":" + std::to_string(device_index);
    return s;
  }
  std::string sizes_str() const {
    std::string s = "[";
    for (int64_t d = 0; d < dim; ++d) s += (d ? ", " : "") + std::to_string(sizes_[d]);
    return s + "]";
  }
};

// The contiguous strides of `sizes` (ndim of them) into `strides`.
inline void contiguous_strides(int64_t ndim, const int64_t* sizes, int64_t* strides) {
  int64_t s = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = s;
    s *= std::max<int64_t>(sizes[d], 1);
  }
}

// A new tensor of `dtype` on `like`'s device; contiguous unless strides are given.
inline Tensor new_tensor(std::initializer_list<int64_t> sizes, int32_t dtype, const TensorInfo& like,
                         std::initializer_list<int64_t> strides = {}) {
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  int64_t contiguous[8];
  const int64_t* st = strides.begin();
  if (strides.size() == 0) {
    contiguous_strides(ndim, sizes.begin(), contiguous);
    st = contiguous;
  }
  AtenTensorHandle h = nullptr;
  FLASHATTN_SHIM(aoti_torch_empty_strided(ndim, sizes.begin(), st, dtype, like.device_type, like.device_index, &h));
  return Tensor(h);
}

// The tensor with a contiguous last dimension (a copy only if it has none).
inline Tensor rows_contiguous(const Tensor& t) {
  int64_t dim = 0;
  FLASHATTN_SHIM(aoti_torch_get_dim(t.get(), &dim));
  if (dim == 0) return t;
  int64_t stride = 0;
  FLASHATTN_SHIM(aoti_torch_get_stride(t.get(), dim - 1, &stride));
  return stride == 1 ? t : torch::stable::contiguous(t);
}

inline void zero(const Tensor& t) { FLASHATTN_SHIM(aoti_torch_zero_(t.get())); }

// Which dims of 4-D q, k, v, out hold the sequence and the heads: (B, S, H, D), the ops'
// layout, or (B, H, S, D), SDPA's (ops.cpp's inference op takes both).
struct Layout {
  int64_t seq = 1, heads = 2;
};
constexpr Layout HEADS_FIRST{2, 1};

// The arguments the fwd and bwd schemas share after q, k, v (their problem), in schema
// order, listed once: X(type as an entry takes it, schema type, name). The schemas
// (csrc/ops.cpp), the entries' signatures (FLASHATTN_PROBLEM_PARAMS), AttnArgs' members and
// its construction (FLASHATTN_PROBLEM_NAMES) follow from it, so an argument added here (and
// to flashattn_py/ops.py's spec: tests/test_op_spec.py checks they agree) is added to
// fill_params and the kernels that use it, nowhere else. The dense ones first: the
// inference op takes only those.
#define FLASHATTN_DENSE_ARGS(X)                                                                         \
  X(const OptTensor&, Tensor?, alibi_slopes) /* None or float32 (H,) / (B, H) */                        \
  X(const OptTensor&, Tensor?, attn_bias)    /* None or (B, H, Sq, Sk), bool, q's dtype or f32 */       \
  X(double, float, scale)                                                                               \
  X(double, float, softcap)                                                                             \
  X(int64_t, int, window_left)                                                                          \
  X(int64_t, int, window_right)                                                                         \
  X(int64_t, SymInt, diag_offset)                                                                       \
  X(double, float, dropout_p)                                                                           \
  X(const OptTensor&, Tensor?, rng_state) /* int64 [seed, offset] */
#define FLASHATTN_PROBLEM_ARGS(X)                                                                       \
  FLASHATTN_DENSE_ARGS(X)                                                                               \
  /* packed sequences / paged K/V (flash_params.h); none in a dense call */                             \
  X(const OptTensor&, Tensor?, cu_seqlens_q)                                                            \
  X(const OptTensor&, Tensor?, cu_seqlens_k)                                                            \
  X(const OptTensor&, Tensor?, seqused_k)                                                               \
  X(const OptTensor&, Tensor?, block_table)                                                             \
  X(int64_t, SymInt, max_seqlen_q)                                                                      \
  X(int64_t, SymInt, max_seqlen_k)                                                                      \
  X(bool, bool, bottom_right)                                                                           \
  /* KV caches: each sequence's k / v batch row, its key slots before its keys */                       \
  X(const OptTensor&, Tensor?, kv_batch_idx)                                                            \
  X(const OptTensor&, Tensor?, leftpad_k)                                                               \
  X(int64_t, int, num_splits)                                                                           \
  /* the CPU kernels' path (FlashParams::cpu_path; 0: chosen per call) */                               \
  X(int64_t, int, cpu_path)
#define FLASHATTN_PARAM_DECL(type, schema, name) , type name
#define FLASHATTN_PARAM_NAME(type, schema, name) , name
#define FLASHATTN_SCHEMA_ARG(type, schema, name) ", " #schema " " #name
#define FLASHATTN_MEMBER(type, schema, name) std::decay_t<type> name;
// ", <schema type> <name>" for each, a string literal: after a schema's leading tensors.
#define FLASHATTN_PROBLEM_SCHEMA FLASHATTN_PROBLEM_ARGS(FLASHATTN_SCHEMA_ARG)
#define FLASHATTN_DENSE_SCHEMA FLASHATTN_DENSE_ARGS(FLASHATTN_SCHEMA_ARG)
#define FLASHATTN_DENSE_PARAMS FLASHATTN_DENSE_ARGS(FLASHATTN_PARAM_DECL)
#define FLASHATTN_DENSE_NAMES FLASHATTN_DENSE_ARGS(FLASHATTN_PARAM_NAME)
// ", <type> <name>" for each: after an entry's leading tensors.
#define FLASHATTN_PROBLEM_PARAMS FLASHATTN_PROBLEM_ARGS(FLASHATTN_PARAM_DECL)
// ", <name>" for each: AttnArgs{q, k, v FLASHATTN_PROBLEM_NAMES}.
#define FLASHATTN_PROBLEM_NAMES FLASHATTN_PROBLEM_ARGS(FLASHATTN_PARAM_NAME)

// One call's problem: q, k, v and the arguments above. Tensors are held by value (a
// reference count each): the params point into them, so an entry keeps its AttnArgs alive
// until the kernel has run. Members not given in an aggregate initialisation are zero /
// None (the inference op gives the dense ones only).
struct FLASHATTN_HIDDEN AttnArgs {
  Tensor q, k, v;
  FLASHATTN_PROBLEM_ARGS(FLASHATTN_MEMBER)
};

// An int32 index tensor (cu_seqlens, seqused_k, block_table) on q's device, its rows
// contiguous: the kernels read it as int32 arrays. `info` receives its metadata. (A last dim
// of size 1 takes any stride, as torch's is_contiguous: its one element is read at the row's
// start; e.g. a batch of one's column of a table, which the Python layer passes as it is.)
inline const int32_t* index_tensor(const OptTensor& t, const TensorInfo& q, const char* name, int64_t dim,
                                   TensorInfo& info) {
  if (!t.has_value()) return nullptr;
  info = TensorInfo(*t);
  STD_TORCH_CHECK(info.dtype == codes().i32 && info.dim == dim && info.same_device(q) &&
                      (info.numel() == 0 || info.size(-1) == 1 || info.stride(-1) == 1),
                  "flashattn: ", name, " must be an int32 ", dim, "-D tensor on ", q.device_str(),
                  " with a contiguous last dim");
  return static_cast<const int32_t*>(info.data);
}

// The diagonal and window sides of a call brought within 2**42, so that the kernels'
// 64-bit position arithmetic (i + diag_offset +- a side) cannot overflow: the same keys
// visible to every row for positions below 2**40 (a side that binds no such position
// becomes -1, an offset past every key stops at 2**40), bitwise the same call for any
// |diag_offset| <= 2**41 and sides whose offsets stay within 2**40; beyond, ALiBi measures
// distances from a diagonal 2**41 away (scores of that size are lost in float anyway).
inline void bounded_band(int64_t& diag, int64_t& left, int64_t& right) {
  constexpr int64_t P = int64_t(1) << 40, D = int64_t(1) << 41;
  using wide = __int128;
  const wide d = diag;
  const wide lo = d - left, hi = d + wide(right);  // j - i >= lo (left >= 0), j - i <= hi (right >= 0)
  const int64_t d2 = static_cast<int64_t>(std::clamp<wide>(d, -D, D));
  if (left >= 0) left = lo <= -P ? -1 : static_cast<int64_t>(d2 - std::min<wide>(lo, P));
  if (right >= 0) right = hi >= P ? -1 : static_cast<int64_t>(std::max<wide>(hi, -P) - d2);
  diag = d2;
}

// A packed call's max_seqlen_q / _k: 0 (not given) is the total. A max past the total sizes
// the blocks as given (a batch's one sequence called alone, on the batch's blocks: tests)
// up to 2**31; past that, where the buffers it sizes would overflow (the API clamps its
// own), the total.
inline int64_t packed_max(int64_t given, int64_t total) {
  return given <= 0 || given > (int64_t(1) << 31) ? total : given;
}

// q (B, Sq, H, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv) with a contiguous head dimension
// (or sequence and heads swapped, per `layout`), plus the semantic arguments. Returns q's
// metadata (for the entries' allocations).
inline TensorInfo fill_params(FlashParams& p, const AttnArgs& args, Layout layout = {}) {
  const TensorInfo q(args.q), k(args.k), v(args.v);
  const OptTensor& alibi_slopes = args.alibi_slopes;
  const OptTensor& attn_bias = args.attn_bias;
  const OptTensor& rng_state = args.rng_state;
  const double scale = args.scale, softcap = args.softcap, dropout_p = args.dropout_p;
  int64_t window_left = args.window_left, window_right = args.window_right, diag_offset = args.diag_offset;
  bounded_band(diag_offset, window_left, window_right);
  const int64_t S = layout.seq, H = layout.heads;
  STD_TORCH_CHECK(q.dim == 4 && k.dim == 4 && v.dim == 4, "flashattn: q, k, v must be 4-D (B, S, H, D)");
  STD_TORCH_CHECK(k.same_device(q) && v.same_device(q), "flashattn: q, k, v must share a device");
  STD_TORCH_CHECK(k.dtype == q.dtype && v.dtype == q.dtype, "flashattn: q, k, v must share a dtype");
  // (An empty tensor's strides are never read: it may be an expanded one, strides 0.)
  auto rows_ok = [](const TensorInfo& t) { return t.stride(-1) == 1 || t.numel() == 0; };
  STD_TORCH_CHECK(rows_ok(q) && rows_ok(k) && rows_ok(v), "flashattn: the head dimension must be contiguous (stride 1)");
  const bool packed_q = args.cu_seqlens_q.has_value(), paged = args.block_table.has_value();
  STD_TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2),
                  "flashattn: k and v disagree in their first 3 dims");
  STD_TORCH_CHECK(packed_q || paged || args.kv_batch_idx.has_value() || q.size(0) == k.size(0),
                  "flashattn: q and k batch sizes differ");
  STD_TORCH_CHECK(!packed_q || q.size(0) == 1, "flashattn: packed q must be (1, total_q, H, D)");
  TensorInfo cu_q, cu_k, used_k, bt, kv_idx, leftpad;
  p.cu_seqlens_q = index_tensor(args.cu_seqlens_q, q, "cu_seqlens_q", 1, cu_q);
  p.cu_seqlens_k = index_tensor(args.cu_seqlens_k, q, "cu_seqlens_k", 1, cu_k);
  p.seqused_k = index_tensor(args.seqused_k, q, "seqused_k", 1, used_k);
  p.block_table = index_tensor(args.block_table, q, "block_table", 2, bt);
  STD_TORCH_CHECK(!packed_q || paged || args.cu_seqlens_k.has_value() || args.kv_batch_idx.has_value() ||
                      k.size(0) == cu_q.numel() - 1,
                  "flashattn: with packed q and dense k, k needs one batch row per sequence");
  STD_TORCH_CHECK(!(args.cu_seqlens_k.has_value() && !paged) || k.size(0) == 1,
                  "flashattn: packed k must be (1, total_k, Hk, D)");
  STD_TORCH_CHECK(!(packed_q || paged || args.seqused_k.has_value()) || !args.attn_bias.has_value(),
                  "flashattn: attn_bias is not supported with packed sequences or paged K/V");
  STD_TORCH_CHECK(q.size(3) == k.size(3), "flashattn: q and k head dims differ");
  STD_TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256 && v.size(3) >= 1 && v.size(3) <= 256,
                  "flashattn: head dims must be in [1, 256], got ", q.size(3), " and ", v.size(3));
  STD_TORCH_CHECK(k.size(H) > 0 && q.size(H) % k.size(H) == 0,
                  "flashattn: num_heads must be a multiple of num_heads_k");
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(S), p.q_head_stride = q.stride(H);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(S), p.k_head_stride = k.stride(H);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(S), p.v_head_stride = v.stride(H);
  p.batch = q.size(0), p.seqlen_q = q.size(S), p.seqlen_k = k.size(S);
  p.total_q = q.size(S), p.total_k = k.size(S);
  p.bottom_right = args.bottom_right;
  if (packed_q) {  // (1, total_q, H, D): sequences from cu_seqlens_q, rows no batch stride apart
    p.batch = cu_q.numel() - 1;
    STD_TORCH_CHECK(p.batch >= 0, "flashattn: cu_seqlens_q must have B + 1 entries");
    p.seqlen_q = packed_max(args.max_seqlen_q, p.total_q);
    p.q_batch_stride = 0;
  }
  if (paged) {  // (num_pages, page_size, Hk, D) pages, k_batch_stride the page stride
    STD_TORCH_CHECK(bt.size(0) == p.batch, "flashattn: block_table must have one row per sequence");
    p.block_table_batch_stride = bt.stride(0);
    p.page_size = k.size(S), p.num_pages = k.size(0);
    STD_TORCH_CHECK((p.page_size > 0 && p.num_pages > 0) || bt.numel() == 0, "flashattn: paged K/V without pages");
    // (seq_view clamps every sequence to seqlen_k: never more keys than its pages hold)
    const int64_t capacity = bt.size(1) * p.page_size;
    p.seqlen_k = args.cu_seqlens_k.has_value() && args.max_seqlen_k > 0 ? std::min(args.max_seqlen_k, capacity)
                                                                          : capacity;
    p.total_k = p.num_pages * p.page_size;
  } else if (args.cu_seqlens_k.has_value()) {  // (1, total_k, Hk, D)
    p.seqlen_k = packed_max(args.max_seqlen_k, p.total_k);
    p.k_batch_stride = p.v_batch_stride = 0;
  }
  STD_TORCH_CHECK(!args.cu_seqlens_k.has_value() || cu_k.numel() == p.batch + 1,
                  "flashattn: cu_seqlens_k must have B + 1 entries, like cu_seqlens_q");
  STD_TORCH_CHECK(!args.seqused_k.has_value() || used_k.numel() == p.batch,
                  "flashattn: seqused_k must have one entry per sequence");
  STD_TORCH_CHECK(args.max_seqlen_q >= 0 && args.max_seqlen_k >= 0,
                  "flashattn: max_seqlen_q / max_seqlen_k must be >= 0");
  p.kv_batch_idx = index_tensor(args.kv_batch_idx, q, "kv_batch_idx", 1, kv_idx);
  p.leftpad_k = index_tensor(args.leftpad_k, q, "leftpad_k", 1, leftpad);
  p.kv_batch = k.size(0);
  STD_TORCH_CHECK(!p.kv_batch_idx || (!paged && !args.cu_seqlens_k.has_value() && kv_idx.numel() == p.batch),
                  "flashattn: kv_batch_idx needs a dense (batch, S, Hk, D) k / v and one entry per sequence");
  // (its entries are clamped into [0, kv_batch): with no row there is nothing to clamp to)
  STD_TORCH_CHECK(!p.kv_batch_idx || p.kv_batch > 0 || p.batch == 0,
                  "flashattn: kv_batch_idx needs k / v with at least one cache row");
  STD_TORCH_CHECK(!p.leftpad_k || leftpad.numel() == p.batch, "flashattn: leftpad_k needs one entry per sequence");
  STD_TORCH_CHECK(args.num_splits >= 0, "flashattn: num_splits must be >= 0");
  p.num_splits = args.num_splits;
  p.cpu_path = args.cpu_path;
  p.num_heads = q.size(H), p.num_heads_k = k.size(H);
  p.head_dim = q.size(3), p.head_dim_v = v.size(3);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.scale64 = scale, p.softcap64 = softcap;
  p.window_left = window_left, p.window_right = window_right, p.diag_offset = diag_offset;
  if (alibi_slopes.has_value()) {
    const TensorInfo a(*alibi_slopes);
    STD_TORCH_CHECK(a.same_device(q), "flashattn: alibi_slopes must be on q's device");
    STD_TORCH_CHECK(a.dtype == codes().f32 && a.dim >= 1 && (a.size(-1) == 1 || a.stride(-1) == 1),
                    "flashattn: alibi_slopes must be float32 with a contiguous last dim");  // (as index_tensor)
    STD_TORCH_CHECK(a.size(-1) == p.num_heads && (a.dim == 1 || (a.dim == 2 && a.size(0) == p.batch)),
                    "flashattn: alibi_slopes must be (H,) or (B, H)");
    p.alibi_slopes = static_cast<const float*>(a.data);
    p.alibi_batch_stride = a.dim == 2 ? a.stride(0) : 0;
  }
  if (attn_bias.has_value()) {  // (B, H, Sq, Sk) through strides, 0 on broadcast dims
    const TensorInfo m(*attn_bias);
    STD_TORCH_CHECK(m.dim == 4 && m.size(0) == p.batch && m.size(1) == p.num_heads && m.size(2) == p.seqlen_q &&
                        m.size(3) == p.seqlen_k,
                    "flashattn: attn_bias must be (B, H, Sq, Sk) = (", p.batch, ", ", p.num_heads, ", ", p.seqlen_q,
                    ", ", p.seqlen_k, ") (broadcast dims with stride 0), got ", m.sizes_str());
    // (float32 with 16-bit inputs is read as float32, not rounded to their dtype: torch's
    // SDPA takes such masks and adds them in float)
    const bool float32_bias = m.dtype == codes().f32 && (q.dtype == codes().bf16 || q.dtype == codes().f16);
    STD_TORCH_CHECK(m.dtype == codes().b || m.dtype == q.dtype || float32_bias, "flashattn: attn_bias must be bool or ",
                    dtype_name(q.dtype), (q.dtype == codes().bf16 || q.dtype == codes().f16 ? " or Float" : ""),
                    ", got ", dtype_name(m.dtype));
    STD_TORCH_CHECK(m.same_device(q), "flashattn: attn_bias must be on ", q.device_str(), ", got ", m.device_str());
    p.bias = m.data;
    p.bias_is_bool = m.dtype == codes().b;
    p.bias_is_float32 = float32_bias;
    p.bias_batch_stride = m.stride(0), p.bias_head_stride = m.stride(1);
    p.bias_row_stride = m.stride(2), p.bias_col_stride = m.stride(3);
  }
  STD_TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "flashattn: dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = static_cast<float>(dropout_p), p.dropout_p64 = dropout_p;
  if (dropout_p > 0) {  // [seed, offset]
    TensorInfo r;
    if (rng_state.has_value()) r = TensorInfo(*rng_state);
    STD_TORCH_CHECK(rng_state.has_value() && r.dtype == codes().i64 && r.numel() == 2 && (r.is_cpu() || r.same_device(q)),
                    "flashattn: dropout needs rng_state, an int64 tensor [seed, offset] on the CPU or on q's device (",
                    q.device_str(), ")",
                    rng_state.has_value() ? ", got " + std::string(dtype_name(r.dtype)) + r.sizes_str() + " on " +
                                                r.device_str()
                                          : std::string(", got None"));
    if (r.is_cpu()) {  // read on the host (two elements: any strides)
      const int64_t* st = static_cast<const int64_t*>(r.data);
      const int64_t step = r.dim == 1 ? r.stride(0) : 1;
      STD_TORCH_CHECK(r.dim == 1 || r.is_contiguous(), "flashattn: rng_state must be a contiguous int64[2]");
      p.dropout_seed = static_cast<uint64_t>(st[0]);
      p.dropout_offset = static_cast<uint64_t>(st[step]);
    } else {  // read by the CUDA kernels when they run (CUDA-graph safe, flash_params.h)
      STD_TORCH_CHECK(r.is_contiguous(), "flashattn: rng_state on the GPU must be contiguous");
      p.dropout_state = static_cast<const int64_t*>(r.data);
    }
  }
  return q;
}

// Rows of q (and out, dout, dq) per batch entry and batch entries: (1, total_q) with
// packed queries, else (batch, seqlen_q).
inline std::pair<int64_t, int64_t> q_rows(const FlashParams& p) {
  return p.cu_seqlens_q ? std::pair<int64_t, int64_t>{1, p.total_q} : std::pair<int64_t, int64_t>{p.batch, p.seqlen_q};
}

// out (B, Sq, H, Dv) (or per `layout`; (1, total_q, H, Dv) packed) with a contiguous head
// dimension, and lse (B, H, Sq) ((1, H, total_q) packed), contiguous.
inline void fill_output(FlashParams& p, const Tensor& out_t, const Tensor& lse_t, Layout layout = {}) {
  const TensorInfo out(out_t), lse(lse_t);
  const int64_t S = layout.seq, H = layout.heads;
  const auto [batch, rows] = q_rows(p);
  STD_TORCH_CHECK(out.dim == 4 && out.size(0) == batch && out.size(S) == rows && out.size(H) == p.num_heads &&
                      out.size(3) == p.head_dim_v && out.stride(-1) == 1,
                  "flashattn: out must be (B, Sq, H, Dv) with a contiguous head dimension");
  STD_TORCH_CHECK(lse.is_contiguous() && lse.dim == 3 && lse.size(0) == batch && lse.size(1) == p.num_heads &&
                      lse.size(2) == rows,
                  "flashattn: lse must be a contiguous (B, H, Sq) tensor");
  p.out = out.data;
  p.o_batch_stride = p.cu_seqlens_q ? 0 : out.stride(0), p.o_row_stride = out.stride(S), p.o_head_stride = out.stride(H);
  p.lse = lse.data;
}

// dout (like out) and the gradient buffers dq (like q), dk, dv (like k and v).
inline void fill_grads(FlashBwdParams& p, const Tensor& dout_t, const Tensor& dq_t, const Tensor& dk_t,
                       const Tensor& dv_t) {
  const TensorInfo dout(dout_t), dq(dq_t), dk(dk_t), dv(dv_t);
  const auto [batch, rows] = q_rows(p);
  STD_TORCH_CHECK(dout.dim == 4 && dout.size(0) == batch && dout.size(1) == rows && dout.size(2) == p.num_heads &&
                      dout.size(3) == p.head_dim_v && (dout.stride(-1) == 1 || dout.numel() == 0),
                  "flashattn: dout must be (B, Sq, H, Dv) with a contiguous head dimension");
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;
  p.dout = dout.data;
  p.do_batch_stride = packed_q ? 0 : dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dq = dq.data;
  p.dq_batch_stride = packed_q ? 0 : dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk = dk.data;
  p.dk_batch_stride = packed_k ? 0 : dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  p.dv = dv.data;
  p.dv_batch_stride = packed_k ? 0 : dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
}

// The bias gradient buffer: float32 (B, H, Sq, Sk) zeros when wanted (the caller sums
// broadcast dims), else an empty tensor.
inline Tensor make_dbias(FlashBwdParams& p, const TensorInfo& q, const OptTensor& attn_bias, bool bias_requires_grad) {
  if (!bias_requires_grad) return new_tensor({0}, codes().f32, q);
  STD_TORCH_CHECK(attn_bias.has_value() && TensorInfo(*attn_bias).dtype != codes().b,
                  "flashattn: bias_requires_grad needs a float attn_bias");
  Tensor dbias = new_tensor({p.batch, p.num_heads, p.seqlen_q, p.seqlen_k}, codes().f32, q);
  zero(dbias);
  p.dbias = static_cast<float*>(dbias.data_ptr());
  return dbias;
}

// flashattn::kvcache_write's tensors (schema in ops.cpp), checked: 4-D caches (entries,
// slots, Hk, D / Dv) and new keys / values (B, S_new, Hk, D / Dv) of the caches' float
// dtype, int32 or int64 index tensors (cache_seqlens (B,), cache_batch_idx (B,),
// block_table (B, max_blocks)), all on one device. Shared by the CPU (ops.cpp) and CUDA
// (ops_cuda.cpp) impls.
struct FLASHATTN_HIDDEN KvcacheWriteArgs {
  TensorInfo k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table;
  bool has_batch_idx = false, paged = false;  // cache_batch_idx / block_table given
  int64_t element_size = 0;

  KvcacheWriteArgs(const Tensor& k_cache_t, const Tensor& v_cache_t, const Tensor& k_t, const Tensor& v_t,
                   const Tensor& cache_seqlens_t, const OptTensor& cache_batch_idx_t, const OptTensor& block_table_t)
      : k_cache(k_cache_t), v_cache(v_cache_t), k(k_t), v(v_t), cache_seqlens(cache_seqlens_t) {
    STD_TORCH_CHECK(k_cache.dim == 4 && v_cache.dim == 4 && k.dim == 4 && v.dim == 4,
                    "flashattn: kvcache_write takes 4-D caches and new keys / values");
    STD_TORCH_CHECK(k_cache.dtype == k.dtype && v_cache.dtype == v.dtype && k.dtype == v.dtype,
                    "flashattn: kvcache_write: new keys / values must have the caches' dtype");
    const ShimCodes& c = codes();
    STD_TORCH_CHECK(k.dtype == c.f32 || k.dtype == c.f64 || k.dtype == c.bf16 || k.dtype == c.f16,
                    "flashattn: kvcache_write: caches must be float, got ", dtype_name(k.dtype));
    element_size = static_cast<int64_t>(aoti_torch_dtype_element_size(k.dtype));
    const int64_t batch = k.size(0);
    STD_TORCH_CHECK(v.size(0) == batch && v.size(1) == k.size(1) && k.size(2) == k_cache.size(2) &&
                        v.size(2) == v_cache.size(2) && k.size(2) == v.size(2) && k.size(3) == k_cache.size(3) &&
                        v.size(3) == v_cache.size(3) && v_cache.size(0) == k_cache.size(0) &&
                        v_cache.size(1) == k_cache.size(1),
                    "flashattn: kvcache_write: new keys / values ", k.sizes_str(), " / ", v.sizes_str(),
                    " do not fit caches ", k_cache.sizes_str(), " / ", v_cache.sizes_str());
    for (const TensorInfo* t : {&v_cache, &k, &v, &cache_seqlens}) {
      STD_TORCH_CHECK(t->same_device(k_cache), "flashattn: kvcache_write: every tensor must be on ",
                      k_cache.device_str(), ", got one on ", t->device_str());
    }
    check_index(cache_seqlens, 1, batch, "cache_seqlens");
    if ((has_batch_idx = cache_batch_idx_t.has_value())) {
      check_index(cache_batch_idx = TensorInfo(*cache_batch_idx_t), 1, batch, "cache_batch_idx");
    }
    if ((paged = block_table_t.has_value())) check_index(block_table = TensorInfo(*block_table_t), 2, batch, "block_table");
  }
  // Whether the new keys' or values' elements share memory with either cache's (then the
  // in-place append would read rows it has already written).
  bool new_rows_overlap_caches() const {
    for (const TensorInfo* src : {&k, &v}) {
      for (const TensorInfo* cache : {&k_cache, &v_cache}) {
        if (overlap(byte_span(*src), byte_span(*cache))) return true;
      }
    }
    return false;
  }
  // The kernels' description of the call (the tensors must outlive it).
  KvcacheWriteParams params() const {
    KvcacheWriteParams p;
    const std::pair<KvcacheWriteParams::Rows*, std::pair<const TensorInfo*, const TensorInfo*>> rows[] = {
        {&p.k, {&k, &k_cache}}, {&p.v, {&v, &v_cache}}};
    for (const auto& [r, tensors] : rows) {
      const TensorInfo &src = *tensors.first, &dst = *tensors.second;
      r->src = src.data, r->dst = dst.data, r->width = src.size(3);
      for (int d = 0; d < 4; ++d) r->src_stride[d] = src.stride(d), r->dst_stride[d] = dst.stride(d);
    }
    p.batch = k.size(0), p.new_keys = k.size(1), p.heads = k.size(2);
    p.entries = k_cache.size(0), p.slots = k_cache.size(1), p.element_size = element_size;
    const int32_t i64 = codes().i64;
    p.cache_seqlens = cache_seqlens.data, p.seqlens_stride = cache_seqlens.stride(0);
    p.seqlens_int64 = cache_seqlens.dtype == i64;
    if ((p.has_batch_idx = has_batch_idx)) {
      p.cache_batch_idx = cache_batch_idx.data, p.rows_stride = cache_batch_idx.stride(0);
      p.rows_int64 = cache_batch_idx.dtype == i64;
    }
    if ((p.paged = paged)) {
      p.block_table = block_table.data, p.table_width = block_table.size(1);
      p.table_stride0 = block_table.stride(0), p.table_stride1 = block_table.stride(1);
      p.table_int64 = block_table.dtype == i64;
    }
    return p;
  }

 private:
  // [first, last) addresses of a tensor's elements (strides >= 0; an empty tensor: none).
  std::pair<uintptr_t, uintptr_t> byte_span(const TensorInfo& t) const {
    const uintptr_t first = reinterpret_cast<uintptr_t>(t.data);
    int64_t last = 0;
    for (int d = 0; d < t.dim; ++d) {
      if (t.size(d) == 0) return {first, first};
      last += (t.size(d) - 1) * t.stride(d);
    }
    return {first, first + static_cast<uintptr_t>((last + 1) * element_size)};
  }
  static bool overlap(std::pair<uintptr_t, uintptr_t> a, std::pair<uintptr_t, uintptr_t> b) {
    return a.first < a.second && b.first < b.second && a.first < b.second && b.first < a.second;
  }
  void check_index(const TensorInfo& t, int64_t dim, int64_t batch, const char* name) const {
    STD_TORCH_CHECK(t.same_device(k_cache) && t.dim == dim && (t.dtype == codes().i32 || t.dtype == codes().i64) &&
                        t.size(0) == batch,
                    "flashattn: kvcache_write: ", name, " must be a ", dim,
                    "-D int32 or int64 tensor with one row per batch entry, on the caches' device");
  }
};

}  // namespace flashattn
