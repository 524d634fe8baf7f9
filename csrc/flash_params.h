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

  // Sizes.
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
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

  // Float bias (added; the input's element type) or bool mask (true = attend), read as
  // (B, H, Sq, Sk) through strides (0 on broadcast dims); nullptr when off.
  const void* bias = nullptr;
  bool bias_is_bool = false;
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
};

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

}  // namespace flashattn
