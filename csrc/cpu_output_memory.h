// Memory for the CPU ops' large outputs (out, dq, dk, dv of 8 MiB and more), Linux only.
//
// glibc maps every allocation of 32 MiB or more afresh (its mmap threshold stops there),
// and returns smaller ones to the system when it frees over twice its threshold at the top
// of its heap (a backward's three gradients: bf16 ones of 19 MB faulted in 8-25 thousand
// pages per call), so such an output of a torch.empty often starts as pages the kernel
// must fault in and zero on first write: 10-30 % of a packed-sequence forward or training
// step on the development VM (benchmarks/RESULTS.md). Here an output's memory goes back to
// a pool when its tensor is freed, and the next output that fits takes it, already
// mapped: as the CUDA caching allocator does for GPU memory, and as jemalloc or tcmalloc
// would for the whole process.
// The pool holds at most FLASHATTN_CPU_POOL_MB MiB (default 512; 0: every block is
// unmapped when freed); a freed block that does not fit evicts the largest kept ones
// (or, larger than the limit, is unmapped). New blocks are mapped on 2 MiB boundaries and
// advised to use 2 MiB pages (as torch does for every tensor with THP_MEM_ALLOC_ENABLE=1),
// so even a fresh one faults once per 2 MiB, not per 4 KiB.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace flashattn {

class CpuOutputMemory {
 public:
  // Smaller outputs: torch's allocator. (Blocks are whole 2 MiB pages: a live output takes
  // at most a quarter more memory than it needs from 8 MiB on, twice at 2 MiB.)
  static constexpr size_t MIN_BYTES = size_t(8) << 20;
  static constexpr size_t BLOCK = size_t(2) << 20;        // blocks are whole 2 MiB pages

  // The process's pool. Never destroyed: a tensor freed during interpreter shutdown, after
  // static destructors ran, still returns its block here.
  static CpuOutputMemory& instance() {
    static CpuOutputMemory* pool = make();
    return *pool;
  }

  // Rounds bytes up to whole blocks.
  static size_t block_bytes(size_t bytes) { return (bytes + BLOCK - 1) / BLOCK * BLOCK; }

  // A block of at least `bytes` and its size (whole blocks): the smallest kept one with at
  // most an eighth to spare, else a new mapping (after unmapping every kept block if the
  // first try fails); {nullptr, 0} if mapping fails (the caller then asks torch).
  std::pair<void*, size_t> take(size_t bytes) {
    const size_t want = block_bytes(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first <= want + want / 8) {
        const std::pair<void*, size_t> block{it->second, it->first};
        held_ -= it->first;
        free_.erase(it);
        return block;
      }
    }
    void* p = map(want);
    if (p == nullptr && release() > 0) p = map(want);
    return {p, p ? want : 0};
  }

  // Takes back a block from take (its size as take gave it): kept while it fits the pool,
  // after unmapping the largest kept blocks where needed; a block larger than the pool is
  // unmapped.
  // (A tensor's deleter calls this: nothing here may throw.)
  void give(void* p, size_t size) noexcept {
    if (size <= cap_) {
      std::lock_guard<std::mutex> lock(mutex_);
      while (held_ + size > cap_) {
        auto largest = std::prev(free_.end());
        unmap(largest->second, largest->first);
        held_ -= largest->first;
        free_.erase(largest);
      }
      try {
        free_.emplace(size, p);
        held_ += size;
        return;
      } catch (const std::bad_alloc&) {  // (no memory for the map's node: unmapped below)
      }
    }
    unmap(p, size);
  }

  // Unmaps every kept block (flashattn_py.empty_cpu_cache); returns their bytes.
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

  static CpuOutputMemory* make() {
    pool_ = new CpuOutputMemory(cap_from_env());
#if defined(__linux__)
    // fork() waits for the lock and the child starts with it free: a fork while another
    // thread is in take / give / release would leave the child a locked mutex, or the
    // pool half updated.
    pthread_atfork([] { pool_->mutex_.lock(); }, [] { pool_->mutex_.unlock(); },
                   [] { pool_->mutex_.unlock(); });
#endif
    return pool_;
  }
  static inline CpuOutputMemory* pool_ = nullptr;  // instance(), for the fork handlers

  // FLASHATTN_CPU_POOL_MB: a whole number of MiB, 0 to 1048576 (1 TiB); anything else
  // gives the default, 512.
  static size_t cap_from_env() {
    constexpr long long DEFAULT_MB = 512, MAX_MB = 1ll << 20;
    const char* text = std::getenv("FLASHATTN_CPU_POOL_MB");
    long long mb = DEFAULT_MB;
    if (text != nullptr && *text != '\0') {
      char* end = nullptr;
      const long long value = std::strtoll(text, &end, 10);
      if (*end == '\0' && value >= 0 && value <= MAX_MB) mb = value;
    }
    return static_cast<size_t>(mb) << 20;
  }

  // size bytes (whole blocks) at a 2 MiB boundary, advised to use 2 MiB pages; nullptr
  // if the mapping fails (or off Linux).
  static void* map(size_t size) {
#if defined(__linux__)
    void* raw = mmap(nullptr, size + BLOCK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    // (The BLOCK spare bytes: unmapped before and after the aligned part.)
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t first = (begin + BLOCK - 1) & ~(uintptr_t(BLOCK) - 1);
    if (first > begin) munmap(raw, first - begin);
    munmap(reinterpret_cast<void*>(first + size), begin + BLOCK - first);
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
