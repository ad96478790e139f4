// kernels._cpu_cache: a CPU allocator for torch that keeps a bounded number of freed MB-sized blocks and hands
// them out again to requests of the same size, instead of returning each to the OS.
//
// Why: a quantized base exists to save memory, so engine/quant/heap.py fixes glibc's mmap threshold at 64 KiB:
// every tensor from there up is its own mapping, unmapped on free (freed activations leave RSS). The cost is
// that the next tensor of that size is a fresh mapping, page-faulted in 4 KiB at a time while the OpenMP
// threads of the op wait on the faulting one: a QLoRA-NF4 step of a 0.5B model (2 x 512 tokens) faulted 1.0M
// pages, 2.8 s of system time per 6.6 s step (Intel Xeon with AMX, 2 cores). The step asks for the same few
// sizes over and over ([tokens, hidden] bf16 is most of it), so a small exact-size cache serves almost every
// request with memory that is already resident, and its bound caps what it can add to the peak.
//
// Only sizes in [min_bytes, max_bytes) are cached: below, glibc's heap serves them; above (>= 2 MB), torch puts
// tensors on transparent huge pages, whose faults are few. Every block carries a 64-byte header (its size and
// whether it may be cached), so the deleter needs no table and handles any pointer this allocator gave out,
// including raw_allocate()'s, after uninstall too. Each hand-out and return is reported to torch's profiler as
// torch's own allocator does (profile_memory=True sees tensors, not the cache). The allocator object is never destroyed: tensors made while
// it was installed keep its deleter for as long as they live.
//
// Built only when the build finds torch's headers (it includes c10, unlike _C), against that torch version;
// kernels/__init__.py refuses it under any other.
#include <pybind11/pybind11.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr std::size_t kHeader = 64;  // keeps the data 64-byte aligned, like torch's own allocator
constexpr std::size_t kPage = 4096;

struct Header {
  std::size_t bytes;  // the whole block, header included (what alloc_cpu was asked for)
  std::size_t cacheable;
};

class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: live tensors keep its deleter
    return *cache;
  }

  // False when torch kept another allocator (one set with a higher priority than the default's).
  bool install(std::size_t min_bytes, std::size_t max_bytes, std::size_t limit_bytes, std::size_t per_size) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (min_bytes > max_bytes) throw std::invalid_argument("min_bytes > max_bytes");
    min_ = min_bytes;
    max_ = max_bytes;
    limit_ = limit_bytes;
    per_size_ = per_size;
    if (!installed_) {
      previous_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, /*priority=*/0);
      installed_ = c10::GetCPUAllocator() == this;
    }
    return installed_;
  }

  void uninstall() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!installed_) return;
      c10::SetCPUAllocator(previous_, /*priority=*/0);
      installed_ = false;
    }
    release();
  }

  void release() {  // every cached block back to the OS
    std::vector<void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : free_) blocks.insert(blocks.end(), entry.second.begin(), entry.second.end());
      free_.clear();
      cached_ = 0;
    }
    for (void* block : blocks) c10::free_cpu(block);
  }

  py::dict stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    py::dict d;
    d["installed"] = installed_;
    d["hits"] = hits_;
    d["misses"] = misses_;
    d["cached_bytes"] = cached_;
    d["limit_bytes"] = limit_;
    return d;
  }

  c10::DataPtr allocate(std::size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &BlockCache::deleter, c10::Device(c10::DeviceType::CPU)};
    if (nbytes > SIZE_MAX - kHeader - kPage) throw std::bad_alloc();
    const std::size_t bytes = (nbytes + kHeader + kPage - 1) / kPage * kPage;  // mappings are whole pages anyway
    void* block = nullptr;
    bool cacheable = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      cacheable = installed_ && nbytes >= min_ && nbytes < max_;
      if (cacheable) {
        auto it = free_.find(bytes);
        if (it != free_.end() && !it->second.empty()) {
          block = it->second.back();  // the most recently freed: likeliest still in cache
          it->second.pop_back();
          cached_ -= bytes;
          ++hits_;
        } else {
          ++misses_;
        }
      }
    }
    if (block == nullptr) {
      block = c10::alloc_cpu(bytes);  // throws on failure, like torch's own allocator
      *static_cast<Header*>(block) = Header{bytes, cacheable ? 1u : 0u};
    }
    void* data = static_cast<char*>(block) + kHeader;
    c10::profiledCPUMemoryReporter().New(data, nbytes);  // what torch's allocator reports: the profiler's events
    return {data, data, &BlockCache::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &BlockCache::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void deleter(void* data) {
    if (data == nullptr) return;
    c10::profiledCPUMemoryReporter().Delete(data);
    void* block = static_cast<char*>(data) - kHeader;
    get().put(block, *static_cast<Header*>(block));
  }

 private:
  void put(void* block, const Header& header) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (installed_ && header.cacheable && cached_ + header.bytes <= limit_) {
        std::vector<void*>& same = free_[header.bytes];
        if (same.size() < per_size_) {
          same.push_back(block);
          cached_ += header.bytes;
          return;
        }
      }
    }
    c10::free_cpu(block);
  }

  std::mutex mutex_;
  c10::Allocator* previous_ = nullptr;
  bool installed_ = false;
  std::size_t min_ = 0, max_ = 0, limit_ = 0, per_size_ = 0;
  std::unordered_map<std::size_t, std::vector<void*>> free_;  // block size -> freed blocks of that size
  std::size_t cached_ = 0, hits_ = 0, misses_ = 0;
};

// Tests reach raw_allocate/raw_deallocate (used by some of torch's own kernels) through this.
void raw_roundtrip(std::size_t nbytes) {
  c10::Allocator* allocator = c10::GetCPUAllocator();
  void* p = allocator->raw_allocate(nbytes);
  if (nbytes > 0) static_cast<unsigned char*>(p)[nbytes - 1] = 1;
  allocator->raw_deallocate(p);
}

}  // namespace

PYBIND11_MODULE(_cpu_cache, m) {
  m.doc() = "A bounded exact-size cache of freed CPU blocks, installed as torch's CPU allocator.";
  m.def("install", [](std::size_t min_bytes, std::size_t max_bytes, std::size_t limit_bytes, std::size_t per_size) {
    return BlockCache::get().install(min_bytes, max_bytes, limit_bytes, per_size);
  }, py::arg("min_bytes"), py::arg("max_bytes"), py::arg("limit_bytes"), py::arg("per_size"));
  m.def("uninstall", [] { BlockCache::get().uninstall(); });
  m.def("release", [] { BlockCache::get().release(); });
  m.def("stats", [] { return BlockCache::get().stats(); });
  m.def("raw_roundtrip", &raw_roundtrip, py::arg("nbytes"));
#ifdef ENGINE_TORCH_VERSION
  m.attr("torch_version") = ENGINE_TORCH_VERSION;
#else
  m.attr("torch_version") = "";
#endif
}
