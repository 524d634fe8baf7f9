// Plain description of one attention problem, shared by the CPU and CUDA kernels.
// No torch types: the ops layer (csrc/ops*.cpp) fills it from tensors, kernels read it.
//
// Layout (element strides, any value, so both the flash-attn (B, S, H, D) and the
// SDPA (B, H, S, D) layouts are served without copies):
//   q    (B, Sq, H,  D)      k (B, Sk, Hk, D)      v (B, Sk, Hk, Dv)
//   out  (B, Sq, H,  Dv)     lse (B, H, Sq) float32 (float64 for float64 inputs), contiguous
// H % Hk == 0: query head h reads key/value head h / (H / Hk) (MQA / GQA).
//
// Visibility of key j for query i (docs/design.md, "What every backend computes" 5):
//   visible  iff  (window_left  < 0 || j >= i + diag_offset - window_left)
//            and  (window_right < 0 || j <= i + diag_offset + window_right)
// Score order (docs/design.md): s = scale * q.k; softcap; minus ALiBi; plus bias / bool mask;
// then visibility.
// Causal is window_right == 0. diag_offset = Sk - Sq aligns the diagonal bottom-right
// (flash-attn), 0 top-left (torch SDPA).
#pragma once
#include <cstdint>

namespace flashattn {

struct FlashParams {
  // Inputs.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  // Forward outputs / backward inputs.
  void* out = nullptr;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  // (B, H, Sq) contiguous; float32, except float64 for float64 inputs (CPU kernel).
  void* lse = nullptr;

  // Sizes. With packed sequences (cu_seqlens_q below) `batch` counts the sequences and
  // seqlen_q / seqlen_k are the longest ones (max_seqlen_q / _k: grids and dropout streams
  // are sized by them), total_q / total_k the rows of q and k.
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
  int64_t total_q = 0, total_k = 0;
  int64_t num_heads = 0, num_heads_k = 0;
  int64_t head_dim = 0, head_dim_v = 0;

  // Semantics.
  float scale = 1.f;             // multiplies q . k
  float softcap = 0.f;           // > 0: s = softcap * tanh(s / softcap)
  // scale, softcap and dropout_p (below) in double, for float64 inputs (the CPU kernel
  // computes those in double; values rounded to float would cost them 1e-8 relative error).
  double scale64 = 1.0, softcap64 = 0.0, dropout_p64 = 0.0;
  // ALiBi: s -= slope[b, h] * |i + diag_offset - j|; nullptr when off. float32,
  // element (b, h) at alibi_slopes[b * alibi_batch_stride + h] (stride 0 for shape (H,)).
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  int64_t window_left = -1;      // -1: unbounded
  int64_t window_right = -1;     // -1: unbounded; 0 with window_left -1 is causal
  int64_t diag_offset = 0;       // Sk - Sq (bottom-right) or 0 (top-left)
  bool deterministic = false;    // backward: reproducible accumulation order

  // Float bias (added; the input's element type, or float32 with 16-bit inputs as torch's
  // SDPA takes it: bias_is_float32) or bool mask (true = attend), read as (B, H, Sq, Sk)
  // through strides (0 on broadcast dims); nullptr when off.
  const void* bias = nullptr;
  bool bias_is_bool = false;
  bool bias_is_float32 = false;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;

  // Dropout on P: keep with probability 1 - dropout_p, scale kept values by 1/(1-p). The
  // keep decision for (b, h, i, j) is a pure function of (seed, offset, b, h, i, j)
  // (Philox4x32-10, see cpu/dropout.h), so the backward regenerates it.
  float dropout_p = 0.f;
  uint64_t dropout_seed = 0, dropout_offset = 0;
  // CUDA kernels: when set, [seed, offset] (int64, on the GPU) read by the kernels at run
  // time instead of dropout_seed / dropout_offset. A CUDA graph replays its launches with
  // the arguments baked in at capture; a state the graph itself refills on every replay
  // (torch.randint on the device, ops.py) gives every replay a fresh mask.
  const int64_t* dropout_state = nullptr;

