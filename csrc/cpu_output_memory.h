// Memory for the CPU ops' large outputs (out, dq, dk, dv of 32 MiB and more).
//
// glibc maps every allocation this large afresh (its mmap threshold stops at 32 MiB), so
// each such output of a torch.empty starts as pages the kernel must fault in and zero on
// first write: 10-30 % of a packed-sequence forward or training step on the development
// VM (benchmarks/RESULTS.md). Here an output's memory goes back to a pool when its tensor
// is freed, and the next output that fits takes it, already mapped: as the CUDA caching
// allocator does for GPU memory, and as jemalloc or tcmalloc would for the whole process.
// The pool holds at most FLASHATTN_CPU_POOL_MB MiB (default 1024; 0: every block is
// unmapped when freed); a block that would exceed that is unmapped. New blocks are mapped
// on 2 MiB boundaries and advised to use 2 MiB pages (as torch does for every tensor with
// THP_MEM_ALLOC_ENABLE=1), so even a fresh one faults once per 2 MiB, not per 4 KiB.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace flashattn {

class CpuOutputMemory {
 public:
  static constexpr size_t MIN_BYTES = size_t(32) << 20;  // smaller outputs: torch's allocator
  static constexpr size_t BLOCK = size_t(2) << 20;        // blocks are whole 2 MiB pages

  // The process's pool. Never destroyed: a tensor freed during interpreter shutdown, after
  // static destructors ran, still returns its block here.
  static CpuOutputMemory& instance() {
    static CpuOutputMemory* pool = new CpuOutputMemory(cap_from_env());
    return *pool;
  }

  // Rounds bytes up to whole blocks.
  static size_t block_bytes(size_t bytes) { return (bytes + BLOCK - 1) / BLOCK * BLOCK; }

  // A block of block_bytes(bytes): the smallest free one that fits with at most an eighth
  // to spare, else a new mapping; nullptr if mapping fails (the caller then asks torch).
  void* take(size_t bytes) {
    const size_t want = block_bytes(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first <= want + want / 8) {
        void* p = it->second;
        held_ -= it->first;
        // (The caller frees `want` bytes: a larger block's tail is unmapped now.)
        if (it->first > want) unmap(static_cast<char*>(p) + want, it->first - want);
        free_.erase(it);
        return p;
      }
    }
    return map(want);
  }

  // Takes back a block from take(bytes) (same bytes): kept while the pool has room.
  void give(void* p, size_t bytes) {
    const size_t size = block_bytes(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + size <= cap_) {
        free_.emplace(size, p);
        held_ += size;
        return;
      }
    }
    unmap(p, size);
  }

  // Unmaps every free block (flashattn_py.empty_cpu_cache); returns their bytes.
  size_t release() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      held_ = 0;
    }
    size_t bytes = 0;
    for (const auto& [size, p] : blocks) unmap(p, size), bytes += size;
    return bytes;
  }

 private:
  explicit CpuOutputMemory(size_t cap) : cap_(cap) {}

  static size_t cap_from_env() {
    const char* mb = std::getenv("FLASHATTN_CPU_POOL_MB");
    if (!mb || !*mb) return size_t(1024) << 20;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(mb, &end, 10);
    return *end == '\0' ? static_cast<size_t>(v) << 20 : size_t(1024) << 20;
  }

  // size bytes (whole blocks) at a 2 MiB boundary, advised to use 2 MiB pages.
  static void* map(size_t size) {
#if defined(__linux__)
    void* raw = mmap(nullptr, size + BLOCK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t first = (begin + BLOCK - 1) & ~(uintptr_t(BLOCK) - 1);
    if (first > begin) munmap(raw, first - begin);
    if (first + size < begin + size + BLOCK) munmap(reinterpret_cast<void*>(first + size), begin + BLOCK - first);
#if defined(MADV_HUGEPAGE)
    madvise(reinterpret_cast<void*>(first), size, MADV_HUGEPAGE);
#endif
    return reinterpret_cast<void*>(first);
#else
    (void)size;
    return nullptr;
#endif
  }

  static void unmap(void* p, size_t size) {
#if defined(__linux__)
    munmap(p, size);
#else
    (void)p, (void)size;
#endif
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size -> block
  size_t held_ = 0;
  const size_t cap_;
};

}  // namespace flashattn
