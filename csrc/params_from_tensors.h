// Tensor -> FlashParams, shared by the CPU (ops.cpp) and CUDA (ops_cuda.cpp) op impls.
// The ops are internal (flashattn_py/api.py validates user input); the checks here guard
// the kernels' preconditions only.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>
#include <string>

#include "flash_params.h"

namespace flashattn {

// Which dims of 4-D q, k, v, out hold the sequence and the heads: (B, S, H, D), the ops'
// layout, or (B, H, S, D), SDPA's (ops.cpp's inference entry takes both).
struct Layout {
  int64_t seq = 1, heads = 2;
};
constexpr Layout HEADS_FIRST{2, 1};

// The arguments the fwd and bwd schemas share after q, k, v (their problem), in schema
// order, listed once: X(type as an entry takes it, name). The entries' signatures
// (FLASHATTN_PROBLEM_PARAMS), AttnArgs' members and its construction (FLASHATTN_PROBLEM_NAMES)
// follow from it, so an argument added to the schemas (csrc/ops.cpp) is added here, in
// fill_params and in the kernels that use it.
#define FLASHATTN_PROBLEM_ARGS(X)                                                                       \
  X(const std::optional<at::Tensor>&, alibi_slopes) /* None or float32 (H,) / (B, H) */                 \
  X(const std::optional<at::Tensor>&, attn_bias)    /* None or (B, H, Sq, Sk), bool or q's dtype */      \
  X(double, scale)                                                                                      \
  X(double, softcap)                                                                                    \
  X(int64_t, window_left)                                                                               \
  X(int64_t, window_right)                                                                              \
  X(int64_t, diag_offset)                                                                               \
  X(double, dropout_p)                                                                                  \
  X(const std::optional<at::Tensor>&, rng_state) /* int64 [seed, offset] */                            \
  /* packed sequences / paged K/V (flash_params.h); none in a dense call */                             \
  X(const std::optional<at::Tensor>&, cu_seqlens_q)                                                     \
  X(const std::optional<at::Tensor>&, cu_seqlens_k)                                                     \
  X(const std::optional<at::Tensor>&, seqused_k)                                                        \
  X(const std::optional<at::Tensor>&, block_table)                                                      \
  X(int64_t, max_seqlen_q)                                                                              \
  X(int64_t, max_seqlen_k)                                                                              \
  X(bool, bottom_right)                                                                                 \
  /* KV caches: each sequence's k / v batch row, its key slots before its keys */                       \
  X(const std::optional<at::Tensor>&, kv_batch_idx)                                                     \
  X(const std::optional<at::Tensor>&, leftpad_k)                                                        \
  X(int64_t, num_splits)
#define FLASHATTN_PARAM_DECL(type, name) , type name
#define FLASHATTN_PARAM_NAME(type, name) , name
#define FLASHATTN_MEMBER(type, name) std::decay_t<type> name;
// ", <type> <name>" for each: after an entry's leading tensors.
#define FLASHATTN_PROBLEM_PARAMS FLASHATTN_PROBLEM_ARGS(FLASHATTN_PARAM_DECL)
// ", <name>" for each: AttnArgs{q, k, v FLASHATTN_PROBLEM_NAMES}.
#define FLASHATTN_PROBLEM_NAMES FLASHATTN_PROBLEM_ARGS(FLASHATTN_PARAM_NAME)

// One call's problem: q, k, v and the arguments above. Tensors are held by value (a
// reference count each): the params point into them, so an entry keeps its AttnArgs alive
// until the kernel has run. Members not given in an aggregate initialisation are zero /
// None (the inference entry gives the dense ones only).
struct AttnArgs {
  at::Tensor q, k, v;
  FLASHATTN_PROBLEM_ARGS(FLASHATTN_MEMBER)
};

// An int32 index tensor (cu_seqlens, seqused_k, block_table) on q's device, its rows
// contiguous: the kernels read it as int32 arrays.
inline const int32_t* index_tensor(const std::optional<at::Tensor>& t, const at::Tensor& q, const char* name,
                                   int64_t dim) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == dim && t->device() == q.device() &&
                  (t->numel() == 0 || t->stride(-1) == 1),
              "flashattn: ", name, " must be an int32 ", dim, "-D tensor on ", q.device(), " with a contiguous last dim");
  return t->data_ptr<int32_t>();
}

