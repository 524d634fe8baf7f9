// The CPU kernels of one instruction set, as a table of plain function pointers.
//
// The kernels are compiled once per instruction set (setup.py: baseline x86-64, AVX2+FMA,
// AVX-512, AVX-512 with BF16), each into its own shared library flashattn_py/_cpu_<isa>.*.so
// that exports only `flashattn_cpu_kernel_table`. The ops (csrc/ops.cpp, built for the
// baseline) load the best one this CPU runs (isa_select.cpp) and call through the table. Each
// library has private copies of every inline function it uses (hidden visibility, linked
// -Bsymbolic), so AVX-512 code never stands in for the baseline's.
#pragma once

#include <cstdint>

#include "../flash_params.h"

namespace flashattn::cpu {

// Element types, in the order of the tables' entries.
enum class Dtype { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };
constexpr int kNumDtypes = 4;
// Their torch names (flashattn_py._C.CPU_DTYPES), in the same order.
constexpr const char* kDtypeNames[kNumDtypes] = {"float32", "float64", "bfloat16", "float16"};

// Bumped when this struct or the kernels' contract changes; with the parameter structs'
// sizes it stops a kernel library left by another build from being used.
constexpr uint32_t kKernelTableAbi = 4;  // (4: FlashParams::bias_is_float32)

// A bit of FlashParams::cpu_path (flash_cpu.h encode_path) set for a call that no backward
// follows (flashattn_py/ops.py: eager calls that need no gradient, flash_attn_with_kvcache;
// the ops' fwd_inference), alone or with a path: its forward may then take products whose
// scores a backward would not recompute bitwise (decoding's query rows on AMX,
// flash_fwd.cpp). flashattn_py._C.CPU_FORWARD_ONLY.
constexpr int64_t FORWARD_ONLY = 1 << 8;

struct KernelTable {
  uint32_t abi;                // kKernelTableAbi of the build that made this library
  uint32_t params_size;        // sizeof(FlashParams) there
  uint32_t bwd_params_size;    // sizeof(FlashBwdParams) there
  const char* isa;       // "baseline", "avx2", "avx512", "avx512bf16"
  const char* features;  // the paths compiled in, e.g. "avx2-tiles avx512-exp avx512bf16-dot"
  void (*fwd[kNumDtypes])(const FlashParams&);
  void (*bwd[kNumDtypes])(const FlashBwdParams&);
  // FLASHATTN_CPU_TILES / FLASHATTN_CPU_BF16_DOT read again (switches.h; for tests)
  void (*reload_switches)();
  // flash_cpu.h choose_path (encoded: FlashParams::cpu_path) and path_runs, per element type
  int64_t (*choose_path[kNumDtypes])(int64_t seqlen_q, int64_t head_dim);
  bool (*path_runs[kNumDtypes])(int64_t code);
};

}  // namespace flashattn::cpu

extern "C" const flashattn::cpu::KernelTable* flashattn_cpu_kernel_table();
