#include "core/request.h"

#include <chrono>

namespace offload {

RequestState::RequestState(IoRequest req, int nchunks) : req_(std::move(req)), remaining_(nchunks) {
  if (nchunks == 0) done_.store(true, std::memory_order_release);
}

void RequestState::chunk_finished(int64_t bytes, int err, int64_t at) {
  bytes_.fetch_add(bytes, std::memory_order_relaxed);
  if (err != 0) {
    std::lock_guard<std::mutex> lock(mu_);
    if (err_.load(std::memory_order_relaxed) == 0) {
      err_offset_ = at;
      err_.store(err, std::memory_order_release);
    }
  }
  if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    std::lock_guard<std::mutex> lock(mu_);
    done_.store(true, std::memory_order_release);
    cv_.notify_all();
  }
}

bool RequestState::wait(double timeout_s) {
  if (done()) return true;
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_s < 0) {
    cv_.wait(lock, [&] { return done(); });
    return true;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  return cv_.wait_until(lock, deadline, [&] { return done(); });
}

}  // namespace offload