// q (B, Sq, H, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv) with a contiguous head dimension
// (or sequence and heads swapped, per `layout`), plus the semantic arguments.
inline void fill_params(FlashParams& p, const AttnArgs& args, Layout layout = {}) {
  const at::Tensor &q = args.q, &k = args.k, &v = args.v;
  const std::optional<at::Tensor>& alibi_slopes = args.alibi_slopes;
  const std::optional<at::Tensor>& attn_bias = args.attn_bias;
  const std::optional<at::Tensor>& rng_state = args.rng_state;
  const double scale = args.scale, softcap = args.softcap, dropout_p = args.dropout_p;
  const int64_t window_left = args.window_left, window_right = args.window_right, diag_offset = args.diag_offset;
  const int64_t S = layout.seq, H = layout.heads;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flashattn: q, k, v must be 4-D (B, S, H, D)");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "flashattn: q, k, v must share a device");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "flashattn: q, k, v must share a dtype");
  // (An empty tensor's strides are never read: it may be an expanded one, strides 0.)
  auto rows_ok = [](const at::Tensor& t) { return t.stride(-1) == 1 || t.numel() == 0; };
  TORCH_CHECK(rows_ok(q) && rows_ok(k) && rows_ok(v), "flashattn: the head dimension must be contiguous (stride 1)");
  const bool packed_q = args.cu_seqlens_q.has_value(), paged = args.block_table.has_value();
  TORCH_CHECK(k.sizes().slice(0, 3) == v.sizes().slice(0, 3), "flashattn: k and v disagree in their first 3 dims");
  TORCH_CHECK(packed_q || paged || args.kv_batch_idx.has_value() || q.size(0) == k.size(0),
              "flashattn: q and k batch sizes differ");
  TORCH_CHECK(!packed_q || q.size(0) == 1, "flashattn: packed q must be (1, total_q, H, D)");
  TORCH_CHECK(!packed_q || paged || args.cu_seqlens_k.has_value() || args.kv_batch_idx.has_value() ||
                  k.size(0) == args.cu_seqlens_q->numel() - 1,
              "flashattn: with packed q and dense k, k needs one batch row per sequence");
  TORCH_CHECK(!(args.cu_seqlens_k.has_value() && !paged) || k.size(0) == 1,
              "flashattn: packed k must be (1, total_k, Hk, D)");
  TORCH_CHECK(!(packed_q || paged || args.seqused_k.has_value()) || !args.attn_bias.has_value(),
              "flashattn: attn_bias is not supported with packed sequences or paged K/V");
  TORCH_CHECK(q.size(3) == k.size(3), "flashattn: q and k head dims differ");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256 && v.size(3) >= 1 && v.size(3) <= 256,
              "flashattn: head dims must be in [1, 256], got ", q.size(3), " and ", v.size(3));
  TORCH_CHECK(k.size(H) > 0 && q.size(H) % k.size(H) == 0, "flashattn: num_heads must be a multiple of num_heads_k");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(S), p.q_head_stride = q.stride(H);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(S), p.k_head_stride = k.stride(H);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(S), p.v_head_stride = v.stride(H);
  p.batch = q.size(0), p.seqlen_q = q.size(S), p.seqlen_k = k.size(S);
  p.total_q = q.size(S), p.total_k = k.size(S);
  p.bottom_right = args.bottom_right;
  p.cu_seqlens_q = index_tensor(args.cu_seqlens_q, q, "cu_seqlens_q", 1);
  p.cu_seqlens_k = index_tensor(args.cu_seqlens_k, q, "cu_seqlens_k", 1);
  p.seqused_k = index_tensor(args.seqused_k, q, "seqused_k", 1);
  p.block_table = index_tensor(args.block_table, q, "block_table", 2);
  if (packed_q) {  // (1, total_q, H, D): sequences from cu_seqlens_q, rows no batch stride apart
    p.batch = args.cu_seqlens_q->numel() - 1;
    TORCH_CHECK(p.batch >= 0, "flashattn: cu_seqlens_q must have B + 1 entries");
    p.seqlen_q = args.max_seqlen_q > 0 ? args.max_seqlen_q : p.total_q;  // (0: not given, the total bounds it)
    p.q_batch_stride = 0;
  }
  if (paged) {  // (num_pages, page_size, Hk, D) pages, k_batch_stride the page stride
    const at::Tensor& bt = *args.block_table;
    TORCH_CHECK(bt.size(0) == p.batch, "flashattn: block_table must have one row per sequence");
    p.block_table_batch_stride = bt.stride(0);
    p.page_size = k.size(S), p.num_pages = k.size(0);
    TORCH_CHECK((p.page_size > 0 && p.num_pages > 0) || bt.size(1) == 0, "flashattn: paged K/V without pages");
    // (seq_view clamps every sequence to seqlen_k: never more keys than its pages hold)
    const int64_t capacity = bt.size(1) * p.page_size;
    p.seqlen_k = args.cu_seqlens_k.has_value() && args.max_seqlen_k > 0 ? std::min(args.max_seqlen_k, capacity)
                                                                          : capacity;
    p.total_k = p.num_pages * p.page_size;
  } else if (args.cu_seqlens_k.has_value()) {  // (1, total_k, Hk, D)
    p.seqlen_k = args.max_seqlen_k > 0 ? args.max_seqlen_k : p.total_k;
    p.k_batch_stride = p.v_batch_stride = 0;
  }
  TORCH_CHECK(!args.cu_seqlens_k.has_value() || args.cu_seqlens_k->numel() == p.batch + 1,
              "flashattn: cu_seqlens_k must have B + 1 entries, like cu_seqlens_q");
  TORCH_CHECK(!args.seqused_k.has_value() || args.seqused_k->numel() == p.batch,
              "flashattn: seqused_k must have one entry per sequence");
  TORCH_CHECK(args.max_seqlen_q >= 0 && args.max_seqlen_k >= 0, "flashattn: max_seqlen_q / max_seqlen_k must be >= 0");
  p.kv_batch_idx = index_tensor(args.kv_batch_idx, q, "kv_batch_idx", 1);
  p.leftpad_k = index_tensor(args.leftpad_k, q, "leftpad_k", 1);
  p.kv_batch = k.size(0);
  TORCH_CHECK(!p.kv_batch_idx || (!paged && !args.cu_seqlens_k.has_value() && args.kv_batch_idx->numel() == p.batch),
              "flashattn: kv_batch_idx needs a dense (batch, S, Hk, D) k / v and one entry per sequence");
  TORCH_CHECK(!p.leftpad_k || args.leftpad_k->numel() == p.batch, "flashattn: leftpad_k needs one entry per sequence");
  TORCH_CHECK(args.num_splits >= 0, "flashattn: num_splits must be >= 0");
  p.num_splits = args.num_splits;
  p.num_heads = q.size(H), p.num_heads_k = k.size(H);
  p.head_dim = q.size(3), p.head_dim_v = v.size(3);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.scale64 = scale, p.softcap64 = softcap;
  p.window_left = window_left, p.window_right = window_right, p.diag_offset = diag_offset;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device() == q.device(), "flashattn: alibi_slopes must be on q's device");
    TORCH_CHECK(a.scalar_type() == at::kFloat && a.stride(-1) == 1,
                "flashattn: alibi_slopes must be float32 with a contiguous last dim");
    TORCH_CHECK(a.size(-1) == p.num_heads && (a.dim() == 1 || (a.dim() == 2 && a.size(0) == p.batch)),
                "flashattn: alibi_slopes must be (H,) or (B, H)");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? a.stride(0) : 0;
  }
  if (attn_bias.has_value()) {  // (B, H, Sq, Sk) through strides, 0 on broadcast dims
    const at::Tensor& m = *attn_bias;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == p.batch && m.size(1) == p.num_heads && m.size(2) == p.seqlen_q &&
                    m.size(3) == p.seqlen_k,
                "flashattn: attn_bias must be (B, H, Sq, Sk) = (", p.batch, ", ", p.num_heads, ", ", p.seqlen_q,
                ", ", p.seqlen_k, ") (broadcast dims with stride 0), got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), "flashattn: attn_bias must be bool or ",
                q.scalar_type(), ", got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), "flashattn: attn_bias must be on ", q.device(), ", got ", m.device());
    p.bias = m.data_ptr();
    p.bias_is_bool = m.scalar_type() == at::kBool;
    p.bias_batch_stride = m.stride(0), p.bias_head_stride = m.stride(1);
    p.bias_row_stride = m.stride(2), p.bias_col_stride = m.stride(3);
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "flashattn: dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = static_cast<float>(dropout_p), p.dropout_p64 = dropout_p;
  if (dropout_p > 0) {  // [seed, offset]
    TORCH_CHECK(rng_state.has_value() && rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 &&
                    (rng_state->device().is_cpu() || rng_state->device() == q.device()),
                "flashattn: dropout needs rng_state, an int64 tensor [seed, offset] on the CPU or on q's device (",
                q.device(), ")", rng_state.has_value() ? ", got " + rng_state->toString() + " on " +
                rng_state->device().str() : std::string(", got None"));
    if (rng_state->device().is_cpu()) {  // read on the host
      const at::Tensor st = rng_state->contiguous();
      p.dropout_seed = static_cast<uint64_t>(st.data_ptr<int64_t>()[0]);
      p.dropout_offset = static_cast<uint64_t>(st.data_ptr<int64_t>()[1]);
    } else {  // read by the CUDA kernels when they run (CUDA-graph safe, flash_params.h)
      TORCH_CHECK(rng_state->is_contiguous(), "flashattn: rng_state on the GPU must be contiguous");
      p.dropout_state = rng_state->data_ptr<int64_t>();
    }
  }
}

