// Philox4x32-10 dropout draws for the CUDA kernels, bit for bit the generator of
// csrc/cpu/dropout.h (so the CPU kernel, the CUDA kernels and the dropout_mask test hook
// agree on every keep decision for the same [seed, offset]).
//
// For query row r = (b * H + h) * Sq + i and key column j: counter = (r * ceil(Sk / 4) + j / 4
// as 64 bits split lo/hi, offset lo/hi), key = seed (lo, hi), and lane j % 4 of the output
// is the draw; the key is kept iff draw >= uint64(p * 2^32).
//
// Usable from host code too (plain C++ compilers see `inline`), which lets a CPU test
// compare it with the CPU generator.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLASHATTN_HD __host__ __device__ __forceinline__
#else
#define FLASHATTN_HD inline
#endif

namespace flashattn {
namespace philox {

FLASHATTN_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = uint64_t(a) * b;
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
#endif
}

// out[0..3] = Philox4x32-10(counter = (ctr, offset), key = seed).
FLASHATTN_HD void generate(uint64_t seed, uint64_t ctr, uint64_t offset, uint32_t (&out)[4]) {
  uint32_t c0 = uint32_t(ctr), c1 = uint32_t(ctr >> 32), c2 = uint32_t(offset), c3 = uint32_t(offset >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += 0x9E3779B9u;  // the bump after the last round is unused
    k1 += 0xBB67AE85u;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

// Keep iff the 32-bit draw >= this (computed on the host exactly as the CPU kernel does).
inline uint64_t keep_threshold(float p) { return static_cast<uint64_t>(static_cast<double>(p) * 4294967296.0); }

}  // namespace philox
}  // namespace flashattn
