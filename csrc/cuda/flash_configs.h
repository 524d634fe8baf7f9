// Block configurations of the CUDA kernels per head-dim bucket, and the dynamic shared
// memory each launch needs. Plain C++ (no CUDA headers): the kernel launchers instantiate
// from these, ops_cuda.cpp checks a problem against the device's shared memory before
// launching, and tests/test_cuda_configs.py compiles it with the host compiler to hold
// flashattn_py/backends.py's copy of the byte counts (used by supports()) to it.
#pragma once

namespace flashattn {
namespace cfg {

constexpr int kPad = 8;      // elements (16 bytes) of padding per shared-memory row
constexpr int kElemBytes = 2;  // fp16 / bf16

constexpr int round_head_dim(long long d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 256; }

// Forward: kBM query rows per CTA, kBN keys per step, kWarps warps.
struct Fwd {
  int bm, bn, warps;
};
constexpr Fwd fwd(int d) {
  return d == 32 ? Fwd{128, 64, 8} : d == 64 ? Fwd{128, 64, 8} : d == 96 ? Fwd{64, 64, 4} : d == 128 ? Fwd{64, 64, 4}
                                                                                                    : Fwd{128, 32, 8};
}
constexpr int fwd_smem(int d) { return (fwd(d).bm + 2 * fwd(d).bn) * (d + kPad) * kElemBytes; }

// Split-KV forward (flash-decoding). A decode step reads every key once and is bound by
// memory bandwidth: 128 keys per step (the plain forward's 64 at D <= 128) double the bytes
// each tile load keeps in flight. 4 warps of 16 rows. At D = 128, 87 KB of shared memory:
// 2 CTAs per SM on sm90 (228 KB per SM), 1 on sm80 (164 KB) and sm86 / sm89 (100 KB).
constexpr Fwd fwd_split(int d) { return d <= 128 ? Fwd{64, 128, 4} : fwd(d); }
constexpr int fwd_split_smem(int d) { return (fwd_split(d).bm + 2 * fwd_split(d).bn) * (d + kPad) * kElemBytes; }

// Backward main kernel <bm, bn, warps, dsplit> and deterministic dQ kernel <qbm, qbn, qwarps>.
struct Bwd {
  int bm, bn, warps, dsplit, qbm, qbn, qwarps;
};
constexpr Bwd bwd(int d) {
  return d == 32    ? Bwd{64, 64, 4, 1, 64, 64, 4}
         : d == 64  ? Bwd{64, 64, 4, 1, 64, 64, 4}
         : d == 96  ? Bwd{32, 64, 4, 1, 64, 64, 4}
         : d == 128 ? Bwd{32, 64, 4, 1, 64, 64, 4}
                    : Bwd{32, 64, 8, 2, 64, 32, 4};
}
constexpr int bwd_smem(int d) {
  return (2 * bwd(d).bn + 2 * bwd(d).bm) * (d + kPad) * kElemBytes + bwd(d).bn * (bwd(d).bm + kPad) * kElemBytes +
         2 * bwd(d).bm * 4;
}
constexpr int bwd_dq_smem(int d) { return (2 * bwd(d).qbm + 4 * bwd(d).qbn) * (d + kPad) * kElemBytes; }

// The most dynamic shared memory one launch of this problem's kernels asks for.
constexpr int smem_bytes(long long head_dim, bool backward, bool deterministic) {
  const int d = round_head_dim(head_dim);
  const int f = fwd_smem(d) > fwd_split_smem(d) ? fwd_smem(d) : fwd_split_smem(d);
  if (!backward) return f;
  const int b = bwd_smem(d) > f ? bwd_smem(d) : f;
  return deterministic && bwd_dq_smem(d) > b ? bwd_dq_smem(d) : b;
}

}  // namespace cfg
}  // namespace flashattn