  // Packed sequences (varlen) and paged K/V; all null in a dense call. Read through
  // seq_view() / key_offset() below, never directly by a kernel.
  //  cu_seqlens_q (batch + 1): sequence b's queries are rows [cu_seqlens_q[b],
  //    cu_seqlens_q[b + 1]) of q, out and lse; q / out batch strides are 0.
  //  cu_seqlens_k (batch + 1): likewise its keys in k / v (not paged).
  //  seqused_k (batch): only the first seqused_k[b] keys of sequence b are attended.
  //  block_table (batch, max_blocks): paged K/V, k / v (num_pages, page_size, Hk, D): key j
  //    of sequence b is row j % page_size of page block_table[b, j / page_size]
  //    (k_batch_stride is the page stride); seqlen_k is at most max_blocks * page_size.
  //  max_seqlen_q / _k given as 0 mean "not known": seqlen_q / seqlen_k are then the totals.
  // Values come from the device without host checks on GPUs: seq_view clamps every length
  // and key_offset every page index into the tensors' bounds.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_table_batch_stride = 0, page_size = 0, num_pages = 0;
  // KV caches (flash_attn_with_kvcache): kv_batch_idx (batch): sequence b reads batch row
  // kv_batch_idx[b] of a dense k / v (kv_batch rows); leftpad_k (batch): its keys start
  // leftpad_k[b] slots into its row (or its pages), the slots before are not attended and
  // key positions (diagonal, ALiBi) count from there.
  const int32_t* kv_batch_idx = nullptr;
  const int32_t* leftpad_k = nullptr;
  int64_t kv_batch = 0;
  // Diagonal of sequence b: diag_offset + (bottom_right ? its seqlen_k - its query
  // positions (seqlen_q / q_group) : 0).
  bool bottom_right = false;
  // Key splits of one query block (flash-decoding): 0 = the kernel's heuristic, 1 = none,
  // n = exactly n (fewer when there are fewer key blocks). Results agree for every value
  // within rounding.
  int64_t num_splits = 0;
  // CPU kernels: the path a call with gradients was given for its forward and backward
  // (cpu/flash_cpu.h encode_path), 0: chosen per call from the problem.
  int64_t cpu_path = 0;
  // CPU kernels: query rows per query position. 1, except in the forward's GQA-packed view
  // (cpu/flash_fwd.cpp gqa_packed_view): the rows of a kv head there are its query heads'
  // rows of each position side by side, row r at position r / q_group; seqlen_q counts rows.
  int64_t q_group = 1;
};

#if defined(__CUDACC__)
#define FLASHATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLASHATTN_HOST_DEVICE inline
#endif

// Sequence b of a call, as every kernel addresses it (flash-attn's BlockInfo). Dense
// attention is the case without cu_seqlens: starts 0, the call's lengths, batch strides.
struct SeqView {
  int64_t q_start, k_start;    // first row of the sequence in q / out / lse and in k / v
                               // (paged: its first key slot, leftpad_k)
  int64_t seqlen_q, seqlen_k;  // its lengths (seqlen_k: keys attended)
  int64_t diag_offset;         // key j is on query i's diagonal when j == i + diag_offset
  int64_t q_offset, k_offset, v_offset;  // element offsets of its row 0 in q (and out's
                                         // row stride may differ), k, v (0 when paged)
  int64_t lse_row;  // index in lse of (b, head 0, row 0); head h adds h * lse_head_stride
};

FLASHATTN_HOST_DEVICE int64_t clamp_len(int64_t v, int64_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

FLASHATTN_HOST_DEVICE SeqView seq_view(const FlashParams& p, int64_t b) {
  SeqView s;
  if (p.cu_seqlens_q) {
    s.q_start = clamp_len(p.cu_seqlens_q[b], p.total_q);
    s.seqlen_q = clamp_len(clamp_len(p.cu_seqlens_q[b + 1], p.total_q) - s.q_start, p.seqlen_q);
  } else {
    s.q_start = 0, s.seqlen_q = p.seqlen_q;
  }
  if (p.cu_seqlens_k && !p.block_table) {
    s.k_start = clamp_len(p.cu_seqlens_k[b], p.total_k);
    s.seqlen_k = clamp_len(clamp_len(p.cu_seqlens_k[b + 1], p.total_k) - s.k_start, p.seqlen_k);
  } else if (p.cu_seqlens_k) {  // paged: cu_seqlens_k gives lengths only
    s.k_start = 0;
    s.seqlen_k = clamp_len(int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b], p.seqlen_k);
  } else {
    s.k_start = 0, s.seqlen_k = p.seqlen_k;
  }
  if (p.seqused_k) s.seqlen_k = clamp_len(p.seqused_k[b], s.seqlen_k);
  if (p.leftpad_k) {  // the first leftpad_k[b] of the sequence's key slots are not its keys
    const int64_t pad = clamp_len(p.leftpad_k[b], s.seqlen_k);
    s.k_start += pad, s.seqlen_k -= pad;
  }
  s.diag_offset = p.diag_offset + (p.bottom_right ? s.seqlen_k - s.seqlen_q / p.q_group : 0);
  s.q_offset = b * p.q_batch_stride + s.q_start * p.q_row_stride;
  const int64_t kv_row = p.kv_batch_idx ? clamp_len(p.kv_batch_idx[b], p.kv_batch - 1) : b;
  s.k_offset = p.block_table ? 0 : kv_row * p.k_batch_stride + s.k_start * p.k_row_stride;
  s.v_offset = p.block_table ? 0 : kv_row * p.v_batch_stride + s.k_start * p.v_row_stride;
  s.lse_row = p.cu_seqlens_q ? s.q_start : b * p.num_heads * p.seqlen_q;
  return s;
}

// lse is (B, H, Sq) in a dense call, (1, H, total_q) with packed queries (flash-attn's
// (H, total_q)): the distance between heads.
FLASHATTN_HOST_DEVICE int64_t lse_head_stride(const FlashParams& p) {
  return p.cu_seqlens_q ? p.total_q : p.seqlen_q;
}

// Element offset of key j's row in k (row_stride = k_row_stride) or v (v_row_stride),
// batch_stride the page / batch stride: seq_offset (s.k_offset / s.v_offset) + j *
// row_stride unless paged; paged, key j is slot s.k_start + j of the sequence's pages.
FLASHATTN_HOST_DEVICE int64_t key_offset(const FlashParams& p, const SeqView& s, int64_t b, int64_t j,
                                         int64_t seq_offset, int64_t batch_stride, int64_t row_stride) {
  if (!p.block_table) return seq_offset + j * row_stride;
  const int64_t slot = s.k_start + j;
  const int64_t page = clamp_len(p.block_table[b * p.block_table_batch_stride + slot / p.page_size], p.num_pages - 1);
  return page * batch_stride + (slot % p.page_size) * row_stride;
}

// Backward: gradients plus the forward's q, k, v, out, lse above.
struct FlashBwdParams : FlashParams {
  const void* dout = nullptr;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  void* dq = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  void* dk = nullptr;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  void* dv = nullptr;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  // Gradient of a float bias, (B, H, Sq, Sk) contiguous float32 (the caller sums broadcast
  // dims); nullptr when not wanted.
  float* dbias = nullptr;
};

// flash_attn_with_kvcache's append (flashattn::kvcache_write; ops.cpp, ops_cuda.cpp): row
// (b, i) of the new keys / values (batch x new_keys rows of heads x width elements,
// element_size bytes each, any element strides) goes to slot cache_seqlens[b] + i of cache
// entry cache_batch_idx[b] (else b), or of the pages block_table[b] (`slots` rows per
// page), among `entries` x `slots` rows. Index tensors are int32 or int64 (the *_int64
// flags), read through their strides.
struct KvcacheWriteParams {
  struct Rows {
    const void* src = nullptr;
    void* dst = nullptr;
    int64_t width = 0;  // D for K, Dv for V
    int64_t src_stride[4] = {}, dst_stride[4] = {};
  } k, v;
  int64_t batch = 0, new_keys = 0, heads = 0, entries = 0, slots = 0, element_size = 0;
  const void* cache_seqlens = nullptr;
  int64_t seqlens_stride = 0;
  bool seqlens_int64 = false;
  bool has_batch_idx = false;
  const void* cache_batch_idx = nullptr;
  int64_t rows_stride = 0;
  bool rows_int64 = false;
  bool paged = false;
  const void* block_table = nullptr;
  int64_t table_width = 0, table_stride0 = 0, table_stride1 = 0;
  bool table_int64 = false;
};

FLASHATTN_HOST_DEVICE int64_t read_index(const void* t, bool is_int64, int64_t at) {
  return is_int64 ? static_cast<const int64_t*>(t)[at] : static_cast<const int32_t*>(t)[at];
}

// Key slots of each batch entry; 0 (or no rows, or no entries): nothing to write.
FLASHATTN_HOST_DEVICE int64_t kvcache_capacity(const KvcacheWriteParams& p) {
  return p.paged ? p.table_width * p.slots : p.slots;
}

// Where row (b, i) goes: cache entry *entry (a page when paged), row *row of it. Every index
// clamped into the caches (the length first, so that no value overflows), so no value
// writes out of bounds. Needs kvcache_capacity(p) > 0 and p.entries > 0.
FLASHATTN_HOST_DEVICE void kvcache_destination(const KvcacheWriteParams& p, int64_t b, int64_t i, int64_t* entry,
                                               int64_t* row) {
  const int64_t capacity = kvcache_capacity(p);
  int64_t length = read_index(p.cache_seqlens, p.seqlens_int64, b * p.seqlens_stride);
  length = length < -p.new_keys ? -p.new_keys : (length > capacity ? capacity : length);
  const int64_t slot = clamp_len(length + i, capacity - 1);
  if (p.paged) {
    const int64_t at = b * p.table_stride0 + (slot / p.slots) * p.table_stride1;
    *entry = clamp_len(read_index(p.block_table, p.table_int64, at), p.entries - 1);
    *row = slot % p.slots;
  } else {
    *entry = clamp_len(p.has_batch_idx ? read_index(p.cache_batch_idx, p.rows_int64, b * p.rows_stride) : b,
                       p.entries - 1);
    *row = slot;
  }
}


}  // namespace flashattn
