#include "cpu/transposed_values.h"

#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>

#include <mutex>
#include <unordered_map>

#include "cpu/kernels/bsr_linear.h"
#include "cpu/process_cache.h"

namespace pysparse {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// One cached copy. `owner` tells whether the values tensor the copy was made from still exists (a dead tensor's
// address may be reused by a new one); data and version tell whether it still holds the same numbers.
struct Entry {
  WeakImpl owner;
  const void* data;
  uint32_t version;
  at::Tensor transposed;
};

bool same_blocks(const at::Tensor& transposed, const at::Tensor& values) {
  return transposed.size(0) == values.size(0) && transposed.size(1) == values.size(2) &&
         transposed.size(2) == values.size(1);
}

class TransposedValuesCache {
 public:
  at::Tensor get(const at::Tensor& values) {
    if (limit_ == 0 || values.is_inference()) return {};
    c10::TensorImpl* impl = values.unsafeGetTensorImpl();
    const uint32_t version = impl->version_counter().current_version();
    const std::lock_guard<std::mutex> lock(fork_safe_mutex<TransposedValuesCache>());
    auto it = entries_.find(impl);
    if (it != entries_.end() && !it->second.owner.expired() && it->second.data == values.const_data_ptr() &&
        it->second.version == version && same_blocks(it->second.transposed, values)) {
      return it->second.transposed;
    }
    forget_dead_and_stale(impl);
    const size_t bytes = size_t(values.numel()) * sizeof(float);
    if (bytes_ + bytes > limit_) return {};
    at::Tensor t = at::empty({values.size(0), values.size(2), values.size(1)}, values.options());
    transpose_bsr_blocks(values.const_data_ptr<float>(), values.size(0), values.size(1), values.size(2),
                         t.mutable_data_ptr<float>(), at::get_num_threads());
    entries_.insert_or_assign(impl, Entry{WeakImpl(values.getIntrusivePtr()), values.const_data_ptr(), version, t});
    bytes_ += bytes;
    return t;
  }

  size_t bytes() {
    const std::lock_guard<std::mutex> lock(fork_safe_mutex<TransposedValuesCache>());
    return bytes_;
  }

 private:
  // Drops the entries of tensors that no longer exist and the entry of `impl` (out of date). Runs on a miss only:
  // the steady state (the same layers called again) never walks the map.
  void forget_dead_and_stale(c10::TensorImpl* impl) {
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->first == impl || it->second.owner.expired()) {
        bytes_ -= size_t(it->second.transposed.numel()) * sizeof(float);
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }

  const size_t limit_ = cache_limit_from_env("PYSPARSE_CPU_TRANSPOSED_CACHE_MB", 1024);
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  size_t bytes_ = 0;
};

TransposedValuesCache& cache() {
  static auto* instance = new TransposedValuesCache();  // never destroyed, as the tensors it refers to
  return *instance;
}

}  // namespace

at::Tensor cached_transposed_values(const at::Tensor& values) { return cache().get(values); }

size_t transposed_values_cache_bytes() { return cache().bytes(); }

}  // namespace pysparse
