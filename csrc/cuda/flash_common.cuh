// Shared device helpers of the CUDA flash kernels: tensor-core mma.sync (m16n8k16),
// ldmatrix, cp.async, tile loads/stores with bounds masks, and the masking geometry.
// No torch headers: kernels see only flashattn::FlashParams.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, 16-bit A/B, f32 C), lane = 4 * g + t:
//   A (16x16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, "col"):       b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8, f32):         c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// Two adjacent C tiles (n 0-7, 8-15) re-packed as 16-bit pairs form the A fragment of
// the next product (k = those 16 columns); the kernels use this for P·V and friends.
//
// Shared-memory tiles are row-major [rows][kD + kPad] in elements; the 16-byte pad makes
// consecutive rows start 16 bytes apart modulo 128, so every ldmatrix phase (8 rows x
// 16 bytes) and every cp.async row write is bank-conflict free, for any kD % 8 == 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "flash_configs.h"
#include "flash_params.h"
#include "philox.cuh"

namespace flashattn {
namespace cuda_impl {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPad = cfg::kPad;  // elements (16 bytes) of padding per shared-memory row

// ---------------------------------------------------------------------------------
// Element types.
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// ---------------------------------------------------------------------------------
// Tensor-core primitives (inline PTX).
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The two n8 tiles c0, c1 (columns 0-7, 8-15 of a 16-column block) += a times the two
// B fragments of one ldmatrix_x4 (bn_off / bk_off): {b[0], b[1]}, then {b[2], b[3]}.
template <typename T>
__device__ __forceinline__ void mma16816_x2(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[4]) {
  mma16816<T>(c0, a, b[0], b[1]);
  mma16816<T>(c1, a, b[2], b[3]);
}

// The A fragment of a 16-column k block from the C tiles c0, c1 of its columns 0-7 and
// 8-15, re-packed as 16-bit pairs (the layouts above).
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = Elem<T>::pack(c0[0], c0[1]);
  a[1] = Elem<T>::pack(c0[2], c0[3]);
  a[2] = Elem<T>::pack(c1[0], c1[1]);
  a[3] = Elem<T>::pack(c1[2], c1[3]);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// Lane address helpers for a 16x16 block at (r0, c0) of a [rows][stride] tile.
// A operand, tile stored [m][k]:                        a0..a3 of the block.
__device__ __forceinline__ int a_off(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 15)) * stride + c0 + (lane >> 4) * 8;
}
// B operand of two n-tiles, tile stored [n][k] (non-trans): {b0,b1} of n r0..r0+7, {b0,b1} of r0+8..
__device__ __forceinline__ int bn_off(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + ((lane >> 4) << 3)) * stride + c0 + ((lane >> 3) & 1) * 8;
}
// B operand of two n-tiles, tile stored [k][n] (use .trans): {b0,b1} of n c0..c0+7, then c0+8..
__device__ __forceinline__ int bk_off(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + c0 + (lane >> 4) * 8;
}
// A operand, tile stored transposed [k][m] (use .trans): a0..a3 of the block m c0.., k r0..
__device__ __forceinline__ int at_off(int lane, int r0, int c0, int stride) {
  return (r0 + (lane & 7) + (lane >> 4) * 8) * stride + c0 + ((lane >> 3) & 1) * 8;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh for the softcap. Not tanhf: --use_fast_math (setup.py) compiles it to
// tanh.approx.f32, relative error about 2^-11, enough for fp16 + softcap to break the
// correctness rule. |x| >= 0.6: the Triton kernels' formula (kernels/common.py tanh_f32),
// 1 - 2 / (e^2|x| + 1), from ex2.approx and __fdividef (2 ulp each), which saturates to
// 1 without NaN (e = inf: 2 / inf = 0; __fdividef returns 0 past 2^126, where 1 minus
// the quotient rounds to 1 anyway). |x| < 0.6, where that formula cancels: x + x^3 P(x^2),
// P a degree-4 least-squares fit of (tanh x - x) / x^3 on [0, 0.6] (relative error of
// the result below 1.2e-7 in float32). The branch, rather than one formula, also kept the
// backward kernels at their register use of libdevice's tanhf (RESULTS.md, issue 19).
__device__ __forceinline__ float softcap_tanh(float x) {
  const float ax = fabsf(x);
  float r;
  if (ax >= 0.6f) {
    r = 1.f - __fdividef(2.f, fast_exp2(ax * (2.f * kLog2e)) + 1.f);
    r = copysignf(r, x);
  } else {
    const float t = x * x;
    float q = fmaf(-5.98496059e-3f, t, 2.08681487e-2f);
    q = fmaf(q, t, -5.38035668e-2f);
    q = fmaf(q, t, 1.33321330e-1f);
    q = fmaf(q, t, -3.33333045e-1f);
    r = fmaf(x * t, q, x);
  }
  return r;
}

// The 1-D grid of every kernel here: blockIdx.x = (b * H + h) * n_blocks + block (b the
// sequence, n_blocks sized by the longest one), blocks of one (b, h) adjacent so they
// share K / V in L2. gridDim.y and .z stop at 65535, which
// batch * heads (decoding, many short sequences) passes; .x allows 2^31 - 1.
struct GridPos {
  int block, h, b;
};
// Recomputed where needed (the epilogues call it again) rather than kept live across the
// main loops: blockIdx.y / .z used to be free special-register reads, and the plain
// forward kernels sit at their 128-register cap. The asm volatile read of %ctaid.x keeps
// the compiler from merging the calls into one long-lived value. 32-bit arithmetic:
// the grid is at most 2^31 - 1 blocks (grid_1d).
__device__ __forceinline__ GridPos grid_pos(int64_t n_blocks, int64_t num_heads) {
  unsigned id;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(id));
  const unsigned nb = static_cast<unsigned>(n_blocks), nh = static_cast<unsigned>(num_heads);
  const unsigned bh = id / nb;
  return GridPos{static_cast<int>(id - bh * nb), static_cast<int>(bh % nh), static_cast<int>(bh / nh)};
}
// Host side: the grid for n_blocks per (b, h); 0 when it does not fit (the launcher then
// returns cudaErrorInvalidConfiguration).
inline unsigned grid_1d(int64_t n_blocks, int64_t batch, int64_t num_heads) {
  const int64_t total = n_blocks * batch * num_heads;
  return total > INT_MAX ? 0u : static_cast<unsigned>(total);
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per kernel instantiation and
// device rather than before every launch (a driver call each time). One instance per
// instantiation: a function-local static of its launcher. The attribute belongs to the
// device's context, so it is tracked per device (devices past 63 set it every launch).
struct SmemAttribute {
  std::atomic<unsigned long long> done{0};
  cudaError_t ensure(const void* kernel, int bytes) {
    if (bytes <= 48 * 1024) return cudaSuccess;
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    const unsigned long long bit = dev < 64 ? 1ull << dev : 0ull;
    if (bit != 0 && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_acq_rel);
    return e;
  }
};

// ---------------------------------------------------------------------------------
// cp.async (sm80+): 16-byte global -> shared copies, zero-filled when src_bytes == 0.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Load rows [0, kRows) x columns [0, kD) of a tile into shared memory, zero outside
// rows < rows_valid and columns < cols_valid; row r starts at row_ptr(r) (only called for
// valid rows), `fallback` is any valid address for the zero-filled chunks. `vec`: every
// row start is 16-byte aligned and cols_valid % 8 == 0, so 16-byte cp.async is legal;
// otherwise a scalar fallback (synchronous loads) handles any stride or head dim.
template <typename T, int kRows, int kD, int kThreads, typename RowPtr>
__device__ __forceinline__ void load_rows(T* smem, const T* fallback, RowPtr row_ptr, int rows_valid,
                                          int cols_valid, bool vec) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kTotal = kRows * kChunksPerRow;
  constexpr int kStride = kD + kPad;
  static_assert(kTotal % kThreads == 0, "tile chunks must divide among threads");
  // Not unrolled: unrolled copies keep one 64-bit address per iteration live across the
  // main loop and push the forward kernels into register spills.
  if (vec) {
#pragma unroll 1
    for (int it = 0; it < kTotal / kThreads; ++it) {
      const int idx = it * kThreads + threadIdx.x;
      const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
      const bool ok = r < rows_valid && c * 8 < cols_valid;
      const T* src = ok ? row_ptr(r) + c * 8 : fallback;
      cp_async16(smem + r * kStride + c * 8, src, ok ? 16 : 0);
    }
  } else {
#pragma unroll 1
    for (int it = 0; it < kTotal / kThreads; ++it) {
      const int idx = it * kThreads + threadIdx.x;
      const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
      union {
        uint4 u;
        T e[8];
      } buf;
      buf.u = make_uint4(0, 0, 0, 0);
      if (r < rows_valid) {
        const T* src = row_ptr(r);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (c * 8 + e < cols_valid) buf.e[e] = src[c * 8 + e];
        }
      }
      *reinterpret_cast<uint4*>(smem + r * kStride + c * 8) = buf.u;
    }
  }
}