// Rows of q (and out, dout, dq) per batch entry and batch entries: (1, total_q) with
// packed queries, else (batch, seqlen_q).
inline std::pair<int64_t, int64_t> q_rows(const FlashParams& p) {
  return p.cu_seqlens_q ? std::pair<int64_t, int64_t>{1, p.total_q} : std::pair<int64_t, int64_t>{p.batch, p.seqlen_q};
}

// out (B, Sq, H, Dv) (or per `layout`; (1, total_q, H, Dv) packed) with a contiguous head
// dimension, and lse (B, H, Sq) ((1, H, total_q) packed), contiguous.
inline void fill_output(FlashParams& p, const at::Tensor& out, const at::Tensor& lse, Layout layout = {}) {
  const int64_t S = layout.seq, H = layout.heads;
  const auto [batch, rows] = q_rows(p);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == batch && out.size(S) == rows && out.size(H) == p.num_heads &&
                  out.size(3) == p.head_dim_v && out.stride(-1) == 1,
              "flashattn: out must be (B, Sq, H, Dv) with a contiguous head dimension");
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == p.num_heads &&
                  lse.size(2) == rows,
              "flashattn: lse must be a contiguous (B, H, Sq) tensor");
  p.out = const_cast<void*>(out.data_ptr());
  p.o_batch_stride = p.cu_seqlens_q ? 0 : out.stride(0), p.o_row_stride = out.stride(S), p.o_head_stride = out.stride(H);
  p.lse = const_cast<void*>(lse.data_ptr());
}

