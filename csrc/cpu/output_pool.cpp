#include "cpu/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "cpu/process_cache.h"

namespace pysparse {
namespace {

constexpr size_t kMinPooledBytes = size_t(1) << 20;  // smaller blocks come from malloc's heap, already mapped

// Free buffers by byte size. Thread-safe: a tensor may die on any thread.
class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* data = take(n);
    if (data == nullptr) data = c10::alloc_cpu(n);
    return {data, new Block{data, n, this}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  const size_t limit = cache_limit_from_env("PYSPARSE_CPU_OUTPUT_CACHE_MB", 256);

 private:
  struct Block {
    void* data;
    size_t bytes;
    OutputPool* pool;
  };

  void* take(size_t n) {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(n);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* data = it->second.back();
    it->second.pop_back();
    pooled_ -= n;
    return data;
  }

  void give_back(void* data, size_t n) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (pooled_ + n <= limit) {
        free_[n].push_back(data);
        pooled_ += n;
        return;
      }
    }
    c10::free_cpu(data);
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    block->pool->give_back(block->data, block->bytes);
    delete block;
  }

  std::mutex& mutex_ = fork_safe_mutex<OutputPool>();
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t pooled_ = 0;
};

OutputPool& pool() {
  // Never destroyed: tensors may outlive static destructors.
  static OutputPool* instance = new OutputPool();
  return *instance;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  OutputPool& p = pool();
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (p.limit == 0 || bytes < kMinPooledBytes || options.device().type() != c10::DeviceType::CPU) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &p, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace pysparse