// A tile of consecutive rows row_stride apart from gbase.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, const T* gbase, int64_t row_stride, int rows_valid,
                                          int cols_valid, bool vec) {
  load_rows<T, kRows, kD, kThreads>(
      smem, gbase, [=](int r) { return gbase + r * row_stride; }, rows_valid, cols_valid, vec);
}

// A K or V tile of keys [j0, j0 + kRows) of sequence b: consecutive rows from `base` (k or
// v at the sequence's row 0 and the head), or, with a block table, each key row looked up
// through key_offset on its own (any page size: a tile may span pages; key j is slot
// leftpad_k + j of the sequence's pages); `base` is then k or v at the head. Rows past rows_valid are zero and never looked up. b is taken as a
// functor so callers re-derive it only on the paged path instead of keeping it live.
// kPaged false: never paged (the lookup code costs registers in the main loops even when
// not taken, so kernels without a paged caller compile without it).
template <typename T, int kRows, int kD, int kThreads, bool kPaged, typename BatchFn>
__device__ __forceinline__ void load_kv_tile(T* smem, const T* base, const FlashParams& p, BatchFn batch, int j0,
                                             int64_t page_stride, int64_t row_stride, int rows_valid, int cols_valid,
                                             bool vec) {
  if (!kPaged || p.block_table == nullptr) {
    load_tile<T, kRows, kD, kThreads>(smem, base + j0 * row_stride, row_stride, rows_valid, cols_valid, vec);
  } else {
    const int b = batch();
    // The sequence's first key slot (seq_view's k_start when paged: leftpad_k), re-read
    // here rather than kept live across the main loop; key_offset reads only k_start and the
    // block table when paged. (A pad past the sequence's keys leaves it none: no row is
    // looked up then, so the clamp to seqlen_k suffices.)
    SeqView sv{};
    sv.k_start = p.leftpad_k ? clamp_len(p.leftpad_k[b], p.seqlen_k) : 0;
    // One lookup per key row, not per 16-byte chunk (a chunk's copy would wait on its own
    // block-table read and page arithmetic): each row's offset goes into the padding
    // after the row's kD columns (16 bytes, never read by the MMAs), then the copies read it.
    // (The caller has synchronised after the last reads of this tile, padding included.)
    constexpr int kStride = kD + kPad;
    const auto row_off = [&](int r) { return reinterpret_cast<int64_t*>(smem + r * kStride + kD); };
    for (int r = threadIdx.x; r < kRows; r += kThreads) {
      if (r < rows_valid) *row_off(r) = key_offset(p, sv, b, int64_t(j0) + r, 0, page_stride, row_stride);
    }
    __syncthreads();
    load_rows<T, kRows, kD, kThreads>(
        smem, base, [&](int r) { return base + *row_off(r); }, rows_valid, cols_valid, vec);
  }
}