// dout (like out) and the gradient buffers dq (like q), dk, dv (like k and v).
inline void fill_grads(FlashBwdParams& p, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
                       const at::Tensor& dv) {
  const auto [batch, rows] = q_rows(p);
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == batch && dout.size(1) == rows && dout.size(2) == p.num_heads &&
                  dout.size(3) == p.head_dim_v && (dout.stride(-1) == 1 || dout.numel() == 0),
              "flashattn: dout must be (B, Sq, H, Dv) with a contiguous head dimension");
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;
  p.dout = dout.data_ptr();
  p.do_batch_stride = packed_q ? 0 : dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dq = dq.data_ptr();
  p.dq_batch_stride = packed_q ? 0 : dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk = dk.data_ptr();
  p.dk_batch_stride = packed_k ? 0 : dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  p.dv = dv.data_ptr();
  p.dv_batch_stride = packed_k ? 0 : dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
}

// The bias gradient buffer: float32 (B, H, Sq, Sk) zeros when wanted (the caller sums
// broadcast dims), else an empty tensor.
inline at::Tensor make_dbias(FlashBwdParams& p, const at::Tensor& q, const std::optional<at::Tensor>& attn_bias,
                             bool bias_requires_grad) {
  const auto options = q.options().dtype(at::kFloat);
  if (!bias_requires_grad) return at::empty({0}, options);
  TORCH_CHECK(attn_bias.has_value() && attn_bias->scalar_type() != at::kBool,
              "flashattn: bias_requires_grad needs a float attn_bias");
  at::Tensor dbias = at::zeros({p.batch, p.num_heads, p.seqlen_q, p.seqlen_k}, options);
  p.dbias = dbias.data_ptr<float>();
  return dbias;
}

}  // namespace flashattn
