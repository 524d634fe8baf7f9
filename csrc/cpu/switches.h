// The process's switches for the CPU kernels' paths (for comparisons and tests):
// FLASHATTN_CPU_TILES=0 sends every call through BLAS. bf16 products run on AMX tiles
// where the CPU has them (forward and backward), unless FLASHATTN_CPU_AMX=0 or
// FLASHATTN_CPU_BF16_DOT is set (and FLASHATTN_CPU_AMX is not): FLASHATTN_CPU_BF16_DOT=0
// sends bf16 to the fp32 tiles (on bf16 widened to float), =1 to the AVX512-BF16 tiles
// where compiled in; unset, the faster of those two on this CPU (bf16_dot_by_default). An
// empty variable counts as unset. Read once, on first use (no environment lookup per
// call); the module's reload_cpu_switches() (csrc/ops.cpp) reads them again. A call's path
// is chosen from them by choose_path() (flash_cpu.h), once for a call with gradients (its
// backward is given the forward's).
#pragma once

#include <cstdlib>

namespace flashattn::cpu {

struct Switches {
  bool tiles = true, bf16_dot = true, amx = true;
};

// Whether bf16 products run on vdpbf16ps unless told: on AMD's cores, where they are
// faster than the fp32 tiles on bf16 widened to float, and not on Intel's, where they
// are slower (measured: benchmarks/RESULTS.md 'What was tried').
inline bool bf16_dot_by_default() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

inline Switches switches_from_env() {
  auto value = [](const char* name) {  // (null when unset or empty)
    const char* env = std::getenv(name);
    return env != nullptr && env[0] != '\0' ? env : nullptr;
  };
  auto on = [&](const char* name, bool unset) { return value(name) ? value(name)[0] != '0' : unset; };
  return {on("FLASHATTN_CPU_TILES", true), on("FLASHATTN_CPU_BF16_DOT", bf16_dot_by_default()),
          on("FLASHATTN_CPU_AMX", value("FLASHATTN_CPU_BF16_DOT") == nullptr)};
}

inline Switches& switches() {
  static Switches current = switches_from_env();
  return current;
}

}  // namespace flashattn::cpu