// Store rows [0, rows_valid) x columns [0, cols_valid) of a shared tile to global memory.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void store_tile(T* gbase, const T* smem, int64_t row_stride, int rows_valid,
                                           int cols_valid, bool vec) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kTotal = kRows * kChunksPerRow;
  constexpr int kStride = kD + kPad;
  static_assert(kTotal % kThreads == 0, "tile chunks must divide among threads");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) {
    const int idx = it * kThreads + threadIdx.x;
    const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
    if (r >= rows_valid || c * 8 >= cols_valid) continue;
    T* dst = gbase + r * row_stride + c * 8;
    const T* src = smem + r * kStride + c * 8;
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (c * 8 + e < cols_valid) dst[e] = src[e];
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Masking geometry of one sequence (built from its SeqView: off = diag_offset, sk / sq =
// its lengths; i, j count from its first row). Key j is visible for query i iff
// i + off - left <= j <= i + off + right (flash_params.h; an unbounded side is -1). Ranges
// are half-open, as the CPU kernel's KeyRange and Triton's key_span: query i sees the keys
// [lo(i), hi(i)), lo >= 0 and hi <= sk (hi <= lo: none); key j is seen by the queries
// [qlo(j), qhi(j)), qlo >= 0 and qhi <= sq. Host and device (tests/test_cuda_host.py checks
// them against the reference's mask).
struct Window {
  int64_t off, left, right, sk, sq;
  FLASHATTN_HOST_DEVICE int64_t lo(int64_t i) const {
    int64_t v = left >= 0 ? i + off - left : 0;
    return v < 0 ? 0 : v;
  }
  FLASHATTN_HOST_DEVICE int64_t hi(int64_t i) const {
    int64_t v = right >= 0 ? i + off + right + 1 : sk;
    return v > sk ? sk : v;
  }
  FLASHATTN_HOST_DEVICE int64_t qlo(int64_t j) const {
    int64_t v = right >= 0 ? j - off - right : 0;
    return v < 0 ? 0 : v;
  }
  FLASHATTN_HOST_DEVICE int64_t qhi(int64_t j) const {
    int64_t v = left >= 0 ? j - off + left + 1 : sq;
    return v > sq ? sq : v;
  }
};

__device__ __forceinline__ int clamp_int(int64_t v) {
  return v < -(int64_t(1) << 30) ? -(1 << 30) : (v > (int64_t(1) << 30) ? (1 << 30) : static_cast<int>(v));
}

// ---------------------------------------------------------------------------------
// Kernel prologues: what every kernel derives first from its thread, its sequence
// (seq_view) and its query head. Each is a small struct built by one function and unpacked
// with structured bindings into the kernel's locals, so a value lives exactly as long as
// the kernel uses it (what the main loops re-derive, they still re-derive).

// This thread's warp, its lane and the lane's fragment coordinates (lane = 4 * g + t4).
struct LaneIds {
  int warp, lane, g, t4;
};
__device__ __forceinline__ LaneIds lane_ids() {
  const int tid = threadIdx.x, lane = tid & 31;
  return LaneIds{tid >> 5, lane, lane >> 2, lane & 3};
}

// Sequence s at query head h: its lengths and the head dims (int), q at the sequence's row
// 0 and head h, k and v at their row 0 (0 when paged) and KV head h / heads_per_kv.
template <typename T>
struct HeadView {
  int Sq, Sk, D, Dv;
  const T *q, *k, *v;
};
template <typename T>
__device__ __forceinline__ HeadView<T> head_view(const FlashParams& p, const SeqView& s, int h, int heads_per_kv) {
  const int hk = h / heads_per_kv;
  return HeadView<T>{static_cast<int>(s.seqlen_q),
                     static_cast<int>(s.seqlen_k),
                     static_cast<int>(p.head_dim),
                     static_cast<int>(p.head_dim_v),
                     static_cast<const T*>(p.q) + s.q_offset + h * p.q_head_stride,
                     static_cast<const T*>(p.k) + s.k_offset + hk * p.k_head_stride,
                     static_cast<const T*>(p.v) + s.v_offset + hk * p.v_head_stride};
}

// The masking geometry of sequence s.
__device__ __forceinline__ Window seq_window(const FlashParams& p, const SeqView& s) {
  return Window{s.diag_offset, p.window_left, p.window_right, s.seqlen_k, s.seqlen_q};
}

// The blocks of kBlock rows (or keys) that hold any of [lo, hi): [begin, end), empty when
// hi <= lo.
struct BlockRange {
  int begin, end;
};
template <int kBlock>
FLASHATTN_HOST_DEVICE BlockRange block_range(int64_t lo, int64_t hi) {
  BlockRange r{0, 0};
  if (hi > lo) {
    r.begin = static_cast<int>(lo / kBlock);
    r.end = static_cast<int>((hi + kBlock - 1) / kBlock);
  }
  return r;
}

// ---------------------------------------------------------------------------------
// Bias / bool mask and dropout (the kernels' kExt variants; the plain variants never
// touch these fields). Scores are in the log2 domain, so a float bias is scaled by log2(e),
// staying finite where it is finite and at most 2^126 in size: a mask of the dtype's minimum
// (transformers' masks) would overflow to -inf, emptying a fully masked row that torch's
// SDPA averages uniformly, and the lse of such a row (natural log) must come back to log2
// in the backward. (Finite biases beyond 2^126 / log2 e, about 5.9e37, count as that: only
// a row whose keys all lie beyond it at different biases comes out otherwise than torch's.)
// `base` = b * bias_batch_stride + h * bias_head_stride; i < Sq and j < Sk (callers check).
template <typename T>
__device__ __forceinline__ float add_bias_log2(const FlashParams& p, int64_t base, int64_t i, int64_t j, float x) {
  const int64_t o = base + i * p.bias_row_stride + j * p.bias_col_stride;
  if (p.bias_is_bool) return static_cast<const unsigned char*>(p.bias)[o] ? x : -INFINITY;
  const float b = p.bias_is_float32 ? static_cast<const float*>(p.bias)[o]
                                    : Elem<T>::to_float(static_cast<const T*>(p.bias)[o]);
  constexpr float kBound = 5.896282e37f;  // 2^126 / log2(e); NaN and +-inf go through as they are
  return x + (isfinite(b) ? fminf(fmaxf(b, -kBound), kBound) : b) * kLog2e;
}

// Dropout draws for query row `row` = its lse index (SeqView::lse_row + h * lse_head_stride
// + i: (b * H + h) * Sq + i when dense) and key group j / 4.
struct Dropout {
  uint64_t seed, offset, threshold;  // keep iff draw >= threshold
  int64_t groups_per_row;            // ceil(Sk / 4), Sk = p.seqlen_k (the longest sequence)
  float mult;                        // 1 / (1 - p)
  const int64_t* state;              // device [seed, offset] (FlashParams::dropout_state) or null
  // Draws with this launch's seed and offset: from device memory when `state` is set, read
  // when the kernel runs (a CUDA graph replay sees the state the graph refilled). Read at
  // each draw (an L1 hit) through asm volatile so the compiler does not hoist them into
  // four registers held across the main loops, which sit at the register cap.
  __device__ __forceinline__ void draws(int64_t row, int64_t group, uint32_t (&d)[4]) const {
    uint64_t s = seed, o = offset;
    if (state != nullptr) {
      asm volatile("ld.global.nc.u64 %0, [%2];\n\tld.global.nc.u64 %1, [%2 + 8];" : "=l"(s), "=l"(o) : "l"(state));
    }
    philox::generate(s, static_cast<uint64_t>(row * groups_per_row + group), o, d);
  }
  // The scale factor of key lane `lane` (j % 4): mult when kept, 0 when dropped.
  __device__ __forceinline__ float factor(const uint32_t (&d)[4], int lane) const {
    const uint32_t x = lane == 0 ? d[0] : lane == 1 ? d[1] : lane == 2 ? d[2] : d[3];
    return uint64_t(x) >= threshold ? mult : 0.f;
  }
  // The factor of key j in query row `row`: draws of its group j / 4, lane j % 4.
  __device__ __forceinline__ float factor_of(int64_t row, int j) const {
    uint32_t d[4];
    draws(row, j >> 2, d);
    return factor(d, j & 3);
  }
};

inline Dropout make_dropout(const FlashParams& p) {
  Dropout d;
  d.seed = p.dropout_seed;
  d.offset = p.dropout_offset;
  d.threshold = philox::keep_threshold(p.dropout_p);
  d.groups_per_row = (p.seqlen_k + 3) / 4;
  // (1 / (1 - p) rounded once: 1 - p in float rounds first, e.g. 1 - 0.9f)
  d.mult = p.dropout_p > 0.f ? static_cast<float>(1.0 / (1.0 - p.dropout_p64)) : 1.f;
  d.state = p.dropout_p > 0.f ? p.dropout_state : nullptr;
  return d;
}

// Host-side: 16-byte alignment of every row start of a (batch, rows, heads, cols) tensor
// of 16-bit elements. The stride of a dim of size 1 is never multiplied by anything but 0,
// so it does not count (B = 1 or H = 1 views, e.g. a slice of a larger batch, keep the
// vector path).
inline bool rows_aligned16(const void* ptr, int64_t batch, int64_t batch_stride, int64_t rows, int64_t row_stride,
                           int64_t heads, int64_t head_stride, int64_t cols) {
  auto ok = [](int64_t size, int64_t stride) { return size <= 1 || stride % 8 == 0; };
  return (reinterpret_cast<uintptr_t>(ptr) % 16 == 0) && ok(batch, batch_stride) && ok(rows, row_stride) &&
         ok(heads, head_stride) && cols % 8 == 0;
}

// rows_aligned16 of a tensor laid out like q (q, out, dout, dq): (B, Sq, ...) dense,
// (1, total_q, ...) with packed queries (every row of it is addressed, not only max_seqlen_q).
inline bool q_rows_aligned16(const FlashParams& p, const void* ptr, int64_t batch_stride, int64_t row_stride,
                             int64_t heads, int64_t head_stride, int64_t cols) {
  if (p.cu_seqlens_q) return rows_aligned16(ptr, 1, 0, p.total_q, row_stride, heads, head_stride, cols);
  return rows_aligned16(ptr, p.batch, batch_stride, p.seqlen_q, row_stride, heads, head_stride, cols);
}
// Likewise for a tensor laid out like k (k, v, dk, dv): (num_pages, page_size, ...) when
// paged (the page stride counts), (1, total_k, ...) with packed keys, else (B, Sk, ...)
// ((kv_batch, Sk, ...) with kv_batch_idx). leftpad_k moves a sequence's first key by whole
// rows, so it keeps the rows aligned.
inline bool k_rows_aligned16(const FlashParams& p, const void* ptr, int64_t batch_stride, int64_t row_stride,
                             int64_t heads, int64_t head_stride, int64_t cols) {
  if (p.block_table) {
    return rows_aligned16(ptr, p.num_pages, batch_stride, p.page_size, row_stride, heads, head_stride, cols);
  }
  if (p.cu_seqlens_k) return rows_aligned16(ptr, 1, 0, p.total_k, row_stride, heads, head_stride, cols);
  // kv_batch_idx: any of the kv_batch rows may be read, not only the first batch ones.
  const int64_t batch = p.kv_batch_idx ? p.kv_batch : p.batch;
  return rows_aligned16(ptr, batch, batch_stride, p.seqlen_k, row_stride, heads, head_stride, cols);
}

// Rows of lse (and of the backward's softmax_d; dq_accum has head_dim floats per row):
// B * H * Sq dense, H * total_q with packed queries. Row of (b, h, i):
// seq_view(p, b).lse_row + h * lse_head_stride(p) + i.
FLASHATTN_HOST_DEVICE int64_t lse_rows(const FlashParams& p) {
  return p.cu_seqlens_q ? p.num_heads * p.total_q : p.batch * p.num_heads * p.seqlen_q;
}

inline int round_head_dim(int64_t d) { return cfg::round_head_dim(d); }

// What FwdArgs and BwdArgs derive alike from the params: the log2-domain score factors,
// the GQA ratio, the dropout stream, and whether q, k, v rows allow 16-byte vector loads.
template <typename Args>
inline void fill_shared_args(Args& args, const FlashParams& p) {
  args.scale_log2 = p.scale * kLog2e;
  args.cap_in = p.softcap > 0.f ? p.scale / p.softcap : 0.f;
  args.cap_out = p.softcap * kLog2e;
  args.heads_per_kv = static_cast<int>(p.num_heads / p.num_heads_k);
  args.drop = make_dropout(p);
  args.vec_q = q_rows_aligned16(p, p.q, p.q_batch_stride, p.q_row_stride, p.num_heads, p.q_head_stride, p.head_dim);
  args.vec_k = k_rows_aligned16(p, p.k, p.k_batch_stride, p.k_row_stride, p.num_heads_k, p.k_head_stride, p.head_dim);
  args.vec_v =
      k_rows_aligned16(p, p.v, p.v_batch_stride, p.v_row_stride, p.num_heads_k, p.v_head_stride, p.head_dim_v);
}

}  // namespace cuda_impl
}  // namespace flashattn
