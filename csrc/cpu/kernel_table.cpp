// This instruction set's kernel table (kernel_table.h): compiled into each
// flashattn_py/_cpu_<isa> library with that instruction set's flags (setup.py).
#include "kernel_table.h"

#include "flash_cpu.h"

#ifndef FLASHATTN_ISA_NAME
#error "FLASHATTN_ISA_NAME: the instruction set this library is compiled for (setup.py defines it)"
#endif

namespace {

// The paths this build's kernels have, fixed by the instruction set they were compiled for.
constexpr const char* kFeatures =
#if defined(FLASHATTN_CPU_AMX)
    "avx2-tiles avx512-exp avx512bf16-dot amx-bf16";
#elif defined(FLASHATTN_CPU_BF16_DOT)
    "avx2-tiles avx512-exp avx512bf16-dot";
#elif defined(FLASHATTN_CPU_TILES) && defined(__AVX512F__)
    "avx2-tiles avx512-exp";
#elif defined(FLASHATTN_CPU_TILES)
    "avx2-tiles";
#else
    "blas";
#endif

void reload_switches() { flashattn::cpu::switches() = flashattn::cpu::switches_from_env(); }

template <typename T>
int64_t choose_path(int64_t seqlen_q, int64_t head_dim) {
  return flashattn::cpu::encode_path(flashattn::cpu::choose_path<T>(seqlen_q, head_dim));
}

}  // namespace

extern "C" __attribute__((visibility("default"))) const flashattn::cpu::KernelTable* flashattn_cpu_kernel_table() {
  using namespace flashattn::cpu;
  static const KernelTable table = {
      kKernelTableAbi,
      sizeof(flashattn::FlashParams),
      sizeof(flashattn::FlashBwdParams),
      FLASHATTN_ISA_NAME,
      kFeatures,
      {&flash_fwd<float>, &flash_fwd<double>, &flash_fwd<c10::BFloat16>, &flash_fwd<c10::Half>},
      {&flash_bwd<float>, &flash_bwd<double>, &flash_bwd<c10::BFloat16>, &flash_bwd<c10::Half>},
      &reload_switches,
      {&choose_path<float>, &choose_path<double>, &choose_path<c10::BFloat16>, &choose_path<c10::Half>},
      {&path_runs<float>, &path_runs<double>, &path_runs<c10::BFloat16>, &path_runs<c10::Half>},
  };
  return &table;
}
