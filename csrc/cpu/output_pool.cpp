#include "cpu/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace pysparse {
namespace {

std::mutex& pool_mutex() {
  static std::mutex* m = new std::mutex();
  return *m;
}

constexpr size_t kMinPooledBytes = size_t(1) << 20;  // smaller blocks come from malloc's heap, already mapped

size_t limit_from_env() {
  const char* env = std::getenv("PYSPARSE_CPU_OUTPUT_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  return (end != nullptr && *end == '\0' && mb > 0) ? size_t(mb) << 20 : 0;
}

// Free buffers by byte size. Thread-safe: a tensor may die on any thread.
class OutputPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* data = take(n);
    if (data == nullptr) data = c10::alloc_cpu(n);
    return {data, new Block{data, n, this}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  const size_t limit = limit_from_env();

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

  std::mutex& mutex_ = pool_mutex();
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t pooled_ = 0;
};

OutputPool& pool() {
  // Never destroyed: tensors may outlive static destructors. The lock is held across fork() (as malloc does with
  // its own), so a child forked while another thread was inside the pool does not inherit a locked mutex.
  static OutputPool* instance = [] {
    auto* p = new OutputPool();
    pthread_atfork([] { pool_mutex().lock(); }, [] { pool_mutex().unlock(); }, [] { pool_mutex().unlock(); });
    return p;
  }();
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
