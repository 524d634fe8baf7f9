// The CPU kernels the ops call: one instruction set's table (kernel_table.h), chosen once
// per process by isa_select.cpp.
#pragma once

#include "kernel_table.h"

namespace flashattn::cpu {

// The active table; the first call selects it (FLASHATTN_CPU_ISA or the best this CPU
// runs). Throws std::invalid_argument for a bad FLASHATTN_CPU_ISA, std::runtime_error
// when the library cannot be loaded.
const KernelTable& kernels();

// Select again (FLASHATTN_CPU_ISA and the kernel switches re-read): for tests and benchmarks.
const KernelTable& select_kernels();

}  // namespace flashattn::cpu
