// Shared pieces of the process-wide CPU caches (output_pool.cpp, transposed_values.cpp).
#pragma once
#include <pthread.h>

#include <cstddef>
#include <cstdlib>
#include <mutex>

namespace pysparse {

// One mutex per Tag, never destroyed (tensors, and so the caches it guards, may outlive static destructors). The
// lock is held across fork() (as malloc does with its own), so a child forked while another thread held it, such
// as a DataLoader worker, starts with it unlocked.
template <typename Tag>
std::mutex& fork_safe_mutex() {
  static std::mutex* m = [] {
    auto* mu = new std::mutex();
    pthread_atfork([] { fork_safe_mutex<Tag>().lock(); }, [] { fork_safe_mutex<Tag>().unlock(); },
                   [] { fork_safe_mutex<Tag>().unlock(); });
    return mu;
  }();
  return *m;
}

// A cache's size limit in bytes from the environment variable `name` (megabytes): default_mb when unset or empty,
// 0 (cache off) for 0 or anything that is not a positive integer.
inline size_t cache_limit_from_env(const char* name, size_t default_mb) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return default_mb << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  return (end != nullptr && *end == '\0' && mb > 0) ? size_t(mb) << 20 : 0;
}

}  // namespace pysparse
