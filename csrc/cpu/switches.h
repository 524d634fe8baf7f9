// The process's switches for the CPU kernels' paths (for comparisons and tests):
// FLASHATTN_CPU_TILES=0 sends every call through BLAS, FLASHATTN_CPU_BF16_DOT=0 sends bf16
// to the fp32 tiles. Read once, on first use (no environment lookup per call); the module's
// reload_cpu_switches() (csrc/ops.cpp) reads them again. A call's path is chosen from them
// by kernel_path() (flash_cpu.h), the one function its forward and backward both ask.
#pragma once

#include <cstdlib>

namespace flashattn::cpu {

struct Switches {
  bool tiles = true, bf16_dot = true;
};

inline Switches switches_from_env() {
  auto on = [](const char* name) {
    const char* env = std::getenv(name);
    return env == nullptr || env[0] != '0';
  };
  return {on("FLASHATTN_CPU_TILES"), on("FLASHATTN_CPU_BF16_DOT")};
}

inline Switches& switches() {
  static Switches current = switches_from_env();
  return current;
}

}  // namespace flashattn::cpu
