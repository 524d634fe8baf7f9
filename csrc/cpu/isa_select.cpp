// Which CPU kernel library the ops call (kernel_table.h): the best instruction set this CPU
// runs, or the one FLASHATTN_CPU_ISA names; loaded from the library next to this one.
#include "isa_select.h"

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

namespace flashattn::cpu {

namespace {

// Best first. Each needs every instruction set its library was compiled with (setup.py).
constexpr const char* kIsas[] = {"avx512bf16", "avx512", "avx2", "baseline"};

bool cpu_runs(const std::string& isa) {
  if (isa == "baseline") return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // (its checks include the OS saving the AVX / AVX-512 registers)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2") return avx2;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx512") return avx512;
  if (isa == "avx512bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

// flashattn_py/_cpu_<isa><suffix> where this library is flashattn_py/_C<suffix>.
std::string library_path(const std::string& isa) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&library_path), &info) == 0 || info.dli_fname == nullptr) {
    throw std::runtime_error("flashattn: cannot locate the _C library to find the CPU kernels next to it");
  }
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  const size_t name = slash == std::string::npos ? 0 : slash + 1;
  if (path.compare(name, 3, "_C.") != 0) {
    throw std::runtime_error("flashattn: unexpected library name " + path);
  }
  return path.substr(0, name) + "_cpu_" + isa + path.substr(name + 2);
}

const KernelTable* load(const std::string& isa) {
  const std::string path = library_path(isa);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    throw std::runtime_error("flashattn: cannot load the " + isa + " CPU kernels (" + path +
                             "): " + (why ? why : "unknown error") + "; rebuild the extension");
  }
  auto entry = reinterpret_cast<const KernelTable* (*)()>(dlsym(handle, "flashattn_cpu_kernel_table"));
  if (entry == nullptr) throw std::runtime_error("flashattn: " + path + " has no flashattn_cpu_kernel_table");
  const KernelTable* table = entry();
  if (table->abi != kKernelTableAbi || table->params_size != sizeof(FlashParams) ||
      table->bwd_params_size != sizeof(FlashBwdParams)) {
    throw std::runtime_error("flashattn: " + path + " is from another build of flashattn_py (its kernel table "
                             "does not match); rebuild the extension");
  }
  return table;
}

// FLASHATTN_CPU_ISA's table (a bad name, a set this CPU cannot run or a missing library
// raise), else the best set this CPU runs whose library loads (a build may have left some
// out: FLASHATTN_CPU_ISAS).
const KernelTable* choose() {
  const char* forced = std::getenv("FLASHATTN_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    const std::string isa = forced;
    bool known = false;
    for (const char* name : kIsas) known = known || isa == name;
    if (!known) {
      throw std::invalid_argument("FLASHATTN_CPU_ISA: expected one of baseline, avx2, avx512, avx512bf16, got '" +
                                  isa + "'");
    }
    if (!cpu_runs(isa)) {
      throw std::invalid_argument("FLASHATTN_CPU_ISA: this CPU does not run the '" + isa + "' kernels");
    }
    return load(isa);
  }
  for (const char* name : kIsas) {
    if (!cpu_runs(name)) continue;
    try {
      return load(name);
    } catch (const std::runtime_error&) {
      if (std::string(name) == "baseline") throw;  // (every build has the baseline)
    }
  }
  throw std::logic_error("unreachable: the baseline is always chosen");
}

std::atomic<const KernelTable*> active{nullptr};
std::mutex loading;

}  // namespace

const KernelTable& kernels() {
  const KernelTable* table = active.load(std::memory_order_acquire);
  if (table == nullptr) table = &select_kernels();
  return *table;
}

const KernelTable& select_kernels() {
  std::lock_guard<std::mutex> lock(loading);
  const KernelTable* table = choose();  // (dlopen of a loaded library returns it again)
  table->reload_switches();
  active.store(table, std::memory_order_release);
  return *table;
}

}  // namespace flashattn::cpu
